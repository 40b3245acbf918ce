//! The watch feed's node side: [`WatchHub`] receives what every applied
//! entry changed, keeps a bounded [`Window`] of it for replays, and fans it
//! out to watchers without ever making apply wait for one.
//!
//! The window lives in memory only: after a restart it starts empty at the
//! node's applied index, so a `from` older than that is answered 410.

pub mod sse;
mod window;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio_util::sync::CancellationToken;

use crate::runtime::Change;
pub use window::Window;

/// Bytes counted for each change on top of its key and value, for the
/// window's byte bound.
const CHANGE_OVERHEAD: usize = 48;

/// The bounds of a node's watch feed (`--watch-*` and `--max-watchers`).
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// The most entries the replay window keeps.
    pub window_entries: usize,
    /// The most bytes of changes the replay window keeps.
    pub window_bytes: usize,
    /// How many entries a watcher may fall behind before it is dropped.
    pub queue_entries: usize,
    /// Watchers served at once; more are refused.
    pub max_watchers: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            window_entries: 10_000,
            window_bytes: 64 << 20,
            queue_entries: 1024,
            max_watchers: 256,
        }
    }
}

/// What one applied entry changed, in the form watchers see (after the
/// guest's watch hook).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryChanges {
    /// The entry's log index.
    pub index: u64,
    /// Its changes, each key once, in the order the guest's hook gave.
    pub changes: Vec<Change>,
    /// The bytes the window counts for it.
    pub bytes: usize,
}

impl EntryChanges {
    /// The changes of the entry at `index`.
    pub fn new(index: u64, changes: Vec<Change>) -> Self {
        let bytes = changes
            .iter()
            .map(|c| c.key.len() + c.value.as_ref().map_or(0, Vec::len) + CHANGE_OVERHEAD)
            .sum();
        Self {
            index,
            changes,
            bytes,
        }
    }
}

/// What the hub tells live watchers.
#[derive(Debug, Clone)]
enum Notice {
    /// An applied entry's changes.
    Entry(Arc<EntryChanges>),
    /// The node installed a snapshot: there are no changes before `oldest`.
    Reset { oldest: u64 },
}

/// Why a watch cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The window no longer holds the changes asked for.
    #[error(
        "changes before index {oldest} are no longer kept on this node (its watch window is \
         bounded, and starts empty after a restart); read the current state and watch from \
         index {oldest} or later"
    )]
    Gone {
        /// The oldest index the node can replay from.
        oldest: u64,
    },
    /// The node serves as many watchers as it may.
    #[error(
        "this node serves its maximum of {max} watchers (--max-watchers); retry later or watch \
         another member"
    )]
    TooMany {
        /// The bound.
        max: usize,
    },
}

#[derive(Debug)]
struct Inner {
    window: Window,
    /// The last applied index published.
    applied: u64,
}

/// The node's watch feed: fed by the state machine after each apply, read
/// by `GET /watch`.
#[derive(Debug)]
pub struct WatchHub {
    inner: Mutex<Inner>,
    sender: broadcast::Sender<Notice>,
    watchers: Arc<Semaphore>,
    limits: WatchLimits,
    closed: CancellationToken,
}

impl WatchHub {
    /// A hub with `limits`, before anything is applied.
    pub fn new(limits: WatchLimits) -> Self {
        let (sender, _) = broadcast::channel(limits.queue_entries.max(1));
        Self {
            inner: Mutex::new(Inner {
                window: Window::new(limits.window_entries, limits.window_bytes, 1),
                applied: 0,
            }),
            sender,
            watchers: Arc::new(Semaphore::new(limits.max_watchers)),
            limits,
            closed: CancellationToken::new(),
        }
    }

    /// The bounds it works with.
    pub fn limits(&self) -> &WatchLimits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the window whole, so a poisoned lock is usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts over at `applied` with an empty window (when the state machine
    /// opens, and after it installs a snapshot). Live watchers that would
    /// miss changes are dropped.
    pub fn reset(&self, applied: u64) {
        let mut inner = self.lock();
        inner.window.reset(applied + 1);
        inner.applied = applied;
        let _ = self.sender.send(Notice::Reset {
            oldest: applied + 1,
        });
    }

    /// Records what the entries of one apply call changed (in index order;
    /// entries that changed nothing may be left out) and that everything up
    /// to `applied` is applied. Never blocks on a watcher.
    pub fn publish(&self, entries: Vec<EntryChanges>, applied: u64) {
        let mut inner = self.lock();
        for entry in entries {
            if entry.changes.is_empty() {
                continue;
            }
            let entry = Arc::new(entry);
            inner.window.push(entry.clone());
            // No receiver is not an error: nobody is watching.
            let _ = self.sender.send(Notice::Entry(entry));
        }
        inner.applied = inner.applied.max(applied);
    }

    /// The oldest index a watcher can start from, and the applied index.
    pub fn range(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.window.oldest(), inner.applied)
    }

