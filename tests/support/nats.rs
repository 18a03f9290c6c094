//! A nats-server with JetStream on a free loopback port and its own store directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::binaries;
use crate::process::{ServerProcess, wait_for_port};

pub struct NatsServer {
    dir: tempfile::TempDir,
    port: u16,
    process: ServerProcess,
}

impl NatsServer {
    /// A server with JetStream and no authentication.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// A server whose configuration also contains `extra` (e.g. an `include` of the repo's
    /// `nats/auth.conf`).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("herald-nats-")
            .tempdir()
            .expect("temp dir for nats-server");
        let port = crate::free_port();
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: herald_test_{port}\n\
             jetstream {{\n  store_dir: \"{store}\"\n}}\n{extra}\n",
            store = dir.path().join("jetstream").display(),
        );
        std::fs::write(dir.path().join("nats.conf"), config).expect("write nats.conf");
        let process = Self::spawn(dir.path(), port);
        Self { dir, port, process }
    }

    fn spawn(dir: &Path, port: u16) -> ServerProcess {
        let log = dir.join("nats.log");
        let mut command = Command::new(binaries::nats_server());
        command.arg("-c").arg(dir.join("nats.conf"));
        let process = ServerProcess::spawn("nats-server", command, &log);
        wait_for_port("nats-server", port, Duration::from_secs(15), &log);
        process
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// A client without credentials.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to test nats-server at {}: {e}", self.url()))
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again on the same port with the same store (JetStream recovers its streams).
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(self.dir.path(), self.port);
    }
}
