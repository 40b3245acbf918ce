//! Builds the test guests for wasm32 and places them in `OUT_DIR`.

use std::path::PathBuf;

#[path = "../host/build_guest.rs"]
mod build_guest;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (dir, wasm) in [
        ("guests/chaos", "guest_chaos.wasm"),
        ("guests/kv-next", "guest_kv_next.wasm"),
        ("guests/ledger", "ledger.wasm"),
        ("guests/odd-name", "guest_odd_name.wasm"),
    ] {
        let built =
            build_guest::build_guest(&manifest_dir.join(dir), &manifest_dir.join("../wit"), wasm);
        std::fs::copy(&built, out_dir.join(wasm)).unwrap_or_else(|e| panic!("copy {wasm}: {e}"));
    }
}
