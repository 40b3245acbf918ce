//! The node's operations, typed and free of HTTP: [`Node`] writes, reads
//! with a named consistency, deploys guests, changes membership, reports
//! its [`Status`] and prepares backups. The HTTP handlers in
//! [`api`](crate::api) are thin translations over it, and the node's own
//! background tasks (the first guest, a restore) call it directly.
//!
//! - [`kv`]: writes, reads (`linearizable`, `lease`, `stale`) and guest-kv's
//!   cache commands;
//! - [`guest`]: validating and deploying a guest;
//! - [`cluster`]: membership (join, remove), status, and every member's
//!   status gathered for the dashboard;
//! - [`backup`]: the snapshot a backup streams;
//! - [`write_queue`]: admission of client writes, bounded in bytes.

use std::sync::Arc;

use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::raft::batcher::{Batcher, WriteError};
use crate::raft::log_store::LogStore;
use crate::raft::read_barrier::{ReadBarrier, ReadError};
use crate::raft::state_machine::StateReader;
use crate::raft::{NodeId, NodeInfo, Raft};
use crate::runtime::GuestRuntime;
use crate::watch::WatchHub;

pub mod backup;
pub mod cluster;
pub mod guest;
pub mod kv;
pub mod write_queue;

/// The answer a follower gives to a write, as in the walkthrough.
pub const WRITE_REFUSED: &str = "write method not allowed";

/// Why an operation did not succeed. Each kind is one decision a caller
/// branches on (the HTTP API maps each to one status code); messages are
/// lowercase, name what failed and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The key or member does not exist.
    #[error("not found")]
    NotFound,
    /// A precondition failed; the current value (or the refusal).
    #[error("{}", String::from_utf8_lossy(.0))]
    Conflict(Vec<u8>),
    /// A joining node's address belongs to another member.
    #[error("{0}")]
    AddressTaken(String),
    /// A key, value or module is too large.
    #[error("{0}")]
    TooLarge(String),
    /// This node does not serve the operation; the leader's HTTP address
    /// when known.
    #[error("{message}")]
    NotLeader {
        /// What to tell the caller.
        message: &'static str,
        /// The leader's HTTP address (`host:port`).
        leader: Option<String>,
    },
    /// The guest (or the cluster's verdict on a module) refused the command.
    #[error("{0}")]
    Refused(String),
    /// The node cannot serve now (no leader yet, a full queue, shutting
    /// down).
    #[error("{0}")]
    Unavailable(String),
    /// A write was proposed but not seen committed: its outcome is unknown.
    #[error("{0}")]
    Unknown(String),
    /// What the operation waits for did not happen in time; nothing changed.
    #[error("{0}")]
    TimedOut(String),
    /// A fault on this node.
    #[error("{0}")]
    Internal(String),
}

impl From<WriteError> for ServiceError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::NotLeader(leader) => ServiceError::NotLeader {
                message: WRITE_REFUSED,
                leader,
            },
            WriteError::Unknown(_) => ServiceError::Unknown(error.to_string()),
            WriteError::Unavailable(_) => {
                ServiceError::Unavailable(format!("{error}; retry shortly"))
            }
        }
    }
}

impl From<ReadError> for ServiceError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::NotLeader(leader) => ServiceError::NotLeader {
                message: "not the leader; retry on the leader or use consistency=stale",
                leader,
            },
            ReadError::Unavailable(_) => {
                ServiceError::Unavailable(format!("{error}; retry shortly"))
            }
        }
    }
}

/// A running node's handle: what every operation needs. Shared behind an
/// `Arc` by the HTTP handlers and the node's background tasks.
pub struct Node {
    /// This node's id.
    pub id: NodeId,
    /// This node's addresses.
    pub addrs: NodeInfo,
    /// The openraft handle.
    pub raft: Raft,
    /// The node's configuration.
    pub config: NodeConfig,
    /// Gathers writes into log entries.
    pub batcher: Batcher,
    /// Bounds the bytes of client writes waiting for their commit.
    pub write_queue: write_queue::WriteQueue,
    /// Batches leadership confirmations for linearizable reads.
    pub reads: ReadBarrier,
    /// Queries and the active guest.
    pub state: StateReader,
    /// Loads and validates guests.
    pub runtime: GuestRuntime,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// For calls to other members (a follower's read index, forwarding).
    pub http: reqwest::Client,
    /// The log store's view of the committed index.
    pub log: LogStore,
    /// The feed of applied changes that `GET /watch` streams.
    pub watch: Arc<WatchHub>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// The current leader's id and HTTP address, as this node knows them.
    pub fn leader(&self) -> (Option<NodeId>, Option<String>) {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader;
        let addr = leader.and_then(|id| {
            metrics
                .membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.api_addr.clone())
        });
        (leader, addr)
    }

    /// The last committed log index this node knows of.
    pub fn committed(&self) -> Option<u64> {
        self.log.committed_index()
    }

    /// Whether this node believes it is the leader.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// A not-leader error with `message` and the leader this node knows of.
    fn not_leader(&self, message: &'static str) -> ServiceError {
        ServiceError::NotLeader {
            message,
            leader: self.leader().1,
        }
    }

    /// Whether this node was restored from a backup and has not yet taken
    /// the snapshot that later members must receive; it admits no member
    /// until then.
    pub fn finishing_restore(&self) -> bool {
        self.config
            .node
            .join(crate::backup::restore::MARKER)
            .exists()
    }
}
