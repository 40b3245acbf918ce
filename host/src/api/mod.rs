//! The HTTP API on `--http`, grouped by audience:
//! - [`kv`]: clients — `/set`, `/get`, `/delete`, `/cas`, `/apply`, `/query`;
//! - [`cluster`]: operators — `/join`, `/remove`, `/status`, `/metrics`,
//!   and `/read_index` for followers' linearizable reads;
//! - [`backup`]: operators — `GET /backup`;
//! - `watch`: clients — `GET /watch`, the change feed as Server-Sent Events.
//! - [`dashboard`]: operators in a browser — the page at `/` and the
//!   `/cluster` view it polls.
//!
//! State-changing requests from a foreign browser origin are refused before
//! routing (see `origin`).
//!
//! The handlers are thin: they parse a request, call the
//! [`Node`](crate::service::Node) and turn its answer into a response.
//! Every error is an [`ApiError`], and a [`ServiceError`] becomes one in a
//! single `From`, so status codes are decided in one place. A follower
//! relays the routes that must run on the leader (writes with
//! `--forward-writes`, guest uploads always) in one middleware, `forward`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::service::{Node, ServiceError};

pub mod backup;
pub mod cluster;
pub mod dashboard;
pub mod guest;
mod kv;
mod origin;
mod query;
mod watch;

/// The request header that asks a follower to forward a write.
pub use crate::proto::FORWARD_HEADER;
/// The response header that names the leader's HTTP address.
pub use crate::proto::LEADER_HEADER;

pub use crate::service::kv::{MAX_KEY, MAX_VALUE};
/// The largest request body accepted (a value plus its encoding).
const MAX_BODY: usize = MAX_VALUE + 64 * 1024;

/// The routes of a node.
pub fn router(app: Arc<Node>) -> Router {
    let writes = axum::middleware::from_fn_with_state((app.clone(), Forward::Writes), forward);
    let uploads = axum::middleware::from_fn_with_state((app.clone(), Forward::Always), forward);
    Router::new()
        .route(
            "/set",
            get(kv::set).post(kv::set).route_layer(writes.clone()),
        )
        .route("/get", get(kv::get).post(kv::get))
        .route(
            "/delete",
            get(kv::delete).post(kv::delete).route_layer(writes.clone()),
        )
        .route(
            "/cas",
            get(kv::compare_and_set)
                .post(kv::compare_and_set)
                .route_layer(writes.clone()),
        )
        .route("/apply", post(kv::apply).route_layer(writes.clone()))
        .route("/query", post(kv::query))
        .route("/join", post(cluster::join))
        .route("/remove", post(cluster::remove).route_layer(writes))
        .route("/status", get(cluster::status))
        .route("/metrics", get(cluster::metrics))
        .route("/read_index", get(cluster::read_index))
        .route("/backup", get(backup::backup))
        .route("/watch", get(watch::watch))
        .merge(dashboard::routes())
        .route(
            "/guest",
            post(guest::upload)
                .route_layer(uploads)
                .get(guest::show)
                .layer(axum::extract::DefaultBodyLimit::max(
                    app.runtime.limits().module_bytes + 1,
                )),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(app.clone(), edge))
        .with_state(app)
}

/// An error answer. Messages are lowercase, name what failed, and say what
/// to do.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed.
    BadRequest(String),
    /// 401: the cluster token is missing or wrong.
    Unauthorized,
    /// 403: the request is not allowed from where it came (a foreign
    /// browser origin).
    Forbidden(String),
    /// 404 with an empty body: the key does not exist.
    NotFound,
    /// 409: a precondition failed; the body is the current value.
    Conflict(Vec<u8>),
    /// 409: a joining node's address belongs to another member.
    AddressTaken(String),
    /// 413: a key, value or body is too large.
    TooLarge(String),
    /// 421: this node does not serve this request; `message` is the body and
    /// the leader's address goes into a header (and JSON, when asked for).
    NotLeader {
        message: &'static str,
        leader: Option<String>,
    },
    /// 422: the guest refused the command; the body is its message.
    Refused(String),
    /// 503: the node cannot serve now (no leader yet, shutting down).
    Unavailable(String),
    /// 504: the write was proposed but not seen committed; its outcome is
    /// unknown.
    Unknown(String),
    /// 504: something this request waits for (a joining node, a leadership
    /// confirmation) did not happen in time; nothing changed.
    TimedOut(String),
    /// 500: a fault on this node.
    Internal(String),
}

/// The body a follower answers writes with, as in the walkthrough.
pub use crate::service::WRITE_REFUSED;

