//! The peer port (`--raft`): accepts connections from other nodes'
//! `PeerClient`s, checks their [`Hello`], answers their Raft RPCs through the
//! local [`Raft`] and assembles the snapshots they send in pieces. With
//! `--tls-*`, a connection first completes a mutual TLS handshake.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::Fatal;
use openraft::raft::SnapshotResponse;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::stream::PeerStream;
use super::wire::{
    FrameError, Hello, HelloReply, MAX_FRAME_LEN, MAX_HELLO_LEN, PROTOCOL_VERSION, PeerRequest,
    PeerResponse, SnapshotChunk, SnapshotChunkError, frames, read_frame, trim_buffers, write_frame,
};
use crate::raft::snapshot_file::SnapshotFile;
use crate::raft::{NodeId, Raft, typ};
use crate::stall_timeout::StallTimeout;

/// The bounds of every peer connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerLimits {
    /// How long a new connection may take to complete its TLS handshake (if
    /// any) and send its [`Hello`].
    pub hello_timeout: Duration,
    /// How long a connection may send nothing (between or inside frames),
    /// or leave a response unread, before it is closed. Peers reconnect.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 64,
        }
    }
}

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the peer port until `shutdown` resolves.
///
/// Each connection gets its own task; its requests are answered one at a
/// time, in order, which keeps a leader's append-entries stream ordered.
/// When `token` is set, a connection whose [`Hello`] carries a different
/// token is refused. With `tls` (built to require client certificates), a
/// connection that fails the handshake is closed before any frame is read.
/// A malformed frame closes only that connection, and so does silence
/// beyond the [`PeerLimits`]; connections over the cap are closed at once. On shutdown the listener and every open connection are
/// closed.
pub async fn serve(
    listener: TcpListener,
    raft: Raft,
    token: Option<String>,
    tls: Option<TlsAcceptor>,
    limits: PeerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let receiving: Arc<Mutex<Option<Receiving>>> = Arc::default();
    let handler = move |request| {
        let raft = raft.clone();
        let receiving = receiving.clone();
        async move { dispatch(&raft, &receiving, request).await }
    };
    serve_with(listener, token, tls, limits, shutdown, handler).await;
}

/// [`serve`] with the RPC handling passed in, so that the transport can be
/// tested without a Raft node.
pub(crate) async fn serve_with<H, F>(
    listener: TcpListener,
    token: Option<String>,
    tls: Option<TlsAcceptor>,
    limits: PeerLimits,
    shutdown: impl Future<Output = ()>,
    handler: H,
) where
    H: Fn(PeerRequest) -> F + Clone + Send + 'static,
    F: Future<Output = PeerResponse> + Send,
{
    let token: Option<Arc<str>> = token.map(Arc::from);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "peer port listening");
    }
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        warn!(%peer, max = limits.max_connections, "peer port: too many connections; closing this one");
                        drop(stream);
                        continue;
                    };
                    let handler = handler.clone();
                    let token = token.clone();
                    let tls = tls.clone();
                    connections.spawn(async move {
                        if let Err(e) = serve_connection(stream, peer, token, tls, limits, handler).await {
                            log_connection_error(peer, &e);
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "peer port: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    debug!(open = connections.len(), "peer port shutting down");
    connections.shutdown().await;
}

/// Why a peer connection ended other than by the peer closing it.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("no hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("tls handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

fn log_connection_error(peer: SocketAddr, err: &ConnectionError) {
    match err {
        // A peer going away mid-frame is routine (restart, timeout on its
        // side); anything else means a misconfigured or broken client.
        ConnectionError::Frame(FrameError::Io(e)) | ConnectionError::Io(e) => {
            debug!(%peer, error = %e, "peer connection closed")
        }
        _ => warn!(%peer, error = %err, "peer connection closed"),
    }
}

async fn serve_connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    token: Option<Arc<str>>,
    tls: Option<TlsAcceptor>,
    limits: PeerLimits,
    handler: H,
) -> Result<(), ConnectionError>
where
    H: Fn(PeerRequest) -> F,
    F: Future<Output = PeerResponse>,
{
    stream.set_nodelay(true)?;
    // The handshake and the hello share one deadline.
    let deadline = tokio::time::Instant::now() + limits.hello_timeout;
    let stream =
        match tokio::time::timeout_at(deadline, PeerStream::accept(stream, tls.as_ref())).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ConnectionError::Handshake(e)),
            Err(_) => return Err(ConnectionError::HelloTimeout(limits.hello_timeout)),
        };
    let idle = Some(limits.idle_timeout);
    let mut stream = frames(StallTimeout::new(stream, idle, idle));

    let hello = tokio::time::timeout_at(deadline, read_frame(&mut stream, MAX_HELLO_LEN));
    let hello: Hello = match hello.await {
        Ok(Ok(hello)) => hello,
        Ok(Err(FrameError::Closed)) => return Ok(()),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(ConnectionError::HelloTimeout(limits.hello_timeout)),
    };
    if let Err(reason) = check_hello(&hello, token.as_deref()) {
        // Best effort: the client learns why before the connection closes.
        let _ = write_frame(
            &mut stream,
            &HelloReply::Refused {
                reason: reason.clone(),
            },
        )
        .await;
        return Err(ConnectionError::Refused(reason));
    }
    write_frame(&mut stream, &HelloReply::Accepted).await?;
    debug!(%peer, "peer connection accepted");

    loop {
        let request: PeerRequest = match read_frame(&mut stream, MAX_FRAME_LEN).await {
            Ok(request) => request,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let response = handler(request).await;
        write_frame(&mut stream, &response).await?;
        trim_buffers(&mut stream);
    }
}

