//! Store calls that move many bytes: a `scan` answers at most its byte
//! budget, every byte moved costs fuel, and a guest that scans huge values
//! over and over runs out of fuel cleanly instead of holding the node.

use raftwasm::runtime::{BYTES_PER_FUEL, Context, MAX_SCAN_BYTES};
use raftwasm_tests::{CHAOS_GUEST, Replica, runtime};

const HUGE_VALUE_BYTES: usize = 1 << 20;

/// A chaos replica holding 16 committed values of 1 MiB.
fn filled() -> Replica {
    let module = runtime().load(CHAOS_GUEST).expect("the chaos guest loads");
    let mut replica = Replica::new(&module);
    assert_eq!(replica.apply(0, b"f").result, Ok(b"filled".to_vec()));
    replica
}

/// The (entries, bytes) a chaos `S` answered.
fn counts(answer: &[u8]) -> (u32, u64) {
    let entries = u32::from_le_bytes(answer[..4].try_into().expect("4 bytes"));
    let bytes = u64::from_le_bytes(answer[4..12].try_into().expect("8 bytes"));
    (entries, bytes)
}

#[test]
fn one_scan_returns_at_most_its_byte_budget() {
    let mut replica = filled();
    let outcome = replica.apply(1, b"S");
    let (entries, bytes) = counts(&outcome.result.expect("the scan succeeds"));
    let entry_bytes = (HUGE_VALUE_BYTES + "huge/00".len()) as u64;
    assert!((1..16).contains(&entries), "{entries} entries came back");
    assert!(bytes <= MAX_SCAN_BYTES as u64, "{bytes} bytes came back");
    assert_eq!(bytes, u64::from(entries) * entry_bytes);
    assert!(
        outcome.fuel_used >= bytes / BYTES_PER_FUEL,
        "{} fuel for {bytes} bytes",
        outcome.fuel_used
    );
}

#[test]
fn scan_answer_and_fuel_do_not_depend_on_what_is_committed() {
    let mut committed = filled();
    let from_committed = committed.apply(1, b"S");

    // The same writes, still pending in the instance's overlay.
    let module = runtime().load(CHAOS_GUEST).expect("the chaos guest loads");
    let mut pending = Replica::new(&module);
    let ctx = |index| Context {
        index,
        position: 0,
        time_ms: 0,
    };
    let fill = pending.instance.apply(ctx(1), b"f").expect("no host fault");
    assert!(fill.result.is_ok());
    let from_pending = pending.instance.apply(ctx(2), b"S").expect("no host fault");
    assert_eq!(from_pending, from_committed);
}

#[test]
fn get_costs_fuel_by_the_bytes_it_returns() {
    let mut replica = filled();
    let big = replica.apply(1, b"ghuge/00");
    let missing = replica.apply(2, b"gnokey00");
    assert_eq!(
        big.result,
        Ok((HUGE_VALUE_BYTES as u64).to_le_bytes().to_vec())
    );
    assert_eq!(missing.result, Ok(0u64.to_le_bytes().to_vec()));
    let extra = big.fuel_used - missing.fuel_used;
    let moved = HUGE_VALUE_BYTES as u64 / BYTES_PER_FUEL;
    assert!(
        (moved..moved + 1_000).contains(&extra),
        "a 1 MiB get cost {extra} more fuel than a miss; the bytes alone cost {moved}"
    );
}

#[test]
fn scanning_huge_values_forever_runs_out_of_fuel() {
    let mut replica = filled();
    let started = std::time::Instant::now();
    let outcome = replica.apply(1, b"s");
    let error = outcome.result.expect_err("the endless scan fails");
    assert!(error.contains("ran out of fuel"), "{error}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "running out took {:?}",
        started.elapsed()
    );
    let before = replica.state.entries();
    assert_eq!(replica.apply(2, b"ok").result, Ok(b"fine".to_vec()));
    assert_eq!(replica.state.entries().len(), before.len());
}
