//! Operator route `GET /backup`: streams a consistent point-in-time copy of
//! the replicated state: a snapshot in a backup file (see [`crate::backup`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, require_token};
use crate::backup;
use crate::service::Node;

/// Bytes read from the snapshot file per piece of the response body.
const PIECE: usize = 256 << 10;

/// `GET /backup` (needs the token when the node has one): streams the
/// backup [`Node::backup`] prepares. Followers answer 421 with the
/// leader's address.
///
/// # Errors
/// 401 without the token, 421 on a follower, 503 without a leader, 504
/// when no snapshot comes, 500 when the snapshot cannot be read.
pub async fn backup(
    State(app): State<Arc<Node>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_token(&app, &headers)?;
    let prepared = app.backup().await?;
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
