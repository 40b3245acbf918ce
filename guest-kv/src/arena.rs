//! A per-call arena allocator.
//!
//! Every allocation is a bump in one static arena, and the arena is reset
//! whenever the last live allocation is freed, which happens at the end of
//! every call (after the host's post-return frees the result). So each call
//! starts from the same allocator state and runs the same instructions for the
//! same input, whether the instance is fresh or has served a million calls:
//! fuel use, and so running out of fuel, depends only on the input. Calls
//! that need more than the arena fall back to growing linear memory.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// Large enough for a 1 MiB value with its copies.
const ARENA_SIZE: usize = 4 << 20;
const PAGE: usize = 64 << 10;

#[repr(C, align(16))]
struct Memory([u8; ARENA_SIZE]);

struct State {
    /// Next free offset in the arena.
    next: usize,
    /// Allocations not yet freed.
    live: usize,
    /// Overflow region beyond the arena, grown on demand: `[start, end)`.
    overflow_start: usize,
    overflow_next: usize,
    overflow_end: usize,
}

struct Arena {
    memory: UnsafeCell<Memory>,
    state: UnsafeCell<State>,
}

// SAFETY: wasm32-unknown-unknown guests are single-threaded (the host enables
// no threads), so there is never concurrent access.
unsafe impl Sync for Arena {}

#[global_allocator]
static ARENA: Arena = Arena {
    memory: UnsafeCell::new(Memory([0; ARENA_SIZE])),
    state: UnsafeCell::new(State {
        next: 0,
        live: 0,
        overflow_start: 0,
        overflow_next: 0,
        overflow_end: 0,
    }),
};

fn align_up(n: usize, align: usize) -> usize {
    (n + align - 1) & !(align - 1)
}

unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded, see `Sync` above.
        let state = unsafe { &mut *self.state.get() };
        let start = align_up(state.next, layout.align());
        if start + layout.size() <= ARENA_SIZE {
            state.next = start + layout.size();
            state.live += 1;
            return (self.memory.get() as usize + start) as *mut u8;
        }
        alloc_overflow(state, layout)
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {
        // SAFETY: single-threaded, see `Sync` above.
        let state = unsafe { &mut *self.state.get() };
        state.live -= 1;
        if state.live == 0 {
            state.next = 0;
            state.overflow_next = state.overflow_start;
        }
    }
}

/// Bumps in the region above the module's initial memory, growing it as
/// needed. Only this allocator grows memory, so the region ends at the top.
fn alloc_overflow(state: &mut State, layout: Layout) -> *mut u8 {
    use core::arch::wasm32::{memory_grow, memory_size};
    if state.overflow_end == 0 {
        let top = memory_size(0) * PAGE;
        state.overflow_start = top;
        state.overflow_next = top;
        state.overflow_end = top;
    }
    let start = align_up(state.overflow_next, layout.align());
    let Some(end) = start
        .checked_add(layout.size())
        .filter(|&end| end < usize::MAX - PAGE)
    else {
        return core::ptr::null_mut();
    };
    if end > state.overflow_end {
        let pages = (align_up(end, PAGE) - state.overflow_end) / PAGE;
        if memory_grow(0, pages) == usize::MAX {
            return core::ptr::null_mut();
        }
        state.overflow_end += pages * PAGE;
    }
    state.overflow_next = end;
    state.live += 1;
    start as *mut u8
}
