//! The snapshot file: every entry of the state tree, streamed to and from
//! disk one entry at a time, so that no part of the state is ever held whole
//! in memory to build, send or install a snapshot.
//!
//! Format (integers little-endian):
//! ```text
//! magic "RWSNAP\0\x01"
//! entry*: key_len u32, value_len u32, key, value   (keys strictly ascending)
//! end:    0xFFFF_FFFF u32, entry count u64, SHA-256 of every byte before it
//! ```
//! The strict key order rules out a key given twice without remembering the
//! keys; the count and the digest catch a truncated or damaged file.
//!
//! [`SnapshotFile`] is openraft's `SnapshotData`: an open file and its path.
//! [`SnapshotDir`] names and keeps the files of one node.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};

/// The first bytes of every snapshot file; the last byte is the version.
const MAGIC: &[u8; 8] = b"RWSNAP\0\x01";

/// The key length that marks the end of the entries.
const END: u32 = u32::MAX;

/// The longest key or value a snapshot may hold. The state's largest items
/// are guest modules (a few MiB); this bounds what one entry of a hostile
/// file can make a reader allocate.
pub const MAX_ITEM_LEN: u32 = 64 << 20;

/// One entry of the state tree: key and value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Why a snapshot file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading the file failed.
    #[error("reading the snapshot: {0}")]
    Io(#[from] io::Error),
    /// The file does not start as a snapshot of this version does.
    #[error("not a raftwasm snapshot of this version")]
    NotASnapshot,
    /// The file ends before its end marker, count and digest.
    #[error("the snapshot is truncated")]
    Truncated,
    /// An entry is longer than [`MAX_ITEM_LEN`].
    #[error("an entry of {len} bytes is larger than the {MAX_ITEM_LEN} bytes allowed")]
    TooLong {
        /// The length the entry claims.
        len: u64,
    },
    /// A key is not greater than the one before it.
    #[error("its keys are not in strictly ascending order (a key is repeated or misplaced)")]
    OutOfOrder,
    /// The count at the end is not the number of entries read.
    #[error("it claims {claimed} entries but holds {read}")]
    CountMismatch {
        /// The count at the end of the file.
        claimed: u64,
        /// The entries actually read.
        read: u64,
    },
    /// The digest at the end does not match the bytes before it.
    #[error("its checksum does not match its contents")]
    Checksum,
    /// Bytes follow the digest.
    #[error("bytes follow the end of the snapshot")]
    TrailingBytes,
}

/// Writes a snapshot file entry by entry.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: BufWriter<W>,
    hasher: Sha256,
    entries: u64,
}

impl<W: Write> Writer<W> {
    /// Starts a snapshot in `out`.
    ///
    /// # Errors
    /// When writing to `out` fails.
    pub fn new(out: W) -> io::Result<Self> {
        let mut writer = Self {
            out: BufWriter::with_capacity(256 << 10, out),
            hasher: Sha256::new(),
            entries: 0,
        };
        writer.put(MAGIC)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)
    }

    /// Appends one entry; keys must come in strictly ascending order, as a
    /// sled iterator yields them.
    ///
    /// # Errors
    /// When writing fails, or the key or value is longer than
    /// [`MAX_ITEM_LEN`].
    pub fn entry(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let len = |item: &[u8]| match u32::try_from(item.len()) {
            Ok(len) if len <= MAX_ITEM_LEN => Ok(len),
            _ => Err(io::Error::other(FormatError::TooLong {
                len: item.len() as u64,
            })),
        };
        let (key_len, value_len) = (len(key)?, len(value)?);
        self.put(&key_len.to_le_bytes())?;
        self.put(&value_len.to_le_bytes())?;
        self.put(key)?;
        self.put(value)?;
        self.entries += 1;
        Ok(())
    }

    /// Writes the end marker, the count and the digest, and returns the
    /// underlying writer (not synced).
    ///
    /// # Errors
    /// When writing fails.
    pub fn finish(mut self) -> io::Result<W> {
        self.put(&END.to_le_bytes())?;
        self.put(&self.entries.to_le_bytes())?;
        let digest = self.hasher.finalize_reset();
        self.out.write_all(&digest)?;
        self.out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
    }
}

