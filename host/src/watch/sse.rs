//! The Server-Sent Events wire format of `GET /watch`: one event per change,
//! all changes of an entry in one chunk, and the control events.
//!
//! ```text
//! id: <index>
//! event: put            (or: delete)
//! data: {"index":<u64>,"kind":"put","key":"<string>","value":"<string>"}
//! ```
//!
//! Keys and values are strings when both are valid UTF-8; otherwise the
//! object has `"base64":true` and both are standard base64.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::runtime::Change;

/// An SSE comment sent when the stream has been idle, so that proxies and
/// clients see a live connection.
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Whether a change stored or deleted its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The key has a new value.
    Put,
    /// The key was deleted.
    Delete,
}

impl Kind {
    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Put => "put",
            Kind::Delete => "delete",
        }
    }
}

/// The `data` of one change event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent<'a> {
    /// The log index of the entry that made the change.
    pub index: u64,
    /// Put or delete.
    pub kind: Kind,
    /// The key, as text or (with `base64`) base64.
    pub key: Cow<'a, str>,
    /// The new value (`None` for a delete), encoded like the key.
    pub value: Option<Cow<'a, str>>,
    /// Whether key and value are base64 because one is not UTF-8.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub base64: bool,
}

impl<'a> ChangeEvent<'a> {
    /// The event of `change`, made at `index`.
    pub fn new(index: u64, change: &'a Change) -> Self {
        let kind = if change.value.is_some() {
            Kind::Put
        } else {
            Kind::Delete
        };
        let key = std::str::from_utf8(&change.key);
        let value = change.value.as_deref().map(std::str::from_utf8);
        match (key, value) {
            (Ok(key), None) => Self::text(index, kind, key, None),
            (Ok(key), Some(Ok(value))) => Self::text(index, kind, key, Some(value)),
            _ => Self {
                index,
                kind,
                key: Cow::Owned(STANDARD.encode(&change.key)),
                value: change
                    .value
                    .as_ref()
                    .map(|v| Cow::Owned(STANDARD.encode(v))),
                base64: true,
            },
        }
    }

    fn text(index: u64, kind: Kind, key: &'a str, value: Option<&'a str>) -> Self {
        Self {
            index,
            kind,
            key: Cow::Borrowed(key),
            value: value.map(Cow::Borrowed),
            base64: false,
        }
    }

    /// The key's bytes (decoding base64).
    ///
    /// # Errors
    /// When `base64` is set and the key is not base64.
    pub fn key_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        self.decode(&self.key)
    }

    /// The value's bytes (decoding base64); `None` for a delete.
    ///
    /// # Errors
    /// When `base64` is set and the value is not base64.
    pub fn value_bytes(&self) -> Result<Option<Vec<u8>>, base64::DecodeError> {
        self.value.as_deref().map(|v| self.decode(v)).transpose()
    }

    fn decode(&self, text: &str) -> Result<Vec<u8>, base64::DecodeError> {
        if self.base64 {
            STANDARD.decode(text)
        } else {
            Ok(text.as_bytes().to_vec())
        }
    }
}

/// The events of the changes of one entry at `index`, as one chunk, or
/// `None` when there are none.
pub fn entry<'a>(index: u64, changes: impl IntoIterator<Item = &'a Change>) -> Option<Bytes> {
    let mut out = String::new();
    for change in changes {
        let event = ChangeEvent::new(index, change);
        // A struct of strings and numbers always serializes.
        let data = serde_json::to_string(&event).unwrap_or_default();
        out.push_str(&format!(
            "id: {index}\nevent: {}\ndata: {data}\n\n",
            event.kind.as_str()
        ));
    }
    (!out.is_empty()).then(|| Bytes::from(out))
}

/// The last event of a stream the server ends: `event: dropped` with why.
pub fn dropped(reason: &str) -> Bytes {
    let data = serde_json::json!({ "reason": reason });
    Bytes::from(format!("event: dropped\ndata: {data}\n\n"))
}

/// The comment that opens a stream: the index it starts from, which a
/// client watching "from now" keeps in order to resume elsewhere.
pub fn start(index: u64) -> Bytes {
    comment(&format!("{START} {index}"))
}

/// The index in the comment [`start`] sends.
pub fn start_index(comment: &str) -> Option<u64> {
    comment.strip_prefix(START)?.trim().parse().ok()
}

const START: &str = "watching from index";

/// An SSE comment line (ignored by clients).
pub fn comment(text: &str) -> Bytes {
    Bytes::from(format!(": {}\n\n", text.replace('\n', " ")))
}

/// One event of an SSE stream, as a client reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEvent {
    /// The `event:` field (empty when absent).
    pub event: String,
    /// The `data:` lines, joined with newlines.
    pub data: String,
    /// The text of the block's comment lines (such as the node's
    /// `watching from index N`), joined with newlines.
    pub comment: String,
}

