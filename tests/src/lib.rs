//! Shared helpers for raftwasm's tests: the test guests, a single-replica
//! runtime harness and, for the cluster tests, the `TestCluster` harness
//! (with test certificates from [`certs`] when it runs TLS).

pub mod certs;
pub mod cluster;

use std::sync::Arc;

use guest_kv::command::{Command, Response};
use raftwasm::runtime::{
    Context, GuestInstance, GuestModule, GuestRuntime, Limits, MemoryState, Outcome,
};

/// The misbehaving test guest (see `guests/chaos`).
pub static CHAOS_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_chaos.wasm"));

/// guest-kv 0.2.0: adds `incr` and a migration hook (see `guests/kv-next`).
pub static KV_NEXT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_kv_next.wasm"));

/// The example ledger guest (see `guests/ledger`).
pub static LEDGER_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ledger.wasm"));

/// A guest whose name holds quotes and backslashes (see `guests/odd-name`).
pub static ODD_NAME_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest_odd_name.wasm"));

/// The name [`ODD_NAME_GUEST`] reports; its `#` is where the tests put a
/// newline to make a variant.
pub const ODD_NAME: &str = "odd \"name\" C:\\new\\ #";

/// [`ODD_NAME_GUEST`] with a newline in place of the `#` of its name.
///
/// # Panics
/// Unless the name occurs exactly once in the module, so the edit cannot
/// silently miss it or touch anything else.
pub fn odd_name_guest_with_newline() -> Vec<u8> {
    let mut module = ODD_NAME_GUEST.to_vec();
    let name = ODD_NAME.as_bytes();
    let found: Vec<usize> = module
        .windows(name.len())
        .enumerate()
        .filter(|(_, w)| *w == name)
        .map(|(at, _)| at)
        .collect();
    assert_eq!(found.len(), 1, "the name occurs {} times", found.len());
    let hash = ODD_NAME.find('#').expect("the name has a #");
    module[found[0] + hash] = b'\n';
    module
}

/// A runtime with the default limits and no compile cache.
pub fn runtime() -> GuestRuntime {
    GuestRuntime::new(Limits::default(), None).expect("the wasm engine starts")
}

/// One replica's state machine without Raft: a guest instance over an
/// in-memory state, committing each successful command's writes.
#[derive(Debug)]
pub struct Replica {
    pub state: Arc<MemoryState>,
    pub instance: GuestInstance,
    pub index: u64,
}

impl Replica {
    /// A replica of `module` on empty state.
    pub fn new(module: &GuestModule) -> Self {
        let state = Arc::new(MemoryState::default());
        let instance = module.instantiate(state.clone());
        Self {
            state,
            instance,
            index: 0,
        }
    }

    /// Applies `command` as the only command of the next entry, at `time_ms`,
    /// and commits its writes.
    pub fn apply(&mut self, time_ms: u64, command: &[u8]) -> Outcome {
        self.index += 1;
        let ctx = Context {
            index: self.index,
            position: 0,
            time_ms,
        };
        let outcome = self.instance.apply(ctx, command).expect("no host fault");
        self.state.commit(self.instance.take_writes());
        outcome
    }

    /// Applies a `guest-kv` command and decodes the response.
    ///
    /// # Panics
    /// When the guest refuses the command.
    pub fn kv(&mut self, time_ms: u64, command: Command<'_>) -> Response {
        let outcome = self.apply(time_ms, &command.encode());
        let bytes = outcome
            .result
            .unwrap_or_else(|e| panic!("{command:?} was refused: {e}"));
        Response::decode(&bytes).expect("a well-formed response")
    }

    /// Queries `guest-kv` for `key` at `time_ms`.
    pub fn get(&mut self, time_ms: u64, key: &[u8]) -> Option<Vec<u8>> {
        let ctx = Context {
            index: self.index,
            position: 0,
            time_ms,
        };
        let request = Command::Get { key }.encode();
        let outcome = self.instance.query(ctx, &request).expect("no host fault");
        match Response::decode(&outcome.result.expect("the query succeeds")) {
            Ok(Response::Value(value)) => value,
            other => panic!("unexpected query answer {other:?}"),
        }
    }
}

/// Reads until the server closes `stream` (or resets it) and returns how
/// long that took; fails after `limit`.
pub async fn closed_within(
    stream: &mut tokio::net::TcpStream,
    limit: std::time::Duration,
) -> anyhow::Result<std::time::Duration> {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(start.elapsed()),
            tokio::io::AsyncReadExt::read(stream, &mut buf),
        )
        .await
        {
            Err(_) => anyhow::bail!("the connection is still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// `anyhow::ensure!` for a function returning either `anyhow::Result` or a
/// cluster test's [`cluster::TestResult`] (whose failures keep the
/// cluster's data): returns the error `.into()` the function's error type.
#[macro_export]
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        $crate::ensure!($cond, concat!("condition failed: `", stringify!($cond), "`"))
    };
    ($cond:expr, $($message:tt)+) => {
        if !$cond {
            return ::core::result::Result::Err(::anyhow::anyhow!($($message)+).into());
        }
    };
}

/// `anyhow::bail!` for either error type, as [`ensure!`].
#[macro_export]
macro_rules! bail {
    ($($message:tt)+) => {
        return ::core::result::Result::Err(::anyhow::anyhow!($($message)+).into())
    };
}
