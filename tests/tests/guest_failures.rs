//! Guests that misbehave: each failure is a deterministic error result, no
//! write of the failed call survives, and the runtime keeps serving.

use raftwasm::runtime::{Context, GuestRuntime, Limits, LoadError, MemoryState};
use raftwasm_tests::{CHAOS_GUEST, Replica, runtime};
use std::sync::Arc;

fn chaos() -> Replica {
    let module = runtime().load(CHAOS_GUEST).expect("the chaos guest loads");
    Replica::new(&module)
}

/// Runs `command`, checks it failed with an error containing `expected` and
/// left no write, then checks the same instance still applies a good command.
fn fails_cleanly(command: &[u8], expected: &str) {
    let mut replica = chaos();
    let outcome = replica.apply(0, command);
    let error = outcome.result.expect_err("the command fails");
    assert!(
        error.contains(expected),
        "error {error:?} should contain {expected:?}"
    );
    assert!(
        replica.state.entries().is_empty(),
        "a failed call wrote {:?}",
        replica.state.entries()
    );

    let outcome = replica.apply(1, b"ok");
    assert_eq!(
        outcome.result,
        Ok(b"fine".to_vec()),
        "the runtime keeps serving after {expected}"
    );
    assert_eq!(replica.state.entries().len(), 1);
}

#[test]
fn guest_error_result_discards_writes() {
    fails_cleanly(b"error", "refused on purpose");
}

#[test]
fn trapping_guest_is_contained() {
    fails_cleanly(
        b"trap",
        "the guest trapped: wasm `unreachable` instruction executed",
    );
}

#[test]
fn panicking_guest_is_contained() {
    fails_cleanly(b"panic", "the guest trapped");
}

#[test]
fn endless_loop_runs_out_of_fuel() {
    fails_cleanly(b"loop", "the guest ran out of fuel (budget 10000000)");
}

#[test]
fn unbounded_memory_growth_is_stopped() {
    fails_cleanly(b"memory", "the guest trapped");
}

/// The depth limit is counted in the guest's code, not on the native stack,
/// so every replica stops the recursion at the same frame.
#[test]
fn deep_recursion_overflows_the_stack() {
    fails_cleanly(
        b"recurse",
        "the guest trapped: call stack exhausted (its frames exceeded the stack limit of 32768 units)",
    );
}

/// An apply whose answer or import arguments break the canonical ABI is a
/// refusal like a trap: it depends only on the module and the command, so
/// every replica records the same error and the log moves on.
#[test]
fn answer_list_out_of_bounds_is_a_refusal_not_a_host_fault() {
    fails_cleanly(
        b"bounds",
        "the guest broke the component ABI: list pointer/length out of bounds of memory",
    );
}

#[test]
fn answer_string_that_is_not_utf8_is_a_refusal_not_a_host_fault() {
    fails_cleanly(b"utf8", "the guest broke the component ABI");
}

#[test]
fn import_call_with_a_bad_option_discriminant_is_a_refusal_not_a_host_fault() {
    fails_cleanly(
        b"variant",
        "the guest broke the component ABI: invalid option discriminant",
    );
}

#[test]
fn query_cannot_write() {
    let module = runtime().load(CHAOS_GUEST).expect("the chaos guest loads");
    let state = Arc::new(MemoryState::default());
    let mut instance = module.instantiate(state.clone());
    let ctx = Context {
        index: 0,
        position: 0,
        time_ms: 0,
    };
    let outcome = instance.query(ctx, b"w").expect("no host fault");
    assert_eq!(
        outcome.result,
        Err("a query tried to write to the store; queries are read-only".into())
    );
    assert!(instance.take_writes().is_empty());
    assert_eq!(
        instance.query(ctx, b"r").expect("no host fault").result,
        Ok(Vec::new())
    );
}

#[test]
fn failing_migration_leaves_no_write() {
    let module = runtime().load(CHAOS_GUEST).expect("the chaos guest loads");
    assert!(module.has_migrate());
    let mut replica = Replica::new(&module);
    let previous = raftwasm::runtime::GuestInfo {
        name: "chaos".into(),
        version: "0.0.1".into(),
    };
    let ctx = Context {
        index: 1,
        position: 0,
        time_ms: 0,
    };
    let outcome = replica
        .instance
        .migrate(ctx, previous)
        .expect("no host fault");
    assert_eq!(outcome.result, Err("migration refused on purpose".into()));
    assert!(replica.instance.take_writes().is_empty());
}

