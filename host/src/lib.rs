//! raftwasm: a Raft-replicated state machine host whose logic is a
//! WebAssembly guest.
//!
//! # Layout
//! - [`runtime`]: the wasmtime guest runtime (load, validate, cache, apply).
//! - [`raft`]: openraft types, sled storage, the peer transport.
//! - [`api`]: the HTTP routes (with the browser dashboard at `/`, whose
//!   page lives in `dashboard/`); [`http_server`] serves them with per-connection
//!   timeouts and a connection cap ([`stall_timeout`] bounds a silent socket).
//! - [`tls`]: the rustls configurations of both ports (`--tls-*`).
//! - [`proto`]: the HTTP wire types; [`client`]: a typed client of the API
//!   that finds the leader itself; [`cli`]: the `kv`, `status` and `member`
//!   subcommands built on it.
//! - [`backup`]: the backup file, `raftwasm backup` and `raftwasm restore`.
//!
//! The write path:
//! `/set -> batcher -> Raft::client_write -> leader flush -> replicate -> commit -> StateMachineStore::apply -> guest apply -> redo record + sled writes`.

pub mod api;
pub mod backup;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod deploy;
pub mod http_server;
pub mod metrics;
pub mod node;
pub mod proto;
pub mod raft;
pub mod runtime;
pub mod stall_timeout;
pub mod tls;

/// The configuration of the property tests: `cases` per property, unless
/// `PROPTEST_CASES` asks for another number (e.g. for a longer local run).
#[cfg(test)]
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let mut config = proptest::test_runner::Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}
