//! Writes and reads: any guest's command bytes through the batcher, queries
//! with a named [`Consistency`], and the cache commands of the bundled
//! guest (set, get, delete, compare-and-set) in guest-kv's format.

use std::time::Duration;

use guest_kv::command::{Command, Response as KvResponse};

use super::{Node, ServiceError};
use crate::proto::Consistency;
use crate::raft::batcher::now_ms;
use crate::raft::read_barrier::ReadError;
use crate::raft::{Op, OpOutput};

/// The largest key accepted, in bytes: guest-kv's own limit, so that a raw
/// write cannot store what `set` refuses.
pub const MAX_KEY: usize = guest_kv::cache::MAX_KEY;
/// The largest value accepted, in bytes: guest-kv's own limit.
pub const MAX_VALUE: usize = guest_kv::cache::MAX_VALUE;

/// Checks a key against guest-kv's limits.
///
/// # Errors
/// [`ServiceError::BadRequest`] when empty, [`ServiceError::TooLarge`] when
/// longer than [`MAX_KEY`].
pub fn check_key(key: &[u8]) -> Result<&[u8], ServiceError> {
    if key.is_empty() {
        return Err(ServiceError::BadRequest("the key is empty".into()));
    }
    if key.len() > MAX_KEY {
        return Err(ServiceError::TooLarge(format!(
            "the key is {} bytes; the limit is {MAX_KEY}",
            key.len()
        )));
    }
    Ok(key)
}

/// Checks a value against guest-kv's limit.
///
/// # Errors
/// [`ServiceError::TooLarge`] when longer than [`MAX_VALUE`].
pub fn check_value(value: &[u8]) -> Result<&[u8], ServiceError> {
    if value.len() > MAX_VALUE {
        return Err(ServiceError::TooLarge(format!(
            "the value is {} bytes; the limit is {MAX_VALUE}",
            value.len()
        )));
    }
    Ok(value)
}

/// The answer to a read whose consistency could not be established in time.
fn read_timed_out(timeout: Duration) -> ServiceError {
    ServiceError::TimedOut(format!(
        "could not confirm this read with a quorum within {timeout:?} (--read-timeout-ms); \
         retry, or read with consistency=stale"
    ))
}

fn decode(answer: &[u8]) -> Result<KvResponse, ServiceError> {
    KvResponse::decode(answer).map_err(|e| {
        ServiceError::Refused(format!(
            "the active guest does not speak the guest-kv format ({e}); use /apply and /query"
        ))
    })
}

fn unexpected(what: &str, answer: &KvResponse) -> ServiceError {
    ServiceError::Internal(format!("unexpected answer to {what}: {answer:?}"))
}

