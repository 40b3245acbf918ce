//! Nothing a client sends makes a node wait or hold memory without a bound:
//! a guest upload without the token is refused before its body is read, the
//! write queue is bounded in bytes, and a linearizable read that cannot be
//! confirmed gives up with 504.

use std::time::{Duration, Instant};

use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_guest_upload_without_the_token_is_refused_before_its_body() -> TestResult {
    let cluster = TestCluster::start(1, &["--token=s3cret"]).await?;
    let mut stream = TcpStream::connect(&cluster.nodes[0].http).await?;
    stream
        .write_all(b"POST /guest HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n\r\n")
        .await?;
    // Only the headers were sent: the answer must come without the body.
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    assert!(answer.contains("Authorization: Bearer"), "{answer:?}");
    Ok(())
}

/// A two-node cluster whose follower is down, so nothing commits.
async fn cluster_without_quorum(args: &[&str]) -> anyhow::Result<(TestCluster, usize)> {
    let mut cluster = TestCluster::start(2, args).await?;
    let leader = cluster.leader().await?;
    cluster.kill(1 - leader);
    Ok((cluster, leader))
}

#[tokio::test]
async fn a_full_write_queue_is_refused_with_503() -> TestResult {
    let args = ["--write-timeout-ms=3000", "--max-write-queue-bytes=1000000"];
    let (cluster, leader) = cluster_without_quorum(&args).await?;
    let cluster = &cluster;
    // Each write waits for a commit that cannot happen; two fit in the queue.
    let write = |i: usize| async move {
        let path = format!("/set?key=k{i}");
        let response = cluster.post(leader, &path, vec![b'v'; 400_000]).await?;
        let code = response.status().as_u16();
        anyhow::Ok((code, response.text().await?))
    };
    let (a, b, c) = tokio::join!(write(0), write(1), write(2));
    let mut answers = vec![a?, b?, c?];
    answers.sort();
    assert_eq!(answers[0].0, 503, "{answers:?}");
    assert!(
        answers[0].1.contains("the write queue is full"),
        "{answers:?}"
    );
    assert_eq!((answers[1].0, answers[2].0), (504, 504), "{answers:?}");
    Ok(())
}

/// Sends `signal` (`STOP`, `CONT`) to node `i`.
fn signal(cluster: &TestCluster, i: usize, signal: &str) -> anyhow::Result<()> {
    let pid = cluster.nodes[i].pid().expect("the node runs");
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()?;
    raftwasm_tests::ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

#[tokio::test]
async fn a_linearizable_read_that_cannot_be_confirmed_answers_504() -> TestResult {
    let cluster = TestCluster::start(2, &["--read-timeout-ms=1000"]).await?;
    let leader = cluster.leader().await?;
    let follower = 1 - leader;
    // A frozen leader accepts the follower's read-index request and never
    // answers it.
    signal(&cluster, leader, "STOP")?;
    let pid = cluster.nodes[leader].pid().expect("the node runs");
    cluster
        .wait_for("the leader to be stopped", || async {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            let state = stat
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next());
            raftwasm_tests::ensure!(state == Some('T'), "state {state:?}");
            Ok(())
        })
        .await?;
    let start = Instant::now();
    let answer = cluster.get(follower, "/get?key=k").await;
    signal(&cluster, leader, "CONT")?;
    let (code, body) = answer?;
    assert_eq!(code, 504, "{body}");
    assert!(body.contains("could not confirm"), "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    Ok(())
}
