//! Operator route `GET /backup`: streams a consistent point-in-time copy of
//! the replicated state: a snapshot in a backup file (see [`crate::backup`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, require_token};
use crate::backup;
use crate::node::App;
use crate::raft::read_barrier::ReadError;

/// One backup prepared at a time per node: each reads a whole snapshot.
static PREPARING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes read from the snapshot file per piece of the response body.
const PIECE: usize = 256 << 10;

/// How long a backup waits for the snapshot it needs.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Asks openraft for a snapshot until the current one covers log index
/// `index`. A request made while another build runs is ignored, so it is
/// made again whenever the metrics change, and at least every second.
async fn snapshot_covering(app: &App, index: u64) -> Result<(), ApiError> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let mut metrics = app.raft.metrics();
    loop {
        let snapshot = metrics.borrow_and_update().snapshot;
        if snapshot.is_some_and(|s| s.index >= index) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::TimedOut(format!(
                "no snapshot covering log index {index} within {SNAPSHOT_TIMEOUT:?}; \
                 see the node's log and retry"
            )));
        }
        app.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ApiError::Unavailable(format!("raft stopped: {e}")))?;
        let _ = tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await;
    }
}

/// `GET /backup` (needs the token when the node has one): on the leader,
/// once it has applied everything committed when the request arrived (as
/// for a linearizable read), has openraft take a snapshot that covers it
/// and streams that snapshot file wrapped in a backup header. Writes go on
/// meanwhile; applies wait only while the snapshot is written, as for any
/// snapshot. Followers answer 421 with the leader's address.
///
/// # Errors
/// 401 without the token, 421 on a follower, 503 without a leader, 504
/// when no snapshot comes, 500 when the snapshot cannot be read.
pub async fn backup(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_token(&app, &headers)?;
    let index = app.reads.confirm().await.map_err(|error| match error {
        ReadError::NotLeader(leader) => ApiError::NotLeader {
            message: "not the leader; ask the leader for a backup",
            leader,
        },
        ReadError::Unavailable(_) => ApiError::Unavailable(format!("{error}; retry shortly")),
    })?;
    let _preparing = PREPARING.lock().await;
    snapshot_covering(&app, index).await?;
    let state = app.state.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let (meta, file) = state
            .current_snapshot()
            .map_err(|e| format!("cannot open the current snapshot: {e}"))?
            .ok_or("the snapshot is gone")?;
        backup::prepare(&meta, file).map_err(|e| format!("the current snapshot {e}"))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the backup task failed: {e}")))?
    .map_err(|e| ApiError::Internal(format!("cannot prepare a backup: {e}")))?;
    if prepared.header.index() < index {
        return Err(ApiError::Internal(format!(
            "the current snapshot covers log index {}, not {index}",
            prepared.header.index()
        )));
    }
    tracing::info!(
        index = prepared.header.index(),
        bytes = prepared.len(),
        "serving a backup"
    );
    let len = prepared.len();
    let index = prepared.header.index();
    let state_hash = prepared.header.state_hash.clone();
    let prefix = bytes::Bytes::from(prepared.prefix);
    let file = tokio::fs::File::from_std(prepared.state);
    let rest = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt as _;
        let mut piece = vec![0; PIECE];
        match file.read(&mut piece).await {
            Ok(0) => None,
            Ok(n) => {
                piece.truncate(n);
                Some((Ok(bytes::Bytes::from(piece)), file))
            }
            Err(error) => {
                tracing::warn!(%error, "reading a backup's snapshot failed; the response is cut short");
                Some((Err(error), file))
            }
        }
    });
    let body = futures::StreamExt::chain(
        futures::stream::once(async move { Ok::<_, std::io::Error>(prefix) }),
        rest,
    );
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(backup::INDEX_HEADER, HeaderValue::from(index));
    if let Ok(value) = HeaderValue::from_str(&state_hash) {
        headers.insert(backup::STATE_HASH_HEADER, value);
    }
    Ok(response)
}
