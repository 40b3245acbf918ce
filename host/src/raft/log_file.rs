//! `LogFile`: the Raft log's entries in segment files of checksummed
//! records, appended with one `pwrite` and one sync per batch of entries.
//!
//! sled held the log before. Its flush costs 0.15–0.26 ms (it seals its IO
//! buffer and hands it between threads), where writing and syncing the same
//! bytes directly costs about 0.07 ms, and a write waits for two of them in
//! sequence: the leader's, then a follower's. sled keeps the state.
//!
//! # Files
//! `DIR/<first index, 20 digits>.seg`. A segment is made at its full size
//! and filled with zeros, synced, and only then given its name, so a later
//! sync of written bytes never has to change the file's size or extents:
//! `sync_file_range` on those bytes alone makes them survive an OS crash.
//! A record is `[len u32][crc u32][index u64][len bytes of rmp-serde Entry]`
//! (little-endian; the CRC-32 covers the index and the payload), and the
//! records of a segment hold increasing indexes.
//!
//! # Invariants
//! - Past the last record of the last segment, the file holds zeros. An
//!   append writes there and syncs; a truncation zeroes what it removes and
//!   syncs; opening zeroes whatever a crash left after the last whole record.
//!   So a record that is read back was appended and never truncated.
//! - Indexes grow from record to record and from segment to segment.
//!   Removing a suffix deletes the later segments newest first, then zeroes
//!   the rest in the segment that keeps a part: a crash part way leaves a
//!   prefix of the log, never removed records after a kept one.
//! - openraft appends consecutive indexes; the log also accepts an append
//!   after a hole (its conformance suite makes some) and an append at or
//!   below the last index, which replaces the entries from there on.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use super::typ;
use crate::metrics::LatencyHistogram;

/// The size of a new segment; a record larger than this gets a segment of
/// its own size.
pub const SEGMENT_BYTES: u64 = 32 << 20;
const HEADER: usize = 16;
/// Record bytes whose entries are kept in memory (see [`Slot::entry`]).
const CACHED_BYTES: u64 = 16 << 20;
const SUFFIX: &str = ".seg";
/// The ending of the names segments are prepared under, before they are
/// given their real names; opening removes such files.
const PREPARING: &str = ".tmp";
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
/// The bytes of a new segment written and synced at a time.
const PREPARE_PIECE: u64 = 1 << 20;

/// How an append is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogSync {
    /// `sync_file_range` of the appended bytes: they reach the disk, so they
    /// survive a process or OS crash, but a disk with a volatile write cache
    /// may still lose them in a power loss.
    #[default]
    Range,
    /// `fdatasync`: also flushes the disk's write cache, so appended entries
    /// survive a power loss too (what etcd does); slower.
    Fdatasync,
}

/// Why the log file failed.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    /// A read, write, sync or directory operation failed.
    #[error("log file i/o: {0}")]
    Io(#[from] io::Error),
    /// An entry could not be encoded.
    #[error("cannot encode log entry {index}: {source}")]
    Encode {
        index: u64,
        source: rmp_serde::encode::Error,
    },
    /// A record passed its checksum but does not decode, or the files do
    /// not fit together: the log is damaged.
    #[error("the log is damaged: {0}")]
    Damaged(String),
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    /// The index of its first record (its name).
    first: u64,
    path: PathBuf,
    file: File,
    size: u64,
}

/// Where one entry's record lies, and the entry itself while it is recent.
#[derive(Debug, Clone)]
struct Slot {
    segment: Arc<Segment>,
    offset: u64,
    len: u32,
    /// The entry as appended, kept for the last [`CACHED_BYTES`] of records:
    /// replication and apply read what was just appended, and a copy is
    /// cheaper than a read and a decode.
    entry: Option<Arc<typ::Entry>>,
}

impl Slot {
    fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Oldest first; the last one is where appends go.
    segments: Vec<Arc<Segment>>,
    /// The records held, by index.
    slots: BTreeMap<u64, Slot>,
    /// No entry below this index is held: one past the purge point.
    first: u64,
    /// Where the next record goes in the last segment.
    end: u64,
    /// Record bytes of the slots that keep their entry.
    cached: u64,
    /// No slot below this index keeps its entry.
    cached_from: u64,
    /// The next segment, zero-filled and synced by a thread of its own, so
    /// that starting a segment does not stall appends.
    spare: Option<std::thread::JoinHandle<io::Result<(File, PathBuf)>>>,
}

