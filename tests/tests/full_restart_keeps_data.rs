//! A full-cluster restart: every node is killed with SIGKILL and started
//! again on its data dir; the cluster elects a leader from what it persisted
//! and every acknowledged key is still there, on every node.

use std::collections::BTreeSet;

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

/// Keys written before the restart.
const KEYS: usize = 30;

/// Writes `KEYS` keys on the leader, each answered `ok`.
async fn write_keys(cluster: &TestCluster, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
    let leader = cluster.leader().await?;
    let mut written = Vec::new();
    for n in 0..KEYS {
        let (key, value) = (format!("{prefix}-{n}"), format!("value-{n}"));
        let answer = cluster
            .get(leader, &format!("/set?key={key}&value={value}"))
            .await?;
        raftwasm_tests::ensure!(answer == (200, "ok".into()), "set {key}: {answer:?}");
        written.push((key, value));
    }
    Ok(written)
}

/// The node ids of the members, as node `i` sees them.
async fn member_ids(cluster: &TestCluster, i: usize) -> anyhow::Result<BTreeSet<u64>> {
    let status = cluster.status(i).await?;
    let members = status["members"].as_array().cloned().unwrap_or_default();
    Ok(members.iter().filter_map(|m| m["id"].as_u64()).collect())
}

/// Node `i`'s current term.
async fn term(cluster: &TestCluster, i: usize) -> anyhow::Result<u64> {
    let status = cluster.status(i).await?;
    status["term"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no term in {status}"))
}

/// Kills every node, then starts each again on its data dir with `args`,
/// checking that each is a new process.
fn restart_all(cluster: &mut TestCluster, args: &[&str]) -> anyhow::Result<()> {
    let old: Vec<_> = cluster.nodes.iter().map(|n| n.pid()).collect();
    for i in 0..cluster.nodes.len() {
        cluster.kill(i);
    }
    for (i, old) in old.into_iter().enumerate() {
        cluster.spawn(i, args)?;
        let pid = cluster.nodes[i].pid();
        raftwasm_tests::ensure!(
            pid.is_some() && pid != old,
            "node {i} was not restarted: pid {pid:?}, before {old:?}"
        );
    }
    Ok(())
}

/// After a restart: one leader that every node follows in its term, the
/// same members, every key readable with linearizable reads on every node,
/// the same state everywhere, and new writes accepted.
///
/// The term may be the one from before the restart: openraft restores a
/// leader whose committed vote it persisted without a new election.
async fn assert_cluster_kept(
    cluster: &TestCluster,
    members: &BTreeSet<u64>,
    written: &[(String, String)],
) -> anyhow::Result<()> {
    let leader = cluster.leader().await?;
    let term = cluster.status(leader).await?["term"].clone();
    for i in 0..cluster.nodes.len() {
        assert_eq!(&member_ids(cluster, i).await?, members, "node {i}");
        let status = cluster.status(i).await?;
        let expected = if i == leader { "leader" } else { "follower" };
        assert_eq!(status["role"], expected, "node {i}");
        assert_eq!(status["term"], term, "node {i}");
        cluster
            .wait_for(&format!("every key on node {i}"), || async {
                for (key, value) in written {
                    let answer = cluster.get(i, &format!("/get?key={key}")).await?;
                    raftwasm_tests::ensure!(
                        answer == (200, value.clone()),
                        "{key} reads {answer:?}"
                    );
                }
                Ok(())
            })
            .await?;
    }
    cluster.wait_for_same_state().await?;
    assert_eq!(
        cluster.get(leader, "/set?key=after&value=restart").await?,
        (200, "ok".into())
    );
    cluster.wait_for_value("after", "restart").await
}

#[tokio::test]
async fn restarted_cluster_keeps_every_key() -> TestResult {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let written = write_keys(&cluster, "plain").await?;
    let members = member_ids(&cluster, 0).await?;
    assert_eq!(members.len(), 3);

    restart_all(&mut cluster, &[])?;
    Ok(assert_cluster_kept(&cluster, &members, &written).await?)
}

#[tokio::test]
async fn bootstrap_flag_on_a_full_restart_does_not_start_new_clusters() -> TestResult {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let written = write_keys(&cluster, "boot").await?;
    let members = member_ids(&cluster, 0).await?;
    assert_eq!(members.len(), 3);

    // Each used data dir must rejoin its cluster instead of bootstrapping a
    // single-node one of its own.
    restart_all(&mut cluster, &["--bootstrap=true"])?;
    Ok(assert_cluster_kept(&cluster, &members, &written).await?)
}

#[tokio::test]
async fn followers_restarted_first_elect_a_leader_and_the_old_leader_rejoins() -> TestResult {
    let mut cluster = TestCluster::start(3, &[]).await?;
    let written = write_keys(&cluster, "order").await?;
    let members = member_ids(&cluster, 0).await?;
    let old_leader = cluster.leader().await?;
    let term_before = term(&cluster, old_leader).await?;
    let old: Vec<_> = cluster.nodes.iter().map(|n| n.pid()).collect();
    for i in 0..cluster.nodes.len() {
        cluster.kill(i);
    }

    // The two followers come back first: they remember the old leader but
    // cannot reach it, so they must elect one of themselves in a new term.
    let followers: Vec<usize> = (0..3).filter(|i| *i != old_leader).collect();
    for &i in &followers {
        cluster.spawn(i, &[])?;
    }
    let leader = cluster.leader().await?;
    assert!(followers.contains(&leader));
    let term_after = term(&cluster, leader).await?;
    assert!(
        term_after > term_before,
        "no new election: term {term_after}, before the restart {term_before}"
    );

    // The old leader restarts with its original command, --bootstrap
    // included, and follows the new leader.
    cluster.spawn(old_leader, &["--bootstrap=true"])?;
    for (i, old) in old.into_iter().enumerate() {
        let pid = cluster.nodes[i].pid();
        assert!(pid.is_some() && pid != old, "node {i} was not restarted");
    }
    assert_cluster_kept(&cluster, &members, &written).await?;
    assert_eq!(cluster.leader().await?, leader);
    Ok(())
}
