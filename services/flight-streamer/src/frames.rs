//! Record batches → Flight messages: the schema first, then one message per batch with the
//! resume cursor (the last stream sequence it holds, as decimal text) in `app_metadata`.
//!
//! This encodes with arrow-ipc directly rather than through `FlightDataEncoder`, because that
//! encoder attaches `app_metadata` to the schema message only and may split a batch into
//! several messages behind the caller's back; here a batch above the message limit is split in
//! halves and every piece carries its own exact cursor. A single row above the limit ends the
//! stream with `ResourceExhausted` (the client's decoder would refuse it anyway). No column is
//! dictionary-encoded, so GetSchema returns exactly what DoGet sends.

use std::collections::VecDeque;

use arrow::array::{Array, UInt64Array};
use arrow::datatypes::Schema;
use arrow::ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteContext, IpcWriteOptions};
use arrow::record_batch::RecordBatch;
use arrow_flight::{FlightData, SchemaAsIpc};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::Status;

/// The first batch of a stream holds at most this many rows, whatever `batch_rows` says: the
/// client sees data (and can start working) after a few milliseconds rather than after a full
/// batch has been read and converted.
pub const FIRST_BATCH_ROWS: usize = 1024;

/// Rows sent over Flight, by kind of ticket.
pub const ROWS_SENT: &str = "herald_flight_rows_sent_total";
/// Bytes of Flight messages sent.
pub const BYTES_SENT: &str = "herald_flight_bytes_sent_total";

/// One batch and, for event streams, the cursor to resume after it (for an empty keep-alive
/// batch, the cursor of the last event read).
#[derive(Debug)]
pub struct Frame {
    pub batch: RecordBatch,
    pub cursor: Option<u64>,
}

pub struct Encoder {
    generator: IpcDataGenerator,
    tracker: DictionaryTracker,
    context: IpcWriteContext,
    options: IpcWriteOptions,
    max_message_bytes: usize,
    /// The `seq` column, whose last value is each piece's cursor.
    seq_column: Option<usize>,
    kind: &'static str,
}

impl Encoder {
    pub fn new(max_message_bytes: usize, seq_column: Option<usize>, kind: &'static str) -> Self {
        Self {
            generator: IpcDataGenerator::default(),
            tracker: DictionaryTracker::new(false),
            context: IpcWriteContext::default(),
            options: IpcWriteOptions::default(),
            max_message_bytes,
            seq_column,
            kind,
        }
    }

    pub fn schema(&self, schema: &Schema) -> FlightData {
        SchemaAsIpc::new(schema, &self.options).into()
    }

    /// The messages of one frame, in order.
    pub fn encode(&mut self, frame: Frame) -> Result<Vec<FlightData>, Status> {
        let mut out = Vec::new();
        let mut todo = VecDeque::from([frame.batch]);
        while let Some(batch) = todo.pop_front() {
            let (_, data) = self
                .generator
                .encode(&batch, &mut self.tracker, &self.options, &mut self.context)
                .map_err(|e| Status::internal(format!("cannot encode a record batch: {e}")))?;
            let size = data.ipc_message.len() + data.arrow_data.len();
            if size > self.max_message_bytes {
                let rows = batch.num_rows();
                if rows <= 1 {
                    return Err(Status::resource_exhausted(format!(
                        "a row needs {size} bytes, above the {} byte message limit",
                        self.max_message_bytes
                    )));
                }
                let half = rows / 2;
                todo.push_front(batch.slice(half, rows - half));
                todo.push_front(batch.slice(0, half));
                continue;
            }
            let cursor = self.last_seq(&batch).or(frame.cursor);
            metrics::counter!(ROWS_SENT, "ticket" => self.kind).increment(batch.num_rows() as u64);
            metrics::counter!(BYTES_SENT, "ticket" => self.kind).increment(size as u64);
            let mut message = FlightData::from(data);
            if let Some(cursor) = cursor {
                message.app_metadata = cursor.to_string().into();
            }
            out.push(message);
        }
        Ok(out)
    }

    fn last_seq(&self, batch: &RecordBatch) -> Option<u64> {
        let column = batch.column(self.seq_column?);
        let seq = column.as_any().downcast_ref::<UInt64Array>()?;
        (!seq.is_empty()).then(|| seq.value(seq.len() - 1))
    }
}

/// The DoGet answer: the schema, then the frames the producer sends, encoded. The channel is
/// bounded, so a client that reads slowly leaves the producer waiting on `send`; dropping this
/// stream (the client went away) closes the channel, which stops the producer.
pub fn stream(
    schema: &Schema,
    encoder: Encoder,
    frames: mpsc::Receiver<Result<Frame, Status>>,
) -> impl Stream<Item = Result<FlightData, Status>> + Send + 'static {
    use futures::StreamExt;
    let first = futures::stream::once(std::future::ready(Ok(encoder.schema(schema))));
    let rest = futures::stream::unfold(Some((frames, encoder)), |state| async move {
        let (mut frames, mut encoder) = state?;
        let messages = match frames.recv().await? {
            Ok(frame) => encoder.encode(frame),
            Err(status) => Err(status),
        };
        match messages {
            Ok(messages) => Some((
                futures::stream::iter(messages.into_iter().map(Ok)).left_stream(),
                Some((frames, encoder)),
            )),
            // The error ends the stream: nothing after it is read.
            Err(status) => Some((futures::stream::iter([Err(status)]).right_stream(), None)),
        }
    })
    .flatten();
    first.chain(rest)
}
