//! `StateMachineStore`: applies committed entries through the active guest
//! and keeps the host-owned state in the sled tree `state`.
//!
//! Tree layout:
//! - `0x00` + name: host metadata — the redo record (last applied log id,
//!   membership, last entry time; see [`super::redo`]), the active guest's
//!   hash and module bytes, staged modules and the swap history;
//! - `0x01` + key: the guest's keys.
//!
//! Each `apply` call runs every entry's operations through one guest
//! instance; its write overlay and the host's writes are recorded in one redo
//! record together with last-applied and membership, then applied: a crash
//! never applies an entry twice or half. Nothing here syncs — the log is the
//! durable record, and the next log flush covers the state too. Queries see
//! whole apply calls only.
//!
//! Snapshots are files (see [`super::snapshot_file`]) holding the whole tree,
//! so they carry the active guest too. They are written, checked and
//! installed one entry at a time on blocking threads; the `snapshot` tree
//! names the current one.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::disk::{Disk, read_meta};
use super::redo::{self, RedoHead, Write};
use super::snapshot_file::{self, SnapshotDir, SnapshotFile};
use super::{Op, OpOutput, OpResult, Request, Response, TypeConfig, typ};
use crate::metrics::ApplyStats;
use crate::runtime::{
    Context, GuestInstance, GuestModule, GuestRuntime, HostFault, Outcome, StateRead,
};
use crate::watch::{EntryChanges, WatchHub};

const GUEST: u8 = 0x01;
/// The sled tree that holds the state.
pub const STATE_TREE: &str = "state";
const KEY_GUEST_HASH: &[u8] = b"\0guest/hash";
const KEY_GUEST_MODULE: &[u8] = b"\0guest/module";
const KEY_GUEST_SINCE: &[u8] = b"\0guest/since";
const KEY_GUEST_HISTORY: &[u8] = b"\0guest/history";
const PREFIX_STAGED: &[u8] = b"\0staged/";
const KEY_STAGED_ORDER: &[u8] = b"\0guest/staged-order";

/// The most staged modules kept. Staging one more drops the one staged
/// earliest; a successful activation drops the activated module and every
/// one staged before it. Both depend only on the log, so every replica
/// keeps the same ones.
pub const MAX_STAGED: usize = 4;
/// The current snapshot's [`StoredSnapshot`], in the `snapshot` tree.
const KEY_SNAPSHOT: &[u8] = b"current-file";
/// Where earlier versions kept the current snapshot whole ([`InlineSnapshot`]).
const KEY_INLINE_SNAPSHOT: &[u8] = b"current";

/// The guest keys of the state tree, as the runtime's [`StateRead`].
#[derive(Debug, Clone)]
pub struct SledState(sled::Tree);

fn guest_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(GUEST);
    k.extend_from_slice(key);
    k
}

