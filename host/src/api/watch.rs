//! `GET /watch?prefix=P[&from=INDEX]`: streams the changes applied on this
//! node under a key prefix as Server-Sent Events (format: [`crate::watch::sse`]).
//!
//! `from` (or `Last-Event-ID: N`, meaning from N+1) replays the node's
//! window first; older than the window is 410 with the oldest index kept.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::ApiError;
use super::query::Params;
use crate::service::Node;
use crate::watch::{Next, SubscribeError, Subscription, sse};

/// How long a stream may stay silent before a keep-alive comment.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// `GET /watch`: the change stream, 410 for a `from` older than the window,
/// 503 when the node serves its maximum of watchers.
pub async fn watch(
    State(app): State<Arc<Node>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref())?;
    let prefix = params.get("prefix").unwrap_or_default().to_vec();
    let from = match (params.number("from")?, last_event_id(&headers)?) {
        (Some(from), _) => Some(from),
        (None, Some(last)) => Some(last.saturating_add(1)),
        (None, None) => None,
    };
    let subscription = match app.watch.subscribe(from) {
        Ok(subscription) => subscription,
        Err(error @ SubscribeError::Gone { oldest }) => {
            let body = serde_json::json!({ "error": error.to_string(), "oldest": oldest });
            return Ok((StatusCode::GONE, axum::Json(body)).into_response());
        }
        Err(error @ SubscribeError::TooMany { .. }) => {
            return Err(ApiError::Unavailable(error.to_string()));
        }
    };
    let start = sse::start(subscription.next_index());
    let stream = futures::stream::unfold(
        Some((subscription, prefix, Some(start))),
        |state| async move {
            let (mut subscription, prefix, first) = state?;
            if let Some(first) = first {
                return Some((Ok(first), Some((subscription, prefix, None))));
            }
            let (chunk, more) = next_chunk(&mut subscription, &prefix).await;
            Some((
                Ok::<_, Infallible>(chunk),
                more.then_some((subscription, prefix, None)),
            ))
        },
    );
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The next chunk of the stream and whether more follow: an entry's events
/// under `prefix`, a keep-alive after a silence, or the final `dropped`.
async fn next_chunk(subscription: &mut Subscription, prefix: &[u8]) -> (Bytes, bool) {
    loop {
        match tokio::time::timeout(KEEP_ALIVE_EVERY, subscription.next()).await {
            Err(_) => return (Bytes::from_static(sse::KEEP_ALIVE), true),
            Ok(Next::Dropped(reason)) => return (sse::dropped(&reason), false),
            Ok(Next::Entry(entry)) => {
                let under = entry.changes.iter().filter(|c| c.key.starts_with(prefix));
                if let Some(chunk) = sse::entry(entry.index, under) {
                    return (chunk, true);
                }
            }
        }
    }
}

/// The `Last-Event-ID` header an EventSource sends when it reconnects.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    text.parse().map(Some).map_err(|_| {
        ApiError::BadRequest(format!(
            "Last-Event-ID `{text}` is not a log index; send the id of the last event received"
        ))
    })
}
