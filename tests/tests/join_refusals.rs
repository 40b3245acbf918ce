//! `/join` keeps the cluster's fault tolerance: another id for a member's
//! addresses is refused with 409, and a node is a voter only once it has
//! caught up as a learner, so an address where nothing listens never
//! becomes one.

use std::time::{Duration, Instant};

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use serde_json::json;

async fn join(
    cluster: &TestCluster,
    i: usize,
    body: serde_json::Value,
) -> anyhow::Result<(u16, String)> {
    let url = format!("http://{}/join", cluster.nodes[i].http);
    let response = reqwest::Client::new().post(url).json(&body).send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// A loopback address where nothing listens.
fn dead_address() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

#[tokio::test]
async fn a_second_id_for_a_members_addresses_is_refused() -> TestResult {
    let cluster = TestCluster::start(2, &[]).await?;
    let leader = cluster.leader().await?;
    let before = cluster.members(leader).await?;
    let (http, raft) = (&cluster.nodes[0].http, &cluster.nodes[0].raft);
    let dead = dead_address()?;
    for (http, raft) in [(http, raft), (http, &dead), (&dead, raft)] {
        let request = json!({"id": 4242, "http": http, "raft": raft});
        let (code, body) = join(&cluster, leader, request).await?;
        assert_eq!(code, 409, "{body}");
        assert!(body.contains("already belongs to member"), "{body}");
    }
    assert_eq!(cluster.members(leader).await?, before);

    // A member re-joining with its own id and addresses is still fine.
    let status = cluster.status(1).await?;
    let request =
        json!({"id": status["id"], "http": cluster.nodes[1].http, "raft": cluster.nodes[1].raft});
    assert_eq!(join(&cluster, leader, request).await?, (200, "ok".into()));
    assert_eq!(cluster.members(leader).await?, before);
    Ok(())
}

#[tokio::test]
async fn a_node_that_cannot_catch_up_does_not_become_a_voter() -> TestResult {
    let cluster = TestCluster::start(1, &["--join-timeout-ms=1500"]).await?;
    let before = cluster.members(0).await?;
    let request = json!({"id": 4243, "http": dead_address()?, "raft": dead_address()?});
    let start = Instant::now();
    let (code, body) = join(&cluster, 0, request).await?;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("did not catch up"), "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "took {:?}",
        start.elapsed()
    );
    cluster
        .wait_for("the learner to be removed", || async {
            let now = cluster.members(0).await?;
            raftwasm_tests::ensure!(now == before, "members {now:?}");
            Ok(())
        })
        .await?;
    // The cluster still takes writes on its own.
    assert_eq!(
        cluster.get(0, "/set?key=k&value=v").await?,
        (200, "ok".into())
    );
    Ok(())
}
