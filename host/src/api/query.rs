//! Strict, binary-safe parsing of query strings: `%XX` and `+` decode to
//! bytes, and a broken escape is an error instead of being guessed at.

use super::ApiError;

/// The decoded parameters of a query string, in order.
#[derive(Debug, Default)]
pub struct Params(Vec<(Vec<u8>, Vec<u8>)>);

impl Params {
    /// Parses `query` (without the `?`).
    ///
    /// # Errors
    /// 400 when an escape is malformed.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let Some(query) = query else {
            return Ok(Self::default());
        };
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                Ok((decode(name)?, decode(value)?))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The first value of `name` as text.
    ///
    /// # Errors
    /// 400 when it is not UTF-8.
    pub fn text(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.get(name)
            .map(|v| {
                std::str::from_utf8(v)
                    .map_err(|_| ApiError::BadRequest(format!("parameter `{name}` is not UTF-8")))
            })
            .transpose()
    }

    /// The first value of `name` as a number.
    ///
    /// # Errors
    /// 400 when it is not a non-negative integer.
    pub fn number(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.text(name)?
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "parameter `{name}` must be a non-negative integer, not `{v}`"
                    ))
                })
            })
            .transpose()
    }
}

fn decode(text: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("malformed percent-encoding in `{text}`"))
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_refuses_broken_ones() {
        let params = Params::parse(Some("key=a%20b+c&value=%FF&empty=&flag")).expect("parses");
        assert_eq!(params.get("key"), Some(&b"a b c"[..]));
        assert_eq!(params.get("value"), Some(&[0xff][..]));
        assert_eq!(params.get("empty"), Some(&b""[..]));
        assert_eq!(params.get("flag"), Some(&b""[..]));
        assert!(Params::parse(Some("key=%G1")).is_err());
        assert!(Params::parse(Some("key=%2")).is_err());
        assert!(Params::parse(Some("key=%+1")).is_err());
    }
}

/// Property tests: whatever a client puts in a query string, the parser
/// answers or refuses it, and an escape decodes to exactly its byte.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// Percent-encodes `bytes` the way a client may: unreserved bytes as they
    /// are or escaped, a space as `+` or `%20`, everything else escaped, in
    /// upper or lower case hex. `choices` picks among the ways per byte.
    fn encode(bytes: &[u8], choices: &[u8]) -> String {
        let mut out = String::new();
        for (i, &b) in bytes.iter().enumerate() {
            let choice = choices.get(i).copied().unwrap_or(0);
            let unreserved = b.is_ascii_alphanumeric() || b"-._~".contains(&b);
            match (b, choice % 3) {
                (b' ', 0) => out.push('+'),
                (_, 0) if unreserved => out.push(char::from(b)),
                (_, 1) => out.push_str(&format!("%{b:02x}")),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    }

    /// What may follow a `%` without making an escape: the end of the text,
    /// one hex digit and the end, or a character that is not a hex digit
    /// (after 0 or 1 digits) and then anything.
    fn broken_escape() -> impl Strategy<Value = String> {
        let not_hex = any::<char>().prop_filter("not a hex digit", |c| !c.is_ascii_hexdigit());
        let hex = prop::sample::select(b"0123456789abcdefABCDEF".to_vec()).prop_map(char::from);
        prop_oneof![
            Just(String::new()),
            hex.clone().prop_map(String::from),
            (prop::option::of(hex), not_hex, any::<String>()).prop_map(|(h, c, rest)| h
                .into_iter()
                .chain(std::iter::once(c))
                .chain(rest.chars())
                .collect()),
        ]
    }

    proptest! {
        #![proptest_config(crate::proptest_config(2000))]

        #[test]
        fn arbitrary_query_strings_never_panic(query in any::<String>()) {
            if let Ok(params) = Params::parse(Some(&query)) {
                let _ = params.text("key");
                let _ = params.number("ttl");
            }
        }

        #[test]
        fn query_strings_of_url_characters_never_panic(
            query in "[a-z0-9%+=&;#?/ ._~-]{0,64}",
        ) {
            let _ = Params::parse(Some(&query));
        }

        #[test]
        fn text_without_percent_decodes_to_itself_with_plus_as_space(
            text in "[^%]{0,64}",
        ) {
            let decoded = decode(&text);
            prop_assert_eq!(decoded.ok(), Some(text.replace('+', " ").into_bytes()));
        }

        #[test]
        fn percent_encoded_bytes_decode_back_to_the_same_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..128),
            choices in prop::collection::vec(any::<u8>(), 0..128),
        ) {
            let encoded = encode(&bytes, &choices);
            prop_assert_eq!(decode(&encoded).ok(), Some(bytes.clone()));
        }

        #[test]
        fn encoded_keys_and_values_come_back_from_a_whole_query(
            key in prop::collection::vec(any::<u8>(), 1..64),
            value in prop::collection::vec(any::<u8>(), 0..64),
            choices in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let query = format!(
                "key={}&value={}&value=second&unknown",
                encode(&key, &choices),
                encode(&value, &choices),
            );
            let params = Params::parse(Some(&query));
            prop_assert!(params.is_ok(), "{query:?} was refused");
            let params = params.unwrap_or_default();
            prop_assert_eq!(params.get("key"), Some(&key[..]));
            // The first of duplicate parameters counts.
            prop_assert_eq!(params.get("value"), Some(&value[..]));
            prop_assert_eq!(params.get("unknown"), Some(&b""[..]));
        }

        #[test]
        fn a_broken_escape_anywhere_is_an_error(
            before in prop::collection::vec(any::<u8>(), 0..32),
            broken in broken_escape(),
            choices in prop::collection::vec(any::<u8>(), 0..32),
        ) {
            let text = format!("{}%{broken}", encode(&before, &choices));
            prop_assert!(decode(&text).is_err(), "{text:?} decoded");
            let query = format!("key={text}");
            prop_assert!(Params::parse(Some(&query)).is_err(), "{query:?} parsed");
        }
    }
}
