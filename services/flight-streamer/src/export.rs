//! Export tickets: rows of a table of the schema file, straight from PostgreSQL as a binary
//! `COPY (SELECT ...) TO STDOUT`, decoded into the Arrow builders as the bytes arrive
//! (`copy`), so at most one batch of rows is in memory whatever the table's size, and a slow
//! client leaves PostgreSQL waiting on the socket. Columns are selected cast to the type their
//! Arrow column decodes (see `schema::Kind::select`); the filter is `filter::Filter`, never
//! SQL text from the ticket.
//!
//! COPY takes no parameters, so the filter's values are bound to `set_config` calls in the
//! export's read-only transaction (`herald.export_p<n>`, local to it) and the COPY's query reads
//! them back with `current_setting`, cast as the compiled filter says: values still travel as
//! bound parameters, never spliced into the statement. When the client goes away mid-COPY the
//! connection is closed rather than returned to the pool (it could only be reused after reading
//! the rest of the COPY), which stops the query in PostgreSQL at once.
//!
//! `FlightInfo.total_records` of an export is `count(*)` of the same query at the time of the
//! request, counted under a `COUNT_TIMEOUT` statement timeout; a count that does not finish in
//! time (a very large table) is reported as -1, unknown. Rows written between the count and the
//! read make the read differ from the count.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use herald_gateway::capture::quote_ident;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tonic::Status;

use crate::columns::Column;
use crate::copy::{CopyError, CopyReader};
use crate::filter::{FilterError, Param};
use crate::frames::{FIRST_BATCH_ROWS, Frame};
use crate::schema::{EntityTypes, TypedColumn};
use crate::ticket::ExportTicket;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ExportError {
    #[error("table {table} has no column `{column}` in the schema file")]
    UnknownColumn { table: String, column: String },
    #[error(transparent)]
    Filter(#[from] FilterError),
}

/// One export, compiled.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// The select with `$n` placeholders (for the count).
    pub sql: String,
    /// The same select reading its values from the transaction's settings (for the COPY).
    pub copy_sql: String,
    pub params: Vec<Param>,
    pub schema: SchemaRef,
    table: String,
    columns: Vec<TypedColumn>,
}

