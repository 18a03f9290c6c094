//! PostgreSQL's binary COPY format (`COPY (...) TO STDOUT (FORMAT binary)`), decoded straight
//! into an export's column builders: no row objects, no per-value allocation, which is what
//! lets an export keep up with what PostgreSQL sends (a cursor read through sqlx spends most of
//! its time building a row per row).
//!
//! The stream is a header (signature, flags, extension), then tuples (an i16 field count, then
//! per field an i32 length, -1 for NULL, and the value's bytes), then an i16 -1 trailer. Chunks
//! may cut a tuple anywhere; an incomplete tuple waits for the next chunk.

use crate::columns::{BinaryError, Column};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CopyError {
    #[error("the COPY stream does not start with the binary signature")]
    Signature,
    #[error("a COPY row of {found} fields where the export selects {expected}")]
    Fields { expected: usize, found: i16 },
    #[error("a negative COPY field length {0}")]
    Length(i32),
    #[error("column {column}: {source}")]
    Value { column: usize, source: BinaryError },
    #[error("the COPY stream ended inside a row or without its trailer")]
    Truncated,
    #[error("data after the COPY trailer")]
    AfterTrailer,
}

/// Rows and value bytes appended by one `read`.
#[derive(Debug, Default, PartialEq)]
pub struct Appended {
    pub rows: usize,
    pub bytes: usize,
}

#[derive(Debug, Default)]
pub struct CopyReader {
    /// The start of a tuple (or of the header) that the last chunk cut.
    pending: Vec<u8>,
    header_read: bool,
    ended: bool,
}

impl CopyReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends every complete row that `chunk` (after what earlier chunks left) holds.
    pub fn read(&mut self, chunk: &[u8], columns: &mut [Column]) -> Result<Appended, CopyError> {
        if self.pending.is_empty() {
            let (consumed, appended) = self.parse(chunk, columns)?;
            self.pending.extend_from_slice(&chunk[consumed..]);
            Ok(appended)
        } else {
            let mut buffer = std::mem::take(&mut self.pending);
            buffer.extend_from_slice(chunk);
            let (consumed, appended) = self.parse(&buffer, columns)?;
            buffer.drain(..consumed);
            self.pending = buffer;
            Ok(appended)
        }
    }

    /// Whether the stream ended exactly at its trailer.
    pub fn finish(&self) -> Result<(), CopyError> {
        if self.ended && self.pending.is_empty() {
            Ok(())
        } else {
            Err(CopyError::Truncated)
        }
    }

    /// Parses what `buffer` holds completely; returns the bytes consumed.
    fn parse(
        &mut self,
        buffer: &[u8],
        columns: &mut [Column],
    ) -> Result<(usize, Appended), CopyError> {
        let mut at = 0;
        let mut appended = Appended::default();
        if !self.header_read {
            let Some(end) = header_end(buffer)? else {
                return Ok((0, appended));
            };
            self.header_read = true;
            at = end;
        }
        while at < buffer.len() {
            if self.ended {
                return Err(CopyError::AfterTrailer);
            }
            let Some(tuple) = Tuple::at(&buffer[at..], columns.len())? else {
                break;
            };
            let Tuple::Row(len) = tuple else {
                self.ended = true;
                at += 2;
                continue;
            };
            appended.bytes += append(&buffer[at..at + len], columns)?;
            appended.rows += 1;
            at += len;
        }
        Ok((at, appended))
    }
}

/// Where the header ends, once `buffer` holds all of it.
fn header_end(buffer: &[u8]) -> Result<Option<usize>, CopyError> {
    if buffer.len() < SIGNATURE.len() + 8 {
        if !SIGNATURE.starts_with(&buffer[..buffer.len().min(SIGNATURE.len())]) {
            return Err(CopyError::Signature);
        }
        return Ok(None);
    }
    if &buffer[..SIGNATURE.len()] != SIGNATURE {
        return Err(CopyError::Signature);
    }
    let extension = i32_at(buffer, SIGNATURE.len() + 4);
    let extension = usize::try_from(extension).map_err(|_| CopyError::Length(extension))?;
    let end = SIGNATURE.len() + 8 + extension;
    Ok((buffer.len() >= end).then_some(end))
}

enum Tuple {
    /// A complete row of this many bytes.
    Row(usize),
    Trailer,
}

impl Tuple {
    /// The tuple starting `buffer`, if it holds all of it.
    fn at(buffer: &[u8], fields: usize) -> Result<Option<Tuple>, CopyError> {
        if buffer.len() < 2 {
            return Ok(None);
        }
        let count = i16::from_be_bytes([buffer[0], buffer[1]]);
        if count == -1 {
            return Ok(Some(Tuple::Trailer));
        }
        if usize::try_from(count).ok() != Some(fields) {
            return Err(CopyError::Fields {
                expected: fields,
                found: count,
            });
        }
        let mut at = 2;
        for _ in 0..fields {
            if buffer.len() < at + 4 {
                return Ok(None);
            }
            let len = i32_at(buffer, at);
            at += 4;
            if len == -1 {
                continue;
            }
            at += usize::try_from(len).map_err(|_| CopyError::Length(len))?;
            if buffer.len() < at {
                return Ok(None);
            }
        }
        Ok(Some(Tuple::Row(at)))
    }
}