    /// Ends every watch (the node is shutting down); later ones end at once.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// A watch of every change from index `from` on (after the applied
    /// index when `None`): first the window's, then live ones, with no gap
    /// and no duplicate.
    ///
    /// # Errors
    /// [`SubscribeError`] when `from` is older than the window or too many
    /// watchers are served.
    pub fn subscribe(&self, from: Option<u64>) -> Result<Subscription, SubscribeError> {
        let permit =
            self.watchers
                .clone()
                .try_acquire_owned()
                .map_err(|_| SubscribeError::TooMany {
                    max: self.limits.max_watchers,
                })?;
        // Replay and subscription are taken under the lock `publish` holds,
        // so every entry is in exactly one of them.
        let inner = self.lock();
        let from = from.unwrap_or(inner.applied + 1);
        let replay = inner
            .window
            .since(from)
            .map_err(|oldest| SubscribeError::Gone { oldest })?;
        let receiver = self.sender.subscribe();
        drop(inner);
        Ok(Subscription {
            replay: replay.into(),
            receiver,
            next: from,
            queue: self.limits.queue_entries,
            closed: self.closed.clone(),
            _permit: permit,
        })
    }
}

/// What a watcher gets next.
#[derive(Debug)]
pub enum Next {
    /// The changes of the next entry.
    Entry(Arc<EntryChanges>),
    /// The watch ends; the reason, for the watcher.
    Dropped(String),
}

/// One watcher's view of the feed. Holds one of the hub's watcher slots.
#[derive(Debug)]
pub struct Subscription {
    replay: VecDeque<Arc<EntryChanges>>,
    receiver: broadcast::Receiver<Notice>,
    /// The smallest index not delivered yet.
    next: u64,
    queue: usize,
    closed: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Subscription {
    /// The smallest index not delivered yet: where a resumed watch starts.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// The next entry's changes, waiting for one to be applied. Cancel-safe.
    pub async fn next(&mut self) -> Next {
        if let Some(entry) = self.replay.pop_front() {
            self.next = entry.index + 1;
            return Next::Entry(entry);
        }
        loop {
            let notice = tokio::select! {
                () = self.closed.cancelled() => {
                    return Next::Dropped(format!(
                        "the node is shutting down; watch another member with from={}",
                        self.next
                    ));
                }
                notice = self.receiver.recv() => notice,
            };
            match notice {
                // Entries the replay delivered already come again live.
                Ok(Notice::Entry(entry)) if entry.index < self.next => {}
                Ok(Notice::Entry(entry)) => {
                    self.next = entry.index + 1;
                    return Next::Entry(entry);
                }
                Ok(Notice::Reset { oldest }) if oldest > self.next => {
                    return Next::Dropped(format!(
                        "the node installed a snapshot and has no changes before index {oldest}; \
                         read the current state and watch from there"
                    ));
                }
                Ok(Notice::Reset { .. }) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Next::Dropped(format!(
                        "the watcher fell more than {} entries behind; resume with from={}",
                        self.queue, self.next
                    ));
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Next::Dropped(format!(
                        "the node stopped its watch feed; watch another member with from={}",
                        self.next
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(index: u64) -> EntryChanges {
        EntryChanges::new(
            index,
            vec![Change {
                key: format!("k{index}").into_bytes(),
                value: Some(b"v".to_vec()),
            }],
        )
    }

    async fn index_of(subscription: &mut Subscription) -> u64 {
        match subscription.next().await {
            Next::Entry(entry) => entry.index,
            Next::Dropped(reason) => panic!("dropped: {reason}"),
        }
    }

    #[tokio::test]
    async fn replay_then_live_without_gap_or_duplicate() {
        let hub = WatchHub::new(WatchLimits::default());
        hub.reset(0);
        hub.publish(vec![changes(1), changes(2)], 2);
        let mut from_start = hub.subscribe(Some(1)).expect("index 1 is covered");
        let mut live = hub
            .subscribe(None)
            .expect("a watcher slot and a covered index");
        hub.publish(vec![changes(3)], 4);
        assert_eq!(index_of(&mut from_start).await, 1);
        assert_eq!(index_of(&mut from_start).await, 2);
        assert_eq!(index_of(&mut from_start).await, 3);
        assert_eq!(index_of(&mut live).await, 3);
        assert_eq!(live.next_index(), 4);
    }

    #[tokio::test]
    async fn a_lagging_watcher_is_dropped_and_apply_goes_on() {
        let hub = WatchHub::new(WatchLimits {
            queue_entries: 2,
            ..WatchLimits::default()
        });
        let mut slow = hub
            .subscribe(None)
            .expect("a watcher slot and a covered index");
        for index in 1..=10 {
            hub.publish(vec![changes(index)], index);
        }
        match slow.next().await {
            Next::Dropped(reason) => assert!(reason.contains("from=1"), "{reason}"),
            Next::Entry(entry) => panic!("got entry {}", entry.index),
        }
    }

    #[test]
    fn too_old_from_and_too_many_watchers_are_refused() {
        let hub = WatchHub::new(WatchLimits {
            max_watchers: 1,
            ..WatchLimits::default()
        });
        hub.reset(7);
        assert_eq!(
            hub.subscribe(Some(3)).expect_err("refused"),
            SubscribeError::Gone { oldest: 8 }
        );
        let first = hub
            .subscribe(None)
            .expect("a watcher slot and a covered index");
        assert_eq!(
            hub.subscribe(None).expect_err("refused"),
            SubscribeError::TooMany { max: 1 }
        );
        drop(first);
        assert!(hub.subscribe(None).is_ok());
    }

    #[tokio::test]
    async fn a_snapshot_install_drops_watchers_that_would_miss_changes() {
        let hub = WatchHub::new(WatchLimits::default());
        let mut watcher = hub.subscribe(Some(1)).expect("index 1 is covered");
        hub.reset(100);
        assert!(matches!(watcher.next().await, Next::Dropped(_)));
    }
}
