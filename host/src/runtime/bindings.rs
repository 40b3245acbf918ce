//! The one place that generates the host side of the WIT world, and the host
//! implementation of the guest's imports (`store` and `log`).
//!
//! Every store import goes through [`HostState`]: reads see the committed
//! state under the pending writes; writes go only to the pending overlay,
//! which the caller commits. An undo log lets a failed call take back its
//! own writes, so a write costs one overlay insert.

use std::sync::Arc;

use super::state::{Overlay, StateRead};

wasmtime::component::bindgen!({
    world: "state-machine",
    path: "../wit",
    imports: { default: trappable },
});

/// The most entries one `scan` returns, whatever the guest asks for, so a
/// scan's cost is bounded the same way on every replica.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// A key written by the current call and the pending entry it replaced
/// (`None`: the key had no pending entry).
pub(super) type Undo = (Vec<u8>, Option<Option<Vec<u8>>>);

/// The data of one wasmtime `Store`: the state a guest call works on.
pub struct HostState {
    /// The committed state.
    pub(super) base: Arc<dyn StateRead>,
    /// Pending writes: earlier successful calls' and the current call's.
    pub(super) batch: Overlay,
    /// What each write of the current call replaced in `batch`, in order.
    pub(super) undo: Vec<Undo>,
    /// `true` during `query`: writes trap.
    pub(super) read_only: bool,
    /// A host-side failure (storage I/O) met during the call. It makes the
    /// call a host fault, never a command result.
    pub(super) fault: Option<String>,
    /// A deterministic rule the guest broke (a write during a query).
    pub(super) violation: Option<String>,
    pub(super) limits: wasmtime::StoreLimits,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("batch_writes", &self.batch.len())
            .field("call_writes", &self.undo.len())
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl HostState {
    fn read(&mut self, key: &[u8]) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(pending) = self.batch.get(key) {
            return Ok(pending.clone());
        }
        self.base.get(key).map_err(|e| self.host_fault(e))
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> wasmtime::Result<()> {
        if self.read_only {
            let message = "a query tried to write to the store; queries are read-only";
            self.violation = Some(message.to_owned());
            return Err(wasmtime::Error::msg(message));
        }
        let previous = self.batch.insert(key.clone(), value);
        self.undo.push((key, previous));
        Ok(())
    }

    /// Keeps the current call's writes.
    pub(super) fn keep_call(&mut self) {
        self.undo.clear();
    }

    /// Takes back the current call's writes, newest first.
    pub(super) fn undo_call(&mut self) {
        for (key, previous) in self.undo.drain(..).rev() {
            match previous {
                Some(value) => self.batch.insert(key, value),
                None => self.batch.remove(&key),
            };
        }
    }

    fn host_fault(&mut self, error: std::io::Error) -> wasmtime::Error {
        let message = format!("reading the state failed: {error}");
        self.fault = Some(message.clone());
        wasmtime::Error::msg(message)
    }
}

impl raftwasm::state_machine::types::Host for HostState {}

impl raftwasm::state_machine::store::Host for HostState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        self.read(&key)
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<()> {
        self.write(key, Some(value))
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<()> {
        self.write(key, None)
    }

    fn scan(
        &mut self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: u32,
    ) -> wasmtime::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let limit = limit.min(MAX_SCAN_LIMIT) as usize;
        if limit == 0 || end.as_deref().is_some_and(|end| end <= start.as_slice()) {
            return Ok(Vec::new());
        }
        let range = (
            std::ops::Bound::Included(start.clone()),
            end.clone()
                .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
        );
        let pending: Overlay = self
            .batch
            .range(range)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Each pending delete hides at most one committed entry, so this many
        // committed entries always cover the first `limit` visible ones.
        let tombstones = pending.values().filter(|v| v.is_none()).count();
        let base = self
            .base
            .scan(&start, end.as_deref(), limit + tombstones)
            .map_err(|e| self.host_fault(e))?;

        let mut merged = base
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect::<std::collections::BTreeMap<_, _>>();
        merged.extend(pending);
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .take(limit)
            .collect())
    }
}

impl raftwasm::state_machine::log::Host for HostState {
    fn write(&mut self, message: String) -> wasmtime::Result<()> {
        tracing::debug!(target: "raftwasm::guest", "{message}");
        Ok(())
    }
}

/// Adds the world's imports, implemented by [`HostState`], to `linker`.
///
/// # Errors
/// Only if the generated bindings clash with something already defined.
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    StateMachine::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(linker, |s| s)
}
