//! The redo record: everything one `apply` call changes in the state tree,
//! written before its effects, so that a crash part way through is finished
//! on the next open instead of leaving half an entry applied.
//!
//! Layout, in the state tree's host namespace:
//! - `\0redo/head`: [`RedoHead`] — the last applied log id, membership and
//!   entry time, and how many chunks hold the writes;
//! - `\0redo/P/N`: chunk `N` (big-endian `u32`) of the encoded writes, where
//!   `P` is the record's sequence number modulo 2.
//!
//! sled recovers a prefix of the writes made before a crash. The chunks are
//! written first, the head next, the effects last; so a head that survived
//! has all its chunks, and effects that survived have their head. Chunks
//! alternate between two slots, so writing record `n` never overwrites the
//! chunks of record `n - 1`, which is the one a crash falls back to. Chunks
//! stay small enough that sled never moves them to separate blob files.

use serde::{Deserialize, Serialize};
use serde_bytes::{ByteBuf, Bytes};

use super::disk::Disk;
use super::typ;

/// The key of the redo record's head.
pub const KEY_HEAD: &[u8] = b"\0redo/head";
const CHUNK_PREFIX: &[u8] = b"\0redo/";
/// The most bytes in one chunk: well below sled's blob threshold.
const CHUNK_BYTES: usize = 32 << 10;

/// Why a redo record could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum RedoError {
    /// sled failed.
    #[error("the state store failed: {0}")]
    Storage(#[from] sled::Error),
    /// The writes could not be encoded.
    #[error("cannot encode the redo record: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The stored record is damaged: a decode failure or a missing chunk.
    #[error("the redo record is damaged: {0}")]
    Damaged(String),
}

/// A write to the state tree: the key and its new value, or `None` to delete.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// What the state records about the last `apply` call: the Raft metadata
/// that must change atomically with the writes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedoHead {
    /// Sequence number of this record; picks its chunk slot.
    pub seq: u64,
    /// How many chunks hold this record's writes.
    pub chunks: u32,
    /// The last log id whose effects are in the state.
    pub applied: Option<typ::LogId>,
    /// The membership as of `applied`.
    pub membership: typ::StoredMembership,
    /// The time of the last applied normal entry (milliseconds since the
    /// Unix epoch, never decreasing).
    pub time_ms: u64,
}

/// Whether `key` belongs to the redo record (snapshots copy it like any
/// other key; installs write the head last).
pub fn is_head(key: &[u8]) -> bool {
    key == KEY_HEAD
}

/// Whether `key` belongs to the redo record at all: its head or a chunk.
pub fn is_record_key(key: &[u8]) -> bool {
    key.starts_with(CHUNK_PREFIX)
}

/// The key of chunk `index` of record `seq`.
pub fn chunk_key(seq: u64, index: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(CHUNK_PREFIX.len() + 6);
    key.extend_from_slice(CHUNK_PREFIX);
    key.push(b'0' + (seq % 2) as u8);
    key.push(b'/');
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Reads the head of the last redo record, if any.
///
/// # Errors
/// When sled fails or the head does not decode.
pub fn read_head(tree: &sled::Tree) -> Result<Option<RedoHead>, RedoError> {
    match tree.get(KEY_HEAD)? {
        Some(bytes) => rmp_serde::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RedoError::Damaged(format!("its head does not decode: {e}"))),
        None => Ok(None),
    }
}

/// Records `writes` together with `head` (whose `seq` and `chunks` are
/// filled in here), then applies them to `tree`.
///
/// Nothing here syncs: the next log flush makes the record durable, and
/// until then a crash loses a suffix of applies that the log replays.
///
/// # Errors
/// When sled fails or the writes cannot be encoded; the tree may then hold
/// part of the effects, which the head recorded before them repairs on open.
pub fn commit(
    tree: &sled::Tree,
    disk: &Disk,
    mut head: RedoHead,
    writes: &[Write],
) -> Result<RedoHead, RedoError> {
    let encoded: Vec<(&Bytes, Option<&Bytes>)> = writes
        .iter()
        .map(|(k, v)| (Bytes::new(k), v.as_deref().map(Bytes::new)))
        .collect();
    let bytes = if writes.is_empty() {
        Vec::new()
    } else {
        rmp_serde::to_vec(&encoded)?
    };
    head.seq = head.seq.wrapping_add(1);
    head.chunks = 0;
    for chunk in bytes.chunks(CHUNK_BYTES) {
        tree.insert(chunk_key(head.seq, head.chunks), chunk)?;
        head.chunks += 1;
    }
    tree.insert(KEY_HEAD, rmp_serde::to_vec(&head)?)?;
    apply_writes(
        tree,
        disk,
        writes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
    )?;
    Ok(head)
}

