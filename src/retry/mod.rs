//! Retry failed calls with backoff and jitter, within a budget and a deadline.
//!
//! [`Retry`] is tower's [`tower::retry::Retry`] driven by a [`RetryPolicy`]:
//! exponential (or decorrelated, linear, fixed) backoff with full jitter, a
//! cap on attempts, and an optional [`RetryBudget`] (tower's `TpsBudget`)
//! shared by every clone, so retries never exceed a fixed share of live
//! traffic. Which results are retried is up to a [`Classify`]er:
//!
//! - [`DefaultClassifier`], for plain requests: any `Err` except our own shed
//!   rejections ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen),
//!   [`BulkheadFull`](crate::bulkhead::BulkheadFull),
//!   [`RateLimited`](crate::rate_limit::RateLimited)) and
//!   [`DeadlineExceeded`](crate::deadline::DeadlineExceeded). An attempt
//!   [`Elapsed`](crate::timeout::Elapsed) is retried. It knows nothing of
//!   methods: on `http::Request`s it would retry a `POST` whose attempt
//!   timed out after reaching the server, and it never retries a 503
//!   response (an `Ok`). For HTTP and gRPC, use [`RetryPolicy::http`].
//! - [`HttpClassifier`] ([`RetryPolicy::http`]), for HTTP and gRPC: errors
//!   and 502, 503, 504, 429, 408 on idempotent requests, gRPC `UNAVAILABLE`,
//!   `Retry-After` and `grpc-retry-pushback-ms` honoured.
//! - any closure, with [`classify_fn`].
//!
//! A retry never sleeps past the call's deadline (from an outer
//! [`Deadline`](crate::deadline::Deadline), through
//! [`deadline::current()`](crate::deadline::current) or the request's
//! [`CallDeadline`](crate::deadline::CallDeadline)): when the next attempt
//! could not start in time, the last error is returned at once.
//!
//! Requests are replayed by cloning them. An HTTP request is replayable when
//! its body is [`Full<Bytes>`](http_body_util::Full), or after
//! [`BufferRequestBody`] has made it a [`ReplayBody`], which keeps what the
//! first attempt streams (up to 64 KiB by default) without waiting for the
//! body's end, so streaming calls flow.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{retry::{RetryBudget, RetryLayer, RetryPolicy}, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let calls = Arc::new(AtomicU32::new(0));
//! let svc = ServiceBuilder::new()
//!     .layer(RetryLayer::new(
//!         RetryPolicy::exponential(Duration::from_millis(100))
//!             .max_attempts(3)
//!             .budget(RetryBudget::new(Duration::from_secs(10), 10, 0.2)),
//!     ))
//!     .service(service_fn({
//!         let calls = calls.clone();
//!         move |x: u32| {
//!             let n = calls.fetch_add(1, Ordering::Relaxed);
//!             async move {
//!                 if n == 0 { Err::<u32, BoxError>("flaky".into()) } else { Ok(x) }
//!             }
//!         }
//!     }));
//! assert_eq!(svc.oneshot(7).await?, 7);
//! assert_eq!(calls.load(Ordering::Relaxed), 2);
//! # Ok(())
//! # }
//! ```
//!
//! For HTTP, buffer the body first and use the HTTP classifier:
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_firebreak::retry::{BufferRequestBodyLayer, RetryLayer, RetryPolicy};
//!
//! let layers = ServiceBuilder::new()
//!     .layer(BufferRequestBodyLayer::new().limit(64 * 1024))
//!     .layer(RetryLayer::new(RetryPolicy::exponential(Duration::from_millis(50)).http()));
//! # let _ = layers;
//! ```
//!
//! # Defaults
//!
//! [`RetryConfig::default()`]: exponential backoff from 100 ms
//! ([`RetryPolicy::DEFAULT_BASE_DELAY`]) with full jitter, 3 attempts in all
//! ([`RetryPolicy::DEFAULT_MAX_ATTEMPTS`]), each delay at most 10 s
//! ([`RetryPolicy::DEFAULT_MAX_DELAY`]), and a budget of 20% of the calls of
//! the last 10 s plus 10 retries a second ([`RetryBudget::DEFAULT_RATIO`],
//! [`RetryBudget::DEFAULT_TTL`], [`RetryBudget::DEFAULT_MIN_PER_SEC`]: the
//! values of tower's and Finagle's default budget). A policy built with
//! [`RetryPolicy::exponential`] has no budget until given one.
//!
//! # Differences from `tower::retry::Retry`
//!
//! It *is* `tower::retry::Retry`: the mechanism is tower's, the policy is
//! ours. Tower ships the mechanism and a budget but no policy; this adds the
//! backoff schedule, jitter, the budget bookkeeping (one deposit per call,
//! one withdrawal per retry), the deadline, `Retry-After`, and the HTTP and
//! gRPC rules. The error is always a [`BoxError`], so the classifier can look
//! through wrapped errors.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's. `call` consumes that readiness for
//! the first attempt. Each retry waits for readiness of its own on a clone of
//! the inner service, held by the response future, so the inner service must
//! be `Clone`.

mod body;
mod budget;
mod classify;
mod config;
pub mod future;
mod layer;
mod policy;

pub use self::body::{
    BufferFuture, BufferRequestBody, BufferRequestBodyLayer, ReplayBody, RequestBodyError,
};
pub use self::budget::RetryBudget;
pub use self::classify::{
    Action, Classify, ClassifyFn, DefaultClassifier, GRPC_RETRY_PUSHBACK_MS, HttpClassifier,
    IDEMPOTENCY_KEY, ReplayableBody, classify_fn, parse_retry_after,
};
pub use self::config::{BackoffKind, RetryBudgetConfig, RetryConfig};
pub use self::layer::RetryLayer;
pub use self::policy::RetryPolicy;

use self::future::IntoBoxError;
use crate::BoxError;
use std::fmt;
use std::task::{Context, Poll};
use tower::Service;

/// Retries failed calls according to a [`RetryPolicy`]. See the
/// [module docs](self).
pub struct Retry<S, C = DefaultClassifier> {
    inner: tower::retry::Retry<RetryPolicy<C>, IntoBoxError<S>>,
}

impl<S, C> Retry<S, C> {
    /// Wraps `inner`, retrying with `policy`.
    pub fn new(inner: S, policy: RetryPolicy<C>) -> Self {
        Retry {
            inner: tower::retry::Retry::new(policy, IntoBoxError { inner }),
        }
    }

    /// A [`RetryLayer`] with `policy`.
    pub fn layer(policy: RetryPolicy<C>) -> RetryLayer<C> {
        RetryLayer::new(policy)
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner.get_ref().inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner.get_mut().inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner().inner
    }
}

impl<S: Clone, C: Clone> Clone for Retry<S, C> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for Retry<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry").field("inner", &self.inner).finish()
    }
}

impl<S, C, Req> Service<Req> for Retry<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<Req, S::Response> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S, C, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req)
    }
}