/// The Raft log's entries on disk. Cloning shares it.
///
/// Appends, truncations and purges come from one caller at a time
/// (openraft's core); reads may run concurrently with them and see every
/// entry whose append has returned.
#[derive(Debug, Clone)]
pub struct LogFile {
    inner: Arc<RwLock<Inner>>,
    sync: LogSync,
    syncs: LatencyHistogram,
}

impl LogFile {
    /// Opens (or creates) the log in `dir`, dropping entries at or below
    /// `purged` and whatever a crash left unfinished.
    ///
    /// # Errors
    /// When a file cannot be read, written or removed, a whole record does
    /// not decode, or the segments overlap.
    pub fn open(dir: &Path, purged: Option<u64>, sync: LogSync) -> Result<Self, LogFileError> {
        std::fs::create_dir_all(dir)?;
        let mut names = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let name = item?.file_name();
            if name.to_str().is_some_and(|n| n.ends_with(PREPARING)) {
                remove_file(&dir.join(&name))?;
            }
            if let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            {
                names.push(first);
            }
        }
        names.sort_unstable();

        let mut inner = Inner {
            dir: dir.to_owned(),
            segments: Vec::new(),
            slots: BTreeMap::new(),
            first: purged.map_or(0, |p| p + 1),
            end: 0,
            cached: 0,
            cached_from: 0,
            spare: None,
        };
        let mut tail_dirty = false;
        for first in names {
            if let Some(last) = inner.last_index()
                && first <= last
            {
                return Err(LogFileError::Damaged(format!(
                    "segment {first} starts at or before entry {last} of the one before it"
                )));
            }
            let path = segment_path(dir, first);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let size = file.metadata()?.len();
            let segment = Arc::new(Segment {
                first,
                path,
                file,
                size,
            });
            let (end, kept, torn) = inner.recover(&segment)?;
            // Every record it holds is purged (or, empty, it begins below
            // the purge point): a purge that a crash cut short.
            if kept == 0 && (end > 0 || first < inner.first) {
                remove_file(&segment.path)?;
                continue;
            }
            inner.segments.push(segment);
            inner.end = end;
            tail_dirty = torn;
        }
        // Bytes after the last whole record that are not zero: a write a
        // crash cut short. Zeroed, so nothing appended later can be read
        // back together with them.
        if tail_dirty && let Some(last) = inner.segments.last().cloned() {
            zero(&last.file, inner.end, last.size)?;
            last.file.sync_data()?;
        }
        Ok(Self {
            inner: Arc::new(RwLock::new(inner)),
            sync,
            syncs: LatencyHistogram::log_syncs(),
        })
    }

    /// How long the syncs of appends took, for `/metrics`.
    pub fn syncs(&self) -> &LatencyHistogram {
        &self.syncs
    }

    /// The index of the last entry held, if any.
    pub fn last_index(&self) -> Option<u64> {
        self.read().last_index()
    }

    /// Appends `entries` (in increasing index order) and returns once they
    /// are durable. An entry at or below the last one held replaces the
    /// entries from its index on.
    ///
    /// # Errors
    /// When an entry is out of order or cannot be encoded, or a write or
    /// sync fails. The log then holds a prefix of the entries, or none.
    pub fn append(
        &self,
        entries: impl IntoIterator<Item = typ::Entry>,
    ) -> Result<(), LogFileError> {
        let mut entries = entries.into_iter().peekable();
        let Some(first) = entries.peek().map(|e| e.log_id.index) else {
            return Ok(());
        };
        if self.last_index().is_some_and(|last| first <= last) {
            self.truncate(first)?;
        }
        let (mut segment, mut end, mut previous) = {
            let mut inner = self.write();
            if inner.slots.is_empty() {
                inner.first = inner.first.min(first);
            }
            (
                inner.segments.last().cloned(),
                inner.end,
                inner.last_index(),
            )
        };
        let mut buf = Vec::new();
        let mut pending: Vec<(typ::Entry, u32)> = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            if previous.is_some_and(|p| index <= p) {
                return Err(LogFileError::Damaged(format!(
                    "entry {index} appended after entry {}",
                    previous.unwrap_or_default()
                )));
            }
            let start = buf.len();
            encode(&mut buf, &entry)?;
            let len = (buf.len() - start) as u64;
            let fits = segment
                .as_ref()
                .is_some_and(|s| end + start as u64 + len <= s.size);
            if !fits {
                // Write what is buffered for the old segment, then start a
                // new one with this record.
                let record = buf.split_off(start);
                if let Some(s) = &segment {
                    self.write_records(s, end, &buf, std::mem::take(&mut pending))?;
                }
                segment = Some(self.new_segment(index, len)?);
                end = 0;
                buf = record;
            }
            pending.push((entry, len as u32));
            previous = Some(index);
        }
        if let Some(s) = &segment {
            self.write_records(s, end, &buf, pending)?;
        }
        Ok(())
    }

    /// Writes `buf` (the records `pending`) at `offset` of `segment`, syncs
    /// it and makes the records readable.
    fn write_records(
        &self,
        segment: &Arc<Segment>,
        offset: u64,
        buf: &[u8],
        pending: Vec<(typ::Entry, u32)>,
    ) -> Result<(), LogFileError> {
        if pending.is_empty() {
            return Ok(());
        }
        segment.file.write_all_at(buf, offset)?;
        let started = Instant::now();
        match self.sync {
            LogSync::Range => sync_range(&segment.file, offset, buf.len() as u64)?,
            LogSync::Fdatasync => segment.file.sync_data()?,
        }
        self.syncs.observe(started.elapsed());
        let mut inner = self.write();
        let mut at = offset;
        for (entry, len) in pending {
            inner.slots.insert(
                entry.log_id.index,
                Slot {
                    segment: segment.clone(),
                    offset: at,
                    len,
                    entry: Some(Arc::new(entry)),
                },
            );
            at += len as u64;
            inner.cached += len as u64;
        }
        inner.end = at;
        inner.evict();
        Ok(())
    }

    /// Makes the segment that starts at `first`, big enough for a record of
    /// `len` bytes, and makes it the last one. A segment of the usual size
    /// is the spare one prepared in the background, if there is one; the
    /// next spare is started here.
    fn new_segment(&self, first: u64, len: u64) -> Result<Arc<Segment>, LogFileError> {
        let dir = self.read().dir.clone();
        let size = SEGMENT_BYTES.max(len.next_multiple_of(ZEROS.len() as u64));
        let spare = if size == SEGMENT_BYTES {
            self.write().spare.take()
        } else {
            None
        };
        let (file, prepared) = match spare.map(std::thread::JoinHandle::join) {
            Some(Ok(Ok(spare))) => spare,
            // No spare, or its thread failed: make it here.
            _ => zeroed_file(&dir, size)?,
        };
        let path = segment_path(&dir, first);
        std::fs::rename(&prepared, &path)?;
        File::open(&dir)?.sync_all()?;
        let segment = Arc::new(Segment {
            first,
            path,
            file,
            size,
        });
        let mut inner = self.write();
        inner.segments.push(segment.clone());
        inner.end = 0;
        if inner.spare.is_none() {
            inner.spare = std::thread::Builder::new()
                .name("log-segment".into())
                .spawn(move || zeroed_file(&dir, SEGMENT_BYTES))
                .ok();
        }
        Ok(segment)
    }

    /// The entries whose index lies in `range` (those held).
    ///
    /// # Errors
    /// When a read fails or a record does not decode.
    pub fn read_range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<typ::Entry>, LogFileError> {
        let slots: Vec<Slot> = {
            let inner = self.read();
            if range_is_empty(&range) {
                return Ok(Vec::new());
            }
            inner
                .slots
                .range(range)
                .map(|(_, slot)| slot.clone())
                .collect()
        };
        let mut entries = Vec::with_capacity(slots.len());
        // The records of one segment lie back to back: one `pread` for each
        // run of them that is not cached.
        let same_run = |a: &Slot, b: &Slot| {
            a.entry.is_some() == b.entry.is_some() && Arc::ptr_eq(&a.segment, &b.segment)
        };
        for run in slots.chunk_by(same_run) {
            if run[0].entry.is_some() {
                entries.extend(run.iter().filter_map(|slot| slot.entry.as_deref().cloned()));
                continue;
            }
            let (from, to) = (run[0].offset, run[run.len() - 1].end());
            let segment = &run[0].segment;
            let mut buf = vec![0; (to - from) as usize];
            segment.file.read_exact_at(&mut buf, from)?;
            for slot in run {
                let at = (slot.offset - from) as usize;
                let payload = &buf[at + HEADER..at + slot.len as usize];
                entries.push(decode(payload).map_err(|e| {
                    LogFileError::Damaged(format!("a record in {}: {e}", segment.path.display()))
                })?);
            }
        }
        Ok(entries)
    }

    /// Removes the entries from `first` on, and returns once that is durable.
    ///
    /// # Errors
    /// When zeroing, syncing or removing a file fails.
    pub fn truncate(&self, first: u64) -> Result<(), LogFileError> {
        let mut inner = self.write();
        let Some(cut) = inner
            .slots
            .range(first..)
            .next()
            .map(|(_, slot)| slot.clone())
        else {
            return Ok(());
        };
        // Later segments go newest first, then the removed records of the
        // segment that keeps some are zeroed: a prefix of the log at every
        // step.
        let position = inner
            .segments
            .iter()
            .position(|s| Arc::ptr_eq(s, &cut.segment))
            .ok_or_else(|| LogFileError::Damaged(format!("entry {first} has no segment")))?;
        let later: Vec<_> = inner.segments.drain(position + 1..).collect();
        for segment in later.iter().rev() {
            remove_file(&segment.path)?;
        }
        if !later.is_empty() {
            File::open(&inner.dir)?.sync_all()?;
        }
        let zero_to = if later.is_empty() {
            inner.end
        } else {
            cut.segment.size
        };
        zero(&cut.segment.file, cut.offset, zero_to)?;
        cut.segment.file.sync_data()?;
        inner.end = cut.offset;
        let removed = inner.slots.split_off(&first);
        inner.forget(removed.values());
        Ok(())
    }

    /// Forgets the entries up to and including `last` and removes the
    /// segments that hold nothing else. The caller records the purge point
    /// durably first: opening drops what a crash left behind.
    ///
    /// # Errors
    /// When a file cannot be removed.
    pub fn purge(&self, last: u64) -> Result<(), LogFileError> {
        let mut inner = self.write();
        if last < inner.first {
            return Ok(());
        }
        let kept = inner.slots.split_off(&(last + 1));
        let purged = std::mem::replace(&mut inner.slots, kept);
        inner.forget(purged.values());
        inner.first = last + 1;
        // The segments before the one with the first record kept hold only
        // purged records (all of them go when nothing is kept).
        let keep_from = match inner.slots.first_key_value() {
            None => inner.segments.len(),
            Some((_, slot)) => inner
                .segments
                .iter()
                .position(|s| Arc::ptr_eq(s, &slot.segment))
                .unwrap_or(0),
        };
        let removed: Vec<_> = inner.segments.drain(..keep_from).collect();
        for segment in &removed {
            remove_file(&segment.path)?;
        }
        if inner.segments.is_empty() {
            inner.end = 0;
        }
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// Drops the oldest cached entries until at most [`CACHED_BYTES`] of
    /// records keep theirs.
    fn evict(&mut self) {
        let mut over = self.cached.saturating_sub(CACHED_BYTES);
        for (&index, slot) in self.slots.range_mut(self.cached_from..) {
            if over == 0 {
                break;
            }
            if slot.entry.take().is_some() {
                self.cached -= slot.len as u64;
                over = over.saturating_sub(slot.len as u64);
            }
            self.cached_from = index + 1;
        }
    }

    /// Accounts for removed slots that kept their entry.
    fn forget<'a>(&mut self, removed: impl Iterator<Item = &'a Slot>) {
        for slot in removed.filter(|slot| slot.entry.is_some()) {
            self.cached -= slot.len as u64;
        }
    }

    fn last_index(&self) -> Option<u64> {
        self.slots.last_key_value().map(|(&index, _)| index)
    }

    /// Reads the records of `segment` and adds those after the purge point;
    /// returns the offset after the last whole record, how many records it
    /// added, and whether any byte after that offset is not zero.
    fn recover(&mut self, segment: &Arc<Segment>) -> Result<(u64, usize, bool), LogFileError> {
        let mut data = vec![0; segment.size as usize];
        segment.file.read_exact_at(&mut data, 0)?;
        let mut at = 0usize;
        let mut kept = 0;
        let mut previous = None;
        while let Some((index, len)) = whole_record(&data[at..], previous.unwrap_or(segment.first))
        {
            if index >= self.first {
                decode(&data[at + HEADER..at + len]).map_err(|e| {
                    LogFileError::Damaged(format!(
                        "entry {index} in {}: {e}",
                        segment.path.display()
                    ))
                })?;
                self.slots.insert(
                    index,
                    Slot {
                        segment: segment.clone(),
                        offset: at as u64,
                        len: len as u32,
                        entry: None,
                    },
                );
                kept += 1;
            }
            at += len;
            previous = Some(index + 1);
        }
        let torn = data[at..].iter().any(|&b| b != 0);
        Ok((at as u64, kept, torn))
    }
}

