//! The peer transport's client side: `NetworkFactory` hands openraft a
//! `PeerClient` per target, which sends Raft RPCs over pooled, long-lived
//! connections (mutual TLS with `--tls-*`, see [`PeerStream`]) as frames of
//! [`super::wire`]. The server side is [`super::server`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt as _;
use openraft::OptionalSend;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RemoteError,
    ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_rustls::TlsConnector;

use super::stream::PeerStream;
use super::wire::{
    FrameError, Frames, Hello, HelloReply, MAX_FRAME_LEN, MAX_HELLO_LEN, PROTOCOL_VERSION,
    PeerRequest, PeerResponse, SNAPSHOT_CHUNK_BYTES, SnapshotChunk, SnapshotChunkError,
    encode_body, frames, read_frame, trim_buffers, write_frame,
};
use crate::raft::{NodeId, NodeInfo, TypeConfig, typ};

/// Idle connections kept per peer address; more are closed when returned.
const MAX_IDLE_PER_PEER: usize = 8;

/// Time allowed for a whole snapshot transfer before the per-byte
/// allowance of [`SNAPSHOT_BYTES_PER_SECOND`] is added.
const SNAPSHOT_BASE_TIMEOUT: Duration = Duration::from_secs(60);

/// The slowest transfer-and-install rate a snapshot is given time for.
const SNAPSHOT_BYTES_PER_SECOND: u64 = 8 << 20;

/// Why an RPC to a peer failed on this side of the wire.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No TCP connection could be made, or the TLS handshake failed;
    /// openraft backs off before retrying.
    #[error("cannot connect to peer {addr}: {source}")]
    Connect {
        /// The peer's raft address.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The peer refused the handshake (wrong cluster token or protocol).
    #[error("peer {addr} refused the connection: {reason}")]
    Refused {
        /// The peer's raft address.
        addr: String,
        /// The peer's reason.
        reason: String,
    },
    /// Sending or receiving a frame failed; the connection was dropped.
    #[error("lost the connection to peer {addr}: {source}")]
    Frame {
        /// The peer's raft address.
        addr: String,
        /// What went wrong with the frame.
        source: FrameError,
    },
    /// The peer answered with a response of the wrong kind.
    #[error("peer {addr} answered a {request} request with a {response} response")]
    UnexpectedResponse {
        /// The peer's raft address.
        addr: String,
        /// The request that was sent.
        request: &'static str,
        /// The kind of response that came back.
        response: &'static str,
    },
    /// openraft asked for its own chunked snapshot transfer, which this
    /// transport never uses: snapshots go through `full_snapshot`.
    #[error("openraft's chunked snapshot install is not used; snapshots go through full_snapshot")]
    ChunkedSnapshotUnsupported,
    /// The peer did not take a piece of a snapshot.
    #[error("peer {addr} refused a snapshot chunk: {reason}")]
    SnapshotRefused {
        /// The peer's raft address.
        addr: String,
        /// The peer's reason.
        reason: String,
    },
    /// The local snapshot file could not be read.
    #[error("reading the snapshot to send: {0}")]
    SnapshotRead(std::io::Error),
}

/// An RPC failure: either a [`PeerError`] or a deadline.
enum CallError {
    Peer(PeerError),
    Timeout(Duration),
}

impl From<PeerError> for CallError {
    fn from(e: PeerError) -> Self {
        Self::Peer(e)
    }
}

/// Idle connections to one peer address.
type Pool = Arc<Mutex<Vec<Frames<PeerStream>>>>;

/// Builds a [`PeerClient`] per target for openraft. Clones share the
/// connection pools, so a connection opened by one client is reused by the
/// next client for the same address.
#[derive(Clone)]
pub struct NetworkFactory {
    id: NodeId,
    token: Option<Arc<str>>,
    tls: Option<TlsConnector>,
    pools: Arc<Mutex<HashMap<String, Pool>>>,
    snapshot_chunk_bytes: usize,
}

impl fmt::Debug for NetworkFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkFactory")
            .field("id", &self.id)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl NetworkFactory {
    /// A factory for the node `id` (used in timeout reports). `token`, if
    /// set, is presented to every peer in the [`Hello`]; peers configured
    /// with a token refuse a connection that does not present the same one.
    pub fn new(id: NodeId, token: Option<String>) -> Self {
        Self {
            id,
            token: token.map(Arc::from),
            tls: None,
            pools: Arc::default(),
            snapshot_chunk_bytes: SNAPSHOT_CHUNK_BYTES,
        }
    }

    /// Sends snapshots in pieces of `bytes` (at least 1).
    #[must_use]
    pub fn with_snapshot_chunk_bytes(mut self, bytes: usize) -> Self {
        self.snapshot_chunk_bytes = bytes.max(1);
        self
    }

    /// Dials peers over TLS with `connector`: a peer's certificate must
    /// verify against the CA and name the host of its raft address, and the
    /// connector presents this node's certificate.
    pub fn with_tls(mut self, connector: TlsConnector) -> Self {
        self.tls = Some(connector);
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    /// Cheap: it only looks up the shared pool for the target's address.
    /// Connections are dialed by the first RPC that finds no idle one.
    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        let pool = self
            .pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(node.raft_addr.clone())
            .or_default()
            .clone();
        PeerClient {
            id: self.id,
            target,
            node: node.clone(),
            token: self.token.clone(),
            tls: self.tls.clone(),
            pool,
            snapshot_chunk_bytes: self.snapshot_chunk_bytes,
        }
    }
}

