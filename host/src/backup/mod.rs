//! Backups: a snapshot of the replicated state wrapped in one versioned,
//! checksummed file, and seeding a new data directory from one.
//!
//! Format (integers little-endian):
//! ```text
//! magic   "RWBACKUP"
//! version u32 (1)
//! header  u32 length, then JSON (BackupHeader)
//! digest  SHA-256 of every byte before it
//! state   a snapshot file (see crate::raft::snapshot_file), exactly
//!         `snapshot_bytes` long, with its own entry count and SHA-256
//! ```
//! The header's digest covers the header, the snapshot file's covers the
//! entries, and a reader checks that the two agree: the applied log id and
//! guest hash in the header are those of the state, and the state hash is
//! recomputed from the entries.
//!
//! - [`client`]: `raftwasm backup` and `raftwasm restore`;
//! - [`restore`]: seeding a data directory from a checked backup.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::raft::snapshot_file::{self, FormatError};
use crate::raft::state_machine::{self, StateHasher};
use crate::raft::typ;
use crate::runtime::GuestRuntime;

pub mod client;
pub mod restore;

/// The first bytes of every backup file.
const MAGIC: &[u8; 8] = b"RWBACKUP";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The longest header accepted: it holds a membership and a few hashes.
const MAX_HEADER: u32 = 1 << 20;

/// Response headers of `GET /backup`, for clients that want the summary
/// without reading the file.
pub const INDEX_HEADER: &str = "x-raftwasm-backup-index";
/// The state hash of the backup, as `/status?state_hash=true` reports it.
pub const STATE_HASH_HEADER: &str = "x-raftwasm-state-hash";

/// What a backup says about the state it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// When the backup was taken, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The last log id applied to the state (of the cluster it came from).
    pub applied: Option<typ::LogId>,
    /// That cluster's membership as of `applied`.
    pub membership: typ::StoredMembership,
    /// The active guest's SHA-256, in hex.
    pub guest_hash: Option<String>,
    /// The state hash `/status?state_hash=true` reports for this state.
    pub state_hash: String,
    /// Entries in the snapshot file.
    pub entries: u64,
    /// Length of the snapshot file that follows the header.
    pub snapshot_bytes: u64,
}

impl BackupHeader {
    /// The applied log index, 0 for an empty state.
    pub fn index(&self) -> u64 {
        self.applied.map_or(0, |id| id.index)
    }

    /// The header as it starts a backup file: magic, version, length,
    /// JSON and digest.
    ///
    /// # Errors
    /// When the header does not encode (it always does).
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        let len = u32::try_from(json.len()).map_err(io::Error::other)?;
        let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + json.len() + 32);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&json);
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);
        Ok(bytes)
    }
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading the file failed.
    #[error("reading it failed: {0}")]
    Io(#[from] io::Error),
    /// The file does not start with the backup magic bytes.
    #[error("it is not a raftwasm backup")]
    NotABackup,
    /// Another version of the format.
    #[error(
        "it is a backup of format version {0}, and this raftwasm reads version {FORMAT_VERSION}; \
         restore it with a raftwasm of that version"
    )]
    Version(u32),
    /// The file ends early.
    #[error("it is truncated: it has {actual} bytes of the {expected} its header announces")]
    Truncated {
        /// Bytes the header announces.
        expected: u64,
        /// Bytes the file holds.
        actual: u64,
    },
    /// The file ends inside its header.
    #[error("it is truncated inside its header")]
    HeaderTruncated,
    /// The file is longer than its header says.
    #[error("it has {actual} bytes, more than the {expected} its header announces")]
    TooLong {
        /// Bytes the header announces.
        expected: u64,
        /// Bytes the file holds.
        actual: u64,
    },
    /// The header's digest does not match.
    #[error("its header checksum does not match (the file is damaged)")]
    HeaderChecksum,
    /// The header does not decode.
    #[error("its header does not decode: {0}")]
    Header(String),
    /// The state part is not a whole, undamaged snapshot file.
    #[error("its state is damaged: {0}")]
    State(FormatError),
    /// The state is whole but not what the header says, or a node could not
    /// open it.
    #[error("its state is unusable: {0}")]
    Unusable(String),
}

/// A backup whose header has been read and checked: the header, and the
/// file positioned at the snapshot file.
#[derive(Debug)]
pub struct Opened {
    /// The checked header.
    pub header: BackupHeader,
    /// The file, positioned at the start of the snapshot file.
    pub file: std::fs::File,
}

