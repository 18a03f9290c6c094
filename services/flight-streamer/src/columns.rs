//! Typed column builders: one per column kind, fed from an event's JSON row or from a
//! PostgreSQL binary COPY row, each counting the bytes it holds so a batch can be cut by size as well as
//! by rows. A value that does not fit its column's type (a text where the catalogue says
//! integer) becomes null and is counted, never a panic and never a guess at another type.

use std::borrow::Cow;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime};
use serde_json::value::RawValue;

use crate::schema::Kind;

const UNIX_EPOCH_DAY: i32 = 719_163;

/// Values that did not fit their column's type and were sent as null.
pub const MISFIT_VALUES: &str = "herald_flight_misfit_values_total";

pub enum Column {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    TimestampTz(TimestampMicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    Date(Date32Builder),
    Text(StringBuilder),
}

impl Column {
    pub fn new(kind: Kind) -> Self {
        match kind {
            Kind::Int => Column::Int(Int64Builder::new()),
            Kind::Float => Column::Float(Float64Builder::new()),
            Kind::Bool => Column::Bool(BooleanBuilder::new()),
            Kind::TimestampTz => {
                Column::TimestampTz(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
            Kind::Timestamp => Column::Timestamp(TimestampMicrosecondBuilder::new()),
            Kind::Date => Column::Date(Date32Builder::new()),
            Kind::Json | Kind::Text => Column::Text(StringBuilder::new()),
        }
    }

    pub fn append_null(&mut self) {
        match self {
            Column::Int(b) => b.append_null(),
            Column::Float(b) => b.append_null(),
            Column::Bool(b) => b.append_null(),
            Column::TimestampTz(b) | Column::Timestamp(b) => b.append_null(),
            Column::Date(b) => b.append_null(),
            Column::Text(b) => b.append_null(),
        }
    }

    /// Appends a value of an event row (PostgreSQL's `to_jsonb` of the row), read from its raw
    /// JSON text without building a JSON tree. Returns the bytes added; a value of the wrong
    /// shape is appended as null and counted.
    pub fn append_json(&mut self, raw: Option<&RawValue>, kind: Kind) -> usize {
        let text = match raw.map(RawValue::get) {
            None | Some("null") => {
                self.append_null();
                return 1;
            }
            Some(text) => text,
        };
        let fitted = match self {
            Column::Int(b) => number(text).map(|v| b.append_value(v)),
            Column::Float(b) => number(text).map(|v| b.append_value(v)),
            Column::Bool(b) => text.parse::<bool>().ok().map(|v| b.append_value(v)),
            Column::TimestampTz(b) => string(text)
                .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                .map(|t| b.append_value(t.timestamp_micros())),
            Column::Timestamp(b) => string(text)
                .and_then(|s| parse_naive_timestamp(&s))
                .map(|t| b.append_value(t.and_utc().timestamp_micros())),
            Column::Date(b) => string(text)
                .and_then(|s| NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok())
                .map(|d| b.append_value(days(d))),
            Column::Text(b) => {
                // A text column holds the string; JSON columns (and a non-string in a text
                // column) hold the JSON text itself.
                match (kind, string(text)) {
                    (Kind::Text, Some(s)) => b.append_value(&s),
                    _ => b.append_value(text),
                }
                return text.len() + 4;
            }
        };
        if fitted.is_none() {
            metrics::counter!(MISFIT_VALUES).increment(1);
            self.append_null();
        }
        8
    }

    /// Appends one value of a binary COPY row (`None` for NULL), selected with `Kind::select`
    /// so its wire format is known: int8, float8, bool, timestamp(tz) and date as PostgreSQL
    /// sends them in binary, text as its bytes. Returns the bytes added. A value of the wrong
    /// width or text that is not UTF-8 is a protocol error; a timestamp or date at ±infinity,
    /// which Arrow cannot hold, is sent as null and counted.
    pub fn append_binary(&mut self, value: Option<&[u8]>) -> Result<usize, BinaryError> {
        let Some(value) = value else {
            self.append_null();
            return Ok(1);
        };
        match self {
            Column::Int(b) => b.append_value(i64::from_be_bytes(fixed(value)?)),
            Column::Float(b) => b.append_value(f64::from_be_bytes(fixed(value)?)),
            Column::Bool(b) => b.append_value(fixed::<1>(value)?[0] != 0),
            Column::TimestampTz(b) | Column::Timestamp(b) => {
                match i64::from_be_bytes(fixed(value)?) {
                    i64::MAX | i64::MIN => {
                        metrics::counter!(MISFIT_VALUES).increment(1);
                        b.append_null();
                    }
                    micros => b.append_value(micros.saturating_add(PG_EPOCH_MICROS)),
                }
            }
            Column::Date(b) => match i32::from_be_bytes(fixed(value)?) {
                i32::MAX | i32::MIN => {
                    metrics::counter!(MISFIT_VALUES).increment(1);
                    b.append_null();
                }
                pg_days => b.append_value(pg_days.saturating_add(PG_EPOCH_DAYS)),
            },
            Column::Text(b) => {
                let text = std::str::from_utf8(value).map_err(|_| BinaryError::NotUtf8)?;
                b.append_value(text);
                return Ok(text.len() + 4);
            }
        }
        Ok(8)
    }

    pub fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Int(b) => Arc::new(b.finish()),
            Column::Float(b) => Arc::new(b.finish()),
            Column::Bool(b) => Arc::new(b.finish()),
            Column::TimestampTz(b) => Arc::new(b.finish()),
            Column::Timestamp(b) => Arc::new(b.finish()),
            Column::Date(b) => Arc::new(b.finish()),
            Column::Text(b) => Arc::new(b.finish()),
        }
    }
}

/// PostgreSQL's binary timestamps count microseconds, and dates days, from 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i32 = 10_957;

/// A binary COPY value that is not what its column's cast sends.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BinaryError {
    #[error("a binary value of {found} bytes where {expected} were expected")]
    Width { expected: usize, found: usize },
    #[error("a text value that is not UTF-8")]
    NotUtf8,
}

