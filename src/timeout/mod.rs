//! Bound the time of one attempt.
//!
//! [`Timeout`] fails a call with [`Elapsed`] when the inner service has not
//! answered within the configured duration. It is the *attempt* timeout of the
//! standard pipeline: it sits inside the retry and the breaker, so each attempt
//! gets its own clock, and an attempt that hangs counts as a failure for the
//! breaker.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{error, timeout::{Elapsed, TimeoutLayer}, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_millis(100)))
//!     .service(service_fn(|_: ()| async {
//!         tokio::time::sleep(Duration::from_secs(10)).await;
//!         Ok::<_, BoxError>("late")
//!     }));
//!
//! let err = svc.oneshot(()).await.unwrap_err();
//! assert!(error::find::<Elapsed>(&*err).is_some());
//! # }
//! ```
//!
//! # Defaults
//!
//! [`TimeoutConfig::default()`] is a 10 s attempt timeout, the attempt timeout
//! of Microsoft's standard HTTP resilience handler.
//!
//! # Differences from `tower::timeout::Timeout`
//!
//! - **It shrinks to the deadline.** Inside a
//!   [`Deadline`](crate::deadline::Deadline), an attempt never outlives the
//!   time left in the whole call: the timer is set to the earlier of the two,
//!   and when the deadline is the one that fires the error is
//!   [`DeadlineExceeded`](crate::deadline::DeadlineExceeded), which retries
//!   treat as "out of time", not as "try again". If the attempt still had at
//!   least nine tenths of its own timeout when the deadline cut it (an
//!   attempt timeout equal to the deadline, for instance), that
//!   `DeadlineExceeded` has an [`Elapsed`] as its
//!   [`source`](std::error::Error::source): the dependency had its whole
//!   attempt and did not answer, so a breaker counts it as a failure. A
//!   deadline that cut the attempt shorter is not counted.
//! - **No timer on the fast path.** The inner future is polled first; a timer
//!   is armed only if it returns `Pending`. A service that answers at once pays
//!   no clock read and no timer registration. The timeout therefore counts
//!   from the first poll of the response future, which in every executor is
//!   immediately after `call`.
//! - **Its error carries the duration** ([`Elapsed::timeout`]) and is matched
//!   with [`error::find`](crate::error::find), through any wrapping.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's; the timeout reserves nothing and only
//! bounds the response future.

mod config;
mod error;
pub mod future;
mod layer;

pub use self::config::TimeoutConfig;
pub use self::error::Elapsed;
pub use self::layer::TimeoutLayer;

use crate::BoxError;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::Service;

/// Fails a call with [`Elapsed`] if it takes longer than the timeout.
///
/// See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> Timeout<S> {
    /// Wraps `inner` with a timeout of `timeout` for each call.
    pub const fn new(inner: S, timeout: Duration) -> Self {
        Timeout {
            inner,
            timeout: Some(timeout),
        }
    }

    /// No attempt timeout: a stage of a preset that is turned off. An
    /// enclosing deadline still bounds the call.
    pub(crate) const fn off(inner: S) -> Self {
        Timeout {
            inner,
            timeout: None,
        }
    }

    /// A [`TimeoutLayer`] that wraps services with this timeout.
    pub fn layer(timeout: Duration) -> TimeoutLayer {
        TimeoutLayer::new(timeout)
    }

    /// The configured timeout; `None` when a preset's timeout stage is turned
    /// off and it has no deadline (with one, the preset uses its budget).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        future::ResponseFuture::new(self.inner.call(req), self.timeout)
    }
}
