//! The peer protocol's wire format: the messages ([`Hello`], [`PeerRequest`],
//! [`PeerResponse`], [`SnapshotChunk`]) and their framing, a `u32`
//! big-endian length prefix (tokio-util's [`LengthDelimitedCodec`]) before a
//! compact rmp-serde body.
//!
//! Snapshots travel as a sequence of [`SnapshotChunk`]s, each answered before
//! the next is sent, so no frame and no buffer on either side grows with the
//! size of the state.

use std::fmt;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt as _, StreamExt as _};
use openraft::error::Fatal;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

use crate::raft::{NodeId, TypeConfig, typ};

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
    /// The variant's name, for error messages.
    pub(super) fn kind(&self) -> &'static str {
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

impl From<FrameError> for std::io::Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// A partly received frame's buffer grows by at most this much at a time.
const GROWTH_STEP: usize = 1 << 20;

/// A buffer left holding more than this between frames is given back, so an
/// idle pooled connection does not keep the memory of its largest frame.
const KEPT_BUFFER_BYTES: usize = 1 << 20;

/// The frame codec: a [`LengthDelimitedCodec`] with a `u32` big-endian
/// length prefix, and a body limit that can change between frames (a
/// [`Hello`] gets a smaller one than a request).
///
/// Unlike the plain codec, it does not reserve the buffer that a length
/// prefix announces: the buffer grows as the bytes arrive, so a prefix alone
/// cannot make the node allocate up to the limit.
#[derive(Debug)]
pub struct PeerCodec {
    inner: LengthDelimitedCodec,
    max_len: usize,
}

impl PeerCodec {
    /// A codec that accepts bodies of up to `max_len` bytes (at most
    /// [`MAX_FRAME_LEN`]).
    pub fn new(max_len: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .big_endian()
            .max_frame_length(MAX_FRAME_LEN)
            .new_codec();
        Self {
            inner,
            max_len: max_len.min(MAX_FRAME_LEN),
        }
    }

    /// Accepts bodies of up to `max_len` bytes (at most [`MAX_FRAME_LEN`])
    /// from the next frame on.
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len.min(MAX_FRAME_LEN);
    }
}

impl Decoder for PeerCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let Some(prefix) = src.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let missing = (4 + len).saturating_sub(src.len());
        if missing > 0 {
            src.reserve(missing.min(GROWTH_STEP));
            return Ok(None);
        }
        // The whole frame is buffered, so the inner codec reserves nothing.
        Ok(self.inner.decode(src)?)
    }
}

impl Encoder<Bytes> for PeerCodec {
    type Error = FrameError;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), FrameError> {
        if body.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len: body.len(),
                max: MAX_FRAME_LEN,
            });
        }
        Ok(self.inner.encode(body, dst)?)
    }
}

/// A connection (or any byte stream) read and written as frames.
pub type Frames<S> = Framed<S, PeerCodec>;

/// Frames over `io`, accepting bodies of up to [`MAX_FRAME_LEN`] bytes.
pub fn frames<S>(io: S) -> Frames<S> {
    Framed::new(io, PeerCodec::new(MAX_FRAME_LEN))
}

/// Gives back the buffers of `frames` that a large frame left big, once
/// they are empty.
pub fn trim_buffers<S>(frames: &mut Frames<S>) {
    if frames.read_buffer().is_empty() && frames.read_buffer().capacity() > KEPT_BUFFER_BYTES {
        *frames.read_buffer_mut() = BytesMut::new();
    }
    if frames.write_buffer().is_empty() && frames.write_buffer().capacity() > KEPT_BUFFER_BYTES {
        *frames.write_buffer_mut() = BytesMut::new();
    }
}

/// Encodes `msg` as a frame body: compact rmp-serde.
///
/// # Errors
///
/// [`FrameError::Encode`] if serialization fails, [`FrameError::TooLarge`]
/// if the body exceeds [`MAX_FRAME_LEN`].
pub fn encode_body<T: Serialize + ?Sized>(msg: &T) -> Result<Bytes, FrameError> {
    let body = rmp_serde::to_vec(msg)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(body.into())
}

/// Encodes `msg` as one whole frame: a `u32` big-endian body length, then
/// the body (see [`encode_body`]).
///
/// # Errors
///
/// As [`encode_body`].
pub fn encode_frame<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = BytesMut::new();
    PeerCodec::new(MAX_FRAME_LEN).encode(encode_body(msg)?, &mut frame)?;
    Ok(frame.to_vec())
}

/// Decodes a frame body (without its length prefix).
///
/// # Errors
///
/// [`FrameError::Decode`] if `body` is not a valid `T`.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(rmp_serde::from_slice(body)?)
}

