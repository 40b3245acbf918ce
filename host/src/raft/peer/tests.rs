//! The peer client against a real peer port whose RPCs a test answers:
//! pooling, tokens, timeouts, remote errors, reconnects and snapshots.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openraft::error::{Fatal, RPCError, RaftError, ReplicationClosed, StreamingError};
use openraft::network::{RPCOption, RaftNetwork as _, RaftNetworkFactory as _};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{CommittedLeaderId, LogId};

use super::client::{NetworkFactory, PeerClient, append_entries_frame};
use super::server::{PeerLimits, serve_with};
use super::wire::{PeerRequest, PeerResponse, SnapshotChunkError};
use crate::raft::snapshot_file::SnapshotFile;
use crate::raft::{NodeId, NodeInfo, typ};

fn log_id(term: u64, index: u64) -> typ::LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// A peer port whose RPCs are answered by `handler`; returns its address
/// and a sender that shuts it down.
async fn fake_peer<H, F>(
    token: Option<&str>,
    handler: H,
) -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>)>
where
    H: Fn(PeerRequest) -> F + Clone + Send + 'static,
    F: Future<Output = PeerResponse> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let token = token.map(str::to_owned);
    tokio::spawn(serve_with(
        listener,
        token,
        None,
        PeerLimits::default(),
        async move {
            let _ = stopped.await;
        },
        handler,
    ));
    Ok((addr, stop))
}

/// A handler that grants every vote and accepts every append.
async fn agreeable(request: PeerRequest) -> PeerResponse {
    match request {
        PeerRequest::AppendEntries(_) => {
            PeerResponse::AppendEntries(Ok(AppendEntriesResponse::Success))
        }
        PeerRequest::Vote(rpc) => {
            PeerResponse::Vote(Ok(VoteResponse::new(rpc.vote, rpc.last_log_id, true)))
        }
        PeerRequest::SnapshotChunk(chunk) => {
            PeerResponse::SnapshotChunk(Ok(chunk.done.then(|| SnapshotResponse::new(chunk.vote))))
        }
    }
}

async fn client(token: Option<&str>, addr: &str) -> PeerClient {
    let mut factory = NetworkFactory::new(1, token.map(str::to_owned));
    let node = NodeInfo {
        api_addr: String::new(),
        raft_addr: addr.to_owned(),
    };
    factory.new_client(2, &node).await
}

fn vote_request() -> VoteRequest<NodeId> {
    VoteRequest::new(openraft::Vote::new(5, 1), Some(log_id(4, 20)))
}

fn option() -> RPCOption {
    RPCOption::new(Duration::from_secs(5))
}

fn idle(client: &PeerClient) -> usize {
    client.idle_connections()
}

#[tokio::test]
async fn rpcs_reuse_one_pooled_connection() -> anyhow::Result<()> {
    let (addr, _stop) = fake_peer(Some("t"), agreeable).await?;
    let mut factory = NetworkFactory::new(1, Some("t".into()));
    let node = NodeInfo {
        api_addr: String::new(),
        raft_addr: addr,
    };
    let mut first = factory.new_client(2, &node).await;
    assert_eq!(idle(&first), 0, "new_client must not dial");
    for _ in 0..3 {
        let resp = first.vote(vote_request(), option()).await?;
        assert!(resp.vote_granted);
    }
    assert_eq!(idle(&first), 1, "sequential RPCs share one connection");

    let mut second = factory.new_client(2, &node).await;
    assert!(first.shares_pool_with(&second), "clients share the pool");
    let rpc = AppendEntriesRequest {
        vote: openraft::Vote::new_committed(5, 1),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    assert_eq!(
        second.append_entries(rpc, option()).await?,
        AppendEntriesResponse::Success
    );
    assert_eq!(idle(&second), 1, "the second client reused the connection");
    Ok(())
}

#[tokio::test]
async fn an_append_sent_now_uses_an_idle_connection_or_none() -> anyhow::Result<()> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    let (addr, _stop) = fake_peer(None, move |request| {
        let recorded = recorded.clone();
        async move {
            if let PeerRequest::AppendEntries(rpc) = &request {
                recorded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(rpc.prev_log_id);
            }
            agreeable(request).await
        }
    })
    .await?;
    let mut client = client(None, &addr).await;
    let rpc = |prev| AppendEntriesRequest {
        vote: openraft::Vote::new_committed(5, 1),
        prev_log_id: prev,
        entries: Vec::new(),
        leader_commit: prev,
    };
    let frame = append_entries_frame(rpc(Some(log_id(5, 1))))?;
    // Nothing is dialed here: with no idle connection, nothing is sent.
    assert!(client.send_append_entries_now(frame.clone()).is_none());
    client.append_entries(rpc(None), option()).await?;
    assert_eq!(idle(&client), 1);

    let sent = client
        .send_append_entries_now(frame)
        .expect("the idle connection takes the frame");
    assert_eq!(idle(&client), 0, "the connection is busy until the answer");
    let answer = sent.answer(Duration::from_secs(5)).await;
    assert_eq!(answer, Ok(AppendEntriesResponse::Success));
    assert_eq!(idle(&client), 1, "the answer gives the connection back");
    let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
    assert_eq!(seen, vec![None, Some(log_id(5, 1))]);
    Ok(())
}

