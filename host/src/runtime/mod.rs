//! The guest runtime: loads, validates and caches WebAssembly guests, and
//! runs their `apply`, `query` and `migrate` deterministically.
//!
//! - One [`GuestRuntime`] per process owns the wasmtime engine, configured the
//!   same on every node: fuel, NaN canonicalisation, deterministic relaxed
//!   SIMD, no threads, a memory limit, and a stack limit counted in the
//!   guest's own code ([`stack_limit`]), with the native stack as a backstop.
//! - [`GuestRuntime::load`] turns module bytes into a validated
//!   [`GuestModule`] (compiled once, cached on disk).
//! - A [`GuestInstance`] runs calls against a write overlay; the caller
//!   commits the overlay only when the whole batch is done.

mod bindings;
mod cache;
mod limiter;
pub mod stack_limit;
mod state;

use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, Store, Trap};

pub use bindings::{BYTES_PER_FUEL, Change, Context, GuestInfo, MAX_SCAN_BYTES, MAX_SCAN_LIMIT};
use bindings::{HostState, StateMachine, StateMachinePre};
pub use cache::CompileCache;
pub use state::{MemoryState, Overlay, StateRead};

/// The bundled `guest-kv` module, built from source with the host.
pub static BUNDLED_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_kv.wasm"));

/// The WIT package every guest is built against.
pub const WIT_PACKAGE: &str = "raftwasm:state-machine@0.1.0";

/// The interfaces a guest may import; anything else is refused.
const ALLOWED_IMPORTS: [&str; 3] = [
    "raftwasm:state-machine/types@0.1.0",
    "raftwasm:state-machine/store@0.1.0",
    "raftwasm:state-machine/log@0.1.0",
];

/// The export that carries the optional migration hook.
const MIGRATION_INTERFACE: &str = "raftwasm:state-machine/migration@0.1.0";

/// The export that carries the optional watch hook.
const WATCH_INTERFACE: &str = "raftwasm:state-machine/watch@0.1.0";

/// Limits that bound every guest call. They are part of the cluster's
/// deterministic behaviour: every node must use the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) for one `apply` or `query`.
    pub fuel_per_call: u64,
    /// Fuel for one `migrate`.
    pub fuel_per_migration: u64,
    /// The most linear memory an instance may have, in bytes.
    pub memory_bytes: usize,
    /// The deterministic stack limit: the most stack units (see
    /// [`stack_limit`]) the wasm frames of one call may hold at once. A call
    /// that needs more traps with `call stack exhausted` on every node.
    /// At most `i32::MAX`.
    pub stack_units: u32,
    /// The most native stack a guest call may use, in bytes: a backstop
    /// that a guest within `stack_units` never reaches. At least
    /// [`stack_limit::native_stack_bytes`] of `stack_units`.
    pub stack_bytes: usize,
    /// The largest module accepted, in bytes.
    pub module_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel_per_call: 10_000_000,
            fuel_per_migration: 1_000_000_000,
            memory_bytes: 64 << 20,
            stack_units: DEFAULT_STACK_UNITS,
            stack_bytes: stack_limit::native_stack_bytes(DEFAULT_STACK_UNITS),
            module_bytes: 8 << 20,
        }
    }
}

/// The default [`Limits::stack_units`]: thousands of frames of ordinary
/// compiled code, within a native backstop that fits the 2 MiB stacks of the
/// threads that run guests.
const DEFAULT_STACK_UNITS: u32 = 32_768;

/// Why a module cannot be loaded.
///
/// Every variant but [`LoadError::Host`] is a property of the module bytes
/// (and of the build every node runs), so every node reaches the same
/// verdict and may refuse the module for it. [`LoadError::Host`] is a
/// failure of this node; see [`LoadError::is_module_property`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// More bytes than [`Limits::module_bytes`].
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

