//! Connections that stall are closed: half a request header within
//! `--header-timeout-ms`, a body that stops arriving within
//! `--idle-timeout-ms`, a silent peer-port connection within the header
//! timeout; and each port holds at most its configured number of connections.

use std::time::Duration;

use raftwasm_tests::closed_within;
use raftwasm_tests::cluster::TestCluster;
use raftwasm_tests::cluster::TestResult;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FLAGS: [&str; 2] = ["--header-timeout-ms=500", "--idle-timeout-ms=500"];

#[tokio::test]
async fn half_sent_headers_and_stalled_bodies_are_closed_within_the_timeouts() -> TestResult {
    let cluster = TestCluster::start(1, &FLAGS).await?;
    let http = &cluster.nodes[0].http;
    let mut half_headers = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(http).await?;
        stream
            .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            .await?;
        half_headers.push(stream);
    }
    let mut stalled_bodies = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(http).await?;
        stream
            .write_all(b"POST /set?key=k HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            .await?;
        stalled_bodies.push(stream);
    }
    let mut idle = TcpStream::connect(http).await?;
    for stream in half_headers.iter_mut().chain(&mut stalled_bodies) {
        closed_within(stream, Duration::from_secs(5)).await?;
    }
    closed_within(&mut idle, Duration::from_secs(5)).await?;

    // A stalled body wrote nothing, and the node still serves.
    assert_eq!(cluster.get(0, "/get?key=k").await?.0, 404);
    assert_eq!(
        cluster.get(0, "/set?key=k&value=v").await?,
        (200, "ok".into())
    );
    Ok(())
}

#[tokio::test]
async fn silent_peer_connections_are_closed_within_the_timeout() -> TestResult {
    let cluster = TestCluster::start(1, &FLAGS).await?;
    let mut silent = TcpStream::connect(&cluster.nodes[0].raft).await?;
    let mut half_frame = TcpStream::connect(&cluster.nodes[0].raft).await?;
    half_frame.write_all(&[0, 0, 1]).await?;
    closed_within(&mut silent, Duration::from_secs(5)).await?;
    closed_within(&mut half_frame, Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test]
async fn connections_beyond_the_cap_are_turned_away() -> TestResult {
    let flags = ["--max-connections=4", "--max-peer-connections=2"];
    let cluster = TestCluster::start(1, &flags).await?;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&cluster.nodes[0].http).await?);
    }
    // The fifth is answered 503 and closed at once.
    let mut fifth = TcpStream::connect(&cluster.nodes[0].http).await?;
    fifth
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), fifth.read_to_string(&mut answer)).await??;
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("--max-connections"),
        "{answer:?}"
    );
    drop(held);
    cluster
        .wait_for("the node to serve again", || async {
            raftwasm_tests::ensure!(cluster.get(0, "/status").await?.0 == 200);
            Ok(())
        })
        .await?;

    let mut peers = Vec::new();
    for _ in 0..2 {
        peers.push(TcpStream::connect(&cluster.nodes[0].raft).await?);
    }
    // Closed at once, well before the header timeout (10 s here) would.
    let mut third = TcpStream::connect(&cluster.nodes[0].raft).await?;
    closed_within(&mut third, Duration::from_secs(3)).await?;
    Ok(())
}
