//! The on-disk cache of compiled guests.
//!
//! An entry is keyed by the module's SHA-256 and the engine's fingerprint
//! (wasmtime version, compiler flags, CPU features, fuel settings), so a
//! cache written by another build or configuration is never used. Only the
//! node writes this directory, which is what makes loading native code from
//! it acceptable; an entry that fails to load is deleted and recompiled.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Bumped whenever the host changes how it compiles guests in a way the
/// engine fingerprint cannot see.
const SCHEMA: u32 = 1;

/// A directory of compiled guests.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    fingerprint: String,
}

impl CompileCache {
    /// A cache in `dir` for code compiled by `engine`.
    pub fn new(dir: impl Into<PathBuf>, engine: &Engine) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
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

    /// The cached component for `hash`, if present and loadable. A corrupt or
    /// stale entry is deleted.
    pub fn load(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path(hash);
        if !path.exists() {
            return None;
        }
        // SAFETY: only this node writes the cache directory, and it writes
        // files with `store`, from `Component::serialize` of the same engine
        // configuration; wasmtime checks the version and flags on load.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "dropping an unusable compiled guest");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `component` for `hash`, atomically (write then rename).
    ///
    /// # Errors
    /// When the directory cannot be written; the caller may go on without it.
    pub fn store(&self, hash: &str, component: &Component) -> std::io::Result<()> {
        let bytes = component.serialize().map_err(std::io::Error::other)?;
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(hash);
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