fn fixed<const N: usize>(value: &[u8]) -> Result<[u8; N], BinaryError> {
    value.try_into().map_err(|_| BinaryError::Width {
        expected: N,
        found: value.len(),
    })
}

/// A JSON string's content (without building a tree); None for any other JSON value.
fn string(text: &str) -> Option<Cow<'_, str>> {
    if !text.starts_with('"') {
        return None;
    }
    serde_json::from_str::<&str>(text)
        .map(Cow::Borrowed)
        .or_else(|_| serde_json::from_str::<String>(text).map(Cow::Owned))
        .ok()
}

/// A JSON number, or a string holding one (`numeric` NaN and the infinities reach JSON as
/// strings, and so may a bigint from another producer).
fn number<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.parse().ok().or_else(|| string(text)?.parse().ok())
}

fn parse_naive_timestamp(text: &str) -> Option<NaiveDateTime> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").ok()
}

fn days(date: NaiveDate) -> i32 {
    date.num_days_from_ce() - UNIX_EPOCH_DAY
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Date32Array, Int64Array, TimestampMicrosecondArray};

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("JSON")
    }

    #[test]
    fn json_values_become_typed_values_and_misfits_become_null() {
        let mut ints = Column::new(Kind::Int);
        for value in ["7", "\"8\"", "\"eight\"", "null", "1.5"] {
            ints.append_json(Some(&raw(value)), Kind::Int);
        }
        let ints = ints.finish();
        let ints = ints.as_any().downcast_ref::<Int64Array>().expect("int64");
        assert_eq!(
            ints.iter().collect::<Vec<_>>(),
            [Some(7), Some(8), None, None, None]
        );

        let mut times = Column::new(Kind::TimestampTz);
        times.append_json(
            Some(&raw("\"2026-01-24T10:00:00.5+01:00\"")),
            Kind::TimestampTz,
        );
        let times = times.finish();
        let times = times
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .expect("timestamp");
        let expected = DateTime::parse_from_rfc3339("2026-01-24T09:00:00.5Z")
            .expect("time")
            .timestamp_micros();
        assert_eq!(times.value(0), expected);

        let mut dates = Column::new(Kind::Date);
        dates.append_json(Some(&raw("\"1970-01-02\"")), Kind::Date);
        let dates = dates.finish();
        let dates = dates.as_any().downcast_ref::<Date32Array>().expect("date");
        assert_eq!(dates.value(0), 1);
    }
}
