//! Client routes: the cache commands of the bundled guest (`/set`, `/get`,
//! `/delete`, `/cas`) and the generic `/apply` and `/query` that carry any
//! guest's own command bytes.
//!
//! Writes go to the batcher on the leader; a follower refuses them with the
//! walkthrough's `write method not allowed` (or forwards them with
//! `--forward-writes`). Reads take `consistency=linearizable` (default),
//! `lease` or `stale`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use guest_kv::command::{Command, Response as KvResponse};

use super::query::Params;
use super::{ApiError, MAX_KEY, MAX_VALUE, Relay};
use crate::node::App;
use crate::raft::Op;
use crate::raft::batcher::now_ms;
use crate::raft::read_barrier::ReadError;

/// How a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consistency {
    /// The leader confirms its leadership with a quorum first; a follower asks
    /// the leader for the commit point and waits until it has applied it.
    Linearizable,
    /// The leader answers locally while its lease (a recent quorum
    /// acknowledgement) holds; otherwise as linearizable.
    Lease,
    /// Any node answers from its own state, possibly behind.
    Stale,
}

impl Consistency {
    fn from_params(params: &Params) -> Result<Self, ApiError> {
        match params.text("consistency")? {
            None | Some("linearizable") => Ok(Self::Linearizable),
            Some("lease") => Ok(Self::Lease),
            Some("stale") => Ok(Self::Stale),
            Some(other) => Err(ApiError::BadRequest(format!(
                "unknown consistency `{other}`; use linearizable, lease or stale"
            ))),
        }
    }
}

fn key(params: &Params) -> Result<&[u8], ApiError> {
    let key = params
        .get("key")
        .ok_or_else(|| ApiError::BadRequest("missing parameter `key`".into()))?;
    if key.is_empty() {
        return Err(ApiError::BadRequest("the key is empty".into()));
    }
    if key.len() > MAX_KEY {
        return Err(ApiError::TooLarge(format!(
            "the key is {} bytes; the limit is {MAX_KEY}",
            key.len()
        )));
    }
    Ok(key)
}

/// The value from `name`, or from the POST body when the parameter is absent.
fn value<'a>(
    params: &'a Params,
    name: &str,
    body: &'a Bytes,
) -> Result<Option<&'a [u8]>, ApiError> {
    let value = params.get(name).or((!body.is_empty()).then_some(&body[..]));
    if let Some(value) = value
        && value.len() > MAX_VALUE
    {
        return Err(ApiError::TooLarge(format!(
            "the value is {} bytes; the limit is {MAX_VALUE}",
            value.len()
        )));
    }
    Ok(value)
}

/// The TTL in milliseconds from `ttl` (seconds) or `ttl_ms`; 0 for none.
fn ttl_ms(params: &Params) -> Result<u64, ApiError> {
    match (params.number("ttl")?, params.number("ttl_ms")?) {
        (Some(_), Some(_)) => Err(ApiError::BadRequest(
            "give `ttl` (seconds) or `ttl_ms`, not both".into(),
        )),
        (Some(seconds), None) => Ok(seconds.saturating_mul(1000)),
        (None, Some(ms)) => Ok(ms),
        (None, None) => Ok(0),
    }
}

/// Proposes a guest command and returns the guest's answer bytes. A
/// follower refuses, or forwards with `--forward-writes`.
async fn write(app: &App, command: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    let _queued = app.write_queue.admit(command.len())?;
    let result = app.batcher.write(Op::Apply(command)).await;
    match result {
        Ok(Ok(answer)) => {
            app.metrics
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(answer)
        }
        Ok(Err(refusal)) => Err(ApiError::Refused(refusal)),
        Err(error) => {
            app.metrics
                .write_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(error.into())
        }
    }
}

/// Runs a guest query with the requested consistency.
async fn read(app: &App, consistency: Consistency, request: &[u8]) -> Result<Vec<u8>, ApiError> {
    match consistency {
        Consistency::Stale => {}
        Consistency::Lease if app.is_leader() && lease_holds(app) => {}
        Consistency::Linearizable | Consistency::Lease => {
            let timeout = app.config.read_timeout();
            let confirmed = tokio::time::timeout(timeout, async {
                if app.is_leader() {
                    app.reads.confirm().await?;
                } else {
                    follower_catch_up(app).await?;
                }
                Ok::<_, ApiError>(())
            });
            confirmed.await.map_err(|_| read_timed_out(timeout))??;
        }
    }
    app.metrics
        .reads
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outcome = app
        .state
        .query_off_runtime(now_ms(), request)
        .await
        .map_err(|fault| ApiError::Unavailable(fault.to_string()))?;
    outcome.result.map_err(ApiError::Refused)
}

/// The answer to a read whose consistency could not be established in time.
pub(super) fn read_timed_out(timeout: std::time::Duration) -> ApiError {
    ApiError::TimedOut(format!(
        "could not confirm this read with a quorum within {timeout:?} (--read-timeout-ms); \
         retry, or read with consistency=stale"
    ))
}

/// Whether a quorum acknowledged this leader recently enough that no other
/// leader can have been elected since: less than the smallest election
/// timeout, less a margin for clock drift.
fn lease_holds(app: &App) -> bool {
    let since = app.raft.metrics().borrow().millis_since_quorum_ack;
    since.is_some_and(|ms| ms * 10 < app.config.election_timeout_ms * 8)
}

