//! Membership and status: adding a node (as a learner that must catch up
//! before it becomes a voter), removing one, this node's view of the
//! cluster as a [`Status`], and every member's status gathered by this node
//! ([`ClusterView`], for the dashboard).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::ChangeMembers;

use super::{Node, ServiceError};
use crate::client::{Client, ClientError};
use crate::metrics::{GuestLabels, Scrape};
use crate::proto::{ClusterView, JoinRequest, Member, MemberView, Role, Status};
use crate::raft::{NodeId, NodeInfo, leader_http, typ};

/// The not-leader message of membership changes.
const SEND_TO_LEADER: &str = "not the leader; send membership changes to the leader";

/// How long [`Node::cluster_view`] waits for each member's `/status`:
/// short, so that one dead member does not hold up the view of the others.
pub const MEMBER_TIMEOUT: Duration = Duration::from_millis(800);

/// What a refused membership change means to the caller.
fn membership_error(error: typ::RaftError<typ::ClientWriteError>) -> ServiceError {
    match error {
        openraft::error::RaftError::APIError(typ::ClientWriteError::ForwardToLeader(forward)) => {
            ServiceError::NotLeader {
                message: SEND_TO_LEADER,
                leader: leader_http(forward),
            }
        }
        openraft::error::RaftError::APIError(typ::ClientWriteError::ChangeMembershipError(e)) => {
            ServiceError::Unavailable(format!("membership change refused: {e}; retry shortly"))
        }
        openraft::error::RaftError::Fatal(e) => {
            ServiceError::Unavailable(format!("raft stopped: {e}"))
        }
    }
}

