//! `GuestModule`: loading a guest — size, format, componentizing a core
//! module, imports, exports, the compile cache — and what a loaded guest
//! says about itself.

use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use wasmtime::component::Component;

use super::bindings::{GuestInfo, HostState, StateMachinePre};
use super::instance::{Call, StartError, is_host_failure};
use super::{
    ALLOWED_IMPORTS, GuestInstance, GuestRuntime, MIGRATION_INTERFACE, MemoryState, StateRead,
    WATCH_INTERFACE, WIT_PACKAGE, stack_limit,
};

/// Why a module cannot be loaded.
///
/// Every variant but [`LoadError::Host`] is a property of the module bytes
/// (and of the build every node runs), so every node reaches the same
/// verdict and may refuse the module for it. [`LoadError::Host`] is a
/// failure of this node; see [`LoadError::is_module_property`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// More bytes than [`super::Limits::module_bytes`].
    #[error("the module is {size} bytes; the limit is {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// Not a WebAssembly module or component at all.
    #[error("not a WebAssembly module or component (no `\\0asm` header)")]
    NotWasm,
    /// Malformed WebAssembly, or a feature the engine refuses.
    #[error("the module is not valid WebAssembly: {0}")]
    Invalid(String),
    /// Valid, but uses a feature the runtime cannot run deterministically.
    #[error("{0}")]
    Unsupported(String),
    /// Imports something outside the world.
    #[error(
        "the module imports `{0}`, which raftwasm does not provide; a guest may import only the {WIT_PACKAGE} interfaces (no WASI, no clocks, no randomness)"
    )]
    ForbiddenImport(String),
    /// Does not export what the world requires, or with other types.
    #[error("the module does not implement the {WIT_PACKAGE} world: {0}")]
    WrongWorld(String),
    /// `info` failed or returned something unusable, or instantiating the
    /// guest trapped.
    #[error("the guest's `info` is unusable: {0}")]
    BadInfo(String),
    /// This node could not compile, map or instantiate the module: memory
    /// it could not allocate, an instance pool with no free slot, a failed
    /// mmap, a compile error that is not a verdict on the module. Another
    /// node, or this one later, may load the same module fine, so this is
    /// never a reason to refuse it on every replica.
    #[error(
        "this node cannot load the guest now: {0}; the module may be fine, retry once the node has resources"
    )]
    Host(String),
}

impl LoadError {
    /// Whether every node reaches this verdict from the module bytes alone.
    /// Only such an error may refuse a module in a replicated entry; any
    /// other must stop the node from applying, so that it retries instead
    /// of diverging from the replicas that loaded the module.
    ///
    /// Failures are sorted conservatively: one is a property of the module
    /// only when the runtime recognises it as such (size, magic, validation,
    /// the compiler's verdict on the code, imports, exports and their types,
    /// a trap while instantiating or in `info`); anything else is
    /// [`LoadError::Host`].
    pub fn is_module_property(&self) -> bool {
        !matches!(self, LoadError::Host(_))
    }
}

impl GuestRuntime {
    /// Validates and compiles `wasm` (a core module built for the world, or a
    /// component), using the compile cache when it holds the module.
    ///
    /// A cache entry never decides the verdict: cached code that does not
    /// load is dropped and the module compiled again.
    ///
    /// # Errors
    /// [`LoadError`] naming what is wrong with the module, or
    /// [`LoadError::Host`] when this node failed to load it.
    pub fn load(&self, wasm: &[u8]) -> Result<GuestModule, LoadError> {
        if wasm.len() > self.limits.module_bytes {
            return Err(LoadError::TooLarge {
                size: wasm.len(),
                limit: self.limits.module_bytes,
            });
        }
        let is_core = wasmparser::Parser::is_core_wasm(wasm);
        if !is_core && !wasmparser::Parser::is_component(wasm) {
            return Err(LoadError::NotWasm);
        }
        let hash = hex::encode(Sha256::digest(wasm));
        if let Some(cache) = &self.cache
            && let Some(component) = cache.load(&self.engine, &hash)
        {
            match self.finish(component, &hash) {
                Ok(module) => return Ok(module),
                Err(error) => {
                    tracing::warn!(%error, %hash, "the cached guest does not load; compiling it again");
                    cache.remove(&hash);
                }
            }
        }
        let artifact = self.compile(wasm, is_core)?;
        // SAFETY: `artifact` is what `precompile_component` of this very
        // engine produced a moment ago.
        let component = unsafe { Component::deserialize(&self.engine, &artifact) }
            .map_err(|e| LoadError::Host(format!("mapping the compiled guest: {e:#}")))?;
        let module = self.finish(component, &hash)?;
        if let Some(cache) = &self.cache
            && let Err(error) = cache.store(&hash, &artifact)
        {
            tracing::warn!(%error, dir = %cache.dir().display(), "cannot cache the compiled guest");
        }
        Ok(module)
    }

    /// Compiles `wasm` to this engine's native code, serialized: a core
    /// module is made a component first, then every core module in the
    /// component gets the deterministic stack count.
    fn compile(&self, wasm: &[u8], is_core: bool) -> Result<Vec<u8>, LoadError> {
        let component_bytes;
        let bytes = if is_core {
            component_bytes = componentize(wasm)?;
            &component_bytes
        } else {
            wasm
        };
        let instrumented =
            stack_limit::instrument(bytes, self.limits.stack_units).map_err(|e| match e {
                stack_limit::InstrumentError::Invalid(reason) => LoadError::Invalid(reason),
                unsupported => LoadError::Unsupported(unsupported.to_string()),
            })?;
        self.engine
            .precompile_component(&instrumented)
            .map_err(compile_error)
    }

