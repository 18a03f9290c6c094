//! Partitioned dispatch: HERALD_EVENTS is split into N partitions by key (the stream's subject
//! transform, `streams::partition_transform`), and every dispatcher process sharing a name
//! serves its fair share of them, each partition through its own durable consumer, checkpoint
//! and lease.
//!
//! Every quarter TTL a process announces itself (`lease::announce`), counts the live members,
//! and aims at `ceil(N / members)` partitions: it tries to `create` the leases of partitions it
//! lacks, and lets go of the ones beyond its share, each finishing what it holds, saving its
//! checkpoint and only then releasing its lease. A process that dies stops renewing; its
//! leases and membership expire after the TTL, and the survivors take its partitions over at
//! their next turn. A partition's consumer re-delivers a dead holder's unacked events in order
//! (`Dispatcher::consumer`), so per-key order holds across the move.
//!
//! With N = 1 the single partition keeps the names of the unpartitioned dispatcher (consumer,
//! checkpoint and lease all called `name`), reads every event, and the processes are
//! active/standby exactly as before.
//!
//! A partition's dispatch that panics is noticed: it releases the partition's lease (a lease
//! left renewing by a dead task would keep the partition from everyone), `/ready` fails
//! (`Health`), and the partition is taken up again one turn later, by this process or another.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_shared::admin::Readiness;
use herald_shared::{retry, subjects};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{DispatchError, Dispatcher};
use crate::lease::{self, Lease};

/// Which partitions' dispatch died and is not yet served again, for `/ready`.
#[derive(Debug, Default)]
pub struct Health {
    dead: Mutex<BTreeSet<u32>>,
    deaths: AtomicU64,
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The partitions whose dispatch died and that no process serves again yet.
    pub fn dead(&self) -> Vec<u32> {
        self.lock().iter().copied().collect()
    }

    /// How many times a partition's dispatch died in this process.
    pub fn deaths(&self) -> u64 {
        self.deaths.load(Ordering::SeqCst)
    }

    /// Adds the check `partitions`: failing while a partition's dispatch is dead.
    pub fn readiness(self: &Arc<Self>, readiness: Readiness) -> Readiness {
        let health = Arc::clone(self);
        readiness.check("partitions", move || {
            let dead = health.dead();
            async move {
                if dead.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "the dispatch of partition(s) {dead:?} died and is restarting"
                    ))
                }
            }
        })
    }

    fn died(&self, index: u32) {
        self.deaths.fetch_add(1, Ordering::SeqCst);
        self.lock().insert(index);
    }

    fn served(&self, index: u32) {
        self.lock().remove(&index);
    }

    /// A poisoned lock only means a panic elsewhere; the set inside is still valid.
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<u32>> {
        self.dead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One partition of HERALD_EVENTS as a dispatcher serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
    /// Names its durable consumer, its checkpoint and its lease.
    pub name: String,
    /// What its consumer reads: nothing more than its partition (everything when N = 1).
    pub filters: Vec<String>,
}

impl Partition {
    pub fn new(dispatcher: &str, index: u32, count: u32) -> Self {
        if count <= 1 {
            return Self {
                index: 0,
                count: 1,
                name: dispatcher.to_owned(),
                filters: Vec::new(),
            };
        }
        let mut filters = vec![subjects::events_of_partition(index)];
        if index == 0 {
            // Events published without a key token carry no partition; partition 0 takes them
            // so that none is ever left unread.
            filters.push(subjects::EVENTS_UNKEYED.to_owned());
        }
        Self {
            index,
            count,
            name: format!("{dispatcher}-p{index}"),
            filters,
        }
    }

    /// Every partition of a dispatcher.
    pub fn all(dispatcher: &str, count: u32) -> Vec<Self> {
        (0..count.max(1))
            .map(|index| Self::new(dispatcher, index, count))
            .collect()
    }
}

/// The share of `count` partitions each of `members` processes serves.
pub fn fair_share(count: u32, members: usize) -> usize {
    (count as usize).div_ceil(members.max(1))
}

/// A partition this process serves.
struct Served {
    /// Cancelled to let go of the partition (or when its lease is lost).
    stop: CancellationToken,
    task: JoinHandle<Ended>,
}

/// How serving a partition ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Let go of, its lease lost, or shut down.
    Stopped,
    /// Its dispatch panicked; the lease is released.
    Died,
}

/// Serves partitions of `count` until `shutdown`, taking and letting go of them as processes
/// come and go. Returns once every served partition has finished and released its lease.
pub async fn serve(
    dispatcher: Arc<Dispatcher>,
    count: u32,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    serve_with(
        dispatcher,
        count,
        health,
        shutdown,
        |d, p, tenure, stop| async move { d.consume(&p, tenure, &stop).await },
    )
    .await
}