/// The frame of an append-entries request, encoded once for several peers.
///
/// # Errors
/// When the request cannot be encoded.
pub fn append_entries_frame(rpc: AppendEntriesRequest<TypeConfig>) -> Result<Bytes, FrameError> {
    encode_body(&PeerRequest::AppendEntries(rpc))
}

fn put_idle(pool: &Pool, mut conn: Frames<PeerStream>) {
    trim_buffers(&mut conn);
    let mut idle = pool.lock().unwrap_or_else(PoisonError::into_inner);
    if idle.len() < MAX_IDLE_PER_PEER {
        idle.push(conn);
    }
}

/// An append-entries request written by
/// [`PeerClient::send_append_entries_now`], whose answer is still to read.
pub struct SentAppend {
    pool: Pool,
    conn: Frames<PeerStream>,
}

impl fmt::Debug for SentAppend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentAppend").finish_non_exhaustive()
    }
}

impl SentAppend {
    /// Reads the answer within `timeout` and gives the connection back to
    /// the pool (or closes it after an error).
    ///
    /// # Errors
    /// A description of what failed: the frame, the peer, or the deadline.
    pub async fn answer(
        mut self,
        timeout: Duration,
    ) -> Result<AppendEntriesResponse<NodeId>, String> {
        let response = tokio::time::timeout(
            timeout,
            read_frame::<_, PeerResponse>(&mut self.conn, MAX_FRAME_LEN),
        )
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
        put_idle(&self.pool, self.conn);
        match response {
            PeerResponse::AppendEntries(Ok(answer)) => Ok(answer),
            PeerResponse::AppendEntries(Err(e)) => Err(e.to_string()),
            other => Err(format!("unexpected answer: {}", other.kind())),
        }
    }
}

/// openraft's handle for sending RPCs to one peer. Each RPC borrows an idle
/// connection from the peer's pool (or dials one), sends one frame, reads
/// one frame, and returns the connection; a connection that saw any error
/// or timeout is closed instead.
pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    node: NodeInfo,
    token: Option<Arc<str>>,
    tls: Option<TlsConnector>,
    pool: Pool,
    pub(super) snapshot_chunk_bytes: usize,
}

impl fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerClient")
            .field("id", &self.id)
            .field("target", &self.target)
            .field("addr", &self.node.raft_addr)
            .finish_non_exhaustive()
    }
}

impl PeerClient {
    fn addr(&self) -> &str {
        &self.node.raft_addr
    }

