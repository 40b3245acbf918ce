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
