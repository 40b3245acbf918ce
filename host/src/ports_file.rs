//! The ports file (`--ports-file`): the addresses a node actually bound, so
//! that a node started on port 0 (`--http=127.0.0.1:0`) can be found by a
//! supervisor or a test without choosing ports in advance.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The bound addresses of a node, written as JSON once both ports listen.
/// They are also the addresses the node advertises to its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsFile {
    /// The client HTTP API, `host:port`.
    pub http: String,
    /// The peer port, `host:port`.
    pub raft: String,
}

impl PortsFile {
    /// Writes the file atomically: a reader sees no file or the whole one,
    /// never a partial write (the content goes to a sibling temp file, which
    /// is synced and renamed over `path`).
    ///
    /// # Errors
    /// When the directory of `path` is not writable.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(self)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Reads a file written by [`PortsFile::write`]; `Ok(None)` while it
    /// does not exist yet.
    ///
    /// # Errors
    /// When the file cannot be read or is not a ports file.
    pub fn read(path: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_ports_file_reads_back_and_a_missing_one_is_none() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ports.json");
        assert_eq!(PortsFile::read(&path)?, None);
        let ports = PortsFile {
            http: "127.0.0.1:41000".into(),
            raft: "127.0.0.1:41001".into(),
        };
        ports.write(&path)?;
        assert_eq!(PortsFile::read(&path)?, Some(ports));
        assert!(
            !dir.path().join("ports.json.tmp").exists(),
            "no temp file left"
        );
        Ok(())
    }
}
