//! Nothing a client sends makes a node wait or hold memory without a bound:
//! a guest upload without the token is refused before its body is read.

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
