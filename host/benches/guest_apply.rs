//! Guest runtime benchmark: nanoseconds per applied command through the
//! bundled guest against the same cache logic compiled natively, and the time
//! to load the bundled guest from the compile cache, and what recording
//! each entry's changes for watchers (the guest's watch hook) adds.
//!
//! Run with `cargo bench -p raftwasm --bench guest_apply`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_kv::cache::{self, MemoryStore};
use guest_kv::command::Command;
use raftwasm::runtime::{BUNDLED_GUEST, Context, GuestRuntime, Limits, MemoryState};

const KEYS: usize = 1024;
const COMMANDS: usize = 200_000;
/// Commands per log entry: the writes of an entry are committed together.
const BATCH: usize = 64;
const ROUNDS: usize = 5;

fn commands() -> Vec<Vec<u8>> {
    let value = [b'v'; 100];
    (0..COMMANDS)
        .map(|i| {
            let key = format!("key-{:012}", i % KEYS);
            assert_eq!(key.len(), 16);
            Command::Set {
                key: key.as_bytes(),
                value: &value,
                ttl_ms: 0,
            }
            .encode()
        })
        .collect()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn per_op(elapsed: Duration, ops: usize) -> f64 {
    elapsed.as_nanos() as f64 / ops as f64
}

fn main() {
    let commands = commands();
    let runtime = GuestRuntime::new(Limits::default(), None).expect("engine");
    let module = runtime.load(BUNDLED_GUEST).expect("bundled guest");

    // ns per command with `per_entry` commands in each entry, recording
    // each entry's changes as the state machine does for watchers when
    // `watched`.
    let through_guest = |per_entry: usize, watched: bool| {
        let commands = &commands[..commands.len() / BATCH * per_entry.min(BATCH)];
        median(
            (0..ROUNDS)
                .map(|_| {
                    let state = Arc::new(MemoryState::default());
                    let mut instance = module.instantiate(state.clone());
                    let start = Instant::now();
                    for (entry, batch) in commands.chunks(per_entry).enumerate() {
                        for (position, command) in batch.iter().enumerate() {
                            let ctx = Context {
                                index: entry as u64 + 1,
                                position: position as u32,
                                time_ms: 1_000,
                            };
                            let outcome = instance.apply(ctx, command).expect("no host fault");
                            assert!(outcome.result.is_ok());
                        }
                        if watched {
                            let touched = instance.take_touched();
                            let changes = instance.pending_changes(touched);
                            let described = instance.describe(changes).expect("no host fault");
                            assert_eq!(described.len(), batch.len().min(KEYS));
                        }
                        state.commit(instance.take_writes());
                    }
                    per_op(start.elapsed(), commands.len())
                })
                .collect(),
        )
    };
    let guest = through_guest(BATCH, false);
    let guest_watched = through_guest(BATCH, true);
    let single = through_guest(1, false);
    let single_watched = through_guest(1, true);

    let native = median(
        (0..ROUNDS)
            .map(|_| {
                let mut store = MemoryStore::default();
                let start = Instant::now();
                for (position, command) in commands.iter().enumerate() {
                    let sweep = position % BATCH == 0;
                    let response = cache::apply(&mut store, 1_000, sweep, command);
                    assert!(response.is_ok());
                }
                per_op(start.elapsed(), commands.len())
            })
            .collect(),
    );

    let fuel = {
        let state = Arc::new(MemoryState::default());
        let mut instance = module.instantiate(state);
        let ctx = Context {
            index: 1,
            position: 1,
            time_ms: 1_000,
        };
        instance
            .apply(ctx, &commands[0])
            .expect("no host fault")
            .fuel_used
    };

    let cache_dir = tempfile::tempdir().expect("temp dir");
    let cached =
        GuestRuntime::new(Limits::default(), Some(cache_dir.path().to_owned())).expect("engine");
    let compile_start = Instant::now();
    cached.load(BUNDLED_GUEST).expect("compile");
    let compile = compile_start.elapsed();
    let load_from_cache = median(
        (0..21)
            .map(|_| {
                let start = Instant::now();
                cached.load(BUNDLED_GUEST).expect("load from cache");
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    );

    println!(
        "guest apply benchmark: {COMMANDS} set commands, 16-byte keys, 100-byte values, {BATCH} commands per entry, median of {ROUNDS}"
    );
    println!("  through the guest : {guest:8.0} ns/command ({fuel} fuel)");
    println!("  native            : {native:8.0} ns/command");
    println!(
        "  guest overhead    : {:8.0} ns/command ({:.1}x)",
        guest - native,
        guest / native
    );
    println!("recording changes for watchers (take the touched keys, watch hook):");
    println!(
        "  {BATCH} commands/entry : {guest_watched:8.0} ns/command (+{:.0})",
        guest_watched - guest
    );
    println!(
        "  1 command/entry   : {single_watched:8.0} ns/entry (+{:.0}; {single:.0} without)",
        single_watched - single
    );
    println!("bundled guest ({} bytes)", BUNDLED_GUEST.len());
    println!(
        "  compile           : {:8.1} ms",
        compile.as_secs_f64() * 1e3
    );
    println!("  load from cache   : {load_from_cache:8.0} µs (median of 21)");
}