/// Opens the backup at `path` and checks its header and length.
///
/// # Errors
/// [`BackupError`] naming what is wrong with the file.
pub fn open(path: &Path) -> Result<Opened, BackupError> {
    let mut file = std::fs::File::open(path)?;
    let actual = file.metadata()?.len();
    let mut prefix = [0; 16];
    let mut read = 0;
    while read < prefix.len() {
        match file.read(&mut prefix[read..])? {
            0 => break,
            n => read += n,
        }
    }
    if read < MAGIC.len() || &prefix[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    if read < prefix.len() {
        return Err(BackupError::HeaderTruncated);
    }
    let word = |at: usize| {
        u32::from_le_bytes([prefix[at], prefix[at + 1], prefix[at + 2], prefix[at + 3]])
    };
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(BackupError::Version(version));
    }
    let len = word(12);
    if len > MAX_HEADER {
        return Err(BackupError::Header(format!(
            "it claims {len} bytes, more than the {MAX_HEADER} allowed"
        )));
    }
    let mut rest = vec![0; len as usize + 32];
    file.read_exact(&mut rest).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => BackupError::HeaderTruncated,
        _ => BackupError::Io(e),
    })?;
    let (json, digest) = rest.split_at(len as usize);
    let mut hasher = Sha256::new();
    hasher.update(prefix);
    hasher.update(json);
    if hasher.finalize()[..] != digest[..] {
        return Err(BackupError::HeaderChecksum);
    }
    let header: BackupHeader =
        serde_json::from_slice(json).map_err(|e| BackupError::Header(e.to_string()))?;
    let expected = (prefix.len() + rest.len()) as u64 + header.snapshot_bytes;
    if actual < expected {
        return Err(BackupError::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(BackupError::TooLong { expected, actual });
    }
    Ok(Opened { header, file })
}

/// What reading a snapshot file through found.
#[derive(Debug)]
struct StateRead {
    /// Every host entry (the guest's keys are only hashed).
    host: HashMap<Vec<u8>, Vec<u8>>,
    /// The state hash.
    state_hash: String,
    /// Entries read.
    entries: u64,
}

/// Reads the snapshot file in `input` through, checking its order, count,
/// checksum and key layout, hashing the guest's entries and keeping the
/// host's.
fn read_state(input: impl Read) -> Result<StateRead, BackupError> {
    let mut reader = snapshot_file::Reader::new(input).map_err(BackupError::State)?;
    let mut host = HashMap::new();
    let mut hasher = StateHasher::default();
    let mut entries = 0u64;
    while let Some((key, value)) = reader.next_entry().map_err(BackupError::State)? {
        if !state_machine::is_state_key(&key) {
            return Err(BackupError::Unusable(
                "it holds a key outside the state's layout".into(),
            ));
        }
        entries += 1;
        hasher.entry(&key, &value);
        if state_machine::is_host_key(&key) {
            host.insert(key, value);
        }
    }
    Ok(StateRead {
        host,
        state_hash: hasher.finish(),
        entries,
    })
}

/// Reads the whole backup at `path` and checks everything a node will read
/// from it: the header, the snapshot file (order, count, checksum), that
/// the state is what the header says (applied log id, guest hash, entry
/// count, state hash recomputed from the entries), and the checks a
/// received snapshot gets (the redo record and guest metadata decode, the
/// active guest loads in `runtime`). Holds only host entries in memory.
///
/// # Errors
/// [`BackupError`] naming what is wrong with the file.
pub fn verify(path: &Path, runtime: &GuestRuntime) -> Result<BackupHeader, BackupError> {
    let Opened { header, file } = open(path)?;
    let state = read_state(file)?;
    let summary =
        state_machine::check_host_entries(runtime, &state.host).map_err(BackupError::Unusable)?;
    let disagree = |what: &str| {
        Err(BackupError::Unusable(format!(
            "its {what} is not the one its header names"
        )))
    };
    if summary.head.as_ref().and_then(|head| head.applied) != header.applied {
        return disagree("applied log id");
    }
    if summary.guest_hash != header.guest_hash {
        return disagree("guest hash");
    }
    if state.entries != header.entries {
        return disagree("entry count");
    }
    if state.state_hash != header.state_hash {
        return disagree("state hash");
    }
    Ok(header)
}

