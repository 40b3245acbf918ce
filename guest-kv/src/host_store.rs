//! [`host_store!`](crate::host_store): the adapter from the host's `store`
//! import to the [`Store`](crate::cache::Store) trait, written once for every
//! guest built on the cache (guest-kv itself and its successors).

/// Defines `struct HostStore`, a [`Store`](crate::cache::Store) over the
/// host's `store` import, given the path of the import's bindings in the
/// calling guest (each guest runs `wit_bindgen::generate!` for its own world,
/// so the bindings live in the guest's crate).
///
/// ```ignore
/// wit_bindgen::generate!({ world: "state-machine", path: "../wit" });
/// guest_kv::host_store!(raftwasm::state_machine::store);
/// guest_kv::cache::apply(&mut HostStore, time_ms, true, &command);
/// ```
#[macro_export]
macro_rules! host_store {
    ($($store:ident)::+) => {
        /// The host's store, seen through the cache's `Store` trait.
        struct HostStore;

        impl $crate::cache::Store for HostStore {
            fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
                $($store)::+::get(key)
            }

            fn set(&mut self, key: &[u8], value: &[u8]) {
                $($store)::+::set(key, value);
            }

            fn delete(&mut self, key: &[u8]) {
                $($store)::+::delete(key);
            }

            fn scan(&mut self, start: &[u8], end: &[u8], limit: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
                $($store)::+::scan(start, Some(end), limit)
            }
        }
    };
}
