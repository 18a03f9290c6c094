//! How the CLI shows a message as JSON: headers as an object (a header with several values as an
//! array), the payload as JSON when it is JSON and as text otherwise. `tail` and `dlq show` share
//! it, so a message looks the same wherever the operator meets it.

use async_nats::HeaderMap;
use serde_json::Value;

pub fn headers(headers: Option<&HeaderMap>) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
        let mut values: Vec<Value> = values
            .iter()
            .map(|v| Value::String(v.as_str().to_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.remove(0)
        } else {
            Value::Array(values)
        };
        out.insert(name.to_string(), value);
    }
    out
}

/// The payload as JSON when it parses, otherwise as (lossily decoded) text.
pub fn payload(payload: &[u8]) -> Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_json_when_it_parses_and_text_otherwise() {
        assert_eq!(payload(br#"{"a":1}"#)["a"], 1);
        assert_eq!(payload(b"not json"), Value::String("not json".into()));
        assert_eq!(payload(&[0xff, b'x']), Value::String("\u{fffd}x".into()));
    }

    #[test]
    fn repeated_headers_become_arrays() {
        let mut h = HeaderMap::new();
        h.insert("One", "1");
        h.append("Many", "a");
        h.append("Many", "b");
        let json = headers(Some(&h));
        assert_eq!(json["One"], "1");
        assert_eq!(json["Many"], serde_json::json!(["a", "b"]));
    }
}
