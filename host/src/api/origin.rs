//! Browser requests: a web page of another origin must not change a
//! cluster through a browser that can reach it (a cross-origin form or
//! `text/plain` POST needs no preflight). State-changing requests whose
//! `Origin` is present and is neither this node's own address nor allowed
//! with `--allow-origin` are refused with 403. Requests without `Origin`
//! (curl, other nodes, the client subcommands) are unaffected.

use axum::extract::Request;
use axum::http::{Method, header};

use super::ApiError;
use crate::service::Node;

/// Refuses a state-changing request from a foreign origin with 403.
///
/// # Errors
/// [`ApiError::Forbidden`] naming the origin and the flag that allows it.
pub fn check_origin(app: &Node, request: &Request) -> Result<(), ApiError> {
    if changes_state(request.method(), request.uri().path())
        && let Some(origin) = request.headers().get(header::ORIGIN)
    {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        if !allowed(app, &origin) {
            return Err(ApiError::Forbidden(format!(
                "origin {origin} is not allowed to change state on this node; send the request \
                 without an Origin header, or start the node with --allow-origin={origin}"
            )));
        }
    }
    Ok(())
}

fn changes_state(method: &Method, path: &str) -> bool {
    match *method {
        Method::GET | Method::HEAD => matches!(path, "/set" | "/delete" | "/cas"),
        _ => true,
    }
}

/// Whether `origin` is this node's own HTTP address or one allowed with
/// `--allow-origin` (compared without case and a trailing slash).
fn allowed(app: &Node, origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    let own = app.config.base_url(&app.addrs.api_addr);
    std::iter::once(own.as_str())
        .chain(app.config.allow_origin.iter().map(String::as_str))
        .any(|allowed| allowed.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_every_post_change_state() {
        assert!(changes_state(&Method::GET, "/set"));
        assert!(changes_state(&Method::GET, "/cas"));
        assert!(changes_state(&Method::POST, "/get"));
        assert!(changes_state(&Method::PUT, "/status"));
        assert!(!changes_state(&Method::GET, "/get"));
        assert!(!changes_state(&Method::GET, "/status"));
    }
}