impl Node {
    /// Adds the node of `request` as a learner, waits (at most
    /// `--join-timeout-ms`) for it to catch up, then makes it a voter. A
    /// node that does not catch up in time is removed again, so an address
    /// where nothing listens never counts towards the quorum. Idempotent for
    /// a member that restarts with the same id and addresses.
    ///
    /// # Errors
    /// [`ServiceError::NotLeader`] on a follower;
    /// [`ServiceError::AddressTaken`] when the addresses belong to another
    /// member; [`ServiceError::BadRequest`] when the id is a member with
    /// other addresses; [`ServiceError::TimedOut`] when the node does not
    /// catch up; [`ServiceError::Unavailable`] while a restored node takes
    /// its first snapshot.
    pub async fn join(&self, request: &JoinRequest) -> Result<(), ServiceError> {
        if !self.is_leader() {
            return Err(self.not_leader(SEND_TO_LEADER));
        }
        if self.finishing_restore() {
            return Err(ServiceError::Unavailable(
                "this node was restored from a backup and is still taking its first snapshot; \
                 retry shortly"
                    .into(),
            ));
        }
        let node = NodeInfo {
            api_addr: request.http.clone(),
            raft_addr: request.raft.clone(),
        };
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if let Some((other, known)) = membership.nodes().find(|(id, known)| {
            **id != request.id
                && (known.api_addr == node.api_addr || known.raft_addr == node.raft_addr)
        }) {
            return Err(ServiceError::AddressTaken(format!(
                "http={} raft={} already belongs to member {other} (http={} raft={}); \
                 join with that member's id, or remove it first",
                node.api_addr, node.raft_addr, known.api_addr, known.raft_addr
            )));
        }
        let target = match membership.get_node(&request.id) {
            Some(known) if *known != node => {
                return Err(ServiceError::BadRequest(format!(
                    "node {} is already a member with addresses http={} raft={}; remove it first to change them",
                    request.id, known.api_addr, known.raft_addr
                )));
            }
            Some(_) if membership.voter_ids().any(|id| id == request.id) => return Ok(()),
            // A learner from an earlier join: it must reach the current log.
            Some(_) => metrics.last_log_index.unwrap_or(0),
            None => {
                tracing::info!(id = request.id, http = %request.http, raft = %request.raft, "adding a learner");
                self.raft
                    .add_learner(request.id, node.clone(), false)
                    .await
                    .map_err(membership_error)?
                    .log_id
                    .index
            }
        };
        let timeout = self.config.join_timeout();
        let caught_up = self
            .raft
            .wait(Some(timeout))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&request.id).copied().flatten())
                        .is_some_and(|matched| matched.index >= target)
                },
                "the joining node to catch up",
            )
            .await;
        if caught_up.is_err() {
            tracing::warn!(id = request.id, raft = %request.raft, ?timeout, "joining node did not catch up; removing it");
            let removed = self
                .raft
                .change_membership(
                    ChangeMembers::RemoveNodes(BTreeSet::from([request.id])),
                    false,
                )
                .await;
            if let Err(error) = removed {
                tracing::warn!(id = request.id, %error, "removing the learner that did not catch up");
            }
            return Err(ServiceError::TimedOut(format!(
                "node {} did not catch up within {timeout:?} and was not added; check that it runs \
                 and that this leader can reach its --raft address {}, then retry",
                request.id, request.raft
            )));
        }
        self.raft
            .change_membership(
                ChangeMembers::AddVoterIds(BTreeSet::from([request.id])),
                false,
            )
            .await
            .map_err(membership_error)?;
        tracing::info!(id = request.id, "node is a voter");
        Ok(())
    }

    /// Removes member `id` (voter or learner).
    ///
    /// # Errors
    /// [`ServiceError::NotLeader`] on a follower, [`ServiceError::NotFound`]
    /// when `id` is not a member, [`ServiceError::Unavailable`] when raft
    /// refuses the change now.
    pub async fn remove(&self, id: NodeId) -> Result<(), ServiceError> {
        if !self.is_leader() {
            return Err(self.not_leader(SEND_TO_LEADER));
        }
        let membership = self.raft.metrics().borrow().membership_config.clone();
        if membership.membership().get_node(&id).is_none() {
            return Err(ServiceError::NotFound);
        }
        let ids = BTreeSet::from([id]);
        if membership.membership().voter_ids().any(|v| v == id) {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
                .await
                .map_err(membership_error)?;
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
            .map_err(membership_error)?;
        tracing::info!(id, "node removed");
        Ok(())
    }

    /// The values of the gauges of `/metrics` that mirror Raft's state.
    pub fn scrape(&self) -> Scrape {
        let m = self.raft.metrics().borrow().clone();
        Scrape {
            is_leader: m.current_leader == Some(self.id),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            guest: self.state.active().map(|guest| GuestLabels {
                name: guest.module.name().to_owned(),
                version: guest.module.version().to_string(),
                hash: guest.module.hash().to_owned(),
                since: guest.since,
            }),
        }
    }

    /// This node's view of the cluster. `with_state_hash` adds a SHA-256
    /// over every key and value (equal on replicas with equal state); it
    /// reads the whole state, on the blocking pool.
    pub async fn status(&self, with_state_hash: bool) -> Status {
        // Hashing reads the whole state: on the blocking pool, not an async
        // worker thread that heartbeats may be waiting for.
        let state_hash = if with_state_hash {
            let state = self.state.clone();
            tokio::task::spawn_blocking(move || state.state_hash().ok())
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members: Vec<Member> = membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                http: node.api_addr.clone(),
                raft: node.raft_addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let (leader, leader_addr) = self.leader();
        let replication: Option<BTreeMap<NodeId, Option<u64>>> =
            metrics.replication.as_ref().map(|r| {
                r.iter()
                    .map(|(id, log)| (*id, log.map(|l| l.index)))
                    .collect()
            });
        Status {
            id: self.id,
            role: match metrics.state {
                openraft::ServerState::Leader => Role::Leader,
                openraft::ServerState::Follower => Role::Follower,
                openraft::ServerState::Candidate => Role::Candidate,
                openraft::ServerState::Learner => Role::Learner,
                openraft::ServerState::Shutdown => Role::Shutdown,
            },
            term: metrics.current_term,
            leader,
            leader_http: leader_addr,
            last_log_index: metrics.last_log_index,
            committed: self.committed(),
            applied: metrics.last_applied.map(|l| l.index),
            snapshot: metrics.snapshot.map(|l| l.index),
            purged: metrics.purged.map(|l| l.index),
            members,
            membership_changing: membership.get_joint_config().len() > 1,
            replication,
            guest: self.state.active().map(|g| g.describe()),
            state_hash,
            counters: Some(self.metrics.counters(self.state.apply_stats())),
        }
    }
}

impl Node {
    /// Every member's [`Status`] as this node gathers them (`GET /cluster`,
    /// for the dashboard, which talks to one node only): asked concurrently
    /// with [`MEMBER_TIMEOUT`] each; a member that does not answer is listed
    /// with the reason.
    pub async fn cluster_view(&self) -> ClusterView {
        let members: Vec<(u64, String, bool)> = {
            let metrics = self.raft.metrics().borrow().clone();
            let membership = metrics.membership_config.membership();
            let voters: Vec<u64> = membership.voter_ids().collect();
            membership
                .nodes()
                .map(|(id, node)| (*id, node.api_addr.clone(), voters.contains(id)))
                .collect()
        };
        let client = Client::with_http(
            self.http.clone(),
            self.config.tls_on(),
            &[],
            None,
            MEMBER_TIMEOUT,
        );
        let asks = members.into_iter().map(|(id, http, voter)| {
            let client = &client;
            async move {
                let (status, error) =
                    match tokio::time::timeout(MEMBER_TIMEOUT, client.node_status(&http)).await {
                        Ok(Ok(status)) => (Some(status), None),
                        Ok(Err(error)) => (None, Some(reason(error))),
                        Err(_) => (None, Some(format!("no answer within {MEMBER_TIMEOUT:?}"))),
                    };
                MemberView {
                    id,
                    http,
                    voter,
                    status,
                    error,
                }
            }
        });
        ClusterView {
            node: self.id,
            members: futures::future::join_all(asks).await,
        }
    }
}

/// What to show for a member that did not answer: the failure itself,
/// without the client's advice about `--cluster`, which does not apply here.
fn reason(error: ClientError) -> String {
    match error {
        ClientError::Unreachable { last, .. } => format!("unreachable: {last}"),
        other => other.to_string(),
    }
}
