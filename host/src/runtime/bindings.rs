//! The one place that generates the host side of the WIT world, and the host
//! implementation of the guest's imports (`store` and `log`).
//!
//! Every store import goes through [`HostState`]: reads see the committed
//! state under the pending writes; writes go only to the pending overlay,
//! which the caller commits. An undo log lets a failed call take back its
//! own writes, so a write costs one overlay insert.

use std::ops::Bound;
use std::sync::Arc;

use wasmtime::StoreContextMut;
use wasmtime::component::{HasSelf, Linker};

use super::state::{Overlay, StateRead};

wasmtime::component::bindgen!({
    world: "state-machine",
    path: "../wit",
    imports: { default: trappable },
});

/// The most entries one `scan` returns, whatever the guest asks for, so a
/// scan's cost is bounded the same way on every replica.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// The most bytes of keys and values one `scan` returns (more only when its
/// first entry alone is larger), so the host never gathers more than this
/// plus one entry for a scan.
pub const MAX_SCAN_BYTES: usize = 4 << 20;

/// Every `BYTES_PER_FUEL` bytes (or part of them) that a store call moves
/// between the guest and the host cost one unit of fuel: keys and values
/// passed in and returned. Copying is host work the guest's instructions do
/// not show, and the charge depends only on the call and the state.
pub const BYTES_PER_FUEL: u64 = 16;

/// The name of the `store` interface instance.
const STORE_INTERFACE: &str = "raftwasm:state-machine/store@0.1.0";

/// A key written by the current call and the pending entry it replaced
/// (`None`: the key had no pending entry).
pub(super) type Undo = (Vec<u8>, Option<Option<Vec<u8>>>);

/// One change to a key, as the optional `watch` interface passes it: the
/// key's new value, or `None` when it was deleted.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    wasmtime::component::ComponentType,
    wasmtime::component::Lift,
    wasmtime::component::Lower,
)]
#[component(record)]
pub struct Change {
    /// The key that changed.
    pub key: Vec<u8>,
    /// Its new value; `None` when it was deleted.
    pub value: Option<Vec<u8>>,
}

/// The data of one wasmtime `Store`: the state a guest call works on.
pub struct HostState {
    /// The committed state.
    pub(super) base: Arc<dyn StateRead>,
    /// Pending writes: earlier successful calls' and the current call's.
    pub(super) batch: Overlay,
    /// What each write of the current call replaced in `batch`, in order.
    pub(super) undo: Vec<Undo>,
    /// The keys written by successful calls since the last take, in write
    /// order and possibly repeated: what the watch feed attributes to an
    /// entry. Cleared with the batch.
    pub(super) touched: Vec<Vec<u8>>,
    /// `true` during `query`: writes trap.
    pub(super) read_only: bool,
    /// A host-side failure (storage I/O) met during the call. It makes the
    /// call a host fault, never a command result.
    pub(super) fault: Option<String>,
    /// A deterministic rule the guest broke (a write during a query).
    pub(super) violation: Option<String>,
    pub(super) limiter: super::limiter::GuestLimiter,
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

    /// Keeps the current call's writes; their keys join `touched` (a move,
    /// not a copy, so the write path pays nearly nothing for it).
    pub(super) fn keep_call(&mut self) {
        self.touched.extend(self.undo.drain(..).map(|(key, _)| key));
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
        self.fault(format!("reading the state failed: {error}"))
    }

    /// Records a failure of this node, which makes the call a host fault.
    fn fault(&mut self, message: String) -> wasmtime::Error {
        self.fault = Some(message.clone());
        wasmtime::Error::msg(message)
    }
}

impl raftwasm::state_machine::types::Host for HostState {}

