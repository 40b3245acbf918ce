//! A web page cannot change a cluster behind its operator's back: requests
//! that change state and carry an `Origin` other than the node's own are
//! refused with 403, unless the origin is allowed with `--allow-origin`.
//! Requests without an `Origin` (curl, other nodes) are unaffected.

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use reqwest::Method;

const EVIL: &str = "http://evil.example";

/// Sends `method path` to node 0 with `origin` (if any) and an empty body.
async fn send(
    cluster: &TestCluster,
    method: Method,
    path: &str,
    origin: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let client = reqwest::Client::new();
    let url = format!("http://{}{path}", cluster.nodes[0].http);
    let mut request = client
        .request(method, url)
        .header(reqwest::header::CONNECTION, "close")
        .header(reqwest::header::CONTENT_TYPE, "text/plain");
    if let Some(origin) = origin {
        request = request.header(reqwest::header::ORIGIN, origin);
    }
    let response = request.send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

#[tokio::test]
async fn cross_origin_requests_that_change_state_are_refused() -> TestResult {
    let cluster = TestCluster::start(1, &[]).await?;
    let changes = [
        (Method::GET, "/set?key=k&value=v"),
        (Method::GET, "/delete?key=k"),
        (Method::GET, "/cas?key=k&value=v"),
        (Method::POST, "/set?key=k&value=v"),
        (Method::POST, "/delete?key=k"),
        (Method::POST, "/cas?key=k&value=v"),
        (Method::POST, "/apply"),
        (Method::POST, "/query"),
        (Method::POST, "/join"),
        (Method::POST, "/remove?id=1"),
        (Method::POST, "/guest"),
    ];
    for (method, path) in changes {
        let (code, body) = send(&cluster, method.clone(), path, Some(EVIL)).await?;
        assert_eq!(code, 403, "{method} {path} from {EVIL} answered {body:?}");
        assert!(
            body.contains("origin http://evil.example is not allowed")
                && body.contains("--allow-origin"),
            "{method} {path}: {body:?}"
        );
    }
    // Nothing was written, and reads from any origin still work.
    assert_eq!(
        send(&cluster, Method::GET, "/get?key=k", Some(EVIL))
            .await?
            .0,
        404
    );
    assert_eq!(
        send(&cluster, Method::GET, "/status", Some(EVIL)).await?.0,
        200
    );

    // The node's own origin and requests without one may write.
    let own = format!("http://{}", cluster.nodes[0].http);
    let set = "/set?key=k&value=v";
    assert_eq!(
        send(&cluster, Method::POST, set, Some(&own)).await?,
        (200, "ok".into())
    );
    assert_eq!(
        send(&cluster, Method::GET, set, None).await?,
        (200, "ok".into())
    );
    Ok(())
}

#[tokio::test]
async fn an_allowed_origin_may_change_state() -> TestResult {
    let args = [
        "--allow-origin=http://app.example",
        "--allow-origin=https://ops.example",
    ];
    let cluster = TestCluster::start(1, &args).await?;
    for origin in ["http://app.example", "https://ops.example"] {
        let (code, body) = send(&cluster, Method::POST, "/set?key=k&value=v", Some(origin)).await?;
        assert_eq!((code, body.as_str()), (200, "ok"), "from {origin}");
    }
    let (code, _) = send(&cluster, Method::POST, "/set?key=k&value=v", Some(EVIL)).await?;
    assert_eq!(code, 403);
    Ok(())
}
