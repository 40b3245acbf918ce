//! The state machine: applies committed entries through the active guest
//! and keeps the host-owned state in the sled tree `state`.
//!
//! Tree layout (`keys`):
//! - `0x00` + name: host metadata — the redo record (last applied log id,
//!   membership, last entry time; see [`super::redo`]), the active guest's
//!   hash and module bytes, staged modules and the swap history;
//! - `0x01` + key: the guest's keys.
//!
//! Each `apply` call runs every entry's operations through one guest
//! instance; its write overlay and the host's writes are recorded in one redo
//! record together with last-applied and membership, then applied: a crash
//! never applies an entry twice or half. Nothing here syncs — the log is the
//! durable record, and the next log flush covers the state too. Queries see
//! whole apply calls only.
//!
//! Snapshots are files (see [`super::snapshot_file`]) holding the whole tree,
//! so they carry the active guest too. They are written, checked and
//! installed one entry at a time on blocking threads; the `snapshot` tree
//! names the current one.
//!
//! # Layout
//! - `keys`: the tree's key layout and `SledState`, the guest's view of it.
//! - `apply`: `StateMachineStore`, openraft's `RaftStateMachine`: open,
//!   the apply loop and the watch changes it collects.
//! - `lifecycle`: staging, activating and migrating guests; the swap
//!   history.
//! - `reader`: `StateReader`, queries, the state hash and apply counters.
//! - `snapshot`: building, checking, storing and installing snapshots.

mod apply;
mod keys;
mod lifecycle;
mod reader;
mod snapshot;
#[cfg(test)]
mod testing;

use openraft::StorageIOError;
use serde::Serialize;

pub use apply::StateMachineStore;
pub use keys::{STATE_TREE, SledState, is_host_key, is_state_key};
pub use lifecycle::MAX_STAGED;
pub use reader::{ActiveGuest, INLINE_QUERY_FUEL, StateHasher, StateReader};
pub use snapshot::{HostSummary, SnapshotBuilder, check_host_entries, summarize_host_entries};

use super::typ;

/// One successful guest swap, as recorded in the state (its wire form).
pub use crate::proto::SwapRecord;

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn read_err(e: impl std::fmt::Display) -> typ::StorageError {
    StorageIOError::read_state_machine(&io_err(e)).into()
}

fn write_err(e: impl std::fmt::Display) -> typ::StorageError {
    StorageIOError::write_state_machine(&io_err(e)).into()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, typ::StorageError> {
    rmp_serde::to_vec(value).map_err(write_err)
}
