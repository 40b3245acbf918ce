//! `LogStore`: openraft's log storage. The entries are in a [`LogFile`];
//! the vote, the committed log id, the purge point and the node id are
//! small records in the node's sled database.
//!
//! An append costs one `pwrite` and one sync of the log file and nothing
//! else; sled is synced only for a vote, a purge and the node id, and in the
//! background for the state (see [`Disk`]).
#![allow(
    clippy::result_large_err,
    reason = "openraft's StorageError is the error type its storage traits require"
)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError};
use serde::Serialize;
use tokio::sync::watch;

use super::disk::{Disk, read_meta};
use super::early::{EarlyReplication, early_request};
use super::log_file::{LogFile, LogFileError, LogSync};
use super::{NodeId, TypeConfig, typ};

/// The sled tree that held the log's entries before they moved to the log
/// file; a data directory that still has one is moved over on open.
const OLD_LOG_TREE: &str = "raft_log";
/// Tree holding the small pieces of Raft state, each rmp-serde encoded.
const META_TREE: &str = "raft_meta";

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_NODE_ID: &[u8] = b"node_id";

/// One of openraft's `StorageIOError` constructors: it names the subject
/// (logs, vote, store) and the verb of a failed operation.
type ToIoError = fn(AnyError) -> StorageIOError<NodeId>;

/// openraft's log storage.
///
/// Guarantees openraft relies on:
/// - `append` reports success only once the entries are synced in the log
///   file, and `save_vote` only after a flush of sled: an acknowledged entry
///   or vote survives a crash.
/// - The log has no holes: `purge` records `last_purged` durably before it
///   forgets entries, and `truncate` is durable before it returns (see
///   [`LogFile`] for how a crash part way is finished on open).
/// - `save_committed` does not sync: openraft tolerates an older value after
///   a crash (it only bounds what is re-applied at startup).
/// - `get_log_state` reports `last_log_id = last_purged` when the log holds
///   no entry after the purge point.
///
/// Any I/O or decoding failure is returned as a [`typ::StorageError`],
/// which stops the Raft node: it never turns into an acknowledgement.
#[derive(Debug, Clone)]
pub struct LogStore {
    disk: Disk,
    file: LogFile,
    meta: sled::Tree,
    /// Counts appends whose sync has completed, so that a batcher with a
    /// pipeline deeper than one entry can propose the next entry as soon as
    /// the previous one is durable here.
    appends_flushed: Arc<watch::Sender<u64>>,
    /// The vote and committed id last saved, kept to build early requests.
    known: Arc<Mutex<Known>>,
    /// Sends the leader's new entries to the followers while they are
    /// synced here; set once Raft runs.
    early: Arc<OnceLock<EarlyReplication>>,
}

/// What the log store was last told, in memory.
#[derive(Debug, Default)]
struct Known {
    vote: Option<typ::Vote>,
    committed: Option<typ::LogId>,
}

/// A read-only view of the log for openraft's replication tasks; cloning it
/// is cheap (it shares the [`LogFile`] with the [`LogStore`]).
#[derive(Debug, Clone)]
pub struct LogReader {
    file: LogFile,
}

impl LogStore {
    /// The committed index last saved by openraft, for status reports; `None`
    /// when nothing is committed yet.
    pub fn committed_index(&self) -> Option<u64> {
        self.known().committed.map(|log_id| log_id.index)
    }

    /// A receiver of the number of appends synced so far by this store.
    pub fn appends_flushed(&self) -> watch::Receiver<u64> {
        self.appends_flushed.subscribe()
    }

    /// The log file (its sync histogram is in `/metrics`).
    pub fn file(&self) -> &LogFile {
        &self.file
    }

