//! `herald export`: a table (of the gateway's schema file) from the flight-streamer into a
//! Parquet, Arrow IPC or CSV file, by the file's extension. It talks to the flight-streamer
//! only, never to NATS or PostgreSQL, so an analyst needs nothing but the Flight URL and token.
//!
//! Batches are written as they arrive (memory stays at about one batch, whatever the table's
//! size); the file is written beside its destination and renamed into place only once the
//! export is complete, so an interrupted export never leaves a truncated file behind.
//! Progress (rows, MB, rows/s) is drawn on stderr when it is a terminal (`progress`): a bar
//! over the rows the streamer counts for the ticket (GetFlightInfo's `total_records`), or a
//! spinner when it cannot count in time (-1: a very large table). The count is asked for only
//! when there is a terminal to draw on, since it costs the database a scan of its own.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use crate::progress::Progress;
use arrow::array::{ArrayRef, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_flight::{FlightClient, FlightDescriptor, Ticket};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The table, as the gateway's schema file names it (e.g. orders).
    pub table: String,
    /// Rows to keep: conditions joined by `&`, each `<column><op><value>` with op one of
    /// = != > >= < <= ~ (like), e.g. `created_at>2026-01-01&status=paid`.
    #[arg(long = "where", default_value = "")]
    pub filter: String,
    /// Columns to export, comma-separated (default: every column of the schema file).
    #[arg(long, default_value = "")]
    pub columns: String,
    /// Output file: .parquet, .arrow (Arrow IPC file) or .csv.
    #[arg(long)]
    pub out: PathBuf,
    /// The flight-streamer.
    #[arg(
        long,
        env = "HERALD_FLIGHT_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub flight_url: String,
    /// Its bearer token.
    #[arg(long, env = "HERALD_FLIGHT_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: the output must end in .parquet, .arrow or .csv", .0.display())]
    Format(PathBuf),
    #[error("`{0}` cannot hold `:`")]
    Colon(&'static str),
    #[error("cannot reach the flight-streamer at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the flight-streamer refused or failed the export: {0}")]
    Flight(#[from] arrow_flight::error::FlightError),
    #[error("cannot write {}: {message}", .path.display())]
    Write { path: PathBuf, message: String },
    #[error("interrupted; {} was not written", .0.display())]
    Interrupted(PathBuf),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(Clone, Copy)]
enum Format {
    Parquet,
    Arrow,
    Csv,
}

enum Writer {
    Parquet(parquet::arrow::ArrowWriter<File>),
    Arrow(arrow::ipc::writer::FileWriter<File>),
    Csv(arrow::csv::Writer<File>),
}

impl Writer {
    fn new(format: Format, file: File, schema: &SchemaRef) -> Result<Self, String> {
        Ok(match format {
            Format::Parquet => Writer::Parquet(
                parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)
                    .map_err(|e| e.to_string())?,
            ),
            Format::Arrow => Writer::Arrow(
                arrow::ipc::writer::FileWriter::try_new(file, schema).map_err(|e| e.to_string())?,
            ),
            Format::Csv => Writer::Csv(arrow::csv::Writer::new(file)),
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), String> {
        match self {
            Writer::Parquet(w) => w.write(batch).map_err(|e| e.to_string()),
            Writer::Arrow(w) => w.write(batch).map_err(|e| e.to_string()),
            Writer::Csv(w) => w.write(&csv_times(batch)?).map_err(|e| e.to_string()),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self {
            Writer::Parquet(w) => w.close().map(|_| ()).map_err(|e| e.to_string()),
            Writer::Arrow(mut w) => w.finish().map_err(|e| e.to_string()),
            Writer::Csv(w) => w.into_inner().sync_all().map_err(|e| e.to_string()),
        }
    }
}

/// arrow's CSV writer formats only offset time zones (named ones need the tz database):
/// `UTC` columns are relabelled `+00:00`, the same instants.
fn csv_times(batch: &RecordBatch) -> Result<RecordBatch, String> {
    let schema = batch.schema();
    let columns = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| {
            let column = match column.as_any().downcast_ref::<TimestampMicrosecondArray>() {
                Some(times) if times.timezone() == Some("UTC") => {
                    Arc::new(times.clone().with_timezone("+00:00")) as ArrayRef
                }
                _ => column.clone(),
            };
            (field.name().clone(), column, field.is_nullable())
        });
    RecordBatch::try_from_iter_with_nullable(columns).map_err(|e| e.to_string())
}

fn format_of(path: &Path) -> Result<Format, ExportError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => Ok(Format::Parquet),
        Some("arrow" | "feather" | "ipc") => Ok(Format::Arrow),
        Some("csv") => Ok(Format::Csv),
        _ => Err(ExportError::Format(path.to_owned())),
    }
}

/// The flight-streamer's text ticket `export:<table>:<where>:<columns>`.
fn ticket(args: &ExportArgs) -> Result<String, ExportError> {
    if args.table.contains(':') {
        return Err(ExportError::Colon("the table"));
    }
    if args.columns.contains(':') {
        return Err(ExportError::Colon("--columns"));
    }
    Ok(format!(
        "export:{}:{}:{}",
        args.table, args.filter, args.columns
    ))
}

pub async fn run(
    args: ExportArgs,
    shutdown: CancellationToken,
    out: &mut impl Write,
) -> Result<(), ExportError> {
    let format = format_of(&args.out)?;
    let ticket = ticket(&args)?;
    let connect = |message: String| ExportError::Connect {
        url: args.flight_url.clone(),
        message,
    };
    let channel = tonic::transport::Channel::from_shared(args.flight_url.clone())
        .map_err(|e| connect(e.to_string()))?
        .connect()
        .await
        .map_err(|e| connect(e.to_string()))?;
    let mut client = FlightClient::new(channel);
    client.add_header("authorization", &format!("Bearer {}", args.token))?;
    let progress = if std::io::stderr().is_terminal() {
        let info = client
            .get_flight_info(FlightDescriptor::new_cmd(ticket.clone()))
            .await?;
        match u64::try_from(info.total_records) {
            Ok(total) => Progress::bar(total, "rows"),
            Err(_) => Progress::spinner("rows"),
        }
    } else {
        Progress::spinner("rows")
    };
    let mut stream = client.do_get(Ticket::new(ticket)).await?;

    let partial = args.out.with_extension("partial");
    let write_error = |message: String| ExportError::Write {
        path: args.out.clone(),
        message,
    };
    let file = File::create(&partial).map_err(|e| write_error(e.to_string()))?;
    let started = Instant::now();
    let (mut rows, mut bytes) = (0usize, 0usize);
    let mut writer: Option<Writer> = None;
    let mut file = Some(file);
    let result = loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break Err(ExportError::Interrupted(args.out.clone())),
            next = stream.next() => next,
        };
        let batch = match next {
            None => break Ok(()),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(batch)) => batch,
        };
        if writer.is_none()
            && let Some(file) = file.take()
        {
            match Writer::new(format, file, &batch.schema()) {
                Ok(w) => writer = Some(w),
                Err(e) => break Err(write_error(e)),
            }
        }
        if let Some(w) = writer.as_mut()
            && let Err(e) = w.write(&batch)
        {
            break Err(write_error(e));
        }
        rows += batch.num_rows();
        bytes += batch.get_array_memory_size();
        progress.set_position(rows as u64);
        progress.tally(format!("{:.1} MB", bytes as f64 / 1e6));
    };
    progress.finish();
    let finished = result.and_then(|()| {
        // An empty export still gets a file with the schema, when one was sent.
        let writer = match (writer, file.take(), stream.schema()) {
            (Some(w), _, _) => Some(w),
            (None, Some(file), Some(schema)) => {
                Some(Writer::new(format, file, schema).map_err(write_error)?)
            }
            _ => None,
        };
        if let Some(w) = writer {
            w.finish().map_err(write_error)?;
        }
        std::fs::rename(&partial, &args.out).map_err(|e| write_error(e.to_string()))
    });
    if let Err(e) = finished {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    writeln!(
        out,
        "exported {rows} rows of {} to {} in {:.1}s",
        args.table,
        args.out.display(),
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_follows_the_extension() {
        assert!(matches!(
            format_of(Path::new("a.parquet")),
            Ok(Format::Parquet)
        ));
        assert!(matches!(format_of(Path::new("a.arrow")), Ok(Format::Arrow)));
        assert!(matches!(format_of(Path::new("a.csv")), Ok(Format::Csv)));
        assert!(format_of(Path::new("a.xlsx")).is_err());
    }
}
