//! What the cross-service tests share: service binaries and example scripts as child processes.

// Each test binary that includes this module uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use herald_test_support::{NatsServer, eventually_async, free_port, herald_binary, workspace_root};

const WAIT: Duration = Duration::from_secs(30);

/// A child process (a service binary or a Python example), SIGKILLed on drop; its log is
/// printed when the test is failing.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    admin: Option<u16>,
}

impl Process {
    /// `herald-<name> --config examples/dev/<name>.toml` from the workspace root, on this
    /// stack's NATS and its own admin port, with `env` as its other overrides.
    pub fn service(
        dir: &tempfile::TempDir,
        name: &str,
        env: &[(&str, String)],
        nats: &NatsServer,
    ) -> Self {
        let admin = free_port();
        let mut command = Command::new(herald_binary(&format!("herald-{name}")));
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("HERALD_")) {
            command.env_remove(key);
        }
        command
            .arg("--config")
            .arg(workspace_root().join(format!("examples/dev/{name}.toml")))
            .env("HERALD_NATS__URL", nats.url())
            .env("HERALD_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
            .envs(env.iter().map(|(k, v)| (k, v)));
        let mut process = Self::spawn(dir, name, command);
        process.admin = Some(admin);
        process
    }

    /// `.venv/bin/python -u examples/python/<script> <args>` as the `custom-worker` user's
    /// defaults (the script's own), on this stack's NATS.
    pub fn python(dir: &tempfile::TempDir, script: &str, nats_url: &str, args: &[String]) -> Self {
        let python = workspace_root().join(".venv/bin/python");
        let check = Command::new(&python)
            .args(["-c", "import nats.js"])
            .status();
        assert!(
            check.is_ok_and(|s| s.success()),
            "{} lacks nats-py: run scripts/install-deps",
            python.display()
        );
        let mut command = Command::new(python);
        command
            .arg("-u")
            .arg(workspace_root().join("examples/python").join(script))
            .args(args)
            .env("NATS_URL", nats_url);
        Self::spawn(dir, script, command)
    }

    fn spawn(dir: &tempfile::TempDir, name: &str, mut command: Command) -> Self {
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open a log");
        let err = out.try_clone().expect("clone the log handle");
        let child = command
            .current_dir(workspace_root())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log,
            admin: None,
        }
    }

    pub async fn wait_ready(&mut self, http: &reqwest::Client) {
        let url = format!("http://127.0.0.1:{}/ready", self.admin.expect("a service"));
        let (name, log) = (self.name.clone(), self.log.clone());
        let child = self.child.as_mut().expect("started");
        eventually_async(&format!("{name} to be ready"), WAIT, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let request = http.get(&url).timeout(Duration::from_secs(1)).send();
            async move { request.await.ok().filter(|r| r.status().is_success()) }
        })
        .await;
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log -----\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}
