//! Per-destination pacing: at most `per_destination_concurrency` actions run against one
//! destination (`host:port`) at a time in a replica, so a receiver that hangs or crawls holds
//! that many slots, never all of them, and every other destination keeps its pace. An action over
//! the limit is put back without running (no attempt spent) and comes again shortly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Actions running per destination.
#[derive(Debug)]
pub struct Pacer {
    limit: usize,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

/// One running action's place; dropping it frees the place.
#[derive(Debug)]
pub struct Place {
    destination: String,
    running: Arc<Mutex<HashMap<String, usize>>>,
}

impl Pacer {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            running: Arc::default(),
        }
    }

    /// A place for one more action against `destination`, or `None` when it has its share.
    pub fn enter(&self, destination: &str) -> Option<Place> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = running.entry(destination.to_owned()).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Place {
            destination: destination.to_owned(),
            running: Arc::clone(&self.running),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = running.get_mut(&self.destination) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                running.remove(&self.destination);
            }
        }
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
}
