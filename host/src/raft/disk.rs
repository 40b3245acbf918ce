//! `Disk`: the node's sled database — the state and the small Raft records
//! (vote, committed, purge point) — and the only place that makes it
//! durable. Nothing on the write path flushes it: the node flushes it in
//! the background every second, and for a vote, a purge or a snapshot.
//!
//! sled writes items over about 128 KiB to files of their own under
//! `blobs/` and never syncs them; `flush` syncs the new ones first, so a
//! flushed large item is as durable as a small one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openraft::{AnyError, StorageIOError};
use serde::de::DeserializeOwned;

use super::{NodeId, typ};
use crate::metrics::LatencyHistogram;

/// Items at least this long may be stored as separate blob files (sled's
/// threshold is a quarter of its 512 KiB segment, less headers).
pub const LARGE_ITEM: usize = 64 << 10;

/// The node's sled database and the flush that makes it durable.
///
/// Guarantee: when [`Disk::flush`] returns `Ok`, every write made to any tree
/// of the database before the call survives a process crash or an OS crash
/// (see the README's Durability section for what sled's sync covers).
#[derive(Debug, Clone)]
pub struct Disk {
    db: sled::Db,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    blobs: PathBuf,
    /// Set when an item that may have become a blob file was written since
    /// the last flush.
    large_written: AtomicBool,
    /// The highest blob file name (sled names them by log sequence number)
    /// known to be synced.
    synced_blob: Mutex<u64>,
    flushes: LatencyHistogram,
}

impl Disk {
    /// Opens (or creates) the database in `dir`.
    ///
    /// sled's own periodic flush is turned off: every sync happens in
    /// [`Disk::flush`], where large items are synced before the log that
    /// points at them.
    ///
    /// # Errors
    /// When sled cannot open the directory.
    pub fn open(dir: &Path) -> sled::Result<Self> {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        Ok(Self::new(db, dir))
    }

    /// Opens the database in `dir` once the previous holder of its lock has
    /// let go, for tests that reopen a database in the same process: sled's
    /// I/O threads can hold the file for a moment after the last handle is
    /// dropped.
    ///
    /// # Errors
    /// When sled cannot open it, or the lock stays taken for 10 s.
    #[cfg(test)]
    pub fn reopen(dir: &Path) -> sled::Result<Self> {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Self::open(dir) {
                Err(e) if lock_taken(&e) && Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    fn new(db: sled::Db, dir: &Path) -> Self {
        Self {
            db,
            inner: Arc::new(Inner {
                blobs: dir.join("blobs"),
                large_written: AtomicBool::new(false),
                synced_blob: Mutex::new(0),
                flushes: LatencyHistogram::disk_flushes(),
            }),
        }
    }

    /// The database, for opening trees.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Records that an item of `len` bytes is about to be written, so that
    /// the next flush syncs the blob file sled may put it in.
    pub fn note_write(&self, len: usize) {
        if len >= LARGE_ITEM {
            self.inner.large_written.store(true, Ordering::Release);
        }
    }

    /// How long flushes took, for `/metrics`.
    pub fn flushes(&self) -> &LatencyHistogram {
        &self.inner.flushes
    }

    /// Makes every earlier write durable: syncs new blob files, then sled's
    /// log (one `pwrite` and `sync_file_range` of the dirty buffer). Blocks
    /// the calling thread for the sync itself.
    ///
    /// # Errors
    /// When a sync fails; the caller must not acknowledge anything then.
    pub async fn flush(&self) -> std::io::Result<()> {
        if self.inner.large_written.load(Ordering::Acquire) {
            let disk = self.clone();
            return tokio::task::spawn_blocking(move || disk.flush_blocking())
                .await
                .map_err(std::io::Error::other)?;
        }
        // Called directly rather than through `flush_async`, which hands the
        // call to sled's thread pool: one thread hop less.
        self.flush_blocking()
    }

    /// [`Disk::flush`] on the calling thread, blob files included.
    ///
    /// # Errors
    /// When a sync fails.
    pub fn flush_blocking(&self) -> std::io::Result<()> {
        let started = Instant::now();
        if self.inner.large_written.swap(false, Ordering::AcqRel)
            && let Err(e) = self.inner.sync_new_blobs()
        {
            self.inner.large_written.store(true, Ordering::Release);
            return Err(e);
        }
        self.db.flush().map_err(std::io::Error::other)?;
        self.inner.flushes.observe(started.elapsed());
        Ok(())
    }
}

/// Whether sled refused to open a database because another handle holds its
/// lock. sled reports it as an `Other` I/O error whose message alone carries
/// the OS's `WouldBlock`.
#[cfg(test)]
fn lock_taken(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

impl Inner {
    /// `fsync`s every blob file newer than the last one synced, then the
    /// blob directory (so the new names survive too).
    fn sync_new_blobs(&self) -> std::io::Result<()> {
        let mut synced = self
            .synced_blob
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut newest = *synced;
        for entry in entries {
            let entry = entry?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u64>().ok())
            else {
                continue;
            };
            if lsn > *synced {
                match std::fs::File::open(entry.path()) {
                    Ok(file) => file.sync_all()?,
                    // sled removed it meanwhile: nothing points at it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                newest = newest.max(lsn);
            }
        }
        std::fs::File::open(&self.blobs)?.sync_all()?;
        *synced = newest;
        Ok(())
    }
}

/// Reads and decodes (MessagePack) the value under `key` of `tree`; `None`
/// if it was never written. `to_err` says what was being read, as one of
/// openraft's `StorageIOError` constructors (`read_vote`, `read_logs`,
/// `read_state_machine`, ...), so that a failure names its subject.
///
/// # Errors
/// When sled cannot read the tree or the value does not decode as a `T`.
pub fn read_meta<T: DeserializeOwned>(
    tree: &sled::Tree,
    key: &[u8],
    to_err: fn(AnyError) -> StorageIOError<NodeId>,
) -> Result<Option<T>, typ::StorageError> {
    let Some(bytes) = tree.get(key).map_err(|e| to_err(AnyError::new(&e)))? else {
        return Ok(None);
    };
    rmp_serde::from_slice(&bytes)
        .map(Some)
        .map_err(|e| to_err(AnyError::new(&e)).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_lock_is_recognised_and_reopen_waits_for_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let first = Disk::open(dir.path())?;
        let refused = Disk::open(dir.path()).expect_err("the lock is held");
        assert!(lock_taken(&refused), "{refused}");

        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(first);
        });
        let reopened = Disk::reopen(dir.path())?;
        holder.join().expect("the holder thread");
        reopened.db().insert(b"k", b"v")?;
        Ok(())
    }
}