/// Marks a not-leader response so [`negotiate`] can add the leader's URL
/// and answer in JSON.
#[derive(Debug, Clone)]
struct NotLeaderInfo {
    message: &'static str,
    leader: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m.into_bytes()),
            ApiError::NotFound => (StatusCode::NOT_FOUND, Vec::new()),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                b"this cluster requires its token: send `Authorization: Bearer <token>`".to_vec(),
            ),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m.into_bytes()),
            ApiError::Conflict(current) => (StatusCode::CONFLICT, current),
            ApiError::AddressTaken(m) => (StatusCode::CONFLICT, m.into_bytes()),
            ApiError::TimedOut(m) => (StatusCode::GATEWAY_TIMEOUT, m.into_bytes()),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m.into_bytes()),
            ApiError::Refused(m) => (StatusCode::UNPROCESSABLE_ENTITY, m.into_bytes()),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m.into_bytes()),
            ApiError::Unknown(m) => {
                tracing::warn!(%m, "write outcome unknown");
                (StatusCode::GATEWAY_TIMEOUT, m.into_bytes())
            }
            ApiError::Internal(m) => {
                tracing::error!(%m, "request failed on this node");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{m}; see the node's log").into_bytes(),
                )
            }
            ApiError::NotLeader { message, leader } => {
                // [`negotiate`] adds the leader's URL, with the cluster's scheme.
                let mut response = (StatusCode::MISDIRECTED_REQUEST, message).into_response();
                response
                    .extensions_mut()
                    .insert(NotLeaderInfo { message, leader });
                return response;
            }
        };
        (status, body).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::BadRequest(m) => ApiError::BadRequest(m),
            ServiceError::NotFound => ApiError::NotFound,
            ServiceError::Conflict(current) => ApiError::Conflict(current),
            ServiceError::AddressTaken(m) => ApiError::AddressTaken(m),
            ServiceError::TooLarge(m) => ApiError::TooLarge(m),
            ServiceError::NotLeader { message, leader } => ApiError::NotLeader { message, leader },
            ServiceError::Refused(m) => ApiError::Refused(m),
            ServiceError::Unavailable(m) => ApiError::Unavailable(m),
            ServiceError::Unknown(m) => ApiError::Unknown(m),
            ServiceError::TimedOut(m) => ApiError::TimedOut(m),
            ServiceError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// Checks the cluster token, when the node has one, in constant time.
///
/// # Errors
/// [`ApiError::Unauthorized`] when it is missing or wrong.
pub fn require_token(app: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.config.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::raft::peer::tokens_match(given, expected) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// What every request passes through, in one middleware (each layer costs
/// a boxed future per request, which showed on the read path): refuse a
/// foreign browser origin ([`origin`]), check the token of operator routes
/// before their body is read, and answer not-leader errors in JSON for
/// clients that ask for it.
async fn edge(
    axum::extract::State(app): axum::extract::State<Arc<Node>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Err(error) =
        origin::check_origin(&app, &request).and_then(|()| token_before_body(&app, &request))
    {
        return error.into_response();
    }
    negotiate(&app, request, next).await
}

/// Checks the token of the operator routes that read a body (`POST /guest`,
/// `/join`, `/remove`) before the body is read, so that nobody without the
/// token can make a node receive an 8 MiB upload.
fn token_before_body(app: &Node, request: &axum::extract::Request) -> Result<(), ApiError> {
    let operator = request.method() == Method::POST
        && matches!(request.uri().path(), "/guest" | "/join" | "/remove");
    if operator {
        require_token(app, request.headers())?;
    }
    Ok(())
}

/// Which requests [`forward`] relays to the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forward {
    /// Writes and member removal: only with `--forward-writes` or when the
    /// request carries [`FORWARD_HEADER`] (as the dashboard's do); otherwise
    /// a follower refuses them as in the walkthrough. The relayed request
    /// does not carry the header, so a request makes one hop at most.
    Writes,
    /// Guest uploads: always.
    Always,
}

/// Relays a request that this node answered with not-leader to the leader
/// it names, and returns the leader's answer as it is (status and body).
/// The request body is kept to be sent on; its size limit is the route's.
async fn forward(
    axum::extract::State((app, policy)): axum::extract::State<(Arc<Node>, Forward)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let asked = request
        .headers()
        .get(FORWARD_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    if policy == Forward::Writes && !app.config.forward_writes && !asked {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match <Bytes as axum::extract::FromRequest<()>>::from_request(
        axum::extract::Request::from_parts(parts.clone(), body),
        &(),
    )
    .await
    {
        Ok(body) => body,
        Err(rejection) => return rejection.into_response(),
    };
    let request = axum::extract::Request::from_parts(parts.clone(), body.clone().into());
    let response = next.run(request).await;
    let Some(NotLeaderInfo {
        leader: Some(leader),
        ..
    }) = response.extensions().get::<NotLeaderInfo>().cloned()
    else {
        return response;
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", app.config.base_url(&leader));
    let mut relayed = app.http.request(parts.method, &url).body(body);
    if let Some(auth) = parts.headers.get(header::AUTHORIZATION) {
        relayed = relayed.header(header::AUTHORIZATION, auth);
    }
    match relayed.send().await {
        Ok(answer) => {
            let status =
                StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            match answer.bytes().await {
                Ok(bytes) => (status, bytes).into_response(),
                Err(e) => ApiError::Unknown(format!(
                    "the leader's answer was lost ({e}); check before retrying"
                ))
                .into_response(),
            }
        }
        Err(e) => ApiError::Unavailable(format!("cannot forward to the leader at {leader}: {e}"))
            .into_response(),
    }
}

/// Adds the leader's URL to not-leader errors (in [`LEADER_HEADER`]), and
/// answers them in JSON for clients that ask for it with
/// `Accept: application/json`.
async fn negotiate(
    app: &Node,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let wants_json = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    let mut response = next.run(request).await;
    let Some(info) = response.extensions().get::<NotLeaderInfo>().cloned() else {
        return response;
    };
    let leader = info.leader.map(|l| app.config.base_url(&l));
    if let Some(value) = leader
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        response.headers_mut().insert(LEADER_HEADER, value);
    }
    if !wants_json {
        return response;
    }
    let body = crate::proto::NotLeader {
        error: info.message.to_owned(),
        leader,
    };
    let body = serde_json::to_string(&body).unwrap_or_default();
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}