    /// Sends `request` and waits for its response, within `timeout`.
    async fn call(
        &self,
        request: &PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, CallError> {
        let body = encode_body(request).map_err(|source| PeerError::Frame {
            addr: self.addr().to_owned(),
            source,
        })?;
        // On timeout the exchange is dropped with its connection, which
        // may hold half a frame and must not be reused.
        tokio::time::timeout(timeout, self.exchange(body))
            .await
            .map_err(|_| CallError::Timeout(timeout))?
            .map_err(CallError::Peer)
    }

    async fn exchange(&self, body: Bytes) -> Result<PeerResponse, PeerError> {
        let mut conn = match self.take_idle() {
            Some(conn) => conn,
            None => self.dial().await?,
        };
        let frame_err = |source| PeerError::Frame {
            addr: self.addr().to_owned(),
            source,
        };
        conn.send(body).await.map_err(frame_err)?;
        let response = read_frame(&mut conn, MAX_FRAME_LEN)
            .await
            .map_err(frame_err)?;
        self.put_idle(conn);
        Ok(response)
    }

    /// Writes `frame` (an [`append_entries_frame`]) on an idle connection,
    /// now, without waiting: `None` when no connection is idle or the socket
    /// would make the write wait (a dial or a stalled peer must not hold the
    /// caller). The returned [`SentAppend`] reads the answer.
    pub fn send_append_entries_now(&self, frame: Bytes) -> Option<SentAppend> {
        use futures::FutureExt as _;
        let mut conn = self.take_idle()?;
        // A write that does not finish at once is dropped with its
        // connection, which may hold half a frame.
        match conn.send(frame).now_or_never() {
            Some(Ok(())) => Some(SentAppend {
                pool: self.pool.clone(),
                conn,
            }),
            _ => None,
        }
    }

    /// Takes an idle connection that the peer has not closed meanwhile.
    fn take_idle(&self) -> Option<Frames<PeerStream>> {
        let mut idle = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        // Between RPCs the peer never sends anything: a connection that is
        // not quiet was closed by the peer (e.g. it restarted) or broke the
        // protocol. Either way it is dropped.
        std::iter::from_fn(|| idle.pop())
            .find(|conn| conn.read_buffer().is_empty() && conn.get_ref().is_quiet())
    }

    fn put_idle(&self, conn: Frames<PeerStream>) {
        put_idle(&self.pool, conn);
    }

    /// Opens a connection and performs the [`Hello`] handshake.
    async fn dial(&self) -> Result<Frames<PeerStream>, PeerError> {
        let addr = self.addr();
        let connect_err = |source| PeerError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let mut conn = PeerStream::connect(addr, self.tls.as_ref())
            .await
            .map(frames)
            .map_err(connect_err)?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            token: self.token.as_deref().map(str::to_owned),
        };
        let frame_err = |source| PeerError::Frame {
            addr: addr.to_owned(),
            source,
        };
        write_frame(&mut conn, &hello).await.map_err(frame_err)?;
        match read_frame(&mut conn, MAX_HELLO_LEN).await {
            Ok(HelloReply::Accepted) => Ok(conn),
            Ok(HelloReply::Refused { reason }) => Err(PeerError::Refused {
                addr: addr.to_owned(),
                reason,
            }),
            // A peer that closes during the handshake is not serving yet
            // (or is not a raftwasm peer port): back off like a refused dial.
            Err(FrameError::Closed) => Err(connect_err(std::io::Error::from(
                std::io::ErrorKind::ConnectionAborted,
            ))),
            Err(source) => Err(frame_err(source)),
        }
    }

    fn timeout(&self, action: RPCTypes, timeout: Duration) -> Timeout<NodeId> {
        Timeout {
            action,
            id: self.id,
            target: self.target,
            timeout,
        }
    }

    fn unexpected(&self, request: &'static str, response: &PeerResponse) -> PeerError {
        PeerError::UnexpectedResponse {
            addr: self.addr().to_owned(),
            request,
            response: response.kind(),
        }
    }

    /// Maps a failed append-entries or vote call onto openraft's error.
    fn rpc_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        err: CallError,
    ) -> RPCError<NodeId, NodeInfo, E> {
        match err {
            CallError::Timeout(t) => RPCError::Timeout(self.timeout(action, t)),
            CallError::Peer(e) => match e {
                PeerError::Connect { .. } | PeerError::Refused { .. } => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                PeerError::Frame {
                    source: FrameError::TooLarge { .. },
                    ..
                } if action == RPCTypes::AppendEntries => {
                    // Only our own request can be too large here (a peer's
                    // response to append-entries is tiny); openraft halves
                    // the batch and retries.
                    RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(1))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            },
        }
    }

    fn streaming_error(&self, err: CallError) -> StreamingError<TypeConfig, Fatal<NodeId>> {
        match err {
            CallError::Timeout(t) => {
                StreamingError::Timeout(self.timeout(RPCTypes::InstallSnapshot, t))
            }
            CallError::Peer(e) => match e {
                PeerError::Connect { .. } | PeerError::Refused { .. } => {
                    StreamingError::Unreachable(Unreachable::new(&e))
                }
                _ => StreamingError::Network(NetworkError::new(&e)),
            },
        }
    }
}

/// How long a snapshot of `len` bytes may take to transfer and install.
fn snapshot_timeout(len: usize) -> Duration {
    SNAPSHOT_BASE_TIMEOUT + Duration::from_secs(len as u64 / SNAPSHOT_BYTES_PER_SECOND)
}

