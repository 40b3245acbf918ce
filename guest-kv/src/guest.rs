//! The WIT bindings: plugs [`crate::cache`] into the `raftwasm:state-machine`
//! world (with the watch hook), with the host's `store` import as the [`Store`].

use crate::cache::{self, Store};
use exports::raftwasm::state_machine::watch::{self, Change};
use raftwasm::state_machine::store;

wit_bindgen::generate!({
    world: "state-machine-with-watch",
    path: "../wit",
});

struct KvGuest;

/// The host's store, seen through the [`Store`] trait.
struct HostStore;

impl Store for HostStore {
    fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        store::get(key)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        store::set(key, value);
    }

    fn delete(&mut self, key: &[u8]) {
        store::delete(key);
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
        store::scan(start, Some(end), limit)
    }
}

impl Guest for KvGuest {
    fn info() -> GuestInfo {
        GuestInfo {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    fn apply(ctx: Context, command: Vec<u8>) -> Result<Vec<u8>, String> {
        cache::apply(&mut HostStore, ctx.time_ms, ctx.position == 0, &command)
            .map(|response| response.encode())
            .map_err(|refusal| refusal.to_string())
    }

    fn query(ctx: Context, request: Vec<u8>) -> Result<Vec<u8>, String> {
        cache::query(&mut HostStore, ctx.time_ms, &request)
            .map(|response| response.encode())
            .map_err(|refusal| refusal.to_string())
    }
}

impl watch::Guest for KvGuest {
    fn describe(changes: Vec<Change>) -> Vec<Change> {
        let raw = changes.into_iter().map(|c| (c.key, c.value)).collect();
        cache::describe(raw)
            .into_iter()
            .map(|(key, value)| Change { key, value })
            .collect()
    }
}

export!(KvGuest);
