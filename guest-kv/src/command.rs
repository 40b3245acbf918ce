//! The command and response format of `guest-kv`, defined once for the guest
//! and for the host's HTTP adapter.
//!
//! Every message starts with a one-byte tag. Byte strings are a `u32`
//! little-endian length followed by the bytes; an optional byte string is a
//! `0` byte (absent) or a `1` byte and the string; a TTL is a `u64`
//! little-endian number of milliseconds, `0` meaning "never expires".
//!
//! | command           | tag | fields                                   |
//! |-------------------|-----|------------------------------------------|
//! | `Set`             | 1   | key, value, ttl                          |
//! | `Get`             | 2   | key                                      |
//! | `Delete`          | 3   | key                                      |
//! | `CompareAndSet`   | 4   | key, expected (optional), value, ttl     |
//!
//! | response          | tag | fields                                   |
//! |-------------------|-----|------------------------------------------|
//! | `Done`            | 0   |                                          |
//! | `Value`           | 1   | value (optional)                         |
//! | `Deleted`         | 2   | existed (`0`/`1`)                        |
//! | `Swapped`         | 3   | swapped (`0`/`1`), current (optional)    |

/// A command for the cache, borrowing its bytes from the encoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// Stores `value` under `key`; with `ttl_ms > 0` the key expires that many
    /// milliseconds after the entry's leader-stamped time.
    Set {
        key: &'a [u8],
        value: &'a [u8],
        ttl_ms: u64,
    },
    /// Reads `key`; answered with [`Response::Value`].
    Get { key: &'a [u8] },
    /// Removes `key`; answered with [`Response::Deleted`].
    Delete { key: &'a [u8] },
    /// Stores `value` only if the current value equals `expected` (`None`:
    /// only if the key is absent); answered with [`Response::Swapped`].
    CompareAndSet {
        key: &'a [u8],
        expected: Option<&'a [u8]>,
        value: &'a [u8],
        ttl_ms: u64,
    },
}

/// The answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A `Set` was stored.
    Done,
    /// The value of a `Get`, `None` when the key is missing or expired.
    Value(Option<Vec<u8>>),
    /// A `Delete` ran; `true` if the key existed.
    Deleted(bool),
    /// A `CompareAndSet` ran; `current` is the value after the command.
    Swapped {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "malformed message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

const SET: u8 = 1;
const GET: u8 = 2;
const DELETE: u8 = 3;
const COMPARE_AND_SET: u8 = 4;

const DONE: u8 = 0;
const VALUE: u8 = 1;
const DELETED: u8 = 2;
const SWAPPED: u8 = 3;

impl<'a> Command<'a> {
    /// Encodes the command.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        match *self {
            Command::Set { key, value, ttl_ms } => {
                out.push(SET);
                put_bytes(&mut out, key);
                put_bytes(&mut out, value);
                out.extend_from_slice(&ttl_ms.to_le_bytes());
            }
            Command::Get { key } => {
                out.push(GET);
                put_bytes(&mut out, key);
            }
            Command::Delete { key } => {
                out.push(DELETE);
                put_bytes(&mut out, key);
            }
            Command::CompareAndSet {
                key,
                expected,
                value,
                ttl_ms,
            } => {
                out.push(COMPARE_AND_SET);
                put_bytes(&mut out, key);
                put_option(&mut out, expected);
                put_bytes(&mut out, value);
                out.extend_from_slice(&ttl_ms.to_le_bytes());
            }
        }
        out
    }

    /// Decodes a command that borrows from `bytes`.
    ///
    /// # Errors
    /// [`DecodeError`] when the tag is unknown, a field is cut short, or bytes
    /// are left over.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        let command = match r.u8()? {
            SET => Command::Set {
                key: r.bytes()?,
                value: r.bytes()?,
                ttl_ms: r.u64()?,
            },
            GET => Command::Get { key: r.bytes()? },
            DELETE => Command::Delete { key: r.bytes()? },
            COMPARE_AND_SET => Command::CompareAndSet {
                key: r.bytes()?,
                expected: r.option()?,
                value: r.bytes()?,
                ttl_ms: r.u64()?,
            },
            _ => return Err(DecodeError("unknown command tag")),
        };
        r.finish()?;
        Ok(command)
    }

    /// The key the command is about.
    pub fn key(&self) -> &'a [u8] {
        match *self {
            Command::Set { key, .. }
            | Command::Get { key }
            | Command::Delete { key }
            | Command::CompareAndSet { key, .. } => key,
        }
    }

    /// Whether the command changes state (everything but `Get`).
    pub fn is_write(&self) -> bool {
        !matches!(self, Command::Get { .. })
    }

    fn encoded_len(&self) -> usize {
        let bytes = |b: &[u8]| 4 + b.len();
        1 + match *self {
            Command::Set { key, value, .. } => bytes(key) + bytes(value) + 8,
            Command::Get { key } | Command::Delete { key } => bytes(key),
            Command::CompareAndSet {
                key,
                expected,
                value,
                ..
            } => bytes(key) + 1 + expected.map_or(0, bytes) + bytes(value) + 8,
        }
    }
}

