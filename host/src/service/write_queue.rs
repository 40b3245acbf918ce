//! [`WriteQueue`]: admission control for client writes, bounded in bytes.
//! The batcher's channel bounds writes by count only; 16k writes of 1 MiB
//! each would hold 16 GiB. A write holds its bytes from admission until its
//! answer, and a write that does not fit is refused at once.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ServiceError;

/// The bytes of client writes waiting for their answer, up to a limit.
#[derive(Debug, Clone)]
pub struct WriteQueue {
    bytes: Arc<Semaphore>,
    limit: u32,
}

/// A write's place in the queue; dropping it frees the bytes.
#[derive(Debug)]
pub struct Admitted {
    _bytes: OwnedSemaphorePermit,
}

impl WriteQueue {
    /// A queue of at most `limit` bytes (capped at 4 GiB).
    pub fn new(limit: usize) -> Self {
        let limit = u32::try_from(limit).unwrap_or(u32::MAX).max(1);
        Self {
            bytes: Arc::new(Semaphore::new(limit as usize)),
            limit,
        }
    }

    /// Admits a write of `len` bytes.
    ///
    /// # Errors
    /// [`ServiceError::Unavailable`] when the queued writes and this one exceed the limit.
    pub fn admit(&self, len: usize) -> Result<Admitted, ServiceError> {
        let len = u32::try_from(len.max(1)).unwrap_or(u32::MAX);
        self.bytes
            .clone()
            .try_acquire_many_owned(len)
            .map(|bytes| Admitted { _bytes: bytes })
            .map_err(|_| {
                ServiceError::Unavailable(format!(
                    "the write queue is full ({} of {} bytes taken, --max-write-queue-bytes); \
                     retry shortly",
                    self.limit as usize - self.bytes.available_permits(),
                    self.limit
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_admitted_up_to_the_byte_limit() {
        let queue = WriteQueue::new(100);
        let first = queue.admit(60).expect("fits");
        assert!(queue.admit(41).is_err());
        let second = queue.admit(40).expect("fits exactly");
        drop(first);
        assert!(queue.admit(60).is_ok());
        drop(second);
    }
}
