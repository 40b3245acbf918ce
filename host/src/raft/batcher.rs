//! The write batcher: concurrent client writes become one log entry (one
//! flush, one replication round), and each caller gets its own result.
//!
//! openraft 0.9 flushes the log once per `client_write`, so batching is what
//! turns many small writes into throughput. How many entries may be
//! proposed and without an outcome (committed and applied, or failed) is
//! the pipeline depth (`--pipeline-depth`):
//! - 1 (the default): the next batch is proposed when the previous entry
//!   has its outcome, and grows meanwhile. The leader's sync of an entry
//!   still overlaps its replication: it goes to the followers while the
//!   leader syncs it (see [`super::early`]).
//! - More: the next batch is proposed as soon as the previous entry is
//!   durable in the leader's log, so the leader's flush of entry N+1
//!   overlaps the replication of entry N, and each entry still costs
//!   exactly one flush. Entries are then more and smaller, and each costs a
//!   sync that openraft's core waits for, a replication round and an apply;
//!   where nodes share a few cores that measured slower at every load (see
//!   the README).
//!
//! Either way the next batch is whatever queued meanwhile: group commit.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::{Op, OpResult, Raft, Request, TypeConfig, typ};
use crate::tasks::Tasks;

/// The most operations in one entry.
const MAX_OPS: usize = 1024;
/// The most operation bytes in one entry.
const MAX_BYTES: usize = 4 << 20;

/// Why a write has no result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader; the leader's HTTP address when known.
    #[error("not the leader")]
    NotLeader(Option<String>),
    /// The write was proposed but its commit was not seen in time: it may or
    /// may not have been applied.
    #[error(
        "the write's outcome is unknown: it was proposed but not seen committed within {0:?}; read the key to find out"
    )]
    Unknown(Duration),
    /// Raft is shutting down or failed.
    #[error("the node cannot accept writes: {0}")]
    Unavailable(String),
}

/// What openraft answers a proposed entry with.
type Answer = oneshot::Receiver<
    Result<openraft::raft::ClientWriteResponse<TypeConfig>, typ::ClientWriteError>,
>;

struct Pending {
    op: Op,
    reply: oneshot::Sender<Result<OpResult, WriteError>>,
}

/// The handle writers use. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

/// Sizes of the batches proposed, for metrics.
pub trait BatchObserver: Send + Sync + 'static {
    /// Called once per proposed entry with its number of operations.
    fn batch_proposed(&self, ops: usize);
}

impl Batcher {
    /// Starts the batcher task for `raft` on `tasks` (its proposals run
    /// there too), with at most `depth` entries proposed and without an
    /// outcome (at least 1); `appends_flushed` counts the appends the
    /// local log store has flushed (see
    /// [`super::log_store::LogStore::appends_flushed`]).
    pub fn start(
        raft: Raft,
        appends_flushed: watch::Receiver<u64>,
        depth: usize,
        timeout: Duration,
        observer: Arc<dyn BatchObserver>,
        tasks: &Tasks,
    ) -> Self {
        let (tx, rx) = mpsc::channel(16 * MAX_OPS);
        tasks.spawn(run(
            raft,
            rx,
            appends_flushed,
            depth.max(1),
            timeout,
            observer,
            tasks.clone(),
        ));
        Self { tx }
    }

    /// Proposes `op` and waits for its result.
    ///
    /// # Errors
    /// [`WriteError`] when this node cannot commit it or the outcome is unknown.
    pub async fn write(&self, op: Op) -> Result<OpResult, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { op, reply })
            .await
            .map_err(|_| WriteError::Unavailable("the node is shutting down".into()))?;
        rx.await
            .map_err(|_| WriteError::Unavailable("the node is shutting down".into()))?
    }
}

async fn run(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    mut appends_flushed: watch::Receiver<u64>,
    depth: usize,
    timeout: Duration,
    observer: Arc<dyn BatchObserver>,
    tasks: Tasks,
) {
    let slots = Arc::new(Semaphore::new(depth));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // Gather what queued while we waited for a slot.
        let mut bytes = first.op.payload_len();
        let mut batch = vec![first];
        while batch.len() < MAX_OPS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(pending) => {
                    bytes += pending.op.payload_len();
                    batch.push(pending);
                }
                Err(_) => break,
            }
        }
        observer.batch_proposed(batch.len());
        let flushed_before = *appends_flushed.borrow_and_update();
        let (ops, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.op, p.reply)).unzip();
        let request = Request {
            time_ms: now_ms(),
            ops,
        };
        // Handed to Raft from here, not from the task below: one task
        // wake-up less on every write's path.
        let answer = match raft.client_write_ff(request).await {
            Ok(answer) => answer,
            Err(fatal) => {
                reply_all(replies, Err(WriteError::Unavailable(fatal.to_string())));
                continue;
            }
        };
        let (done, finished) = oneshot::channel::<()>();
        tasks.spawn(async move {
            deliver(answer, replies, timeout).await;
            drop(permit);
            drop(done);
        });
        // Only one entry waits for the leader's flush at a time: the next
        // one is proposed once this one is durable here (the first append
        // flushed after proposing is this entry's, since nothing else was
        // waiting), or has an outcome (refused, failed).
        tokio::select! {
            _ = appends_flushed.wait_for(|&n| n > flushed_before) => {}
            _ = finished => {}
        }
    }
}

/// Waits for the outcome of a proposed entry and gives each caller its
/// operation's result.
async fn deliver(
    answer: Answer,
    replies: Vec<oneshot::Sender<Result<OpResult, WriteError>>>,
    timeout: Duration,
) {
    let outcome = match tokio::time::timeout(timeout, answer).await {
        Err(_) => Err(WriteError::Unknown(timeout)),
        Ok(Err(_)) => Err(WriteError::Unavailable("Raft stopped".into())),
        Ok(Ok(Ok(response))) => Ok(response.data.results),
        Ok(Ok(Err(error))) => Err(classify(openraft::error::RaftError::APIError(error))),
    };
    match outcome {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(error) => reply_all(replies, Err(error)),
    }
}

fn reply_all(
    replies: Vec<oneshot::Sender<Result<OpResult, WriteError>>>,
    outcome: Result<OpResult, WriteError>,
) {
    for reply in replies {
        let _ = reply.send(outcome.clone());
    }
}

fn classify(error: typ::RaftError<typ::ClientWriteError>) -> WriteError {
    match error {
        openraft::error::RaftError::APIError(typ::ClientWriteError::ForwardToLeader(forward)) => {
            WriteError::NotLeader(super::leader_http(forward))
        }
        // A change-membership error cannot come from a normal write.
        openraft::error::RaftError::APIError(other) => WriteError::Unavailable(other.to_string()),
        openraft::error::RaftError::Fatal(fatal) => WriteError::Unavailable(fatal.to_string()),
    }
}

/// Milliseconds since the Unix epoch by this node's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
