//! `guest-kv`: the bundled raftwasm guest, a replicated key-value cache with
//! per-key expiry (TTL) and compare-and-set.
//!
//! # Layout
//! - [`command`]: the binary command and response format, shared with the
//!   host's HTTP adapter so that both sides encode it from one definition.
//! - [`cache`]: the cache logic, written against the [`cache::Store`] trait so
//!   that it runs the same inside the guest and natively (for benchmarks).
//! - [`host_store!`]: the adapter from the host's `store` import to
//!   [`cache::Store`], for guest-kv and guests built on it (kv-next).
//! - `guest` (wasm32, feature `guest`): the WIT bindings that plug the logic into the
//!   `raftwasm:state-machine` world.
//! - `arena` (wasm32 only): the per-call allocator that keeps every call's
//!   instruction count independent of earlier calls.
//!
//! Build the module with `cargo build --release --target wasm32-unknown-unknown`.

pub mod cache;
pub mod command;
mod host_store;

#[cfg(target_arch = "wasm32")]
mod arena;
#[cfg(all(target_arch = "wasm32", feature = "guest"))]
mod guest;