/// Writes one message as a frame and flushes it (with TLS, the flush pushes
/// out what the session still buffers).
///
/// # Errors
///
/// Any [`FrameError`] from encoding, or [`FrameError::Io`] from the socket.
pub async fn write_frame<S, T>(frames: &mut Frames<S>, msg: &T) -> Result<(), FrameError>
where
    S: AsyncWrite + Unpin,
    T: Serialize + ?Sized,
{
    frames.send(encode_body(msg)?).await
}

/// Reads one frame and decodes its body, refusing a body longer than
/// `max_len` before reading it.
///
/// # Errors
///
/// [`FrameError::Closed`] if the stream ends cleanly before the frame,
/// [`FrameError::Io`] if it fails or ends inside the frame,
/// [`FrameError::TooLarge`] or [`FrameError::Decode`] for a bad frame.
pub async fn read_frame<S, T>(frames: &mut Frames<S>, max_len: usize) -> Result<T, FrameError>
where
    S: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    frames.codec_mut().set_max_len(max_len);
    match frames.next().await {
        Some(body) => decode_body(&body?),
        None => Err(FrameError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::error::RaftError;
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, StoredMembership};

    use super::*;
    use crate::raft::{NodeInfo, Op, Request};

    fn log_id(term: u64, index: u64) -> typ::LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    /// Encodes `msg` as a frame and reads it back through the async reader.
    async fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> anyhow::Result<T> {
        let frame = encode_frame(msg)?;
        let len = u32::from_be_bytes(frame[..4].try_into()?) as usize;
        assert_eq!(len, frame.len() - 4, "length prefix covers the body");
        let mut reader = frames(frame.as_slice());
        let back = read_frame(&mut reader, MAX_FRAME_LEN).await?;
        assert!(
            reader.read_buffer().is_empty() && reader.get_ref().is_empty(),
            "the whole frame is consumed"
        );
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

    /// The codec keeps the bytes of the hand-written framing it replaced:
    /// a `u32` big-endian body length, then the msgpack body.
    #[test]
    fn frames_are_a_big_endian_length_then_the_msgpack_body() -> anyhow::Result<()> {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            token: Some("t".into()),
        };
        let body = rmp_serde::to_vec(&hello)?;
        let mut expected = u32::try_from(body.len())?.to_be_bytes().to_vec();
        expected.extend_from_slice(&body);
        assert_eq!(encode_frame(&hello)?, expected);
        Ok(())
    }

    #[test]
    fn a_length_prefix_alone_does_not_reserve_its_length() -> anyhow::Result<()> {
        let mut codec = PeerCodec::new(MAX_FRAME_LEN);
        let mut src = BytesMut::from(&u32::try_from(MAX_FRAME_LEN)?.to_be_bytes()[..]);
        src.extend_from_slice(b"abc");
        assert!(codec.decode(&mut src)?.is_none(), "the frame is incomplete");
        assert!(
            src.capacity() <= 2 * GROWTH_STEP,
            "reserved {} bytes for 3 received",
            src.capacity()
        );
        Ok(())
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_refused() -> anyhow::Result<()> {
        let frame = encode_frame(&Hello {
            version: PROTOCOL_VERSION,
            token: Some("x".repeat(100)),
        })?;
        let result: Result<Hello, _> = read_frame(&mut frames(frame.as_slice()), 10).await;
        assert!(matches!(result, Err(FrameError::TooLarge { max: 10, .. })));

        let result: Result<Hello, _> =
            read_frame(&mut frames(&frame[..frame.len() - 1]), 1024).await;
        assert!(matches!(result, Err(FrameError::Io(_))), "{result:?}");

        let result: Result<Hello, _> = read_frame(&mut frames(&frame[..2]), 1024).await;
        assert!(matches!(result, Err(FrameError::Io(_))), "{result:?}");

        let result: Result<Hello, _> = read_frame(&mut frames(&[][..]), 1024).await;
        assert!(matches!(result, Err(FrameError::Closed)), "{result:?}");

        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xc1, 0xc1, 0xc1]);
        let result: Result<PeerRequest, _> =
            read_frame(&mut frames(garbage.as_slice()), 1024).await;
        assert!(matches!(result, Err(FrameError::Decode(_))), "{result:?}");
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
    use crate::raft::{NodeInfo, Op, Request};

    /// Reads one frame from `bytes`; the reader never waits, so this never
    /// blocks.
    fn read<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, FrameError> {
        futures::executor::block_on(read_frame(&mut frames(bytes), max_len))
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