/// How long an AppendEntries carrying `entries` may take: openraft's time
/// to live (the heartbeat interval) plus time for the payload to travel and
/// be flushed at [`SNAPSHOT_BYTES_PER_SECOND`]. Without the allowance, a
/// payload slower than one heartbeat would time out on every retry and the
/// follower would never catch up.
fn append_timeout(ttl: Duration, entries: &[typ::Entry]) -> Duration {
    let bytes: usize = entries
        .iter()
        .map(|entry| match &entry.payload {
            openraft::EntryPayload::Normal(request) => {
                request.ops.iter().map(crate::raft::Op::payload_len).sum()
            }
            _ => 0,
        })
        .sum();
    ttl + Duration::from_micros(bytes as u64 * 1_000_000 / SNAPSHOT_BYTES_PER_SECOND)
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, typ::RpcError> {
        let entries = rpc.entries.len() as u64;
        let timeout = append_timeout(option.hard_ttl(), &rpc.entries);
        let request = PeerRequest::AppendEntries(rpc);
        match self.call(&request, timeout).await {
            Ok(PeerResponse::AppendEntries(Ok(resp))) => Ok(resp),
            Ok(PeerResponse::AppendEntries(Err(e))) => Err(RPCError::RemoteError(
                RemoteError::new_with_node(self.target, self.node.clone(), e),
            )),
            Ok(other) => Err(RPCError::Network(NetworkError::new(
                &self.unexpected("append-entries", &other),
            ))),
            Err(e) => match self.rpc_error(RPCTypes::AppendEntries, e) {
                // Ask openraft for half the entries; with one entry left it
                // treats the error as unreachable.
                RPCError::PayloadTooLarge(_) => Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint((entries / 2).max(1)),
                )),
                other => Err(other),
            },
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, typ::RpcError> {
        match self.call(&PeerRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Vote(Ok(resp))) => Ok(resp),
            Ok(PeerResponse::Vote(Err(e))) => Err(RPCError::RemoteError(
                RemoteError::new_with_node(self.target, self.node.clone(), e),
            )),
            Ok(other) => Err(RPCError::Network(NetworkError::new(
                &self.unexpected("vote", &other),
            ))),
            Err(e) => Err(self.rpc_error(RPCTypes::Vote, e)),
        }
    }

    /// Never used: [`PeerClient::full_snapshot`] sends snapshots whole.
    /// Returns an `Unreachable` error so that a stray call backs off.
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, typ::RpcError<InstallSnapshotError>> {
        Err(RPCError::Unreachable(Unreachable::new(
            &PeerError::ChunkedSnapshotUnsupported,
        )))
    }

    /// Sends the snapshot file in [`SnapshotChunk`]s, one at a time, and
    /// waits until the peer has installed it. Each piece gets one minute
    /// plus one second per 8 MiB, and the last (which the peer checks and
    /// installs before answering) that much for the whole file; openraft's
    /// chunked default would give the install only the short
    /// install-snapshot TTL. Gives up as soon as `cancel` resolves.
    async fn full_snapshot(
        &mut self,
        vote: typ::Vote,
        snapshot: typ::Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        tokio::pin!(cancel);
        let typ::Snapshot {
            meta,
            snapshot: mut file,
        } = snapshot;
        let read_err = |e| self.streaming_error(CallError::Peer(PeerError::SnapshotRead(e)));
        let len = file
            .seek(std::io::SeekFrom::End(0))
            .await
            .map_err(read_err)?;
        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(read_err)?;
        let mut offset = 0u64;
        loop {
            let want = (len - offset).min(self.snapshot_chunk_bytes as u64) as usize;
            let mut data = vec![0; want];
            file.read_exact(&mut data).await.map_err(read_err)?;
            let done = offset + want as u64 == len;
            let timeout = snapshot_timeout(if done { len as usize } else { want });
            let request = PeerRequest::SnapshotChunk(SnapshotChunk {
                vote,
                meta: meta.clone(),
                offset,
                data,
                done,
            });
            let response = tokio::select! {
                biased;
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                response = self.call(&request, timeout) => response,
            };
            match response {
                Ok(PeerResponse::SnapshotChunk(Ok(Some(resp)))) if done => return Ok(resp),
                Ok(PeerResponse::SnapshotChunk(Ok(None))) if !done => offset += want as u64,
                Ok(PeerResponse::SnapshotChunk(Err(SnapshotChunkError::Fatal(fatal)))) => {
                    return Err(StreamingError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        self.node.clone(),
                        fatal,
                    )));
                }
                Ok(PeerResponse::SnapshotChunk(Err(SnapshotChunkError::Refused(reason)))) => {
                    let refused = PeerError::SnapshotRefused {
                        addr: self.addr().to_owned(),
                        reason,
                    };
                    return Err(StreamingError::Network(NetworkError::new(&refused)));
                }
                Ok(other) => {
                    return Err(StreamingError::Network(NetworkError::new(
                        &self.unexpected("snapshot-chunk", &other),
                    )));
                }
                Err(e) => return Err(self.streaming_error(e)),
            }
        }
    }
}

#[cfg(test)]
impl PeerClient {
    /// The idle connections in this client's pool.
    pub(super) fn idle_connections(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether `self` and `other` share one pool.
    pub(super) fn shares_pool_with(&self, other: &PeerClient) -> bool {
        Arc::ptr_eq(&self.pool, &other.pool)
    }
}