impl Response {
    /// Encodes the response.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded response to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Response::Done => out.push(DONE),
            Response::Value(value) => {
                out.push(VALUE);
                put_option(out, value.as_deref());
            }
            Response::Deleted(existed) => {
                out.push(DELETED);
                out.push(u8::from(*existed));
            }
            Response::Swapped { swapped, current } => {
                out.push(SWAPPED);
                out.push(u8::from(*swapped));
                put_option(out, current.as_deref());
            }
        }
    }

    /// Decodes a response.
    ///
    /// # Errors
    /// [`DecodeError`] when the message is not a well-formed response.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        let response = match r.u8()? {
            DONE => Response::Done,
            VALUE => Response::Value(r.option()?.map(<[u8]>::to_vec)),
            DELETED => Response::Deleted(r.flag()?),
            SWAPPED => Response::Swapped {
                swapped: r.flag()?,
                current: r.option()?.map(<[u8]>::to_vec),
            },
            _ => return Err(DecodeError("unknown response tag")),
        };
        r.finish()?;
        Ok(response)
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths beyond u32 cannot be expressed; the host caps values at 1 MiB
    // long before that, so truncation here would be a host bug.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_option(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            put_bytes(out, bytes);
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("message is cut short"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError("a flag is neither 0 nor 1")),
        }
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut buf = [0; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buf))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let mut len = [0; 4];
        len.copy_from_slice(self.take(4)?);
        self.take(u32::from_le_bytes(len) as usize)
    }

    fn option(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.bytes().map(Some),
            _ => Err(DecodeError("an option marker is neither 0 nor 1")),
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes after the message"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        let commands = [
            Command::Set {
                key: b"k",
                value: b"v",
                ttl_ms: 1500,
            },
            Command::Get { key: b"k" },
            Command::Delete { key: b"" },
            Command::CompareAndSet {
                key: b"k",
                expected: None,
                value: b"v2",
                ttl_ms: 0,
            },
            Command::CompareAndSet {
                key: b"k",
                expected: Some(b"v"),
                value: b"v2",
                ttl_ms: 9,
            },
        ];
        for command in commands {
            let bytes = command.encode();
            assert_eq!(bytes.len(), command.encoded_len());
            assert_eq!(Command::decode(&bytes), Ok(command));
        }
    }

    #[test]
    fn responses_round_trip() {
        let responses = [
            Response::Done,
            Response::Value(None),
            Response::Value(Some(b"abc".to_vec())),
            Response::Deleted(true),
            Response::Swapped {
                swapped: false,
                current: Some(b"x".to_vec()),
            },
        ];
        for response in responses {
            assert_eq!(Response::decode(&response.encode()), Ok(response));
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert!(Command::decode(&[]).is_err());
        assert!(Command::decode(&[9]).is_err());
        assert!(Command::decode(&[GET, 5, 0, 0, 0, b'a']).is_err());
        let mut set = Command::Get { key: b"k" }.encode();
        set.push(0);
        assert_eq!(
            Command::decode(&set),
            Err(DecodeError("trailing bytes after the message"))
        );
        assert!(Response::decode(&[DELETED, 2]).is_err());
    }
}

