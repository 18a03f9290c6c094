//! The leader lease that makes dispatcher replicas active/standby.
//!
//! Per-key ordering needs one consumer of the durable at a time: two replicas pulling from the
//! same durable would each get some events of a key and publish their actions in whatever order
//! they finish. So replicas sharing a name compete for a lease, a key in the JetStream KV bucket
//! `herald_leases` whose `max_age` is the lease TTL. `create` succeeds for one replica only (it
//! is a compare-and-set on "no value"); the holder renews with `update` against the revision it
//! holds, which fails if anyone else has written since. A holder that stops renewing (crash,
//! partition) loses the key when the bucket's TTL removes it, and a standby's next `create`
//! wins. Replicas therefore add availability, not throughput; lanes add throughput.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub const BUCKET: &str = "herald_leases";

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease bucket cannot be reached or created; transient.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}

/// A held lease.
pub struct Lease {
    store: kv::Store,
    name: String,
    holder: String,
    revision: u64,
    ttl: Duration,
}

async fn bucket(js: &jetstream::Context, ttl: Duration) -> Result<kv::Store, LeaseError> {
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: BUCKET.to_owned(),
        description: "Dispatcher leader leases; an entry expires when its holder stops renewing"
            .into(),
        history: 1,
        max_age: ttl,
        ..Default::default()
    })
    .await
    .map_err(|e| LeaseError::Unavailable(e.to_string()))
}

/// Waits until this replica holds the lease for `name`, or `shutdown` (then `None`).
pub async fn acquire(
    js: &jetstream::Context,
    name: &str,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Lease>, LeaseError> {
    let store = bucket(js, ttl).await?;
    let holder = uuid::Uuid::now_v7().to_string();
    let mut announced = false;
    loop {
        match store.create(name, Bytes::from(holder.clone())).await {
            Ok(revision) => {
                tracing::info!(name, holder, "holding the dispatcher lease; active");
                return Ok(Some(Lease {
                    store,
                    name: name.to_owned(),
                    holder,
                    revision,
                    ttl,
                }));
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                if !announced {
                    tracing::info!(
                        name,
                        "another replica holds the dispatcher lease; standing by"
                    );
                    announced = true;
                }
            }
            Err(e) => tracing::warn!(name, error = %e, "cannot reach the lease store"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(ttl / 4) => {}
        }
    }
}

impl Lease {
    /// Renews the lease until `stop` is cancelled, and cancels `stop` itself when the lease is
    /// lost, so dispatch stops before a standby can take over (renewal runs at a quarter of the
    /// TTL, so a lost renewal is noticed with time to spare).
    pub async fn hold(mut self, stop: CancellationToken) -> Self {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return self,
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
                    tracing::warn!(name = %self.name, "dispatcher lease taken over; stopping");
                    stop.cancel();
                    return self;
                }
                Err(e) => {
                    tracing::warn!(name = %self.name, error = %e, "cannot renew the dispatcher lease");
                    // Stop while the lease is surely still ours: half the TTL without renewal.
                    if last_renewed.elapsed() > self.ttl / 2 {
                        stop.cancel();
                        return self;
                    }
                }
            }
        }
    }

    /// Gives the lease up at shutdown so a standby takes over at once, not after the TTL.
    pub async fn release(self) {
        if let Err(e) = self
            .store
            .delete_expect_revision(&self.name, Some(self.revision))
            .await
        {
            tracing::warn!(name = %self.name, error = %e, "could not release the dispatcher lease; it will expire");
        }
    }
}
