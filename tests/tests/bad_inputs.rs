//! Malformed and oversized requests are refused with the right status and a
//! message saying what is wrong, before anything reaches the log; the
//! largest allowed value goes through whole.

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

/// The largest value the API accepts, in bytes.
const MAX_VALUE: usize = 1 << 20;
/// The largest key the API accepts, in bytes.
const MAX_KEY: usize = 1024;

/// Node 0's state hash and last log index.
async fn state(cluster: &TestCluster) -> anyhow::Result<(String, u64)> {
    let status = cluster.status(0).await?;
    let hash = status["state_hash"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no state hash in {status}"))?;
    let last = status["last_log_index"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no last log index in {status}"))?;
    Ok((hash.to_owned(), last))
}

#[tokio::test]
async fn bad_requests_are_refused_without_touching_state() -> TestResult {
    let cluster = TestCluster::start(1, &[]).await?;
    assert_eq!(
        cluster.get(0, "/set?key=present&value=v").await?,
        (200, "ok".into())
    );
    let before = state(&cluster).await?;

    let long_key = "k".repeat(MAX_KEY + 1);
    let refused_gets = [
        ("/set?value=v", 400),
        ("/set?key=&value=v", 400),
        ("/set?key=k", 400),
        (&format!("/set?key={long_key}&value=v") as &str, 413),
        ("/set?key=%G1&value=v", 400),
        ("/set?key=k&value=%2", 400),
        ("/set?key=k&value=v&ttl=soon", 400),
        ("/set?key=k&value=v&ttl=1&ttl_ms=1000", 400),
        ("/get", 400),
        ("/get?key=", 400),
        (&format!("/get?key={long_key}"), 413),
        ("/get?key=%zz", 400),
        ("/get?key=present&consistency=strong", 400),
        ("/delete", 400),
        ("/delete?key=", 400),
        ("/delete?key=a%", 400),
        ("/cas?value=v&expected=w", 400),
        ("/cas?key=present&expected=v", 400),
        (&format!("/cas?key={long_key}&value=v"), 413),
    ];
    for (path, expected) in refused_gets {
        let (code, body) = cluster.get(0, path).await?;
        let shown = &path[..path.len().min(60)];
        assert_eq!(code, expected, "{shown} answered {body:?}");
        assert!(!body.is_empty(), "{shown} answered {code} with no message");
    }

    // Values in the body: one byte over the limit, and far over it.
    for len in [MAX_VALUE + 1, 2 * MAX_VALUE] {
        let response = cluster.post(0, "/set?key=big", vec![b'x'; len]).await?;
        let code = response.status().as_u16();
        let body = response.text().await?;
        assert_eq!(code, 413, "a {len}-byte value answered {body:?}");
        assert!(!body.is_empty(), "a {len}-byte value got no message");
    }

    // A missing key is a 404 with an empty body, and changes nothing either.
    assert_eq!(
        cluster.get(0, "/get?key=missing").await?,
        (404, String::new())
    );

    assert_eq!(
        state(&cluster).await?,
        before,
        "a refused request changed the state or reached the log"
    );

    // A value of exactly the limit is stored and reads back whole.
    let value: Vec<u8> = (0..MAX_VALUE).map(|i| b'a' + (i % 26) as u8).collect();
    let response = cluster.post(0, "/set?key=big", value.clone()).await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.text().await?, "ok");
    let (code, body) = cluster.get(0, "/get?key=big").await?;
    assert_eq!(code, 200);
    assert_eq!(body.len(), MAX_VALUE);
    assert!(body.as_bytes() == value, "the value read back differs");

    // So is a key of exactly the limit.
    let longest_key = "k".repeat(MAX_KEY);
    assert_eq!(
        cluster
            .get(0, &format!("/set?key={longest_key}&value=v"))
            .await?,
        (200, "ok".into())
    );
    assert_eq!(
        cluster.get(0, &format!("/get?key={longest_key}")).await?,
        (200, "v".into())
    );
    let after = state(&cluster).await?;
    assert_ne!(after.0, before.0, "the state hash did not see the write");
    Ok(())
}