/// A failure of the host, not of the guest: never turned into a command
/// result. The node must stop applying and let an operator look.
#[derive(Debug, thiserror::Error)]
#[error("host fault while running the guest: {0}")]
pub struct HostFault(pub String);

/// The outcome of one guest call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The guest's response, or a deterministic error message (the guest's
    /// own `err`, a trap, or running out of fuel).
    pub result: Result<Vec<u8>, String>,
    /// Fuel the call used.
    pub fuel_used: u64,
}

/// The process-wide wasmtime engine and the guest import linker.
#[derive(Clone)]
pub struct GuestRuntime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    limits: Limits,
    cache: Option<CompileCache>,
}

impl std::fmt::Debug for GuestRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRuntime")
            .field("limits", &self.limits)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl GuestRuntime {
    /// A runtime with `limits`, caching compiled guests in `cache_dir` when
    /// one is given.
    ///
    /// # Errors
    /// [`HostFault`] when the engine cannot be created on this machine, or
    /// when `limits.stack_bytes` is below the native backstop that
    /// `limits.stack_units` needs ([`stack_limit::native_stack_bytes`]).
    pub fn new(limits: Limits, cache_dir: Option<std::path::PathBuf>) -> Result<Self, HostFault> {
        let native = stack_limit::native_stack_bytes(limits.stack_units);
        if limits.stack_units > i32::MAX as u32 || limits.stack_bytes < native {
            return Err(HostFault(format!(
                "a stack limit of {} units needs a native stack of at least {native} bytes, not {}",
                limits.stack_units, limits.stack_bytes
            )));
        }
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(64)
            .total_core_instances(256)
            .total_memories(64)
            .total_tables(256)
            .max_memory_size(limits.memory_bytes);

        let mut config = Config::new();
        config
            .consume_fuel(true)
            .cranelift_nan_canonicalization(true)
            .wasm_relaxed_simd(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(limits.stack_bytes)
            .wasm_component_model(true)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));

        let engine = Engine::new(&config)
            .map_err(|e| HostFault(format!("creating the wasm engine: {e}")))?;
        let mut linker = Linker::new(&engine);
        bindings::add_to_linker(&mut linker)
            .map_err(|e| HostFault(format!("linking the guest imports: {e}")))?;
        let cache = cache_dir.map(|dir| CompileCache::new(dir, &engine, limits.stack_units));
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            limits,
            cache,
        })
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

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
fn componentize(wasm: &[u8]) -> Result<Vec<u8>, LoadError> {
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
    runtime: GuestRuntime,
    pre: StateMachinePre<HostState>,
    hash: String,
    info: GuestInfo,
    version: semver::Version,
    has_migrate: bool,
    has_watch: bool,
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
        GuestInstance {
            module: self.clone(),
            base,
            live: None,
            batch: Overlay::new(),
            touched: Vec::new(),
        }
    }
}

/// One instance of a guest, with the overlay of writes its successful calls
/// made since the last [`GuestInstance::take_writes`].
///
/// A call that fails (the guest's `err`, a trap, out of fuel) leaves no write
/// behind. After a trap the wasm instance is thrown away and recreated on the
/// next call; the guest keeps no state of its own, so nothing is lost.
pub struct GuestInstance {
    module: GuestModule,
    base: Arc<dyn StateRead>,
    live: Option<Live>,
    /// The batch overlay while no store is live.
    batch: Overlay,
    /// The keys written since the last take, while no store is live.
    touched: Vec<Vec<u8>>,
}

impl std::fmt::Debug for GuestInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestInstance")
            .field("module", &self.module)
            .field("live", &self.live.is_some())
            .finish_non_exhaustive()
    }
}

/// A wasm instance and the store it lives in.
struct Live {
    store: Store<HostState>,
    guest: StateMachine,
    instance: wasmtime::component::Instance,
}

/// Why an instance could not start.
enum StartError {
    /// A property of the module: instantiating it or its first call failed
    /// the same way on every node.
    Guest(String),
    /// A failure of this node.
    Host(HostFault),
}

