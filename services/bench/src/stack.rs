//! The stack the bench measures, started by the bench itself so every run starts from the same
//! empty state: nats-server, PostgreSQL and Redis from the test harness on free loopback ports,
//! the example shop's schema, and the four service binaries built next to this one
//! (target/<profile>/herald-*), configured like tests/pipeline.rs with the example observers
//! pointed at the bench's sink. Everything is killed when the stack is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use herald_test_support::{NatsServer, Postgres, RedisServer, free_port, workspace_root};

/// Where the example observers file sends everything; the bench swaps in its own sink.
const EXAMPLE_SINK: &str = "http://127.0.0.1:9900";
pub const API_KEY: &str = "herald-bench-api-key-0123456789";
const WEBHOOK_SECRET: &str = "whsec_aGVyYWxkLWJlbmNoLXdlYmhvb2stc2VjcmV0";
const READY_WAIT: Duration = Duration::from_secs(30);
/// The action worker's `per_destination_concurrency`: every webhook goes to the bench's one sink,
/// so, as README.md's sizing advises for a destination that takes most of the traffic, it gets
/// the whole of the default `concurrency` (32) instead of the default share of 8.
pub const ONE_DESTINATION_CONCURRENCY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("apply examples/shop/schema.sql: {0}")]
    Schema(#[from] sqlx::Error),
    #[error("examples/shop/observers.toml no longer sends to {EXAMPLE_SINK}")]
    ExampleMoved,
    #[error("{0} is missing: build the services first (`cargo build --workspace --bins`)")]
    MissingBinary(PathBuf),
    #[error("{name} exited ({status}) before it was ready; its log:\n{log}")]
    Exited {
        name: &'static str,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("{name} was not ready within {READY_WAIT:?}; its log is {log}")]
    NotReady { name: &'static str, log: PathBuf },
}

/// Attaches what was being done to an I/O error.
fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

pub struct Stack {
    pub graphql_url: String,
    /// A JetStream connection that may read every stream.
    pub js: jetstream::Context,
    services: Vec<Service>,
    _nats: NatsServer,
    _postgres: Postgres,
    _redis: RedisServer,
    dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(sink_url: &str) -> Result<Self, StackError> {
        let nats = NatsServer::start();
        let postgres = Postgres::start();
        let redis = RedisServer::start();
        let dir = tempfile::Builder::new()
            .prefix("herald-bench-")
            .tempdir()
            .map_err(io("create a temp dir for the service configs and logs"))?;
        let shop = workspace_root().join("examples/shop");

        let schema = std::fs::read_to_string(shop.join("schema.sql"))
            .map_err(io("read examples/shop/schema.sql"))?;
        let pool = sqlx::PgPool::connect(&postgres.url()).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
            .execute(&pool)
            .await?;
        pool.close().await;

        let example = std::fs::read_to_string(shop.join("observers.toml"))
            .map_err(io("read examples/shop/observers.toml"))?;
        if !example.contains(EXAMPLE_SINK) {
            return Err(StackError::ExampleMoved);
        }
        let observers = dir.path().join("observers.toml");
        std::fs::write(&observers, example.replace(EXAMPLE_SINK, sink_url))
            .map_err(io("write the bench's observers.toml"))?;

        let graphql = free_port();
        let settings = [
            (
                "gateway",
                format!(
                    "[service]\ndatabase_url = \"{db}\"\nschema_file = \"{schema}\"\n\
                     listen = \"127.0.0.1:{graphql}\"\n\n[service.auth.api_keys]\n\
                     \"{API_KEY}\" = \"herald-bench\"\n",
                    db = postgres.url(),
                    schema = shop.join("gateway-schema.toml").display(),
                ),
            ),
            (
                "dispatcher",
                format!("[service]\nobservers = \"{}\"\n", observers.display()),
            ),
            (
                "action-worker",
                format!(
                    "[service]\nredis_url = \"{}\"\nssrf_allow = [\"127.0.0.1\"]\n\
                     per_destination_concurrency = {ONE_DESTINATION_CONCURRENCY}\n\n\
                     [service.webhook_secrets]\norder_created = \"{WEBHOOK_SECRET}\"\n",
                    redis.url()
                ),
            ),
            (
                "job-worker",
                format!("[service]\nredis_url = \"{}\"\n", redis.url()),
            ),
        ];
        let bin_dir = binary_dir()?;
        let mut services = Vec::new();
        for (name, settings) in settings {
            let admin = free_port();
            let config = dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[nats]\nurl = \"{nats}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
                     [telemetry]\nlog_format = \"pretty\"\nlog_level = \"warn\"\n\n{settings}",
                    nats = nats.url()
                ),
            )
            .map_err(io(format!("write {}", config.display())))?;
            services.push(Service::spawn(name, &bin_dir, &config, dir.path(), admin)?);
        }
        let http = reqwest::Client::new();
        for service in &mut services {
            service.wait_ready(&http).await?;
        }
        let js = nats.jetstream().await;
        Ok(Self {
            graphql_url: format!("http://127.0.0.1:{graphql}/graphql"),
            js,
            services,
            _nats: nats,
            _postgres: postgres,
            _redis: redis,
            dir,
        })
    }

    /// Each service's peak resident set so far (VmHWM, KiB), by service name.
    pub fn peak_rss(&self) -> Vec<(&'static str, Option<u64>)> {
        self.services
            .iter()
            .map(|s| (s.name, s.child.as_ref().and_then(|c| vm_hwm_kib(c.id()))))
            .collect()
    }

    /// Where the services' configs and logs are, for a run that needs explaining.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The service binaries sit beside this one: target/<profile>/herald-bench.
fn binary_dir() -> Result<PathBuf, StackError> {
    let exe = std::env::current_exe().map_err(io("find the bench's own path"))?;
    Ok(exe.parent().map(Path::to_owned).unwrap_or_default())
}

/// `VmHWM:   12345 kB` from /proc/<pid>/status.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

struct Service {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    admin: u16,
}

impl Service {
    fn spawn(
        name: &'static str,
        bin_dir: &Path,
        config: &Path,
        dir: &Path,
        admin: u16,
    ) -> Result<Self, StackError> {
        let binary = bin_dir.join(format!("herald-{name}"));
        if !binary.is_file() {
            return Err(StackError::MissingBinary(binary));
        }
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io(format!("share {}", log.display())))?;
        let mut command = Command::new(&binary);
        // Only the bench's config counts: no HERALD_<SECTION>__<KEY> override from the caller.
        for (key, _) in
            std::env::vars().filter(|(k, _)| k.starts_with("HERALD_") && k.contains("__"))
        {
            command.env_remove(key);
        }
        let child = command
            .arg("--config")
            .arg(config)
            .current_dir(workspace_root())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("start {}", binary.display())))?;
        Ok(Self {
            name,
            child: Some(child),
            log,
            admin,
        })
    }

    async fn wait_ready(&mut self, http: &reqwest::Client) -> Result<(), StackError> {
        let url = format!("http://127.0.0.1:{}/ready", self.admin);
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child
                    .try_wait()
                    .map_err(io(format!("watch {}", self.name)))?
            {
                return Err(StackError::Exited {
                    name: self.name,
                    status,
                    log: std::fs::read_to_string(&self.log).unwrap_or_default(),
                });
            }
            let ready = http
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::NotReady {
                    name: self.name,
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_from_the_vm_hwm_line() {
        let status =
            "Name:\therald-gateway\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(12345));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
    }
}
