//! Seeding a new data directory from a backup, so that
//! `raftwasm --node DIR --bootstrap` founds a one-node cluster serving the
//! backed-up state.
//!
//! What carries over: every guest key, the active guest, staged guests and
//! the swap history (whose indexes name the old cluster's log), and the
//! last entry time (so that expiry never goes back). What does not: the
//! old membership, node ids, vote and log: the state's applied log id is
//! reset, so that the new cluster starts its log at index 0 on top of it.
//!
//! A restored directory holds a [`MARKER`] file until its node has founded
//! the cluster, taken a snapshot of the restored state and purged the log
//! before it: a node that joins later must receive that snapshot rather
//! than replay a log that does not hold the restored state.

use std::path::{Path, PathBuf};

use super::{BackupError, BackupHeader, Opened};
use crate::raft::disk::Disk;
use crate::raft::redo::{self, RedoHead};
use crate::raft::snapshot_file;
use crate::raft::state_machine::STATE_TREE;
use crate::runtime::{GuestRuntime, Limits};

/// The file in a restored data directory until its first snapshot.
pub const MARKER: &str = "restored";

/// Why a restore did not happen; nothing was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The target directory is in use.
    #[error("{0} is not empty (it may hold a node); restore into a new or empty directory")]
    NotEmpty(PathBuf),
    /// The file is not a usable backup.
    #[error("{path} cannot be restored: {error}; nothing was written")]
    Backup {
        /// The backup file.
        path: PathBuf,
        /// What is wrong with it.
        error: BackupError,
    },
    /// Writing the data directory failed; what was written is removed.
    #[error("cannot write the data directory {path}: {reason}; nothing was kept")]
    Write {
        /// The data directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Whether `dir` is missing or empty.
fn is_unused(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Checks the whole backup at `backup`, then seeds the data directory `dir`
/// (missing or empty) from it. Blocking: call it outside async code (on a
/// blocking thread, or without a runtime).
///
/// # Errors
/// [`RestoreError`]; `dir` is left as it was found.
pub fn restore(backup: &Path, dir: &Path) -> Result<BackupHeader, RestoreError> {
    if !is_unused(dir) {
        return Err(RestoreError::NotEmpty(dir.to_owned()));
    }
    let refused = |error| RestoreError::Backup {
        path: backup.to_owned(),
        error,
    };
    let runtime = GuestRuntime::new(Limits::default(), None).map_err(|e| RestoreError::Write {
        path: dir.to_owned(),
        reason: format!("cannot start the guest runtime: {e}"),
    })?;
    let header = super::verify(backup, &runtime).map_err(refused)?;
    let existed = dir.exists();
    seed(backup, dir).map_err(|reason| {
        // Back to how it was found: missing, or empty.
        let _ = std::fs::remove_dir_all(dir);
        if existed {
            let _ = std::fs::create_dir(dir);
        }
        RestoreError::Write {
            path: dir.to_owned(),
            reason,
        }
    })?;
    Ok(header)
}

/// Writes the state of the (checked) backup into a new database in `dir`,
/// with a fresh redo head, then the marker.
fn seed(backup: &Path, dir: &Path) -> Result<(), String> {
    let Opened { file, .. } = super::open(backup).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let disk = Disk::open(&dir.join("db")).map_err(|e| e.to_string())?;
    let tree = disk.db().open_tree(STATE_TREE).map_err(|e| e.to_string())?;
    let mut reader = snapshot_file::Reader::new(file).map_err(|e| e.to_string())?;
    let mut time_ms = 0;
    while let Some((key, value)) = reader.next_entry().map_err(|e| e.to_string())? {
        if redo::is_head(&key) {
            let head: RedoHead = rmp_serde::from_slice(&value).map_err(|e| e.to_string())?;
            time_ms = head.time_ms;
        }
        // The old redo record describes the old log; a fresh head replaces it.
        if redo::is_record_key(&key) {
            continue;
        }
        disk.note_write(value.len());
        tree.insert(key, value).map_err(|e| e.to_string())?;
    }
    let head = RedoHead {
        time_ms,
        ..RedoHead::default()
    };
    let head = rmp_serde::to_vec(&head).map_err(|e| e.to_string())?;
    tree.insert(redo::KEY_HEAD, head)
        .map_err(|e| e.to_string())?;
    // Through the disk's own flush, which also syncs the files sled keeps
    // large items (guest modules) in.
    let flushed = match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(disk.flush()),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .build()
            .and_then(|runtime| runtime.block_on(disk.flush())),
    };
    flushed.map_err(|e| e.to_string())?;
    drop(tree);
    drop(disk);
    let marker = dir.join(MARKER);
    std::fs::write(
        &marker,
        b"restored from a backup; removed once the first snapshot is taken\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_used_directory_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("db"), b"x")?;
        let refused = restore(&dir.path().join("backup"), dir.path());
        assert!(
            matches!(refused, Err(RestoreError::NotEmpty(_))),
            "{refused:?}"
        );
        Ok(())
    }

    #[test]
    fn a_foreign_file_is_refused_and_nothing_written() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, b"just some text, not a backup\n")?;
        let target = dir.path().join("node");
        let refused = restore(&file, &target);
        assert!(
            matches!(
                refused,
                Err(RestoreError::Backup {
                    error: BackupError::NotABackup,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert!(!target.exists());
        Ok(())
    }
}