/// Reads a snapshot file entry by entry, checking its order, count and
/// digest; the last call to [`Reader::next_entry`] (the one that returns
/// `None`) is the one that vouches for the whole file.
#[derive(Debug)]
pub struct Reader<R: Read> {
    input: BufReader<R>,
    hasher: Sha256,
    entries: u64,
    last_key: Option<Vec<u8>>,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Opens the snapshot in `input`.
    ///
    /// # Errors
    /// When `input` does not start with a snapshot's magic bytes.
    pub fn new(input: R) -> Result<Self, FormatError> {
        let mut reader = Self {
            input: BufReader::with_capacity(256 << 10, input),
            hasher: Sha256::new(),
            entries: 0,
            last_key: None,
            done: false,
        };
        let mut magic = [0; MAGIC.len()];
        reader.take(&mut magic).map_err(|e| match e {
            FormatError::Truncated => FormatError::NotASnapshot,
            other => other,
        })?;
        if &magic != MAGIC {
            return Err(FormatError::NotASnapshot);
        }
        Ok(reader)
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => FormatError::Truncated,
            _ => FormatError::Io(e),
        })?;
        self.hasher.update(&*buf);
        Ok(())
    }

    fn take_u32(&mut self) -> Result<u32, FormatError> {
        let mut bytes = [0; 4];
        self.take(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn take_item(&mut self, len: u32) -> Result<Vec<u8>, FormatError> {
        if len > MAX_ITEM_LEN {
            return Err(FormatError::TooLong { len: len.into() });
        }
        let mut item = vec![0; len as usize];
        self.take(&mut item)?;
        Ok(item)
    }

    /// The next entry, or `None` once the end has been read and the whole
    /// file checked.
    ///
    /// # Errors
    /// Why the file is not a whole, undamaged snapshot.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, FormatError> {
        if self.done {
            return Ok(None);
        }
        let key_len = self.take_u32()?;
        if key_len == END {
            self.finish()?;
            return Ok(None);
        }
        let value_len = self.take_u32()?;
        let key = self.take_item(key_len)?;
        let value = self.take_item(value_len)?;
        if self.last_key.as_ref().is_some_and(|last| *last >= key) {
            return Err(FormatError::OutOfOrder);
        }
        self.last_key = Some(key.clone());
        self.entries += 1;
        Ok(Some((key, value)))
    }

    fn finish(&mut self) -> Result<(), FormatError> {
        let mut count = [0; 8];
        self.take(&mut count)?;
        let claimed = u64::from_le_bytes(count);
        let expected = self.hasher.finalize_reset();
        let mut digest = [0; 32];
        self.input
            .read_exact(&mut digest)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => FormatError::Truncated,
                _ => FormatError::Io(e),
            })?;
        if claimed != self.entries {
            return Err(FormatError::CountMismatch {
                claimed,
                read: self.entries,
            });
        }
        if digest[..] != expected[..] {
            return Err(FormatError::Checksum);
        }
        if self.input.read(&mut [0])? != 0 {
            return Err(FormatError::TrailingBytes);
        }
        self.done = true;
        Ok(())
    }
}

/// The directory of a node's snapshot files: the current snapshot (named in
/// the state machine's `snapshot` tree) and `.part` files of snapshots being
/// built or received. Anything else is left over from a crash or a
/// replaced snapshot, and [`SnapshotDir::remove_all_but`] clears it.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    path: PathBuf,
}

/// A name no other file of the directory has: the time in nanoseconds and a
/// counter (so two names made in the same nanosecond differ too).
fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl SnapshotDir {
    /// Opens (creating it if needed) the snapshot directory at `path`.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        Ok(Self {
            path: path.to_owned(),
        })
    }

    /// The path of the file `name` in this directory.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A new path for a snapshot being made (`what`: `build`, `receive`).
    pub fn part_path(&self, what: &str) -> PathBuf {
        self.path.join(format!("{what}-{}.part", unique()))
    }

    /// Moves the finished (and synced) file `part` into place as a snapshot
    /// of log index `index`, and syncs the directory so the move survives a
    /// crash. Returns the snapshot's file name.
    ///
    /// # Errors
    /// When the rename or the directory sync fails.
    pub fn store(&self, part: &Path, index: u64) -> io::Result<String> {
        let name = format!("{index:020}-{}.snap", unique());
        std::fs::rename(part, self.path_of(&name))?;
        std::fs::File::open(&self.path)?.sync_all()?;
        Ok(name)
    }

    /// Removes every file but `keep`.
    ///
    /// # Errors
    /// When the directory cannot be listed or a file removed.
    pub fn remove_all_but(&self, keep: Option<&str>) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if keep.is_none_or(|keep| entry.file_name() != keep) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
}