/// The index and length of the record at the start of `data` when it is
/// whole, its checksum matches and its index is at least `least`.
fn whole_record(data: &[u8], least: u64) -> Option<(u64, usize)> {
    let header = data.get(..HEADER)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let index = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let payload = data.get(HEADER..HEADER + len)?;
    (len > 0 && index >= least && checksum(index, payload) == crc).then_some((index, HEADER + len))
}

fn range_is_empty(range: &impl RangeBounds<u64>) -> bool {
    use std::ops::Bound::{Excluded, Included};
    match (range.start_bound(), range.end_bound()) {
        (Included(s), Excluded(e)) => s >= e,
        (Included(s), Included(e)) => s > e,
        (Excluded(s), Excluded(e)) => s.saturating_add(1) >= *e,
        (Excluded(s), Included(e)) => s >= e,
        _ => false,
    }
}

/// Appends the record of `entry` to `buf`.
fn encode(buf: &mut Vec<u8>, entry: &typ::Entry) -> Result<(), LogFileError> {
    let index = entry.log_id.index;
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    rmp_serde::encode::write(buf, entry)
        .map_err(|source| LogFileError::Encode { index, source })?;
    let header = header(index, &buf[start + HEADER..])?;
    buf[start..start + HEADER].copy_from_slice(&header);
    Ok(())
}

