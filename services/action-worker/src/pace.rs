//! Per-destination pacing: at most `per_destination_concurrency` actions run against one
//! destination (`host:port`) at a time in a replica, so a receiver that hangs or crawls holds
//! that many slots, never all of them, and every other destination keeps its pace.
//!
//! An action over the limit first waits a short while for a place, without a worker slot (the
//! worker gives its slot back meanwhile), in a queue per destination: a burst to one fast
//! receiver then runs at the receiver's pace instead of circling through put-backs. The queue
//! holds what the destination can clear within the wait at its recent pace (how long its places
//! were held by actions that ran), and a few times the limit while that pace is unknown, so a
//! fast receiver takes a burst of hundreds while a crawling one queues no more than it can serve.
//! At most `waiting_at_most` actions wait in all. When the queue is full or the wait is over, the
//! action is put back without running (no attempt spent) and comes again shortly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How many actions may wait for one destination, as a multiple of its running limit, while its
/// pace is unknown or slow (the least), and however fast it is (the most).
const QUEUE_PER_PLACE: usize = 4;
const QUEUE_PER_PLACE_MOST: usize = 256;
/// Destinations whose pace is remembered; past this many the memory starts afresh.
const PACES_REMEMBERED: usize = 1024;
/// Weight of the newest hold time in a destination's pace.
const PACE_WEIGHT: f64 = 0.2;

/// Actions running and waiting per destination.
#[derive(Debug)]
pub struct Pacer {
    limit: usize,
    waiting_at_most: usize,
    destinations: Arc<Mutex<Destinations>>,
}

#[derive(Debug, Default)]
struct Destinations {
    by_name: HashMap<String, Destination>,
    /// Waiting for any destination.
    waiting: usize,
    /// Per destination, how long a place was held by an action that ran (a moving average),
    /// kept while the destination is idle so that its next burst is queued at its pace.
    paces: HashMap<String, Duration>,
}

#[derive(Debug, Default)]
struct Destination {
    running: usize,
    waiting: usize,
    /// Told once per freed place.
    freed: Arc<Notify>,
}

/// One running action's place; dropping it frees the place.
#[derive(Debug)]
pub struct Place {
    destination: String,
    destinations: Arc<Mutex<Destinations>>,
    taken: Instant,
    /// Set by `ran`: the drop then learns the destination's pace under the same lock.
    ran: bool,
}

impl Pacer {
    /// `limit` actions run against one destination at once; `waiting_at_most` wait in all.
    pub fn new(limit: usize, waiting_at_most: usize) -> Self {
        let limit = limit.max(1);
        Self {
            limit,
            waiting_at_most,
            destinations: Arc::default(),
        }
    }

    /// A place for one more action against `destination`, or `None` when it has its share.
    pub fn enter(&self, destination: &str) -> Option<Place> {
        let mut destinations = self.lock();
        let entry = destinations
            .by_name
            .entry(destination.to_owned())
            .or_default();
        self.take_place(entry, destination)
    }

    /// A place against `destination`, waiting up to `patience` for one to free; `None` at once
    /// when the destination's queue is full, or when the wait is over.
    pub async fn enter_within(&self, destination: &str, patience: Duration) -> Option<Place> {
        let freed = {
            let mut guard = self.lock();
            // Reborrowed so that the fields borrow apart.
            let destinations = &mut *guard;
            let entry = destinations
                .by_name
                .entry(destination.to_owned())
                .or_default();
            if let Some(place) = self.take_place(entry, destination) {
                return Some(place);
            }
            let queue = self.queue(destinations.paces.get(destination).copied(), patience);
            if entry.waiting >= queue || destinations.waiting >= self.waiting_at_most {
                forget_if_idle(destinations, destination);
                return None;
            }
            entry.waiting += 1;
            let freed = Arc::clone(&entry.freed);
            destinations.waiting += 1;
            freed
        };
        let _waiter = Waiter {
            destination,
            destinations: &self.destinations,
        };
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            tokio::time::timeout_at(deadline, freed.notified())
                .await
                .ok()?;
            let mut destinations = self.lock();
            if let Some(entry) = destinations.by_name.get_mut(destination)
                && let Some(place) = self.take_place(entry, destination)
            {
                return Some(place);
            }
        }
    }

    fn take_place(&self, entry: &mut Destination, destination: &str) -> Option<Place> {
        if entry.running >= self.limit {
            return None;
        }
        entry.running += 1;
        Some(Place {
            destination: destination.to_owned(),
            destinations: Arc::clone(&self.destinations),
            taken: Instant::now(),
            ran: false,
        })
    }

    /// How many may wait for a destination whose places are held for `pace` each: as many as
    /// its places clear within `patience`.
    fn queue(&self, pace: Option<Duration>, patience: Duration) -> usize {
        let per_place = match pace {
            Some(pace) if !pace.is_zero() => {
                let cleared = patience.as_secs_f64() / pace.as_secs_f64();
                // Saturating float-to-int cast; the clamp bounds it either way.
                (cleared as usize).clamp(QUEUE_PER_PLACE, QUEUE_PER_PLACE_MOST)
            }
            Some(_) => QUEUE_PER_PLACE_MOST,
            None => QUEUE_PER_PLACE,
        };
        self.limit.saturating_mul(per_place)
    }

    fn lock(&self) -> MutexGuard<'_, Destinations> {
        lock(&self.destinations)
    }
}

