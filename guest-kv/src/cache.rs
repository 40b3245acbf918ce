//! The cache logic: commands applied to a byte-keyed store, with expiry
//! driven only by the leader-stamped time of the entry.
//!
//! Store layout:
//! - `d` + key → expiry (`u64` little-endian milliseconds, `0` = never) + value
//! - `x` + expiry (`u64` big-endian) + key → empty: the expiry index, ordered
//!   by time so that expired keys are found with one ordered scan.
//!
//! An index entry may be stale (the key was overwritten or deleted since);
//! the sweep checks the data entry before deleting it, so writes never need to
//! read the old value to keep the index exact.

use crate::command::{Command, DecodeError, Response};

/// The host-owned state the cache works on.
pub trait Store {
    /// The value under `key`.
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>>;
    /// Stores `value` under `key`.
    fn set(&mut self, key: &[u8], value: &[u8]);
    /// Removes `key`.
    fn delete(&mut self, key: &[u8]);
    /// Up to `limit` entries with `start <= key < end`, in key order.
    fn scan(&mut self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)>;
}

/// How many expired keys one entry removes at most, so that a burst of
/// expiries is spread over several entries instead of slowing one.
pub const SWEEP_LIMIT: u32 = 16;

/// How many key and value bytes one sweep reads at most (it always removes
/// at least one expired key, so expiry keeps moving). With [`SWEEP_LIMIT`]
/// this bounds the sweep's cost by size, not only by count: the sweep runs in
/// the same call, under the same fuel budget, as the entry's first command,
/// so it must leave that command enough to succeed.
pub const SWEEP_BYTES: usize = 256 << 10;

/// The largest key a command may carry, in bytes (the HTTP API's limit too).
pub const MAX_KEY: usize = 1024;

/// The largest value a command may store, in bytes (the HTTP API's limit too).
pub const MAX_VALUE: usize = 1 << 20;

const DATA: u8 = b'd';
const EXPIRY: u8 = b'x';

/// Why a command was refused. Every replica refuses the same command the same
/// way, so the message is part of the replicated outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The command bytes do not decode.
    Malformed(DecodeError),
    /// A write was sent as a query.
    WriteInQuery,
    /// The key is empty.
    EmptyKey,
    /// The key is longer than [`MAX_KEY`]; its length.
    KeyTooLarge(usize),
    /// The value is longer than [`MAX_VALUE`]; its length.
    ValueTooLarge(usize),
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::Malformed(e) => e.fmt(f),
            Refusal::WriteInQuery => f.write_str("a query cannot change state; send it as a write"),
            Refusal::EmptyKey => f.write_str("the key is empty"),
            Refusal::KeyTooLarge(len) => {
                write!(f, "the key is {len} bytes; the limit is {MAX_KEY}")
            }
            Refusal::ValueTooLarge(len) => {
                write!(f, "the value is {len} bytes; the limit is {MAX_VALUE}")
            }
        }
    }
}

/// Applies one committed command at time `now_ms`. On the first command of
/// an entry (`sweep`), expired keys are removed first.
///
/// # Errors
/// A [`Refusal`] for a command that cannot be applied; the host discards the
/// call's writes.
pub fn apply(
    store: &mut impl Store,
    now_ms: u64,
    sweep: bool,
    command: &[u8],
) -> Result<Response, Refusal> {
    if sweep {
        sweep_expired(store, now_ms);
    }
    let command = Command::decode(command).map_err(Refusal::Malformed)?;
    check_limits(&command)?;
    Ok(match command {
        Command::Set { key, value, ttl_ms } => {
            put(store, now_ms, key, value, ttl_ms);
            Response::Done
        }
        Command::Get { key } => Response::Value(read(store, now_ms, key)),
        Command::Delete { key } => {
            let existed = read_entry(store, now_ms, key).is_some();
            store.delete(&data_key(key));
            Response::Deleted(existed)
        }
        Command::CompareAndSet {
            key,
            expected,
            value,
            ttl_ms,
        } => {
            let current = read(store, now_ms, key);
            if current.as_deref() == expected {
                put(store, now_ms, key, value, ttl_ms);
                Response::Swapped {
                    swapped: true,
                    current: Some(value.to_vec()),
                }
            } else {
                Response::Swapped {
                    swapped: false,
                    current,
                }
            }
        }
    })
}

