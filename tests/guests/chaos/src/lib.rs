//! A guest that misbehaves on request, to test that the runtime contains it.
//!
//! `apply` first writes `written` = the command, then acts on the command's
//! first byte; `query` with `w` tries to write.

wit_bindgen::generate!({
    world: "state-machine-with-migrate",
    path: "../../../wit",
});

use exports::raftwasm::state_machine::migration;
use raftwasm::state_machine::store;

struct Chaos;

impl Guest for Chaos {
    fn info() -> GuestInfo {
        GuestInfo {
            name: "chaos".into(),
            version: "0.1.0".into(),
        }
    }

    fn apply(_ctx: Context, command: Vec<u8>) -> Result<Vec<u8>, String> {
        store::set(b"written", &command);
        match command.first() {
            Some(b'o') => Ok(b"fine".to_vec()),
            Some(b'e') => Err("refused on purpose".into()),
            Some(b't') => unreachable_trap(),
            Some(b'p') => panic!("panicking on purpose"),
            Some(b'l') => loop_forever(),
            Some(b'm') => grow_memory(),
            Some(b'r') => Ok(recurse(u64::MAX).to_le_bytes().to_vec()),
            _ => Err("unknown chaos command".into()),
        }
    }

    fn query(_ctx: Context, request: Vec<u8>) -> Result<Vec<u8>, String> {
        if request.first() == Some(&b'w') {
            store::set(b"written", b"by a query");
        }
        Ok(store::get(b"written").unwrap_or_default())
    }
}

impl migration::Guest for Chaos {
    fn migrate(_ctx: Context, _previous: GuestInfo) -> Result<(), String> {
        store::set(b"migrated", b"yes");
        Err("migration refused on purpose".into())
    }
}

fn unreachable_trap() -> ! {
    core::arch::wasm32::unreachable()
}

fn loop_forever() -> ! {
    let mut n = 0u64;
    loop {
        n = core::hint::black_box(n.wrapping_add(1));
    }
}

fn grow_memory() -> Result<Vec<u8>, String> {
    let mut hoard = Vec::new();
    loop {
        let mut block = Vec::<u8>::with_capacity(1 << 20);
        block.push(1);
        hoard.push(core::hint::black_box(block));
    }
}

/// Recursion that keeps its values in wasm locals (not in linear memory), so
/// it exhausts the host's stack limit rather than the guest's shadow stack.
#[inline(never)]
fn recurse(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        recurse(n - 1).rotate_left((n % 63) as u32) ^ n
    }
}

export!(Chaos);
