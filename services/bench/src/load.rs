//! The load: `createOrder` mutations through the gateway's GraphQL endpoint from a fixed number
//! of concurrent clients. The moment each answer arrives is the order's commit time (the gateway
//! answers after its transaction, outbox row included, committed), the start of its end-to-end
//! latency. Totals stay under the example's `big_order` threshold, so every order makes exactly
//! one action: the `order_created` webhook the sink times.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the gateway could not be reached: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("the gateway refused {query}: {answer}")]
    Refused { query: String, answer: Value },
}

/// One GraphQL client of the gateway, with the stack's API key.
#[derive(Clone)]
pub struct Gateway {
    pub http: reqwest::Client,
    pub url: String,
    pub api_key: &'static str,
}

impl Gateway {
    /// Runs an operation; returns `data`, or the refusal with the gateway's answer.
    pub async fn graphql(&self, query: &str) -> Result<Value, LoadError> {
        let answer: Value = self
            .http
            .post(&self.url)
            .header("x-api-key", self.api_key)
            .timeout(Duration::from_secs(30))
            .json(&json!({ "query": query }))
            .send()
            .await?
            .json()
            .await?;
        match answer.get("errors") {
            None => Ok(answer["data"].clone()),
            Some(_) => Err(LoadError::Refused {
                query: query.to_owned(),
                answer,
            }),
        }
    }
}

pub struct Load {
    /// When each committed order's answer arrived, by order key.
    pub committed: HashMap<String, Instant>,
    /// When each committed order was due to be sent (open loop), by order key; in the closed
    /// loop, when its request was sent.
    pub scheduled: HashMap<String, Instant>,
    pub failed: Vec<LoadError>,
    pub finished: Instant,
}

type Answer = Result<(String, Instant, Instant), LoadError>;

/// Sends order `i` for `customer`: its key, when it was due, when its answer arrived.
async fn order(gateway: &Gateway, customer: &Value, i: usize, due: Instant) -> Answer {
    let query = format!(
        "mutation {{ createOrder(input: {{customer_id: {customer}, total: {}}}) {{ id }} }}",
        20 + i % 400
    );
    let data = gateway.graphql(&query).await?;
    let at = Instant::now();
    let id = &data["createOrder"]["id"];
    let key = id.as_str().map_or_else(|| id.to_string(), str::to_owned);
    Ok((key, due, at))
}

/// Closed loop: sends `mutations` orders for `customer`, `concurrency` at a time.
pub async fn run(
    gateway: &Gateway,
    customer: &Value,
    mutations: usize,
    concurrency: usize,
) -> Load {
    let answers: Vec<Answer> = futures::stream::iter(0..mutations)
        .map(|i| order(gateway, customer, i, Instant::now()))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    collect(answers)
}

/// Open loop: order `i` is due at `start + i / rate` and is sent then, whether or not earlier
/// ones were answered, so a stall shows up as latency from the schedule instead of slowing the
/// clients down. At most `in_flight` requests are outstanding (a safety bound; a run that hits
/// it falls behind its schedule, which the latency shows).
pub async fn paced(
    gateway: &Gateway,
    customer: &Value,
    mutations: usize,
    rate: f64,
    in_flight: usize,
) -> Load {
    let start = Instant::now();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let mut tasks = Vec::with_capacity(mutations);
    for i in 0..mutations {
        let due = start + std::time::Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let permit = permits.clone().acquire_owned().await;
        let (gateway, customer) = (gateway.clone(), customer.clone());
        tasks.push(tokio::spawn(async move {
            let answer = order(&gateway, &customer, i, due).await;
            drop(permit);
            answer
        }));
    }
    let mut answers = Vec::with_capacity(mutations);
    for task in tasks {
        if let Ok(answer) = task.await {
            answers.push(answer);
        }
    }
    collect(answers)
}

fn collect(answers: Vec<Answer>) -> Load {
    let finished = Instant::now();
    let mut committed = HashMap::new();
    let mut scheduled = HashMap::new();
    let mut failed = Vec::new();
    for answer in answers {
        match answer {
            Ok((key, due, at)) => {
                scheduled.insert(key.clone(), due);
                committed.insert(key, at);
            }
            Err(error) => failed.push(error),
        }
    }
    Load {
        committed,
        scheduled,
        failed,
        finished,
    }
}