impl StateRead for SledState {
    fn get(&self, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.0.get(guest_key(key))?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let start = guest_key(start);
        let end = end.map_or_else(|| vec![GUEST + 1], guest_key);
        let mut entries = Vec::new();
        let mut bytes = 0;
        for item in self.0.range(start..end).take(limit) {
            if bytes >= max_bytes {
                break;
            }
            let (k, v) = item?;
            bytes += k.len() - 1 + v.len();
            entries.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(entries)
    }
}

/// The guest that applies entries now, and a pool of instances for queries.
#[derive(Debug)]
pub struct ActiveGuest {
    /// The compiled module.
    pub module: GuestModule,
    /// The log index of the entry that activated it.
    pub since: u64,
    queries: Mutex<Vec<GuestInstance>>,
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
    state: SledState,
    active: Arc<RwLock<Option<Arc<ActiveGuest>>>>,
    stats: Arc<ApplyStats>,
    gate: Arc<CommitGate>,
    snapshots: sled::Tree,
    snapshot_dir: SnapshotDir,
}

/// How often a query retries when an apply committed while it ran, before
/// it holds the apply back instead.
const OPTIMISTIC_READS: usize = 3;

/// Lets readers see the state between two apply calls, never in the middle
/// of one, without holding applies back in the common case: a sequence lock
/// (the epoch is odd while a commit runs; a read that saw it change runs
/// again) with a read-write lock as the fallback that guarantees progress.
#[derive(Debug, Default)]
struct CommitGate {
    epoch: AtomicU64,
    lock: RwLock<()>,
}

impl CommitGate {
    /// Runs `commit` as one step for readers.
    fn commit<R>(&self, commit: impl FnOnce() -> R) -> R {
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
    fn read<R>(&self, mut read: impl FnMut() -> R) -> R {
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

/// One successful guest swap, as recorded in the state (its wire form).
pub use crate::proto::SwapRecord;

/// The current snapshot: what it covers and its file in the snapshot
/// directory.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: typ::SnapshotMeta,
    file: String,
}

/// How earlier versions stored the current snapshot: every entry of the
/// state tree in one sled value. Converted to a file on open.
#[derive(Debug, Deserialize)]
struct InlineSnapshot {
    meta: typ::SnapshotMeta,
    data: serde_bytes::ByteBuf,
}

#[derive(Debug, Deserialize)]
struct InlineSnapshotData {
    entries: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
}

/// Compiles staged modules on one background thread, in staging order, so
/// that activating one finds it ready (and the compile cache filled)
/// instead of compiling on the apply path. However many modules are
/// staged, there is one compile at a time.
#[derive(Debug)]
struct Compiler {
    /// The queue; `None` when the thread could not be started (activations
    /// then compile on the apply path).
    jobs: Option<std::sync::mpsc::Sender<(String, Vec<u8>)>>,
    /// Hashes still staged: a job for a module dropped meanwhile is skipped.
    wanted: Arc<Mutex<HashSet<String>>>,
    /// Finished compiles of modules still staged, by hash.
    done: Arc<Mutex<HashMap<String, GuestModule>>>,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Compiler {
    /// Starts the compile thread; it ends when the compiler is dropped.
    fn start(runtime: GuestRuntime) -> Self {
        let (sender, receiver) = std::sync::mpsc::channel::<(String, Vec<u8>)>();
        let wanted: Arc<Mutex<HashSet<String>>> = Arc::default();
        let done: Arc<Mutex<HashMap<String, GuestModule>>> = Arc::default();
        let (thread_wanted, thread_done) = (wanted.clone(), done.clone());
        let started = std::thread::Builder::new()
            .name("guest-compile".into())
            .spawn(move || {
                for (hash, module) in receiver {
                    if !locked(&thread_wanted).contains(&hash) {
                        continue;
                    }
                    // A failure is not recorded: the activation loads the
                    // module again and decides.
                    if let Ok(loaded) = runtime.load(&module) {
                        let wanted = locked(&thread_wanted);
                        if wanted.contains(&hash) {
                            locked(&thread_done).insert(hash, loaded);
                        }
                    }
                }
            });
        let jobs = match started {
            Ok(_) => Some(sender),
            Err(error) => {
                tracing::warn!(%error, "cannot start the guest compile thread; staged guests compile when activated");
                None
            }
        };
        Self { jobs, wanted, done }
    }

    /// Queues `module` for compiling.
    fn enqueue(&self, hash: &str, module: &[u8]) {
        if let Some(jobs) = &self.jobs
            && locked(&self.wanted).insert(hash.to_owned())
        {
            let _ = jobs.send((hash.to_owned(), module.to_vec()));
        }
    }

    /// The compiled module `hash`, if its compile finished.
    fn take(&self, hash: &str) -> Option<GuestModule> {
        locked(&self.wanted).remove(hash);
        locked(&self.done).remove(hash)
    }

    /// Stops wanting `hash`: a queued compile of it is skipped, a finished
    /// one thrown away.
    fn forget(&self, hash: &str) {
        let mut wanted = locked(&self.wanted);
        wanted.remove(hash);
        locked(&self.done).remove(hash);
    }

    /// Forgets every hash that is not in `staged`.
    fn retain(&self, staged: &HashMap<String, Vec<u8>>) {
        let mut wanted = locked(&self.wanted);
        wanted.retain(|hash| staged.contains_key(hash));
        locked(&self.done).retain(|hash, _| staged.contains_key(hash));
    }
}

/// openraft's state machine over the sled tree `state`.
#[derive(Debug)]
pub struct StateMachineStore {
    disk: Disk,
    tree: sled::Tree,
    snapshots: sled::Tree,
    snapshot_dir: SnapshotDir,
    /// Held while a snapshot is made current, so that a build finishing
    /// and an install cannot interleave their checks and stores.
    storing: Arc<tokio::sync::Mutex<()>>,
    runtime: GuestRuntime,
    reader: StateReader,
    /// The apply instance of the active guest.
    instance: Option<GuestInstance>,
    /// Staged module bytes by hash (also in the tree; kept here so that an
    /// activation applied in the same batch as its stage finds them).
    staged: HashMap<String, Vec<u8>>,
    /// The staged hashes, earliest staged first (also in the tree).
    staged_order: Vec<String>,
    /// Compiles staged modules in the background.
    compiler: Compiler,
    applied: Option<typ::LogId>,
    membership: typ::StoredMembership,
    time_ms: u64,
    /// The sequence number of the last redo record.
    redo_seq: u64,
    /// The watch feed this node records applied changes into, if any.
    watch: Option<Arc<WatchHub>>,
    /// The guest keys written by the current entry's commands so far.
    touched: Vec<Vec<u8>>,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn read_err(e: impl std::fmt::Display) -> typ::StorageError {
    StorageIOError::read_state_machine(&io_err(e)).into()
}

fn write_err(e: impl std::fmt::Display) -> typ::StorageError {
    StorageIOError::write_state_machine(&io_err(e)).into()
}

/// Checks that the entry under `key`, if any, decodes as a `T`.
fn decodes<T: serde::de::DeserializeOwned>(
    entries: &HashMap<&[u8], &[u8]>,
    key: &[u8],
    what: &str,
) -> Result<(), String> {
    match entries.get(key) {
        Some(bytes) => rmp_serde::from_slice::<T>(bytes)
            .map(drop)
            .map_err(|e| format!("its {what} does not decode: {e}")),
        None => Ok(()),
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, typ::StorageError> {
    rmp_serde::to_vec(value).map_err(write_err)
}

/// Replaces the whole state tree with the entries of the snapshot file at
/// `path` (checked already), one entry at a time.
///
/// The redo head goes first and comes back last, so a crash part way
/// leaves a state that reports an older applied id than the stored
/// snapshot, and `open` installs it again.
fn replace_state(
    tree: &sled::Tree,
    disk: &Disk,
    gate: &CommitGate,
    path: &Path,
) -> Result<(), typ::StorageError> {
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut reader = snapshot_file::Reader::new(file).map_err(read_err)?;
    gate.commit(|| {
        tree.remove(redo::KEY_HEAD).map_err(write_err)?;
        for key in tree.iter().keys() {
            tree.remove(key.map_err(read_err)?).map_err(write_err)?;
        }
        let mut head = None;
        while let Some((k, v)) = reader.next_entry().map_err(read_err)? {
            if redo::is_head(&k) {
                head = Some(v);
                continue;
            }
            disk.note_write(v.len());
            tree.insert(k, v).map_err(write_err)?;
        }
        if let Some(head) = head {
            tree.insert(redo::KEY_HEAD, head).map_err(write_err)?;
        }
        Ok(())
    })
}

/// Reads a received snapshot file through and checks everything `open`
/// and [`StateMachineStore::load_meta`] will read from it: the file is
/// whole and undamaged, its keys are in the tree's layout, the redo record
/// (its head names the snapshot's own last log id, its chunks are all there
/// and decode), the guest metadata, and that the active guest loads. Only
/// the host's entries are held in memory, never the guest's keys.
///
/// # Errors
/// Why the snapshot cannot be installed.
fn check_snapshot(
    runtime: &GuestRuntime,
    meta: &typ::SnapshotMeta,
    path: &Path,
) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("it cannot be opened: {e}"))?;
    let mut reader = snapshot_file::Reader::new(file).map_err(|e| e.to_string())?;
    let mut host: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    while let Some((key, value)) = reader.next_entry().map_err(|e| e.to_string())? {
        if !is_state_key(&key) {
            return Err("it holds a key outside the state's layout".into());
        }
        if is_host_key(&key) {
            host.insert(key, value);
        }
    }
    let summary = check_host_entries(runtime, &host)?;
    let applied = summary.head.as_ref().and_then(|head| head.applied);
    if applied != meta.last_log_id {
        return Err(format!(
            "its state is applied up to {applied:?}, but it claims {:?}",
            meta.last_log_id
        ));
    }
    Ok(())
}

/// What the host entries of a state say about it.
#[derive(Debug, Clone, Default)]
pub struct HostSummary {
    /// The redo head: last applied log id and membership.
    pub head: Option<RedoHead>,
    /// The active guest's hash.
    pub guest_hash: Option<String>,
}

/// Decodes the redo head and guest hash of a state's host entries, without
/// the rest of [`check_host_entries`].
///
/// # Errors
/// When either does not decode.
pub fn summarize_host_entries(host: &HashMap<Vec<u8>, Vec<u8>>) -> Result<HostSummary, String> {
    let head = host
        .get(redo::KEY_HEAD)
        .map(|bytes| rmp_serde::from_slice(bytes))
        .transpose()
        .map_err(|e| format!("its redo head does not decode: {e}"))?;
    let guest_hash = host
        .get(KEY_GUEST_HASH)
        .map(|bytes| rmp_serde::from_slice(bytes))
        .transpose()
        .map_err(|e| format!("its guest hash does not decode: {e}"))?;
    Ok(HostSummary { head, guest_hash })
}

/// Whether `key` may appear in a state tree: a host (`0x00`) or guest
/// (`0x01`) key.
pub fn is_state_key(key: &[u8]) -> bool {
    matches!(key.first(), Some(&(0 | GUEST)))
}

/// Whether `key` is a host (`0x00`) key, which checks read.
pub fn is_host_key(key: &[u8]) -> bool {
    key.first() == Some(&0)
}

/// Checks the host entries of a state (every `0x00` key, as read from a
/// snapshot file) as `open` will read them: the redo record (its chunks are
/// all there and decode), the guest metadata, and that the active guest
/// loads. Returns the redo head and the guest hash.
///
/// # Errors
/// Why a node could not open this state.
pub fn check_host_entries(
    runtime: &GuestRuntime,
    host: &HashMap<Vec<u8>, Vec<u8>>,
) -> Result<HostSummary, String> {
    let summary = summarize_host_entries(host)?;
    let entries: HashMap<&[u8], &[u8]> = host
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    if let Some(head) = &summary.head {
        let chunks = (0..head.chunks)
            .map(|index| {
                entries
                    .get(redo::chunk_key(head.seq, index).as_slice())
                    .copied()
                    .ok_or_else(|| format!("its redo record lacks chunk {index}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if head.chunks > 0 {
            redo::decode_writes(&chunks.concat())
                .map_err(|e| format!("its redo record does not decode: {e}"))?;
        }
    }
    decodes::<u64>(&entries, KEY_GUEST_SINCE, "guest index")?;
    decodes::<String>(&entries, KEY_GUEST_HASH, "guest hash")?;
    decodes::<Vec<SwapRecord>>(&entries, KEY_GUEST_HISTORY, "guest history")?;
    decodes::<Vec<String>>(&entries, KEY_STAGED_ORDER, "staging order")?;
    if let Some(module) = entries.get(KEY_GUEST_MODULE) {
        runtime
            .load(module)
            .map_err(|e| format!("its active guest does not load: {e}"))?;
    }
    Ok(summary)
}

/// Writes every entry of `tree` to a new snapshot file at `path`, synced.
fn dump_tree(tree: &sled::Tree, path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut writer = snapshot_file::Writer::new(file)?;
    for item in tree.iter() {
        let (key, value) = item.map_err(io_err)?;
        writer.entry(&key, &value)?;
    }
    writer.finish()?.sync_all()
}

/// Runs `work` on a blocking thread and waits for it: long snapshot work
/// must not hold one of the async runtime's worker threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, typ::StorageError> + Send + 'static,
) -> Result<T, typ::StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| write_err(format!("snapshot work failed: {e}")))?
}

/// Makes the synced snapshot file `part` the current snapshot: moves it into
/// place, records it (flushed), then removes the file it replaces. Returns
/// the path of its file.
async fn store_snapshot(
    disk: &Disk,
    snapshots: &sled::Tree,
    dir: &SnapshotDir,
    part: &Path,
    meta: &typ::SnapshotMeta,
) -> Result<std::path::PathBuf, typ::StorageError> {
    let index = meta.last_log_id.map_or(0, |id| id.index);
    let file = dir.store(part, index).map_err(write_err)?;
    let previous: Option<StoredSnapshot> =
        read_meta(snapshots, KEY_SNAPSHOT, StorageIOError::read_state_machine)?;
    let stored = StoredSnapshot {
        meta: meta.clone(),
        file: file.clone(),
    };
    let encoded = encode(&stored)?;
    disk.note_write(encoded.len());
    snapshots.insert(KEY_SNAPSHOT, encoded).map_err(write_err)?;
    disk.flush().await.map_err(write_err)?;
    if let Some(previous) = previous
        && previous.file != file
        && let Err(error) = std::fs::remove_file(dir.path_of(&previous.file))
    {
        tracing::warn!(%error, file = %previous.file, "cannot remove the replaced snapshot");
    }
    Ok(dir.path_of(&file))
}

/// The current snapshot, opened. A snapshot stored meanwhile removes the
/// file it replaces after recording its own, so a file found missing is
/// looked up again.
async fn open_current_snapshot(
    snapshots: &sled::Tree,
    dir: &SnapshotDir,
) -> Result<Option<typ::Snapshot>, typ::StorageError> {
    let mut attempts = 0;
    loop {
        let Some(stored) = read_meta::<StoredSnapshot>(
            snapshots,
            KEY_SNAPSHOT,
            StorageIOError::read_state_machine,
        )?
        else {
            return Ok(None);
        };
        match SnapshotFile::open(&dir.path_of(&stored.file)).await {
            Ok(file) => {
                return Ok(Some(Snapshot {
                    meta: stored.meta,
                    snapshot: Box::new(file),
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
            Err(e) => return Err(read_err(format!("opening snapshot {}: {e}", stored.file))),
        }
    }
}

/// Converts a snapshot stored whole in sled by an earlier version into a
/// snapshot file, so that it can be installed again and sent.
fn convert_inline_snapshot(
    disk: &Disk,
    snapshots: &sled::Tree,
    dir: &SnapshotDir,
) -> Result<(), typ::StorageError> {
    let Some(inline) = read_meta::<InlineSnapshot>(
        snapshots,
        KEY_INLINE_SNAPSHOT,
        StorageIOError::read_state_machine,
    )?
    else {
        return Ok(());
    };
    let data: InlineSnapshotData = rmp_serde::from_slice(&inline.data).map_err(read_err)?;
    let mut entries = data.entries;
    entries.sort();
    let part = dir.part_path("convert");
    let write = || -> std::io::Result<()> {
        let mut writer = snapshot_file::Writer::new(std::fs::File::create(&part)?)?;
        for (key, value) in &entries {
            writer.entry(key, value)?;
        }
        writer.finish()?.sync_all()
    };
    write().map_err(write_err)?;
    let index = inline.meta.last_log_id.map_or(0, |id| id.index);
    let file = dir.store(&part, index).map_err(write_err)?;
    let stored = encode(&StoredSnapshot {
        meta: inline.meta,
        file,
    })?;
    snapshots.insert(KEY_SNAPSHOT, stored).map_err(write_err)?;
    snapshots.remove(KEY_INLINE_SNAPSHOT).map_err(write_err)?;
    disk.db().flush().map_err(write_err)?;
    tracing::info!("converted the stored snapshot to a snapshot file");
    Ok(())
}

impl StateMachineStore {
    /// Opens the state machine in `disk`, with its snapshot files in
    /// `snapshot_dir`, loading the active guest (from the compile cache when
    /// possible) and finishing an apply or a snapshot install that a crash
    /// interrupted.
    ///
    /// # Errors
    /// A storage error when sled or the snapshot directory fails, the redo
    /// record is damaged or the stored guest cannot be loaded.
    pub fn open(
        disk: &Disk,
        snapshot_dir: &Path,
        runtime: GuestRuntime,
    ) -> Result<Self, typ::StorageError> {
        let tree = disk.db().open_tree(STATE_TREE).map_err(read_err)?;
        let snapshots = disk.db().open_tree("snapshot").map_err(read_err)?;
        let snapshot_dir = SnapshotDir::open(snapshot_dir).map_err(read_err)?;
        convert_inline_snapshot(disk, &snapshots, &snapshot_dir)?;
        let reader = StateReader {
            state: SledState(tree.clone()),
            active: Arc::default(),
            stats: Arc::default(),
            gate: Arc::default(),
            snapshots: snapshots.clone(),
            snapshot_dir: snapshot_dir.clone(),
        };
        let mut sm = Self {
            disk: disk.clone(),
            tree,
            snapshots,
            snapshot_dir,
            storing: Arc::default(),
            runtime: runtime.clone(),
            reader,
            instance: None,
            staged: HashMap::new(),
            staged_order: Vec::new(),
            compiler: Compiler::start(runtime.clone()),
            applied: None,
            membership: typ::StoredMembership::default(),
            time_ms: 0,
            redo_seq: 0,
            watch: None,
            touched: Vec::new(),
        };
        let applied = redo::read_head(&sm.tree)
            .map_err(read_err)?
            .and_then(|head| head.applied);
        let stored = sm.stored_snapshot()?;
        match &stored {
            Some(snapshot) if snapshot.meta.last_log_id > applied => {
                tracing::info!(snapshot = ?snapshot.meta.last_log_id, ?applied, "finishing an interrupted snapshot install");
                let path = sm.snapshot_dir.path_of(&snapshot.file);
                replace_state(&sm.tree, &sm.disk, &sm.reader.gate, &path)?;
            }
            _ => {
                redo::recover(&sm.tree, &sm.disk).map_err(read_err)?;
            }
        }
        // Parts of snapshots whose build or transfer a crash cut short.
        sm.snapshot_dir
            .remove_all_but(stored.as_ref().map(|s| s.file.as_str()))
            .map_err(write_err)?;
        sm.load_meta()?;
        Ok(sm)
    }

    /// A handle for queries and status.
    pub fn reader(&self) -> StateReader {
        self.reader.clone()
    }

    /// Records what every entry applied from now on changes into `hub`,
    /// whose window starts after the current applied index.
    pub fn record_changes(&mut self, hub: Arc<WatchHub>) {
        hub.reset(self.applied.map_or(0, |id| id.index));
        self.watch = Some(hub);
    }

    /// Moves the keys the last command wrote to the current entry's.
    fn collect_touched(&mut self) {
        if self.watch.is_some()
            && let Some(instance) = self.instance.as_mut()
        {
            self.touched.extend(instance.take_touched());
        }
    }

    /// What the entry at `index` changed, as the active guest describes it;
    /// `None` when it changed nothing or nobody records changes.
    fn entry_changes(&mut self, index: u64) -> Result<Option<EntryChanges>, typ::StorageError> {
        let keys = std::mem::take(&mut self.touched);
        let Some(instance) = self.instance.as_mut() else {
            return Ok(None);
        };
        if keys.is_empty() {
            return Ok(None);
        }
        let changes = instance.pending_changes(keys);
        let described = instance.describe(changes).map_err(write_err)?;
        Ok(Some(EntryChanges::new(index, described)))
    }

    fn load_meta(&mut self) -> Result<(), typ::StorageError> {
        let head = redo::read_head(&self.tree)
            .map_err(read_err)?
            .unwrap_or_default();
        self.applied = head.applied;
        self.membership = head.membership;
        self.time_ms = head.time_ms;
        self.redo_seq = head.seq;
        self.staged.clear();
        for item in self.tree.scan_prefix(PREFIX_STAGED) {
            let (key, module) = item.map_err(read_err)?;
            let hash = String::from_utf8_lossy(&key[PREFIX_STAGED.len()..]).into_owned();
            self.staged.insert(hash, module.to_vec());
        }
        // Modules staged before the order was recorded count as the
        // earliest, in hash order: still the same on every replica.
        let recorded: Vec<String> = read_meta(
            &self.tree,
            KEY_STAGED_ORDER,
            StorageIOError::read_state_machine,
        )?
        .unwrap_or_default();
        let mut unordered: Vec<String> = self
            .staged
            .keys()
            .filter(|hash| !recorded.contains(hash))
            .cloned()
            .collect();
        unordered.sort();
        self.staged_order = unordered;
        self.staged_order.extend(
            recorded
                .into_iter()
                .filter(|hash| self.staged.contains_key(hash)),
        );
        self.compiler.retain(&self.staged);
        for hash in &self.staged_order {
            self.compiler.enqueue(hash, &self.staged[hash]);
        }
        self.load_active_guest()
    }

    /// Drops the staged module `hash`: from the state (through `writes`),
    /// from memory and from the compile queue.
    fn drop_staged(&mut self, hash: &str, writes: &mut Vec<Write>) {
        writes.push(([PREFIX_STAGED, hash.as_bytes()].concat(), None));
        self.staged.remove(hash);
        self.staged_order.retain(|h| h != hash);
        self.compiler.forget(hash);
    }

    /// Loads the guest recorded in the state as active (or none).
    fn load_active_guest(&mut self) -> Result<(), typ::StorageError> {
        let module = self.tree.get(KEY_GUEST_MODULE).map_err(read_err)?;
        let since: u64 = read_meta(
            &self.tree,
            KEY_GUEST_SINCE,
            StorageIOError::read_state_machine,
        )?
        .unwrap_or(0);
        let active = match module {
            Some(bytes) => {
                let module = self
                    .runtime
                    .load(&bytes)
                    .map_err(|e| read_err(format!("the stored active guest does not load: {e}")))?;
                Some(module)
            }
            None => None,
        };
        self.activate(active, since);
        Ok(())
    }

    fn activate(&mut self, module: Option<GuestModule>, since: u64) {
        self.instance = module
            .as_ref()
            .map(|m| m.instantiate(Arc::new(self.reader.state.clone())));
        let active = module.map(|module| {
            Arc::new(ActiveGuest {
                module,
                since,
                queries: Mutex::default(),
            })
        });
        *self
            .reader
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = active;
    }

    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, typ::StorageError> {
        read_meta(
            &self.snapshots,
            KEY_SNAPSHOT,
            StorageIOError::read_state_machine,
        )
    }

    /// Applies one normal entry's operations; guest writes stay in the
    /// instance's overlay, host writes go to `writes`.
    fn apply_request(
        &mut self,
        log_id: &typ::LogId,
        request: &Request,
        writes: &mut Vec<Write>,
    ) -> Result<Response, typ::StorageError> {
        // Time never goes backwards, even across leaders with skewed clocks.
        self.time_ms = self.time_ms.max(request.time_ms);
        let mut results = Vec::with_capacity(request.ops.len());
        for (position, op) in request.ops.iter().enumerate() {
            let ctx = Context {
                index: log_id.index,
                position: position as u32,
                time_ms: self.time_ms,
            };
            let result = match op {
                Op::Apply(command) => self.apply_command(ctx, command)?,
                Op::StageGuest { module } => self.stage_guest(module, writes)?,
                Op::ActivateGuest { hash, force } => {
                    self.activate_guest(ctx, hash, *force, writes)?
                }
            };
            results.push(result);
            self.collect_touched();
        }
        Ok(Response { results })
    }

    fn apply_command(
        &mut self,
        ctx: Context,
        command: &[u8],
    ) -> Result<OpResult, typ::StorageError> {
        let Some(instance) = self.instance.as_mut() else {
            return Ok(Err("no guest is active; deploy one first".into()));
        };
        let outcome = instance.apply(ctx, command).map_err(write_err)?;
        Ok(outcome.result.map(OpOutput::Guest))
    }

    /// Stores a module in the state and starts compiling it.
    fn stage_guest(
        &mut self,
        module: &[u8],
        writes: &mut Vec<Write>,
    ) -> Result<OpResult, typ::StorageError> {
        use sha2::Digest as _;
        let hash = hex::encode(sha2::Sha256::digest(module));
        writes.push((
            [PREFIX_STAGED, hash.as_bytes()].concat(),
            Some(module.to_vec()),
        ));
        self.staged.insert(hash.clone(), module.to_vec());
        self.staged_order.retain(|h| h != &hash);
        self.staged_order.push(hash.clone());
        while self.staged_order.len() > MAX_STAGED {
            let earliest = self.staged_order[0].clone();
            tracing::info!(hash = %earliest, "dropping the earliest staged guest");
            self.drop_staged(&earliest, writes);
        }
        writes.push((KEY_STAGED_ORDER.to_vec(), Some(encode(&self.staged_order)?)));
        self.compiler.enqueue(&hash, module);
        Ok(Ok(OpOutput::Staged(hash)))
    }

    /// Makes the staged module `hash` the active guest from `ctx.index` on.
    /// Every check here depends only on replicated state and the module
    /// bytes, so every replica reaches the same verdict.
    fn activate_guest(
        &mut self,
        ctx: Context,
        hash: &str,
        force: bool,
        writes: &mut Vec<Write>,
    ) -> Result<OpResult, typ::StorageError> {
        let Some(module) = self.staged.get(hash).cloned() else {
            return Ok(Err(format!(
                "no staged guest has hash {hash}; stage it first"
            )));
        };
        let ready = self.compiler.take(hash);
        // A replica whose background compile has not finished waits for it
        // here (it compiles now): it never skips the activation. Only a
        // verdict on the module refuses it; when this node failed to load
        // it (no memory, no free instance slot, a failed mmap), the other
        // replicas may well have switched, so this one stops applying and
        // tries again when it restarts, rather than diverge.
        let loaded = match ready.map_or_else(|| self.runtime.load(&module), Ok) {
            Ok(loaded) => loaded,
            Err(e) if e.is_module_property() => return Ok(Err(e.to_string())),
            Err(e) => {
                tracing::error!(index = ctx.index, %hash, error = %e, "cannot activate the staged guest on this node; stopping until restart");
                return Err(write_err(format!(
                    "activating guest {hash} at index {}: {e}",
                    ctx.index
                )));
            }
        };
        let previous = self.reader.active();
        if !force
            && let Some(previous) = &previous
            && let Err(refusal) = loaded.may_replace(&previous.module)
        {
            return Ok(Err(refusal));
        }

        // The writes of earlier commands in this apply call move to the new
        // instance, so they commit with the batch whatever happens next.
        let pending = self
            .instance
            .as_mut()
            .map(GuestInstance::take_writes)
            .unwrap_or_default();
        let mut instance = loaded.instantiate(Arc::new(self.reader.state.clone()));
        instance.restore_writes(pending);
        if let Some(previous) = &previous {
            let info = crate::runtime::GuestInfo {
                name: previous.module.name().to_owned(),
                version: previous.module.version().to_string(),
            };
            let outcome = instance.migrate(ctx, info).map_err(write_err)?;
            if let Err(reason) = outcome.result {
                let pending = instance.take_writes();
                if let Some(old) = self.instance.as_mut() {
                    old.restore_writes(pending);
                }
                return Ok(Err(format!("the migration failed: {reason}")));
            }
        }

        let record = SwapRecord {
            index: ctx.index,
            name: loaded.name().to_owned(),
            version: loaded.version().to_string(),
            hash: hash.to_owned(),
            forced: force,
        };
        // An earlier activation in this apply call wrote the history only
        // to `writes` so far; the newest value wins.
        let pending = writes
            .iter()
            .rev()
            .find(|(key, _)| key == KEY_GUEST_HISTORY)
            .and_then(|(_, value)| value.as_deref());
        let mut history: Vec<SwapRecord> = match pending {
            Some(bytes) => rmp_serde::from_slice(bytes).map_err(read_err)?,
            None => read_meta(
                &self.tree,
                KEY_GUEST_HISTORY,
                StorageIOError::read_state_machine,
            )?
            .unwrap_or_default(),
        };
        history.push(record.clone());
        writes.push((KEY_GUEST_HISTORY.to_vec(), Some(encode(&history)?)));
        writes.push((KEY_GUEST_HASH.to_vec(), Some(encode(&hash)?)));
        writes.push((KEY_GUEST_MODULE.to_vec(), Some(module)));
        writes.push((KEY_GUEST_SINCE.to_vec(), Some(encode(&ctx.index)?)));
        // The swap is done: this module and every one staged before it are
        // dropped (those were abandoned or superseded); modules staged after
        // it stay, so a deploy that raced with this one can still activate.
        let done = self
            .staged_order
            .iter()
            .position(|h| h == hash)
            .map_or(0, |position| position + 1);
        let finished: Vec<String> = self.staged_order.drain(..done).collect();
        for staged in finished {
            self.drop_staged(&staged, writes);
        }
        let order = (!self.staged_order.is_empty())
            .then(|| encode(&self.staged_order))
            .transpose()?;
        writes.push((KEY_STAGED_ORDER.to_vec(), order));
        self.activate(Some(loaded), ctx.index);
        self.instance = Some(instance);
        tracing::info!(index = ctx.index, name = %record.name, version = %record.version, %hash, "guest activated");
        Ok(Ok(OpOutput::Activated(record)))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<typ::LogId>, typ::StoredMembership), typ::StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, typ::StorageError>
    where
        I: IntoIterator<Item = typ::Entry> + Send,
        I::IntoIter: Send,
    {
        let started = std::time::Instant::now();
        let mut writes: Vec<Write> = Vec::new();
        let mut responses = Vec::new();
        let mut changed = Vec::new();
        for entry in entries {
            self.applied = Some(entry.log_id);
            let response = match &entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Membership(membership) => {
                    self.membership =
                        typ::StoredMembership::new(Some(entry.log_id), membership.clone());
                    Response::default()
                }
                EntryPayload::Normal(request) => {
                    self.apply_request(&entry.log_id, request, &mut writes)?
                }
            };
            if self.watch.is_some() {
                changed.extend(self.entry_changes(entry.log_id.index)?);
            }
            responses.push(response);
        }
        if let Some(instance) = self.instance.as_mut() {
            writes.extend(
                instance
                    .take_writes()
                    .into_iter()
                    .map(|(key, value)| (guest_key(&key), value)),
            );
        }
        let head = RedoHead {
            seq: self.redo_seq,
            chunks: 0,
            applied: self.applied,
            membership: self.membership.clone(),
            time_ms: self.time_ms,
        };
        let gate = self.reader.gate.clone();
        let head = gate
            .commit(|| redo::commit(&self.tree, &self.disk, head, &writes))
            .map_err(write_err)?;
        self.redo_seq = head.seq;
        if let (Some(hub), Some(applied)) = (&self.watch, self.applied) {
            hub.publish(changed, applied.index);
        }
        let ops: usize = responses.iter().map(|r| r.results.len()).sum();
        self.reader
            .stats
            .record(responses.len(), ops, started.elapsed());
        if let Some(applied) = self.applied {
            tracing::debug!(
                index = applied.index,
                entries = responses.len(),
                ops,
                "applied"
            );
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Written here, while the state machine task waits, so the file is a
        // consistent view: no apply runs until it is done. The writing runs
        // on a blocking thread, so heartbeats and queries go on meanwhile.
        let tree = self.tree.clone();
        let part = self.snapshot_dir.part_path("build");
        let dumped = {
            let part = part.clone();
            blocking(move || dump_tree(&tree, &part).map_err(write_err)).await
        };
        SnapshotBuilder {
            disk: self.disk.clone(),
            snapshots: self.snapshots.clone(),
            snapshot_dir: self.snapshot_dir.clone(),
            storing: self.storing.clone(),
            applied: self.applied,
            membership: self.membership.clone(),
            dumped: Some(dumped.map(|()| part)),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, typ::StorageError> {
        let part = self.snapshot_dir.part_path("receive");
        let file = SnapshotFile::create_temporary(&part)
            .await
            .map_err(write_err)?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &typ::SnapshotMeta,
        mut snapshot: Box<SnapshotFile>,
    ) -> Result<(), typ::StorageError> {
        let part = snapshot.path().to_owned();
        // Checked before anything is stored: a stored snapshot is installed
        // again by every `open` until it succeeds, so a bad one would keep
        // the node from starting at all.
        let checked = {
            let (runtime, meta, part) = (self.runtime.clone(), meta.clone(), part.clone());
            blocking(move || Ok(check_snapshot(&runtime, &meta, &part))).await?
        };
        checked.map_err(|reason| {
            tracing::error!(snapshot = ?meta.last_log_id, %reason, "refusing a received snapshot");
            read_err(format!(
                "refusing snapshot {}: {reason}; nothing was stored",
                meta.snapshot_id
            ))
        })?;
        // Stored first: if the node crashes while replacing the state, `open`
        // finishes the install from the stored file.
        let storing = self.storing.clone();
        let stored = storing.lock().await;
        let path =
            store_snapshot(&self.disk, &self.snapshots, &self.snapshot_dir, &part, meta).await?;
        drop(stored);
        snapshot.keep();
        drop(snapshot);
        let (tree, disk, gate) = (
            self.tree.clone(),
            self.disk.clone(),
            self.reader.gate.clone(),
        );
        blocking(move || replace_state(&tree, &disk, &gate, &path)).await?;
        self.disk.flush().await.map_err(write_err)?;
        self.load_meta()?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        if let Some(hub) = &self.watch {
            hub.reset(self.applied.map_or(0, |id| id.index));
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<typ::Snapshot>, typ::StorageError> {
        open_current_snapshot(&self.snapshots, &self.snapshot_dir).await
    }
}

/// Builds a snapshot from the file written by `get_snapshot_builder`.
#[derive(Debug)]
pub struct SnapshotBuilder {
    disk: Disk,
    snapshots: sled::Tree,
    snapshot_dir: SnapshotDir,
    storing: Arc<tokio::sync::Mutex<()>>,
    applied: Option<typ::LogId>,
    membership: typ::StoredMembership,
    /// The written file, until the build takes it.
    dumped: Option<Result<std::path::PathBuf, typ::StorageError>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<typ::Snapshot, typ::StorageError> {
        let part = self
            .dumped
            .take()
            .unwrap_or_else(|| Err(write_err("this snapshot was built already")))?;
        let len = std::fs::metadata(&part).map_err(read_err)?.len();
        let last = self.applied;
        let snapshot_id = match last {
            Some(log_id) => format!("{}-{}-{len}", log_id.leader_id, log_id.index),
            None => format!("empty-{len}"),
        };
        let meta = typ::SnapshotMeta {
            last_log_id: last,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        // A build that raced with a newer installed snapshot must not
        // replace it; the newer one is the answer then.
        let _storing = self.storing.lock().await;
        let current: Option<StoredSnapshot> = read_meta(
            &self.snapshots,
            KEY_SNAPSHOT,
            StorageIOError::read_state_machine,
        )?;
        if current.is_some_and(|current| current.meta.last_log_id >= last) {
            let _ = std::fs::remove_file(&part);
            if let Some(current) =
                open_current_snapshot(&self.snapshots, &self.snapshot_dir).await?
            {
                return Ok(current);
            }
        }
        let path = store_snapshot(
            &self.disk,
            &self.snapshots,
            &self.snapshot_dir,
            &part,
            &meta,
        )
        .await?;
        let file = SnapshotFile::open(&path).await.map_err(read_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId};

    use super::*;
    use crate::runtime::{BUNDLED_GUEST, Limits};

    fn log_id(index: u64) -> typ::LogId {
        LogId::new(CommittedLeaderId::new(1, 0), index)
    }

    fn entry(index: u64, ops: Vec<Op>) -> typ::Entry {
        typ::Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(Request {
                time_ms: index,
                ops,
            }),
        }
    }

    fn open(dir: &tempfile::TempDir) -> anyhow::Result<StateMachineStore> {
        let disk = Disk::reopen(&dir.path().join("db"))?;
        let runtime = GuestRuntime::new(Limits::default(), None)?;
        Ok(StateMachineStore::open(
            &disk,
            &dir.path().join("snapshots"),
            runtime,
        )?)
    }

    /// A state machine in `dir` running the bundled guest, with `k=v` set
    /// at index 3.
    async fn used_state(dir: &tempfile::TempDir) -> anyhow::Result<StateMachineStore> {
        use sha2::Digest as _;
        let mut sm = open(dir)?;
        let hash = hex::encode(sha2::Sha256::digest(BUNDLED_GUEST));
        let set = guest_kv::command::Command::Set {
            key: b"k",
            value: b"v",
            ttl_ms: 0,
        };
        sm.apply([
            entry(
                1,
                vec![Op::StageGuest {
                    module: BUNDLED_GUEST.to_vec(),
                }],
            ),
            entry(2, vec![Op::ActivateGuest { hash, force: true }]),
            entry(3, vec![Op::Apply(set.encode())]),
        ])
        .await?;
        Ok(sm)
    }

    /// A snapshot of [`used_state`]: its meta and the bytes of its file.
    async fn snapshot_of_a_used_state() -> anyhow::Result<(typ::SnapshotMeta, Vec<u8>)> {
        use tokio::io::AsyncReadExt as _;
        let dir = tempfile::tempdir()?;
        let mut sm = used_state(&dir).await?;
        let mut snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
        let mut bytes = Vec::new();
        snapshot.snapshot.read_to_end(&mut bytes).await?;
        Ok((snapshot.meta, bytes))
    }

    /// `bytes` as a snapshot file received by `sm`, ready to install.
    async fn received(
        sm: &mut StateMachineStore,
        bytes: &[u8],
    ) -> anyhow::Result<Box<SnapshotFile>> {
        use tokio::io::{AsyncSeekExt as _, AsyncWriteExt as _};
        let mut file = sm.begin_receiving_snapshot().await?;
        file.write_all(bytes).await?;
        file.sync().await?;
        file.rewind().await?;
        Ok(file)
    }

    /// The entries of a snapshot file's bytes.
    fn entries_of(bytes: &[u8]) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut reader = snapshot_file::Reader::new(bytes)?;
        let mut entries = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            entries.push(entry);
        }
        Ok(entries)
    }

    /// A snapshot file's bytes holding `entries`.
    fn snapshot_bytes(entries: &[(Vec<u8>, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
        let mut writer = snapshot_file::Writer::new(Vec::new())?;
        for (key, value) in entries {
            writer.entry(key, value)?;
        }
        Ok(writer.finish()?)
    }

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

    /// Two swaps in one apply call both reach the history: the second one
    /// builds on the first one's record, which is not in the tree yet.
    #[tokio::test]
    async fn two_swaps_in_one_apply_call_keep_both_history_records() -> anyhow::Result<()> {
        use sha2::Digest as _;
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        let hash = hex::encode(sha2::Sha256::digest(BUNDLED_GUEST));
        let stage = || Op::StageGuest {
            module: BUNDLED_GUEST.to_vec(),
        };
        let activate = || Op::ActivateGuest {
            hash: hash.clone(),
            force: true,
        };
        let responses = sm
            .apply([
                entry(1, vec![stage()]),
                entry(2, vec![activate()]),
                entry(3, vec![stage()]),
                entry(4, vec![activate()]),
            ])
            .await?;
        for response in &responses {
            assert!(response.results.iter().all(Result::is_ok), "{responses:?}");
        }
        let history = sm.reader().guest_history()?;
        let indexes: Vec<u64> = history.iter().map(|record| record.index).collect();
        assert_eq!(indexes, [2, 4]);
        Ok(())
    }

    fn meta(index: u64) -> typ::SnapshotMeta {
        typ::SnapshotMeta {
            last_log_id: Some(log_id(index)),
            last_membership: typ::StoredMembership::default(),
            snapshot_id: format!("test-{index}"),
        }
    }

    /// A received snapshot that does not decode is refused before it is
    /// stored, so the node still opens afterwards, with its state intact.
    #[tokio::test]
    async fn undecodable_snapshot_is_refused_and_not_stored() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        {
            let mut sm = open(&dir)?;
            let junk = received(&mut sm, b"not a snapshot").await?;
            let part = junk.path().to_owned();
            let refused = sm.install_snapshot(&meta(7), junk).await;
            assert!(refused.is_err(), "a junk snapshot was installed");
            assert!(sm.get_current_snapshot().await?.is_none());
            assert!(!part.exists(), "the refused file was left behind");
        }
        let mut sm = open(&dir)?;
        assert_eq!(sm.applied_state().await?.0, None);
        Ok(())
    }

    /// A snapshot that decodes but whose redo head is damaged, or that
    /// claims another applied index than its metadata, is refused as well.
    #[tokio::test]
    async fn snapshot_with_a_damaged_head_is_refused() -> anyhow::Result<()> {
        let (good_meta, good) = snapshot_of_a_used_state().await?;
        let mut damaged = entries_of(&good)?;
        for (key, value) in &mut damaged {
            if redo::is_head(key) {
                *value = vec![0xc1];
            }
        }
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        let bad = received(&mut sm, &snapshot_bytes(&damaged)?).await?;
        let refused = sm.install_snapshot(&good_meta, bad).await;
        assert!(refused.is_err(), "a damaged head was installed");

        let mut foreign = entries_of(&good)?;
        foreign.push((vec![0x02, b'x'], Vec::new()));
        let bad = received(&mut sm, &snapshot_bytes(&foreign)?).await?;
        let refused = sm.install_snapshot(&good_meta, bad).await;
        assert!(refused.is_err(), "a key outside the layout was installed");

        let truncated = received(&mut sm, &good[..good.len() - 1]).await?;
        let refused = sm.install_snapshot(&good_meta, truncated).await;
        assert!(refused.is_err(), "a truncated snapshot was installed");

        let elsewhere = received(&mut sm, &good).await?;
        let refused = sm.install_snapshot(&meta(99), elsewhere).await;
        assert!(
            refused.is_err(),
            "a snapshot of index 3 was installed as 99"
        );
        assert!(sm.get_current_snapshot().await?.is_none());
        drop(sm);
        open(&dir)?;
        Ok(())
    }

    /// The bundled guest with a custom section appended: the same guest
    /// under another hash.
    fn variant(n: u8) -> Vec<u8> {
        let mut module = BUNDLED_GUEST.to_vec();
        module.extend_from_slice(&[0, 5, 3, b'p', b'a', b'd', n]);
        module
    }

    fn hash_of(module: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(module))
    }

    fn stage(index: u64, module: Vec<u8>) -> typ::Entry {
        entry(index, vec![Op::StageGuest { module }])
    }

    /// The staged hashes in the state, sorted.
    fn staged(sm: &StateMachineStore) -> Vec<String> {
        let mut hashes: Vec<String> = sm
            .tree
            .scan_prefix(PREFIX_STAGED)
            .keys()
            .map(|k| String::from_utf8_lossy(&k.expect("key")[PREFIX_STAGED.len()..]).into_owned())
            .collect();
        hashes.sort();
        hashes
    }

    fn sorted(mut hashes: Vec<String>) -> Vec<String> {
        hashes.sort();
        hashes
    }

    /// At most MAX_STAGED modules stay staged; staging another drops the
    /// one staged earliest, and staging a module again makes it the latest.
    #[tokio::test]
    async fn only_the_latest_staged_modules_are_kept() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        sm.apply((0..6).map(|n| stage(u64::from(n) + 1, variant(n))))
            .await?;
        let latest = (2..6).map(|n| hash_of(&variant(n))).collect();
        assert_eq!(staged(&sm), sorted(latest));

        sm.apply([stage(7, variant(2)), stage(8, variant(6))])
            .await?;
        let kept = [2, 4, 5, 6].map(|n| hash_of(&variant(n))).to_vec();
        assert_eq!(staged(&sm), sorted(kept.clone()));

        drop(sm);
        let mut sm = open(&dir)?;
        sm.apply([stage(9, variant(7))]).await?;
        let kept = [2, 5, 6, 7].map(|n| hash_of(&variant(n))).to_vec();
        assert_eq!(staged(&sm), sorted(kept), "the order survives a reopen");
        Ok(())
    }

    /// A failed activation keeps the staged modules; a successful one drops
    /// the activated module (it is now stored as the active guest) and every
    /// module staged before it, but none staged after it.
    #[tokio::test]
    async fn successful_activation_drops_the_modules_staged_up_to_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        let (first, second, third) = (variant(0), variant(1), variant(2));
        sm.apply([
            stage(1, first.clone()),
            stage(2, second.clone()),
            stage(3, third.clone()),
        ])
        .await?;
        let missing = Op::ActivateGuest {
            hash: hash_of(&variant(9)),
            force: true,
        };
        let refused = sm.apply([entry(3, vec![missing])]).await?;
        assert!(refused[0].results[0].is_err());
        assert_eq!(staged(&sm).len(), 3, "a failed activation drops nothing");

        let activate = Op::ActivateGuest {
            hash: hash_of(&second),
            force: true,
        };
        let done = sm.apply([entry(4, vec![activate])]).await?;
        assert!(done[0].results[0].is_ok(), "{:?}", done[0].results);
        assert_eq!(staged(&sm), [hash_of(&third)]);

        let activate = Op::ActivateGuest {
            hash: hash_of(&third),
            force: true,
        };
        sm.apply([entry(5, vec![activate])]).await?;
        assert!(staged(&sm).is_empty(), "left staged: {:?}", staged(&sm));
        assert!(sm.tree.get(KEY_STAGED_ORDER)?.is_none());
        let active = sm.reader().active().expect("an active guest");
        assert_eq!(active.module.hash(), hash_of(&third));
        Ok(())
    }

    /// The checks refuse nothing a node builds: a real snapshot installs and
    /// survives a reopen.
    #[tokio::test]
    async fn snapshot_built_by_a_node_installs() -> anyhow::Result<()> {
        let (meta, bytes) = snapshot_of_a_used_state().await?;
        let dir = tempfile::tempdir()?;
        {
            let mut sm = open(&dir)?;
            let file = received(&mut sm, &bytes).await?;
            sm.install_snapshot(&meta, file).await?;
            assert_eq!(sm.applied_state().await?.0, Some(log_id(3)));
        }
        let mut sm = open(&dir)?;
        assert_eq!(sm.applied_state().await?.0, Some(log_id(3)));
        assert!(sm.reader().active().is_some(), "the guest came with it");
        // The installed snapshot is the one a follower is sent next, byte
        // for byte, and it is the only file left in the directory.
        let mut current = sm
            .get_current_snapshot()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no current snapshot after the install"))?;
        let mut sent = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut current.snapshot, &mut sent).await?;
        assert_eq!(sent, bytes);
        assert_eq!(std::fs::read_dir(dir.path().join("snapshots"))?.count(), 1);
        Ok(())
    }

    /// A snapshot stored whole in sled by an earlier version becomes a
    /// snapshot file on open; an install it belonged to is finished from it.
    #[tokio::test]
    async fn inline_snapshot_of_an_earlier_version_is_converted() -> anyhow::Result<()> {
        let (meta, bytes) = snapshot_of_a_used_state().await?;
        let entries: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)> = entries_of(&bytes)?
            .into_iter()
            .map(|(k, v)| (serde_bytes::ByteBuf::from(k), serde_bytes::ByteBuf::from(v)))
            .collect();
        // The earlier encoding: `{ meta, data: { entries } }` as msgpack arrays.
        let data = rmp_serde::to_vec(&(entries,))?;
        let inline = rmp_serde::to_vec(&(&meta, serde_bytes::ByteBuf::from(data)))?;
        let dir = tempfile::tempdir()?;
        {
            let disk = Disk::reopen(&dir.path().join("db"))?;
            let snapshots = disk.db().open_tree("snapshot")?;
            snapshots.insert(KEY_INLINE_SNAPSHOT, inline)?;
            disk.db().flush()?;
        }
        let mut sm = open(&dir)?;
        assert_eq!(sm.applied_state().await?.0, Some(log_id(3)));
        assert!(sm.reader().active().is_some(), "the guest came with it");
        let mut current = sm
            .get_current_snapshot()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no current snapshot after the conversion"))?;
        assert_eq!(current.meta, meta);
        let mut converted = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut current.snapshot, &mut converted).await?;
        assert_eq!(converted, bytes);
        assert!(sm.snapshots.get(KEY_INLINE_SNAPSHOT)?.is_none());
        Ok(())
    }
}
