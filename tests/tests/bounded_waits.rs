//! Nothing a client sends makes a node wait or hold memory without a bound:
//! a guest upload without the token is refused before its body is read, and
//! the write queue is bounded in bytes.

use std::time::Duration;

use raftwasm_tests::cluster::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_guest_upload_without_the_token_is_refused_before_its_body() -> anyhow::Result<()> {
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
async fn a_full_write_queue_is_refused_with_503() -> anyhow::Result<()> {
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
