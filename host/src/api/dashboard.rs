//! Operator routes for a browser: the dashboard page at `/` (its HTML, CSS
//! and JS are compiled into the binary from `host/src/dashboard/`) and
//! `GET /cluster`, every member's `/status` gathered by the node that served
//! the page, since the page talks to that node only.
//!
//! The page sends writes with [`FORWARD_HEADER`](crate::proto::FORWARD_HEADER)
//! so that a follower passes them on to the leader, and admin actions with
//! the token the user types in.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::client::{Client, ClientError};
use crate::proto::{ClusterView, MemberView};
use crate::service::Node;

/// How long `/cluster` waits for each member's `/status`: short, so that
/// one dead member does not hold up the page's view of the others.
pub const MEMBER_TIMEOUT: Duration = Duration::from_millis(800);

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const STYLE_CSS: &str = include_str!("../dashboard/style.css");

/// The page may load only its own script and style and talk only to the
/// node that served it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

/// The dashboard's routes, merged into the node's router.
pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/cluster", get(cluster))
}

/// One embedded file, with headers that keep it from being framed, sniffed
/// or served stale after an upgrade.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// `GET /cluster`: the `/status` of every member of this node's membership,
/// asked concurrently with [`MEMBER_TIMEOUT`] each; a member that does not
/// answer is listed with the reason.
pub async fn cluster(State(app): State<Arc<Node>>) -> Json<ClusterView> {
    let members: Vec<(u64, String, bool)> = {
        let metrics = app.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| (*id, node.api_addr.clone(), voters.contains(id)))
            .collect()
    };
    let client = Client::with_http(
        app.http.clone(),
        app.config.tls_on(),
        &[],
        None,
        MEMBER_TIMEOUT,
    );
    let asks = members.into_iter().map(|(id, http, voter)| {
        let client = &client;
        async move {
            let (status, error) =
                match tokio::time::timeout(MEMBER_TIMEOUT, client.node_status(&http)).await {
                    Ok(Ok(status)) => (Some(status), None),
                    Ok(Err(error)) => (None, Some(reason(error))),
                    Err(_) => (None, Some(format!("no answer within {MEMBER_TIMEOUT:?}"))),
                };
            MemberView {
                id,
                http,
                voter,
                status,
                error,
            }
        }
    });
    Json(ClusterView {
        node: app.id,
        members: futures::future::join_all(asks).await,
    })
}

/// What to show for a member that did not answer: the failure itself,
/// without the client's advice about `--cluster`, which does not apply here.
fn reason(error: ClientError) -> String {
    match error {
        ClientError::Unreachable { last, .. } => format!("unreachable: {last}"),
        other => other.to_string(),
    }
}
