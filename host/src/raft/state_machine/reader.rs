//! `StateReader`: what the API reads of the state machine — the active
//! guest, queries against whole apply calls, the state hash and the apply
//! counters.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};

use openraft::StorageIOError;

use super::keys::{GUEST, KEY_GUEST_HISTORY, SledState};
use super::snapshot::{KEY_SNAPSHOT, StoredSnapshot};
use super::{SwapRecord, read_err};
use crate::metrics::ApplyStats;
use crate::raft::disk::read_meta;
use crate::raft::snapshot_file::SnapshotDir;
use crate::raft::typ;
use crate::runtime::{Context, GuestInstance, GuestModule, HostFault, Outcome};

/// The guest that applies entries now, and a pool of instances for queries.
#[derive(Debug)]
pub struct ActiveGuest {
    /// The compiled module.
    pub module: GuestModule,
    /// The log index of the entry that activated it.
    pub since: u64,
    pub(super) queries: Mutex<Vec<GuestInstance>>,
}

impl ActiveGuest {
    /// The guest as `/status` and `GET /guest` show it.
    pub fn describe(&self) -> crate::proto::Guest {
        crate::proto::Guest {
            name: self.module.name().to_owned(),
            version: self.module.version().to_string(),
            hash: self.module.hash().to_owned(),
            since: self.since,
        }
    }
}

/// The fuel a query may use on an async worker thread before it moves to
/// the blocking pool: a few hundred microseconds of guest work at most.
pub const INLINE_QUERY_FUEL: u64 = 200_000;

/// How many idle query instances are kept per guest.
const QUERY_POOL: usize = 16;

/// What the API needs of the state machine: the active guest and read-only
/// queries against the applied state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StateReader {
    pub(super) state: SledState,
    pub(super) active: Arc<RwLock<Option<Arc<ActiveGuest>>>>,
    pub(super) stats: Arc<ApplyStats>,
    pub(super) gate: Arc<CommitGate>,
    pub(super) snapshots: sled::Tree,
    pub(super) snapshot_dir: SnapshotDir,
}

/// How often a query retries when an apply committed while it ran, before
/// it holds the apply back instead.
const OPTIMISTIC_READS: usize = 3;

/// Lets readers see the state between two apply calls, never in the middle
/// of one, without holding applies back in the common case: a sequence lock
/// (the epoch is odd while a commit runs; a read that saw it change runs
/// again) with a read-write lock as the fallback that guarantees progress.
#[derive(Debug, Default)]
pub(super) struct CommitGate {
    epoch: AtomicU64,
    lock: RwLock<()>,
}

impl CommitGate {
    /// Runs `commit` as one step for readers.
    pub(super) fn commit<R>(&self, commit: impl FnOnce() -> R) -> R {
        let _exclusive = self
            .lock
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.epoch.fetch_add(1, SeqCst);
        let result = commit();
        self.epoch.fetch_add(1, SeqCst);
        result
    }

    /// Runs `read` against a state no commit changed while it ran.
    pub(super) fn read<R>(&self, mut read: impl FnMut() -> R) -> R {
        for _ in 0..OPTIMISTIC_READS {
            let before = self.epoch.load(SeqCst);
            if before.is_multiple_of(2) {
                let result = read();
                if self.epoch.load(SeqCst) == before {
                    return result;
                }
            }
        }
        let _shared = self
            .lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        read()
    }
}

impl StateReader {
    /// Counters of the apply path.
    pub fn apply_stats(&self) -> &ApplyStats {
        &self.stats
    }