enum Call<'a> {
    Info,
    Apply(Context, &'a [u8]),
    /// A query and the fuel it may use.
    Query(Context, &'a [u8], u64),
    Migrate(Context, GuestInfo),
    /// The watch hook, and where its answer goes.
    Describe(Vec<Change>, &'a mut Option<Vec<Change>>),
}

impl GuestInstance {
    /// The module this instance runs.
    pub fn module(&self) -> &GuestModule {
        &self.module
    }

    /// Applies one command; its writes join the pending overlay if it
    /// succeeds.
    ///
    /// # Errors
    /// [`HostFault`] when the host failed (storage I/O, instantiation); the
    /// command's outcome is then unknown and must not be recorded.
    pub fn apply(&mut self, ctx: Context, command: &[u8]) -> Result<Outcome, HostFault> {
        self.call(Call::Apply(ctx, command))
    }

    /// Answers a read-only query against the committed state and the pending
    /// overlay; a write attempt makes it fail.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn query(&mut self, ctx: Context, request: &[u8]) -> Result<Outcome, HostFault> {
        let fuel = self.module.runtime.limits.fuel_per_call;
        self.call(Call::Query(ctx, request, fuel))
    }

    /// Like [`GuestInstance::query`], but with at most `fuel` (capped at the
    /// per-call budget): a query that needs more ends out of fuel, with
    /// `fuel_used` equal to the fuel given.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn query_with_fuel(
        &mut self,
        ctx: Context,
        request: &[u8],
        fuel: u64,
    ) -> Result<Outcome, HostFault> {
        let fuel = fuel.min(self.module.runtime.limits.fuel_per_call);
        self.call(Call::Query(ctx, request, fuel))
    }

    /// Runs the guest's migration hook under the migration fuel budget; a
    /// guest without one succeeds at once.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn migrate(&mut self, ctx: Context, previous: GuestInfo) -> Result<Outcome, HostFault> {
        if !self.module.has_migrate {
            return Ok(Outcome {
                result: Ok(Vec::new()),
                fuel_used: 0,
            });
        }
        self.call(Call::Migrate(ctx, previous))
    }

    /// The guest's `info`.
    ///
    /// # Errors
    /// [`HostFault`] with the reason when the call fails.
    pub fn info(&mut self) -> Result<GuestInfo, HostFault> {
        let mut info = None;
        let outcome = self.call_with(Call::Info, &mut info)?;
        outcome.result.map_err(HostFault)?;
        info.ok_or_else(|| HostFault("info returned nothing".into()))
    }

    /// Takes the writes of every successful call since the last take, for
    /// the caller to commit. The written keys not yet taken with
    /// [`GuestInstance::take_touched`] are forgotten.
    pub fn take_writes(&mut self) -> Overlay {
        match &mut self.live {
            Some(live) => {
                let state = live.store.data_mut();
                state.touched.clear();
                std::mem::take(&mut state.batch)
            }
            None => {
                self.touched.clear();
                std::mem::take(&mut self.batch)
            }
        }
    }

    /// Takes the keys that successful calls wrote since the last take, in
    /// write order and possibly repeated; with
    /// [`GuestInstance::pending_changes`] this attributes writes to the
    /// entry that made them.
    pub fn take_touched(&mut self) -> Vec<Vec<u8>> {
        match &mut self.live {
            Some(live) => std::mem::take(&mut live.store.data_mut().touched),
            None => std::mem::take(&mut self.touched),
        }
    }

    /// The pending value of each of `keys` (`None`: deleted), each key once,
    /// in key order: what those keys hold now that the calls which wrote
    /// them are done.
    pub fn pending_changes(&self, mut keys: Vec<Vec<u8>>) -> Vec<Change> {
        keys.sort_unstable();
        keys.dedup();
        let batch = match &self.live {
            Some(live) => &live.store.data().batch,
            None => &self.batch,
        };
        keys.into_iter()
            .filter_map(|key| {
                let value = batch.get(&key)?.clone();
                Some(Change { key, value })
            })
            .collect()
    }

    /// The user-facing form of one entry's store changes: what the guest's
    /// watch hook makes of them, or `changes` themselves when the guest has
    /// no hook or the hook fails (a trap, running out of fuel), which every
    /// replica does alike.
    ///
    /// # Errors
    /// [`HostFault`] as for [`GuestInstance::apply`].
    pub fn describe(&mut self, changes: Vec<Change>) -> Result<Vec<Change>, HostFault> {
        if !self.module.has_watch || changes.is_empty() {
            return Ok(changes);
        }
        let mut described = None;
        let outcome = self.call(Call::Describe(changes.clone(), &mut described))?;
        match (outcome.result, described) {
            (Ok(_), Some(described)) => Ok(described),
            (result, _) => {
                if let Err(reason) = result {
                    tracing::debug!(%reason, "the guest's watch hook failed; recording raw changes");
                }
                Ok(changes)
            }
        }
    }

    /// Puts back writes taken with [`GuestInstance::take_writes`] from
    /// another instance, so they commit with this one's (used when a guest is
    /// swapped in the middle of a batch).
    pub fn restore_writes(&mut self, writes: Overlay) {
        match &mut self.live {
            Some(live) => live.store.data_mut().batch.extend(writes),
            None => self.batch.extend(writes),
        }
    }

    fn call(&mut self, call: Call<'_>) -> Result<Outcome, HostFault> {
        self.call_with(call, &mut None)
    }

    fn call_with(
        &mut self,
        call: Call<'_>,
        info: &mut Option<GuestInfo>,
    ) -> Result<Outcome, HostFault> {
        let limits = &self.module.runtime.limits;
        let stack_units = limits.stack_units;
        let fuel = match call {
            Call::Migrate(..) => limits.fuel_per_migration,
            Call::Query(_, _, fuel) => fuel,
            Call::Info | Call::Apply(..) | Call::Describe(..) => limits.fuel_per_call,
        };
        let Live {
            store,
            guest,
            instance,
        } = self.live()?;
        store.data_mut().read_only =
            matches!(call, Call::Query(..) | Call::Info | Call::Describe(..));
        store
            .set_fuel(fuel)
            .map_err(|e| HostFault(format!("setting fuel: {e}")))?;

        let returned: wasmtime::Result<Result<Vec<u8>, String>> = match call {
            Call::Apply(ctx, command) => guest.call_apply(&mut *store, ctx, command),
            Call::Query(ctx, request, _) => guest.call_query(&mut *store, ctx, request),
            Call::Info => guest.call_info(&mut *store).map(|i| {
                *info = Some(i);
                Ok(Vec::new())
            }),
            Call::Migrate(ctx, previous) => call_migrate(store, instance, ctx, previous),
            Call::Describe(changes, described) => {
                call_describe(store, instance, changes).map(|changes| {
                    *described = Some(changes);
                    Ok(Vec::new())
                })
            }
        };
        let fuel_used = fuel - store.get_fuel().unwrap_or(0);
        let state = store.data_mut();
        if matches!(returned, Ok(Ok(_))) {
            state.keep_call();
        } else {
            state.undo_call();
        }
        if let Some(fault) = state.fault.take() {
            self.drop_instance();
            return Err(HostFault(fault));
        }
        let result = match returned {
            Ok(result) => result,
            Err(error) => {
                let violation = state.violation.take();
                self.drop_instance();
                Err(describe_failure(error, violation, fuel, stack_units)?)
            }
        };
        Ok(Outcome { result, fuel_used })
    }

    /// The live store and guest, instantiating them if needed.
    fn live(&mut self) -> Result<&mut Live, HostFault> {
        // The module instantiated once already when it was loaded, and
        // instantiating reads no state: failing now is this node's fault.
        self.start().map_err(|e| match e {
            StartError::Guest(reason) => HostFault(format!(
                "guest {} no longer instantiates: {reason}",
                self.module.hash
            )),
            StartError::Host(fault) => fault,
        })?;
        self.live
            .as_mut()
            .ok_or_else(|| HostFault("the guest instance vanished".into()))
    }

    /// Instantiates the guest unless it is live already.
    fn start(&mut self) -> Result<(), StartError> {
        if self.live.is_some() {
            return Ok(());
        }
        let limits = &self.module.runtime.limits;
        let state = HostState {
            base: self.base.clone(),
            batch: std::mem::take(&mut self.batch),
            undo: Vec::new(),
            touched: std::mem::take(&mut self.touched),
            read_only: false,
            fault: None,
            violation: None,
            limiter: limiter::GuestLimiter::new(limits.memory_bytes),
        };
        let mut store = Store::new(&self.module.runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        store
            .set_fuel(limits.fuel_per_call)
            .map_err(|e| StartError::Host(HostFault(format!("setting fuel: {e}"))))?;
        let hash = &self.module.hash;
        let instantiated = self
            .module
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .and_then(|instance| Ok((instance, StateMachine::new(&mut store, &instance)?)));
        let (instance, guest) = instantiated.map_err(|e| {
            // A trap (a data segment out of bounds, a start function that
            // traps) is the module's; anything else, such as an exhausted
            // instance pool or a failed mmap, is this node's.
            if e.is::<Trap>() && !is_host_failure(&e) {
                let reason = if hit_stack_limit(&e) {
                    "call stack exhausted (the stack limit)".to_owned()
                } else {
                    e.root_cause().to_string()
                };
                StartError::Guest(format!("instantiating it trapped: {reason}"))
            } else {
                StartError::Host(HostFault(format!("instantiating guest {hash}: {e:#}")))
            }
        })?;
        // The first export call of an instance runs one-time initialisation
        // (such as static constructors). Doing it here, with a call whose
        // result is discarded, makes every instance's first real call cost
        // the same fuel as any later one.
        if let Err(e) = guest.call_info(&mut store) {
            if let Some(fault) = store.data_mut().fault.take() {
                return Err(StartError::Host(HostFault(fault)));
            }
            let violation = store.data_mut().violation.take();
            let reason = describe_failure(e, violation, limits.fuel_per_call, limits.stack_units)
                .map_err(StartError::Host)?;
            return Err(StartError::Guest(format!(
                "initialising it failed: {reason}"
            )));
        }
        self.live = Some(Live {
            store,
            guest,
            instance,
        });
        Ok(())
    }

    fn drop_instance(&mut self) {
        if let Some(mut live) = self.live.take() {
            let state = live.store.data_mut();
            self.batch = std::mem::take(&mut state.batch);
            self.touched = std::mem::take(&mut state.touched);
        }
    }
}