/// Answers a read-only command (only `Get`) at time `now_ms`.
///
/// # Errors
/// A [`Refusal`] for a malformed request or a write.
pub fn query(store: &mut impl Store, now_ms: u64, request: &[u8]) -> Result<Response, Refusal> {
    let command = Command::decode(request).map_err(Refusal::Malformed)?;
    if command.is_write() {
        return Err(Refusal::WriteInQuery);
    }
    check_limits(&command)?;
    Ok(Response::Value(read(store, now_ms, command.key())))
}

/// Refuses an empty or oversized key and an oversized value, so that no
/// command, however it reached the log, stores more than the HTTP API allows.
fn check_limits(command: &Command<'_>) -> Result<(), Refusal> {
    let key = command.key();
    if key.is_empty() {
        return Err(Refusal::EmptyKey);
    }
    if key.len() > MAX_KEY {
        return Err(Refusal::KeyTooLarge(key.len()));
    }
    match *command {
        Command::Set { value, .. } | Command::CompareAndSet { value, .. }
            if value.len() > MAX_VALUE =>
        {
            Err(Refusal::ValueTooLarge(value.len()))
        }
        _ => Ok(()),
    }
}

/// One store change as the watch hook sees it: a key and its new value, or
/// `None` for a deletion.
pub type Change = (Vec<u8>, Option<Vec<u8>>);

/// What watchers see of one entry's store changes (the guest's watch hook):
/// a data entry becomes the user's key with its value (without the expiry
/// prefix), or a deletion of the user's key; expiry-index entries are left
/// out. So an expired key that the sweep removes shows as a deletion. It is
/// a pure function of `changes`, as the hook must be.
pub fn describe(changes: Vec<Change>) -> Vec<Change> {
    changes
        .into_iter()
        .filter_map(|(mut key, value)| {
            if key.first() != Some(&DATA) {
                return None;
            }
            key.remove(0);
            let value = value.map(|mut stored| stored.split_off(8.min(stored.len())));
            Some((key, value))
        })
        .collect()
}

fn put(store: &mut impl Store, now_ms: u64, key: &[u8], value: &[u8], ttl_ms: u64) {
    let expires_at = if ttl_ms == 0 {
        0
    } else {
        now_ms.saturating_add(ttl_ms)
    };
    let mut stored = Vec::with_capacity(8 + value.len());
    stored.extend_from_slice(&expires_at.to_le_bytes());
    stored.extend_from_slice(value);
    store.set(&data_key(key), &stored);
    if expires_at != 0 {
        store.set(&expiry_key(expires_at, key), &[]);
    }
}

fn read(store: &mut impl Store, now_ms: u64, key: &[u8]) -> Option<Vec<u8>> {
    read_entry(store, now_ms, key).map(|mut stored| stored.split_off(8))
}

/// The stored entry (expiry + value) of a live key.
fn read_entry(store: &mut impl Store, now_ms: u64, key: &[u8]) -> Option<Vec<u8>> {
    let stored = store.get(&data_key(key))?;
    let expires_at = expiry_of(&stored)?;
    (expires_at == 0 || expires_at > now_ms).then_some(stored)
}