#[tokio::test]
async fn wrong_token_makes_the_peer_unreachable() -> anyhow::Result<()> {
    let (addr, _stop) = fake_peer(Some("right"), agreeable).await?;
    for token in [Some("wrong"), None] {
        let mut client = client(token, &addr).await;
        let err = client.vote(vote_request(), option()).await;
        assert!(
            matches!(&err, Err(RPCError::Unreachable(e)) if e.to_string().contains("token")),
            "{err:?}"
        );
        assert_eq!(idle(&client), 0);
    }
    Ok(())
}

#[tokio::test]
async fn closed_port_is_unreachable() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    drop(listener);
    let mut client = client(None, &addr).await;
    let err = client.vote(vote_request(), option()).await;
    assert!(matches!(err, Err(RPCError::Unreachable(_))), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn slow_peer_times_out_and_its_connection_is_dropped() -> anyhow::Result<()> {
    let (addr, _stop) = fake_peer(None, |request| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        agreeable(request).await
    })
    .await?;
    let mut client = client(None, &addr).await;
    let ttl = Duration::from_millis(100);
    let err = client.vote(vote_request(), RPCOption::new(ttl)).await;
    assert!(
        matches!(&err, Err(RPCError::Timeout(t)) if t.timeout == ttl && t.target == 2),
        "{err:?}"
    );
    assert_eq!(idle(&client), 0, "a timed-out connection is not reused");
    Ok(())
}

