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
    pub failed: Vec<LoadError>,
    pub finished: Instant,
}

/// Sends `mutations` orders for `customer`, `concurrency` at a time.
pub async fn run(
    gateway: &Gateway,
    customer: &Value,
    mutations: usize,
    concurrency: usize,
) -> Load {
    let answers: Vec<Result<(String, Instant), LoadError>> = futures::stream::iter(0..mutations)
        .map(|i| {
            let query = format!(
                "mutation {{ createOrder(input: {{customer_id: {customer}, total: {}}}) {{ id }} }}",
                20 + i % 400
            );
            async move {
                let data = gateway.graphql(&query).await?;
                let at = Instant::now();
                let id = &data["createOrder"]["id"];
                let key = id
                    .as_str()
                    .map_or_else(|| id.to_string(), str::to_owned);
                Ok((key, at))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let finished = Instant::now();
    let mut committed = HashMap::new();
    let mut failed = Vec::new();
    for answer in answers {
        match answer {
            Ok((key, at)) => {
                committed.insert(key, at);
            }
            Err(error) => failed.push(error),
        }
    }
    Load {
        committed,
        failed,
        finished,
    }
}
