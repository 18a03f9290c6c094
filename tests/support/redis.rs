//! A redis-server on a free loopback port with its own directory; append-only persistence on
//! request, for tests that restart Redis and expect to find their data.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::binaries;
use crate::process::{ServerProcess, wait_for_port};

pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    append_only: bool,
    process: ServerProcess,
}

impl RedisServer {
    /// A memory-only server.
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// A server that writes an append-only file with fsync on every write, so a kill -9 and a
    /// restart lose nothing.
    pub fn start_with_aof() -> Self {
        Self::start_inner(true)
    }

    fn start_inner(append_only: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("herald-redis-")
            .tempdir()
            .expect("temp dir for redis");
        let port = crate::free_port();
        let process = Self::spawn(dir.path(), port, append_only);
        Self {
            dir,
            port,
            append_only,
            process,
        }
    }

    fn spawn(dir: &Path, port: u16, append_only: bool) -> ServerProcess {
        let log = dir.join("redis.log");
        let mut command = Command::new(binaries::redis_server());
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "no"])
            .args(["--appendonly", if append_only { "yes" } else { "no" }])
            .args(["--appendfsync", "always"]);
        let process = ServerProcess::spawn("redis-server", command, &log);
        wait_for_port("redis-server", port, Duration::from_secs(10), &log);
        wait_for_pong(port, &log);
        process
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again on the same port and directory (replaying the AOF when there is one).
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(self.dir.path(), self.port, self.append_only);
    }
}

/// Redis accepts connections while still loading its AOF; it is ready when PING answers PONG.
fn wait_for_pong(port: u16, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"PING\r\n")?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            Ok(buf[..n].starts_with(b"+PONG"))
        });
        if matches!(pong, Ok(true)) {
            return;
        }
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("redis-server on port {port} never answered PONG; its log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
