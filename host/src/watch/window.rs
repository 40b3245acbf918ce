//! [`Window`]: the bounded, in-memory record of recent entries' changes
//! that a watcher's `from` replays.

use std::collections::VecDeque;
use std::sync::Arc;

use super::EntryChanges;

/// The changes of the most recent entries, bounded by count and by bytes.
///
/// It covers every index from [`Window::oldest`] on: an entry that changed
/// nothing is not stored, but it is covered all the same. Evicting an entry
/// moves `oldest` past it.
#[derive(Debug)]
pub struct Window {
    entries: VecDeque<Arc<EntryChanges>>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    oldest: u64,
}

impl Window {
    /// An empty window that covers the indexes from `oldest` on and keeps at
    /// most `max_entries` entries and `max_bytes` bytes of changes.
    pub fn new(max_entries: usize, max_bytes: usize, oldest: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            oldest,
        }
    }

    /// The smallest `from` the window can replay completely.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes of changes it holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets every entry; the window covers the indexes from `oldest` on
    /// (after a snapshot install, whose changes no entry describes).
    pub fn reset(&mut self, oldest: u64) {
        self.entries.clear();
        self.bytes = 0;
        self.oldest = oldest;
    }

    /// Records an entry, whose index is above every one recorded before,
    /// then evicts the oldest entries until both bounds hold again.
    pub fn push(&mut self, entry: Arc<EntryChanges>) {
        if entry.changes.is_empty() {
            return;
        }
        self.bytes += entry.bytes;
        self.entries.push_back(entry);
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some(evicted) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= evicted.bytes;
            self.oldest = self.oldest.max(evicted.index + 1);
        }
    }

    /// The recorded entries with an index `>= from`, in index order.
    ///
    /// # Errors
    /// [`Window::oldest`] when `from` is below it: some of those changes
    /// are no longer kept.
    pub fn since(&self, from: u64) -> Result<Vec<Arc<EntryChanges>>, u64> {
        if from < self.oldest {
            return Err(self.oldest);
        }
        let start = self.entries.partition_point(|e| e.index < from);
        Ok(self.entries.range(start..).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Change;

    fn entry(index: u64, key: &str, value_len: usize) -> Arc<EntryChanges> {
        Arc::new(EntryChanges::new(
            index,
            vec![Change {
                key: key.as_bytes().to_vec(),
                value: Some(vec![b'v'; value_len]),
            }],
        ))
    }

    fn indexes(entries: &[Arc<EntryChanges>]) -> Vec<u64> {
        entries.iter().map(|e| e.index).collect()
    }

    #[test]
    fn replay_starts_at_from_and_covers_entries_without_changes() {
        let mut window = Window::new(10, 1 << 20, 5);
        for index in [5, 7, 8] {
            window.push(entry(index, "k", 1));
        }
        window.push(Arc::new(EntryChanges::new(9, Vec::new())));
        assert_eq!(window.len(), 3);
        assert_eq!(indexes(&window.since(5).expect("covered")), [5, 7, 8]);
        assert_eq!(indexes(&window.since(6).expect("covered")), [7, 8]);
        assert_eq!(
            indexes(&window.since(9).expect("covered")),
            Vec::<u64>::new()
        );
        assert_eq!(window.since(4).expect_err("not covered"), 5);
    }

    #[test]
    fn count_bound_evicts_the_oldest_and_moves_oldest_past_it() {
        let mut window = Window::new(2, 1 << 20, 1);
        for index in 1..=4 {
            window.push(entry(index, "k", 1));
        }
        assert_eq!(window.len(), 2);
        assert_eq!(window.oldest(), 3);
        assert_eq!(window.since(2).expect_err("not covered"), 3);
        assert_eq!(indexes(&window.since(3).expect("covered")), [3, 4]);
    }

    #[test]
    fn byte_bound_evicts_until_the_bytes_fit() {
        let one = entry(1, "k", 100).bytes;
        let mut window = Window::new(100, 2 * one, 1);
        for index in 1..=3 {
            window.push(entry(index, "k", 100));
        }
        assert_eq!(window.len(), 2);
        assert_eq!(window.bytes(), 2 * one);
        assert_eq!(window.oldest(), 2);
        // An entry larger than the whole bound is not kept at all.
        window.push(entry(4, "k", 10 * one));
        assert!(window.is_empty());
        assert_eq!(window.bytes(), 0);
        assert_eq!(window.oldest(), 5);
    }

    #[test]
    fn reset_forgets_everything_before_the_new_oldest() {
        let mut window = Window::new(10, 1 << 20, 1);
        window.push(entry(1, "k", 1));
        window.reset(50);
        assert!(window.is_empty());
        assert_eq!(window.since(49).expect_err("not covered"), 50);
        assert!(window.since(50).expect("covered").is_empty());
    }
}
