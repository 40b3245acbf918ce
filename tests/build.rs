//! Builds the test guests for wasm32 and places them in `OUT_DIR`.

use std::path::PathBuf;

#[path = "../host/build_guest.rs"]
mod build_guest;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wasm = build_guest::build_guest(
        &manifest_dir.join("guests/chaos"),
        &manifest_dir.join("../wit"),
        "guest_chaos.wasm",
    );
    std::fs::copy(&wasm, out_dir.join("guest_chaos.wasm")).expect("copy the chaos guest");
}
