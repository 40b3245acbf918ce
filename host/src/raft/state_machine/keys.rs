//! The layout of the state tree: host metadata under `0x00`, the guest's
//! keys under `0x01`, and the guest's view of its own keys.

use crate::runtime::StateRead;

pub(super) const GUEST: u8 = 0x01;
/// The sled tree that holds the state.
pub const STATE_TREE: &str = "state";
pub(super) const KEY_GUEST_HASH: &[u8] = b"\0guest/hash";
pub(super) const KEY_GUEST_MODULE: &[u8] = b"\0guest/module";
pub(super) const KEY_GUEST_SINCE: &[u8] = b"\0guest/since";
pub(super) const KEY_GUEST_HISTORY: &[u8] = b"\0guest/history";
pub(super) const PREFIX_STAGED: &[u8] = b"\0staged/";
pub(super) const KEY_STAGED_ORDER: &[u8] = b"\0guest/staged-order";

/// The guest keys of the state tree, as the runtime's [`StateRead`].
#[derive(Debug, Clone)]
pub struct SledState(pub(super) sled::Tree);

pub(super) fn guest_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(GUEST);
    k.extend_from_slice(key);
    k
}

impl StateRead for SledState {
    fn get(&self, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.0.get(guest_key(key))?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let start = guest_key(start);
        let end = end.map_or_else(|| vec![GUEST + 1], guest_key);
        let mut entries = Vec::new();
        let mut bytes = 0;
        for item in self.0.range(start..end).take(limit) {
            if bytes >= max_bytes {
                break;
            }
            let (k, v) = item?;
            bytes += k.len() - 1 + v.len();
            entries.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(entries)
    }
}

/// Whether `key` may appear in a state tree: a host (`0x00`) or guest
/// (`0x01`) key.
pub fn is_state_key(key: &[u8]) -> bool {
    matches!(key.first(), Some(&(0 | GUEST)))
}

/// Whether `key` is a host (`0x00`) key, which checks read.
pub fn is_host_key(key: &[u8]) -> bool {
    key.first() == Some(&0)
}
