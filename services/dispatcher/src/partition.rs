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

use std::collections::BTreeMap;
use std::sync::Arc;

use herald_shared::{retry, subjects};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::lease::{self, Lease};

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
    task: JoinHandle<()>,
}

/// Serves partitions of `count` until `shutdown`, taking and letting go of them as processes
/// come and go. Returns once every served partition has finished and released its lease.
pub async fn serve(dispatcher: Arc<Dispatcher>, count: u32, shutdown: CancellationToken) {
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
        served.retain(|_, s| !s.task.is_finished());
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
                if served.contains_key(&partition.index) {
                    continue;
                }
                match lease::try_acquire(&store, &partition.name, &holder, ttl).await {
                    Ok(Some(lease)) => {
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
                        ));
                        served.insert(partition.index, Served { stop, task });
                        wanted -= 1;
                    }
                    Ok(None) => {}
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
async fn serve_one(
    dispatcher: Arc<Dispatcher>,
    partition: Partition,
    lease: Lease,
    stop: CancellationToken,
) {
    let tenure = lease.tenure();
    let done = CancellationToken::new();
    let holder = tokio::spawn(lease.hold(stop.clone(), done.clone()));
    while !stop.is_cancelled() {
        if let Err(e) = dispatcher.consume(&partition, tenure, &stop).await {
            tracing::warn!(partition = partition.index, error = %e, "dispatch interrupted; binding to the consumer again");
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(dispatcher.settings.retry_delay) => {}
            }
        }
    }
    done.cancel();
    match holder.await {
        Ok(Some(lease)) => lease.release().await,
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "lease holder ended abnormally"),
    }
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
