//! The bundled guest-kv through the real runtime: set, get, delete, TTL and
//! compare-and-set round trips.

use guest_kv::command::{Command, Response};
use raftwasm::runtime::BUNDLED_GUEST;
use raftwasm_tests::{Replica, runtime};

fn replica() -> Replica {
    let module = runtime()
        .load(BUNDLED_GUEST)
        .expect("the bundled guest loads");
    assert_eq!(module.name(), "guest-kv");
    Replica::new(&module)
}

#[test]
fn set_get_delete_round_trip() {
    let mut kv = replica();
    let set = Command::Set {
        key: b"abc",
        value: b"efg",
        ttl_ms: 0,
    };
    assert_eq!(kv.kv(1_000, set), Response::Done);
    assert_eq!(kv.get(1_000, b"abc"), Some(b"efg".to_vec()));
    assert_eq!(
        kv.kv(1_000, Command::Get { key: b"abc" }),
        Response::Value(Some(b"efg".to_vec()))
    );
    assert_eq!(
        kv.kv(1_001, Command::Delete { key: b"abc" }),
        Response::Deleted(true)
    );
    assert_eq!(
        kv.kv(1_002, Command::Delete { key: b"abc" }),
        Response::Deleted(false)
    );
    assert_eq!(kv.get(1_002, b"abc"), None);
}

#[test]
fn ttl_expires_at_the_stamped_time() {
    let mut kv = replica();
    let set = Command::Set {
        key: b"session",
        value: b"token",
        ttl_ms: 500,
    };
    kv.kv(10_000, set);
    assert_eq!(kv.get(10_499, b"session"), Some(b"token".to_vec()));
    assert_eq!(kv.get(10_500, b"session"), None);
    // The next write entry at or after the expiry sweeps the key away.
    let other = Command::Set {
        key: b"other",
        value: b"v",
        ttl_ms: 0,
    };
    kv.kv(10_500, other);
    let keys: Vec<_> = kv.state.entries().into_keys().collect();
    assert_eq!(
        keys,
        vec![b"dother".to_vec()],
        "expired key and its index entry are gone"
    );
}

#[test]
fn compare_and_set_round_trip() {
    let mut kv = replica();
    let create = Command::CompareAndSet {
        key: b"lock",
        expected: None,
        value: b"owner-1",
        ttl_ms: 0,
    };
    assert_eq!(
        kv.kv(0, create.clone()),
        Response::Swapped {
            swapped: true,
            current: Some(b"owner-1".to_vec())
        }
    );
    assert_eq!(
        kv.kv(1, create),
        Response::Swapped {
            swapped: false,
            current: Some(b"owner-1".to_vec())
        }
    );
    let hand_over = Command::CompareAndSet {
        key: b"lock",
        expected: Some(b"owner-1"),
        value: b"owner-2",
        ttl_ms: 0,
    };
    assert!(matches!(
        kv.kv(2, hand_over),
        Response::Swapped { swapped: true, .. }
    ));
    assert_eq!(kv.get(2, b"lock"), Some(b"owner-2".to_vec()));
}

#[test]
fn malformed_commands_are_refused_without_writes() {
    let mut kv = replica();
    let outcome = kv.apply(0, b"\x09garbage");
    assert_eq!(
        outcome.result,
        Err("malformed message: unknown command tag".into())
    );
    let empty_key = Command::Set {
        key: b"",
        value: b"v",
        ttl_ms: 0,
    };
    assert_eq!(
        kv.apply(0, &empty_key.encode()).result,
        Err("the key is empty".into())
    );
    assert!(kv.state.entries().is_empty());
}

/// guest-kv's data entry for `key`: expiry (little-endian) and value.
fn data_entry(key: &[u8], expires_at: u64, value: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    let stored = [&expires_at.to_le_bytes()[..], value].concat();
    ([b"d", key].concat(), Some(stored))
}

/// guest-kv's expiry index entry for `key`.
fn index_entry(key: &[u8], expires_at: u64) -> (Vec<u8>, Option<Vec<u8>>) {
    let index = [&b"x"[..], &expires_at.to_be_bytes(), key].concat();
    (index, Some(Vec::new()))
}

#[test]
fn oversized_keys_and_values_are_refused_by_the_guest() {
    let mut kv = replica();
    let long_key = vec![b'k'; 1025];
    let set = Command::Set {
        key: &long_key,
        value: b"v",
        ttl_ms: 1,
    };
    let refused = kv.apply(0, &set.encode()).result.expect_err("refused");
    assert_eq!(refused, "the key is 1025 bytes; the limit is 1024");
    let big_value = vec![b'v'; (1 << 20) + 1];
    let set = Command::Set {
        key: b"k",
        value: &big_value,
        ttl_ms: 0,
    };
    let refused = kv.apply(0, &set.encode()).result.expect_err("refused");
    assert_eq!(refused, "the value is 1048577 bytes; the limit is 1048576");
    assert!(kv.state.entries().is_empty(), "a refused command wrote");
}

#[test]
fn sweep_of_oversized_expired_keys_leaves_fuel_for_the_command() {
    // State an older guest-kv let in: 16 expired keys of 1.1 MB each.
    let mut kv = replica();
    let mut legacy = std::collections::BTreeMap::new();
    for i in 0..16u8 {
        let mut key = vec![b'k'; 1_100_000];
        key[0] = i;
        legacy.extend([data_entry(&key, 5, b"v"), index_entry(&key, 5)]);
    }
    kv.state.commit(legacy);

    // Every later entry sweeps; each still runs its own command.
    for (time, value) in [(1_000, &b"a"[..]), (1_001, b"b"), (1_002, b"c")] {
        let set = Command::Set {
            key: b"user",
            value,
            ttl_ms: 0,
        };
        let outcome = kv.apply(time, &set.encode());
        assert!(
            outcome.result.is_ok(),
            "a set after the expiries failed: {:?} ({} fuel)",
            outcome.result,
            outcome.fuel_used
        );
        assert_eq!(kv.get(time, b"user"), Some(value.to_vec()));
    }
    let left = kv.state.entries().len();
    assert!(left < 32 + 1, "the sweep removed nothing ({left} entries)");
}