    /// Checks a compiled component's imports and exports and calls `info`.
    fn finish(&self, component: Component, hash: &str) -> Result<GuestModule, LoadError> {
        let ty = component.component_type();
        for (name, _) in ty.imports(&self.engine) {
            if !ALLOWED_IMPORTS.contains(&name) {
                return Err(LoadError::ForbiddenImport(name.to_owned()));
            }
        }
        GuestModule::new(self.clone(), component, hash.to_owned())
    }
}

/// Sorts a compile failure: the validator's and the compiler's verdicts on
/// the code are properties of the module; anything else (memory the host
/// could not allocate, say) is this node's failure.
fn compile_error(error: wasmtime::Error) -> LoadError {
    let verdict = error.is::<wasmparser::BinaryReaderError>()
        || error.is::<wasmtime_environ::WasmError>()
        || error.is::<wasmtime_environ::CompileError>();
    if verdict && !is_host_failure(&error) {
        LoadError::Invalid(format!("{error:#}"))
    } else {
        LoadError::Host(format!("compiling the guest: {error:#}"))
    }
}

/// Wraps a core module built with wit-bindgen into a component, using the
/// world description wit-bindgen embedded in it.
pub(super) fn componentize(wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
    // A core module's imports are checked first, so that a module importing
    // (say) WASI is told so, not that its encoding failed.
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(|e| LoadError::Invalid(e.to_string()))?;
        if let wasmparser::Payload::ImportSection(reader) = payload {
            for import in reader.into_imports() {
                let import = import.map_err(|e| LoadError::Invalid(e.to_string()))?;
                let module = import.module;
                let allowed = ALLOWED_IMPORTS.contains(&module) || module.starts_with("[export]");
                if !allowed {
                    return Err(LoadError::ForbiddenImport(format!(
                        "{module}#{}",
                        import.name
                    )));
                }
            }
        }
    }
    wit_component::ComponentEncoder::default()
        .module(wasm)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| {
            LoadError::WrongWorld(format!(
                "cannot make a component of this core module: {e:#}"
            ))
        })
}

/// A validated, compiled guest, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct GuestModule {
    pub(super) runtime: GuestRuntime,
    pub(super) pre: StateMachinePre<HostState>,
    pub(super) hash: String,
    pub(super) info: GuestInfo,
    pub(super) version: semver::Version,
    pub(super) has_migrate: bool,
    pub(super) has_watch: bool,
}

impl std::fmt::Debug for GuestModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestModule")
            .field("hash", &self.hash)
            .field("name", &self.info.name)
            .field("version", &self.info.version)
            .field("has_migrate", &self.has_migrate)
            .field("has_watch", &self.has_watch)
            .finish()
    }
}

impl GuestModule {
    fn new(runtime: GuestRuntime, component: Component, hash: String) -> Result<Self, LoadError> {
        let instance_pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let pre = StateMachinePre::new(instance_pre)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let has_migrate = component
            .get_export_index(None, MIGRATION_INTERFACE)
            .is_some();
        let has_watch = component.get_export_index(None, WATCH_INTERFACE).is_some();
        let mut module = Self {
            runtime,
            pre,
            hash,
            info: GuestInfo {
                name: String::new(),
                version: String::new(),
            },
            version: semver::Version::new(0, 0, 0),
            has_migrate,
            has_watch,
        };
        let mut instance = module.instantiate(Arc::new(MemoryState::default()));
        instance.start().map_err(|e| match e {
            StartError::Guest(reason) => LoadError::BadInfo(reason),
            StartError::Host(fault) => LoadError::Host(fault.0),
        })?;
        let mut info = None;
        let outcome = instance
            .call_with(Call::Info, &mut info)
            .map_err(|fault| LoadError::Host(fault.0))?;
        outcome.result.map_err(LoadError::BadInfo)?;
        let info = info.ok_or_else(|| LoadError::BadInfo("info returned nothing".into()))?;
        if info.name.is_empty() {
            return Err(LoadError::BadInfo("the name is empty".into()));
        }
        module.version = semver::Version::parse(&info.version).map_err(|e| {
            LoadError::BadInfo(format!(
                "version `{}` is not MAJOR.MINOR.PATCH: {e}",
                info.version
            ))
        })?;
        module.info = info;
        Ok(module)
    }

    /// The SHA-256 of the module bytes, in hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The guest's version.
    pub fn version(&self) -> &semver::Version {
        &self.version
    }

    /// The version guard of a hot swap: this module may replace `active`
    /// only if it has the same name and a higher version (unless forced).
    ///
    /// # Errors
    /// Why the swap needs force.
    pub fn may_replace(&self, active: &GuestModule) -> Result<(), String> {
        if self.name() != active.name() {
            return Err(format!(
                "the active guest is `{}`; replacing it with `{}` needs force",
                active.name(),
                self.name()
            ));
        }
        if self.version() <= active.version() {
            return Err(format!(
                "version {} is not higher than the active {}; raise the version or force the swap",
                self.version(),
                active.version()
            ));
        }
        Ok(())
    }

    /// Whether the guest exports the migration hook.
    pub fn has_migrate(&self) -> bool {
        self.has_migrate
    }

    /// Whether the guest exports the watch hook (`watch.describe`).
    pub fn has_watch(&self) -> bool {
        self.has_watch
    }

    /// An instance that reads committed state from `base`. The wasm instance
    /// itself is created on the first call.
    pub fn instantiate(&self, base: Arc<dyn StateRead>) -> GuestInstance {
        GuestInstance::new(self.clone(), base)
    }
}
