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
