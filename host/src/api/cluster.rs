//! Operator routes: membership (`/join`, `/remove`), `/status`, `/metrics`,
//! and `/read_index`, which followers use for linearizable reads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Json;
use axum::extract::{RawQuery, State};
use openraft::ChangeMembers;

use axum::http::HeaderMap;
use axum::response::Response;

use super::query::Params;
use super::{ApiError, Relay, require_token};
use crate::node::App;
use crate::proto::{Member, Role, Status};
use crate::raft::{NodeId, NodeInfo, typ};

/// What a joining node sends: its id and addresses.
pub use crate::proto::JoinRequest;

fn not_leader(app: &App) -> ApiError {
    ApiError::NotLeader {
        message: "not the leader; send membership changes to the leader",
        leader: app.leader().1,
    }
}

fn membership_error(app: &App, error: typ::RaftError<typ::ClientWriteError>) -> ApiError {
    match error {
        openraft::error::RaftError::APIError(typ::ClientWriteError::ForwardToLeader(_)) => {
            not_leader(app)
        }
        openraft::error::RaftError::APIError(typ::ClientWriteError::ChangeMembershipError(e)) => {
            ApiError::Unavailable(format!("membership change refused: {e}; retry shortly"))
        }
        openraft::error::RaftError::Fatal(e) => ApiError::Unavailable(format!("raft stopped: {e}")),
    }
}

/// `POST /join` with a [`JoinRequest`]: adds the node as a learner, waits
/// (at most `--join-timeout-ms`) for it to catch up, then makes it a voter.
/// A node that does not catch up in time is removed again, so an address
/// where nothing listens never counts towards the quorum. Idempotent for a
/// member that restarts with the same id and addresses.
///
/// # Errors
/// 409 when the addresses belong to another member, 400 when the id is a
/// member with other addresses, 504 when the node does not catch up.
pub async fn join(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Json(request): Json<JoinRequest>,
) -> Result<&'static str, ApiError> {
    require_token(&app, &headers)?;
    if !app.is_leader() {
        return Err(not_leader(&app));
    }
    if crate::node::finishing_restore(&app) {
        return Err(ApiError::Unavailable(
            "this node was restored from a backup and is still taking its first snapshot; \
             retry shortly"
                .into(),
        ));
    }
    let node = NodeInfo {
        api_addr: request.http.clone(),
        raft_addr: request.raft.clone(),
    };
    let metrics = app.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    if let Some((other, known)) = membership.nodes().find(|(id, known)| {
        **id != request.id && (known.api_addr == node.api_addr || known.raft_addr == node.raft_addr)
    }) {
        return Err(ApiError::AddressTaken(format!(
            "http={} raft={} already belongs to member {other} (http={} raft={}); \
             join with that member's id, or remove it first",
            node.api_addr, node.raft_addr, known.api_addr, known.raft_addr
        )));
    }
    let target = match membership.get_node(&request.id) {
        Some(known) if *known != node => {
            return Err(ApiError::BadRequest(format!(
                "node {} is already a member with addresses http={} raft={}; remove it first to change them",
                request.id, known.api_addr, known.raft_addr
            )));
        }
        Some(_) if membership.voter_ids().any(|id| id == request.id) => return Ok("ok"),
        // A learner from an earlier join: it must reach the current log.
        Some(_) => metrics.last_log_index.unwrap_or(0),
        None => {
            tracing::info!(id = request.id, http = %request.http, raft = %request.raft, "adding a learner");
            app.raft
                .add_learner(request.id, node.clone(), false)
                .await
                .map_err(|e| membership_error(&app, e))?
                .log_id
                .index
        }
    };
    let timeout = app.config.join_timeout();
    let caught_up = app
        .raft
        .wait(Some(timeout))
        .metrics(
            |m| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&request.id).copied().flatten())
                    .is_some_and(|matched| matched.index >= target)
            },
            "the joining node to catch up",
        )
        .await;
    if caught_up.is_err() {
        tracing::warn!(id = request.id, raft = %request.raft, ?timeout, "joining node did not catch up; removing it");
        let removed = app
            .raft
            .change_membership(
                ChangeMembers::RemoveNodes(BTreeSet::from([request.id])),
                false,
            )
            .await;
        if let Err(error) = removed {
            tracing::warn!(id = request.id, %error, "removing the learner that did not catch up");
        }
        return Err(ApiError::TimedOut(format!(
            "node {} did not catch up within {timeout:?} and was not added; check that it runs \
             and that this leader can reach its --raft address {}, then retry",
            request.id, request.raft
        )));
    }
    app.raft
        .change_membership(
            ChangeMembers::AddVoterIds(BTreeSet::from([request.id])),
            false,
        )
        .await
        .map_err(|e| membership_error(&app, e))?;
    tracing::info!(id = request.id, "node is a voter");
    Ok("ok")
}

