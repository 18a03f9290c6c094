//! What `/ready` reports: whether the cluster answers (a watchdog pings it every second) and
//! whether each indexer holds its consumer. When the cluster comes back after failing, it may
//! be a fresh one without templates, so they are installed again before the next bulk.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herald_shared::admin::Readiness;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::document::Kind;

pub struct Health {
    cluster: Mutex<Option<String>>,
    setup_needed: AtomicBool,
    setup: tokio::sync::Mutex<()>,
    indexers: Mutex<BTreeMap<&'static str, Option<String>>>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            cluster: Mutex::new(Some("not contacted yet".into())),
            setup_needed: AtomicBool::new(true),
            setup: tokio::sync::Mutex::new(()),
            indexers: Mutex::new(
                Kind::ALL
                    .iter()
                    .map(|k| (k.as_str(), Some("not started".to_owned())))
                    .collect(),
            ),
        }
    }
}

impl Health {
    pub fn cluster_ok(&self) {
        *lock(&self.cluster) = None;
    }

    /// The cluster failed as a whole: it may come back empty.
    pub fn cluster_failed(&self, reason: &str) {
        *lock(&self.cluster) = Some(reason.to_owned());
        self.setup_needed.store(true, Ordering::Relaxed);
    }

    pub fn indexer(&self, kind: Kind, problem: Option<String>) {
        lock(&self.indexers).insert(kind.as_str(), problem);
    }

    /// Installs the templates if the cluster has not had them since it last failed. Several
    /// indexers may ask at once; one does it.
    pub async fn ensure_setup(&self, cluster: &Cluster) -> Result<(), String> {
        if !self.setup_needed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _one = self.setup.lock().await;
        if !self.setup_needed.load(Ordering::Relaxed) {
            return Ok(());
        }
        match cluster.setup().await {
            Ok(_) => {
                self.setup_needed.store(false, Ordering::Relaxed);
                self.cluster_ok();
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                self.cluster_failed(&reason);
                Err(reason)
            }
        }
    }

    /// Pings the cluster every second until `stop`, keeping the state `/ready` shows.
    pub async fn watch(&self, cluster: &Cluster, stop: CancellationToken) {
        loop {
            match cluster.ping().await {
                Ok(()) => {
                    if self.ensure_setup(cluster).await.is_ok() {
                        self.cluster_ok();
                    }
                }
                Err(e) => self.cluster_failed(&e.to_string()),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// The readiness checks: `cluster` and `indexers`.
    pub fn readiness(self: &std::sync::Arc<Self>, readiness: Readiness) -> Readiness {
        let cluster = std::sync::Arc::clone(self);
        let indexers = std::sync::Arc::clone(self);
        readiness
            .check("cluster", move || {
                let state = lock(&cluster.cluster).clone();
                async move { state.map_or(Ok(()), Err) }
            })
            .check("indexers", move || {
                let problems: Vec<String> = lock(&indexers.indexers)
                    .iter()
                    .filter_map(|(kind, p)| p.as_ref().map(|p| format!("{kind}: {p}")))
                    .collect();
                async move {
                    if problems.is_empty() {
                        Ok(())
                    } else {
                        Err(problems.join("; "))
                    }
                }
            })
    }
}

/// A poisoned lock only means a panic elsewhere; the state inside is still a plain value.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
