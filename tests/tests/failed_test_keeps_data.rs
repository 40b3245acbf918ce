//! A cluster test that fails by returning an error (through `?`) keeps its
//! cluster's data and logs, as one that panics does. In its own test binary:
//! the failure it makes on purpose counts for every cluster in the process.

use raftwasm_tests::cluster::{TestCluster, TestResult};

/// A test body that fails the way most cluster tests would: an error from a
/// request, propagated with `?`, while its cluster is alive.
async fn failing_test(cluster: TestCluster) -> TestResult {
    let _cluster = cluster;
    let missing: Result<(), std::io::Error> = Err(std::io::Error::other("a request failed"));
    missing?;
    Ok(())
}

#[tokio::test]
async fn a_test_that_returns_an_error_keeps_its_cluster_data() -> TestResult {
    let cluster = TestCluster::start(1, &[]).await?;
    let dir = cluster.root().to_owned();
    let outcome = failing_test(cluster).await;
    assert!(outcome.is_err(), "the test body did not fail");
    assert!(
        dir.join("node0.log").exists(),
        "{} was removed after a failed test",
        dir.display()
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