    /// Opens (or creates) the log: its entries in `dir`, its small records
    /// in `disk`. A log that an older version kept in sled is moved to `dir`
    /// first.
    ///
    /// # Errors
    ///
    /// A storage error when sled or the log file cannot be opened or read.
    pub fn open(disk: &Disk, dir: &Path, sync: LogSync) -> Result<Self, typ::StorageError> {
        let meta = disk
            .db()
            .open_tree(META_TREE)
            .map_err(|e| StorageIOError::<NodeId>::read(&e))?;
        let purged: Option<typ::LogId> =
            read_meta(&meta, KEY_LAST_PURGED, StorageIOError::read_logs)?;
        let purged = purged.map(|id| id.index);
        move_old_log(disk, dir, purged, sync).map_err(|e| StorageIOError::read_logs(&e))?;
        let file = LogFile::open(dir, purged, sync).map_err(|e| StorageIOError::read_logs(&e))?;
        let known = Known {
            vote: read_meta(&meta, KEY_VOTE, StorageIOError::read_vote)?,
            committed: read_meta(&meta, KEY_COMMITTED, StorageIOError::read)?,
        };
        Ok(Self {
            disk: disk.clone(),
            file,
            meta,
            appends_flushed: Arc::new(watch::Sender::new(0)),
            known: Arc::new(Mutex::new(known)),
            early: Arc::default(),
        })
    }

