//! The HTTP API on `--http`, grouped by audience:
//! - [`kv`]: clients — `/set`, `/get`, `/delete`, `/cas`, `/apply`, `/query`;
//! - [`cluster`]: operators — `/join`, `/remove`, `/status`, `/metrics`,
//!   and `/read_index` for followers' linearizable reads;
//! - [`backup`]: operators — `GET /backup`;
//! - [`dashboard`]: operators in a browser — the page at `/` and the
//!   `/cluster` view it polls.
//!
//! State-changing requests from a foreign browser origin are refused before
//! routing (see `origin`).
//!
//! Every error is an [`ApiError`], so status codes are decided in one place.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::node::App;
use crate::raft::batcher::WriteError;
use crate::raft::read_barrier::ReadError;

pub mod backup;
pub mod cluster;
pub mod dashboard;
pub mod guest;
mod kv;
mod origin;
mod query;
pub mod write_queue;

/// The request header that asks a follower to forward a write.
pub use crate::proto::FORWARD_HEADER;
/// The response header that names the leader's HTTP address.
pub use crate::proto::LEADER_HEADER;

/// The largest key accepted, in bytes: guest-kv's own limit, so that `/apply`
/// cannot store what `/set` refuses.
pub const MAX_KEY: usize = guest_kv::cache::MAX_KEY;
/// The largest value accepted, in bytes: guest-kv's own limit.
pub const MAX_VALUE: usize = guest_kv::cache::MAX_VALUE;
/// The largest request body accepted (a value plus its encoding).
const MAX_BODY: usize = MAX_VALUE + 64 * 1024;

/// The routes of a node.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/set", get(kv::set).post(kv::set))
        .route("/get", get(kv::get).post(kv::get))
        .route("/delete", get(kv::delete).post(kv::delete))
        .route("/cas", get(kv::compare_and_set).post(kv::compare_and_set))
        .route("/apply", post(kv::apply))
        .route("/query", post(kv::query))
        .route("/join", post(cluster::join))
        .route("/remove", post(cluster::remove))
        .route("/status", get(cluster::status))
        .route("/metrics", get(cluster::metrics))
        .route("/read_index", get(cluster::read_index))
        .route("/backup", get(backup::backup))
        .merge(dashboard::routes())
        .route(
            "/guest",
            get(guest::show)
                .post(guest::upload)
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
pub const WRITE_REFUSED: &str = "write method not allowed";

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

impl From<WriteError> for ApiError {
    fn from(error: WriteError) -> Self {
        match error {
            WriteError::NotLeader(leader) => ApiError::NotLeader {
                message: WRITE_REFUSED,
                leader,
            },
            WriteError::Unknown(_) => ApiError::Unknown(error.to_string()),
            WriteError::Unavailable(_) => ApiError::Unavailable(format!("{error}; retry shortly")),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::NotLeader(leader) => ApiError::NotLeader {
                message: "not the leader; retry on the leader or use consistency=stale",
                leader,
            },
            ReadError::Unavailable(_) => ApiError::Unavailable(format!("{error}; retry shortly")),
        }
    }
}

/// Checks the cluster token, when the node has one, in constant time.
///
/// # Errors
/// [`ApiError::Unauthorized`] when it is missing or wrong.
pub fn require_token(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &app.config.token else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::raft::peer_server::tokens_match(given, expected) {
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
    axum::extract::State(app): axum::extract::State<Arc<App>>,
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
fn token_before_body(app: &App, request: &axum::extract::Request) -> Result<(), ApiError> {
    let operator = request.method() == Method::POST
        && matches!(request.uri().path(), "/guest" | "/join" | "/remove");
    if operator {
        require_token(app, request.headers())?;
    }
    Ok(())
}

/// A request that may have to be relayed to the leader: what a follower
/// needs to send it on (method, path and query, authorization, body).
#[derive(Debug)]
pub struct Relay {
    method: Method,
    uri: Uri,
    authorization: Option<HeaderValue>,
    /// Whether the client asked for forwarding with [`FORWARD_HEADER`].
    forward: bool,
    /// The request body.
    pub body: Bytes,
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Relay {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let body = <Bytes as axum::extract::FromRequest<S>>::from_request(
            axum::extract::Request::from_parts(parts.clone(), body),
            state,
        )
        .await
        .map_err(IntoResponse::into_response)?;
        Ok(Self {
            forward: parts
                .headers
                .get(FORWARD_HEADER)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")),
            method: parts.method,
            uri: parts.uri,
            authorization: parts.headers.get(header::AUTHORIZATION).cloned(),
            body,
        })
    }
}

impl Relay {
    /// Answers `result`; a not-leader error is instead relayed to the leader
    /// when `always`, with `--forward-writes` or when the request carries
    /// [`FORWARD_HEADER`], and the leader's answer returned as it is.
    pub async fn answer(
        self,
        app: &App,
        always: bool,
        result: Result<impl IntoResponse, ApiError>,
    ) -> Response {
        let error = match result {
            Ok(ok) => return ok.into_response(),
            Err(error) => error,
        };
        let ApiError::NotLeader {
            leader: Some(leader),
            ..
        } = &error
        else {
            return error.into_response();
        };
        if !always && !self.forward && !app.config.forward_writes {
            return error.into_response();
        }
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = format!("{}{path}", app.config.base_url(leader));
        // The relayed request does not carry FORWARD_HEADER: one hop at most.
        let mut request = app.http.request(self.method, &url).body(self.body);
        if let Some(auth) = self.authorization {
            request = request.header(header::AUTHORIZATION, auth);
        }
        match request.send().await {
            Ok(answer) => {
                let status = StatusCode::from_u16(answer.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                match answer.bytes().await {
                    Ok(bytes) => (status, bytes).into_response(),
                    Err(e) => ApiError::Unknown(format!(
                        "the leader's answer was lost ({e}); check before retrying"
                    ))
                    .into_response(),
                }
            }
            Err(e) => {
                ApiError::Unavailable(format!("cannot forward to the leader at {leader}: {e}"))
                    .into_response()
            }
        }
    }
}

/// Adds the leader's URL to not-leader errors (in [`LEADER_HEADER`]), and
/// answers them in JSON for clients that ask for it with
/// `Accept: application/json`.
async fn negotiate(
    app: &App,
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
