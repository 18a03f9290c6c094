//! An OpenSearch-compatible server (osmem-server, in memory) on a free loopback port, for the
//! auditor's tests. It is started with `-addr 127.0.0.1:0`, picks its own port and announces it
//! as one JSON line on stdout (`{"url":"http://127.0.0.1:PORT",...}`); a restart reuses that
//! port. Being in memory, a killed server comes back empty, like a cluster rebuilt after an
//! outage.
//!
//! The binary comes from the PyPI package `osmem-server` (installed into `.venv` by
//! `scripts/install-deps`); `HERALD_OSMEM_SERVER` points at another one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::ServerProcess;

pub struct OpenSearchServer {
    dir: tempfile::TempDir,
    url: String,
    process: ServerProcess,
}

impl OpenSearchServer {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("herald-osmem-")
            .tempdir()
            .expect("temp dir for osmem-server");
        let (process, url) = Self::spawn(dir.path(), "127.0.0.1:0");
        Self { dir, url, process }
    }

    fn spawn(dir: &Path, addr: &str) -> (ServerProcess, String) {
        let log = dir.join("osmem.log");
        // A fresh log per start, so the announcement read is this start's.
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new(osmem_server());
        command
            .args(["-addr", addr, "-no-stdin-watch", "-parent-pid"])
            .arg(std::process::id().to_string());
        let process = ServerProcess::spawn("osmem-server", command, &log);
        let url = announced_url(&log, Duration::from_secs(15));
        (process, url)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the announced URL ends with a port")
    }

    /// SIGKILL: the cluster is gone (and, in memory, so is everything it held).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again, empty, on the same port.
    pub fn restart(&mut self) {
        self.process.kill();
        let addr = format!("127.0.0.1:{}", self.port());
        let (process, url) = Self::spawn(self.dir.path(), &addr);
        assert_eq!(url, self.url, "osmem-server came back on another address");
        self.process = process;
    }
}

/// Waits for the server's `{"url": ...}` line and returns the URL, once it also accepts
/// connections.
fn announced_url(log: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let url = text.lines().find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            value.get("url")?.as_str().map(str::to_owned)
        });
        if let Some(url) = url {
            let port: Option<u16> = url.rsplit(':').next().and_then(|p| p.parse().ok());
            if port.is_some_and(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok()) {
                return url;
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "osmem-server did not announce a listening URL within {timeout:?}; its log:\n{text}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `HERALD_OSMEM_SERVER`, then `.venv/bin/osmem-server`, then the binary inside the venv's
/// `osmem_server` package, then `PATH`.
pub fn osmem_server() -> PathBuf {
    static FOUND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let venv = crate::workspace_root().join(".venv");
            let bundled = std::fs::read_dir(venv.join("lib"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|python| {
                    python
                        .path()
                        .join("site-packages/osmem_server/bin/osmem-server")
                });
            let on_path = std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("osmem-server"))
                    .find(|c| c.is_file())
            });
            std::env::var_os("HERALD_OSMEM_SERVER")
                .map(PathBuf::from)
                .into_iter()
                .chain([venv.join("bin/osmem-server")])
                .chain(bundled)
                .chain(on_path)
                .find(|candidate| {
                    Command::new(candidate)
                        .arg("-version")
                        .output()
                        .is_ok_and(|o| o.status.success())
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no osmem-server found. Install it with `scripts/install-deps` (the PyPI \
                         package osmem-server in .venv) or point HERALD_OSMEM_SERVER at one."
                    )
                })
        })
        .clone()
}
