//! Operator routes for guests: `POST /guest` deploys a module across the
//! cluster, `GET /guest` shows the active guest and the history of swaps.
//!
//! A deploy is validated on the leader before anything is replicated, then
//! goes through the log in two entries: `StageGuest` (every replica stores
//! the module and compiles it in the background) and `ActivateGuest` (every
//! replica switches at that entry's index, running the migration hook).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;

use super::query::Params;
use super::{ApiError, require_token};
use crate::proto::{GuestHistory, SwapRecord};
use crate::service::Node;

/// `POST /guest[?force=true]` with the `.wasm` file as body: the swap record
/// (index, name, version, hash) once every replica runs it from that index.
/// A follower passes an upload on to the leader (see [`super::forward`]).
pub async fn upload(
    State(app): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Json<SwapRecord>, ApiError> {
    require_token(&app, &headers)?;
    let params = Params::parse(query.as_deref())?;
    let force = matches!(params.text("force")?, Some("true" | "1" | ""));
    Ok(Json(app.deploy(body.to_vec(), force).await?))
}

/// `GET /guest`: the active guest and every swap so far.
pub async fn show(State(app): State<Arc<Node>>) -> Result<Json<GuestHistory>, ApiError> {
    Ok(Json(app.guest_history()?))
}
