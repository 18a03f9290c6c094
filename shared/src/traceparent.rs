//! W3C Trace Context `traceparent` values, checked before they go anywhere near a header.
//!
//! A `traceparent` reaches Herald from outside (an HTTP header, an SQL `set_config`, a message
//! published by anyone), and a header value with CR/LF makes async-nats panic, while an
//! over-long one can push a message over the server's max payload. Only a value that parses
//! per <https://www.w3.org/TR/trace-context/#traceparent-header> is carried on; anything else
//! is dropped (with a warning at the caller) and the message starts a trace of its own.

use std::fmt;

/// The longest value accepted: version 00 is exactly 55 characters; later versions may append
/// fields, which are kept only while the whole stays small.
pub const MAX_LEN: usize = 256;

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTraceparent {
    #[error("traceparent is {0} bytes, above the {MAX_LEN}-byte limit")]
    TooLong(usize),
    #[error("traceparent is not `version-traceid-parentid-flags` in lowercase hex")]
    Malformed,
    #[error("traceparent version ff is forbidden")]
    ForbiddenVersion,
    #[error("traceparent trace id is all zeros")]
    ZeroTraceId,
    #[error("traceparent parent id is all zeros")]
    ZeroParentId,
}

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    pub version: u8,
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl Traceparent {
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for Traceparent {
    /// The canonical version-00 form, whatever version was parsed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// Parses a `traceparent` value.
pub fn parse(value: &str) -> Result<Traceparent, InvalidTraceparent> {
    if value.len() > MAX_LEN {
        return Err(InvalidTraceparent::TooLong(value.len()));
    }
    // ASCII first: every slice below is then on a character boundary.
    if !value.is_ascii() {
        return Err(InvalidTraceparent::Malformed);
    }
    let bytes = value.as_bytes();
    if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return Err(InvalidTraceparent::Malformed);
    }
    let version = hex(&value[0..2]).ok_or(InvalidTraceparent::Malformed)? as u8;
    if version == 0xff {
        return Err(InvalidTraceparent::ForbiddenVersion);
    }
    // Version 00 has exactly four fields; a later version may add more after another dash.
    if (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
        return Err(InvalidTraceparent::Malformed);
    }
    if bytes.len() > 55 && !value[56..].bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidTraceparent::Malformed);
    }
    let trace_id = hex(&value[3..35]).ok_or(InvalidTraceparent::Malformed)?;
    let parent_id = hex(&value[36..52]).ok_or(InvalidTraceparent::Malformed)? as u64;
    let flags = hex(&value[53..55]).ok_or(InvalidTraceparent::Malformed)? as u8;
    if trace_id == 0 {
        return Err(InvalidTraceparent::ZeroTraceId);
    }
    if parent_id == 0 {
        return Err(InvalidTraceparent::ZeroParentId);
    }
    Ok(Traceparent {
        version,
        trace_id,
        parent_id,
        flags,
    })
}

pub fn is_valid(value: &str) -> bool {
    parse(value).is_ok()
}

/// Lowercase hex only, as the spec demands.
fn hex(text: &str) -> Option<u128> {
    if text.is_empty() || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_example_parses_and_prints_back() {
        let parsed = parse(GOOD).expect("valid");
        assert!(parsed.sampled());
        assert_eq!(parsed.to_string(), GOOD);
    }

    #[test]
    fn values_that_could_break_a_header_or_a_payload_are_refused() {
        let cases = [
            format!("{GOOD}\nX: 1"),
            format!("{GOOD}\r"),
            format!("00-{}-00f067aa0ba902b7-01", "a".repeat(65_536)),
            GOOD.to_uppercase(),
            GOOD.replacen("00-", "ff-", 1),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".into(),
            format!("{GOOD}-extra"),
            "garbage".into(),
            String::new(),
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01".into(),
        ];
        for case in cases {
            assert!(
                !is_valid(&case),
                "accepted {:?}",
                &case[..case.len().min(80)]
            );
        }
    }

    #[test]
    fn a_later_version_may_append_fields() {
        assert!(is_valid(&format!("01{}-future", &GOOD[2..])));
        assert!(!is_valid(&format!("01{}future", &GOOD[2..])));
    }

    #[test]
    fn each_refusal_says_why() {
        assert_eq!(
            parse(&format!("cc{}-future-fields", &GOOD[2..])).map(|_| ()),
            Ok(())
        );
        let cases = [
            ("", InvalidTraceparent::Malformed),
            ("00-abc-def-01", InvalidTraceparent::Malformed),
            (&*format!("{GOOD}\r\nX: 1"), InvalidTraceparent::Malformed),
            (&*format!("{GOOD}-x"), InvalidTraceparent::Malformed),
            (&*GOOD.to_uppercase(), InvalidTraceparent::Malformed),
            (
                &*format!("ff{}", &GOOD[2..]),
                InvalidTraceparent::ForbiddenVersion,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                InvalidTraceparent::ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                InvalidTraceparent::ZeroParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
                InvalidTraceparent::Malformed,
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(parse(value), Err(expected), "{value:?}");
        }
        assert_eq!(
            parse(&"0".repeat(64 * 1024)),
            Err(InvalidTraceparent::TooLong(64 * 1024))
        );
    }
}
