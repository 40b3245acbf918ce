//! raftwasm: a Raft-replicated state machine host whose logic is a
//! WebAssembly guest.
//!
//! # Layout
//! - [`runtime`]: the wasmtime guest runtime (load, validate, cache, apply).
//! - [`raft`]: openraft types, sled storage, the peer transport.
//! - [`api`]: the HTTP routes; [`http_server`] serves them with per-connection
//!   timeouts and a connection cap ([`stall_timeout`] bounds a silent socket).
//!
//! The write path:
//! `/set -> batcher -> Raft::client_write -> leader flush -> replicate -> commit -> StateMachineStore::apply -> guest apply -> redo record + sled writes`.

pub mod api;
pub mod bench;
pub mod config;
pub mod deploy;
pub mod http_server;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod runtime;
pub mod stall_timeout;
