//! What crosses a Herald service boundary lives here, once: the message types and subjects that
//! make up the public contract, stream provisioning, consuming (`consume`: one disposition per
//! message, settled in one place), publishing with error classification (`publish`),
//! dead-lettering, configuration loading, telemetry, the admin HTTP server and graceful
//! shutdown. A service never re-declares a subject
//! string or a header name; it asks this crate.

pub mod admin;
mod alloc;
pub mod check_config;
pub mod config;
pub mod consume;
pub mod dlq;
pub mod headers;
pub mod messages;
pub mod nats;
pub mod publish;
#[cfg(feature = "redis")]
pub mod redis_persistence;
pub mod retry;
pub mod schedule;
pub mod service;
pub mod shutdown;
pub mod streams;
pub mod subjects;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod traceparent;

pub use messages::{
    ActionOrder, ActionOutcome, ActionRequest, EntityEvent, JobRequest, JobState, JobStatus, Op,
    OutcomeStatus, SCHEMA_VERSION,
};
pub use retry::RetryPolicy;
