//! The WIT bindings: plugs [`crate::cache`] into the `raftwasm:state-machine`
//! world (with the watch hook), with the host's `store` import as the cache's
//! `Store`.

use crate::cache;
use exports::raftwasm::state_machine::watch::{self, Change};

wit_bindgen::generate!({
    world: "state-machine-with-watch",
    path: "../wit",
});

struct KvGuest;

crate::host_store!(raftwasm::state_machine::store);

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
