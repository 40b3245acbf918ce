//! Builds a guest crate for `wasm32-unknown-unknown` from a build script, so a
//! fresh clone needs only cargo and the wasm target. Shared by the host's and
//! the tests' build scripts.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";

/// Builds the cdylib crate in `crate_dir` (whose WIT files are in `wit_dir`)
/// in release mode and returns the path of its `.wasm` file. Panics with
/// instructions when it cannot.
pub fn build_guest(crate_dir: &Path, wit_dir: &Path, wasm_name: &str) -> PathBuf {
    for path in [
        crate_dir.join("src"),
        crate_dir.join("Cargo.toml"),
        wit_dir.to_owned(),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    require_wasm_target();

    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // <target>/<profile>/build/<pkg>-<hash>/out: keep guest builds beside the
    // profile, so they are reused across the host's rebuilds. One directory
    // per guest: a cdylib's artifacts carry no hash in their names, so two
    // guests built with different features of a shared crate would clobber
    // each other's files in one directory.
    let crate_name = crate_dir.file_name().unwrap_or_default();
    let target_dir = out_dir
        .ancestors()
        .nth(3)
        .unwrap_or(&out_dir)
        .join("guests")
        .join(crate_name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's flags are for the host, not for wasm32.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS"
            || matches!(
                &*key,
                "RUSTFLAGS" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER"
            )
        {
            command.env_remove(&*key);
        }
    }
    let status = command.status().unwrap_or_else(|e| {
        panic!(
            "cannot run cargo to build the guest in {}: {e}",
            crate_dir.display()
        )
    });
    assert!(
        status.success(),
        "building the guest in {} for {TARGET} failed; see the cargo output above",
        crate_dir.display()
    );
    target_dir.join(TARGET).join("release").join(wasm_name)
}

/// Fails the build with the command that fixes it when the wasm32 standard
/// library is not installed.
fn require_wasm_target() {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    let installed = sysroot.is_some_and(|root| root.join("lib/rustlib").join(TARGET).exists());
    assert!(
        installed,
        "the Rust target {TARGET} is not installed; the bundled guest is built for it. \
         Run `rustup target add {TARGET}` and build again."
    );
}
