//! raftwasm: a Raft-replicated state machine host whose logic is a
//! WebAssembly guest.
//!
//! # Layout
//! - [`runtime`]: the wasmtime guest runtime (load, validate, cache, apply).
//! - [`raft`]: openraft types, sled storage, the peer transport.
//!
//! The write path:
//! `/set -> batcher -> Raft::client_write -> leader flush -> replicate -> commit -> StateMachineStore::apply -> guest apply -> redo record + sled writes`.

pub mod api;
pub mod bench;
pub mod config;
pub mod deploy;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod runtime;
