//! `herald schema init`: a starting gateway schema file, introspected from the database.
//!
//! The introspection and the file format are the gateway's own (`herald_gateway::introspect`,
//! `SchemaFile::to_toml`), so what this writes is exactly what the gateway reads and checks at
//! start. It talks to PostgreSQL only, never to NATS.
//!
//! An existing file is a hand-edited schema more often than not, so it is never overwritten
//! without `--force`; the file is created with `create_new`, which makes the check and the
//! creation one step, not a race.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_gateway::schema::SchemaError as IntrospectError;
use sqlx::postgres::PgPoolOptions;

#[derive(Debug, clap::Subcommand)]
pub enum SchemaCommand {
    /// Write a starting gateway schema file from the database: every table of the current schema
    /// with a single-column primary key becomes an entity, every column a field, every
    /// single-column foreign key a relation. Prints the TOML, or writes it to --out and prints
    /// `wrote <n> entities to <file>`.
    Init {
        /// PostgreSQL URL, e.g. postgres://user:password@host:5432/app.
        #[arg(long)]
        database_url: String,
        /// Write the file here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite --out if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot introspect the database: {0}")]
    Introspect(#[from] IntrospectError),
    #[error("cannot encode the schema file: {0}")]
    Encode(#[from] toml::ser::Error),
    #[error("{} already exists; pass --force to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

pub async fn run(command: SchemaCommand, out: &mut impl Write) -> Result<(), SchemaError> {
    match command {
        SchemaCommand::Init {
            database_url,
            out: file,
            force,
        } => init(&database_url, file.as_deref(), force, out).await,
    }
}

async fn init(
    database_url: &str,
    file: Option<&Path>,
    force: bool,
    out: &mut impl Write,
) -> Result<(), SchemaError> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(database_url)
        .await
        .map_err(SchemaError::Connect)?;
    let schema = herald_gateway::introspect(&pool).await;
    pool.close().await;
    let schema = schema?;
    let text = schema.to_toml()?;
    let Some(path) = file else {
        out.write_all(text.as_bytes())?;
        return Ok(());
    };
    let mut options = OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let write_error = |source: std::io::Error| SchemaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut written = options.open(path).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => SchemaError::Exists(path.to_owned()),
        _ => write_error(e),
    })?;
    written.write_all(text.as_bytes()).map_err(write_error)?;
    written.sync_all().map_err(write_error)?;
    writeln!(
        out,
        "wrote {} entities to {}",
        schema.entities.len(),
        path.display()
    )?;
    Ok(())
}