impl Node {
    /// Proposes a guest command and returns the guest's answer bytes.
    ///
    /// # Errors
    /// [`ServiceError::Refused`] with the guest's refusal; on a follower
    /// [`ServiceError::NotLeader`]; the batcher's errors otherwise.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, ServiceError> {
        let _queued = self.write_queue.admit(command.len())?;
        let result = self.batcher.write(Op::Apply(command)).await;
        match result {
            Ok(Ok(OpOutput::Guest(answer))) => {
                self.metrics.write_succeeded();
                Ok(answer)
            }
            Ok(Ok(other)) => Err(ServiceError::Internal(format!(
                "a guest command was answered with {other:?}"
            ))),
            Ok(Err(refusal)) => Err(ServiceError::Refused(refusal)),
            Err(error) => {
                self.metrics.write_failed();
                Err(error.into())
            }
        }
    }

    /// Runs a guest query with `consistency`, off the async runtime's
    /// worker threads.
    ///
    /// # Errors
    /// [`ServiceError::NotLeader`] or [`ServiceError::TimedOut`] when the
    /// consistency cannot be established; [`ServiceError::Refused`] with the
    /// guest's refusal.
    pub async fn read(
        &self,
        consistency: Consistency,
        request: &[u8],
    ) -> Result<Vec<u8>, ServiceError> {
        match consistency {
            Consistency::Stale => {}
            Consistency::Lease if self.is_leader() && self.lease_holds() => {}
            Consistency::Linearizable | Consistency::Lease => {
                let timeout = self.config.read_timeout();
                let confirmed = tokio::time::timeout(timeout, async {
                    if self.is_leader() {
                        self.reads.confirm().await?;
                    } else {
                        self.follower_catch_up().await?;
                    }
                    Ok::<_, ServiceError>(())
                });
                confirmed.await.map_err(|_| read_timed_out(timeout))??;
            }
        }
        self.metrics.read_answered();
        let outcome = self
            .state
            .query_off_runtime(now_ms(), request)
            .await
            .map_err(|fault| ServiceError::Unavailable(fault.to_string()))?;
        outcome.result.map_err(ServiceError::Refused)
    }

    /// On the leader: confirms leadership with a quorum and returns the
    /// index a follower must apply before a linearizable read.
    ///
    /// # Errors
    /// [`ServiceError::NotLeader`] on a follower, [`ServiceError::TimedOut`]
    /// without a quorum in time.
    pub async fn read_index(&self) -> Result<u64, ServiceError> {
        let timeout = self.config.read_timeout();
        Ok(tokio::time::timeout(timeout, self.reads.confirm())
            .await
            .map_err(|_| read_timed_out(timeout))??)
    }

    /// Whether a quorum acknowledged this leader recently enough that no
    /// other leader can have been elected since: less than the smallest
    /// election timeout, less a margin for clock drift.
    fn lease_holds(&self) -> bool {
        let since = self.raft.metrics().borrow().millis_since_quorum_ack;
        since.is_some_and(|ms| ms * 10 < self.config.election_timeout_ms * 8)
    }

    /// Asks the leader for its commit point (it confirms leadership first)
    /// and waits until this node has applied it: a linearizable read on a
    /// follower.
    async fn follower_catch_up(&self) -> Result<(), ServiceError> {
        let (_, leader) = self.leader();
        let leader = leader.ok_or_else(|| {
            ServiceError::Unavailable("no leader is known yet; retry shortly".into())
        })?;
        let url = format!("{}/read_index", self.config.base_url(&leader));
        let response = self.http.get(&url).send().await.map_err(|e| {
            ServiceError::Unavailable(format!(
                "cannot reach the leader at {leader}: {e}; retry shortly"
            ))
        })?;
        if !response.status().is_success() {
            return Err(ReadError::NotLeader(Some(leader)).into());
        }
        let text = response
            .text()
            .await
            .map_err(|e| ServiceError::Unavailable(format!("reading the leader's answer: {e}")))?;
        let index: u64 = text.trim().parse().map_err(|_| {
            ServiceError::Internal(format!("the leader answered `{text}` for its read index"))
        })?;
        self.raft
            .wait(Some(self.config.write_timeout()))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map_err(|e| {
                ServiceError::Unavailable(format!(
                    "this node did not catch up with the leader: {e}; retry shortly"
                ))
            })?;
        Ok(())
    }

    /// Stores `value` under `key`, expiring after `ttl_ms` (0 for never).
    ///
    /// # Errors
    /// As [`Node::write`], and for a key or value over the limits.
    pub async fn set(&self, key: &[u8], value: &[u8], ttl_ms: u64) -> Result<(), ServiceError> {
        let command = Command::Set {
            key: check_key(key)?,
            value: check_value(value)?,
            ttl_ms,
        };
        match decode(&self.write(command.encode()).await?)? {
            KvResponse::Done => Ok(()),
            other => Err(unexpected("set", &other)),
        }
    }

    /// The value of `key`, `None` when it does not exist.
    ///
    /// # Errors
    /// As [`Node::read`].
    pub async fn get(
        &self,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<Option<Vec<u8>>, ServiceError> {
        let request = Command::Get {
            key: check_key(key)?,
        }
        .encode();
        match decode(&self.read(consistency, &request).await?)? {
            KvResponse::Value(value) => Ok(value),
            other => Err(unexpected("get", &other)),
        }
    }

    /// Deletes `key`; `false` when it did not exist.
    ///
    /// # Errors
    /// As [`Node::write`].
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ServiceError> {
        let command = Command::Delete {
            key: check_key(key)?,
        };
        match decode(&self.write(command.encode()).await?)? {
            KvResponse::Deleted(existed) => Ok(existed),
            other => Err(unexpected("delete", &other)),
        }
    }

    /// Stores `value` only if the current value is `expected` (or, without
    /// it, only if the key is absent).
    ///
    /// # Errors
    /// [`ServiceError::Conflict`] with the current value (empty when
    /// absent) when nothing changed; as [`Node::write`] otherwise.
    pub async fn compare_and_set(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: u64,
    ) -> Result<(), ServiceError> {
        let command = Command::CompareAndSet {
            key: check_key(key)?,
            expected,
            value: check_value(value)?,
            ttl_ms,
        };
        match decode(&self.write(command.encode()).await?)? {
            KvResponse::Swapped { swapped: true, .. } => Ok(()),
            KvResponse::Swapped { current, .. } => {
                Err(ServiceError::Conflict(current.unwrap_or_default()))
            }
            other => Err(unexpected("cas", &other)),
        }
    }
}
