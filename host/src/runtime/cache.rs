//! The on-disk cache of compiled guests.
//!
//! An entry is keyed by the module's SHA-256 and a fingerprint of the engine
//! (wasmtime version, compiler flags, CPU features, fuel settings) and of the
//! stack limit compiled into the guest's code, so a cache written by another
//! build or configuration is never used.
//!
//! An entry file is the SHA-256 of the compiled artifact followed by the
//! artifact, written together (temporary file, then rename). The digest is
//! checked before any byte of it is mapped as code, so a file that changed
//! on disk — bit rot, a torn copy, a hand edit — is recompiled, never run.
//! An entry that fails the check or fails to load is deleted and recompiled.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Bumped whenever the host changes how it compiles guests in a way the
/// engine fingerprint cannot see, or the entry format. (2: entries start
/// with their digest; entries of schema 1 have none and are never read.
/// 3: guests carry the deterministic stack count.)
const SCHEMA: u32 = 3;

/// The length of the digest that starts every entry.
const DIGEST_LEN: usize = 32;

/// A directory of compiled guests.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    fingerprint: String,
}

impl CompileCache {
    /// A cache in `dir` for code compiled by `engine` with a stack limit
    /// of `stack_units` (the limit is a constant in the compiled code).
    pub fn new(dir: impl Into<PathBuf>, engine: &Engine, stack_units: u32) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        stack_units.hash(&mut hasher);
        Self {
            dir: dir.into(),
            fingerprint: format!("{:016x}", hasher.finish()),
        }
    }

    /// The file that holds the compiled module with `hash`.
    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir
            .join(format!("v{SCHEMA}-{hash}-{}.cwasm", self.fingerprint))
    }

    /// The cached component for `hash`, if present, intact and loadable. A
    /// corrupt, tampered or stale entry is deleted.
    pub fn load(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path(hash);
        let entry = match std::fs::read(&path) {
            Ok(entry) => entry,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read a compiled guest; compiling it again");
                return None;
            }
        };
        let intact = entry.len() > DIGEST_LEN
            && Sha256::digest(&entry[DIGEST_LEN..]).as_slice() == &entry[..DIGEST_LEN];
        if !intact {
            tracing::warn!(path = %path.display(), "a compiled guest does not match its digest; compiling it again");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: the artifact is byte for byte what `store` wrote, from
        // `precompile_component` of an engine with this fingerprint (the
        // digest says so), and wasmtime checks its version and flags again.
        match unsafe { Component::deserialize(engine, &entry[DIGEST_LEN..]) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "dropping an unusable compiled guest");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Deletes the entry for `hash`, if any.
    pub fn remove(&self, hash: &str) {
        let _ = std::fs::remove_file(self.path(hash));
    }

    /// Stores `artifact` (compiled by this cache's engine configuration) for
    /// `hash`, atomically (write then rename).
    /// Concurrent stores of one module (the apply path and a background
    /// compile) each write their own temporary file, so neither truncates
    /// or renames away the other's, and the last rename wins.
    ///
    /// # Errors
    /// When the directory cannot be written; the caller may go on without it.
    pub fn store(&self, hash: &str, artifact: &[u8]) -> std::io::Result<()> {
        static STORES: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(hash);
        let unique = STORES.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{unique}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&Sha256::digest(artifact))?;
        file.write_all(artifact)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several threads that compiled the same guest (the apply path and a
    /// background compile, say) store it at once; every store succeeds and
    /// leaves one loadable entry.
    #[test]
    fn concurrent_stores_of_one_guest_all_succeed() {
        let engine = Engine::default();
        // The smallest component: the preamble alone.
        let artifact = engine
            .precompile_component(b"\0asm\x0d\0\x01\0")
            .expect("compiles");
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = CompileCache::new(dir.path(), &engine, 1024);
        for round in 0..50 {
            let hash = format!("{round:064x}");
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|scope| {
                let stores: Vec<_> = (0..8)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            cache.store(&hash, &artifact)
                        })
                    })
                    .collect();
                for store in stores {
                    store.join().expect("no panic").expect("the store succeeds");
                }
            });
            assert!(cache.load(&engine, &hash).is_some(), "round {round}");
        }
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .expect("cache dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(files.len(), 50, "only complete entries remain: {files:?}");
    }

    /// An entry whose artifact or digest changed, or that has no digest, is
    /// not loaded; it is deleted so that the module is compiled again.
    #[test]
    fn entry_that_does_not_match_its_digest_is_not_loaded() {
        let engine = Engine::default();
        let artifact = engine
            .precompile_component(b"\0asm\x0d\0\x01\0")
            .expect("compiles");
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = CompileCache::new(dir.path(), &engine, 1024);
        let hash = format!("{:064x}", 1);
        let path = cache.path(&hash);

        type Tamper = (&'static str, fn(&mut Vec<u8>));
        let tampers: [Tamper; 4] = [
            ("a flipped artifact bit", |entry| {
                let last = entry.len() - 1;
                entry[last] ^= 1;
            }),
            ("a flipped digest bit", |entry| entry[0] ^= 1),
            ("no digest", |entry| {
                entry.drain(..DIGEST_LEN);
            }),
            ("a truncated file", |entry| entry.truncate(DIGEST_LEN)),
        ];
        for (what, tamper) in tampers {
            cache.store(&hash, &artifact).expect("stores");
            assert!(cache.load(&engine, &hash).is_some(), "intact before {what}");
            let mut entry = std::fs::read(&path).expect("entry");
            tamper(&mut entry);
            std::fs::write(&path, &entry).expect("tamper");
            assert!(cache.load(&engine, &hash).is_none(), "loaded with {what}");
            assert!(!path.exists(), "kept an entry with {what}");
        }
    }
}