/// Appends one complete tuple (checked by `Tuple::at`).
fn append(tuple: &[u8], columns: &mut [Column]) -> Result<usize, CopyError> {
    let mut at = 2;
    let mut bytes = 0;
    for (index, column) in columns.iter_mut().enumerate() {
        let len = i32_at(tuple, at);
        at += 4;
        let value = match usize::try_from(len) {
            Ok(len) => {
                let value = &tuple[at..at + len];
                at += len;
                Some(value)
            }
            Err(_) => None,
        };
        bytes += column
            .append_binary(value)
            .map_err(|source| CopyError::Value {
                column: index,
                source,
            })?;
    }
    Ok(bytes)
}

fn i32_at(buffer: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]])
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Date32Type, Int64Type, TimestampMicrosecondType};

    use super::*;
    use crate::schema::Kind;

    fn header() -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        out
    }

    fn tuple(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = (values.len() as i16).to_be_bytes().to_vec();
        for value in values {
            match value {
                Some(v) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out
    }

    fn columns() -> Vec<Column> {
        [Kind::Int, Kind::Text, Kind::TimestampTz, Kind::Date]
            .into_iter()
            .map(Column::new)
            .collect()
    }

    fn stream() -> Vec<u8> {
        let mut out = header();
        // 2000-01-01 plus one second; 2000-01-02.
        let micros = 1_000_000i64.to_be_bytes();
        let day = 1i32.to_be_bytes();
        out.extend(tuple(&[
            Some(&7i64.to_be_bytes()),
            Some("grüße".as_bytes()),
            Some(&micros),
            Some(&day),
        ]));
        out.extend(tuple(&[None, None, None, None]));
        out.extend(tuple(&[
            Some(&(-3i64).to_be_bytes()),
            Some(b""),
            Some(&i64::MAX.to_be_bytes()),
            Some(&i32::MIN.to_be_bytes()),
        ]));
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn check(mut columns: Vec<Column>) {
        let arrays: Vec<_> = columns.iter_mut().map(Column::finish).collect();
        let ints = arrays[0].as_primitive::<Int64Type>();
        assert_eq!(ints.iter().collect::<Vec<_>>(), [Some(7), None, Some(-3)]);
        let texts = arrays[1].as_string::<i32>();
        assert_eq!(
            texts.iter().collect::<Vec<_>>(),
            [Some("grüße"), None, Some("")]
        );
        let times = arrays[2].as_primitive::<TimestampMicrosecondType>();
        assert_eq!(times.value(0), 946_684_801_000_000);
        assert!(times.is_null(1) && times.is_null(2), "NULL and infinity");
        let dates = arrays[3].as_primitive::<Date32Type>();
        assert_eq!(dates.value(0), 10_958);
        assert!(dates.is_null(1) && dates.is_null(2));
    }

    #[test]
    fn a_stream_in_one_chunk_becomes_typed_values_with_nulls() {
        let mut columns = columns();
        let mut reader = CopyReader::new();
        let appended = reader.read(&stream(), &mut columns).expect("decodes");
        assert_eq!(appended.rows, 3);
        reader.finish().expect("complete");
        check(columns);
    }

    #[test]
    fn chunks_cut_anywhere_give_the_same_rows() {
        let bytes = stream();
        for size in [1, 2, 3, 5, 7, 19, 20, 64] {
            let mut columns = columns();
            let mut reader = CopyReader::new();
            let rows: usize = bytes
                .chunks(size)
                .map(|c| reader.read(c, &mut columns).expect("decodes").rows)
                .sum();
            assert_eq!(rows, 3, "chunks of {size}");
            reader.finish().expect("complete");
            check(columns);
        }
    }

    #[test]
    fn a_truncated_or_malformed_stream_is_an_error_never_a_panic() {
        let bytes = stream();
        let mut reader = CopyReader::new();
        let mut columns = columns();
        reader
            .read(&bytes[..bytes.len() - 5], &mut columns)
            .expect("so far fine");
        assert_eq!(reader.finish(), Err(CopyError::Truncated));

        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert_eq!(
            CopyReader::new().read(&wrong, &mut columns).map(|_| ()),
            Err(CopyError::Signature)
        );

        let mut three = header();
        three.extend(tuple(&[None, None, None]));
        assert!(matches!(
            CopyReader::new().read(&three, &mut columns),
            Err(CopyError::Fields {
                expected: 4,
                found: 3
            })
        ));

        let mut short = header();
        short.extend(tuple(&[Some(b"1234"), None, None, None]));
        assert!(matches!(
            CopyReader::new().read(&short, &mut columns),
            Err(CopyError::Value { column: 0, .. })
        ));

        let mut latin1 = header();
        latin1.extend(tuple(&[None, Some(b"\xe9t\xe9"), None, None]));
        assert!(matches!(
            CopyReader::new().read(&latin1, &mut columns),
            Err(CopyError::Value { column: 1, .. })
        ));

        let mut after = bytes;
        after.extend(tuple(&[None, None, None, None]));
        assert_eq!(
            CopyReader::new().read(&after, &mut columns).map(|_| ()),
            Err(CopyError::AfterTrailer)
        );
    }
}
