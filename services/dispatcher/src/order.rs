//! Lines of ordered observers: the dispatcher's half of per-key order of effects.
//!
//! The dispatcher publishes one key's actions in stream order, but workers run many actions at
//! once and a retry comes back behind later actions, so order of publication is not order of
//! effect. For an observer declared `ordered = true`, every action request says where it stands
//! in its line (`ActionRequest::order_line`: observer, action index, entity key): its own
//! event's stream sequence and that of the previous action in the line. A worker runs it only
//! once that previous action is settled (see the action worker's `order` module).
//!
//! The last place given in each line is kept in the KV bucket `herald_order` as
//! `{"last": <sequence>, "after": <its predecessor>}`, so a dispatcher that takes a partition
//! over goes on where the previous one stopped. A partition is served by one dispatcher at a
//! time and a lane handles one key's events one after another, so a lane may keep what it read
//! and wrote in memory for its tenure. The place is saved after the batch's requests are stored
//! and before its events are acked; a crash between the two redelivers the event, which finds
//! its own sequence as `last` and gets the same predecessor again. An event older than a line's
//! last (a rewind or a replay from the DLQ) waits for nothing: its action was most likely done
//! long ago, and its place is not taken back.

use std::collections::{HashMap, HashSet};

use async_nats::jetstream::{self, kv};
use herald_shared::ActionOrder;
use herald_shared::streams;
use herald_shared::subjects::EVENTS_STREAM;
use serde::{Deserialize, Serialize};

/// The KV bucket of the lines' last places.
pub const BUCKET: &str = "herald_order";

/// How long a line's last place is kept after its last action: beyond it the next action of
/// the line waits for nothing. The action worker keeps its done marks as long by default.
const KEPT: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Lines a lane remembers before it forgets them all and reads them from the bucket again.
const REMEMBERED: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error(transparent)]
    Bucket(#[from] streams::BucketError),
    #[error("cannot read the place of line {line}: {reason}")]
    Read { line: String, reason: String },
    #[error("cannot save the place of line {line}: {reason}")]
    Save { line: String, reason: String },
}

/// Opens (or creates) the bucket, with as many copies as HERALD_EVENTS.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store, OrderError> {
    let config = kv::Config {
        bucket: BUCKET.to_owned(),
        description: "Ordered observers: the last action placed in each line".into(),
        history: 1,
        max_age: KEPT,
        ..Default::default()
    };
    Ok(streams::key_value(js, config, EVENTS_STREAM).await?)
}

/// A line's last place as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Place {
    last: u64,
    after: Option<u64>,
}

/// One lane's view of the lines of the keys it handles.
pub struct Lines {
    store: kv::Store,
    known: HashMap<String, Place>,
    unsaved: HashSet<String>,
}

impl Lines {
    pub fn new(store: kv::Store) -> Self {
        Self {
            store,
            known: HashMap::new(),
            unsaved: HashSet::new(),
        }
    }

    /// The place in `line` of the action for the event at `sequence`. Events of one line must
    /// come in stream order (a redelivery repeating the last is fine).
    pub async fn place(&mut self, line: &str, sequence: u64) -> Result<ActionOrder, OrderError> {
        let known = match self.known.get(line) {
            Some(place) => Some(*place),
            None => self.read(line).await?,
        };
        let place = match known {
            // A redelivery: the same predecessor as the first time.
            Some(place) if place.last == sequence => place,
            Some(place) if place.last < sequence => Place {
                last: sequence,
                after: Some(place.last),
            },
            Some(_) => {
                return Ok(ActionOrder {
                    sequence,
                    after: None,
                });
            }
            None => Place {
                last: sequence,
                after: None,
            },
        };
        if known != Some(place) {
            self.unsaved.insert(line.to_owned());
        }
        if self.known.len() >= REMEMBERED && !self.known.contains_key(line) {
            // Forgetting only what is saved keeps every unsaved place.
            self.known.retain(|line, _| self.unsaved.contains(line));
        }
        self.known.insert(line.to_owned(), place);
        Ok(ActionOrder {
            sequence,
            after: place.after,
        })
    }

    /// Stores every place given since the last save, all at once.
    pub async fn save(&mut self) -> Result<(), OrderError> {
        let store = &self.store;
        let puts = self.unsaved.iter().filter_map(|line| {
            let value = serde_json::to_vec(self.known.get(line)?).ok()?;
            Some(async move {
                store
                    .put(line.as_str(), value.into())
                    .await
                    .map_err(|e| OrderError::Save {
                        line: line.clone(),
                        reason: e.to_string(),
                    })
            })
        });
        let results = futures::future::join_all(puts).await;
        if let Some(error) = results.into_iter().find_map(Result::err) {
            return Err(error);
        }
        self.unsaved.clear();
        Ok(())
    }

    async fn read(&self, line: &str) -> Result<Option<Place>, OrderError> {
        let fail = |reason: String| OrderError::Read {
            line: line.to_owned(),
            reason,
        };
        let Some(value) = self
            .store
            .get(line)
            .await
            .map_err(|e| fail(e.to_string()))?
        else {
            return Ok(None);
        };
        // A value no dispatcher wrote starts the line afresh rather than stopping it.
        Ok(serde_json::from_slice(&value).ok())
    }
}
