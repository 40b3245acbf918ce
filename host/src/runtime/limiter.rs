//! The guest's resource limiter: wasmtime's `StoreLimits` decide the limits;
//! a growth that fails for a reason of this node (the OS could not map the
//! pages) becomes a host fault instead of the -1 the guest would otherwise
//! see, because another replica's growth may succeed.

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// The limiter of every guest store.
#[derive(Debug)]
pub(super) struct GuestLimiter {
    limits: StoreLimits,
}

impl GuestLimiter {
    /// Limits a guest to `memory_bytes` of linear memory and a few
    /// instances, memories and tables (a component needs several of each).
    pub(super) fn new(memory_bytes: usize) -> Self {
        Self {
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .instances(16)
                .memories(16)
                .tables(64)
                .build(),
        }
    }
}

/// Whether a failed growth says something about this node rather than the
/// module: the guest must not see it, or replicas could diverge.
fn failed_on_this_node(error: &wasmtime::Error) -> bool {
    error.is::<std::io::Error>() || error.is::<wasmtime::OutOfMemory>()
}

/// Passes a growth failure on as a trap when it is this node's, so that
/// `is_host_failure` stops the node; any other failure (past a maximum the
/// module or the limits set) stays the -1 every replica answers.
fn classify(error: wasmtime::Error, what: &str) -> wasmtime::Result<()> {
    if failed_on_this_node(&error) {
        Err(error.context(format!("growing the guest's {what} failed on this node")))
    } else {
        Ok(())
    }
}

impl ResourceLimiter for GuestLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.memory_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        classify(error, "memory")
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        classify(error, "table")
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An OS failure to grow traps (so the node stops); a growth past a
    /// maximum answers -1 as before, the same on every replica.
    #[test]
    fn only_failures_of_this_node_trap() {
        let mut limiter = GuestLimiter::new(1 << 20);
        let os = wasmtime::Error::new(std::io::Error::from(std::io::ErrorKind::OutOfMemory));
        let trapped = limiter.memory_grow_failed(os);
        assert!(
            trapped.as_ref().is_err_and(failed_on_this_node),
            "{trapped:?}"
        );
        let table = wasmtime::Error::new(std::io::Error::other("mmap failed"));
        assert!(limiter.table_grow_failed(table).is_err());
        let past_maximum = wasmtime::Error::msg("memory size exceeds its maximum");
        assert!(limiter.memory_grow_failed(past_maximum).is_ok());
    }

    /// The limits themselves are `StoreLimits`'.
    #[test]
    fn growth_within_and_past_the_limit() -> wasmtime::Result<()> {
        let mut limiter = GuestLimiter::new(1 << 20);
        assert!(limiter.memory_growing(0, 1 << 20, None)?);
        assert!(!limiter.memory_growing(0, (1 << 20) + 1, None)?);
        Ok(())
    }
}