    /// From now on, the leader's own entries also go to the followers while
    /// they are synced here (see [`super::early`]).
    pub fn replicate_early(&self, early: EarlyReplication) {
        let _ = self.early.set(early);
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node id persisted by [`LogStore::save_node_id`], or `None` on a
    /// node's first boot.
    ///
    /// # Errors
    ///
    /// A storage error when the stored id cannot be read or decoded; the
    /// caller must not treat that as a first boot.
    pub fn node_id(&self) -> Result<Option<NodeId>, typ::StorageError> {
        read_meta(&self.meta, KEY_NODE_ID, StorageIOError::read)
    }

    /// Persists this node's id; returns once it is flushed to disk.
    ///
    /// # Errors
    ///
    /// A storage error when sled cannot write or flush.
    pub async fn save_node_id(&self, id: NodeId) -> Result<(), typ::StorageError> {
        write_meta(&self.meta, KEY_NODE_ID, &id, StorageIOError::write)?;
        self.flush(StorageIOError::write).await
    }

    fn last_purged(&self) -> Result<Option<typ::LogId>, typ::StorageError> {
        read_meta(&self.meta, KEY_LAST_PURGED, StorageIOError::read_logs)
    }

    /// Flushes sled (every tree), mapping a failure with `to_err` so it
    /// names what was being made durable.
    async fn flush(&self, to_err: ToIoError) -> Result<(), typ::StorageError> {
        self.disk
            .flush()
            .await
            .map_err(|e| to_err(AnyError::new(&e)))?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<typ::Entry>, typ::StorageError> {
        read_entries(&self.file, range)
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<typ::Entry>, typ::StorageError> {
        read_entries(&self.file, range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, typ::StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last_entry = match self.file.last_index() {
            Some(index) => read_entries(&self.file, index..=index)?
                .pop()
                .map(|entry| entry.log_id),
            None => None,
        };
        // Entries at or below the purge point are never reported.
        let last_log_id = match (last_entry, last_purged_log_id) {
            (Some(entry), Some(purged)) if entry.index <= purged.index => Some(purged),
            (Some(entry), _) => Some(entry),
            (None, purged) => purged,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            file: self.file.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &typ::Vote) -> Result<(), typ::StorageError> {
        write_meta(&self.meta, KEY_VOTE, vote, StorageIOError::write_vote)?;
        self.flush(StorageIOError::write_vote).await?;
        self.known().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<typ::Vote>, typ::StorageError> {
        read_meta(&self.meta, KEY_VOTE, StorageIOError::read_vote)
    }

    /// Records the committed log id. It is not flushed on its own: sled's
    /// next flush covers it, and openraft tolerates an older value after a
    /// crash (it only bounds what is re-applied at startup).
    async fn save_committed(
        &mut self,
        committed: Option<typ::LogId>,
    ) -> Result<(), typ::StorageError> {
        self.known().committed = committed;
        match committed {
            Some(log_id) => write_meta(&self.meta, KEY_COMMITTED, &log_id, StorageIOError::write),
            None => self
                .meta
                .remove(KEY_COMMITTED)
                .map(drop)
                .map_err(|e| StorageIOError::write(&e).into()),
        }
    }

    async fn read_committed(&mut self) -> Result<Option<typ::LogId>, typ::StorageError> {
        read_meta(&self.meta, KEY_COMMITTED, StorageIOError::read)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), typ::StorageError>
    where
        I: IntoIterator<Item = typ::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<typ::Entry> = entries.into_iter().collect();
        if let Some(early) = self.early.get() {
            let request = {
                let known = self.known();
                early_request(early.id(), known.vote.as_ref(), known.committed, &entries)
            };
            if let Some(request) = request {
                early.send(request).await;
            }
        }
        // Written and synced on this thread: openraft's core waits for the
        // callback anyway, and a hand-off to another thread costs more than
        // the sync itself.
        match self.file.append(entries) {
            Ok(()) => {
                self.appends_flushed.send_modify(|n| *n += 1);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let error = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(error.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: typ::LogId) -> Result<(), typ::StorageError> {
        // Durable before it returns: a truncated suffix must not come back
        // after a crash, or the log could mix entries of two leaders.
        self.file
            .truncate(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: typ::LogId) -> Result<(), typ::StorageError> {
        // Record the purge point durably first: `LogFile::open` drops what
        // a deletion cut short left behind. The same flush makes the state
        // durable up to at least `log_id` (it is applied before a purge), so
        // the entries it forgets are never needed to rebuild the state.
        write_meta(
            &self.meta,
            KEY_LAST_PURGED,
            &log_id,
            StorageIOError::write_logs,
        )?;
        self.flush(StorageIOError::write_logs).await?;
        self.file
            .purge(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

fn read_entries(
    file: &LogFile,
    range: impl RangeBounds<u64>,
) -> Result<Vec<typ::Entry>, typ::StorageError> {
    file.read_range(range)
        .map_err(|e| StorageIOError::read_logs(&e).into())
}

/// Moves the entries of a log kept in sled (by an older version) to the log
/// file in `dir`, then drops the sled tree. Starts over if a crash cut a
/// move short: the file is only trusted once the tree is gone.
fn move_old_log(
    disk: &Disk,
    dir: &Path,
    purged: Option<u64>,
    sync: LogSync,
) -> Result<(), LogFileError> {
    let db = disk.db();
    let names = db.tree_names();
    if !names
        .iter()
        .any(|name| name.as_ref() == OLD_LOG_TREE.as_bytes())
    {
        return Ok(());
    }
    let tree = db.open_tree(OLD_LOG_TREE).map_err(std::io::Error::other)?;
    if tree.is_empty() {
        drop(tree);
        db.drop_tree(OLD_LOG_TREE).map_err(std::io::Error::other)?;
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let file = LogFile::open(dir, purged, sync)?;
    for item in tree.iter() {
        let (_, value) = item.map_err(std::io::Error::other)?;
        let entry: typ::Entry = rmp_serde::from_slice(&value)
            .map_err(|e| LogFileError::Damaged(format!("an entry of the old log: {e}")))?;
        if purged.is_some_and(|p| entry.log_id.index <= p) {
            continue;
        }
        file.append([entry])?;
    }
    drop(tree);
    db.drop_tree(OLD_LOG_TREE).map_err(std::io::Error::other)?;
    db.flush().map_err(std::io::Error::other)?;
    Ok(())
}

/// Encodes `value` and stores it under `key` (not flushed).
fn write_meta<T: Serialize>(
    meta: &sled::Tree,
    key: &[u8],
    value: &T,
    to_err: ToIoError,
) -> Result<(), typ::StorageError> {
    let bytes = rmp_serde::to_vec(value).map_err(|e| to_err(AnyError::new(&e)))?;
    meta.insert(key, bytes)
        .map(drop)
        .map_err(|e| to_err(AnyError::new(&e)).into())
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership};

    use super::*;
    use crate::raft::{NodeInfo, Op, Request};

    fn log_id(term: u64, index: u64) -> typ::LogId {
        LogId::new(CommittedLeaderId::new(term, 0), index)
    }

    fn entry(term: u64, index: u64) -> typ::Entry {
        typ::Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Request {
                time_ms: index,
                ops: vec![Op::Apply(format!("op {index}").into_bytes())],
            }),
        }
    }

    fn open(dir: &tempfile::TempDir) -> anyhow::Result<(sled::Db, LogStore)> {
        let disk = Disk::reopen(&dir.path().join("db"))?;
        let store = LogStore::open(&disk, &dir.path().join("log"), LogSync::Range)?;
        Ok((disk.db().clone(), store))
    }

    /// A store holding entries 1..=10 of term 1.
    async fn ten_entries(dir: &tempfile::TempDir) -> anyhow::Result<(sled::Db, LogStore)> {
        let (db, mut store) = open(dir)?;
        store.blocking_append((1..=10).map(|i| entry(1, i))).await?;
        Ok((db, store))
    }

    fn indexes(entries: &[typ::Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    async fn state(store: &mut LogStore) -> anyhow::Result<(Option<u64>, Option<u64>)> {
        let state = store.get_log_state().await?;
        Ok((
            state.last_purged_log_id.map(|id| id.index),
            state.last_log_id.map(|id| id.index),
        ))
    }

    #[tokio::test]
    async fn empty_store_has_no_state() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, mut store) = open(&dir)?;
        assert_eq!(state(&mut store).await?, (None, None));
        assert_eq!(store.read_vote().await?, None);
        assert_eq!(store.read_committed().await?, None);
        assert_eq!(store.node_id()?, None);
        assert!(store.try_get_log_entries(0..100).await?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn appended_entries_read_back_identically() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, mut store) = open(&dir)?;
        let membership = typ::Entry {
            log_id: log_id(1, 3),
            payload: EntryPayload::Membership(Membership::new(
                vec![[1, 2].into()],
                std::collections::BTreeMap::from([
                    (1, NodeInfo::default()),
                    (2, NodeInfo::default()),
                ]),
            )),
        };
        let written = vec![
            typ::Entry {
                log_id: log_id(1, 1),
                payload: EntryPayload::Blank,
            },
            entry(1, 2),
            membership,
            entry(1, 4),
        ];
        store.blocking_append(written.clone()).await?;

        assert_eq!(store.try_get_log_entries(..).await?, written);
        assert_eq!(store.try_get_log_entries(2..4).await?, written[1..3]);
        assert_eq!(store.try_get_log_entries(2..=4).await?, written[1..]);
        assert!(store.try_get_log_entries(3..3).await?.is_empty());
        assert!(store.try_get_log_entries(5..).await?.is_empty());
        assert_eq!(state(&mut store).await?, (None, Some(4)));

        // The reader shares the tree, including later appends.
        let mut reader = store.get_log_reader().await;
        store.blocking_append([entry(2, 5)]).await?;
        assert_eq!(indexes(&reader.try_get_log_entries(4..).await?), [4, 5]);
        Ok(())
    }

    #[tokio::test]
    async fn truncate_removes_the_suffix_from_the_index_on() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, mut store) = ten_entries(&dir).await?;

        store.truncate(log_id(1, 11)).await?;
        assert_eq!(store.try_get_log_entries(..).await?.len(), 10);

        store.truncate(log_id(1, 6)).await?;
        assert_eq!(
            indexes(&store.try_get_log_entries(..).await?),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(state(&mut store).await?, (None, Some(5)));

        // A new leader's entries replace the truncated ones.
        store.blocking_append([entry(2, 6)]).await?;
        let last = store.try_get_log_entries(6..).await?;
        assert_eq!(last, [entry(2, 6)]);

        store.truncate(log_id(0, 0)).await?;
        assert!(store.try_get_log_entries(..).await?.is_empty());
        assert_eq!(state(&mut store).await?, (None, None));
        Ok(())
    }

    #[tokio::test]
    async fn purge_removes_the_prefix_and_remembers_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (_db, mut store) = ten_entries(&dir).await?;

        store.purge(log_id(1, 5)).await?;
        assert_eq!(
            indexes(&store.try_get_log_entries(..).await?),
            [6, 7, 8, 9, 10]
        );
        assert_eq!(state(&mut store).await?, (Some(5), Some(10)));

        // Purging everything leaves last_log_id at the purge point.
        store.purge(log_id(1, 10)).await?;
        assert!(store.try_get_log_entries(..).await?.is_empty());
        assert_eq!(state(&mut store).await?, (Some(10), Some(10)));

        // Purging past the last entry (after installing a snapshot)
        // advances both.
        store.purge(log_id(3, 20)).await?;
        let got = store.get_log_state().await?;
        assert_eq!(got.last_purged_log_id, Some(log_id(3, 20)));
        assert_eq!(got.last_log_id, Some(log_id(3, 20)));

        store.blocking_append([entry(3, 21)]).await?;
        assert_eq!(state(&mut store).await?, (Some(20), Some(21)));
        Ok(())
    }

    #[tokio::test]
    async fn vote_committed_purge_and_node_id_survive_a_restart() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let vote = openraft::Vote::new_committed(7, 3);
        {
            let (_db, mut store) = ten_entries(&dir).await?;
            store.save_vote(&vote).await?;
            store.save_committed(Some(log_id(1, 8))).await?;
            store.purge(log_id(1, 4)).await?;
            store.save_node_id(3).await?;
        }
        let (_db, mut store) = open(&dir)?;
        assert_eq!(store.read_vote().await?, Some(vote));
        assert_eq!(store.read_committed().await?, Some(log_id(1, 8)));
        assert_eq!(store.node_id()?, Some(3));
        assert_eq!(state(&mut store).await?, (Some(4), Some(10)));
        assert_eq!(
            indexes(&store.try_get_log_entries(..).await?),
            [5, 6, 7, 8, 9, 10]
        );

        store.save_committed(None).await?;
        assert_eq!(store.read_committed().await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn open_finishes_a_purge_cut_short_by_a_crash() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let (db, _store) = ten_entries(&dir).await?;
            // The purge point was recorded but the entries not yet forgotten.
            let meta = db.open_tree(META_TREE)?;
            meta.insert(KEY_LAST_PURGED, rmp_serde::to_vec(&log_id(1, 6))?)?;
            db.flush_async().await?;
        }
        let (_db, mut store) = open(&dir)?;
        assert_eq!(
            indexes(&store.try_get_log_entries(..).await?),
            [7, 8, 9, 10]
        );
        assert_eq!(state(&mut store).await?, (Some(6), Some(10)));
        Ok(())
    }

    #[tokio::test]
    async fn appends_are_counted_once_flushed_and_large_ones_read_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let big = typ::Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Normal(Request {
                time_ms: 1,
                ops: vec![Op::Apply(vec![0x5a; 300 << 10])],
            }),
        };
        {
            let (_db, mut store) = open(&dir)?;
            let flushed = store.appends_flushed();
            store.blocking_append([big.clone()]).await?;
            store.blocking_append([entry(1, 2), entry(1, 3)]).await?;
            assert_eq!(*flushed.borrow(), 2);
        }
        let (_db, mut store) = open(&dir)?;
        assert_eq!(store.try_get_log_entries(1..2).await?, [big]);
        assert_eq!(indexes(&store.try_get_log_entries(..).await?), [1, 2, 3]);
        Ok(())
    }

    #[tokio::test]
    async fn corrupt_meta_is_a_storage_error_not_a_panic() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (db, store) = ten_entries(&dir).await?;
        db.open_tree(META_TREE)?
            .insert(KEY_NODE_ID, &[0xc1u8][..])?;
        assert!(store.node_id().is_err());
        Ok(())
    }

    #[tokio::test]
    async fn a_log_kept_in_sled_moves_to_the_log_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let disk = Disk::reopen(&dir.path().join("db"))?;
            let old = disk.db().open_tree(OLD_LOG_TREE)?;
            for i in 1..=10u64 {
                old.insert(i.to_be_bytes(), rmp_serde::to_vec(&entry(1, i))?)?;
            }
            let meta = disk.db().open_tree(META_TREE)?;
            meta.insert(KEY_LAST_PURGED, rmp_serde::to_vec(&log_id(1, 3))?)?;
            disk.flush().await?;
        }
        let (db, mut store) = open(&dir)?;
        assert_eq!(
            indexes(&store.try_get_log_entries(..).await?),
            [4, 5, 6, 7, 8, 9, 10]
        );
        assert_eq!(store.try_get_log_entries(5..6).await?, [entry(1, 5)]);
        assert!(
            !db.tree_names()
                .iter()
                .any(|n| n.as_ref() == OLD_LOG_TREE.as_bytes())
        );
        drop((db, store));

        // Once moved, it stays moved.
        let (_db, mut store) = open(&dir)?;
        assert_eq!(state(&mut store).await?, (Some(3), Some(10)));
        Ok(())
    }
}
