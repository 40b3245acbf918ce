//! Determinism: the same commands give the same responses, state and fuel on
//! a long-lived instance and on fresh instances.

use guest_kv::command::Command;
use raftwasm::runtime::BUNDLED_GUEST;
use raftwasm_tests::{Replica, runtime};

/// A fixed, varied command sequence (sets with and without TTL, gets,
/// deletes, compare-and-sets, a malformed command), from a simple LCG.
fn commands() -> Vec<(u64, Vec<u8>)> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        seed >> 33
    };
    (0..600u64)
        .map(|i| {
            let key = format!("key-{:02}", next() % 40).into_bytes();
            let value = vec![b'a' + (next() % 26) as u8; (next() % 300) as usize];
            let time = 1_000 + i * 7;
            let command = match next() % 6 {
                0 => Command::Set {
                    key: &key,
                    value: &value,
                    ttl_ms: 0,
                }
                .encode(),
                1 => Command::Set {
                    key: &key,
                    value: &value,
                    ttl_ms: next() % 200,
                }
                .encode(),
                2 => Command::Get { key: &key }.encode(),
                3 => Command::Delete { key: &key }.encode(),
                4 => Command::CompareAndSet {
                    key: &key,
                    expected: Some(&value[..value.len().min(1)]),
                    value: &value,
                    ttl_ms: 0,
                }
                .encode(),
                _ if i % 50 == 0 => b"\xffnot a command".to_vec(),
                _ => Command::Get { key: &key }.encode(),
            };
            (time, command)
        })
        .collect()
}

#[test]
fn fresh_and_long_lived_instances_agree() {
    let module = runtime()
        .load(BUNDLED_GUEST)
        .expect("the bundled guest loads");
    let mut long_lived = Replica::new(&module);
    let mut fresh = Replica::new(&module);

    for (time, command) in commands() {
        let a = long_lived.apply(time, &command);
        // A new instance for every command, on the same state.
        fresh.instance = module.instantiate(fresh.state.clone());
        let b = fresh.apply(time, &command);
        assert_eq!(a, b, "command {command:?} at {time} diverged");
        assert!(a.fuel_used > 0);
    }
    assert_eq!(long_lived.state.entries(), fresh.state.entries());
    assert!(!long_lived.state.entries().is_empty());
}

#[test]
fn replaying_a_log_reproduces_the_state() {
    let module = runtime()
        .load(BUNDLED_GUEST)
        .expect("the bundled guest loads");
    let run = || {
        let mut replica = Replica::new(&module);
        let outcomes: Vec<_> = commands()
            .into_iter()
            .map(|(time, command)| replica.apply(time, &command))
            .collect();
        (outcomes, replica.state.entries())
    };
    assert_eq!(run(), run());
}
