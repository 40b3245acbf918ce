//! A guest that misbehaves on request, to test that the runtime contains it.
//!
//! `apply` first writes `written` = the command, then acts on the command's
//! first byte; `query` with `w` tries to write. The commands starting with
//! `b`, `u` and `v` break the canonical ABI: they hand the host values it
//! cannot lift (a list out of bounds, a string that is not UTF-8, an option
//! with a discriminant that does not exist). `f`, `S`, `s` and `g` make the
//! host move many bytes: fill 16 values of 1 MiB, scan them once, scan them
//! over and over, and get one key.

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
            Some(b'b') => Ok(list_out_of_bounds()),
            Some(b'u') => Err(invalid_utf8()),
            Some(b'v') => bad_option_discriminant(),
            Some(b'f') => Ok(fill_huge_values()),
            Some(b'S') => Ok(scan_huge_values()),
            Some(b's') => scan_forever(),
            Some(b'g') => Ok(get_length(&command[1..])),
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

/// How many values `f` stores, and the size of each.
const HUGE_VALUES: u8 = 16;
const HUGE_VALUE_BYTES: usize = 1 << 20;

/// Stores `huge/00` .. `huge/15`, 1 MiB each.
fn fill_huge_values() -> Vec<u8> {
    let value = vec![b'x'; HUGE_VALUE_BYTES];
    for i in 0..HUGE_VALUES {
        store::set(format!("huge/{i:02}").as_bytes(), &value);
    }
    b"filled".to_vec()
}

/// One scan over the huge values: how many entries came back (u32) and how
/// many bytes of keys and values (u64), little-endian.
fn scan_huge_values() -> Vec<u8> {
    let entries = store::scan(b"huge/", Some(b"huge0"), 10_000);
    let bytes: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut answer = (entries.len() as u32).to_le_bytes().to_vec();
    answer.extend_from_slice(&(bytes as u64).to_le_bytes());
    answer
}

/// Scans the huge values again and again, never returning.
fn scan_forever() -> ! {
    loop {
        core::hint::black_box(store::scan(b"huge/", Some(b"huge0"), 10_000));
    }
}

/// The length of the value under `key` (u64, little-endian; 0 if absent).
fn get_length(key: &[u8]) -> Vec<u8> {
    let len = store::get(key).map_or(0, |v| v.len());
    (len as u64).to_le_bytes().to_vec()
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

/// A list whose pointer and length lie past the end of any wasm memory. The
/// bindings hand pointer and length to the host as they are.
fn list_out_of_bounds() -> Vec<u8> {
    const LEN: usize = 0x10_0000;
    // SAFETY: not sound, on purpose: the vector is never read or freed here;
    // the host refuses to lift it and throws the instance away.
    unsafe { Vec::from_raw_parts(0xfff0_0000usize as *mut u8, LEN, LEN) }
}

/// A string that is not UTF-8.
fn invalid_utf8() -> String {
    // SAFETY: not sound, on purpose: the host must refuse to lift it.
    unsafe { String::from_utf8_unchecked(vec![b'n', 0xff, 0xfe, 0xfd]) }
}

#[link(wasm_import_module = "raftwasm:state-machine/store@0.1.0")]
#[allow(clashing_extern_declarations)]
unsafe extern "C" {
    /// The raw `store.scan` import, as the canonical ABI flattens it:
    /// `start` (pointer, length), `end` (discriminant, pointer, length),
    /// `limit`, and where to write the result.
    #[link_name = "scan"]
    fn raw_scan(
        start: *mut u8,
        start_len: usize,
        end_is_some: i32,
        end: *mut u8,
        end_len: usize,
        limit: i32,
        result: *mut u8,
    );
}

/// Calls `store.scan` with an `option` discriminant of 7 (only 0 and 1 exist).
fn bad_option_discriminant() -> Result<Vec<u8>, String> {
    let mut start = *b"a";
    let mut result = [0u32; 2];
    // SAFETY: every pointer is valid for the call; only the discriminant is
    // wrong, which the host must refuse.
    unsafe {
        raw_scan(
            start.as_mut_ptr(),
            start.len(),
            7,
            core::ptr::null_mut(),
            0,
            10,
            result.as_mut_ptr().cast(),
        );
    }
    Ok(b"the host accepted a bad discriminant".to_vec())
}

export!(Chaos);
