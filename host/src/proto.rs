//! The HTTP wire types: what `/status`, `/join`, `/guest` and a not-leader
//! answer carry, shared by the node, the [`client`](crate::client), the CLI,
//! the bench and the tests, so that no caller picks JSON apart by string keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id, as in openraft.
pub type NodeId = u64;

/// The response header that names the leader's base URL
/// (`http://127.0.0.1:6001`) on a not-leader (421) answer.
pub const LEADER_HEADER: &str = "x-raft-leader";

/// `addr` (`host:port`, with or without a scheme or a trailing slash) as a
/// base URL with the scheme of the cluster: `https` when `tls`, else
/// `http`. The one place where an address becomes a URL: the node, the
/// client, the CLI, the bench and the tests all go through it.
pub fn base_url(addr: &str, tls: bool) -> String {
    let addr = addr
        .strip_prefix("https://")
        .or_else(|| addr.strip_prefix("http://"))
        .unwrap_or(addr)
        .trim_end_matches('/');
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

/// How a read is served (`consistency=` on `/get` and `/query`); see the
/// README's read consistency section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Consistency {
    /// Confirmed with a quorum: sees every write acknowledged before it.
    /// The leader confirms its leadership first; a follower asks the leader
    /// for the commit point and waits until it has applied it.
    #[default]
    Linearizable,
    /// The leader answers locally while its lease (a recent quorum
    /// acknowledgement) holds; otherwise as linearizable.
    Lease,
    /// Any node answers from its own state, possibly behind.
    Stale,
}

impl Consistency {
    /// The parameter's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Linearizable => "linearizable",
            Consistency::Lease => "lease",
            Consistency::Stale => "stale",
        }
    }

    /// The consistency a parameter value names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "linearizable" => Some(Consistency::Linearizable),
            "lease" => Some(Consistency::Lease),
            "stale" => Some(Consistency::Stale),
            _ => None,
        }
    }
}
/// The request header with which a client asks a follower to pass a write
/// (or a membership change) on to the leader instead of refusing it, as
/// `--forward-writes` does for every request; its value is `true`. The
/// dashboard sends it, since a page talks only to the node that served it.
pub const FORWARD_HEADER: &str = "x-raft-forward";

/// `GET /status`: one node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// This node's id.
    pub id: NodeId,
    /// This node's Raft role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// That leader's HTTP address (`host:port`).
    pub leader_http: Option<String>,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last entry this node knows committed.
    pub committed: Option<u64>,
    /// Index of the last applied entry.
    pub applied: Option<u64>,
    /// Index the current snapshot covers.
    pub snapshot: Option<u64>,
    /// Index up to which the log is purged.
    pub purged: Option<u64>,
    /// The members of the cluster.
    pub members: Vec<Member>,
    /// Whether a joint (two-step) membership change is in progress.
    pub membership_changing: bool,
    /// On the leader: the last log index each member is known to hold.
    pub replication: Option<BTreeMap<NodeId, Option<u64>>>,
    /// The active guest, once one is installed.
    pub guest: Option<Guest>,
    /// SHA-256 over every key and value; only with `?state_hash=true`.
    pub state_hash: Option<String>,
    /// This node's counters since it started, for rates computed from the
    /// difference of two answers (absent from older nodes).
    #[serde(default)]
    pub counters: Option<Counters>,
}

impl Status {
    /// The member with `id`, if there is one.
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// How many members are voters.
    pub fn voters(&self) -> usize {
        self.members.iter().filter(|m| m.voter).count()
    }
}

/// A node's Raft role, as openraft names its server states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Leads the cluster: takes writes and replicates them.
    Leader,
    /// A voter that follows the leader.
    Follower,
    /// A voter asking for votes.
    Candidate,
    /// A member that replicates but does not vote.
    Learner,
    /// The node is stopping.
    Shutdown,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        })
    }
}

/// One member, as `/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The member's id.
    pub id: NodeId,
    /// Its HTTP address.
    pub http: String,
    /// Its peer address.
    pub raft: String,
    /// Whether it votes (else it is a learner).
    pub voter: bool,
}

/// The active guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    /// The guest's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// The module's SHA-256, in hex.
    pub hash: String,
    /// The log index from which it runs.
    pub since: u64,
}

/// What a joining node sends to `POST /join`: its id and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The joining node's id.
    pub id: NodeId,
    /// Its HTTP address.
    pub http: String,
    /// Its peer address.
    pub raft: String,
}

/// One successful guest swap: the answer of `POST /guest`, and an entry of
/// `GET /guest`'s history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapRecord {
    /// The log index from which the guest is active.
    pub index: u64,
    /// The guest's name.
    pub name: String,
    /// The guest's version.
    pub version: String,
    /// The module's SHA-256, in hex.
    pub hash: String,
    /// Whether the version guard was skipped.
    pub forced: bool,
}

/// `GET /guest`: the active guest and every swap so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestHistory {
    /// The active guest.
    pub active: Option<Guest>,
    /// Every swap, oldest first.
    pub history: Vec<SwapRecord>,
}

/// The JSON body of a not-leader (421) answer, for a client that sends
/// `Accept: application/json`; the leader is also in [`LEADER_HEADER`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotLeader {
    /// Why the node did not serve the request.
    pub error: String,
    /// The leader's base URL, when known.
    pub leader: Option<String>,
}

/// `GET /cluster`: every member's `/status` as the answering node sees it,
/// for the dashboard, which talks to one node only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The id of the node that answered.
    pub node: NodeId,
    /// The members of that node's membership, in id order.
    pub members: Vec<MemberView>,
}

/// One member in a [`ClusterView`]: its `/status`, or why it has none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// The member's id.
    pub id: NodeId,
    /// Its HTTP address.
    pub http: String,
    /// Whether it votes.
    pub voter: bool,
    /// Its own `/status`, when it answered in time.
    pub status: Option<Status>,
    /// Why it did not answer (unreachable, too slow, an error status).
    pub error: Option<String>,
}

/// A node's counters since it started, as `/status` reports them. Each only
/// grows; a client computes rates from two answers (and sees a restart as a
/// counter that went down).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Writes this node acknowledged with a result (on the leader).
    pub writes: u64,
    /// Writes refused or with an unknown outcome.
    pub write_errors: u64,
    /// Reads this node answered.
    pub reads: u64,
    /// Log entries this node proposed for writes (on the leader).
    pub batches: u64,
    /// Operations in those entries: `batch_ops / batches` is the batch size.
    pub batch_ops: u64,
    /// Log entries this node's state machine applied.
    pub applied_entries: u64,
    /// Guest operations it applied.
    pub applied_ops: u64,
    /// Calls of the state machine's apply.
    pub apply_calls: u64,
    /// Time spent in those calls, in nanoseconds: `apply_nanos / apply_calls`
    /// is the apply latency.
    pub apply_nanos: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_follows_the_cluster_scheme() {
        assert_eq!(base_url("127.0.0.1:6000", false), "http://127.0.0.1:6000");
        assert_eq!(base_url("127.0.0.1:6000", true), "https://127.0.0.1:6000");
        assert_eq!(
            base_url("http://127.0.0.1:6000/", true),
            "https://127.0.0.1:6000"
        );
        assert_eq!(base_url("https://node1:6000", true), "https://node1:6000");
    }
}
