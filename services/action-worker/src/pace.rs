//! Per-destination pacing: at most `per_destination_concurrency` actions run against one
//! destination (`host:port`) at a time in a replica, so a receiver that hangs or crawls holds
//! that many slots, never all of them, and every other destination keeps its pace.
//!
//! An action over the limit first waits a short while for a place, without a worker slot (the
//! worker gives its slot back meanwhile), in a queue of a few times the limit per destination:
//! a burst to one fast receiver then runs at the receiver's pace instead of circling through
//! put-backs. When the queue is full or the wait is over, the action is put back without running
//! (no attempt spent) and comes again shortly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

/// How many actions may wait for one destination, as a multiple of its running limit.
const QUEUE_PER_PLACE: usize = 4;

/// Actions running and waiting per destination.
#[derive(Debug)]
pub struct Pacer {
    limit: usize,
    queue: usize,
    destinations: Arc<Mutex<HashMap<String, Destination>>>,
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
    destinations: Arc<Mutex<HashMap<String, Destination>>>,
}

impl Pacer {
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Self {
            limit,
            queue: limit.saturating_mul(QUEUE_PER_PLACE),
            destinations: Arc::default(),
        }
    }

    /// A place for one more action against `destination`, or `None` when it has its share.
    pub fn enter(&self, destination: &str) -> Option<Place> {
        let mut destinations = self.lock();
        let entry = destinations.entry(destination.to_owned()).or_default();
        self.take_place(entry, destination)
    }

    /// A place against `destination`, waiting up to `patience` for one to free; `None` at once
    /// when the destination's queue is full, or when the wait is over.
    pub async fn enter_within(&self, destination: &str, patience: Duration) -> Option<Place> {
        let freed = {
            let mut destinations = self.lock();
            let entry = destinations.entry(destination.to_owned()).or_default();
            if let Some(place) = self.take_place(entry, destination) {
                return Some(place);
            }
            if entry.waiting >= self.queue {
                return None;
            }
            entry.waiting += 1;
            Arc::clone(&entry.freed)
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
            if let Some(entry) = destinations.get_mut(destination)
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
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Destination>> {
        lock(&self.destinations)
    }
}

fn lock(
    destinations: &Mutex<HashMap<String, Destination>>,
) -> MutexGuard<'_, HashMap<String, Destination>> {
    destinations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Forgets a destination nobody runs against or waits for.
fn forget_if_idle(destinations: &mut HashMap<String, Destination>, destination: &str) {
    if destinations
        .get(destination)
        .is_some_and(|d| d.running == 0 && d.waiting == 0)
    {
        destinations.remove(destination);
    }
}

/// One waiting action's place in its destination's queue, left when it is dropped (with or
/// without a place).
struct Waiter<'a> {
    destination: &'a str,
    destinations: &'a Mutex<HashMap<String, Destination>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut destinations = lock(self.destinations);
        if let Some(entry) = destinations.get_mut(self.destination) {
            entry.waiting = entry.waiting.saturating_sub(1);
        }
        forget_if_idle(&mut destinations, self.destination);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut destinations = lock(&self.destinations);
        if let Some(entry) = destinations.get_mut(&self.destination) {
            entry.running = entry.running.saturating_sub(1);
            entry.freed.notify_one();
        }
        forget_if_idle(&mut destinations, &self.destination);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_gets_its_share_and_others_are_unaffected() {
        let pacer = Pacer::new(2);
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
        let pacer = Arc::new(Pacer::new(1));
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
        let pacer = Pacer::new(1);
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
        let waiters: Vec<_> = (0..QUEUE_PER_PLACE)
            .map(|_| {
                let pacer = Arc::clone(&pacer);
                tokio::spawn(async move {
                    pacer.enter_within("a:443", Duration::from_secs(60)).await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
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

    #[tokio::test]
    async fn an_idle_destination_is_forgotten() {
        let pacer = Pacer::new(1);
        let place = pacer.enter("a:443");
        assert!(
            pacer
                .enter_within("a:443", Duration::from_millis(5))
                .await
                .is_none()
        );
        drop(place);
        assert!(pacer.lock().is_empty(), "{:?}", pacer.lock());
    }
}
