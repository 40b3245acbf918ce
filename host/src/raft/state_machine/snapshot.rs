//! Snapshots: building one from the tree, checking and installing a
//! received one, the file that is current, and the checks a state's host
//! entries must pass.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::Snapshot;
use openraft::{RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::apply::StateMachineStore;
use super::keys::{
    KEY_GUEST_HASH, KEY_GUEST_HISTORY, KEY_GUEST_MODULE, KEY_GUEST_SINCE, KEY_STAGED_ORDER,
    is_host_key, is_state_key,
};
use super::reader::CommitGate;
use super::{SwapRecord, encode, io_err, read_err, write_err};
use crate::raft::disk::{Disk, read_meta};
use crate::raft::redo::{self, RedoHead};
use crate::raft::snapshot_file::{self, SnapshotDir, SnapshotFile};
use crate::raft::{TypeConfig, typ};
use crate::runtime::GuestRuntime;

/// The current snapshot's [`StoredSnapshot`], in the `snapshot` tree.
pub(super) const KEY_SNAPSHOT: &[u8] = b"current-file";
/// Where earlier versions kept the current snapshot whole ([`InlineSnapshot`]).
pub(super) const KEY_INLINE_SNAPSHOT: &[u8] = b"current";

/// The current snapshot: what it covers and its file in the snapshot
/// directory.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct StoredSnapshot {
    pub(super) meta: typ::SnapshotMeta,
    pub(super) file: String,
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

/// Replaces the whole state tree with the entries of the snapshot file at
/// `path` (checked already), one entry at a time.
///
/// The redo head goes first and comes back last, so a crash part way
/// leaves a state that reports an older applied id than the stored
/// snapshot, and `open` installs it again.
pub(super) fn replace_state(
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
pub(super) fn check_snapshot(
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
pub(super) fn dump_tree(tree: &sled::Tree, path: &Path) -> std::io::Result<()> {
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
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, typ::StorageError> + Send + 'static,
) -> Result<T, typ::StorageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| write_err(format!("snapshot work failed: {e}")))?
}

/// Makes the synced snapshot file `part` the current snapshot: moves it into
/// place, records it (flushed), then removes the file it replaces. Returns
/// the path of its file.
pub(super) async fn store_snapshot(
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
pub(super) async fn open_current_snapshot(
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
pub(super) fn convert_inline_snapshot(
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
    /// Writes the tree to a snapshot file for the builder openraft asks
    /// for next.
    pub(super) async fn snapshot_builder(&mut self) -> SnapshotBuilder {
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

    /// A new temporary file for a snapshot a leader sends.
    pub(super) async fn receive_snapshot(
        &mut self,
    ) -> Result<Box<SnapshotFile>, typ::StorageError> {
        let part = self.snapshot_dir.part_path("receive");
        let file = SnapshotFile::create_temporary(&part)
            .await
            .map_err(write_err)?;
        Ok(Box::new(file))
    }

    /// Checks the received snapshot, stores it as the current one, then
    /// replaces the state with it.
    pub(super) async fn install(
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

    pub(super) fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, typ::StorageError> {
        read_meta(
            &self.snapshots,
            KEY_SNAPSHOT,
            StorageIOError::read_state_machine,
        )
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
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::EntryPayload;
    use openraft::storage::{RaftSnapshotBuilder as _, RaftStateMachine as _};

    use super::*;
    use crate::raft::state_machine::keys::GUEST;
    use crate::raft::state_machine::testing::*;
    use crate::raft::{NodeId, NodeInfo, Op};
    use crate::runtime::BUNDLED_GUEST;

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

    fn set(index: u64, key: &[u8], value: &[u8]) -> typ::Entry {
        let set = guest_kv::command::Command::Set {
            key,
            value,
            ttl_ms: 0,
        };
        entry(index, vec![Op::Apply(set.encode())])
    }

    fn membership(index: u64, voters: &[NodeId]) -> typ::Entry {
        let voters: BTreeSet<NodeId> = voters.iter().copied().collect();
        let nodes: BTreeMap<NodeId, NodeInfo> =
            voters.iter().map(|id| (*id, NodeInfo::default())).collect();
        typ::Entry {
            log_id: log_id(index),
            payload: EntryPayload::Membership(openraft::Membership::new(vec![voters], nodes)),
        }
    }

    /// What a state is: its state hash, applied id and membership.
    async fn fingerprint(
        sm: &mut StateMachineStore,
    ) -> anyhow::Result<(String, Option<typ::LogId>, typ::StoredMembership)> {
        let (applied, membership) = sm.applied_state().await?;
        Ok((sm.reader().state_hash()?, applied, membership))
    }

    /// A state machine in `dir` at index 4 with voter 1 and the key `old`.
    async fn old_state(dir: &tempfile::TempDir) -> anyhow::Result<StateMachineStore> {
        let mut sm = open(dir)?;
        sm.apply([
            stage(1, BUNDLED_GUEST.to_vec()),
            entry(
                2,
                vec![Op::ActivateGuest {
                    hash: hash_of(BUNDLED_GUEST),
                    force: true,
                }],
            ),
            membership(3, &[1]),
        ])
        .await?;
        sm.apply([set(4, b"old", b"1")]).await?;
        Ok(sm)
    }

    /// A snapshot at index 6 with voters 1 and 2 and forty keys of its own,
    /// and the state hash it holds.
    async fn new_snapshot() -> anyhow::Result<(typ::SnapshotMeta, Vec<u8>, String)> {
        use tokio::io::AsyncReadExt as _;
        let dir = tempfile::tempdir()?;
        let mut sm = open(&dir)?;
        sm.apply([
            stage(1, BUNDLED_GUEST.to_vec()),
            entry(
                2,
                vec![Op::ActivateGuest {
                    hash: hash_of(BUNDLED_GUEST),
                    force: true,
                }],
            ),
            membership(3, &[1, 2]),
        ])
        .await?;
        let keys: Vec<Op> = (0..40)
            .map(|n| {
                let key = format!("new-{n:02}");
                let set = guest_kv::command::Command::Set {
                    key: key.as_bytes(),
                    value: b"v",
                    ttl_ms: 0,
                };
                Op::Apply(set.encode())
            })
            .collect();
        sm.apply([entry(4, keys), set(5, b"old", b"2"), set(6, b"last", b"3")])
            .await?;
        let state_hash = sm.reader().state_hash()?;
        let mut snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
        let mut bytes = Vec::new();
        snapshot.snapshot.read_to_end(&mut bytes).await?;
        Ok((snapshot.meta, bytes, state_hash))
    }

    /// A snapshot install cut off part way leaves the old state or, once the
    /// snapshot is stored, the whole snapshot after a reopen — never a mix —
    /// with the applied id and membership of the state it holds.
    #[tokio::test]
    async fn interrupted_snapshot_install_ends_as_the_old_state_or_the_whole_snapshot()
    -> anyhow::Result<()> {
        let (meta, bytes, snapshot_hash) = new_snapshot().await?;
        let dir = tempfile::tempdir()?;
        let old = {
            let mut sm = old_state(&dir).await?;
            fingerprint(&mut sm).await?
        };
        assert_ne!(old.0, snapshot_hash);

        // Cut off while receiving: nothing is stored, the old state stays.
        {
            let mut sm = open(&dir)?;
            let cut = received(&mut sm, &bytes[..bytes.len() / 2]).await?;
            assert!(sm.install_snapshot(&meta, cut).await.is_err());
        }
        let mut sm = open(&dir)?;
        assert_eq!(fingerprint(&mut sm).await?, old);
        assert!(sm.get_current_snapshot().await?.is_none());

        // Cut off while replacing the state, after the snapshot was stored
        // (as `install` does): the file read runs out among the guest keys.
        let mut file = received(&mut sm, &bytes).await?;
        store_snapshot(
            &sm.disk,
            &sm.snapshots,
            &sm.snapshot_dir,
            file.path(),
            &meta,
        )
        .await?;
        file.keep();
        drop(file);
        let cut = dir.path().join("cut-short");
        std::fs::write(&cut, &bytes[..bytes.len() - 200])?;
        let replaced = replace_state(&sm.tree, &sm.disk, &sm.reader.gate, &cut);
        assert!(replaced.is_err(), "a cut-short file replaced the state");
        // The tree now holds part of the snapshot and no applied id.
        assert!(redo::read_head(&sm.tree)?.is_none());
        let partial = sm.reader().state_hash()?;
        assert!(
            partial != old.0 && partial != snapshot_hash,
            "the cut changed nothing"
        );
        let guest_entries = |entries: &mut dyn Iterator<Item = Vec<u8>>| {
            entries.filter(|key| key.first() == Some(&GUEST)).count()
        };
        let in_snapshot = guest_entries(&mut entries_of(&bytes)?.into_iter().map(|(k, _)| k));
        let in_tree = guest_entries(&mut sm.tree.iter().keys().map(|k| k.expect("key").to_vec()));
        assert!(
            0 < in_tree && in_tree < in_snapshot,
            "{in_tree} of the snapshot's {in_snapshot} guest entries were written"
        );
        drop(sm);

        let mut sm = open(&dir)?;
        let (state_hash, applied, membership) = fingerprint(&mut sm).await?;
        assert_eq!(state_hash, snapshot_hash);
        assert_eq!(applied, meta.last_log_id);
        assert_eq!(membership, meta.last_membership);
        let voters: Vec<NodeId> = membership.membership().voter_ids().collect();
        assert_eq!(voters, [1, 2]);
        assert!(sm.reader().active().is_some(), "the guest came with it");
        Ok(())
    }
}
