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

use super::ApiError;
use super::query::Params;
use crate::proto::Consistency;
use crate::service::Node;
use crate::service::kv::{check_key, check_value};

fn consistency(params: &Params) -> Result<Consistency, ApiError> {
    match params.text("consistency")? {
        None => Ok(Consistency::Linearizable),
        Some(text) => Consistency::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "unknown consistency `{text}`; use linearizable, lease or stale"
            ))
        }),
    }
}

fn key(params: &Params) -> Result<&[u8], ApiError> {
    let key = params
        .get("key")
        .ok_or_else(|| ApiError::BadRequest("missing parameter `key`".into()))?;
    Ok(check_key(key)?)
}

/// The value from `name`, or from the POST body when the parameter is absent.
fn value<'a>(params: &'a Params, name: &str, body: &'a Bytes) -> Result<&'a [u8], ApiError> {
    let value = params
        .get(name)
        .or((!body.is_empty()).then_some(&body[..]))
        .map(check_value)
        .transpose()?;
    value.ok_or_else(|| ApiError::BadRequest(format!("missing parameter `{name}`")))
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

/// `/set?key=K&value=V[&ttl=SECONDS|&ttl_ms=MS]` (or the value as POST body).
pub async fn set(
    State(app): State<Arc<Node>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<&'static str, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let key = key(&params)?;
    let value = value(&params, "value", &body)?;
    app.set(key, value, ttl_ms(&params)?).await?;
    Ok("ok")
}

/// `/get?key=K[&consistency=…]`: the value, or 404 with an empty body.
pub async fn get(
    State(app): State<Arc<Node>>,
    RawQuery(query): RawQuery,
) -> Result<Vec<u8>, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let consistency = consistency(&params)?;
    app.get(key(&params)?, consistency)
        .await?
        .ok_or(ApiError::NotFound)
}

/// `/delete?key=K`: `ok` if the key existed, 404 if it did not.
pub async fn delete(
    State(app): State<Arc<Node>>,
    RawQuery(query): RawQuery,
) -> Result<&'static str, ApiError> {
    let params = Params::parse(query.as_deref())?;
    match app.delete(key(&params)?).await? {
        true => Ok("ok"),
        false => Err(ApiError::NotFound),
    }
}

/// `/cas?key=K&value=NEW[&expected=OLD][&ttl=…]`: stores NEW only if the
/// current value is OLD (or, without `expected`, only if the key is absent).
/// `ok` when swapped; 409 with the current value when not.
pub async fn compare_and_set(
    State(app): State<Arc<Node>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<&'static str, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let value = value(&params, "value", &body)?;
    let key = key(&params)?;
    let ttl_ms = ttl_ms(&params)?;
    app.compare_and_set(key, params.get("expected"), value, ttl_ms)
        .await?;
    Ok("ok")
}

/// `POST /apply` with the guest's command bytes as body: the guest's answer
/// bytes, or 422 with its refusal.
pub async fn apply(State(app): State<Arc<Node>>, body: Bytes) -> Result<Vec<u8>, ApiError> {
    Ok(app.write(body.to_vec()).await?)
}

/// `POST /query[?consistency=…]` with the guest's request bytes as body.
pub async fn query(
    State(app): State<Arc<Node>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Vec<u8>, ApiError> {
    let params = Params::parse(query.as_deref())?;
    Ok(app.read(consistency(&params)?, &body).await?)
}
