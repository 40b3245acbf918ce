//! Batched leadership confirmation for linearizable reads.
//!
//! Each `ensure_linearizable` costs a heartbeat round to a quorum. A read
//! joins the next round that has not started yet, so every round confirms
//! leadership after all of its readers arrived (which is what makes the
//! read linearizable), and one round serves every read that queued for it.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use super::{Raft, typ};
use crate::tasks::Tasks;

/// The outcome of a round: the index the state machine had to reach, or why
/// leadership could not be confirmed.
pub type RoundResult = Result<u64, ReadError>;

/// Why a linearizable read cannot be served here.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// This node is not the leader; the leader's HTTP address when known.
    #[error("not the leader")]
    NotLeader(Option<String>),
    /// Raft failed or is shutting down.
    #[error("cannot confirm leadership: {0}")]
    Unavailable(String),
}

type Round = watch::Sender<Option<RoundResult>>;

/// The most times a round waits for more readers before it starts.
const MAX_GATHER_YIELDS: usize = 8;

/// Shares leadership checks among concurrent reads.
#[derive(Debug, Clone)]
pub struct ReadBarrier {
    next: Arc<Mutex<Option<Round>>>,
    wake: Arc<Notify>,
}

impl ReadBarrier {
    /// Starts the task that runs rounds on `raft`, on `tasks`.
    pub fn start(raft: Raft, tasks: &Tasks) -> Self {
        let barrier = Self {
            next: Arc::default(),
            wake: Arc::default(),
        };
        tasks.spawn(drive(raft, barrier.clone()));
        barrier
    }

    /// Waits until leadership has been confirmed by a round that started
    /// after this call, and the state machine has applied everything that was
    /// committed when it started. Returns that index.
    ///
    /// # Errors
    /// [`ReadError`] when this node is not the leader or Raft failed.
    pub async fn confirm(&self) -> RoundResult {
        let mut rx = {
            let mut next = self
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            next.get_or_insert_with(|| watch::channel(None).0)
                .subscribe()
        };
        self.wake.notify_one();
        match rx.wait_for(Option::is_some).await {
            Ok(result) => result
                .clone()
                .unwrap_or_else(|| Err(ReadError::Unavailable("no result".into()))),
            Err(_) => Err(ReadError::Unavailable("the node is shutting down".into())),
        }
    }

    /// How many reads wait for the next round.
    fn readers(&self) -> usize {
        self.next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map_or(0, watch::Sender::receiver_count)
    }
}

async fn drive(raft: Raft, barrier: ReadBarrier) {
    loop {
        barrier.wake.notified().await;
        // Let the reads that are already runnable join this round first:
        // yield to them until a yield brings no new reader. One round then
        // serves more reads, and the heartbeats it costs are paid less often.
        let mut readers = 0;
        for _ in 0..MAX_GATHER_YIELDS {
            tokio::task::yield_now().await;
            let now = barrier.readers();
            if now == readers {
                break;
            }
            readers = now;
        }
        let round = barrier
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(round) = round else { continue };
        let result = match raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map_or(0, |id| id.index)),
            Err(error) => Err(classify(error)),
        };
        let _ = round.send(Some(result));
    }
}

fn classify(error: typ::RaftError<typ::CheckIsLeaderError>) -> ReadError {
    match error {
        openraft::error::RaftError::APIError(typ::CheckIsLeaderError::ForwardToLeader(forward)) => {
            ReadError::NotLeader(super::leader_http(forward))
        }
        other => ReadError::Unavailable(other.to_string()),
    }
}