/// Decodes a record's writes from its chunks, concatenated.
///
/// # Errors
/// When the bytes are not an encoded list of writes.
pub fn decode_writes(
    bytes: &[u8],
) -> Result<Vec<(ByteBuf, Option<ByteBuf>)>, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Re-applies the last recorded writes (they are absolute values, so doing
/// them again is harmless) and returns the head.
///
/// # Errors
/// When sled fails or the record is damaged; the node must not start then.
pub fn recover(tree: &sled::Tree, disk: &Disk) -> Result<Option<RedoHead>, RedoError> {
    let Some(head) = read_head(tree)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    for index in 0..head.chunks {
        let chunk = tree.get(chunk_key(head.seq, index))?.ok_or_else(|| {
            RedoError::Damaged(format!("record {} lacks chunk {index}", head.seq))
        })?;
        bytes.extend_from_slice(&chunk);
    }
    let writes = if head.chunks == 0 {
        Vec::new()
    } else {
        decode_writes(&bytes)
            .map_err(|e| RedoError::Damaged(format!("record {} does not decode: {e}", head.seq)))?
    };
    apply_writes(
        tree,
        disk,
        writes
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_ref().map(|v| v.as_slice()))),
    )?;
    Ok(Some(head))
}

fn apply_writes<'a>(
    tree: &sled::Tree,
    disk: &Disk,
    writes: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> Result<(), RedoError> {
    for (key, value) in writes {
        match value {
            Some(value) => {
                disk.note_write(value.len());
                tree.insert(key, value).map(drop)
            }
            None => tree.remove(key).map(drop),
        }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> anyhow::Result<(Disk, sled::Tree)> {
        let disk = Disk::open(dir.path())?;
        let tree = disk.db().open_tree("state")?;
        Ok((disk, tree))
    }

    fn head_at(index: u64) -> RedoHead {
        RedoHead {
            applied: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 0),
                index,
            )),
            time_ms: index * 10,
            ..RedoHead::default()
        }
    }

    fn value(tree: &sled::Tree, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(tree.get(key)?.map(|v| v.to_vec()))
    }

    #[test]
    fn an_apply_cut_short_is_finished_on_recover() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (disk, tree) = open(&dir)?;
        tree.insert(b"gone", b"old")?;
        let writes: Vec<Write> = vec![
            (b"a".to_vec(), Some(b"1".to_vec())),
            (b"b".to_vec(), Some(b"2".to_vec())),
            (b"gone".to_vec(), None),
        ];
        let head = commit(&tree, &disk, head_at(7), &writes)?;
        assert_eq!((head.seq, head.chunks), (1, 1));

        // As if the crash came after the record but before its effects.
        tree.remove(b"a")?;
        tree.insert(b"b", b"stale")?;
        tree.insert(b"gone", b"old")?;

        let recovered = recover(&tree, &disk)?;
        assert_eq!(recovered, Some(head));
        assert_eq!(value(&tree, b"a")?, Some(b"1".to_vec()));
        assert_eq!(value(&tree, b"b")?, Some(b"2".to_vec()));
        assert_eq!(value(&tree, b"gone")?, None);
        Ok(())
    }

    #[test]
    fn a_record_cut_short_leaves_the_previous_one_whole() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (disk, tree) = open(&dir)?;
        // Large enough for several chunks.
        let big = vec![7u8; 3 * CHUNK_BYTES];
        let writes: Vec<Write> = vec![(b"big".to_vec(), Some(big.clone()))];
        let head = commit(&tree, &disk, head_at(3), &writes)?;
        assert!(head.chunks >= 3, "{} chunks", head.chunks);

        // The next record's chunks were written, its head was not.
        for index in 0..head.chunks + 1 {
            tree.insert(chunk_key(head.seq + 1, index), &b"torn"[..])?;
        }
        tree.insert(b"big", &b"half-written"[..])?;

        assert_eq!(recover(&tree, &disk)?, Some(head));
        assert_eq!(value(&tree, b"big")?, Some(big));
        Ok(())
    }

    #[test]
    fn a_record_that_lost_a_chunk_is_an_error_not_a_guess() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (disk, tree) = open(&dir)?;
        let writes: Vec<Write> = vec![(b"k".to_vec(), Some(vec![1; 2 * CHUNK_BYTES]))];
        let head = commit(&tree, &disk, head_at(1), &writes)?;
        tree.remove(chunk_key(head.seq, 1))?;
        let error = recover(&tree, &disk).expect_err("a missing chunk");
        assert!(error.to_string().contains("lacks chunk 1"), "{error}");
        Ok(())
    }

    #[test]
    fn an_empty_tree_has_no_record() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (disk, tree) = open(&dir)?;
        assert_eq!(recover(&tree, &disk)?, None);
        let head = commit(&tree, &disk, head_at(1), &[])?;
        assert_eq!(head.chunks, 0);
        assert_eq!(recover(&tree, &disk)?, Some(head));
        Ok(())
    }
}
