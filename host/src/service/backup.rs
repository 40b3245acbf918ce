//! Backups: a consistent point-in-time copy of the replicated state is a
//! snapshot that covers everything committed when the backup was asked
//! for, wrapped in a backup header (see [`crate::backup`]).

use std::time::{Duration, Instant};

use super::{Node, ServiceError};
use crate::backup;
use crate::raft::read_barrier::ReadError;

/// One backup prepared at a time per node: each reads a whole snapshot.
static PREPARING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a backup waits for the snapshot it needs.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

impl Node {
    /// On the leader, once it has applied everything committed when the
    /// call began (as for a linearizable read): has openraft take a
    /// snapshot that covers it and opens that snapshot as a backup. Writes
    /// go on meanwhile; applies wait only while the snapshot is written, as
    /// for any snapshot.
    ///
    /// # Errors
    /// [`ServiceError::NotLeader`] on a follower, [`ServiceError::Unavailable`]
    /// without a leader, [`ServiceError::TimedOut`] when no snapshot comes,
    /// [`ServiceError::Internal`] when the snapshot cannot be read.
    pub async fn backup(&self) -> Result<backup::Prepared, ServiceError> {
        let index = self.reads.confirm().await.map_err(|error| match error {
            ReadError::NotLeader(leader) => ServiceError::NotLeader {
                message: "not the leader; ask the leader for a backup",
                leader,
            },
            ReadError::Unavailable(_) => {
                ServiceError::Unavailable(format!("{error}; retry shortly"))
            }
        })?;
        let _preparing = PREPARING.lock().await;
        self.snapshot_covering(index).await?;
        let state = self.state.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let (meta, file) = state
                .current_snapshot()
                .map_err(|e| format!("cannot open the current snapshot: {e}"))?
                .ok_or("the snapshot is gone")?;
            backup::prepare(&meta, file).map_err(|e| format!("the current snapshot {e}"))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("the backup task failed: {e}")))?
        .map_err(|e| ServiceError::Internal(format!("cannot prepare a backup: {e}")))?;
        if prepared.header.index() < index {
            return Err(ServiceError::Internal(format!(
                "the current snapshot covers log index {}, not {index}",
                prepared.header.index()
            )));
        }
        Ok(prepared)
    }

    /// Asks openraft for a snapshot until the current one covers log index
    /// `index`. A request made while another build runs is ignored, so it
    /// is made again whenever the metrics change, and at least every second.
    async fn snapshot_covering(&self, index: u64) -> Result<(), ServiceError> {
        let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
        let mut metrics = self.raft.metrics();
        loop {
            let snapshot = metrics.borrow_and_update().snapshot;
            if snapshot.is_some_and(|s| s.index >= index) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::TimedOut(format!(
                    "no snapshot covering log index {index} within {SNAPSHOT_TIMEOUT:?}; \
                     see the node's log and retry"
                )));
            }
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(|e| ServiceError::Unavailable(format!("raft stopped: {e}")))?;
            let _ = tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await;
        }
    }
}
