//! Operator routes: membership (`/join`, `/remove`), `/status`, `/metrics`,
//! and `/read_index`, which followers use for linearizable reads.

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;

use super::query::Params;
use super::{ApiError, require_token};
use crate::proto::Status;
use crate::service::Node;

/// What a joining node sends: its id and addresses.
pub use crate::proto::JoinRequest;

/// `POST /join` with a [`JoinRequest`]: see [`Node::join`].
///
/// # Errors
/// 409 when the addresses belong to another member, 400 when the id is a
/// member with other addresses, 504 when the node does not catch up.
pub async fn join(
    State(app): State<Arc<Node>>,
    headers: HeaderMap,
    Json(request): Json<JoinRequest>,
) -> Result<&'static str, ApiError> {
    require_token(&app, &headers)?;
    app.join(&request).await?;
    Ok("ok")
}

/// `POST /remove?id=N`: removes a member (voter or learner). A follower
/// refuses it, or forwards it to the leader when asked for (see
/// [`super::FORWARD_HEADER`]).
pub async fn remove(
    State(app): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<&'static str, ApiError> {
    require_token(&app, &headers)?;
    let params = Params::parse(query.as_deref())?;
    let id = params
        .number("id")?
        .ok_or_else(|| ApiError::BadRequest("missing parameter `id`".into()))?;
    app.remove(id).await?;
    Ok("ok")
}

/// `GET /status`: this node's view of the cluster, as JSON.
///
/// `state_hash` (a SHA-256 over every key and value, equal on replicas with
/// equal state) reads the whole state, so it is computed only when asked for
/// with `?state_hash=true`; otherwise it is null.
pub async fn status(
    State(app): State<Arc<Node>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Status>, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let with_hash = matches!(params.text("state_hash")?, Some("true" | "1"));
    Ok(Json(app.status(with_hash).await))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<Arc<Node>>) -> String {
    app.metrics.render(&app.scrape())
}

/// `GET /read_index`: on the leader, confirms leadership with a quorum and
/// answers the index a follower must apply before a linearizable read.
pub async fn read_index(State(app): State<Arc<Node>>) -> Result<String, ApiError> {
    Ok(app.read_index().await?.to_string())
}