/// `serve`, with `dispatch` binding to one partition's consumer and dispatching until its stop
/// token is cancelled (so tests can make it die).
async fn serve_with<D, Fut>(
    dispatcher: Arc<Dispatcher>,
    count: u32,
    health: Arc<Health>,
    shutdown: CancellationToken,
    dispatch: D,
) where
    D: Fn(Arc<Dispatcher>, Partition, u64, CancellationToken) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = Result<(), DispatchError>> + Send + 'static,
{
    let settings = &dispatcher.settings;
    let ttl = settings.lease_ttl;
    let Some(store) = retry::until_ok("the lease store", &shutdown, || {
        lease::bucket(&dispatcher.js, ttl)
    })
    .await
    else {
        return;
    };
    let holder = uuid::Uuid::now_v7().to_string();
    let partitions = Partition::all(&settings.name, count);
    let mut served: BTreeMap<u32, Served> = BTreeMap::new();
    let mut announced_standby = false;
    loop {
        // A partition whose dispatch died rests for this turn: it is taken up again at the next
        // one (by whichever process gets its lease), so a poison event is not retried in a
        // tight loop, and `/ready` fails for at least a turn.
        let mut resting = BTreeSet::new();
        let finished: Vec<u32> = served
            .iter()
            .filter(|(_, s)| s.task.is_finished())
            .map(|(i, _)| *i)
            .collect();
        for index in finished {
            if let Some(ended) = served.remove(&index)
                && !matches!(ended.task.await, Ok(Ended::Stopped))
            {
                resting.insert(index);
            }
        }
        let members = match lease::announce(&store, &settings.name, &holder).await {
            Ok(members) => Some(members),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the lease store");
                None
            }
        };
        if let Some(members) = members {
            let share = fair_share(count, members);
            let active: Vec<u32> = served
                .iter()
                .filter(|(_, s)| !s.stop.is_cancelled())
                .map(|(i, _)| *i)
                .collect();
            // Beyond the share: the highest partitions go first, the others keep their order.
            for index in active.iter().skip(share) {
                tracing::info!(
                    partition = index,
                    members,
                    "letting a partition go to another dispatcher"
                );
                served[index].stop.cancel();
            }
            let mut wanted = share.saturating_sub(active.len().min(share));
            // Start the search at a place of this holder's own, so processes starting
            // together do not all race for partition 0 first.
            let offset = holder.bytes().map(u32::from).sum::<u32>() % count.max(1);
            for step in 0..count.max(1) {
                if wanted == 0 {
                    break;
                }
                let partition = &partitions[((offset + step) % count.max(1)) as usize];
                if served.contains_key(&partition.index) || resting.contains(&partition.index) {
                    continue;
                }
                match lease::try_acquire(&store, &partition.name, &holder, ttl).await {
                    Ok(Some(lease)) => {
                        health.served(partition.index);
                        tracing::info!(
                            partition = partition.index,
                            count,
                            members,
                            tenure = lease.tenure(),
                            "serving a partition"
                        );
                        announced_standby = false;
                        let stop = shutdown.child_token();
                        let task = tokio::spawn(serve_one(
                            Arc::clone(&dispatcher),
                            partition.clone(),
                            lease,
                            stop.clone(),
                            Arc::clone(&health),
                            dispatch.clone(),
                        ));
                        served.insert(partition.index, Served { stop, task });
                        wanted -= 1;
                    }
                    // Another process serves it.
                    Ok(None) => health.served(partition.index),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the lease store");
                        break;
                    }
                }
            }
            if served.is_empty() && !announced_standby {
                tracing::info!(
                    members,
                    "every partition is served by another dispatcher; standing by"
                );
                announced_standby = true;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(ttl / 4) => {}
        }
    }
    lease::withdraw(&store, &settings.name, &holder).await;
    for (_, served) in served {
        served.stop.cancel();
        if let Err(e) = served.task.await {
            tracing::warn!(error = %e, "a partition ended abnormally");
        }
    }
}

