//! Early replication: the leader sends a new entry to its followers while
//! it is still syncing the entry to its own log, not after.
//!
//! openraft 0.9 replicates an entry only once the leader's own append has
//! returned, so a lone write waits for two syncs in a row: the leader's,
//! then a follower's. Raft allows the leader to write its log in parallel
//! with replication (the leader counts itself toward a commit only once its
//! own copy is durable, which openraft still enforces). So when the log
//! store appends the leader's own entries, it also hands them here, and each
//! follower receives them as an ordinary AppendEntries request from the
//! leader — same vote, the leader's previous log id, the leader's committed
//! id — and syncs them at the same time as the leader. When openraft's own
//! request for the same entries arrives, the follower already holds them and
//! answers without another sync.
//!
//! The answers to these early requests are dropped: openraft learns what a
//! follower holds only from its own requests, so commits are decided exactly
//! as before. An early request that arrives late, out of order, or after a
//! change of leader is answered like any stale request from that leader: it
//! matches entries already held (nothing happens), or names a previous
//! entry the follower lacks (refused; nothing is removed unless it conflicts
//! with the leader's log, which openraft's own request would remove too),
//! or carries an old vote (refused).
//!
//! Only an entry proposed when nothing else is waiting to commit goes early:
//! with the batcher's default pipeline depth of 1 that is every client
//! entry, under load too. With a deeper pipeline, entries proposed while
//! others wait to commit are not sent early: the batcher already overlaps
//! the leader's sync of one entry with the replication of the previous one,
//! and sending those twice measured slower.

use std::time::Duration;

use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use prometheus::IntCounter;

use super::peer::NetworkFactory;
use super::peer::client::append_entries_frame;
use super::{NodeId, Raft, TypeConfig, typ};
use crate::tasks::Tasks;

/// How long an early request may take before it is given up; openraft's
/// own request follows anyway.
const EARLY_TIMEOUT: Duration = Duration::from_secs(1);

/// The largest request sent early. A bigger one might not fit in the
/// socket's buffer at once, and its own sync dwarfs what going early saves.
const EARLY_MAX_FRAME: usize = 64 << 10;

/// Sends the leader's new entries to the followers ahead of openraft.
#[derive(Clone)]
pub struct EarlyReplication {
    id: NodeId,
    raft: Raft,
    network: NetworkFactory,
    tasks: Tasks,
    /// Requests written, one per follower.
    sent: IntCounter,
}

impl std::fmt::Debug for EarlyReplication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyReplication")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl EarlyReplication {
    /// Early replication for the node `id`, whose Raft is `raft`; requests
    /// go through (a clone of) openraft's `network`, their answers are read
    /// on `tasks`, and `sent` counts them.
    pub fn new(
        id: NodeId,
        raft: Raft,
        network: NetworkFactory,
        tasks: Tasks,
        sent: IntCounter,
    ) -> Self {
        Self {
            id,
            raft,
            network,
            tasks,
            sent,
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Writes `request` to every other voter of the current membership on an
    /// idle connection, here and now (so it leaves before the caller goes on
    /// to sync), and reads the answers on tasks that drop them. A peer with
    /// no idle connection, or whose socket is full, is skipped, and so is a
    /// request over [`EARLY_MAX_FRAME`].
    pub async fn send(&self, request: AppendEntriesRequest<TypeConfig>) {
        let targets: Vec<(NodeId, super::NodeInfo)> = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            membership
                .voter_ids()
                .filter(|&id| id != self.id)
                .filter_map(|id| membership.get_node(&id).map(|node| (id, node.clone())))
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        let frame = match append_entries_frame(request) {
            Ok(frame) if frame.len() <= EARLY_MAX_FRAME => frame,
            Ok(_) => return,
            Err(error) => {
                tracing::debug!(%error, "cannot encode an early append-entries");
                return;
            }
        };
        let mut network = self.network.clone();
        for (target, node) in targets {
            let client = network.new_client(target, &node).await;
            let Some(sent) = client.send_append_entries_now(frame.clone()) else {
                continue;
            };
            self.sent.inc();
            self.tasks.spawn(async move {
                match sent.answer(EARLY_TIMEOUT).await {
                    Ok(answer) => tracing::trace!(target, %answer, "early append-entries answered"),
                    Err(error) => tracing::debug!(target, %error, "early append-entries failed"),
                }
            });
        }
    }
}

/// The early request for `entries`, which the log store is about to append
/// under the saved `vote` with `committed` the last committed log id it was
/// told of; `None` unless they are this leader's own entries (`me` is the
/// leader of a committed vote, and the entries carry its leader id) and
/// nothing before them waits to commit.
pub fn early_request(
    me: NodeId,
    vote: Option<&typ::Vote>,
    committed: Option<typ::LogId>,
    entries: &[typ::Entry],
) -> Option<AppendEntriesRequest<TypeConfig>> {
    let vote = vote?;
    let first = entries.first()?;
    let leads = vote.is_committed() && vote.leader_id().voted_for() == Some(me);
    let own = entries
        .iter()
        .all(|e| e.log_id.leader_id == *vote.leader_id());
    let next = committed.map_or(0, |c| c.index + 1);
    if !(leads && own && first.log_id.index == next) {
        return None;
    }
    Some(AppendEntriesRequest {
        vote: *vote,
        prev_log_id: committed,
        entries: entries.to_vec(),
        leader_commit: committed,
    })
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

    use super::*;

    fn entry(term: u64, leader: NodeId, index: u64) -> typ::Entry {
        typ::Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, leader), index),
            payload: EntryPayload::Blank,
        }
    }

    fn committed_at(term: u64, leader: NodeId, index: u64) -> Option<typ::LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, leader), index))
    }

    #[test]
    fn a_leaders_entry_after_the_committed_one_goes_early() {
        let vote = Vote::new_committed(3, 1);
        let committed = committed_at(2, 2, 9);
        let entries = [entry(3, 1, 10)];
        let request = early_request(1, Some(&vote), committed, &entries).expect("goes early");
        assert_eq!(request.vote, vote);
        assert_eq!(request.prev_log_id, committed);
        assert_eq!(request.leader_commit, committed);
        assert_eq!(request.entries, entries.to_vec());
    }

    #[test]
    fn the_first_entry_of_a_log_goes_early_with_no_previous_id() {
        let vote = Vote::new_committed(1, 1);
        let request = early_request(1, Some(&vote), None, &[entry(1, 1, 0)]).expect("goes early");
        assert_eq!(request.prev_log_id, None);
    }

    #[test]
    fn only_the_leaders_own_entries_on_an_idle_pipeline_go_early() {
        let vote = Vote::new_committed(3, 1);
        let committed = committed_at(3, 1, 9);
        // A follower appends the leader's entries: not its own vote.
        assert!(early_request(2, Some(&vote), committed, &[entry(3, 1, 10)]).is_none());
        // A vote not yet granted by a quorum: a candidate, not a leader.
        let candidate = Vote::new(3, 1);
        assert!(early_request(1, Some(&candidate), committed, &[entry(3, 1, 10)]).is_none());
        // Entries under another leader id are not this leader's proposals.
        assert!(early_request(1, Some(&vote), committed, &[entry(2, 1, 10)]).is_none());
        // Entry 10 waits to commit: 11 is left to openraft.
        assert!(early_request(1, Some(&vote), committed, &[entry(3, 1, 11)]).is_none());
        // No vote saved, or nothing to append.
        assert!(early_request(1, None, committed, &[entry(3, 1, 10)]).is_none());
        assert!(early_request(1, Some(&vote), committed, &[]).is_none());
    }
}
