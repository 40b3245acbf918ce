//! The state a guest reads: the committed key-value state behind the
//! [`StateRead`] trait, and the [`Overlay`] of writes not yet committed.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

/// Pending writes: `Some(value)` sets a key, `None` deletes it.
pub type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Read access to the committed state, in key order.
///
/// Implementations must be safe to call from the apply thread while other
/// threads read; an `Err` is a host fault (the node stops applying), never a
/// guest-visible result.
pub trait StateRead: Send + Sync + 'static {
    /// The value under `key`.
    ///
    /// # Errors
    /// When the underlying storage fails.
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>>;

    /// Up to `limit` entries with `start <= key` and `key < end` (when given),
    /// in ascending key order, stopping after the entry that brings the
    /// bytes of the keys and values gathered to `max_bytes` or more.
    ///
    /// # Errors
    /// When the underlying storage fails.
    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

/// An in-memory committed state, for tests, benchmarks and tools.
#[derive(Debug, Default)]
pub struct MemoryState(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

impl MemoryState {
    /// Commits `overlay`.
    pub fn commit(&self, overlay: Overlay) {
        let mut map = self.lock();
        for (key, value) in overlay {
            match value {
                Some(value) => map.insert(key, value),
                None => map.remove(&key),
            };
        }
    }

    /// A copy of every entry.
    pub fn entries(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StateRead for MemoryState {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let map = self.lock();
        let end = end.map_or(std::ops::Bound::Unbounded, |e| {
            std::ops::Bound::Excluded(e.to_vec())
        });
        let mut bytes = 0;
        Ok(map
            .range((std::ops::Bound::Included(start.to_vec()), end))
            .take(limit)
            .take_while(|(k, v)| {
                let more = bytes < max_bytes;
                bytes += k.len() + v.len();
                more
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