/// Dispatches one partition while its lease is held and `stop` is not cancelled, then finishes
/// what it holds, saves its checkpoint and releases the lease (still renewing it until then).
/// Dispatch runs as a task of its own, so that if it panics the lease is still released and
/// the death reported to `health`.
async fn serve_one<D, Fut>(
    dispatcher: Arc<Dispatcher>,
    partition: Partition,
    lease: Lease,
    stop: CancellationToken,
    health: Arc<Health>,
    dispatch: D,
) -> Ended
where
    D: Fn(Arc<Dispatcher>, Partition, u64, CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), DispatchError>> + Send + 'static,
{
    let tenure = lease.tenure();
    let index = partition.index;
    let done = CancellationToken::new();
    let holder = tokio::spawn(lease.hold(stop.clone(), done.clone()));
    let work = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.is_cancelled() {
                let retry_delay = dispatcher.settings.retry_delay;
                let bound = dispatch(
                    Arc::clone(&dispatcher),
                    partition.clone(),
                    tenure,
                    stop.clone(),
                );
                if let Err(e) = bound.await {
                    tracing::warn!(partition = partition.index, error = %e, "dispatch interrupted; binding to the consumer again");
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(retry_delay) => {}
                    }
                }
            }
        }
    });
    let ended = match work.await {
        Ok(()) => Ended::Stopped,
        Err(e) => {
            tracing::error!(partition = index, error = %e, "the dispatch of a partition died; releasing it to be served again");
            metrics::counter!("herald_dispatcher_partition_deaths_total").increment(1);
            health.died(index);
            Ended::Died
        }
    };
    done.cancel();
    match holder.await {
        Ok(Some(lease)) => lease.release().await,
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "lease holder ended abnormally"),
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_keeps_the_unpartitioned_names() {
        let only = Partition::new("dispatcher", 0, 1);
        assert_eq!(only.name, "dispatcher");
        assert!(only.filters.is_empty(), "it reads every event");
    }

    #[test]
    fn partitions_read_their_own_subjects_and_zero_takes_the_unkeyed() {
        let all = Partition::all("d", 4);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].name, "d-p0");
        assert_eq!(
            all[0].filters,
            vec!["herald.events.*.*.*.0", "herald.events.*.*"]
        );
        assert_eq!(all[3].filters, vec!["herald.events.*.*.*.3"]);
    }

    /// A partition whose dispatch panics fails `/ready`, gives its lease back and is served
    /// again; the other partition is not disturbed.
    #[tokio::test]
    async fn a_partition_whose_dispatch_dies_fails_readiness_and_is_served_again() {
        use herald_shared::config::StreamsConfig;
        use herald_test_support::{NatsServer, eventually_async};
        use std::collections::HashMap;
        use std::time::Duration;

        let nats = NatsServer::start();
        let js = async_nats::jetstream::new(nats.client().await);
        let streams = StreamsConfig {
            event_partitions: 2,
            ..StreamsConfig::default()
        };
        herald_shared::streams::ensure(&js, &streams, &crate::STREAMS)
            .await
            .expect("provision streams");
        let file = tempfile::NamedTempFile::new().expect("an observers file");
        let settings = crate::DispatcherSettings {
            observers: file.path().to_owned(),
            lease_ttl: Duration::from_secs(2),
            ..Default::default()
        };
        let observers = Arc::new(crate::Observers::load(file.path()).expect("an empty file"));
        let dispatcher = Arc::new(Dispatcher::new(js.clone(), settings, observers));
        let health = Health::new();
        let readiness = health.readiness(Readiness::new());
        let runs: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(serve_with(
            dispatcher,
            2,
            Arc::clone(&health),
            shutdown.clone(),
            {
                let runs = Arc::clone(&runs);
                move |_, partition: Partition, _, stop: CancellationToken| {
                    let run = {
                        let mut runs = runs.lock().expect("runs lock");
                        let run = runs.entry(partition.index).or_default();
                        *run += 1;
                        *run
                    };
                    async move {
                        assert!(
                            !(partition.index == 1 && run == 1),
                            "a poison event in partition 1"
                        );
                        stop.cancelled().await;
                        Ok(())
                    }
                }
            },
        ));
        let runs_of = |index: u32| {
            runs.lock()
                .expect("runs lock")
                .get(&index)
                .copied()
                .unwrap_or(0)
        };
        let wait = Duration::from_secs(20);
        let failures = eventually_async("/ready to name the dead partition", wait, || async {
            let failures = readiness.failures().await;
            (!failures.is_empty()).then_some(failures)
        })
        .await;
        assert!(failures[0].starts_with("partitions:"), "{failures:?}");
        assert_eq!(health.dead(), vec![1]);
        eventually_async("partition 1 to be served again", wait, || async {
            (runs_of(1) == 2 && readiness.failures().await.is_empty()).then_some(())
        })
        .await;
        assert_eq!(health.deaths(), 1);
        assert_eq!(runs_of(0), 1, "the other partition ran on undisturbed");
        shutdown.cancel();
        serving.await.expect("serve ends at shutdown");
    }

    #[test]
    fn shares_cover_every_partition() {
        assert_eq!(fair_share(8, 1), 8);
        assert_eq!(fair_share(8, 3), 3);
        assert_eq!(fair_share(8, 8), 1);
        assert_eq!(fair_share(2, 4), 1);
        for members in 1..10 {
            assert!(fair_share(7, members) * members >= 7);
        }
    }
}
