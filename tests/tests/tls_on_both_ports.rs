//! With `--tls-cert`, `--tls-key` and `--tls-ca`, both ports speak TLS only:
//! a cluster bootstraps, joins, replicates, forwards and reads over HTTPS
//! and mutual TLS between peers; clear-text clients and clients that do not
//! trust the cluster's CA get nothing; stalled handshakes are dropped and
//! count against the connection cap.

use std::time::Duration;

use anyhow::Context as _;
use raftwasm_tests::certs::TestCa;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use raftwasm_tests::{KV_NEXT_GUEST, closed_within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_tls_cluster_joins_replicates_and_forwards_over_https() -> TestResult {
    // Two nodes join the first over HTTPS; Raft runs over mutual TLS.
    let cluster = TestCluster::new().with_tls()?.start_nodes(3, &[]).await?;
    let leader = cluster.leader().await?;
    let follower = (0..3).find(|&i| i != leader).context("a follower")?;

    assert_eq!(
        cluster.get(leader, "/set?key=k&value=v1").await?,
        (200, "ok".into())
    );
    // The follower asks the leader for its read index over HTTPS.
    assert_eq!(
        cluster
            .get(follower, "/get?key=k&consistency=linearizable")
            .await?,
        (200, "v1".into())
    );
    cluster.wait_for_value("k", "v1").await?;

    // A refused write names the leader with the cluster's scheme.
    let response = cluster
        .client()
        .get(cluster.url(follower, "/set?key=k&value=v2"))
        .header("accept", "application/json")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 421);
    let expected = cluster.url(leader, "");
    assert!(expected.starts_with("https://"), "{expected}");
    assert_eq!(
        response.headers()[raftwasm::proto::LEADER_HEADER],
        expected.as_str()
    );
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["leader"], expected.as_str());

    // A guest upload to a follower is relayed to the leader over HTTPS.
    let before = cluster.status(leader).await?["guest"]["hash"].clone();
    let response = cluster
        .post(follower, "/guest", KV_NEXT_GUEST.to_vec())
        .await?;
    assert_eq!(
        response.status().as_u16(),
        200,
        "{:?}",
        response.text().await
    );
    let record: serde_json::Value = response.json().await?;
    assert_ne!(record["hash"], before, "the guest changed");
    cluster
        .wait_for("the new guest on every node", || async {
            for i in 0..3 {
                let guest = cluster.status(i).await?["guest"]["hash"].clone();
                raftwasm_tests::ensure!(guest == record["hash"], "node {i} runs {guest}");
            }
            Ok(())
        })
        .await?;
    cluster.wait_for_same_state().await?;
    Ok(())
}

#[tokio::test]
async fn clear_text_and_untrusting_clients_get_nothing() -> TestResult {
    let cluster = TestCluster::new().with_tls()?.start_nodes(1, &[]).await?;
    assert_eq!(
        cluster.get(0, "/set?key=k&value=secret").await?,
        (200, "ok".into())
    );
    let http = &cluster.nodes[0].http;

    // A clear-text request gets no HTTP answer, let alone the value.
    let mut plain = TcpStream::connect(http).await?;
    plain
        .write_all(b"GET /get?key=k HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer))
        .await
        .context("the node kept a clear-text connection open")?;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("HTTP/") && !answer.contains("secret"),
        "{read:?}: {answer:?}"
    );
    let plain = reqwest::Client::new()
        .get(format!("http://{http}/get?key=k"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    // Clients that do not trust the cluster's CA refuse the node.
    let dir = tempfile::tempdir()?;
    let other = TestCa::new(dir.path(), "other-ca")?;
    let untrusting = [
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(other.pem.as_bytes())?)
            .build()?,
        reqwest::Client::new(),
    ];
    for client in untrusting {
        let result = client.get(cluster.url(0, "/get?key=k")).send().await;
        assert!(result.is_err(), "{result:?}");
    }

    // The cluster's own client trusts the CA and gets the value.
    assert_eq!(cluster.get(0, "/get?key=k").await?, (200, "secret".into()));
    Ok(())
}

#[tokio::test]
async fn stalled_handshakes_are_dropped_and_count_against_the_cap() -> TestResult {
    let flags = ["--header-timeout-ms=2000", "--max-connections=2"];
    let cluster = TestCluster::new()
        .with_tls()?
        .start_nodes(1, &flags)
        .await?;
    let node = &cluster.nodes[0];
    let ca = cluster.ca().context("a TLS cluster has a CA")?;

    // Two connections that never start their handshake hold both slots
    // (or one, next to the harness's pooled connection): a new client is
    // turned away, over TLS, with the usual 503.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(TcpStream::connect(&node.http).await?);
    }
    let mut silent_peer = TcpStream::connect(&node.raft).await?;
    let fresh = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes())?)
        .build()?;
    let response = fresh.get(cluster.url(0, "/status")).send().await?;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.text().await?.contains("--max-connections"));

    // The stalled handshakes are dropped at the header timeout, on both
    // ports, and the node serves again.
    for stream in &mut stalled {
        closed_within(stream, Duration::from_secs(10)).await?;
    }
    closed_within(&mut silent_peer, Duration::from_secs(10)).await?;
    cluster
        .wait_for("the node to serve again", || async {
            let status = fresh.get(cluster.url(0, "/status")).send().await?.status();
            raftwasm_tests::ensure!(status.as_u16() == 200, "answered {status}");
            Ok(())
        })
        .await?;
    Ok(())
}
