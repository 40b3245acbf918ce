//! `StateMachineStore`: opens the state, applies committed entries through
//! the active guest in one redo record per apply call, and collects the
//! changes the watch feed publishes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use openraft::EntryPayload;
use openraft::storage::RaftStateMachine;

use super::keys::{STATE_TREE, SledState, guest_key};
use super::lifecycle::Compiler;
use super::reader::StateReader;
use super::snapshot::{
    SnapshotBuilder, convert_inline_snapshot, open_current_snapshot, replace_state,
};
use super::{read_err, write_err};
use crate::raft::disk::Disk;
use crate::raft::redo::{self, RedoHead, Write};
use crate::raft::snapshot_file::{SnapshotDir, SnapshotFile};
use crate::raft::{Op, OpOutput, OpResult, Request, Response, TypeConfig, typ};
use crate::runtime::{Context, GuestInstance, GuestRuntime};
use crate::watch::{EntryChanges, WatchHub};

/// openraft's state machine over the sled tree `state`.
#[derive(Debug)]
pub struct StateMachineStore {
    pub(super) disk: Disk,
    pub(super) tree: sled::Tree,
    pub(super) snapshots: sled::Tree,
    pub(super) snapshot_dir: SnapshotDir,
    /// Held while a snapshot is made current, so that a build finishing
    /// and an install cannot interleave their checks and stores.
    pub(super) storing: Arc<tokio::sync::Mutex<()>>,
    pub(super) runtime: GuestRuntime,
    pub(super) reader: StateReader,
    /// The apply instance of the active guest.
    pub(super) instance: Option<GuestInstance>,
    /// Staged module bytes by hash (also in the tree; kept here so that an
    /// activation applied in the same batch as its stage finds them).
    pub(super) staged: HashMap<String, Vec<u8>>,
    /// The staged hashes, earliest staged first (also in the tree).
    pub(super) staged_order: Vec<String>,
    /// Compiles staged modules in the background.
    pub(super) compiler: Compiler,
    pub(super) applied: Option<typ::LogId>,
    pub(super) membership: typ::StoredMembership,
    pub(super) time_ms: u64,
    /// The sequence number of the last redo record.
    pub(super) redo_seq: u64,
    /// The watch feed this node records applied changes into, if any.
    pub(super) watch: Option<Arc<WatchHub>>,
    /// The guest keys written by the current entry's commands so far.
    pub(super) touched: Vec<Vec<u8>>,
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
    pub(super) fn collect_touched(&mut self) {
        if self.watch.is_some()
            && let Some(instance) = self.instance.as_mut()
        {
            self.touched.extend(instance.take_touched());
        }
    }

    /// What the entry at `index` changed, as the active guest describes it;
    /// `None` when it changed nothing or nobody records changes.
    pub(super) fn entry_changes(
        &mut self,
        index: u64,
    ) -> Result<Option<EntryChanges>, typ::StorageError> {
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

    /// Reads the redo head and the guests back from the tree.
    pub(super) fn load_meta(&mut self) -> Result<(), typ::StorageError> {
        let head = redo::read_head(&self.tree)
            .map_err(read_err)?
            .unwrap_or_default();
        self.applied = head.applied;
        self.membership = head.membership;
        self.time_ms = head.time_ms;
        self.redo_seq = head.seq;
        self.load_guests()
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
        self.snapshot_builder().await
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, typ::StorageError> {
        self.receive_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &typ::SnapshotMeta,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), typ::StorageError> {
        self.install(meta, snapshot).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<typ::Snapshot>, typ::StorageError> {
        open_current_snapshot(&self.snapshots, &self.snapshot_dir).await
    }
}
