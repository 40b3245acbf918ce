//! Removing a member: only the leader does it, an unknown id is a 404, and
//! the remaining two nodes go on taking and replicating writes, with a
//! quorum counted over the two of them.

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

/// Node `i`'s id.
async fn id(cluster: &TestCluster, i: usize) -> anyhow::Result<u64> {
    let status = cluster.status(i).await?;
    status["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no id in {status}"))
}

#[tokio::test]
async fn removed_follower_leaves_a_working_two_node_cluster() -> TestResult {
    // A short write timeout, so that a write without a quorum fails fast.
    let mut cluster = TestCluster::start(3, &["--write-timeout-ms=1000"]).await?;
    let leader = cluster.leader().await?;
    let removed = (leader + 1) % 3;
    let kept = (leader + 2) % 3;
    let removed_id = id(&cluster, removed).await?;

    // A follower refuses membership changes and names the leader.
    let response = cluster
        .post(kept, &format!("/remove?id={removed_id}"), Vec::new())
        .await?;
    assert_eq!(response.status().as_u16(), 421);
    assert_eq!(
        response.headers()[raftwasm::proto::LEADER_HEADER],
        format!("http://{}", cluster.nodes[leader].http).as_str()
    );
    assert!(!response.text().await?.is_empty());
    assert_eq!(cluster.members(leader).await?.len(), 3);

    // An id that is not a member.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(id(&cluster, i).await?);
    }
    let unknown = (1..).find(|c| !ids.contains(c)).unwrap_or(0);
    let response = cluster
        .post(leader, &format!("/remove?id={unknown}"), Vec::new())
        .await?;
    assert_eq!(response.status().as_u16(), 404);
    for bad in ["/remove", "/remove?id=", "/remove?id=two"] {
        let response = cluster.post(leader, bad, Vec::new()).await?;
        assert_eq!(response.status().as_u16(), 400, "{bad}");
        assert!(!response.text().await?.is_empty(), "{bad} has no message");
    }
    assert_eq!(cluster.members(leader).await?.len(), 3);

    // The last join's membership change may still be finishing (the cluster
    // shows every node as a voter from its joint step on); the leader
    // answers 503 until then, and a client retries.
    let answer = cluster
        .wait_for("the leader to take the removal", || async {
            let response = cluster
                .post(leader, &format!("/remove?id={removed_id}"), Vec::new())
                .await?;
            let answer = (response.status().as_u16(), response.text().await?);
            raftwasm_tests::ensure!(answer.0 != 503, "{answer:?}");
            Ok(answer)
        })
        .await?;
    assert_eq!(answer, (200, "ok".into()));

    let remaining = [(ids[leader], true), (ids[kept], true)];
    for i in [leader, kept] {
        cluster
            .wait_for(&format!("node {i} to see two voters"), || async {
                let mut seen = cluster.members(i).await?;
                seen.sort_unstable();
                let mut expected = remaining.to_vec();
                expected.sort_unstable();
                raftwasm_tests::ensure!(seen == expected, "members {seen:?}");
                Ok(())
            })
            .await?;
    }

    // Writes commit on the two remaining voters and are no longer sent to
    // the removed node (which may not even have applied all it was sent).
    assert_eq!(
        cluster.get(leader, "/set?key=after&value=removal").await?,
        (200, "ok".into())
    );
    let write_index = cluster.status(leader).await?["last_log_index"].as_u64();
    for i in [leader, kept] {
        cluster
            .wait_for(&format!("the write on node {i}"), || async {
                let answer = cluster.get(i, "/get?key=after&consistency=stale").await?;
                raftwasm_tests::ensure!(answer == (200, "removal".into()), "reads {answer:?}");
                Ok(())
            })
            .await?;
    }
    let removed_last = cluster.status(removed).await?["last_log_index"].as_u64();
    assert!(
        removed_last < write_index,
        "the removed node has log index {removed_last:?}; the write after its removal is {write_index:?}"
    );

    // The quorum is now both remaining voters: with the other one down, the
    // leader cannot commit, although the removed node is still running.
    cluster.kill(kept);
    let (code, body) = cluster.get(leader, "/set?key=alone&value=x").await?;
    assert_eq!(
        code, 504,
        "a write without a quorum answered {code} {body:?}"
    );
    Ok(())
}