fn load_error(wasm: &[u8]) -> LoadError {
    runtime().load(wasm).expect_err("the module is refused")
}

#[test]
fn junk_bytes_are_not_wasm() {
    assert!(matches!(
        load_error(b"definitely not wasm"),
        LoadError::NotWasm
    ));
    let truncated = &CHAOS_GUEST[..CHAOS_GUEST.len() / 2];
    assert!(matches!(
        load_error(truncated),
        LoadError::Invalid(_) | LoadError::WrongWorld(_)
    ));
}

#[test]
fn core_module_importing_a_clock_is_refused() {
    let wasm = wat::parse_str(r#"(module (import "wasi_snapshot_preview1" "clock_time_get" (func (param i32 i64 i32) (result i32))))"#)
        .expect("valid wat");
    match load_error(&wasm) {
        LoadError::ForbiddenImport(name) => {
            assert_eq!(name, "wasi_snapshot_preview1#clock_time_get")
        }
        other => panic!("expected a forbidden import, got {other}"),
    }
}

#[test]
fn component_importing_wasi_is_refused() {
    let wasm = wat::parse_str(r#"(component (import "wasi:random/random@0.2.0" (instance)))"#)
        .expect("valid wat");
    match load_error(&wasm) {
        LoadError::ForbiddenImport(name) => assert_eq!(name, "wasi:random/random@0.2.0"),
        other => panic!("expected a forbidden import, got {other}"),
    }
}

#[test]
fn module_for_another_world_is_refused() {
    let component = wat::parse_str("(component)").expect("valid wat");
    assert!(matches!(load_error(&component), LoadError::WrongWorld(_)));
    let core = wat::parse_str(r#"(module (func (export "apply")))"#).expect("valid wat");
    assert!(matches!(load_error(&core), LoadError::WrongWorld(_)));
}

#[test]
fn oversized_module_is_refused() {
    let limits = Limits {
        module_bytes: 1024,
        ..Limits::default()
    };
    let runtime = GuestRuntime::new(limits, None).expect("the wasm engine starts");
    match runtime.load(CHAOS_GUEST) {
        Err(LoadError::TooLarge { size, limit: 1024 }) => assert_eq!(size, CHAOS_GUEST.len()),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// What every node would say about the module itself is a refusal; a
/// failure of this node is not.
#[test]
fn module_defects_are_module_properties() {
    let defects = [
        load_error(b"definitely not wasm"),
        load_error(&CHAOS_GUEST[..CHAOS_GUEST.len() / 2]),
        load_error(&wat::parse_str("(component)").expect("valid wat")),
        load_error(
            &wat::parse_str(r#"(component (import "wasi:random/random@0.2.0" (instance)))"#)
                .expect("valid wat"),
        ),
    ];
    for defect in defects {
        assert!(defect.is_module_property(), "{defect}");
    }
}

/// A function body that does not validate is caught by the compiler, not
/// the parser; it is still the module's defect, refused on every node.
#[test]
fn invalid_function_body_is_a_module_property() {
    let component = wat::parse_str("(component (core module (func (result i32))))")
        .expect("valid wat, invalid wasm");
    match load_error(&component) {
        LoadError::Invalid(_) => {}
        other => panic!("expected Invalid, got {other}"),
    }
}

/// With every instance slot of the pool taken, a good module cannot be
/// instantiated for its `info` call: that is this node's failure, which must
/// stop the node, never a verdict that would refuse the module on this
/// replica while the others switch to it.
#[test]
fn exhausted_instance_pool_is_a_host_failure_not_a_bad_guest() {
    let runtime = runtime();
    let module = runtime.load(CHAOS_GUEST).expect("the chaos guest loads");
    let mut replicas = Vec::new();
    let error = loop {
        assert!(replicas.len() < 1000, "the instance pool never ran out");
        match runtime.load(CHAOS_GUEST) {
            Ok(_) => {
                let mut replica = Replica::new(&module);
                replica.apply(0, b"ok");
                replicas.push(replica);
            }
            Err(error) => break error,
        }
    };
    assert!(
        matches!(error, LoadError::Host(_)),
        "expected a host failure, got {error}"
    );
    assert!(!error.is_module_property());

    replicas.clear();
    runtime
        .load(CHAOS_GUEST)
        .expect("the same module loads once the pool has room");
}
