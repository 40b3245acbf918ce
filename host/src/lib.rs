//! raftwasm: a Raft-replicated state machine host whose logic is a
//! WebAssembly guest.
//!
//! # Layout
//! - [`node`]: starts a node (storage, Raft, the peer server, the HTTP
//!   server), bootstraps or joins, and shuts down; [`config`] holds the
//!   flags.
//! - [`service`]: [`service::Node`], the node's typed operations (write,
//!   read with a consistency, deploy, join, remove, status, backup), free of
//!   HTTP; the center that [`api`] and [`node`] both use.
//! - [`api`]: thin HTTP handlers over the service, grouped by audience,
//!   and the browser dashboard at `/` (its page lives in `dashboard/`);
//!   [`http_server`] serves them with per-connection timeouts and a
//!   connection cap ([`stall_timeout`] bounds a silent socket).
//! - [`tasks`]: every background task on one tracker, cancelled and awaited
//!   on shutdown.
//! - [`raft`]: openraft types, storage (the log's entries in segment files,
//!   the state and small Raft records in sled), the write batcher, the read
//!   barrier, the peer transport (`raft::peer`: wire format, client pool,
//!   server, streams), the state machine (`raft::state_machine`: key
//!   layout, apply loop, guest lifecycle, reader, snapshots).
//! - [`runtime`]: the wasmtime guest runtime: `engine` (`GuestRuntime`,
//!   `Limits`), `module` (`GuestModule`: load, validate, cache), `instance`
//!   (`GuestInstance`: calls, fuel, the write overlay), `bindings` (the one
//!   `bindgen!`).
//! - [`metrics`]: the counters, gauges and histograms of `/metrics`, in one
//!   Prometheus registry.
//! - [`tls`]: the rustls configurations of both ports (`--tls-*`).
//! - [`proto`]: the HTTP wire types; [`client`]: a typed client of the API
//!   that finds the leader itself; [`cli`]: the `kv`, `status` and `member`
//!   subcommands built on it; [`deploy`]: `raftwasm guest deploy|show`;
//!   [`bench`]: `raftwasm bench`.
//! - [`ports_file`]: `--ports-file`, the addresses a node bound (port 0).
//! - [`backup`]: the backup file, `raftwasm backup` and `raftwasm restore`.
//! - [`watch`]: the feed of applied changes behind `GET /watch` (the replay
//!   window, fan-out to watchers, the SSE format).
//!
//! The write path:
//! `/set -> batcher -> Raft::client_write -> leader log sync -> replicate -> follower log sync -> commit -> StateMachineStore::apply -> guest apply -> redo record + sled writes`.

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
pub mod ports_file;
pub mod proto;
pub mod raft;
pub mod runtime;
pub mod service;
pub mod stall_timeout;
pub mod tasks;
pub mod tls;
pub mod watch;

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
