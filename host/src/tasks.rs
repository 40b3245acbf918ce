//! [`Tasks`]: the node's background tasks, spawned on one tracker and
//! stopped by one cancellation token, so that shutdown can wait for every
//! one of them before the final flush.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Owns the background tasks of a node. Cheap to clone; every clone spawns
/// onto the same tracker.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// An empty set of tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` until it finishes or [`Tasks::shutdown`] cancels it
    /// (the future is then dropped at its next `.await`).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            cancel.run_until_cancelled_owned(task).await;
        });
    }

    /// Runs `task`, which watches [`Tasks::cancelled`] itself and ends on
    /// its own terms (a server that stops accepting, then finishes what it
    /// serves); [`Tasks::shutdown`] waits for it.
    pub fn spawn_graceful<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// The token that [`Tasks::shutdown`] cancels.
    pub fn cancelled(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Whether shutdown has begun.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Cancels every task and waits until all of them have ended.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_and_waits_for_every_task() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let tasks = Tasks::new();
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Flag(dropped.clone());
        let (started, running) = tokio::sync::oneshot::channel();
        tasks.spawn(async move {
            let _flag = flag;
            let _ = started.send(());
            std::future::pending::<()>().await;
        });
        let nested = tasks.clone();
        let (spawned, nested_running) = tokio::sync::oneshot::channel();
        tasks.spawn(async move {
            nested.spawn(std::future::pending());
            let _ = spawned.send(());
        });
        running.await.expect("the first task runs");
        nested_running.await.expect("the second task runs");
        assert!(!dropped.load(Ordering::SeqCst));
        tokio::time::timeout(std::time::Duration::from_secs(10), tasks.shutdown())
            .await
            .expect("every task ends once cancelled");
        assert!(
            dropped.load(Ordering::SeqCst),
            "the pending task was dropped"
        );
        assert!(tasks.is_cancelled());
    }
}