fn lock(destinations: &Mutex<Destinations>) -> MutexGuard<'_, Destinations> {
    destinations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Forgets a destination nobody runs against or waits for.
fn forget_if_idle(destinations: &mut Destinations, destination: &str) {
    if destinations
        .by_name
        .get(destination)
        .is_some_and(|d| d.running == 0 && d.waiting == 0)
    {
        destinations.by_name.remove(destination);
    }
}

/// One waiting action's place in its destination's queue, left when it is dropped (with or
/// without a place).
struct Waiter<'a> {
    destination: &'a str,
    destinations: &'a Mutex<Destinations>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut destinations = lock(self.destinations);
        destinations.waiting = destinations.waiting.saturating_sub(1);
        if let Some(entry) = destinations.by_name.get_mut(self.destination) {
            entry.waiting = entry.waiting.saturating_sub(1);
        }
        forget_if_idle(&mut destinations, self.destination);
    }
}

impl Place {
    /// Frees the place of an action that ran against the destination, learning its pace.
    /// (Dropping the place of one that did not run frees it without that.)
    pub fn ran(mut self) {
        self.ran = true;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut guard = lock(&self.destinations);
        let destinations = &mut *guard;
        if self.ran {
            let held = self.taken.elapsed();
            let paces = &mut destinations.paces;
            if paces.len() >= PACES_REMEMBERED && !paces.contains_key(&self.destination) {
                paces.clear();
            }
            paces
                .entry(self.destination.clone())
                .and_modify(|pace| {
                    *pace = pace.mul_f64(1.0 - PACE_WEIGHT) + held.mul_f64(PACE_WEIGHT);
                })
                .or_insert(held);
        }
        if let Some(entry) = destinations.by_name.get_mut(&self.destination) {
            entry.running = entry.running.saturating_sub(1);
            entry.freed.notify_one();
        }
        forget_if_idle(destinations, &self.destination);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One long waiter per host, queued by the time this returns; abort them when done.
    async fn wait_long(
        pacer: &Arc<Pacer>,
        hosts: &[&'static str],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let waiters = hosts
            .iter()
            .map(|&host| {
                let pacer = Arc::clone(pacer);
                tokio::spawn(async move {
                    pacer.enter_within(host, Duration::from_secs(60)).await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        waiters
    }

    #[test]
    fn a_destination_gets_its_share_and_others_are_unaffected() {
        let pacer = Pacer::new(2, 100);
        let a1 = pacer.enter("a:443");
        let a2 = pacer.enter("a:443");
        assert!(a1.is_some() && a2.is_some());
        assert!(pacer.enter("a:443").is_none(), "over its share");
        assert!(pacer.enter("b:443").is_some(), "another destination");
        drop(a1);
        assert!(pacer.enter("a:443").is_some(), "a freed place is reused");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_next_freed_place() {
        let pacer = Arc::new(Pacer::new(1, 100));
        let running = pacer.enter("a:443").expect("a first place");
        let waiting = {
            let pacer = Arc::clone(&pacer);
            tokio::spawn(async move {
                pacer
                    .enter_within("a:443", Duration::from_secs(5))
                    .await
                    .is_some()
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(running);
        assert!(
            waiting.await.expect("the waiter ends"),
            "it took the freed place"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_empty_at_its_patience_and_a_full_queue_refuses_at_once() {
        let pacer = Pacer::new(1, 100);
        let _running = pacer.enter("a:443").expect("a first place");
        let started = tokio::time::Instant::now();
        assert!(
            pacer
                .enter_within("a:443", Duration::from_millis(300))
                .await
                .is_none()
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));

        let pacer = Arc::new(pacer);
        let waiters = wait_long(&pacer, &["a:443"; QUEUE_PER_PLACE]).await;
        let refused_at = tokio::time::Instant::now();
        assert!(
            pacer
                .enter_within("a:443", Duration::from_secs(60))
                .await
                .is_none(),
            "the queue is full"
        );
        assert_eq!(
            refused_at.elapsed(),
            Duration::ZERO,
            "refused without waiting"
        );
        assert!(
            pacer.enter("b:443").is_some(),
            "other destinations are unaffected"
        );
        for waiter in waiters {
            waiter.abort();
        }
    }

    /// Holds `destination`'s one place for `held`, as an action that ran.
    async fn run_once(pacer: &Pacer, destination: &str, held: Duration) {
        let place = pacer.enter(destination).expect("a free place");
        tokio::time::sleep(held).await;
        place.ran();
    }

    /// How many `enter_within(.., PATIENCE)` calls queue behind a held place before one is
    /// refused at once.
    async fn queued_before_refusal(pacer: &Arc<Pacer>, destination: &'static str) -> usize {
        let _running = pacer.enter(destination).expect("a free place");
        let mut waiters: Vec<tokio::task::JoinHandle<Option<Place>>> = Vec::new();
        loop {
            let pacer = Arc::clone(pacer);
            let waiter =
                tokio::spawn(async move { pacer.enter_within(destination, PATIENCE).await });
            tokio::task::yield_now().await;
            if waiter.is_finished() {
                let queued = waiters.len();
                for waiter in waiters {
                    waiter.abort();
                }
                return queued;
            }
            waiters.push(waiter);
        }
    }

    const PATIENCE: Duration = Duration::from_millis(500);

    #[tokio::test(start_paused = true)]
    async fn a_fast_destination_queues_what_it_clears_within_the_patience() {
        let pacer = Arc::new(Pacer::new(1, 10_000));
        assert_eq!(
            queued_before_refusal(&pacer, "new:443").await,
            QUEUE_PER_PLACE,
            "an unknown pace queues the least"
        );

        run_once(&pacer, "fast:443", Duration::from_millis(2)).await;
        assert_eq!(
            queued_before_refusal(&pacer, "fast:443").await,
            250,
            "500 ms of 2 ms requests"
        );

        run_once(&pacer, "slow:443", Duration::from_millis(400)).await;
        assert_eq!(
            queued_before_refusal(&pacer, "slow:443").await,
            QUEUE_PER_PLACE
        );

        // A place given back by an action that did not run teaches nothing.
        drop(pacer.enter("unran:443"));
        assert_eq!(
            queued_before_refusal(&pacer, "unran:443").await,
            QUEUE_PER_PLACE
        );
    }

    #[tokio::test]
    async fn an_idle_destination_is_forgotten() {
        let pacer = Pacer::new(1, 100);
        let place = pacer.enter("a:443");
        assert!(
            pacer
                .enter_within("a:443", Duration::from_millis(5))
                .await
                .is_none()
        );
        drop(place);
        let left = pacer.lock();
        assert!(left.by_name.is_empty() && left.waiting == 0, "{left:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_cap_wait_across_destinations() {
        let pacer = Arc::new(Pacer::new(1, 2));
        let _a = pacer.enter("a:443").expect("a place at a");
        let _b = pacer.enter("b:443").expect("a place at b");
        let waiters = wait_long(&pacer, &["a:443", "b:443"]).await;
        let refused_at = tokio::time::Instant::now();
        assert!(
            pacer
                .enter_within("a:443", Duration::from_secs(60))
                .await
                .is_none(),
            "two wait already"
        );
        assert_eq!(
            refused_at.elapsed(),
            Duration::ZERO,
            "refused without waiting"
        );
        for waiter in waiters {
            waiter.abort();
        }
    }
}
