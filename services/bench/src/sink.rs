//! The bench's own webhook receiver: an axum server on a loopback port, the URL every observer
//! of the bench's stack sends to. It keeps, per order, the moment its first `order_created`
//! webhook arrived (the end of the end-to-end latency) and counts every delivery, so repeats
//! show up as deliveries beyond the distinct orders rather than as faster figures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};

/// Where the example observers send each new order's webhook.
pub const WEBHOOK_PATH: &str = "/webhooks/order-created";
/// The header the example observer fills with the order's key (`x-shop-order = "{{key}}"`).
const ORDER_HEADER: &str = "x-shop-order";

#[derive(Clone, Default)]
struct Received {
    /// Per order: its first webhook's arrival, monotonic and wall clock (the stage lags compare
    /// it with the streams' stored times).
    first: Arc<Mutex<HashMap<String, (Instant, SystemTime)>>>,
    deliveries: Arc<AtomicU64>,
}

pub struct Sink {
    address: SocketAddr,
    received: Received,
}

impl Sink {
    /// Binds a free loopback port and serves until the process ends.
    pub async fn start() -> std::io::Result<Self> {
        let received = Received::default();
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("the webhook sink stopped: {error}");
            }
        });
        Ok(Self { address, received })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Distinct orders whose webhook arrived. Polled while the load runs, so it only counts:
    /// copying the map under the lock the receiver records with would stall the webhooks it
    /// measures.
    pub fn orders(&self) -> usize {
        self.received
            .first
            .lock()
            .expect("the sink's lock is never poisoned: nothing panics while holding it")
            .len()
    }

    /// Every webhook request received, repeats included.
    pub fn deliveries(&self) -> u64 {
        self.received.deliveries.load(Ordering::Relaxed)
    }

    /// When each order's first webhook arrived, by order key.
    pub fn arrivals(&self) -> HashMap<String, Instant> {
        self.first()
            .into_iter()
            .map(|(key, (at, _))| (key, at))
            .collect()
    }

    /// When each order's first webhook arrived, by the wall clock.
    pub fn wall_arrivals(&self) -> HashMap<String, SystemTime> {
        self.first()
            .into_iter()
            .map(|(key, (_, at))| (key, at))
            .collect()
    }

    fn first(&self) -> HashMap<String, (Instant, SystemTime)> {
        self.received
            .first
            .lock()
            .expect("the sink's lock is never poisoned: nothing panics while holding it")
            .clone()
    }
}

async fn receive(State(received): State<Received>, uri: Uri, headers: HeaderMap) -> StatusCode {
    let now = (Instant::now(), SystemTime::now());
    if uri.path() == WEBHOOK_PATH {
        received.deliveries.fetch_add(1, Ordering::Relaxed);
        if let Some(order) = headers.get(ORDER_HEADER).and_then(|v| v.to_str().ok()) {
            received
                .first
                .lock()
                .expect("the sink's lock is never poisoned: nothing panics while holding it")
                .entry(order.to_owned())
                .or_insert(now);
        }
    }
    StatusCode::NO_CONTENT
}