/// Removes up to [`SWEEP_LIMIT`] expired keys, oldest first, stopping once
/// [`SWEEP_BYTES`] have been read. Index entries are fetched one at a time
/// (the ones already removed are hidden by the pending deletes), so a key
/// stored before the limits existed costs its own size and no more.
fn sweep_expired(store: &mut impl Store, now_ms: u64) {
    let start = [EXPIRY];
    let end = expiry_key(now_ms.saturating_add(1), &[]);
    let mut read = 0;
    for _ in 0..SWEEP_LIMIT {
        if read >= SWEEP_BYTES {
            break;
        }
        let Some((index_key, _)) = store.scan(&start, &end, 1).pop() else {
            break;
        };
        read += index_key.len();
        // A malformed index entry (no expiry) cannot come from this guest;
        // it is dropped so that it cannot block the sweep.
        let Some((expires_at, key)) = index_key.get(1..).and_then(|k| k.split_at_checked(8)) else {
            store.delete(&index_key);
            continue;
        };
        let data = data_key(key);
        let stored = store.get(&data);
        read += stored.as_ref().map_or(0, Vec::len);
        let still_due = stored
            .and_then(|stored| expiry_of(&stored))
            .is_some_and(|at| at.to_le_bytes() == u64_be_to_le(expires_at));
        if still_due {
            store.delete(&data);
        }
        store.delete(&index_key);
    }
}