pub fn plan(types: &EntityTypes, ticket: &ExportTicket) -> Result<ExportPlan, ExportError> {
    let columns: Vec<&TypedColumn> = if ticket.columns.is_empty() {
        types.columns.iter().collect()
    } else {
        ticket
            .columns
            .iter()
            .map(|name| {
                types
                    .column(name)
                    .ok_or_else(|| ExportError::UnknownColumn {
                        table: types.table.clone(),
                        column: name.clone(),
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let mut params = Vec::new();
    let (condition, copy_condition) = match &ticket.filter {
        Some(filter) => (
            filter.compile(types, &mut params)?,
            filter.compile_with(types, &mut Vec::new(), &|n| {
                format!("current_setting('{}')", setting(n))
            })?,
        ),
        None => ("TRUE".to_owned(), "TRUE".to_owned()),
    };
    let select = columns
        .iter()
        .map(|c| c.kind.select(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let table = quote_ident(&types.table);
    Ok(ExportPlan {
        sql: format!("SELECT {select} FROM {table} WHERE {condition}"),
        copy_sql: format!("SELECT {select} FROM {table} WHERE {copy_condition}"),
        params,
        schema: types.export_schema(&columns),
        table: types.table.clone(),
        columns: columns.into_iter().cloned().collect(),
    })
}

/// The transaction setting holding the `n`th filter value of an export.
fn setting(n: usize) -> String {
    format!("herald.export_p{n}")
}

/// The longest a `FlightInfo` waits for an export's row count.
pub const COUNT_TIMEOUT: Duration = Duration::from_secs(1);

/// PostgreSQL's `query_canceled`, which a statement timeout raises.
const QUERY_CANCELED: &str = "57014";

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    params: &'q [Param],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for param in params {
        query = match param {
            Param::Text(text) => query.bind(text.as_str()),
            Param::TextArray(items) => query.bind(items.as_slice()),
        };
    }
    query
}

/// A database error while running the plan: a value the cast refuses (e.g. a date out of
/// range) is the ticket's fault, anything else the database's.
fn refused(e: sqlx::Error) -> Status {
    match &e {
        sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("22")) => {
            Status::invalid_argument(format!("export filter: {}", db.message()))
        }
        _ => Status::unavailable(format!("export failed: {e}")),
    }
}

/// An error PostgreSQL raises once the COPY is under way. A data exception (class 22) there is
/// a stored value that the cast to its column's type refuses (a `numeric` beyond float8's
/// range): the table's fault, not the ticket's, unless no row came yet and the filter has
/// values (their casts run on the first row too). It ends the stream with FailedPrecondition
/// naming the table and the rows already sent.
fn refused_midway(e: sqlx::Error, plan: &ExportPlan, rows: usize) -> Status {
    match &e {
        sqlx::Error::Database(db)
            if db.code().is_some_and(|c| c.starts_with("22"))
                && (rows > 0 || plan.params.is_empty()) =>
        {
            Status::failed_precondition(format!(
                "export of `{}` stopped after {rows} rows: PostgreSQL cannot convert a stored \
                 value to its column's type: {} (SQLSTATE {})",
                plan.table,
                db.message(),
                db.code().unwrap_or_default()
            ))
        }
        _ => refused(e),
    }
}

/// The rows the export would yield now, or -1 when counting takes longer than `timeout`.
pub async fn count(pool: &PgPool, plan: &ExportPlan, timeout: Duration) -> Result<i64, Status> {
    let database = |e: sqlx::Error| Status::unavailable(format!("cannot count the export: {e}"));
    let mut tx = pool.begin().await.map_err(database)?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(database)?;
    let millis = timeout.as_millis().max(1);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL statement_timeout = {millis}"
    )))
    .execute(&mut *tx)
    .await
    .map_err(database)?;
    // The text is built from catalogue names (quoted) and `$n` placeholders only (`plan`).
    let sql = format!("SELECT count(*) FROM ({}) AS export", plan.sql);
    let counted = bind_all(
        sqlx::query(sqlx::AssertSqlSafe(sql)).persistent(false),
        &plan.params,
    )
    .fetch_one(&mut *tx)
    .await;
    let total = match counted {
        Ok(row) => sqlx::Row::try_get::<i64, _>(&row, 0).map_err(database)?,
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some(QUERY_CANCELED) => -1,
        Err(e) => return Err(refused(e)),
    };
    tx.rollback().await.map_err(database)?;
    Ok(total)
}

/// Streams the export into `frames`; returns when done, on error (sent as the stream's last
/// item) or as soon as the client has gone.
pub async fn produce(
    pool: PgPool,
    plan: ExportPlan,
    rows_per_batch: usize,
    bytes_per_batch: usize,
    frames: mpsc::Sender<Result<Frame, Status>>,
) {
    if let Err(status) = run(&pool, &plan, rows_per_batch, bytes_per_batch, &frames).await {
        let _ = frames.send(Err(status)).await;
    }
}

struct Closed;

/// How a COPY stopped.
enum Stopped {
    /// Read to its end: the connection is ready for the next statement.
    Done(Result<(), Status>),
    /// Stopped inside the COPY (the client went, or a batch could not be built): the connection
    /// still has the rest of the COPY to read, so it must not go back to the pool.
    Midway(Result<(), Status>),
}

async fn run(
    pool: &PgPool,
    plan: &ExportPlan,
    rows_per_batch: usize,
    bytes_per_batch: usize,
    frames: &mpsc::Sender<Result<Frame, Status>>,
) -> Result<(), Status> {
    let database = |e: sqlx::Error| Status::unavailable(format!("export failed: {e}"));
    let mut conn = pool.acquire().await.map_err(database)?;
    match copy(&mut conn, plan, rows_per_batch, bytes_per_batch, frames).await {
        Stopped::Done(read) => {
            // Read-only: nothing to commit. A connection that cannot even roll back is closed.
            if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await {
                drop(conn.detach());
                return read.and(Err(database(e)));
            }
            read
        }
        Stopped::Midway(read) => {
            // Closing the socket ends the backend's COPY (and its transaction) now.
            drop(conn.detach());
            read
        }
    }
}

async fn copy(
    conn: &mut sqlx::PgConnection,
    plan: &ExportPlan,
    rows_per_batch: usize,
    bytes_per_batch: usize,
    frames: &mpsc::Sender<Result<Frame, Status>>,
) -> Stopped {
    let database = |e: sqlx::Error| Status::unavailable(format!("export failed: {e}"));
    // Until the COPY runs, a failed statement leaves the connection between statements, so a
    // rollback makes it reusable.
    if let Err(e) = sqlx::query("START TRANSACTION READ ONLY")
        .execute(&mut *conn)
        .await
    {
        return Stopped::Done(Err(database(e)));
    }
    for (i, param) in plan.params.iter().enumerate() {
        let name = setting(i + 1);
        let set = match param {
            Param::Text(text) => sqlx::query("SELECT set_config($1, $2, true)")
                .bind(name)
                .bind(text.as_str()),
            // The array's own text form, which the cast in the query parses back.
            Param::TextArray(items) => {
                sqlx::query("SELECT set_config($1, CAST($2 AS text[])::text, true)")
                    .bind(name)
                    .bind(items.as_slice())
            }
        };
        if let Err(e) = set.execute(&mut *conn).await {
            return Stopped::Done(Err(database(e)));
        }
    }
    // The text is built from catalogue names (quoted) and `current_setting` calls only (`plan`).
    let statement = format!("COPY ({}) TO STDOUT (FORMAT binary)", plan.copy_sql);
    match conn.copy_out_raw(&statement).await {
        Ok(copy) => read_copy(copy, plan, rows_per_batch, bytes_per_batch, frames).await,
        // Refused at the start (a value its cast rejects): whether sqlx has read the end of
        // the statement is not certain, so the connection is not reused.
        Err(e) => Stopped::Midway(Err(refused(e))),
    }
}

async fn read_copy(
    mut copy: futures::stream::BoxStream<'_, sqlx::Result<bytes::Bytes>>,
    plan: &ExportPlan,
    rows_per_batch: usize,
    bytes_per_batch: usize,
    frames: &mpsc::Sender<Result<Frame, Status>>,
) -> Stopped {
    let mut batch = ExportBatch::new(plan);
    let mut reader = CopyReader::new();
    let mut row_limit = rows_per_batch.min(FIRST_BATCH_ROWS);
    let mut sent = 0;
    loop {
        let chunk = tokio::select! {
            _ = frames.closed() => return Stopped::Midway(Ok(())),
            chunk = copy.next() => chunk,
        };
        let chunk = match chunk {
            None => break,
            // sqlx has read up to the end of the statement: the connection is usable.
            Some(Err(e)) => {
                return Stopped::Done(Err(refused_midway(e, plan, sent + batch.rows)));
            }
            Some(Ok(chunk)) => chunk,
        };
        match reader.read(&chunk, &mut batch.columns) {
            Ok(appended) => {
                batch.rows += appended.rows;
                batch.bytes += appended.bytes;
            }
            Err(e) => {
                return Stopped::Midway(Err(undecodable(e, plan, sent + batch.rows)));
            }
        }
        if batch.rows >= row_limit || batch.bytes >= bytes_per_batch {
            sent += batch.rows;
            if batch.send(frames).await.is_err() {
                return Stopped::Midway(Ok(()));
            }
            row_limit = rows_per_batch;
        }
    }
    if let Err(e) = reader.finish() {
        return Stopped::Done(Err(undecodable(e, plan, sent + batch.rows)));
    }
    if batch.rows > 0 {
        let _ = batch.send(frames).await;
    }
    Stopped::Done(Ok(()))
}

/// The COPY sent bytes the decoder refuses: the cast chosen for a column (`Kind::select`) does
/// not yield what its builder reads, a defect here rather than in the data.
fn undecodable(e: CopyError, plan: &ExportPlan, rows: usize) -> Status {
    let table = &plan.table;
    let column = match &e {
        CopyError::Value { column, source } => plan.columns.get(*column).map(|c| (c, source)),
        _ => None,
    };
    Status::internal(match column {
        Some((c, source)) => format!(
            "cannot decode the export of `{table}` after {rows} rows: column `{}` ({}): {source}",
            c.name, c.sql_type
        ),
        None => format!("cannot decode the export of `{table}` after {rows} rows: {e}"),
    })
}

struct ExportBatch {
    schema: SchemaRef,
    columns: Vec<Column>,
    rows: usize,
    bytes: usize,
}

impl ExportBatch {
    fn new(plan: &ExportPlan) -> Self {
        Self {
            schema: plan.schema.clone(),
            columns: plan.columns.iter().map(|c| Column::new(c.kind)).collect(),
            rows: 0,
            bytes: 0,
        }
    }

    async fn send(&mut self, frames: &mpsc::Sender<Result<Frame, Status>>) -> Result<(), Closed> {
        let arrays = self.columns.iter_mut().map(Column::finish).collect();
        self.rows = 0;
        self.bytes = 0;
        let frame = RecordBatch::try_new(Arc::clone(&self.schema), arrays)
            .map(|batch| Frame {
                batch,
                cursor: None,
            })
            .map_err(|e| Status::internal(format!("cannot build a record batch: {e}")));
        frames.send(frame).await.map_err(|_| Closed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::datatypes::Schema;

    use super::*;
    use crate::schema::Kind;
    use crate::ticket::Ticket;

    fn orders() -> EntityTypes {
        let column = |name: &str, sql_type: &str| TypedColumn {
            name: name.into(),
            sql_type: sql_type.into(),
            kind: Kind::for_sql(sql_type),
        };
        EntityTypes {
            entity: "Order".into(),
            table: "orders".into(),
            columns: vec![
                column("id", "bigint"),
                column("total", "numeric(12,2)"),
                column("created_at", "timestamp with time zone"),
            ],
            events: Arc::new(Schema::empty()),
        }
    }

    #[test]
    fn the_seed_export_ticket_compiles_to_one_parameterised_select() {
        let Ok(Ticket::Export(ticket)) =
            Ticket::parse(b"export:orders:created_at>2026-01-01:id,total")
        else {
            panic!("an export ticket");
        };
        let plan = plan(&orders(), &ticket).expect("plans");
        assert_eq!(
            plan.sql,
            "SELECT \"id\"::int8, \"total\"::float8 FROM \"orders\" \
             WHERE (\"created_at\" > CAST($1 AS timestamp with time zone))"
        );
        assert_eq!(plan.params, [Param::Text("2026-01-01".into())]);
        assert_eq!(plan.schema.fields().len(), 2);
    }

    #[test]
    fn an_unknown_column_is_refused() {
        let Ok(Ticket::Export(ticket)) = Ticket::parse(b"export:orders::id,password") else {
            panic!("an export ticket");
        };
        assert_eq!(
            plan(&orders(), &ticket).expect_err("refused"),
            ExportError::UnknownColumn {
                table: "orders".into(),
                column: "password".into()
            }
        );
    }

    #[test]
    fn an_undecodable_value_names_the_table_and_its_column() {
        let Ok(Ticket::Export(ticket)) = Ticket::parse(b"export:orders::id,created_at") else {
            panic!("an export ticket");
        };
        let plan = plan(&orders(), &ticket).expect("plans");
        let error = CopyError::Value {
            column: 1,
            source: crate::columns::BinaryError::Width {
                expected: 8,
                found: 3,
            },
        };
        let status = undecodable(error, &plan, 42);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(
            status.message(),
            "cannot decode the export of `orders` after 42 rows: column `created_at` \
             (timestamp with time zone): a binary value of 3 bytes where 8 were expected"
        );
    }
}
