//! The Raft side of a node: openraft's type configuration, the log payload
//! and its response, and the storage and network that openraft drives.
//!
//! # Layout
//! - [`disk`]: `Disk`, the node's sled database (the state and the small
//!   Raft records) and its flush.
//! - [`log_file`]: `LogFile`, the log's entries in segment files, one
//!   write and one sync per append.
//! - [`log_store`]: `LogStore`, openraft's log storage: the entries in the
//!   log file, the vote, committed id and purge point in sled.
//! - [`early`]: the leader's new entries go to the followers while the
//!   leader syncs them, not after.
//! - [`state_machine`]: `StateMachineStore`, applies entries through the
//!   guest — one file each for the key layout, the apply loop, the guest
//!   lifecycle (stage, activate, migrate, history), the reader (queries,
//!   state hash) and snapshots; [`redo`] makes each apply call atomic
//!   across a crash; [`snapshot_file`] is the streamed snapshot format and
//!   its files.
//! - [`peer`]: the peer transport: wire format, `NetworkFactory` (the
//!   client openraft drives), the `--raft` port's server, TLS or plain
//!   streams.

use serde::{Deserialize, Serialize};

pub mod batcher;
pub mod disk;
pub mod early;
pub mod log_file;
pub mod log_store;
pub mod peer;
pub mod read_barrier;
pub mod redo;
pub mod snapshot_file;
pub mod state_machine;

/// A node's id: chosen on first boot and persisted in its data dir.
pub type NodeId = u64;

/// The addresses of a member, as stored in the membership config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The client HTTP address (`--http`), `host:port`.
    pub api_addr: String,
    /// The peer address (`--raft`), `host:port`.
    pub raft_addr: String,
}

/// The payload of one normal log entry: a batch of operations proposed
/// together, stamped with the leader's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The leader's wall clock when it proposed the entry, in milliseconds
    /// since the Unix epoch. The state machine never lets it go backwards.
    pub time_ms: u64,
    /// The operations, applied in order.
    pub ops: Vec<Op>,
}

/// One replicated operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A guest command: its bytes go to the active guest's `apply`.
    Apply(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Stores a guest module in the replicated state. Every replica starts
    /// compiling it in the background, so activating it later does not stall
    /// the apply pipeline. The answer is the module's hash.
    StageGuest {
        #[serde(with = "serde_bytes")]
        module: Vec<u8>,
    },
    /// Makes a staged guest the active one from this entry on: checks the
    /// version guard (same name, higher version) unless `force`, and runs the
    /// guest's migration hook. On any failure the previous guest stays active
    /// and the answer says why.
    ActivateGuest {
        /// The staged module's SHA-256, in hex.
        hash: String,
        /// Skip the version guard.
        force: bool,
    },
}

impl Op {
    /// The bytes this operation carries: its command, module or hash.
    pub fn payload_len(&self) -> usize {
        match self {
            Op::Apply(bytes) => bytes.len(),
            Op::StageGuest { module } => module.len(),
            Op::ActivateGuest { hash, .. } => hash.len(),
        }
    }
}

/// What one [`Op`] produced, by kind of operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpOutput {
    /// [`Op::Apply`]: the guest's answer bytes.
    Guest(#[serde(with = "serde_bytes")] Vec<u8>),
    /// [`Op::StageGuest`]: the staged module's SHA-256, in hex.
    Staged(String),
    /// [`Op::ActivateGuest`]: the swap that took place.
    Activated(crate::proto::SwapRecord),
}

/// The outcome of one [`Op`]: what it produced, or the refusal message (of
/// the guest, or of the cluster's checks of a module). Both are
/// deterministic: every replica computes the same one.
pub type OpResult = Result<OpOutput, String>;

/// The HTTP address of the leader that an openraft `ForwardToLeader` names:
/// what a not-leader answer tells the client.
pub fn leader_http(forward: typ::ForwardToLeader) -> Option<String> {
    forward.leader_node.map(|node| node.api_addr)
}

/// The state machine's answer to one log entry: one result per [`Op`], in
/// order (empty for blank and membership entries).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// One result per operation of the entry.
    pub results: Vec<OpResult>,
}

openraft::declare_raft_types!(
    /// openraft's type configuration for raftwasm.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot_file::SnapshotFile,
);

/// The openraft handle of a node.
pub type Raft = openraft::Raft<TypeConfig>;

/// Shorthands for openraft's generic types, specialised to [`TypeConfig`].
pub mod typ {
    use super::{NodeId, NodeInfo, TypeConfig};

    pub type Entry = openraft::Entry<TypeConfig>;
    pub type LogId = openraft::LogId<NodeId>;
    pub type Vote = openraft::Vote<NodeId>;
    pub type StorageError = openraft::StorageError<NodeId>;
    pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
    pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
    pub type Snapshot = openraft::Snapshot<TypeConfig>;
    pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
    pub type RpcError<E = openraft::error::Infallible> =
        openraft::error::RPCError<NodeId, NodeInfo, RaftError<E>>;
    pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, NodeInfo>;
    pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, NodeInfo>;
    pub type ForwardToLeader = openraft::error::ForwardToLeader<NodeId, NodeInfo>;
}
