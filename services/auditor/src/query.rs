//! The search API's parameters, checked, and the cluster query they become.
//!
//! Results are newest first, sorted on (`at`, `id`): `id` is unique, so the sort is total and
//! `search_after` pages through any number of hits (past the 10,000 a `from` offset allows)
//! without skipping or repeating one. The cursor handed out is the last hit's sort values,
//! base64url-encoded: opaque to callers, checked when it comes back.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

pub const MAX_SIZE: usize = 500;
pub const DEFAULT_SIZE: usize = 50;
const MAX_Q_LEN: usize = 2048;

/// Parameters that filter on one keyword field, by the field's name.
pub const FILTERS: [&str; 10] = [
    "entity", "op", "key", "actor", "observer", "kind", "status", "type", "event_id", "queue",
];

/// A parameter the caller got wrong, said so plainly (this text is the 400's body).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    #[error("unknown parameter `{0}` (known: q, {known}, since, until, size, cursor)", known = FILTERS.join(", "))]
    Unknown(String),
    #[error("parameter `{0}` is given more than once")]
    Repeated(String),
    #[error("`size` must be a whole number from 1 to {MAX_SIZE}")]
    Size,
    #[error("`{0}` must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z")]
    Time(&'static str),
    #[error("`since` is after `until`")]
    Range,
    #[error("`cursor` is not one this API handed out")]
    Cursor,
    #[error("`q` is longer than {MAX_Q_LEN} characters")]
    QueryLength,
    #[error("`{0}` must not be empty")]
    Empty(String),
}