/// Calls the optional `migration.migrate` export, which the generated
/// bindings of the base world do not cover.
fn call_migrate(
    store: &mut Store<HostState>,
    instance: &wasmtime::component::Instance,
    ctx: Context,
    previous: GuestInfo,
) -> wasmtime::Result<Result<Vec<u8>, String>> {
    let interface = instance
        .get_export_index(&mut *store, None, MIGRATION_INTERFACE)
        .ok_or_else(|| wasmtime::Error::msg("the guest has no migration interface"))?;
    let func = instance
        .get_export_index(&mut *store, Some(&interface), "migrate")
        .ok_or_else(|| wasmtime::Error::msg("the migration interface has no `migrate`"))?;
    let migrate = instance
        .get_typed_func::<(Context, GuestInfo), (Result<(), String>,)>(&mut *store, &func)?;
    let (result,) = migrate.call(&mut *store, (ctx, previous))?;
    Ok(result.map(|()| Vec::new()))
}

/// Calls the optional `watch.describe` export.
fn call_describe(
    store: &mut Store<HostState>,
    instance: &wasmtime::component::Instance,
    changes: Vec<Change>,
) -> wasmtime::Result<Vec<Change>> {
    let interface = instance
        .get_export_index(&mut *store, None, WATCH_INTERFACE)
        .ok_or_else(|| wasmtime::Error::msg("the guest has no watch interface"))?;
    let func = instance
        .get_export_index(&mut *store, Some(&interface), "describe")
        .ok_or_else(|| wasmtime::Error::msg("the watch interface has no `describe`"))?;
    let describe = instance.get_typed_func::<(Vec<Change>,), (Vec<Change>,)>(&mut *store, &func)?;
    let (described,) = describe.call(&mut *store, (changes,))?;
    Ok(described)
}

