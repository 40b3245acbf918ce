//! Builds the bundled `guest-kv` module and places it in `OUT_DIR`, where the
//! runtime embeds it with `include_bytes!`.

use std::path::PathBuf;

mod build_guest;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let wasm = build_guest::build_guest(
        &manifest_dir.join("../guest-kv"),
        &manifest_dir.join("../wit"),
        "guest_kv.wasm",
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("guest_kv.wasm");
    std::fs::copy(&wasm, &out)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", wasm.display(), out.display()));
}
