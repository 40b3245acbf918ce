//! The peer transport's client side and its wire format: `NetworkFactory`
//! hands openraft a `PeerClient` per target, which sends Raft RPCs over
//! pooled, long-lived TCP connections (mutual TLS with `--tls-*`, see
//! [`PeerStream`]) as length-prefixed rmp-serde frames.
//!
//! The server side is [`super::peer_server`]; both use the frame helpers and
//! message types defined here.
//!
//! Snapshots travel as a sequence of [`SnapshotChunk`]s read from the
//! snapshot file, each answered before the next is sent, so no frame and no
//! buffer on either side grows with the size of the state.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use super::peer_stream::PeerStream;
use super::{NodeId, NodeInfo, TypeConfig, typ};

/// Version of the peer protocol, sent in [`Hello`]. A node refuses a peer
/// that speaks another version instead of misreading its frames.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame body either side sends or accepts. Snapshots travel in
/// chunks, so this bounds one AppendEntries batch, not the state.
pub const MAX_FRAME_LEN: usize = 1 << 30;

/// The snapshot bytes sent per [`SnapshotChunk`] unless the node is
/// configured otherwise (`--snapshot-chunk-bytes`).
pub const SNAPSHOT_CHUNK_BYTES: usize = 4 << 20;

/// Largest [`Hello`] frame a server reads before the peer is authenticated.
pub const MAX_HELLO_LEN: usize = 64 * 1024;

/// Idle connections kept per peer address; more are closed when returned.
const MAX_IDLE_PER_PEER: usize = 8;

/// Time allowed for a whole snapshot transfer before the per-byte
/// allowance of [`SNAPSHOT_BYTES_PER_SECOND`] is added.
const SNAPSHOT_BASE_TIMEOUT: Duration = Duration::from_secs(60);

/// The slowest transfer-and-install rate a snapshot is given time for.
const SNAPSHOT_BYTES_PER_SECOND: u64 = 8 << 20;

/// The first frame a client sends on a new connection. The server answers
/// with a [`HelloReply`] and serves requests only if it accepted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The cluster token, if the client has one. A server configured with a
    /// token refuses a connection whose token differs.
    pub token: Option<String>,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The server's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The connection may carry requests.
    Accepted,
    /// The server will close the connection; `reason` says why.
    Refused {
        /// What the operator should fix, e.g. the cluster token.
        reason: String,
    },
}

/// One Raft RPC, as sent from a leader or candidate to a peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Replicate entries (or a heartbeat when empty).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Ask for a vote.
    Vote(VoteRequest<NodeId>),
    /// One piece of a snapshot; the last one asks the peer to install it.
    SnapshotChunk(SnapshotChunk),
}

/// A piece of a snapshot file. The pieces of one snapshot are sent in
/// order, one at a time, starting at offset 0; the receiver refuses a piece
/// that does not continue what it has.
#[derive(Clone, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The leader's vote; the follower refuses the snapshot if its own
    /// vote is greater.
    pub vote: typ::Vote,
    /// Which log id and membership the snapshot covers.
    pub meta: typ::SnapshotMeta,
    /// Where `data` starts in the snapshot file.
    pub offset: u64,
    /// The bytes of the file from `offset`.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Whether this is the last piece: the receiver then checks and
    /// installs the snapshot before it answers.
    pub done: bool,
}

// Written by hand so that logging a piece prints its size, not its bytes.
impl fmt::Debug for SnapshotChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotChunk")
            .field("vote", &self.vote)
            .field("meta", &self.meta)
            .field("offset", &self.offset)
            .field("data_len", &self.data.len())
            .field("done", &self.done)
            .finish()
    }
}

/// Why a peer did not take a [`SnapshotChunk`].
#[derive(Debug, Serialize, Deserialize)]
pub enum SnapshotChunkError {
    /// The peer's Raft stopped.
    Fatal(Fatal<NodeId>),
    /// The piece does not continue the snapshot being received, or the
    /// peer could not store it; the leader sends the snapshot again later.
    Refused(String),
}

/// The answer to a [`PeerRequest`], with the same variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// Answer to [`PeerRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, typ::RaftError>),
    /// Answer to [`PeerRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, typ::RaftError>),
    /// Answer to [`PeerRequest::SnapshotChunk`]: the peer's vote once the
    /// last piece is installed, nothing for the pieces before.
    SnapshotChunk(Result<Option<SnapshotResponse<NodeId>>, SnapshotChunkError>),
}

impl PeerResponse {
    fn kind(&self) -> &'static str {
        match self {
            Self::AppendEntries(_) => "append-entries",
            Self::Vote(_) => "vote",
            Self::SnapshotChunk(_) => "snapshot-chunk",
        }
    }
}