#[tokio::test]
async fn remote_raft_error_comes_back_as_remote_error() -> anyhow::Result<()> {
    let (addr, _stop) = fake_peer(None, |_| async {
        PeerResponse::Vote(Err(RaftError::Fatal(Fatal::Stopped)))
    })
    .await?;
    let mut client = client(None, &addr).await;
    let err = client.vote(vote_request(), option()).await;
    assert!(
        matches!(
            &err,
            Err(RPCError::RemoteError(e))
                if e.target == 2 && e.source == RaftError::Fatal(Fatal::Stopped)
        ),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn restarted_peer_gets_a_fresh_connection() -> anyhow::Result<()> {
    let (addr, stop) = fake_peer(None, agreeable).await?;
    let mut client = client(None, &addr).await;
    client.vote(vote_request(), option()).await?;
    assert_eq!(idle(&client), 1);

    // The peer restarts on the same address: the pooled connection is
    // now closed at the far end and must not be used.
    let _ = stop.send(());
    let mut restarted = None;
    for _ in 0..50 {
        if let Ok(listener) = tokio::net::TcpListener::bind(&addr).await {
            restarted = Some(listener);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener = restarted.ok_or_else(|| anyhow::anyhow!("cannot rebind {addr}"))?;
    tokio::spawn(serve_with(
        listener,
        None,
        None,
        PeerLimits::default(),
        std::future::pending(),
        agreeable,
    ));
    // Give the old server's close time to reach the client socket.
    for _ in 0..50 {
        let resp = client.vote(vote_request(), option()).await;
        if resp.is_ok() {
            assert_eq!(idle(&client), 1);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("no successful vote after the peer restarted")
}

/// A snapshot file of `len` bytes, in `dir`.
async fn snapshot_file(
    dir: &tempfile::TempDir,
    len: usize,
) -> anyhow::Result<(Vec<u8>, typ::Snapshot)> {
    let bytes: Vec<u8> = (0..len).map(|n| (n % 251) as u8).collect();
    let path = dir.path().join(format!("{len}.snap"));
    std::fs::write(&path, &bytes)?;
    let snapshot = typ::Snapshot {
        meta: typ::SnapshotMeta::default(),
        snapshot: Box::new(SnapshotFile::open(&path).await?),
    };
    Ok((bytes, snapshot))
}

/// The file goes in pieces of the configured size, in order, and the
/// peer's answer to the last piece is the result; a transfer can be
/// cancelled.
#[tokio::test]
async fn snapshot_is_sent_in_chunks_and_can_be_cancelled() -> anyhow::Result<()> {
    let received: Arc<Mutex<Vec<(u64, usize, bool)>>> = Arc::default();
    let log = received.clone();
    let (addr, _stop) = fake_peer(None, move |request| {
        let log = log.clone();
        async move {
            let PeerRequest::SnapshotChunk(chunk) = request else {
                return PeerResponse::SnapshotChunk(Err(SnapshotChunkError::Fatal(
                    Fatal::Panicked,
                )));
            };
            log.lock().unwrap_or_else(PoisonError::into_inner).push((
                chunk.offset,
                chunk.data.len(),
                chunk.done,
            ));
            PeerResponse::SnapshotChunk(Ok(chunk.done.then(|| SnapshotResponse::new(chunk.vote))))
        }
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let mut client = client(None, &addr).await;
    client.snapshot_chunk_bytes = 1 << 20;
    let vote = openraft::Vote::new_committed(6, 1);
    let (_, snapshot) = snapshot_file(&dir, (3 << 20) + 5).await?;
    let resp = client
        .full_snapshot(vote, snapshot, std::future::pending(), option())
        .await?;
    assert_eq!(resp.vote, vote);
    let pieces = received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(
        pieces,
        [
            (0, 1 << 20, false),
            (1 << 20, 1 << 20, false),
            (2 << 20, 1 << 20, false),
            (3 << 20, 5, true)
        ]
    );

    let (_, snapshot) = snapshot_file(&dir, 10).await?;
    let cancelled = client
        .full_snapshot(
            vote,
            snapshot,
            std::future::ready(ReplicationClosed::new("test")),
            option(),
        )
        .await;
    assert!(
        matches!(cancelled, Err(StreamingError::Closed(_))),
        "{cancelled:?}"
    );
    Ok(())
}

#[tokio::test]
async fn remote_fatal_or_refusal_on_snapshot_is_an_error() -> anyhow::Result<()> {
    let (addr, _stop) = fake_peer(None, |_| async {
        PeerResponse::SnapshotChunk(Err(SnapshotChunkError::Fatal(Fatal::Stopped)))
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let mut stopped = client(None, &addr).await;
    let vote = openraft::Vote::new_committed(6, 1);
    let (_, snapshot) = snapshot_file(&dir, 0).await?;
    let err = stopped
        .full_snapshot(vote, snapshot, std::future::pending(), option())
        .await;
    assert!(
        matches!(&err, Err(StreamingError::RemoteError(e)) if e.source == Fatal::Stopped),
        "{err:?}"
    );

    let (addr, _stop) = fake_peer(None, |_| async {
        PeerResponse::SnapshotChunk(Err(SnapshotChunkError::Refused("out of order".into())))
    })
    .await?;
    let mut refusing = client(None, &addr).await;
    let (_, snapshot) = snapshot_file(&dir, 100).await?;
    let err = refusing
        .full_snapshot(vote, snapshot, std::future::pending(), option())
        .await;
    assert!(
        matches!(&err, Err(StreamingError::Network(e)) if e.to_string().contains("out of order")),
        "{err:?}"
    );
    Ok(())
}