/// Property tests: any bytes a client sends to `/apply` are decoded or
/// refused without a panic, and every command and response survives its
/// encoding.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// `cases` per property, unless `PROPTEST_CASES` asks for more.
    fn config(cases: u32) -> proptest::test_runner::Config {
        let mut config = proptest::test_runner::Config::default();
        if std::env::var_os("PROPTEST_CASES").is_none() {
            config.cases = cases;
        }
        config
    }

    /// The owned parts of a [`Command`]: tag, key, expected, value, TTL.
    type Parts = (u8, Vec<u8>, Option<Vec<u8>>, Vec<u8>, u64);

    fn parts() -> impl Strategy<Value = Parts> {
        let bytes = || prop::collection::vec(any::<u8>(), 0..48);
        (
            SET..=COMPARE_AND_SET,
            bytes(),
            prop::option::of(bytes()),
            bytes(),
            any::<u64>(),
        )
    }

    fn command(parts: &Parts) -> Command<'_> {
        let (tag, key, expected, value, ttl_ms) = parts;
        match *tag {
            SET => Command::Set {
                key,
                value,
                ttl_ms: *ttl_ms,
            },
            GET => Command::Get { key },
            DELETE => Command::Delete { key },
            _ => Command::CompareAndSet {
                key,
                expected: expected.as_deref(),
                value,
                ttl_ms: *ttl_ms,
            },
        }
    }

    fn response() -> impl Strategy<Value = Response> {
        let value = || prop::option::of(prop::collection::vec(any::<u8>(), 0..48));
        prop_oneof![
            Just(Response::Done),
            value().prop_map(Response::Value),
            any::<bool>().prop_map(Response::Deleted),
            (any::<bool>(), value())
                .prop_map(|(swapped, current)| Response::Swapped { swapped, current }),
        ]
    }

    /// A valid encoding with a few bytes overwritten, cut short or extended:
    /// close enough to the format to reach the decoder's deeper branches.
    fn mutated(encoded: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let len = encoded.len();
        (
            prop::collection::vec((0..len, any::<u8>()), 0..4),
            0..=len,
            prop::collection::vec(any::<u8>(), 0..4),
        )
            .prop_map(move |(writes, cut, tail)| {
                let mut bytes = encoded.clone();
                for (at, byte) in writes {
                    bytes[at] = byte;
                }
                bytes.truncate(cut.max(1));
                bytes.extend(tail);
                bytes
            })
    }

    proptest! {
        #![proptest_config(config(2000))]

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = Command::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn commands_survive_their_encoding(parts in parts()) {
            let command = command(&parts);
            let bytes = command.encode();
            prop_assert_eq!(bytes.len(), command.encoded_len());
            prop_assert_eq!(Command::decode(&bytes), Ok(command));
        }

        #[test]
        fn responses_survive_their_encoding(response in response()) {
            prop_assert_eq!(Response::decode(&response.encode()), Ok(response));
        }

        #[test]
        fn a_command_cut_short_is_refused(parts in parts(), cut in any::<prop::sample::Index>()) {
            let bytes = command(&parts).encode();
            let cut = cut.index(bytes.len());
            prop_assert!(Command::decode(&bytes[..cut]).is_err());
        }

        #[test]
        fn mutated_commands_decode_only_to_their_own_encoding(
            bytes in parts().prop_flat_map(|parts| mutated(command(&parts).encode())),
        ) {
            // The format has one encoding per command, so anything that
            // decodes is that encoding, with nothing left over.
            if let Ok(command) = Command::decode(&bytes) {
                prop_assert_eq!(command.encode(), bytes);
            }
        }

        #[test]
        fn mutated_responses_decode_only_to_their_own_encoding(
            bytes in response().prop_flat_map(|response| mutated(response.encode())),
        ) {
            if let Ok(response) = Response::decode(&bytes) {
                prop_assert_eq!(response.encode(), bytes);
            }
        }
    }
}