impl HostState {
    /// The store's `scan`: the first entries of the merged view (pending
    /// writes over the committed state) in key order, up to `limit` entries
    /// and [`MAX_SCAN_BYTES`] of keys and values, but at least one entry when
    /// any matches. The answer depends only on the merged view, never on
    /// which writes are still pending, so it is the same on every replica.
    fn scan(
        &mut self,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: u32,
    ) -> wasmtime::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let limit = limit.min(MAX_SCAN_LIMIT) as usize;
        let mut found = Vec::new();
        if limit == 0 || end.as_deref().is_some_and(|end| end <= start.as_slice()) {
            return Ok(found);
        }
        let mut bytes = 0;
        let mut from = start;
        // Committed entries come in pages bounded like the answer; each page
        // is merged with the pending writes over the keys it covers.
        loop {
            let want = limit - found.len();
            let budget = MAX_SCAN_BYTES.saturating_sub(bytes).max(1);
            let page = self
                .base
                .scan(&from, end.as_deref(), want, budget)
                .map_err(|e| self.host_fault(e))?;
            let page_bytes: usize = page.iter().map(|(k, v)| k.len() + v.len()).sum();
            // When the page may have stopped short of the range, it covers
            // the keys up to its last one; the next page starts after it.
            let next = match page.last() {
                Some((last, _)) if page.len() == want || page_bytes >= budget => {
                    Some([last.as_slice(), &[0]].concat())
                }
                _ => None,
            };
            let covered = match (&next, page.last()) {
                (Some(_), Some((last, _))) => Bound::Included(last.clone()),
                _ => end.clone().map_or(Bound::Unbounded, Bound::Excluded),
            };
            // Pending writes win over committed entries with the same key;
            // a pending value is copied only once it is part of the answer.
            let mut committed = page.into_iter().peekable();
            let mut pending = self
                .batch
                .range((Bound::Included(from.clone()), covered))
                .peekable();
            loop {
                let pending_first = match (committed.peek(), pending.peek()) {
                    (None, None) => break,
                    (Some((c, _)), Some((p, _))) => *p <= c,
                    (None, Some(_)) => true,
                    (Some(_), None) => false,
                };
                let entry = if pending_first {
                    let Some((key, value)) = pending.next() else {
                        break;
                    };
                    if committed.peek().is_some_and(|(c, _)| c == key) {
                        committed.next();
                    }
                    match value {
                        Some(value) => Entry::Pending(key, value),
                        None => continue,
                    }
                } else {
                    let Some((key, value)) = committed.next() else {
                        break;
                    };
                    Entry::Committed(key, value)
                };
                let size = entry.size();
                if found.len() == limit || !found.is_empty() && bytes + size > MAX_SCAN_BYTES {
                    return Ok(found);
                }
                bytes += size;
                found.push(entry.into_owned());
            }
            match next {
                Some(next) => from = next,
                None => return Ok(found),
            }
        }
    }
}

/// One entry of a scan's merged view.
enum Entry<'a> {
    Committed(Vec<u8>, Vec<u8>),
    Pending(&'a Vec<u8>, &'a Vec<u8>),
}

impl Entry<'_> {
    fn size(&self) -> usize {
        match self {
            Entry::Committed(k, v) => k.len() + v.len(),
            Entry::Pending(k, v) => k.len() + v.len(),
        }
    }

    fn into_owned(self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Entry::Committed(k, v) => (k, v),
            Entry::Pending(k, v) => (k.clone(), v.clone()),
        }
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
/// The `store` functions are linked by hand rather than through the
/// generated trait, because charging fuel for the bytes they move needs the
/// whole store, not only its data.
///
/// # Errors
/// Only if the definitions clash with something already defined.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    raftwasm::state_machine::types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    raftwasm::state_machine::log::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    let mut store = linker.instance(STORE_INTERFACE)?;
    store.func_wrap(
        "get",
        |mut cx: StoreContextMut<'_, HostState>, (key,): (Vec<u8>,)| {
            charge(&mut cx, key.len())?;
            let value = cx.data_mut().read(&key)?;
            charge(&mut cx, value.as_ref().map_or(0, Vec::len))?;
            Ok((value,))
        },
    )?;
    store.func_wrap(
        "set",
        |mut cx: StoreContextMut<'_, HostState>, (key, value): (Vec<u8>, Vec<u8>)| {
            charge(&mut cx, key.len() + value.len())?;
            cx.data_mut().write(key, Some(value))
        },
    )?;
    store.func_wrap(
        "delete",
        |mut cx: StoreContextMut<'_, HostState>, (key,): (Vec<u8>,)| {
            charge(&mut cx, key.len())?;
            cx.data_mut().write(key, None)
        },
    )?;
    store.func_wrap(
        "scan",
        |mut cx: StoreContextMut<'_, HostState>,
         (start, end, limit): (Vec<u8>, Option<Vec<u8>>, u32)| {
            charge(&mut cx, start.len() + end.as_ref().map_or(0, Vec::len))?;
            let entries = cx.data_mut().scan(start, end, limit)?;
            charge(
                &mut cx,
                entries.iter().map(|(k, v)| k.len() + v.len()).sum(),
            )?;
            Ok((entries,))
        },
    )?;
    Ok(())
}

/// Takes the fuel for moving `bytes` from the call's budget; when the budget
/// is short, the call ends as if the guest had run out of fuel itself.
fn charge(cx: &mut StoreContextMut<'_, HostState>, bytes: usize) -> wasmtime::Result<()> {
    let cost = (bytes as u64).div_ceil(BYTES_PER_FUEL);
    let fuel = cx
        .get_fuel()
        .map_err(|e| cx.data_mut().fault(format!("reading fuel: {e}")))?;
    let (left, enough) = match fuel.checked_sub(cost) {
        Some(left) => (left, true),
        None => (0, false),
    };
    cx.set_fuel(left)
        .map_err(|e| cx.data_mut().fault(format!("setting fuel: {e}")))?;
    if enough {
        Ok(())
    } else {
        Err(wasmtime::Trap::OutOfFuel.into())
    }
}