/// The header of the record of entry `index` whose payload is `payload`.
fn header(index: u64, payload: &[u8]) -> Result<[u8; HEADER], LogFileError> {
    let len = u32::try_from(payload.len())
        .map_err(|_| LogFileError::Damaged(format!("entry {index} is larger than 4 GiB")))?;
    let mut header = [0; HEADER];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&checksum(index, payload).to_le_bytes());
    header[8..16].copy_from_slice(&index.to_le_bytes());
    Ok(header)
}

/// The CRC-32 of a record: over its index and its payload.
fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn decode(payload: &[u8]) -> Result<typ::Entry, rmp_serde::decode::Error> {
    rmp_serde::from_slice(payload)
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SUFFIX}"))
}

fn remove_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates a file of `size` zero bytes in `dir`, synced, under a name of its
/// own that ends in [`PREPARING`]; returns it and its path.
fn zeroed_file(dir: &Path, size: u64) -> io::Result<(File, PathBuf)> {
    static PREPARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PREPARED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("segment-{}-{n}{PREPARING}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // Written out a piece at a time, so that the log's own syncs never
    // queue behind the whole segment's writeback.
    let mut at = 0;
    while at < size {
        let to = (at + PREPARE_PIECE).min(size);
        zero(&file, at, to)?;
        sync_range(&file, at, to - at)?;
        at = to;
    }
    file.sync_all()?;
    Ok((file, path))
}

/// Writes zeros over `[from, to)` of `file`.
fn zero(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Writes `len` bytes of `file` from `offset` to the disk and waits for it:
/// the segment's blocks and size were synced when it was made, so no
/// metadata has to follow.
fn sync_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: the descriptor is open for as long as `file` lives, and the
    // call only reads the range's pages.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;
    use crate::raft::{Op, Request};

    fn entry(term: u64, index: u64, bytes: usize) -> typ::Entry {
        typ::Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 0), index),
            payload: EntryPayload::Normal(Request {
                time_ms: index,
                ops: vec![Op::Apply(vec![index as u8; bytes])],
            }),
        }
    }

    fn open(dir: &tempfile::TempDir, purged: Option<u64>) -> LogFile {
        LogFile::open(dir.path(), purged, LogSync::Range).expect("open the log file")
    }

    fn held(log: &LogFile) -> Vec<(u64, u64)> {
        log.read_range(..)
            .expect("read the log")
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    fn segments(dir: &tempfile::TempDir) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list the log dir")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name.ends_with(SUFFIX))
            .collect();
        names.sort();
        names
    }

    /// The file and offset where the record of `index` starts.
    fn locate(log: &LogFile, index: u64) -> (PathBuf, u64) {
        let inner = log.read();
        let slot = &inner.slots[&index];
        (slot.segment.path.clone(), slot.offset)
    }

    fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open a segment");
        file.write_all_at(bytes, offset).expect("write a segment");
    }

    #[test]
    fn entries_read_back_across_segments_and_reopens() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        // 3 MiB entries: ten of them fill one 32 MiB segment.
        let big = 3 << 20;
        log.append((0..8).map(|i| entry(1, i, big)))?;
        log.append((8..14).map(|i| entry(1, i, big)))?;
        // Larger than a segment: a segment of its own size.
        log.append([entry(1, 14, 40 << 20), entry(1, 15, 10)])?;
        assert_eq!(segments(&dir).len(), 3, "{:?}", segments(&dir));
        let want: Vec<_> = (0..16).map(|i| (1, i)).collect();
        assert_eq!(held(&log), want);
        assert_eq!(
            log.read_range(9..11)?,
            [entry(1, 9, big), entry(1, 10, big)]
        );
        assert_eq!(log.read_range(14..=14)?, [entry(1, 14, 40 << 20)]);
        assert!(log.read_range(16..)?.is_empty());
        assert!(log.read_range(5..5)?.is_empty());
        drop(log);

        let log = open(&dir, None);
        assert_eq!(held(&log), want);
        assert_eq!(log.last_index(), Some(15));
        log.append([entry(2, 16, 10)])?;
        assert_eq!(log.read_range(15..)?, [entry(1, 15, 10), entry(2, 16, 10)]);
        Ok(())
    }

    #[test]
    fn an_append_at_or_below_the_last_entry_replaces_the_suffix() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..5).map(|i| entry(1, i, 10)))?;
        log.append([entry(2, 3, 10)])?;
        assert_eq!(held(&log), [(1, 0), (1, 1), (1, 2), (2, 3)]);
        // Out of order within one append: refused, nothing written.
        assert!(matches!(
            log.append([entry(2, 5, 10), entry(2, 4, 10)]),
            Err(LogFileError::Damaged(_))
        ));
        assert_eq!(log.last_index(), Some(3));
        drop(log);
        assert_eq!(held(&open(&dir, None)), [(1, 0), (1, 1), (1, 2), (2, 3)]);
        Ok(())
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_its_bytes_zeroed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..5).map(|i| entry(1, i, 100)))?;
        // Entry 4's bytes partly reached the disk before a crash.
        let (path, offset) = locate(&log, 4);
        drop(log);
        overwrite(&path, offset + HEADER as u64 + 20, &[0xff; 8]);

        let log = open(&dir, None);
        assert_eq!(held(&log), [(1, 0), (1, 1), (1, 2), (1, 3)]);
        // Whatever the torn record left is gone, so nothing written after
        // it can be mistaken for a record later.
        let data = std::fs::read(&path)?;
        assert!(data[offset as usize..].iter().all(|&b| b == 0));
        log.append([entry(2, 4, 10)])?;
        drop(log);
        assert_eq!(held(&open(&dir, None)).last(), Some(&(2, 4)));
        Ok(())
    }

    #[test]
    fn a_truncated_suffix_never_comes_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..6).map(|i| entry(1, i, 100)))?;
        log.truncate(3)?;
        // A new leader's entry 3 as long as the old one: the old entries 4
        // and 5 would follow it exactly if they were still on disk.
        log.append([entry(2, 3, 100)])?;
        assert_eq!(held(&log), [(1, 0), (1, 1), (1, 2), (2, 3)]);
        drop(log);
        assert_eq!(held(&open(&dir, None)), [(1, 0), (1, 1), (1, 2), (2, 3)]);
        Ok(())
    }

    #[test]
    fn truncating_into_an_earlier_segment_removes_the_later_ones() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..12).map(|i| entry(1, i, 3 << 20)))?;
        assert_eq!(segments(&dir).len(), 2);
        log.truncate(5)?;
        assert_eq!(segments(&dir).len(), 1);
        log.append([entry(2, 5, 10)])?;
        drop(log);
        let want = [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 5)];
        assert_eq!(held(&open(&dir, None)), want);
        Ok(())
    }

    #[test]
    fn a_truncation_cut_short_leaves_a_prefix() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..12).map(|i| entry(1, i, 3 << 20)))?;
        let [_, later] = <[String; 2]>::try_from(segments(&dir)).expect("two segments");
        drop(log);
        // A truncation to entry 5 removed the later segment, and a crash
        // came before it zeroed entries 5..=9 in the first one.
        std::fs::remove_file(dir.path().join(later))?;
        let log = open(&dir, None);
        assert_eq!(held(&log), (0..10).map(|i| (1, i)).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn purge_forgets_the_prefix_and_removes_whole_segments() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..25).map(|i| entry(1, i, 3 << 20)))?;
        assert_eq!(segments(&dir).len(), 3);
        log.purge(12)?;
        assert_eq!(segments(&dir).len(), 2, "the first segment held 0..=9");
        assert_eq!(
            log.read_range(..)?.first().map(|e| e.log_id.index),
            Some(13)
        );
        assert!(log.read_range(0..13)?.is_empty());
        drop(log);
        // Opening with the purge point skips what the files still hold.
        let log = open(&dir, Some(12));
        assert_eq!(log.read_range(..)?.len(), 12);

        // Past the end (a snapshot installed): the log is empty and goes on
        // after the purge point.
        log.purge(40)?;
        assert!(segments(&dir).is_empty());
        assert_eq!(log.last_index(), None);
        log.append([entry(3, 41, 10)])?;
        drop(log);
        assert_eq!(held(&open(&dir, Some(40))), [(3, 41)]);
        Ok(())
    }

    #[test]
    fn a_purge_cut_short_is_finished_on_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..25).map(|i| entry(1, i, 3 << 20)))?;
        drop(log);
        // The purge point was recorded; nothing was removed yet.
        let log = open(&dir, Some(21));
        assert_eq!(segments(&dir).len(), 1);
        assert_eq!(log.read_range(..)?.len(), 3);
        Ok(())
    }

    #[test]
    fn a_record_that_passes_its_checksum_but_does_not_decode_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        log.append((0..3).map(|i| entry(1, i, 10)))?;
        let (path, offset) = locate(&log, 2);
        drop(log);
        let payload = [0xc1u8, 0x00];
        let record = [&header(2, &payload)?[..], &payload].concat();
        overwrite(&path, offset, &record);
        assert!(matches!(
            LogFile::open(dir.path(), None, LogSync::Range),
            Err(LogFileError::Damaged(_))
        ));
        Ok(())
    }

    #[test]
    fn cached_entries_stay_bounded_and_match_the_files() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = open(&dir, None);
        let cached = |log: &LogFile| {
            let inner = log.read();
            let held: u64 = inner
                .slots
                .values()
                .filter(|slot| slot.entry.is_some())
                .map(|slot| slot.len as u64)
                .sum();
            assert_eq!(inner.cached, held, "the cached bytes are counted");
            held
        };
        for i in 0..40 {
            log.append([entry(1, i, 1 << 20)])?;
        }
        assert!(cached(&log) <= CACHED_BYTES);
        assert!(cached(&log) > CACHED_BYTES / 2);
        let from_memory = log.read_range(..)?;
        log.truncate(35)?;
        log.purge(3)?;
        cached(&log);
        drop(log);
        let from_files = open(&dir, Some(3)).read_range(..)?;
        assert_eq!(from_memory[4..35], from_files[..]);
        Ok(())
    }

    #[test]
    fn fdatasync_mode_appends_the_same_records() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = LogFile::open(dir.path(), None, LogSync::Fdatasync)?;
        log.append((0..3).map(|i| entry(1, i, 10)))?;
        drop(log);
        assert_eq!(held(&open(&dir, None)), [(1, 0), (1, 1), (1, 2)]);
        Ok(())
    }
}