/// openraft's snapshot data: an open snapshot file and where it is.
///
/// A file made for receiving a snapshot is temporary: it is removed when
/// dropped unless [`SnapshotFile::keep`] is called (an install that
/// succeeded moves it into place first).
#[derive(Debug)]
pub struct SnapshotFile {
    file: tokio::fs::File,
    path: PathBuf,
    temporary: bool,
}

impl SnapshotFile {
    /// Opens the snapshot file at `path` for reading.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub async fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: tokio::fs::File::open(path).await?,
            path: path.to_owned(),
            temporary: false,
        })
    }

    /// Creates an empty temporary file at `path`, for receiving a snapshot.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub async fn create_temporary(path: &Path) -> io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .await?;
        Ok(Self {
            file,
            path: path.to_owned(),
            temporary: true,
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs what was written to disk.
    ///
    /// # Errors
    /// When the sync fails.
    pub async fn sync(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        self.file.flush().await?;
        self.file.sync_all().await
    }

    /// Keeps the file when this handle is dropped.
    pub fn keep(&mut self) {
        self.temporary = false;
    }
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl tokio::io::AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SnapshotFile {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.file).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        Pin::new(&mut self.file).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.file).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Entries = Vec<Entry>;

    fn write(entries: &Entries) -> io::Result<Vec<u8>> {
        let mut writer = Writer::new(Vec::new())?;
        for (k, v) in entries {
            writer.entry(k, v)?;
        }
        writer.finish()
    }

    fn read(bytes: &[u8]) -> Result<Entries, FormatError> {
        let mut reader = Reader::new(bytes)?;
        let mut entries = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            entries.push(entry);
        }
        Ok(entries)
    }

    fn sample() -> Entries {
        vec![
            (b"\0head".to_vec(), b"h".to_vec()),
            (b"\x01a".to_vec(), Vec::new()),
            (b"\x01b".to_vec(), vec![7; 1000]),
        ]
    }

    #[test]
    fn entries_come_back_as_written() -> anyhow::Result<()> {
        let entries = sample();
        assert_eq!(read(&write(&entries)?)?, entries);
        assert_eq!(read(&write(&Vec::new())?)?, Vec::new());
        Ok(())
    }

    /// Every proper prefix of a snapshot is refused, never read as a
    /// smaller state.
    #[test]
    fn every_truncation_is_refused() -> anyhow::Result<()> {
        let bytes = write(&sample())?;
        for len in 0..bytes.len() {
            assert!(read(&bytes[..len]).is_err(), "a {len}-byte prefix was read");
        }
        Ok(())
    }

    /// Flipping any bit after the magic is caught (by the order, the count,
    /// a length or the digest).
    #[test]
    fn every_flipped_bit_is_refused() -> anyhow::Result<()> {
        let bytes = write(&sample())?;
        for at in MAGIC.len()..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert!(
                    read(&damaged).is_err(),
                    "bit {bit} of byte {at} went unnoticed"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn foreign_files_repeated_keys_and_trailing_bytes_are_refused() -> anyhow::Result<()> {
        assert!(matches!(
            read(b"PK\x03\x04zip"),
            Err(FormatError::NotASnapshot)
        ));
        let repeated = vec![
            (b"k".to_vec(), b"1".to_vec()),
            (b"k".to_vec(), b"2".to_vec()),
        ];
        assert!(matches!(
            read(&write(&repeated)?),
            Err(FormatError::OutOfOrder)
        ));
        let mut trailing = write(&sample())?;
        trailing.push(0);
        assert!(matches!(read(&trailing), Err(FormatError::TrailingBytes)));
        Ok(())
    }

    /// A hostile length is refused before anything that size is allocated.
    #[test]
    fn huge_lengths_are_refused_before_allocating() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(MAX_ITEM_LEN + 1).to_le_bytes());
        bytes.push(b'k');
        assert!(matches!(read(&bytes), Err(FormatError::TooLong { .. })));
    }

    #[tokio::test]
    async fn a_temporary_file_is_removed_unless_kept() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let dropped = dir.path().join("dropped.part");
        drop(SnapshotFile::create_temporary(&dropped).await?);
        assert!(!dropped.exists());
        let kept = dir.path().join("kept.part");
        SnapshotFile::create_temporary(&kept).await?.keep();
        assert!(kept.exists());
        Ok(())
    }
}
