//! The next version of guest-kv, for hot-swap tests: the same cache and
//! store layout (so existing data is still served), plus an `incr` command
//! (tag `0x10`, then the key) and a migration hook that records the version
//! it replaced under the key `migrated-from`; watchers see user keys, as
//! with guest-kv.

wit_bindgen::generate!({
    world: "state-machine-with-migrate-and-watch",
    path: "../../../wit",
});

use exports::raftwasm::state_machine::{migration, watch};
use guest_kv::cache;
use guest_kv::command::{Command, Response};

/// The command tag of `incr`.
const INCR: u8 = 0x10;

struct KvNext;

guest_kv::host_store!(raftwasm::state_machine::store);

fn set(now: u64, key: &[u8], value: &[u8]) -> Result<(), String> {
    let command = Command::Set { key, value, ttl_ms: 0 }.encode();
    cache::apply(&mut HostStore, now, false, &command)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Guest for KvNext {
    fn info() -> GuestInfo {
        GuestInfo {
            name: "guest-kv".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn apply(ctx: Context, command: Vec<u8>) -> Result<Vec<u8>, String> {
        if let Some((&INCR, key)) = command.split_first() {
            let get = Command::Get { key }.encode();
            let current = match cache::query(&mut HostStore, ctx.time_ms, &get) {
                Ok(Response::Value(Some(v))) => String::from_utf8_lossy(&v).parse::<u64>().map_err(|_| "the value is not a number")?,
                Ok(_) => 0,
                Err(e) => return Err(e.to_string()),
            };
            let next = (current + 1).to_string();
            set(ctx.time_ms, key, next.as_bytes())?;
            return Ok(next.into_bytes());
        }
        cache::apply(&mut HostStore, ctx.time_ms, ctx.position == 0, &command)
            .map(|r| r.encode())
            .map_err(|e| e.to_string())
    }

    fn query(ctx: Context, request: Vec<u8>) -> Result<Vec<u8>, String> {
        cache::query(&mut HostStore, ctx.time_ms, &request)
            .map(|r| r.encode())
            .map_err(|e| e.to_string())
    }
}

impl migration::Guest for KvNext {
    fn migrate(ctx: Context, previous: GuestInfo) -> Result<(), String> {
        set(ctx.time_ms, b"migrated-from", previous.version.as_bytes())
    }
}

impl watch::Guest for KvNext {
    fn describe(changes: Vec<watch::Change>) -> Vec<watch::Change> {
        let raw = changes.into_iter().map(|c| (c.key, c.value)).collect();
        cache::describe(raw)
            .into_iter()
            .map(|(key, value)| watch::Change { key, value })
            .collect()
    }
}

export!(KvNext);
