//! Resilience middleware for [Tower]: stop one slow or dead dependency from
//! taking down every service that calls it.
//!
//! | failure | layer | what the caller sees instead |
//! | --- | --- | --- |
//! | a dependency hangs | [`timeout`] (one attempt), [`deadline`] (the whole call) | a fast [`Elapsed`](timeout::Elapsed) or [`DeadlineExceeded`](deadline::DeadlineExceeded) |
//! | a dependency is down | [`circuit_breaker`] | an immediate [`CircuitOpen`](circuit_breaker::CircuitOpen) with `retry_after` |
//! | capacity runs out | [`bulkhead`] | [`BulkheadFull`](bulkhead::BulkheadFull) within `max_wait` |
//! | too much load | [`rate_limit`] | [`RateLimited`](rate_limit::RateLimited) with `retry_after` |
//! | a request must not be lost | [`defer`] (fallback-to-queue) | `202 Accepted` with a job id; the request is stored and replayed later |
//!
//! [`chaos`] injects latency, errors, hangs and aborted connections on a
//! seeded schedule, to test and benchmark the layers above.
//!
//! Every layer is a `tower::Layer`, every service is `Clone` when its inner
//! service is, and every service's error is [`BoxError`]. Match errors with
//! [`error::find`] or view them with [`error::Rejection`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{bulkhead::BulkheadLayer, rate_limit::RateLimitLayer,
//!     timeout::TimeoutLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::per_second(100).burst(10))
//!     .layer(BulkheadLayer::new(32).max_wait(Duration::from_millis(5)))
//!     .layer(TimeoutLayer::new(Duration::from_millis(500)))
//!     .service(service_fn(|name: &'static str| async move {
//!         Ok::<_, BoxError>(format!("hello, {name}"))
//!     }));
//!
//! assert_eq!(svc.oneshot("world").await?, "hello, world");
//! # Ok(())
//! # }
//! ```
//!
//! # Cargo features
//!
//! | feature | what it adds |
//! | --- | --- |
//! | `axum` | axum-only helpers (status routes, admin router) |
//! | `tonic` | `tonic::Status` mapping for gRPC clients ([`grpc::to_status`]) |
//! | `disk` (default) | [`queue::disk::DiskQueue`], the embedded durable job queue on redb |
//! | `prost` | the compact protobuf job envelope ([`queue::codec::Format`]) |
//! | `metrics` | `firebreak.*` metrics on the `metrics` facade for named layers ([`registry`] lists them) |
//! | `prometheus` | `metrics` plus `GET /metrics` in the [`admin`] router, via `metrics-exporter-prometheus` |
//! | `redis` | [`queue::redis::RedisQueue`], the job queue on Redis Streams, shared by a fleet |
//! | `nats` | [`queue::nats::NatsQueue`], the job queue on NATS JetStream, shared by a fleet |
//! | `amqp` | [`queue::amqp::AmqpQueue`], the job queue on RabbitMQ, its status in Redis (turns on `redis`) |
//! | `toml`, `yaml` | `preset::Policies::from_toml` / `from_yaml` |
//! | `full` | every feature above |
//!
//! # Time
//!
//! Every layer uses `tokio::time`, so tests can run under paused time
//! (`#[tokio::test(start_paused = true)]`).
//!
//! [Tower]: https://docs.rs/tower

#[cfg(feature = "axum")]
pub mod admin;
pub mod bulkhead;
pub mod chaos;
pub mod circuit_breaker;
pub mod classify;
pub mod deadline;
pub mod defer;
pub mod error;
pub mod fallback;
pub mod grpc;
pub mod hedge;
pub mod http;
mod observe;
pub mod preset;
pub mod queue;
pub mod rate_limit;
pub mod registry;
pub mod retry;
mod shards;
pub mod span;
pub mod timeout;
mod trace;
mod wake;

/// `now + d`, or a year from now where that would overflow the clock: a
/// `Duration::MAX` setting (for "no limit") must not panic a call.
pub(crate) fn later(now: tokio::time::Instant, d: std::time::Duration) -> tokio::time::Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(365 * 24 * 3600))
}

/// Whole milliseconds, saturating at `u64::MAX` (a `Duration` holds more).
pub(crate) fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The earlier of two optional instants (or durations): a deadline from
/// one source or the other, whichever ends first.
pub(crate) fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub use crate::error::{BoxError, ConfigError};

// The README's example compiles as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// And so do its fragments (`rust,ignore` blocks), each wrapped by `build.rs`
// in an async fn that defines the stand-ins it names.
#[cfg(all(doctest, feature = "full"))]
#[doc = include_str!(concat!(env!("OUT_DIR"), "/readme_snippets.md"))]
struct ReadmeSnippets;