/// `POST /remove?id=N`: removes a member (voter or learner). A follower
/// refuses it, or forwards it to the leader when asked for (see
/// [`Relay::answer`]).
pub async fn remove(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    relay: Relay,
) -> Response {
    let result = remove_member(&app, &headers, query.as_deref()).await;
    relay.answer(&app, false, result).await
}

async fn remove_member(
    app: &App,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<&'static str, ApiError> {
    require_token(app, headers)?;
    let params = Params::parse(query)?;
    let id = params
        .number("id")?
        .ok_or_else(|| ApiError::BadRequest("missing parameter `id`".into()))?;
    if !app.is_leader() {
        return Err(not_leader(app));
    }
    let membership = app.raft.metrics().borrow().membership_config.clone();
    if membership.membership().get_node(&id).is_none() {
        return Err(ApiError::NotFound);
    }
    let ids = BTreeSet::from([id]);
    if membership.membership().voter_ids().any(|v| v == id) {
        app.raft
            .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
            .await
            .map_err(|e| membership_error(app, e))?;
    }
    app.raft
        .change_membership(ChangeMembers::RemoveNodes(ids), false)
        .await
        .map_err(|e| membership_error(app, e))?;
    tracing::info!(id, "node removed");
    Ok("ok")
}

/// `GET /status`: this node's view of the cluster, as JSON.
///
/// `state_hash` (a SHA-256 over every key and value, equal on replicas with
/// equal state) reads the whole state, so it is computed only when asked for
/// with `?state_hash=true`; otherwise it is null.
pub async fn status(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Status>, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let with_hash = matches!(params.text("state_hash")?, Some("true" | "1"));
    // Hashing reads the whole state: on the blocking pool, not an async
    // worker thread that heartbeats may be waiting for.
    let state_hash = if with_hash {
        let state = app.state.clone();
        tokio::task::spawn_blocking(move || state.state_hash().ok())
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    let metrics = app.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members: Vec<Member> = membership
        .nodes()
        .map(|(id, node)| Member {
            id: *id,
            http: node.api_addr.clone(),
            raft: node.raft_addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    let (leader, leader_addr) = app.leader();
    let guest = app.state.active().map(|g| g.describe());
    let replication: Option<BTreeMap<NodeId, Option<u64>>> =
        metrics.replication.as_ref().map(|r| {
            r.iter()
                .map(|(id, log)| (*id, log.map(|l| l.index)))
                .collect()
        });
    Ok(Json(Status {
        id: app.id,
        role: match metrics.state {
            openraft::ServerState::Leader => Role::Leader,
            openraft::ServerState::Follower => Role::Follower,
            openraft::ServerState::Candidate => Role::Candidate,
            openraft::ServerState::Learner => Role::Learner,
            openraft::ServerState::Shutdown => Role::Shutdown,
        },
        term: metrics.current_term,
        leader,
        leader_http: leader_addr,
        last_log_index: metrics.last_log_index,
        committed: app.committed(),
        applied: metrics.last_applied.map(|l| l.index),
        snapshot: metrics.snapshot.map(|l| l.index),
        purged: metrics.purged.map(|l| l.index),
        members,
        membership_changing: membership.get_joint_config().len() > 1,
        replication,
        guest,
        state_hash,
        counters: Some(super::dashboard::counters(&app)),
    }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<Arc<App>>) -> String {
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
pub async fn read_index(State(app): State<Arc<App>>) -> Result<String, ApiError> {
    let timeout = app.config.read_timeout();
    let confirmed = tokio::time::timeout(timeout, app.reads.confirm())
        .await
        .map_err(|_| super::kv::read_timed_out(timeout))??;
    Ok(confirmed.to_string())
}
