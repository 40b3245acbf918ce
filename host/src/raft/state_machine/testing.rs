//! Fixtures for the state machine's unit tests.

use openraft::storage::{RaftSnapshotBuilder as _, RaftStateMachine as _};
use openraft::{CommittedLeaderId, EntryPayload, LogId};

use super::StateMachineStore;
use crate::raft::disk::Disk;
use crate::raft::snapshot_file::{self, SnapshotFile};
use crate::raft::{Op, Request, typ};
use crate::runtime::{BUNDLED_GUEST, GuestRuntime, Limits};

pub(super) fn log_id(index: u64) -> typ::LogId {
    LogId::new(CommittedLeaderId::new(1, 0), index)
}

pub(super) fn entry(index: u64, ops: Vec<Op>) -> typ::Entry {
    typ::Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Request {
            time_ms: index,
            ops,
        }),
    }
}

pub(super) fn open(dir: &tempfile::TempDir) -> anyhow::Result<StateMachineStore> {
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
pub(super) async fn used_state(dir: &tempfile::TempDir) -> anyhow::Result<StateMachineStore> {
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
pub(super) async fn snapshot_of_a_used_state() -> anyhow::Result<(typ::SnapshotMeta, Vec<u8>)> {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir()?;
    let mut sm = used_state(&dir).await?;
    let mut snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
    let mut bytes = Vec::new();
    snapshot.snapshot.read_to_end(&mut bytes).await?;
    Ok((snapshot.meta, bytes))
}

/// `bytes` as a snapshot file received by `sm`, ready to install.
pub(super) async fn received(
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
pub(super) fn entries_of(bytes: &[u8]) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut reader = snapshot_file::Reader::new(bytes)?;
    let mut entries = Vec::new();
    while let Some(entry) = reader.next_entry()? {
        entries.push(entry);
    }
    Ok(entries)
}

/// A snapshot file's bytes holding `entries`.
pub(super) fn snapshot_bytes(entries: &[(Vec<u8>, Vec<u8>)]) -> anyhow::Result<Vec<u8>> {
    let mut writer = snapshot_file::Writer::new(Vec::new())?;
    for (key, value) in entries {
        writer.entry(key, value)?;
    }
    Ok(writer.finish()?)
}

pub(super) fn meta(index: u64) -> typ::SnapshotMeta {
    typ::SnapshotMeta {
        last_log_id: Some(log_id(index)),
        last_membership: typ::StoredMembership::default(),
        snapshot_id: format!("test-{index}"),
    }
}

/// The bundled guest with a custom section appended: the same guest
/// under another hash.
pub(super) fn variant(n: u8) -> Vec<u8> {
    let mut module = BUNDLED_GUEST.to_vec();
    module.extend_from_slice(&[0, 5, 3, b'p', b'a', b'd', n]);
    module
}

pub(super) fn hash_of(module: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(module))
}

pub(super) fn stage(index: u64, module: Vec<u8>) -> typ::Entry {
    entry(index, vec![Op::StageGuest { module }])
}