/// Accepts a [`Hello`] with our protocol version and, if we have a token,
/// the same token. The error is the reason sent back to the client.
fn check_hello(hello: &Hello, token: Option<&str>) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "peer protocol version {} is not supported (this node speaks {PROTOCOL_VERSION}); \
             run the same raftwasm release on every node",
            hello.version
        ));
    }
    match token {
        None => Ok(()),
        Some(expected) => match hello.token.as_deref() {
            Some(given) if tokens_match(given, expected) => Ok(()),
            _ => Err("cluster token mismatch; give every node the same cluster token".into()),
        },
    }
}

/// Compares two tokens in time independent of where they differ, and of
/// their lengths (both are hashed first).
pub fn tokens_match(given: &str, expected: &str) -> bool {
    let a = Sha256::digest(given.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

async fn dispatch(
    raft: &Raft,
    receiving: &Mutex<Option<Receiving>>,
    request: PeerRequest,
) -> PeerResponse {
    match request {
        PeerRequest::AppendEntries(rpc) => {
            PeerResponse::AppendEntries(raft.append_entries(rpc).await)
        }
        PeerRequest::Vote(rpc) => PeerResponse::Vote(raft.vote(rpc).await),
        PeerRequest::SnapshotChunk(chunk) => {
            PeerResponse::SnapshotChunk(receive_chunk(raft, receiving, chunk).await)
        }
    }
}

/// The snapshot being received: one at a time per node; a piece at offset 0
/// starts over (dropping the file of an abandoned one).
#[derive(Debug)]
struct Receiving {
    snapshot_id: String,
    file: Box<SnapshotFile>,
    received: u64,
    pieces: u64,
}

/// What receiving a snapshot needs from Raft; the tests stand in for it.
trait SnapshotTarget {
    /// A new, empty file to receive a snapshot into.
    async fn begin(&self) -> Result<Box<SnapshotFile>, String>;
    /// Checks and installs a received snapshot.
    async fn install(
        &self,
        vote: typ::Vote,
        snapshot: typ::Snapshot,
    ) -> Result<SnapshotResponse<NodeId>, Fatal<NodeId>>;
}

impl SnapshotTarget for Raft {
    async fn begin(&self) -> Result<Box<SnapshotFile>, String> {
        self.begin_receiving_snapshot()
            .await
            .map_err(|e| e.to_string())
    }

    async fn install(
        &self,
        vote: typ::Vote,
        snapshot: typ::Snapshot,
    ) -> Result<SnapshotResponse<NodeId>, Fatal<NodeId>> {
        self.install_full_snapshot(vote, snapshot).await
    }
}

/// Writes one piece of a snapshot to its file (made by the state machine)
/// and, after the last one, hands the file to Raft to check and install.
async fn receive_chunk(
    raft: &impl SnapshotTarget,
    receiving: &Mutex<Option<Receiving>>,
    chunk: SnapshotChunk,
) -> Result<Option<SnapshotResponse<NodeId>>, SnapshotChunkError> {
    let refused = |reason: std::fmt::Arguments<'_>| {
        SnapshotChunkError::Refused(format!("snapshot {}: {reason}", chunk.meta.snapshot_id))
    };
    let mut slot = receiving.lock().await;
    if chunk.offset == 0 {
        let file = raft
            .begin()
            .await
            .map_err(|e| refused(format_args!("cannot start receiving it: {e}")))?;
        *slot = Some(Receiving {
            snapshot_id: chunk.meta.snapshot_id.clone(),
            file,
            received: 0,
            pieces: 0,
        });
    }
    let current = slot
        .as_mut()
        .filter(|r| r.snapshot_id == chunk.meta.snapshot_id && r.received == chunk.offset)
        .ok_or_else(|| {
            refused(format_args!(
                "the piece at offset {} does not continue what was received; send it again from the start",
                chunk.offset
            ))
        })?;
    if let Err(e) = current.file.write_all(&chunk.data).await {
        *slot = None;
        return Err(refused(format_args!("cannot store it: {e}")));
    }
    current.received += chunk.data.len() as u64;
    current.pieces += 1;
    if !chunk.done {
        return Ok(None);
    }
    let Some(Receiving {
        mut file,
        received,
        pieces,
        ..
    }) = slot.take()
    else {
        return Err(refused(format_args!("its file was lost")));
    };
    info!(snapshot = %chunk.meta.snapshot_id, bytes = received, pieces, "received a snapshot; installing it");
    file.sync()
        .await
        .map_err(|e| refused(format_args!("cannot store it: {e}")))?;
    file.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| refused(format_args!("cannot read it back: {e}")))?;
    let snapshot = typ::Snapshot {
        meta: chunk.meta,
        snapshot: file,
    };
    raft.install(chunk.vote, snapshot)
        .await
        .map(Some)
        .map_err(SnapshotChunkError::Fatal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node spawns [`serve`] on the runtime, so its future must be
    /// `Send`; this fails to compile otherwise.
    #[allow(dead_code)]
    fn serve_future_is_send(listener: TcpListener, raft: Raft) {
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&serve(
            listener,
            raft,
            None,
            None,
            PeerLimits::default(),
            async {},
        ));
    }

    /// Stands in for Raft: receives into `dir` and records what it installs.
    struct FakeTarget {
        dir: tempfile::TempDir,
        begun: std::sync::atomic::AtomicUsize,
        installed: std::sync::Mutex<Vec<Vec<u8>>>,
    }

    impl SnapshotTarget for FakeTarget {
        async fn begin(&self) -> Result<Box<SnapshotFile>, String> {
            let n = self
                .begun
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = self.dir.path().join(format!("{n}.part"));
            SnapshotFile::create_temporary(&path)
                .await
                .map(Box::new)
                .map_err(|e| e.to_string())
        }

        async fn install(
            &self,
            vote: typ::Vote,
            mut snapshot: typ::Snapshot,
        ) -> Result<SnapshotResponse<NodeId>, Fatal<NodeId>> {
            use tokio::io::AsyncReadExt as _;
            let mut bytes = Vec::new();
            snapshot
                .snapshot
                .read_to_end(&mut bytes)
                .await
                .map_err(|_| Fatal::Panicked)?;
            self.installed
                .lock()
                .map_err(|_| Fatal::Panicked)?
                .push(bytes);
            Ok(SnapshotResponse::new(vote))
        }
    }

    fn chunk(id: &str, offset: u64, data: &[u8], done: bool) -> SnapshotChunk {
        SnapshotChunk {
            vote: openraft::Vote::new_committed(2, 1),
            meta: typ::SnapshotMeta {
                snapshot_id: id.into(),
                ..Default::default()
            },
            offset,
            data: data.to_vec(),
            done,
        }
    }

    /// Pieces are assembled in order into the file Raft installs; a piece
    /// that does not continue the snapshot being received (a gap, a repeat,
    /// another snapshot's) is refused, and the sender starts over at 0.
    #[tokio::test]
    async fn snapshot_pieces_are_assembled_in_order_or_refused() -> anyhow::Result<()> {
        let target = FakeTarget {
            dir: tempfile::tempdir()?,
            begun: std::sync::atomic::AtomicUsize::new(0),
            installed: std::sync::Mutex::default(),
        };
        let receiving = Mutex::new(None);
        let receive = |c| receive_chunk(&target, &receiving, c);

        assert!(matches!(
            receive(chunk("a", 0, b"abc", false)).await,
            Ok(None)
        ));
        for stray in [
            chunk("a", 5, b"x", false),
            chunk("a", 1, b"bc", false),
            chunk("b", 3, b"x", true),
        ] {
            let refused = receive(stray).await;
            assert!(
                matches!(&refused, Err(SnapshotChunkError::Refused(r)) if r.contains("does not continue")),
                "{refused:?}"
            );
        }
        assert!(matches!(
            receive(chunk("a", 3, b"def", false)).await,
            Ok(None)
        ));
        let done = receive(chunk("a", 6, b"g", true)).await;
        assert!(matches!(done, Ok(Some(_))), "{done:?}");
        // Nothing is left in progress: a piece past 0 is refused now.
        assert!(receive(chunk("a", 7, b"h", true)).await.is_err());

        // A transfer that starts over replaces the abandoned one.
        assert!(matches!(
            receive(chunk("c", 0, b"xx", false)).await,
            Ok(None)
        ));
        assert!(matches!(
            receive(chunk("c", 0, b"12", false)).await,
            Ok(None)
        ));
        assert!(matches!(
            receive(chunk("c", 2, b"3", true)).await,
            Ok(Some(_))
        ));

        let installed = target
            .installed
            .lock()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        assert_eq!(*installed, [b"abcdefg".to_vec(), b"123".to_vec()]);
        // The abandoned transfer's file went with it.
        assert_eq!(std::fs::read_dir(target.dir.path())?.count(), 0);
        Ok(())
    }

    fn hello(version: u32, token: Option<&str>) -> Hello {
        Hello {
            version,
            token: token.map(str::to_owned),
        }
    }

    #[test]
    fn hello_without_server_token_is_accepted() {
        assert!(check_hello(&hello(PROTOCOL_VERSION, None), None).is_ok());
        assert!(check_hello(&hello(PROTOCOL_VERSION, Some("any")), None).is_ok());
    }

    #[test]
    fn hello_needs_the_server_token() {
        assert!(check_hello(&hello(PROTOCOL_VERSION, Some("s3cret")), Some("s3cret")).is_ok());
        assert!(check_hello(&hello(PROTOCOL_VERSION, Some("s3cre")), Some("s3cret")).is_err());
        assert!(check_hello(&hello(PROTOCOL_VERSION, Some("")), Some("s3cret")).is_err());
        assert!(check_hello(&hello(PROTOCOL_VERSION, None), Some("s3cret")).is_err());
    }

    #[test]
    fn hello_with_another_protocol_version_is_refused() {
        let refused = check_hello(&hello(PROTOCOL_VERSION + 1, None), None);
        assert!(refused.is_err_and(|reason| reason.contains("protocol version")));
    }
}