/// Splits the bytes of an SSE stream into events as they arrive; unknown
/// fields are dropped, and a block of comments only is an event with just
/// `comment`.
#[derive(Debug, Default)]
pub struct Parser {
    buffer: Vec<u8>,
}

impl Parser {
    /// The events that `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<RawEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let mut event = RawEvent::default();
            let mut data: Vec<&str> = Vec::new();
            let mut comment: Vec<&str> = Vec::new();
            let text = String::from_utf8_lossy(&block);
            for line in text.lines().filter(|line| !line.is_empty()) {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "" => comment.push(value),
                    "event" => event.event = value.to_owned(),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            event.data = data.join("\n");
            event.comment = comment.join("\n");
            if !event.data.is_empty() || !event.event.is_empty() || !event.comment.is_empty() {
                events.push(event);
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The change event on the third line (`data: ...`) of one change's
    /// text.
    fn data_event(text: &str) -> ChangeEvent<'_> {
        let data = text
            .lines()
            .nth(2)
            .expect("a third line")
            .strip_prefix("data: ")
            .expect("a data line");
        serde_json::from_str(data).expect("parses")
    }

    fn change(key: &[u8], value: Option<&[u8]>) -> Change {
        Change {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn an_entry_is_one_chunk_of_events_with_the_same_id() {
        let changes = [change(b"a", Some(b"1")), change(b"b", None)];
        let chunk = entry(12, &changes).expect("some changes");
        assert_eq!(
            std::str::from_utf8(&chunk).expect("text"),
            "id: 12\nevent: put\ndata: {\"index\":12,\"kind\":\"put\",\"key\":\"a\",\"value\":\"1\"}\n\n\
             id: 12\nevent: delete\ndata: {\"index\":12,\"kind\":\"delete\",\"key\":\"b\",\"value\":null}\n\n"
        );
        assert_eq!(entry(13, &[]), None);
    }

    #[test]
    fn text_with_newlines_and_quotes_stays_on_one_data_line() {
        let changes = [change(b"k", Some(b"line1\nline2 \"q\""))];
        let chunk = entry(1, &changes).expect("some changes");
        let text = std::str::from_utf8(&chunk).expect("text");
        assert_eq!(text.trim_end().lines().count(), 3, "{text}");
        let event = data_event(text);
        assert_eq!(
            event.value_bytes().expect("decodes").expect("a value"),
            b"line1\nline2 \"q\""
        );
    }

    #[test]
    fn bytes_that_are_not_utf8_are_base64_for_key_and_value() {
        let changes = [change(b"key", Some(&[0xff, 0x00]))];
        let chunk = entry(3, &changes).expect("some changes");
        let text = std::str::from_utf8(&chunk).expect("text");
        assert!(
            text.contains(r#""key":"a2V5","value":"/wA=","base64":true"#),
            "{text}"
        );
        let event = data_event(text);
        assert_eq!(event.key_bytes().expect("decodes"), b"key");
        assert_eq!(
            event.value_bytes().expect("decodes").expect("a value"),
            [0xff, 0x00]
        );
    }

    #[test]
    fn the_parser_reassembles_events_split_across_chunks() {
        let changes = [change(b"a", Some(b"1")), change(b"b", None)];
        let mut bytes = comment("start").to_vec();
        bytes.extend_from_slice(&entry(7, &changes).expect("some changes"));
        bytes.extend_from_slice(KEEP_ALIVE);
        bytes.extend_from_slice(&dropped("slow"));
        let mut parser = Parser::default();
        let mut events = Vec::new();
        for piece in bytes.chunks(5) {
            events.extend(parser.push(piece));
        }
        let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
        assert_eq!(names, ["", "put", "delete", "", "dropped"]);
        assert_eq!(events[0].comment, "start");
        assert_eq!(events[3].comment, "keep-alive");
        let first: ChangeEvent<'_> = serde_json::from_str(&events[1].data).expect("parses");
        assert_eq!((first.index, first.key.as_ref()), (7, "a"));
        assert_eq!(events[4].data, r#"{"reason":"slow"}"#);
    }

    #[test]
    fn dropped_and_comments_are_single_events() {
        assert_eq!(
            dropped("too \"slow\""),
            Bytes::from_static(b"event: dropped\ndata: {\"reason\":\"too \\\"slow\\\"\"}\n\n")
        );
        assert_eq!(comment("a\nb"), Bytes::from_static(b": a b\n\n"));
        let mut parser = Parser::default();
        let events = parser.push(&start(42));
        assert_eq!(start_index(&events[0].comment), Some(42));
    }
}