/// Asks the leader for its commit point (it confirms leadership first) and
/// waits until this node has applied it: a linearizable read on a follower.
async fn follower_catch_up(app: &App) -> Result<(), ApiError> {
    let (_, leader) = app.leader();
    let leader = leader
        .ok_or_else(|| ApiError::Unavailable("no leader is known yet; retry shortly".into()))?;
    let url = format!("{}/read_index", app.config.base_url(&leader));
    let response = app.http.get(&url).send().await.map_err(|e| {
        ApiError::Unavailable(format!(
            "cannot reach the leader at {leader}: {e}; retry shortly"
        ))
    })?;
    if !response.status().is_success() {
        return Err(ReadError::NotLeader(Some(leader)).into());
    }
    let text = response
        .text()
        .await
        .map_err(|e| ApiError::Unavailable(format!("reading the leader's answer: {e}")))?;
    let index: u64 = text.trim().parse().map_err(|_| {
        ApiError::Internal(format!("the leader answered `{text}` for its read index"))
    })?;
    app.raft
        .wait(Some(app.config.write_timeout()))
        .applied_index_at_least(Some(index), "linearizable read")
        .await
        .map_err(|e| {
            ApiError::Unavailable(format!(
                "this node did not catch up with the leader: {e}; retry shortly"
            ))
        })?;
    Ok(())
}

fn decode(answer: &[u8]) -> Result<KvResponse, ApiError> {
    KvResponse::decode(answer).map_err(|e| {
        ApiError::Refused(format!(
            "the active guest does not speak the guest-kv format ({e}); use /apply and /query"
        ))
    })
}

/// `/set?key=K&value=V[&ttl=SECONDS|&ttl_ms=MS]` (or the value as POST body).
pub async fn set(State(app): State<Arc<App>>, RawQuery(query): RawQuery, relay: Relay) -> Response {
    let body = &relay.body;
    let run = async {
        let params = Params::parse(query.as_deref())?;
        let key = key(&params)?;
        let value = value(&params, "value", body)?
            .ok_or_else(|| ApiError::BadRequest("missing parameter `value`".into()))?;
        let command = Command::Set {
            key,
            value,
            ttl_ms: ttl_ms(&params)?,
        };
        match decode(&write(&app, command.encode()).await?)? {
            KvResponse::Done => Ok("ok"),
            other => Err(ApiError::Internal(format!(
                "unexpected answer to set: {other:?}"
            ))),
        }
    };
    let result = run.await;
    relay.answer(&app, false, result).await
}

/// `/get?key=K[&consistency=…]`: the value, or 404 with an empty body.
pub async fn get(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Vec<u8>, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let consistency = Consistency::from_params(&params)?;
    let request = Command::Get { key: key(&params)? }.encode();
    match decode(&read(&app, consistency, &request).await?)? {
        KvResponse::Value(Some(value)) => Ok(value),
        KvResponse::Value(None) => Err(ApiError::NotFound),
        other => Err(ApiError::Internal(format!(
            "unexpected answer to get: {other:?}"
        ))),
    }
}

/// `/delete?key=K`: `ok` if the key existed, 404 if it did not.
pub async fn delete(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    relay: Relay,
) -> Response {
    let run = async {
        let params = Params::parse(query.as_deref())?;
        let command = Command::Delete { key: key(&params)? };
        match decode(&write(&app, command.encode()).await?)? {
            KvResponse::Deleted(true) => Ok("ok"),
            KvResponse::Deleted(false) => Err(ApiError::NotFound),
            other => Err(ApiError::Internal(format!(
                "unexpected answer to delete: {other:?}"
            ))),
        }
    };
    let result = run.await;
    relay.answer(&app, false, result).await
}

/// `/cas?key=K&value=NEW[&expected=OLD][&ttl=…]`: stores NEW only if the
/// current value is OLD (or, without `expected`, only if the key is absent).
/// `ok` when swapped; 409 with the current value when not.
pub async fn compare_and_set(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    relay: Relay,
) -> Response {
    let body = &relay.body;
    let run = async {
        let params = Params::parse(query.as_deref())?;
        let value = value(&params, "value", body)?
            .ok_or_else(|| ApiError::BadRequest("missing parameter `value`".into()))?;
        let command = Command::CompareAndSet {
            key: key(&params)?,
            expected: params.get("expected"),
            value,
            ttl_ms: ttl_ms(&params)?,
        };
        match decode(&write(&app, command.encode()).await?)? {
            KvResponse::Swapped { swapped: true, .. } => Ok("ok"),
            KvResponse::Swapped { current, .. } => {
                Err(ApiError::Conflict(current.unwrap_or_default()))
            }
            other => Err(ApiError::Internal(format!(
                "unexpected answer to cas: {other:?}"
            ))),
        }
    };
    let result = run.await;
    relay.answer(&app, false, result).await
}

/// `POST /apply` with the guest's command bytes as body: the guest's answer
/// bytes, or 422 with its refusal.
pub async fn apply(State(app): State<Arc<App>>, relay: Relay) -> Response {
    let result = write(&app, relay.body.to_vec()).await;
    relay.answer(&app, false, result).await
}

/// `POST /query[?consistency=…]` with the guest's request bytes as body.
pub async fn query(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Vec<u8>, ApiError> {
    let params = Params::parse(query.as_deref())?;
    read(&app, Consistency::from_params(&params)?, &body).await
}