/// Turns a failed call into its deterministic error message, or a host fault
/// when the failure did not come from the guest.
///
/// On a live instance, wasmtime fails a call for one of four reasons:
/// - a trap (including running out of fuel): the guest's doing;
/// - an error one of the host's imports returned: those record themselves
///   in the store first (`violation` here, or a fault the caller checked
///   before);
/// - a canonical-ABI check on a value the guest produced: a list or string
///   out of bounds, a string that is not UTF-8, a variant, option or result
///   discriminant that does not exist, a misaligned pointer, a bad `realloc`
///   answer — a property of the module and the command, so every replica
///   reaches it;
/// - a failure of this machine: memory the host could not allocate, an
///   instance pool with no free slot, an I/O error, a native stack overflow
///   ([`is_host_failure`]).
///
/// Reaching the deterministic stack limit is a trap in the function the
/// instrumentation added ([`stack_limit::TRAP_FUNCTION_NAME`]), recognised
/// by the youngest frame of the trap's backtrace.
fn describe_failure(
    error: wasmtime::Error,
    violation: Option<String>,
    fuel: u64,
    stack_units: u32,
) -> Result<String, HostFault> {
    if let Some(violation) = violation {
        return Ok(violation);
    }
    if is_host_failure(&error) {
        return Err(HostFault(format!("{error:#}")));
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return Ok(match trap {
            Trap::OutOfFuel => format!("the guest ran out of fuel (budget {fuel})"),
            Trap::UnreachableCodeReached if hit_stack_limit(&error) => format!(
                "the guest trapped: call stack exhausted (its frames exceeded the stack limit of {stack_units} units)"
            ),
            trap => format!(
                "the guest trapped: {}",
                trap.to_string().trim_start_matches("wasm trap: ")
            ),
        });
    }
    // The root cause only: the context wasmtime adds (a wasm backtrace) is
    // noise to a client.
    Ok(format!(
        "the guest broke the component ABI: {}",
        error.root_cause()
    ))
}

/// Whether the trap `error` came from the deterministic stack limit.
fn hit_stack_limit(error: &wasmtime::Error) -> bool {
    error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|backtrace| backtrace.frames().first())
        .and_then(|frame| frame.func_name())
        == Some(stack_limit::TRAP_FUNCTION_NAME)
}

/// Whether `error` is a failure of this machine rather than of the guest:
/// an allocation the host could not make, an instance pool with no free
/// slot, an I/O error, or a native stack overflow. Such a failure must stop
/// the node, never become a result or a refusal that other replicas would
/// not reach.
///
/// The native stack is a backstop sized so that a guest within its
/// deterministic stack limit never overflows it ([`stack_limit`]); an
/// overflow means this node's generated code broke that bound, and another
/// node's might not.
fn is_host_failure(error: &wasmtime::Error) -> bool {
    error.is::<wasmtime::OutOfMemory>()
        || error.is::<wasmtime::PoolConcurrencyLimitError>()
        || error.is::<std::io::Error>()
        || error.downcast_ref::<Trap>() == Some(&Trap::StackOverflow)
}
