//! `GuestRuntime`: the process-wide wasmtime engine, configured the same
//! on every node, the import linker and the `Limits` every call runs under.

use std::sync::Arc;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

use super::bindings::{self, HostState};
use super::{CompileCache, HostFault, stack_limit};

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

/// The process-wide wasmtime engine and the guest import linker.
#[derive(Clone)]
pub struct GuestRuntime {
    pub(super) engine: Engine,
    pub(super) linker: Arc<Linker<HostState>>,
    pub(super) limits: Limits,
    pub(super) cache: Option<CompileCache>,
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
}
