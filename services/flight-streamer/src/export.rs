//! Export tickets: rows of a table of the schema file, straight from PostgreSQL, through a
//! server-side cursor (`DECLARE ... NO SCROLL CURSOR` in a read-only transaction, then
//! `FETCH FORWARD <batch rows>`), so at most one fetch of rows is in memory whatever the table's
//! size. Columns are selected cast to the type their Arrow column decodes (see
//! `schema::Kind::select`); the filter is `filter::Filter`, values bound, never spliced.
//! When the client goes away the transaction is dropped, which rolls back and closes the
//! cursor.
//!
//! `FlightInfo.total_records` of an export is `count(*)` of the same query at the time of the
//! request, counted under a `COUNT_TIMEOUT` statement timeout; a count that does not finish in
//! time (a very large table) is reported as -1, unknown. Rows written between the count and the
//! read make the read differ from the count.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use herald_gateway::capture::quote_ident;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tonic::Status;

use crate::columns::Column;
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
    pub sql: String,
    pub params: Vec<Param>,
    pub schema: SchemaRef,
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
    let condition = match &ticket.filter {
        Some(filter) => filter.compile(types, &mut params)?,
        None => "TRUE".to_owned(),
    };
    let select = columns
        .iter()
        .map(|c| c.kind.select(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(ExportPlan {
        sql: format!(
            "SELECT {select} FROM {} WHERE {condition}",
            quote_ident(&types.table)
        ),
        params,
        schema: types.export_schema(&columns),
        columns: columns.into_iter().cloned().collect(),
    })
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

async fn run(
    pool: &PgPool,
    plan: &ExportPlan,
    rows_per_batch: usize,
    bytes_per_batch: usize,
    frames: &mpsc::Sender<Result<Frame, Status>>,
) -> Result<(), Status> {
    let database = |e: sqlx::Error| Status::unavailable(format!("export failed: {e}"));
    let mut tx = pool.begin().await.map_err(database)?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(database)?;
    let declare = format!("DECLARE herald_export NO SCROLL CURSOR FOR {}", plan.sql);
    // The text is built from catalogue names (quoted) and `$n` placeholders only (`plan`).
    bind_all(
        sqlx::query(sqlx::AssertSqlSafe(declare)).persistent(false),
        &plan.params,
    )
    .execute(&mut *tx)
    .await
    .map_err(refused)?;
    let read = read_cursor(&mut tx, plan, rows_per_batch, bytes_per_batch, frames).await;
    // Read-only: nothing to commit. Rolling back at once, also when the client has gone, closes
    // the cursor now rather than when the pool next hands out the connection.
    tx.rollback().await.map_err(database)?;
    read
}

async fn read_cursor(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    plan: &ExportPlan,
    rows_per_batch: usize,
    bytes_per_batch: usize,
    frames: &mpsc::Sender<Result<Frame, Status>>,
) -> Result<(), Status> {
    let database = |e: sqlx::Error| Status::unavailable(format!("export failed: {e}"));
    let fetch = format!("FETCH FORWARD {rows_per_batch} FROM herald_export");
    let mut batch = ExportBatch::new(plan);
    let mut row_limit = rows_per_batch.min(FIRST_BATCH_ROWS);
    loop {
        let mut fetched = 0;
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(fetch.as_str())).fetch(&mut **tx);
        loop {
            let row = tokio::select! {
                _ = frames.closed() => return Ok(()),
                row = rows.try_next() => row.map_err(database)?,
            };
            let Some(row) = row else { break };
            fetched += 1;
            batch.push(&row).map_err(database)?;
            if batch.rows >= row_limit || batch.bytes >= bytes_per_batch {
                if batch.send(frames).await.is_err() {
                    return Ok(());
                }
                row_limit = rows_per_batch;
            }
        }
        if fetched < rows_per_batch {
            break;
        }
    }
    if batch.rows > 0 {
        let _ = batch.send(frames).await;
    }
    Ok(())
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

    fn push(&mut self, row: &sqlx::postgres::PgRow) -> Result<(), sqlx::Error> {
        for (i, column) in self.columns.iter_mut().enumerate() {
            self.bytes += column.append_sql(row, i)?;
        }
        self.rows += 1;
        Ok(())
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
}
