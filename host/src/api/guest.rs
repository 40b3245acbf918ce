//! Operator routes for guests: `POST /guest` deploys a module across the
//! cluster, `GET /guest` shows the active guest and the history of swaps.
//!
//! A deploy is validated on the leader before anything is replicated, then
//! goes through the log in two entries: `StageGuest` (every replica stores
//! the module and compiles it in the background) and `ActivateGuest` (every
//! replica switches at that entry's index, running the migration hook).

use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::query::Params;
use super::{ApiError, Relay, require_token};
use crate::node::App;
use crate::raft::Op;
use crate::raft::state_machine::SwapRecord;

/// Validates `module`, then stages and activates it through the log.
///
/// # Errors
/// 400 for a module that is not a usable guest or whose name holds a
/// control character, 503 when this node cannot
/// load it now (see [`crate::runtime::LoadError::is_module_property`]), 409
/// when the version guard refuses it, 422 when activation fails on the
/// cluster (a failed migration), and the write errors of the batcher.
pub async fn deploy(app: &App, module: Vec<u8>, force: bool) -> Result<SwapRecord, ApiError> {
    let limit = app.runtime.limits().module_bytes;
    if module.len() > limit {
        return Err(ApiError::TooLarge(format!(
            "the module is {} bytes; the limit is {limit}",
            module.len()
        )));
    }
    let runtime = app.runtime.clone();
    let bytes = module.clone();
    let loaded = tokio::task::spawn_blocking(move || runtime.load(&bytes))
        .await
        .map_err(|e| ApiError::Internal(format!("validating the module: {e}")))?
        .map_err(|e| {
            if e.is_module_property() {
                ApiError::BadRequest(e.to_string())
            } else {
                ApiError::Unavailable(e.to_string())
            }
        })?;
    // Checked here, before anything is replicated, and not when a replica
    // loads a module: a guest already in some log keeps loading as before.
    if let Some(c) = loaded.name().chars().find(|c| c.is_control()) {
        return Err(ApiError::BadRequest(format!(
            "the guest's name {:?} contains the control character {c:?}; a name may hold any text but control characters (newlines, tabs, escapes)",
            loaded.name()
        )));
    }
    if !force
        && let Some(active) = app.state.active()
        && let Err(refusal) = loaded.may_replace(&active.module)
    {
        return Err(ApiError::Conflict(
            format!("{refusal} (force=true)").into_bytes(),
        ));
    }

    let staged = app.batcher.write(Op::StageGuest { module }).await?;
    let hash = String::from_utf8(staged.map_err(ApiError::Refused)?)
        .map_err(|_| ApiError::Internal("the stage answer is not a hash".into()))?;
    let activated = app.batcher.write(Op::ActivateGuest { hash, force }).await?;
    let record = activated.map_err(ApiError::Refused)?;
    serde_json::from_slice(&record)
        .map_err(|e| ApiError::Internal(format!("the activation answer: {e}")))
}

/// `POST /guest[?force=true]` with the `.wasm` file as body: the swap record
/// (index, name, version, hash) once every replica runs it from that index.
pub async fn upload(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    relay: Relay,
) -> Response {
    let run = async {
        require_token(&app, &headers)?;
        let params = Params::parse(query.as_deref())?;
        let force = matches!(params.text("force")?, Some("true" | "1" | ""));
        if !app.is_leader() {
            return Err(ApiError::NotLeader {
                message: "not the leader; guests are deployed through the leader",
                leader: app.leader().1,
            });
        }
        deploy(&app, relay.body.to_vec(), force).await.map(Json)
    };
    let result = run.await;
    // A follower always passes an upload on to the leader.
    relay.answer(&app, true, result).await
}

/// `GET /guest`: the active guest and every swap so far.
pub async fn show(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    let active = app.state.active().map(|g| g.describe());
    let history = app
        .state
        .guest_history()
        .map_err(|e| ApiError::Internal(format!("reading the guest history: {e}")))?;
    Ok(Json(
        serde_json::json!({ "active": active, "history": history }),
    ))
}
