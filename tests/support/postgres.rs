//! A PostgreSQL cluster made with `initdb` in a temporary directory and started with `pg_ctl`
//! on a free loopback port, trust authentication, user `postgres`.
//!
//! PostgreSQL refuses to run as root; CI and these machines run tests as root, so the cluster
//! then belongs to, and runs as, the `postgres` system user (through `runuser`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::binaries;

pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<(u32, u32)>,
}

impl Postgres {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("herald-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        let run_as = running_as_root().then(postgres_user);
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("hand the cluster directory to the postgres user");
        }
        let port = crate::free_port();
        let pg = Self { dir, port, run_as };
        let data = pg.data_dir();
        pg.run(
            Command::new(binaries::postgres("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-N",
                ]),
            "initdb",
        );
        // Durability settings off: the tests crash servers on purpose, but a test cluster need
        // not survive power loss. Commit timestamps on, as Herald recommends: events' `at` is
        // the commit time.
        let settings = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 200\n\
             track_commit_timestamp = on\n",
            dir = pg.dir.path().display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, settings.as_bytes()))
            .expect("write postgresql.conf");
        pg.start_server();
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn run(&self, command: &mut Command, what: &str) {
        let command = match self.run_as {
            Some(_) => {
                let mut wrapped = Command::new("runuser");
                wrapped
                    .args(["-u", "postgres", "--"])
                    .arg(command.get_program())
                    .args(command.get_args());
                wrapped
            }
            None => std::mem::replace(command, Command::new("true")),
        };
        run_checked(command, what);
    }

    fn start_server(&self) {
        self.run(
            Command::new(binaries::postgres("pg_ctl"))
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "30", "start"]),
            "pg_ctl start",
        );
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() >= deadline {
                panic!("PostgreSQL never listened; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connects to the `postgres` database and creates the example shop in it
    /// (`examples/shop/schema.sql`), the schema most tests and benches run against.
    pub async fn with_shop_schema(&self) -> sqlx::PgPool {
        let path = crate::workspace_root().join("examples/shop/schema.sql");
        let schema = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let pool = sqlx::PgPool::connect(&self.url())
            .await
            .expect("connect to the test PostgreSQL");
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
            .execute(&pool)
            .await
            .expect("apply examples/shop/schema.sql");
        pool
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL to the postmaster: a crash. The next start runs crash recovery.
    pub fn kill(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Orphaned backends keep the port until they notice the postmaster is gone.
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills (if running) and starts again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.data_dir().join("postmaster.pid"));
        self.start_server();
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            // Immediate: the data is thrown away with the directory anyway.
            let _ = Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres"))
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
                .flatten()
        })
        .expect("running as root needs a `postgres` system user (Debian's postgresql package makes one)")
}

fn run_checked(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({command:?}): {e}"));
    if !output.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
