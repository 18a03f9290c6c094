//! Leases: which dispatcher process serves which partition of HERALD_EVENTS.
//!
//! Per-key ordering needs one consumer of a partition's durable at a time: two processes pulling
//! from the same durable would each get some events of a key and publish their actions in
//! whatever order they finish. So each partition is owned through a lease, a key in the
//! JetStream KV bucket `herald_leases` whose `max_age` is the lease TTL. `create` succeeds for
//! one process only (it is a compare-and-set on "no value"); the holder renews with `update`
//! against the revision it holds, which fails if anyone else has written since. A holder that
//! stops renewing (crash, network partition) loses the key when the bucket's TTL removes it, and
//! another process's next `create` wins. The holder itself stops serving once half the TTL has
//! passed without a renewal, so it has stopped long before anyone else can take over.
//!
//! The revision of the `create` names one tenure: KV revisions only grow, so a later holder's
//! tenure always has a higher one. The dispatcher stamps it on every action request it
//! publishes (`Herald-Lease-Revision`), which makes "never two holders at once" checkable from
//! the actions stream alone.
//!
//! Processes also announce themselves under `members.<name>.<holder>` in the same bucket
//! (renewed like a lease, gone with the TTL when the process dies), so each knows how many
//! share the partitions and takes only its fair share (`partition`).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use herald_shared::{streams, subjects};
use tokio_util::sync::CancellationToken;

pub const BUCKET: &str = "herald_leases";

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease bucket cannot be reached or created; transient.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Unavailable(e.to_string())
}

/// A held lease.
pub struct Lease {
    store: kv::Store,
    name: String,
    holder: String,
    /// The revision of the `create` that began this tenure.
    tenure: u64,
    revision: u64,
    ttl: Duration,
}

/// The lease bucket, created on first use with as many copies as HERALD_EVENTS (so losing a
/// cluster node loses no lease).
pub async fn bucket(js: &jetstream::Context, ttl: Duration) -> Result<kv::Store, LeaseError> {
    let config = kv::Config {
        bucket: BUCKET.to_owned(),
        description: "Dispatcher partition leases; an entry expires when its holder stops renewing"
            .into(),
        history: 1,
        max_age: ttl,
        ..Default::default()
    };
    streams::key_value(js, config, subjects::EVENTS_STREAM)
        .await
        .map_err(unavailable)
}

/// One attempt at the lease `name`: `Some` when this process now holds it, `None` when another
/// does.
pub async fn try_acquire(
    store: &kv::Store,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Option<Lease>, LeaseError> {
    match store.create(name, Bytes::from(holder.to_owned())).await {
        Ok(revision) => Ok(Some(Lease {
            store: store.clone(),
            name: name.to_owned(),
            holder: holder.to_owned(),
            tenure: revision,
            revision,
            ttl,
        })),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

/// Announces `holder` as a live member of dispatcher `name` (call every quarter TTL), and
/// returns how many members are alive, this one included.
pub async fn announce(store: &kv::Store, name: &str, holder: &str) -> Result<usize, LeaseError> {
    let prefix = format!("members.{name}.");
    store
        .put(format!("{prefix}{holder}"), Bytes::new())
        .await
        .map_err(unavailable)?;
    let mut keys = store.keys().await.map_err(unavailable)?;
    let mut members = 0;
    while let Some(key) = keys.next().await {
        if key.map_err(unavailable)?.starts_with(&prefix) {
            members += 1;
        }
    }
    Ok(members.max(1))
}

/// Withdraws the announcement at shutdown, so the others take the partitions at once.
pub async fn withdraw(store: &kv::Store, name: &str, holder: &str) {
    if let Err(e) = store.purge(format!("members.{name}.{holder}")).await {
        tracing::warn!(name, error = %e, "could not withdraw membership; it will expire");
    }
}

impl Lease {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The revision that began this tenure; higher for every later holder.
    pub fn tenure(&self) -> u64 {
        self.tenure
    }

    /// Renews the lease until `done` is cancelled. When the lease is lost (taken over, or not
    /// renewed for half the TTL) it cancels `stop`, so dispatch stops before anyone else can
    /// take over, and returns `None`. Renewal goes on while a stopped partition finishes what
    /// it holds: `done` is cancelled only after that.
    pub async fn hold(mut self, stop: CancellationToken, done: CancellationToken) -> Option<Self> {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = done.cancelled() => return Some(self),
                _ = tokio::time::sleep(self.ttl / 4) => {}
            }
            match self
                .store
                .update(&self.name, Bytes::from(self.holder.clone()), self.revision)
                .await
            {
                Ok(revision) => {
                    self.revision = revision;
                    last_renewed = tokio::time::Instant::now();
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(lease = %self.name, "lease taken over; stopping");
                    stop.cancel();
                    return None;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot renew the lease");
                    // Stop while the lease is surely still ours: half the TTL without renewal.
                    if last_renewed.elapsed() > self.ttl / 2 {
                        stop.cancel();
                        return None;
                    }
                }
            }
        }
    }

    /// Gives the lease up so another process takes over at once, not after the TTL.
    pub async fn release(self) {
        if let Err(e) = self
            .store
            .delete_expect_revision(&self.name, Some(self.revision))
            .await
        {
            tracing::warn!(lease = %self.name, error = %e, "could not release the lease; it will expire");
        }
    }
}
