//! Operator routes for a browser: the dashboard page at `/` (its HTML, CSS
//! and JS are compiled into the binary from `host/src/dashboard/`) and
//! `GET /cluster`, every member's `/status` gathered by the node that served
//! the page, since the page talks to that node only.
//!
//! The page sends writes with [`FORWARD_HEADER`](crate::proto::FORWARD_HEADER)
//! so that a follower passes them on to the leader, and admin actions with
//! the token the user types in.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::proto::ClusterView;
use crate::service::Node;

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

/// `GET /cluster`: see [`Node::cluster_view`].
pub async fn cluster(State(app): State<Arc<Node>>) -> Json<ClusterView> {
    Json(app.cluster_view().await)
}
