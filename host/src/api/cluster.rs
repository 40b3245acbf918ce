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

/// `POST /remove?id=N`: removes a member (voter or learner).
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
    use std::fmt::Write as _;

    use crate::metrics::label_value;
    let m = app.raft.metrics().borrow().clone();
    let is_leader = u64::from(m.current_leader == Some(app.id));
    let last_log = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map_or(0, |l| l.index);
    let purged = m.purged.map_or(0, |l| l.index);
    let guest_since = app.state.active().map_or(0, |g| g.since);
    let stats = app.state.apply_stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let counters = [
        (
            "raftwasm_applied_entries_total",
            "Log entries applied by the state machine.",
            load(&stats.entries),
        ),
        (
            "raftwasm_applied_ops_total",
            "Guest operations applied.",
            load(&stats.ops),
        ),
        (
            "raftwasm_apply_nanoseconds_total",
            "Time spent applying entries (guest calls and the sled writes).",
            load(&stats.nanos),
        ),
    ];
    let mut out = app.metrics.render(
        &counters,
        &[
            (
                "raftwasm_guest_active_since_index",
                "Log index from which the active guest runs.",
                guest_since,
            ),
            (
                "raftwasm_is_leader",
                "1 if this node is the leader.",
                is_leader,
            ),
            ("raftwasm_term", "Current Raft term.", m.current_term),
            (
                "raftwasm_last_log_index",
                "Index of the last log entry.",
                last_log,
            ),
            (
                "raftwasm_applied_index",
                "Index of the last applied entry.",
                applied,
            ),
            (
                "raftwasm_log_entries",
                "Entries in the log (not yet purged).",
                last_log.saturating_sub(purged),
            ),
        ],
    );
    app.log.disk().flushes().render(
        &mut out,
        "raftwasm_disk_flush_duration_seconds",
        "Synced writes of the node's database (one per appended batch of log entries, plus votes, truncations, purges and snapshots), and how long each took.",
    );
    stats.latency.render(
        &mut out,
        "raftwasm_apply_duration_seconds",
        "Calls of the state machine's apply (one or more committed entries through the guest, and their writes), and how long each took.",
    );
    if let Some(guest) = app.state.active() {
        let m = &guest.module;
        let _ = writeln!(
            out,
            "# HELP raftwasm_guest_info The active guest.\n# TYPE raftwasm_guest_info gauge\n\
             raftwasm_guest_info{{name=\"{}\",version=\"{}\",hash=\"{}\"}} 1",
            label_value(m.name()),
            label_value(&m.version().to_string()),
            label_value(m.hash())
        );
    }
    out
}

/// `GET /read_index`: on the leader, confirms leadership with a quorum and
/// answers the index a follower must apply before a linearizable read.
pub async fn read_index(State(app): State<Arc<Node>>) -> Result<String, ApiError> {
    Ok(app.read_index().await?.to_string())
}