fn expiry_of(stored: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = stored.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

fn u64_be_to_le(be: &[u8]) -> [u8; 8] {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(be);
    bytes.reverse();
    bytes
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(DATA);
    k.extend_from_slice(key);
    k
}

fn expiry_key(expires_at: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(EXPIRY);
    k.extend_from_slice(&expires_at.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// A `BTreeMap` store, for running the logic natively (tests, benchmarks).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryStore(pub std::collections::BTreeMap<Vec<u8>, Vec<u8>>);

impl Store for MemoryStore {
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key).cloned()
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.0.insert(key.to_vec(), value.to_vec());
    }

    fn delete(&mut self, key: &[u8]) {
        self.0.remove(key);
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        if start >= end {
            return Vec::new();
        }
        self.0
            .range(start.to_vec()..end.to_vec())
            .take(limit as usize)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(store: &mut MemoryStore, now: u64, command: Command<'_>) -> Response {
        apply(store, now, true, &command.encode()).expect("command applies")
    }

    #[test]
    fn describe_shows_user_keys_and_hides_the_expiry_index() {
        let mut store = MemoryStore::default();
        run(
            &mut store,
            1,
            Command::Set {
                key: b"k",
                value: b"v",
                ttl_ms: 10,
            },
        );
        let mut changes: Vec<Change> = store
            .0
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        changes.push((data_key(b"gone"), None));
        assert_eq!(
            describe(changes),
            vec![
                (b"k".to_vec(), Some(b"v".to_vec())),
                (b"gone".to_vec(), None)
            ]
        );
    }

    #[test]
    fn expired_keys_vanish_and_are_swept() {
        let mut store = MemoryStore::default();
        let set = Command::Set {
            key: b"k",
            value: b"v",
            ttl_ms: 100,
        };
        assert_eq!(run(&mut store, 1_000, set), Response::Done);
        let get = Command::Get { key: b"k" };
        assert_eq!(
            run(&mut store, 1_099, get.clone()),
            Response::Value(Some(b"v".to_vec()))
        );
        assert_eq!(run(&mut store, 1_100, get), Response::Value(None));
        assert!(store.0.is_empty(), "sweep left {:?}", store.0);
    }

    #[test]
    fn overwrite_without_ttl_survives_the_old_expiry() {
        let mut store = MemoryStore::default();
        let with_ttl = Command::Set {
            key: b"k",
            value: b"old",
            ttl_ms: 10,
        };
        run(&mut store, 0, with_ttl);
        let forever = Command::Set {
            key: b"k",
            value: b"new",
            ttl_ms: 0,
        };
        run(&mut store, 5, forever);
        let get = Command::Get { key: b"k" };
        assert_eq!(
            run(&mut store, 1_000, get),
            Response::Value(Some(b"new".to_vec()))
        );
        assert_eq!(store.0.len(), 1, "the stale index entry is swept");
    }

    #[test]
    fn compare_and_set_swaps_only_on_match() {
        let mut store = MemoryStore::default();
        let create = Command::CompareAndSet {
            key: b"k",
            expected: None,
            value: b"1",
            ttl_ms: 0,
        };
        assert_eq!(
            run(&mut store, 0, create.clone()),
            Response::Swapped {
                swapped: true,
                current: Some(b"1".to_vec())
            }
        );
        assert_eq!(
            run(&mut store, 0, create),
            Response::Swapped {
                swapped: false,
                current: Some(b"1".to_vec())
            }
        );
    }

    #[test]
    fn queries_refuse_writes_and_empty_keys() {
        let mut store = MemoryStore::default();
        let delete = Command::Delete { key: b"k" }.encode();
        assert_eq!(query(&mut store, 0, &delete), Err(Refusal::WriteInQuery));
        let empty = Command::Get { key: b"" }.encode();
        assert_eq!(query(&mut store, 0, &empty), Err(Refusal::EmptyKey));
        assert_eq!(apply(&mut store, 0, false, &empty), Err(Refusal::EmptyKey));
    }

    #[test]
    fn oversized_keys_and_values_are_refused() {
        let mut store = MemoryStore::default();
        let long_key = vec![b'k'; MAX_KEY + 1];
        let big_value = vec![b'v'; MAX_VALUE + 1];
        let commands = [
            (
                Command::Set {
                    key: &long_key,
                    value: b"v",
                    ttl_ms: 1,
                },
                Refusal::KeyTooLarge(MAX_KEY + 1),
            ),
            (
                Command::Set {
                    key: b"k",
                    value: &big_value,
                    ttl_ms: 0,
                },
                Refusal::ValueTooLarge(MAX_VALUE + 1),
            ),
            (
                Command::CompareAndSet {
                    key: b"k",
                    expected: None,
                    value: &big_value,
                    ttl_ms: 0,
                },
                Refusal::ValueTooLarge(MAX_VALUE + 1),
            ),
            (
                Command::Delete { key: &long_key },
                Refusal::KeyTooLarge(MAX_KEY + 1),
            ),
        ];
        for (command, refusal) in commands {
            assert_eq!(apply(&mut store, 0, true, &command.encode()), Err(refusal));
        }
        let get = Command::Get { key: &long_key }.encode();
        assert_eq!(
            query(&mut store, 0, &get),
            Err(Refusal::KeyTooLarge(MAX_KEY + 1))
        );
        assert!(store.0.is_empty(), "a refused command wrote {:?}", store.0);
        let longest = vec![b'k'; MAX_KEY];
        let largest = vec![b'v'; MAX_VALUE];
        let set = Command::Set {
            key: &longest,
            value: &largest,
            ttl_ms: 0,
        };
        assert_eq!(run(&mut store, 0, set), Response::Done);
    }

    #[test]
    fn sweep_stops_after_its_byte_budget_but_always_progresses() {
        let mut store = MemoryStore::default();
        let value = vec![b'v'; SWEEP_BYTES / 2];
        for i in 0..8u8 {
            let set = Command::Set {
                key: &[b'k', i],
                value: &value,
                ttl_ms: 10,
            };
            run(&mut store, 0, set);
        }
        let get = Command::Get { key: b"other" };
        run(&mut store, 100, get.clone());
        // Two values fill the budget; the third is not read.
        assert_eq!(store.0.len(), 2 * 6, "left {} entries", store.0.len());

        // An entry larger than the whole budget is still removed.
        let mut store = MemoryStore::default();
        let huge = vec![b'v'; SWEEP_BYTES * 2];
        for i in 0..2u8 {
            store.set(&data_key(&[i]), &[&5u64.to_le_bytes()[..], &huge].concat());
            store.set(&expiry_key(5, &[i]), &[]);
        }
        run(&mut store, 100, get);
        assert_eq!(store.0.len(), 2, "one of two oversized keys is swept");
    }
}