/// Why a frame could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between two frames.
    #[error("connection closed by the peer")]
    Closed,
    /// The socket failed, or closed in the middle of a frame.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame is larger than the receiver's or sender's limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The frame body's length.
        len: usize,
        /// The limit it exceeds.
        max: usize,
    },
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The frame body is not a valid message of the expected type.
    #[error("malformed frame: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encodes `msg` as one frame: a `u32` big-endian body length, then the
/// compact rmp-serde body.
///
/// # Errors
///
/// [`FrameError::Encode`] if serialization fails, [`FrameError::TooLarge`]
/// if the body exceeds [`MAX_FRAME_LEN`].
pub fn encode_frame<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; 4];
    rmp_serde::encode::write(&mut frame, msg)?;
    let len = frame.len() - 4;
    let len32 = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_FRAME_LEN)
        .ok_or(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        })?;
    frame[..4].copy_from_slice(&len32.to_be_bytes());
    Ok(frame)
}

/// Decodes a frame body (without its length prefix).
///
/// # Errors
///
/// [`FrameError::Decode`] if `body` is not a valid `T`.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(rmp_serde::from_slice(body)?)
}

/// Writes one message as a frame (see [`encode_frame`]).
///
/// # Errors
///
/// Any [`FrameError`] from encoding, or [`FrameError::Io`] from the socket.
pub async fn write_frame<W, T>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize + ?Sized,
{
    let frame = encode_frame(msg)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame and decodes its body, refusing a body longer than
/// `max_len` before reading it.
///
/// # Errors
///
/// [`FrameError::Closed`] if the stream ends cleanly before the frame,
/// [`FrameError::Io`] if it fails or ends inside the frame,
/// [`FrameError::TooLarge`] or [`FrameError::Decode`] for a bad frame.
pub async fn read_frame<R, T>(reader: &mut R, max_len: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
        match reader.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Err(FrameError::Closed),
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            n => filled += n,
        }
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    // Grow the buffer as bytes arrive instead of trusting the length
    // prefix with one large allocation.
    let mut body = Vec::with_capacity(len.min(1 << 20));
    let read = reader.take(len as u64).read_to_end(&mut body).await?;
    if read < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    decode_body(&body)
}

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
type Pool = Arc<Mutex<Vec<PeerStream>>>;

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
    snapshot_chunk_bytes: usize,
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
        let frame = encode_frame(request).map_err(|source| PeerError::Frame {
            addr: self.addr().to_owned(),
            source,
        })?;
        // On timeout the exchange is dropped with its connection, which
        // may hold half a frame and must not be reused.
        tokio::time::timeout(timeout, self.exchange(&frame))
            .await
            .map_err(|_| CallError::Timeout(timeout))?
            .map_err(CallError::Peer)
    }

    async fn exchange(&self, frame: &[u8]) -> Result<PeerResponse, PeerError> {
        let mut conn = match self.take_idle() {
            Some(conn) => conn,
            None => self.dial().await?,
        };
        let frame_err = |source| PeerError::Frame {
            addr: self.addr().to_owned(),
            source,
        };
        // The flush pushes out what TLS still buffers.
        let written = async {
            conn.write_all(frame).await?;
            conn.flush().await
        };
        written.await.map_err(|e| frame_err(e.into()))?;
        let response = read_frame(&mut conn, MAX_FRAME_LEN)
            .await
            .map_err(frame_err)?;
        self.put_idle(conn);
        Ok(response)
    }

    /// Takes an idle connection that the peer has not closed meanwhile.
    fn take_idle(&self) -> Option<PeerStream> {
        let mut idle = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        // Between RPCs the peer never sends anything: a connection that is
        // not quiet was closed by the peer (e.g. it restarted) or broke the
        // protocol. Either way it is dropped.
        std::iter::from_fn(|| idle.pop()).find(PeerStream::is_quiet)
    }

    fn put_idle(&self, conn: PeerStream) {
        let mut idle = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_PER_PEER {
            idle.push(conn);
        }
    }

    /// Opens a connection and performs the [`Hello`] handshake.
    async fn dial(&self) -> Result<PeerStream, PeerError> {
        let addr = self.addr();
        let connect_err = |source| PeerError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let mut conn = PeerStream::connect(addr, self.tls.as_ref())
            .await
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
                request.ops.iter().map(super::Op::payload_len).sum()
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
mod tests {
    use std::collections::BTreeMap;

    use openraft::error::RaftError;
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, StoredMembership};

    use super::*;
    use crate::raft::snapshot_file::SnapshotFile;
    use crate::raft::{Op, Request};

    fn log_id(term: u64, index: u64) -> typ::LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    /// Encodes `msg` as a frame and reads it back through the async reader.
    async fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> anyhow::Result<T> {
        let frame = encode_frame(msg)?;
        let len = u32::from_be_bytes(frame[..4].try_into()?) as usize;
        assert_eq!(len, frame.len() - 4, "length prefix covers the body");
        let mut reader = frame.as_slice();
        let back = read_frame(&mut reader, MAX_FRAME_LEN).await?;
        assert!(reader.is_empty(), "the whole frame is consumed");
        Ok(back)
    }

    /// Compares through `Debug`: the openraft request types implement it
    /// but not `PartialEq`.
    fn same<T: fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[tokio::test]
    async fn append_entries_request_survives_a_frame_round_trip() -> anyhow::Result<()> {
        let entries = vec![
            typ::Entry {
                log_id: log_id(2, 5),
                payload: EntryPayload::Blank,
            },
            typ::Entry {
                log_id: log_id(2, 6),
                payload: EntryPayload::Normal(Request {
                    time_ms: 1_700_000_000_000,
                    ops: vec![Op::Apply(b"set k v".to_vec())],
                }),
            },
            typ::Entry {
                log_id: log_id(2, 7),
                payload: EntryPayload::Membership(Membership::new(
                    vec![[1, 2].into()],
                    BTreeMap::from([
                        (1, NodeInfo::default()),
                        (
                            2,
                            NodeInfo {
                                api_addr: "127.0.0.1:6001".into(),
                                raft_addr: "127.0.0.1:7001".into(),
                            },
                        ),
                    ]),
                )),
            },
        ];
        let request = PeerRequest::AppendEntries(AppendEntriesRequest {
            vote: openraft::Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(1, 4)),
            entries,
            leader_commit: Some(log_id(1, 4)),
        });
        let back = round_trip(&request).await?;
        assert!(same(&request, &back), "{request:?} != {back:?}");
        Ok(())
    }

    #[tokio::test]
    async fn vote_request_survives_a_frame_round_trip() -> anyhow::Result<()> {
        let request = PeerRequest::Vote(VoteRequest::new(
            openraft::Vote::new(3, 2),
            Some(log_id(2, 9)),
        ));
        let back = round_trip(&request).await?;
        assert!(same(&request, &back), "{request:?} != {back:?}");
        Ok(())
    }

    #[tokio::test]
    async fn snapshot_chunk_survives_a_frame_round_trip() -> anyhow::Result<()> {
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let request = PeerRequest::SnapshotChunk(SnapshotChunk {
            vote: openraft::Vote::new_committed(4, 1),
            meta: typ::SnapshotMeta {
                last_log_id: Some(log_id(4, 100)),
                last_membership: StoredMembership::new(
                    Some(log_id(1, 1)),
                    Membership::new(vec![[1].into()], BTreeMap::from([(1, NodeInfo::default())])),
                ),
                snapshot_id: "4-100-1".into(),
            },
            offset: 1 << 40,
            data: data.clone(),
            done: true,
        });
        let frame = encode_frame(&request)?;
        // serde_bytes keeps the payload a msgpack binary, not an array of
        // integers: the frame is barely larger than the data.
        assert!(
            frame.len() < data.len() + 200,
            "frame is {} bytes",
            frame.len()
        );
        let back = round_trip(&request).await?;
        assert!(same(&request, &back), "{request:?} != {back:?}");
        assert!(
            matches!(&back, PeerRequest::SnapshotChunk(chunk) if chunk.data == data),
            "snapshot bytes changed in transit"
        );
        Ok(())
    }

    #[tokio::test]
    async fn responses_and_handshake_survive_a_frame_round_trip() -> anyhow::Result<()> {
        let responses = [
            PeerResponse::AppendEntries(Ok(AppendEntriesResponse::Success)),
            PeerResponse::AppendEntries(Err(RaftError::Fatal(Fatal::Stopped))),
            PeerResponse::Vote(Ok(VoteResponse::new(
                openraft::Vote::new(3, 2),
                Some(log_id(2, 9)),
                true,
            ))),
            PeerResponse::SnapshotChunk(Ok(Some(SnapshotResponse::new(
                openraft::Vote::new_committed(4, 1),
            )))),
            PeerResponse::SnapshotChunk(Ok(None)),
            PeerResponse::SnapshotChunk(Err(SnapshotChunkError::Fatal(Fatal::Panicked))),
            PeerResponse::SnapshotChunk(Err(SnapshotChunkError::Refused("out of order".into()))),
        ];
        for response in &responses {
            let back = round_trip(response).await?;
            assert!(same(response, &back), "{response:?} != {back:?}");
        }
        let hello = Hello {
            version: PROTOCOL_VERSION,
            token: Some("secret".into()),
        };
        assert_eq!(round_trip(&hello).await?, hello);
        let refused = HelloReply::Refused {
            reason: "wrong token".into(),
        };
        assert_eq!(round_trip(&refused).await?, refused);
        Ok(())
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_refused() -> anyhow::Result<()> {
        let frame = encode_frame(&Hello {
            version: PROTOCOL_VERSION,
            token: Some("x".repeat(100)),
        })?;
        let result: Result<Hello, _> = read_frame(&mut frame.as_slice(), 10).await;
        assert!(matches!(result, Err(FrameError::TooLarge { max: 10, .. })));

        let result: Result<Hello, _> = read_frame(&mut &frame[..frame.len() - 1], 1024).await;
        assert!(matches!(result, Err(FrameError::Io(_))), "{result:?}");

        let result: Result<Hello, _> = read_frame(&mut &frame[..2], 1024).await;
        assert!(matches!(result, Err(FrameError::Io(_))), "{result:?}");

        let result: Result<Hello, _> = read_frame(&mut &[][..], 1024).await;
        assert!(matches!(result, Err(FrameError::Closed)), "{result:?}");

        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xc1, 0xc1, 0xc1]);
        let result: Result<PeerRequest, _> = read_frame(&mut garbage.as_slice(), 1024).await;
        assert!(matches!(result, Err(FrameError::Decode(_))), "{result:?}");
        Ok(())
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
        tokio::spawn(crate::raft::peer_server::serve_with(
            listener,
            token,
            None,
            crate::raft::peer_server::PeerLimits::default(),
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
            PeerRequest::SnapshotChunk(chunk) => PeerResponse::SnapshotChunk(Ok(chunk
                .done
                .then(|| SnapshotResponse::new(chunk.vote)))),
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
        client
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
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
        assert!(
            Arc::ptr_eq(&first.pool, &second.pool),
            "clients share the pool"
        );
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
        tokio::spawn(crate::raft::peer_server::serve_with(
            listener,
            None,
            None,
            crate::raft::peer_server::PeerLimits::default(),
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
                PeerResponse::SnapshotChunk(Ok(chunk
                    .done
                    .then(|| SnapshotResponse::new(chunk.vote))))
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
}

/// Property tests of the wire format: a peer (or anyone who reaches the peer
/// port) can send any bytes; they decode or are refused without a panic or
/// an allocation the length prefix asks for, and every message the node
/// sends reads back as it was.
#[cfg(test)]
mod proptests {
    use std::collections::BTreeSet;

    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership};
    use proptest::prelude::*;

    use super::*;
    use crate::raft::{Op, Request};

    /// Reads one frame from `bytes`; the reader never waits, so this never
    /// blocks.
    fn read<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, FrameError> {
        let mut reader = bytes;
        futures::executor::block_on(read_frame(&mut reader, max_len))
    }

    /// Compares through `Debug`: the openraft request types implement it
    /// but not `PartialEq`.
    fn same<T: fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..max)
    }

    fn log_id() -> impl Strategy<Value = typ::LogId> {
        (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(term, node, index)| LogId::new(CommittedLeaderId::new(term, node), index))
    }

    fn vote() -> impl Strategy<Value = typ::Vote> {
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(term, node, committed)| {
            if committed {
                openraft::Vote::new_committed(term, node)
            } else {
                openraft::Vote::new(term, node)
            }
        })
    }

    fn node_info() -> impl Strategy<Value = NodeInfo> {
        (any::<String>(), any::<String>()).prop_map(|(api_addr, raft_addr)| NodeInfo {
            api_addr,
            raft_addr,
        })
    }

    fn membership() -> impl Strategy<Value = Membership<NodeId, NodeInfo>> {
        prop::collection::btree_map(0..16u64, node_info(), 1..5).prop_map(|nodes| {
            let voters: BTreeSet<NodeId> = nodes.keys().copied().collect();
            Membership::new(vec![voters], nodes)
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            bytes(64).prop_map(Op::Apply),
            bytes(64).prop_map(|module| Op::StageGuest { module }),
            (any::<String>(), any::<bool>())
                .prop_map(|(hash, force)| Op::ActivateGuest { hash, force }),
        ]
    }

    fn entry() -> impl Strategy<Value = typ::Entry> {
        let payload = prop_oneof![
            Just(EntryPayload::Blank),
            (any::<u64>(), prop::collection::vec(op(), 0..4))
                .prop_map(|(time_ms, ops)| EntryPayload::Normal(Request { time_ms, ops })),
            membership().prop_map(EntryPayload::Membership),
        ];
        (log_id(), payload).prop_map(|(log_id, payload)| typ::Entry { log_id, payload })
    }

    fn request() -> impl Strategy<Value = PeerRequest> {
        prop_oneof![
            (
                vote(),
                prop::option::of(log_id()),
                prop::collection::vec(entry(), 0..4),
                prop::option::of(log_id()),
            )
                .prop_map(|(vote, prev_log_id, entries, leader_commit)| {
                    PeerRequest::AppendEntries(AppendEntriesRequest {
                        vote,
                        prev_log_id,
                        entries,
                        leader_commit,
                    })
                }),
            (vote(), prop::option::of(log_id()))
                .prop_map(|(vote, last)| PeerRequest::Vote(VoteRequest::new(vote, last))),
            (
                vote(),
                prop::option::of(log_id()),
                prop::option::of(log_id()),
                membership(),
                any::<String>(),
                (any::<u64>(), bytes(256), any::<bool>()),
            )
                .prop_map(
                    |(vote, last_log_id, membership_log_id, membership, snapshot_id, piece)| {
                        let (offset, data, done) = piece;
                        PeerRequest::SnapshotChunk(SnapshotChunk {
                            vote,
                            meta: typ::SnapshotMeta {
                                last_log_id,
                                last_membership: typ::StoredMembership::new(
                                    membership_log_id,
                                    membership,
                                ),
                                snapshot_id,
                            },
                            offset,
                            data,
                            done,
                        })
                    }
                ),
        ]
    }

    fn hello() -> impl Strategy<Value = Hello> {
        (any::<u32>(), prop::option::of(any::<String>()))
            .prop_map(|(version, token)| Hello { version, token })
    }

    /// Tries to decode `body` as every message type the peer port reads.
    fn decode_as_everything(body: &[u8]) {
        let _ = decode_body::<Hello>(body);
        let _ = decode_body::<HelloReply>(body);
        let _ = decode_body::<PeerRequest>(body);
        let _ = decode_body::<PeerResponse>(body);
    }

    proptest! {
        #![proptest_config(crate::proptest_config(1000))]

        #[test]
        fn arbitrary_bodies_never_panic_the_decoder(body in bytes(256)) {
            decode_as_everything(&body);
        }

        #[test]
        fn arbitrary_frames_never_panic_the_reader(
            frame in bytes(256),
            max_len in 0..512usize,
        ) {
            let _ = read::<PeerRequest>(&frame, max_len);
            let _ = read::<Hello>(&frame, max_len);
        }

        #[test]
        fn a_length_prefix_beyond_the_bytes_sent_is_an_error(
            len in 1..=u32::MAX,
            body in bytes(64),
        ) {
            // A prefix of up to 4 GiB must neither be trusted with an
            // allocation nor wait for bytes that never come.
            prop_assume!((len as usize) > body.len());
            let mut frame = len.to_be_bytes().to_vec();
            frame.extend_from_slice(&body);
            let result = read::<PeerRequest>(&frame, MAX_FRAME_LEN);
            prop_assert!(
                matches!(result, Err(FrameError::Io(_) | FrameError::TooLarge { .. })),
                "{result:?}"
            );
        }

        #[test]
        fn requests_survive_a_frame_round_trip(request in request()) {
            let frame = encode_frame(&request).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back: PeerRequest = read(&frame, MAX_FRAME_LEN)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(same(&request, &back), "{request:?} != {back:?}");
        }

        #[test]
        fn hellos_survive_a_frame_round_trip(hello in hello()) {
            let frame = encode_frame(&hello).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back: Hello = read(&frame, MAX_HELLO_LEN)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, hello);
        }

        #[test]
        fn a_request_body_cut_short_is_an_error(
            request in request(),
            cut in any::<prop::sample::Index>(),
        ) {
            // msgpack is self-delimiting: no strict prefix of a message is
            // a whole message.
            let frame = encode_frame(&request).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let body = &frame[4..];
            let cut = cut.index(body.len());
            let result = decode_body::<PeerRequest>(&body[..cut]);
            prop_assert!(matches!(result, Err(FrameError::Decode(_))), "{result:?}");
        }

        #[test]
        fn mutated_request_frames_never_panic_the_reader(
            request in request(),
            writes in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut frame = encode_frame(&request).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let len = frame.len();
            for (at, byte) in writes {
                frame[at.index(len)] = byte;
            }
            let _ = read::<PeerRequest>(&frame, MAX_FRAME_LEN);
            decode_as_everything(&frame[4..]);
        }
    }
}
