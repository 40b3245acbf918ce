//! The test harness itself: nodes bind ports the OS picks and advertise
//! them, and a failed test keeps its nodes' data.

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;

#[tokio::test]
async fn nodes_on_port_zero_advertise_the_ports_they_bound() -> TestResult {
    let cluster = TestCluster::start(2, &[]).await?;
    let status = cluster.typed_status(0).await?;
    for (i, node) in cluster.nodes.iter().enumerate() {
        assert!(!node.http.ends_with(":0"), "node {i} http {}", node.http);
        assert!(!node.raft.ends_with(":0"), "node {i} raft {}", node.raft);
        let member = status
            .members
            .iter()
            .find(|m| m.http == node.http)
            .unwrap_or_else(|| panic!("node {i} ({}) is not a member", node.http));
        assert_eq!(member.raft, node.raft, "node {i}'s advertised peer address");
    }
    Ok(())
}

#[tokio::test]
async fn a_kept_cluster_leaves_its_data_and_a_passing_one_does_not() -> TestResult {
    let passing = TestCluster::start(1, &[]).await?;
    let passing_dir = passing.root().to_owned();
    drop(passing);
    assert!(
        !passing_dir.exists(),
        "{} was not removed",
        passing_dir.display()
    );

    let failing = TestCluster::start(1, &[]).await?;
    let failing_dir = failing.root().to_owned();
    let _ = failing.check::<()>(Err(anyhow::anyhow!("a test's own error")));
    drop(failing);
    assert!(
        failing_dir.join("node0.log").exists(),
        "{} was removed",
        failing_dir.display()
    );
    std::fs::remove_dir_all(&failing_dir)?;
    Ok(())
}
