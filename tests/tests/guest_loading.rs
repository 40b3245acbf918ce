//! Loading guests: the compile cache is written, reused, and rebuilt when
//! corrupt; a failing host is a host fault, never a command result.

use std::sync::Arc;

use guest_kv::command::Command;
use raftwasm::runtime::{BUNDLED_GUEST, Context, GuestRuntime, Limits, StateRead};

fn cached_runtime(dir: &std::path::Path) -> GuestRuntime {
    GuestRuntime::new(Limits::default(), Some(dir.to_owned())).expect("the wasm engine starts")
}

fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.expect("dir entry").path()).collect())
        .unwrap_or_default()
}

#[test]
fn compiled_guest_is_cached_and_reused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = cached_runtime(dir.path())
        .load(BUNDLED_GUEST)
        .expect("loads");
    let files = cache_files(dir.path());
    assert_eq!(files.len(), 1, "one compiled guest: {files:?}");
    let written = std::fs::metadata(&files[0])
        .and_then(|m| m.modified())
        .expect("mtime");

    let second = cached_runtime(dir.path())
        .load(BUNDLED_GUEST)
        .expect("loads from cache");
    assert_eq!(first.hash(), second.hash());
    let reused = std::fs::metadata(&files[0])
        .and_then(|m| m.modified())
        .expect("mtime");
    assert_eq!(written, reused, "the cache entry was reused, not rewritten");
}

#[test]
fn corrupt_cache_is_recompiled() {
    let dir = tempfile::tempdir().expect("temp dir");
    cached_runtime(dir.path())
        .load(BUNDLED_GUEST)
        .expect("loads");
    let files = cache_files(dir.path());
    std::fs::write(&files[0], b"not a compiled module").expect("corrupt the cache");

    let module = cached_runtime(dir.path())
        .load(BUNDLED_GUEST)
        .expect("recompiles");
    assert_eq!(module.name(), "guest-kv");
    let repaired = std::fs::read(&files[0]).expect("cache file");
    assert!(repaired.len() > 1000, "the corrupt entry was replaced");
}

/// A cache entry whose bytes changed after it was written (one flipped bit
/// in the compiled code still passes wasmtime's header checks) is compiled
/// again, never run.
#[test]
fn tampered_cache_entry_is_recompiled_not_loaded() {
    let dir = tempfile::tempdir().expect("temp dir");
    cached_runtime(dir.path())
        .load(BUNDLED_GUEST)
        .expect("loads");
    let files = cache_files(dir.path());
    assert_eq!(files.len(), 1, "one compiled guest: {files:?}");
    let mut tampered = std::fs::read(&files[0]).expect("cache file");
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    std::fs::write(&files[0], &tampered).expect("tamper with the cache");

    let module = cached_runtime(dir.path())
        .load(BUNDLED_GUEST)
        .expect("recompiles");
    assert_eq!(module.name(), "guest-kv");
    let after = std::fs::read(&files[0]).expect("cache file");
    assert_ne!(
        after, tampered,
        "the tampered entry was loaded, not replaced"
    );
}

/// A state whose storage always fails.
struct BrokenDisk;

impl StateRead for BrokenDisk {
    fn get(&self, _key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        Err(std::io::Error::other("disk on fire"))
    }

    fn scan(
        &self,
        _: &[u8],
        _: Option<&[u8]>,
        _: usize,
        _: usize,
    ) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Err(std::io::Error::other("disk on fire"))
    }
}

#[test]
fn storage_failure_is_a_host_fault() {
    let runtime = GuestRuntime::new(Limits::default(), None).expect("the wasm engine starts");
    let module = runtime.load(BUNDLED_GUEST).expect("loads");
    let mut instance = module.instantiate(Arc::new(BrokenDisk));
    let ctx = Context {
        index: 1,
        position: 1,
        time_ms: 0,
    };
    let fault = instance
        .apply(ctx, &Command::Get { key: b"k" }.encode())
        .expect_err("a failing disk is not a command result");
    assert!(fault.0.contains("disk on fire"), "{fault}");
    assert!(instance.take_writes().is_empty());
}

#[test]
fn bundled_guest_imports_only_the_world() {
    let mut imports = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(BUNDLED_GUEST) {
        if let wasmparser::Payload::ImportSection(reader) = payload.expect("valid module") {
            for import in reader.into_imports() {
                let import = import.expect("valid import");
                imports.push(format!("{}#{}", import.module, import.name));
            }
        }
    }
    assert!(!imports.is_empty(), "the guest uses the store");
    for import in &imports {
        assert!(
            import.starts_with("raftwasm:state-machine/"),
            "unexpected import {import}"
        );
    }
}
