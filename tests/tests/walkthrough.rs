//! The three-node walkthrough, step by step, with real processes: bootstrap,
//! join, write on the leader, read everywhere, refuse writes on followers,
//! fail over, restart and rejoin.

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

#[tokio::test]
async fn walkthrough_passes_step_by_step() -> TestResult {
    // 1. Node 1 bootstraps and becomes leader, with writes enabled.
    let mut cluster = TestCluster::new();
    cluster.add_node(&[]);
    cluster.spawn(0, &["-bootstrap=true"])?;
    cluster.wait_for_guest(0).await?;
    assert!(
        cluster.nodes[0]
            .log_text()
            .contains("became leader; write api enabled")
    );

    // 2-3. Nodes 2 and 3 join through node 1.
    for i in 1..3 {
        cluster.add_node(&[]);
        let join = format!("--join={}", cluster.nodes[0].http);
        cluster.spawn(i, &[&join])?;
    }
    cluster.wait_for_voters(3).await?;
    assert_eq!(cluster.leader().await?, 0);

    // 4. Write on the leader, read everywhere (default: linearizable).
    assert_eq!(
        cluster.get(0, "/set?key=abc&value=efg").await?,
        (200, "ok".into())
    );
    for i in 0..3 {
        assert_eq!(
            cluster.get(i, "/get?key=abc").await?,
            (200, "efg".into()),
            "node {i}"
        );
    }

    // 5. A follower refuses a write, naming the leader.
    for i in 1..3 {
        let (code, body) = cluster.get(i, "/set?key=abc&value=efg").await?;
        assert_eq!(body, "write method not allowed");
        assert!(!(200..300).contains(&code), "status {code}");
    }

    // 6. Every node's log shows the write being applied.
    for node in &cluster.nodes {
        assert!(
            node.log_text().contains("applied"),
            "{} shows no apply",
            node.http
        );
    }

    // 7. Stop the leader; another is elected and takes writes.
    cluster.kill(0);
    let leader = cluster.leader().await?;
    assert_ne!(leader, 0);
    assert_eq!(
        cluster.get(leader, "/set?key=cba&value=gfe").await?,
        (200, "ok".into())
    );

    // 8. The other follower reads it.
    let other = 3 - leader;
    assert_eq!(
        cluster.get(other, "/get?key=cba").await?,
        (200, "gfe".into())
    );

    // 9. Node 1 restarts on its data dir, even with --bootstrap: it comes back
    // as a follower of the same cluster and reads the new write.
    let old_pid = cluster.nodes[other].pid();
    cluster.spawn(0, &["--bootstrap=true"])?;
    assert!(cluster.nodes[0].pid().is_some() && cluster.nodes[0].pid() != old_pid);
    cluster.wait_for_value("cba", "gfe").await?;
    assert_eq!(cluster.get(0, "/get?key=cba").await?, (200, "gfe".into()));
    assert_eq!(
        cluster.leader().await?,
        leader,
        "the restarted node did not take over"
    );
    let status = cluster.status(0).await?;
    assert_eq!(status["role"], "follower");
    assert_eq!(
        status["members"].as_array().map(Vec::len),
        Some(3),
        "no second cluster"
    );
    Ok(())
}

#[tokio::test]
async fn follower_refusal_names_the_leader() -> TestResult {
    let cluster = TestCluster::start(2, &[]).await?;
    let leader = cluster.leader().await?;
    let follower = 1 - leader;
    let url = format!("http://{}/set?key=k&value=v", cluster.nodes[follower].http);
    let response = reqwest::Client::new()
        .get(&url)
        .header("accept", "application/json")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 421);
    let expected = format!("http://{}", cluster.nodes[leader].http);
    assert_eq!(response.headers()["x-raft-leader"], expected.as_str());
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"], "write method not allowed");
    assert_eq!(body["leader"], expected.as_str());
    Ok(())
}

#[tokio::test]
async fn forward_writes_flag_sends_follower_writes_to_the_leader() -> TestResult {
    let cluster = TestCluster::start(2, &["--forward-writes"]).await?;
    let follower = 1 - cluster.leader().await?;
    assert_eq!(
        cluster.get(follower, "/set?key=fwd&value=1").await?,
        (200, "ok".into())
    );
    cluster.wait_for_value("fwd", "1").await?;
    Ok(())
}
