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
//!
//! # Layout
//! - `engine`: `GuestRuntime` (the engine and linker) and `Limits`.
//! - `module`: `GuestModule`, loading and validating a guest; `LoadError`.
//! - `instance`: `GuestInstance`, its calls, fuel, overlay and hooks.
//! - `bindings`: the one `bindgen!` and the host's imports; `limiter`,
//!   [`stack_limit`], `state` and `cache` are what those build on.

mod bindings;
mod cache;
mod engine;
mod instance;
mod limiter;
mod module;
pub mod stack_limit;
mod state;

pub use bindings::{BYTES_PER_FUEL, Change, Context, GuestInfo, MAX_SCAN_BYTES, MAX_SCAN_LIMIT};
pub use cache::CompileCache;
pub use engine::{GuestRuntime, Limits};
pub use instance::GuestInstance;
pub use module::{GuestModule, LoadError};
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