    /// The active guest, if one has been installed.
    pub fn active(&self) -> Option<Arc<ActiveGuest>> {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs a read-only query through the active guest at `time_ms`.
    ///
    /// # Errors
    /// [`HostFault`] when no guest is active or the host failed.
    pub fn query(&self, time_ms: u64, request: &[u8]) -> Result<Outcome, HostFault> {
        self.run_query(time_ms, request, None)
    }

    /// Runs a query without holding up the async runtime: inline for its
    /// first [`INLINE_QUERY_FUEL`] (almost every query finishes there), and
    /// a query that needs more runs again from the start on the blocking
    /// pool with the full budget, so that long queries cannot delay
    /// heartbeats. Queries write nothing, so running one twice is harmless.
    ///
    /// # Errors
    /// [`HostFault`] when no guest is active or the host failed.
    pub async fn query_off_runtime(
        &self,
        time_ms: u64,
        request: &[u8],
    ) -> Result<Outcome, HostFault> {
        self.query_sliced(time_ms, request, INLINE_QUERY_FUEL).await
    }

    async fn query_sliced(
        &self,
        time_ms: u64,
        request: &[u8],
        slice: u64,
    ) -> Result<Outcome, HostFault> {
        let quick = self.run_query(time_ms, request, Some(slice))?;
        if quick.fuel_used < slice {
            return Ok(quick);
        }
        let reader = self.clone();
        let request = request.to_vec();
        tokio::task::spawn_blocking(move || reader.query(time_ms, &request))
            .await
            .map_err(|e| HostFault(format!("the query task failed: {e}")))?
    }

    /// Runs a query with `fuel`, or the full per-call budget.
    fn run_query(
        &self,
        time_ms: u64,
        request: &[u8],
        fuel: Option<u64>,
    ) -> Result<Outcome, HostFault> {
        let active = self
            .active()
            .ok_or_else(|| HostFault("no guest is active yet".into()))?;
        let pooled = active
            .queries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut instance =
            pooled.unwrap_or_else(|| active.module.instantiate(Arc::new(self.state.clone())));
        let ctx = Context {
            index: 0,
            position: 0,
            time_ms,
        };
        let outcome = self.gate.read(|| match fuel {
            Some(fuel) => instance.query_with_fuel(ctx, request, fuel),
            None => instance.query(ctx, request),
        })?;
        let mut pool = active
            .queries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < QUERY_POOL {
            pool.push(instance);
        }
        Ok(outcome)
    }

    /// Every successful guest swap, oldest first.
    ///
    /// # Errors
    /// When the state cannot be read.
    pub fn guest_history(&self) -> Result<Vec<SwapRecord>, typ::StorageError> {
        Ok(read_meta(
            &self.state.0,
            KEY_GUEST_HISTORY,
            StorageIOError::read_state_machine,
        )?
        .unwrap_or_default())
    }

    /// A SHA-256 over every guest key and value, in key order: equal on two
    /// replicas exactly when they hold the same state.
    ///
    /// # Errors
    /// When sled fails to read.
    pub fn state_hash(&self) -> Result<String, sled::Error> {
        self.gate.read(|| {
            let mut hasher = StateHasher::default();
            for item in self.state.0.range(vec![GUEST]..vec![GUEST + 1]) {
                let (k, v) = item?;
                hasher.entry(&k, &v);
            }
            Ok(hasher.finish())
        })
    }

    /// The current snapshot's metadata and its file, open for reading (it
    /// stays readable even when a newer snapshot replaces it meanwhile).
    ///
    /// # Errors
    /// When the snapshot record cannot be read or its file opened.
    pub fn current_snapshot(
        &self,
    ) -> Result<Option<(typ::SnapshotMeta, std::fs::File)>, typ::StorageError> {
        // A newer snapshot may replace the file between reading the record
        // and opening it; the record read next names the newer one.
        let mut tries = 0;
        loop {
            let Some(stored) = read_meta::<StoredSnapshot>(
                &self.snapshots,
                KEY_SNAPSHOT,
                StorageIOError::read_state_machine,
            )?
            else {
                return Ok(None);
            };
            match std::fs::File::open(self.snapshot_dir.path_of(&stored.file)) {
                Ok(file) => return Ok(Some((stored.meta, file))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 10 => tries += 1,
                Err(e) => return Err(read_err(e)),
            }
        }
    }
}

/// The state hash: a SHA-256 over every guest entry (keys as stored, with
/// their namespace byte), fed in key order, lengths first.
#[derive(Debug, Default)]
pub struct StateHasher(sha2::Sha256);

impl StateHasher {
    /// Adds one state-tree entry; host entries are skipped, so a reader of a
    /// snapshot file can feed it every entry.
    pub fn entry(&mut self, key: &[u8], value: &[u8]) {
        use sha2::Digest as _;
        if key.first() != Some(&GUEST) {
            return;
        }
        self.0.update((key.len() as u64).to_le_bytes());
        self.0.update(key);
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value);
    }

    /// The hash, in hex.
    pub fn finish(self) -> String {
        use sha2::Digest as _;
        hex::encode(self.0.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::state_machine::testing::*;
    use openraft::storage::{RaftSnapshotBuilder as _, RaftStateMachine as _};

    /// A query that needs more than the inline fuel runs again on the
    /// blocking pool and answers as if it had run once with the full budget.
    #[tokio::test]
    async fn a_query_past_its_inline_fuel_gets_the_full_budget() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let sm = used_state(&dir).await?;
        let reader = sm.reader();
        let get = guest_kv::command::Command::Get { key: b"k" }.encode();

        let full = reader.query(3, &get)?;
        assert!(full.result.is_ok(), "{:?}", full.result);
        // Too little fuel to answer inline: the slice alone runs out.
        let slice = full.fuel_used / 2;
        let starved = reader.run_query(3, &get, Some(slice))?;
        assert_eq!(starved.fuel_used, slice);
        assert!(starved.result.is_err(), "{:?}", starved.result);
        // The sliced query falls back to the full budget.
        let sliced = reader.query_sliced(3, &get, slice).await?;
        assert_eq!(sliced, full);
        // With enough fuel it answers inline, the same way.
        assert_eq!(reader.query_off_runtime(3, &get).await?, full);
        Ok(())
    }

    /// The reader opens the snapshot the state machine built last.
    #[tokio::test]
    async fn the_reader_opens_the_current_snapshot() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut sm = used_state(&dir).await?;
        let reader = sm.reader();
        assert!(reader.current_snapshot()?.is_none());
        let built = sm.get_snapshot_builder().await.build_snapshot().await?;
        let (meta, mut file) = reader
            .current_snapshot()?
            .ok_or_else(|| anyhow::anyhow!("no current snapshot"))?;
        assert_eq!(meta, built.meta);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes)?;
        let mut hasher = StateHasher::default();
        for (key, value) in entries_of(&bytes)? {
            hasher.entry(&key, &value);
        }
        assert_eq!(hasher.finish(), reader.state_hash()?);
        Ok(())
    }
}
