//! Limit the rate of calls with GCRA, via [`governor`].
//!
//! [`RateLimit`] lets through `per_second` calls a second on average and at
//! most `burst` at one instant (governor's burst size, by default equal to the
//! rate). A call over the limit either
//!
//! - fails at once with [`RateLimited`], whose
//!   [`retry_after`](RateLimited::retry_after) is governor's own answer for the
//!   next permit (reject mode, the default), or
//! - waits for its permit, for at most [`max_wait`](RateLimitLayer::max_wait),
//!   and fails with `RateLimited` if none comes in time (wait mode).
//!
//! [`KeyedRateLimit`] keeps one GCRA cell per key. Its state grows with the
//! number of distinct keys, so it must be pruned: call
//! [`KeyedRateLimitLayer::retain_recent`] on a schedule you choose (governor's
//! own pruning), or let [`KeyedRateLimitLayer::prune_every`] run it on a
//! task. It drops every key whose cell is back in its fresh state.
//!
//! The limiter reads `tokio::time`, so paused-time tests drive it.
//!
//! # Example
//!
//! ```
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{error::Rejection, rate_limit::RateLimitLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::per_second(10).burst(2))
//!     .service(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
//!
//! assert!(svc.ready().await.unwrap().call(1).await.is_ok());
//! assert!(svc.ready().await.unwrap().call(2).await.is_ok());
//! let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
//! let r = Rejection::of(&*err).unwrap();
//! assert_eq!(r.retry_after(), Some(std::time::Duration::from_millis(100)));
//! # }
//! ```
//!
//! # Defaults
//!
//! [`RateLimitConfig::default()`]: 1000 calls a second, a burst equal to the
//! rate, reject mode.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's and takes no permit: the permit is
//! checked in `call`, so a caller that ignores backpressure (axum) is still
//! limited.
//!
//! # Differences from `tower::limit::RateLimit`
//!
//! tower's `RateLimit` is a fixed window that waits in `poll_ready` without
//! bound. This one is GCRA (smooth, with an explicit burst), rejects with a
//! typed error carrying the exact time of the next permit, and waits only when
//! asked and only up to a bound.

mod config;
mod error;
pub mod future;
mod keyed;
mod layer;

pub use self::config::{RateLimitConfig, RateLimitMode};
pub use self::error::RateLimited;
pub use self::keyed::{KeyedRateLimit, KeyedRateLimitLayer};
pub use self::layer::RateLimitLayer;

use crate::BoxError;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::Service;

/// governor's clock, read from `tokio::time` so paused time drives it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    pub(crate) fn new() -> Self {
        TokioClock {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Tick;

    #[inline]
    fn now(&self) -> Tick {
        let d = tokio::time::Instant::now().saturating_duration_since(self.start);
        // Whole seconds and the rest, without `as_nanos`'s u128 arithmetic;
        // 584 years fit.
        Tick(
            d.as_secs()
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::from(d.subsec_nanos())),
        )
    }
}

/// A reading of [`TokioClock`]: nanoseconds since the limiter was made.
///
/// governor's own arithmetic is in nanoseconds (`Nanos`, a `u64`); with this
/// as the clock's instant each check is one subtraction of integers, where a
/// `Duration` instant cost a `Duration` subtraction and a conversion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Tick(u64);

impl governor::clock::Reference for Tick {
    #[inline]
    fn duration_since(&self, earlier: Self) -> governor::nanos::Nanos {
        self.0.saturating_sub(earlier.0).into()
    }

    #[inline]
    fn saturating_sub(&self, duration: governor::nanos::Nanos) -> Self {
        Tick(self.0.saturating_sub(duration.into()))
    }
}

impl std::ops::Add<governor::nanos::Nanos> for Tick {
    type Output = Tick;

    #[inline]
    fn add(self, other: governor::nanos::Nanos) -> Tick {
        Tick(self.0.saturating_add(other.into()))
    }
}

type DirectLimiter =
    governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Tick>>;

/// What a waiting call asks of its limiter: a permit check (`Err` carries
/// the wait until the next one), or, once, how the wait ended, so that a
/// named limiter counts it (one closure, so the future stays one box wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    Check,
    Admitted,
    GaveUp,
}

/// See [`Wait`]; the outcome events return `Ok(())`.
pub(crate) type Check = Box<dyn Fn(Wait) -> Result<(), Duration> + Send + Sync>;

/// Limits the rate of calls. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    // None: no limit (a preset stage turned off).
    limiter: Option<Arc<DirectLimiter>>,
    max_wait: Option<Duration>,
    obs: Arc<crate::observe::LimiterMetrics>,
}

impl<S> RateLimit<S> {
    /// No limit: a stage of a preset that is turned off.
    pub(crate) fn off(inner: S) -> Self {
        RateLimit {
            inner,
            limiter: None,
            max_wait: None,
            obs: Arc::new(crate::observe::LimiterMetrics::new(None, None)),
        }
    }

    /// A [`RateLimitLayer`] of `per_second` calls a second.
    pub fn layer(per_second: u32) -> RateLimitLayer {
        RateLimitLayer::per_second(per_second)
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

pub(crate) fn check_direct(limiter: &DirectLimiter) -> Result<(), Duration> {
    limiter
        .check()
        .map_err(|nu| nu.wait_time_from(limiter.clock().now()))
}

/// The decision shared by the direct and keyed limiters.
pub(crate) fn decide<S, Req>(
    inner: &mut S,
    req: Req,
    first: Result<(), Duration>,
    max_wait: Option<Duration>,
    check: impl FnOnce() -> Check,
) -> future::ResponseFuture<S, Req>
where
    S: Service<Req> + Clone,
{
    match (first, max_wait) {
        (Ok(()), _) => future::ResponseFuture::running(inner.call(req)),
        (Err(wait), Some(max)) if wait <= max => {
            let clone = inner.clone();
            let svc = std::mem::replace(inner, clone);
            future::ResponseFuture::waiting(svc, req, check(), wait, max)
        }
        (Err(wait), _) => {
            crate::trace::rejected(
                "rate_limit",
                crate::error::RejectionKind::RateLimited,
                Some(wait),
            );
            future::ResponseFuture::rejected(wait)
        }
    }
}

impl<S, Req> Service<Req> for RateLimit<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let Some(limiter) = &self.limiter else {
            return future::ResponseFuture::running(self.inner.call(req));
        };
        let first = check_direct(limiter);
        match (first, self.max_wait) {
            (Ok(()), _) => self.obs.admitted(),
            (Err(wait), Some(max)) if wait <= max => {}
            (Err(_), _) => self.obs.rejected(),
        }
        let obs = &self.obs;
        decide(&mut self.inner, req, first, self.max_wait, || {
            let l = limiter.clone();
            let obs = obs.clone();
            Box::new(move |w| {
                match w {
                    Wait::Check => return check_direct(&l),
                    Wait::Admitted => obs.admitted(),
                    Wait::GaveUp => obs.rejected(),
                }
                Ok(())
            })
        })
    }
}