/// Where a page starts: just after the hit with these sort values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub at_millis: i64,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(json!([self.at_millis, self.id]).to_string())
    }

    pub fn decode(text: &str) -> Result<Self, ParamError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| ParamError::Cursor)?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|_| ParamError::Cursor)?;
        match value.as_array().map(Vec::as_slice) {
            Some([Value::Number(at), Value::String(id)]) => Ok(Self {
                at_millis: at.as_i64().ok_or(ParamError::Cursor)?,
                id: id.clone(),
            }),
            _ => Err(ParamError::Cursor),
        }
    }

    /// The cursor after a hit, from the sort values the cluster returned with it.
    pub fn after(hit: &Value) -> Option<Self> {
        match hit.get("sort")?.as_array()?.as_slice() {
            [at, Value::String(id)] => Some(Self {
                at_millis: at.as_i64().or_else(|| at.as_f64().map(|f| f as i64))?,
                id: id.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Search {
    pub q: Option<String>,
    pub filters: Vec<(&'static str, String)>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub size: usize,
    pub cursor: Option<Cursor>,
}

impl Search {
    /// Checks the query string's parameters, every one of them.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, ParamError> {
        let mut search = Search {
            size: DEFAULT_SIZE,
            ..Search::default()
        };
        let mut seen = std::collections::HashSet::new();
        for (name, value) in pairs {
            if !seen.insert(name.as_str()) {
                return Err(ParamError::Repeated(name.clone()));
            }
            let time = |what| {
                DateTime::parse_from_rfc3339(value)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| ParamError::Time(what))
            };
            match name.as_str() {
                "q" => {
                    if value.chars().count() > MAX_Q_LEN {
                        return Err(ParamError::QueryLength);
                    }
                    if !value.trim().is_empty() {
                        search.q = Some(value.clone());
                    }
                }
                "since" => search.since = Some(time("since")?),
                "until" => search.until = Some(time("until")?),
                "size" => {
                    search.size = value
                        .parse::<usize>()
                        .ok()
                        .filter(|s| (1..=MAX_SIZE).contains(s))
                        .ok_or(ParamError::Size)?;
                }
                "cursor" => search.cursor = Some(Cursor::decode(value)?),
                other => match FILTERS.iter().find(|f| **f == other) {
                    Some(field) if value.is_empty() => {
                        return Err(ParamError::Empty((*field).into()));
                    }
                    Some(field) => search.filters.push((field, value.clone())),
                    None => return Err(ParamError::Unknown(other.to_owned())),
                },
            }
        }
        if let (Some(since), Some(until)) = (search.since, search.until)
            && since > until
        {
            return Err(ParamError::Range);
        }
        Ok(search)
    }

    /// The cluster query: filters as exact keyword terms, `q` as a query string over the
    /// full-text field (fields may be named, `data.status:paid`), newest first.
    pub fn body(&self) -> Value {
        let mut filter: Vec<Value> = self
            .filters
            .iter()
            .map(|(field, value)| json!({"term": {*field: value}}))
            .collect();
        if self.since.is_some() || self.until.is_some() {
            let mut range = serde_json::Map::new();
            if let Some(since) = self.since {
                range.insert("gte".into(), json!(rfc3339(since)));
            }
            if let Some(until) = self.until {
                range.insert("lte".into(), json!(rfc3339(until)));
            }
            filter.push(json!({"range": {"at": range}}));
        }
        let must: Vec<Value> = self
            .q
            .iter()
            .map(|q| {
                json!({"query_string": {
                    "query": q,
                    "default_field": "text",
                    "default_operator": "AND",
                }})
            })
            .collect();
        let mut body = json!({
            "size": self.size,
            "sort": newest_first(),
            "query": {"bool": {"must": must, "filter": filter}},
        });
        if let Some(cursor) = &self.cursor {
            body["search_after"] = json!([cursor.at_millis, cursor.id]);
        }
        body
    }
}

fn newest_first() -> Value {
    json!([{"at": {"order": "desc"}}, {"id": {"order": "desc"}}])
}

/// One page of an event's trail, oldest first.
pub fn trail_body(event_id: &str, size: usize, after: Option<&Cursor>) -> Value {
    let mut body = json!({
        "size": size,
        "sort": [{"at": {"order": "asc"}}, {"id": {"order": "asc"}}],
        "query": {"bool": {"filter": [{"term": {"event_id": event_id}}]}},
    });
    if let Some(cursor) = after {
        body["search_after"] = json!([cursor.at_millis, cursor.id]);
    }
    body
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn filters_and_times_become_terms_and_a_range() {
        let search = Search::parse(&pairs(&[
            ("entity", "Order"),
            ("op", "update"),
            ("since", "2026-12-01T00:00:00Z"),
            ("q", "shipped"),
            ("size", "10"),
        ]))
        .expect("valid");
        let body = search.body();
        assert_eq!(body["size"], 10);
        let filter = &body["query"]["bool"]["filter"];
        assert_eq!(filter[0], json!({"term": {"entity": "Order"}}));
        assert_eq!(filter[1], json!({"term": {"op": "update"}}));
        assert_eq!(filter[2]["range"]["at"]["gte"], "2026-12-01T00:00:00.000Z");
        assert_eq!(
            body["query"]["bool"]["must"][0]["query_string"]["query"],
            "shipped"
        );
        assert_eq!(body["sort"][1], json!({"id": {"order": "desc"}}));
    }

    #[test]
    fn bad_parameters_are_named() {
        let cases: [(&[(&str, &str)], ParamError); 7] = [
            (&[("size", "501")], ParamError::Size),
            (&[("size", "0")], ParamError::Size),
            (&[("since", "yesterday")], ParamError::Time("since")),
            (&[("cursor", "not-a-cursor")], ParamError::Cursor),
            (&[("colour", "red")], ParamError::Unknown("colour".into())),
            (
                &[("op", "a"), ("op", "b")],
                ParamError::Repeated("op".into()),
            ),
            (
                &[
                    ("since", "2026-12-02T00:00:00Z"),
                    ("until", "2026-12-01T00:00:00Z"),
                ],
                ParamError::Range,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(Search::parse(&pairs(input)), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn a_cursor_round_trips_and_resumes_after_its_hit() {
        let cursor = Cursor {
            at_millis: 1_796_119_200_123,
            id: "0190a7a4:o:0:1".into(),
        };
        let text = cursor.encode();
        assert_eq!(Cursor::decode(&text), Ok(cursor.clone()));
        let search = Search::parse(&pairs(&[("cursor", &text)])).expect("valid");
        assert_eq!(
            search.body()["search_after"],
            json!([1_796_119_200_123_i64, "0190a7a4:o:0:1"])
        );
        let hit = json!({"sort": [1_796_119_200_123_i64, "0190a7a4:o:0:1"]});
        assert_eq!(Cursor::after(&hit), Some(cursor));
    }
}