/// A backup ready to send: its encoded header, and the snapshot file it
/// wraps (open, at its start).
#[derive(Debug)]
pub struct Prepared {
    /// What the backup holds.
    pub header: BackupHeader,
    /// The encoded header: the first bytes of the backup.
    pub prefix: Vec<u8>,
    /// The snapshot file: the rest of the backup.
    pub state: std::fs::File,
}

impl Prepared {
    /// The whole backup's length.
    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.header.snapshot_bytes
    }

    /// Whether the backup is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Prepares a backup of the snapshot `meta` whose file is `state`: reads it
/// through once (checking it, and computing the state hash and guest hash
/// for the header), then rewinds it to be sent. Blocking.
///
/// # Errors
/// When the file cannot be read or is not the snapshot `meta` describes.
pub fn prepare(
    meta: &typ::SnapshotMeta,
    mut state: std::fs::File,
) -> Result<Prepared, BackupError> {
    use std::io::Seek as _;
    let read = read_state(&mut state)?;
    let summary =
        state_machine::summarize_host_entries(&read.host).map_err(BackupError::Unusable)?;
    if summary.head.as_ref().and_then(|head| head.applied) != meta.last_log_id {
        return Err(BackupError::Unusable(
            "the snapshot's state is not applied up to its own log id".into(),
        ));
    }
    let snapshot_bytes = state.seek(io::SeekFrom::End(0))?;
    state.rewind()?;
    let header = BackupHeader {
        created_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
        guest_hash: summary.guest_hash,
        state_hash: read.state_hash,
        entries: read.entries,
        snapshot_bytes,
    };
    let prefix = header.encode()?;
    Ok(Prepared {
        header,
        prefix,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Limits;

    /// A backup of a state holding two guest keys and no guest.
    fn sample(dir: &Path) -> anyhow::Result<(std::path::PathBuf, Vec<u8>)> {
        let entries = [
            (b"\x01a".to_vec(), b"1".to_vec()),
            (b"\x01b".to_vec(), b"2".to_vec()),
        ];
        let mut writer = snapshot_file::Writer::new(Vec::new())?;
        let mut hasher = StateHasher::default();
        for (key, value) in &entries {
            writer.entry(key, value)?;
            hasher.entry(key, value);
        }
        let state = writer.finish()?;
        let header = BackupHeader {
            created_ms: 1,
            applied: None,
            membership: typ::StoredMembership::default(),
            guest_hash: None,
            state_hash: hasher.finish(),
            entries: entries.len() as u64,
            snapshot_bytes: state.len() as u64,
        };
        let mut bytes = header.encode()?;
        bytes.extend_from_slice(&state);
        let path = dir.join("sample.backup");
        std::fs::write(&path, &bytes)?;
        Ok((path, bytes))
    }

    #[test]
    fn a_whole_backup_verifies_and_every_damage_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let runtime = GuestRuntime::new(Limits::default(), None)?;
        let (path, bytes) = sample(dir.path())?;
        let header = verify(&path, &runtime)?;
        assert_eq!(header.entries, 2);
        let damaged = dir.path().join("damaged.backup");
        for len in 0..bytes.len() {
            std::fs::write(&damaged, &bytes[..len])?;
            assert!(
                verify(&damaged, &runtime).is_err(),
                "a {len}-byte prefix verified"
            );
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x01;
            std::fs::write(&damaged, &flipped)?;
            assert!(
                verify(&damaged, &runtime).is_err(),
                "a flip of byte {at} went unnoticed"
            );
        }
        Ok(())
    }

    #[test]
    fn a_backup_whose_state_is_not_the_one_its_header_names_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let runtime = GuestRuntime::new(Limits::default(), None)?;
        let (path, bytes) = sample(dir.path())?;
        let Opened { mut header, .. } = open(&path)?;
        let state = &bytes[bytes.len() - header.snapshot_bytes as usize..];
        header.state_hash = "0".repeat(64);
        let mut forged = header.encode()?;
        forged.extend_from_slice(state);
        std::fs::write(&path, forged)?;
        let refused = verify(&path, &runtime);
        assert!(
            matches!(refused, Err(BackupError::Unusable(_))),
            "{refused:?}"
        );
        Ok(())
    }

    #[test]
    fn another_format_version_is_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (path, mut bytes) = sample(dir.path())?;
        bytes[8] = 9;
        std::fs::write(&path, bytes)?;
        assert!(matches!(open(&path), Err(BackupError::Version(9))));
        Ok(())
    }
}
