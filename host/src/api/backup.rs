//! Operator route `GET /backup`: streams a consistent point-in-time copy of
//! the replicated state (see [`crate::backup`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, require_token};
use crate::backup;
use crate::node::App;
use crate::raft::read_barrier::ReadError;
use crate::raft::snapshot_file::SnapshotDir;

/// One dump at a time per node: each reads the whole state and holds
/// applies back while it does.
static DUMPING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bytes read from the dump per piece of the response body.
const PIECE: usize = 256 << 10;

/// `GET /backup` (needs the token when the node has one): on the leader,
/// once it has applied everything committed when the request arrived,
/// dumps the state between two apply calls (writes go on being accepted;
/// applies wait for the dump, as for a snapshot) and streams the backup
/// file. Followers answer 421 with the leader's address.
///
/// # Errors
/// 401 without the token, 421 on a follower, 503 without a leader, 500
/// when the state cannot be dumped.
pub async fn backup(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_token(&app, &headers)?;
    app.reads.confirm().await.map_err(|error| match error {
        ReadError::NotLeader(leader) => ApiError::NotLeader {
            message: "not the leader; ask the leader for a backup",
            leader,
        },
        ReadError::Unavailable(_) => ApiError::Unavailable(format!("{error}; retry shortly")),
    })?;
    let _dumping = DUMPING.lock().await;
    let dir = SnapshotDir::open(&app.config.node.join("snapshots"))
        .map_err(|e| ApiError::Internal(format!("cannot open the snapshot directory: {e}")))?;
    let part = dir.part_path("backup");
    let state = app.state.clone();
    let prepared = tokio::task::spawn_blocking(move || backup::prepare(&state, &part))
        .await
        .map_err(|e| ApiError::Internal(format!("the backup task failed: {e}")))?
        .map_err(|e| ApiError::Internal(format!("cannot dump the state for a backup: {e}")))?;
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
                tracing::warn!(%error, "reading a backup's dump failed; the response is cut short");
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
