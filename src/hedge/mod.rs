//! Send a second copy of a slow request, and take whichever answers first.
//!
//! [`Hedge`] calls the inner service once. If no answer has come after the
//! hedge delay, it sends a copy of the request to a clone of the inner
//! service, returns the first answer, and drops (cancels) the other call. A
//! copy that fails while the other is still in flight does not end the call.
//!
//! The delay is either fixed ([`HedgeLayer::fixed`]) or a latency
//! percentile of the last window of calls ([`HedgeLayer::percentile`]), kept
//! in an HDR histogram shared by every clone. Only requests that the
//! [`Classify`]er calls hedgeable are hedged: with
//! [`HttpClassifier`](crate::retry::HttpClassifier), idempotent methods and
//! requests with an `Idempotency-Key`.
//!
//! Hedges draw on a [`RetryBudget`], usually the one the
//! [`RetryLayer`](crate::retry::RetryLayer) around it uses, so hedges and
//! retries together never exceed its share of live traffic.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tokio::time::{Instant, sleep};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
//! use tower_firebreak::{hedge::HedgeLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let calls = Arc::new(AtomicU32::new(0));
//! let svc = ServiceBuilder::new()
//!     .layer(HedgeLayer::fixed(Duration::from_millis(50)))
//!     .service(service_fn(move |x: u32| {
//!         // The first copy is slow, the second fast.
//!         let slow = calls.fetch_add(1, Ordering::Relaxed) == 0;
//!         async move {
//!             sleep(Duration::from_millis(if slow { 1_000 } else { 10 })).await;
//!             Ok::<_, BoxError>(x)
//!         }
//!     }));
//! let t0 = Instant::now();
//! assert_eq!(svc.oneshot(1).await?, 1);
//! assert_eq!(t0.elapsed(), Duration::from_millis(60));
//! # Ok(())
//! # }
//! ```
//!
//! # Defaults
//!
//! [`HedgeLayer::percentile`] hedges at the given quantile of the last
//! 10 s ([`HedgeLayer::DEFAULT_WINDOW`]) of successful calls, once that
//! window held at least 100 calls ([`HedgeLayer::DEFAULT_MIN_SAMPLES`]);
//! before that, nothing is hedged. Only successes are timed, so when no call
//! has succeeded for two windows (the dependency stopped answering) nothing
//! is hedged either, until a window fills again. No budget unless given one.
//!
//! # Differences from `tower::hedge::Hedge`
//!
//! - **A fixed delay too.** tower hedges only at a latency percentile.
//! - **A failed copy does not end the call** while the other is in flight;
//!   in tower the first result wins, error or not.
//! - **Shared rules.** Which requests are hedged, and how they are copied,
//!   come from the retry layer's [`Classify`]; hedges draw on the retry
//!   layer's [`RetryBudget`] instead of a separate policy.
//! - **No lock to read the delay.** The percentile is computed once per
//!   window and published in an atomic; only recording takes a lock.
//! - **Readiness.** tower's `poll_ready` waits for both copies' services;
//!   here the second copy waits for readiness only once it is due.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's and `call` consumes it for the first
//! copy. The second copy waits for readiness of a clone of the inner service
//! inside the response future, after the delay.

pub mod future;
mod latency;

use self::future::{Hedging, ResponseFuture};
use self::latency::LatencyTracker;
use crate::BoxError;
use crate::retry::{Classify, DefaultClassifier, RetryBudget};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};

#[derive(Clone, Debug)]
enum Delay {
    Fixed(Duration),
    Percentile(Arc<LatencyTracker>),
}

#[derive(Clone, Debug)]
struct Config {
    delay: Delay,
    budget: Option<RetryBudget>,
    deposit: bool,
}

/// Applies [`Hedge`]. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct HedgeLayer<C = DefaultClassifier> {
    config: Config,
    classify: C,
}

impl HedgeLayer {
    /// The default length of the latency window.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
    /// The default number of calls a window needs before its percentile is used.
    pub const DEFAULT_MIN_SAMPLES: u64 = 100;

    /// Hedges every hedgeable request still unanswered after `delay`.
    pub fn fixed(delay: Duration) -> Self {
        HedgeLayer {
            config: Config {
                delay: Delay::Fixed(delay),
                budget: None,
                deposit: false,
            },
            classify: DefaultClassifier,
        }
    }

    /// Hedges a request still unanswered after the `quantile` (for example
    /// `0.95`) of the latencies of the last window's successful calls.
    /// Every service made from this layer shares the histogram.
    pub fn percentile(quantile: f64) -> Self {
        Self::percentile_with(quantile, Self::DEFAULT_MIN_SAMPLES, Self::DEFAULT_WINDOW)
    }

    /// Like [`percentile`](Self::percentile), with the minimum number of
    /// samples and the window length.
    pub fn percentile_with(quantile: f64, min_samples: u64, window: Duration) -> Self {
        let quantile = quantile.clamp(0.0, 1.0);
        HedgeLayer {
            config: Config {
                delay: Delay::Percentile(Arc::new(LatencyTracker::new(
                    quantile,
                    min_samples,
                    window,
                ))),
                budget: None,
                deposit: false,
            },
            classify: DefaultClassifier,
        }
    }
}

impl<C> HedgeLayer<C> {
    /// Hedges withdraw from `budget`, which a
    /// [`RetryLayer`](crate::retry::RetryLayer) around this layer shares and
    /// deposits into (one token per call). A hedge is not sent when the
    /// budget is empty.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.config.budget = Some(budget);
        self.config.deposit = false;
        self
    }

    /// Like [`budget`](Self::budget), for a hedge layer with no retry layer
    /// sharing the budget: this layer also deposits one token per call.
    pub fn own_budget(mut self, budget: RetryBudget) -> Self {
        self.config.budget = Some(budget);
        self.config.deposit = true;
        self
    }

    /// Uses `classify` to decide which requests are hedged and to copy them.
    pub fn classify<C2>(self, classify: C2) -> HedgeLayer<C2> {
        HedgeLayer {
            config: self.config,
            classify,
        }
    }

    /// Uses [`HttpClassifier`](crate::retry::HttpClassifier): only idempotent
    /// HTTP requests and requests with an `Idempotency-Key` are hedged.
    pub fn http(self) -> HedgeLayer<crate::retry::HttpClassifier> {
        self.classify(crate::retry::HttpClassifier)
    }
}

impl<S, C: Clone> Layer<S> for HedgeLayer<C> {
    type Service = Hedge<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Hedge {
            inner,
            config: self.config.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// Sends a second copy of a slow request. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Hedge<S, C = DefaultClassifier> {
    inner: S,
    config: Config,
    classify: C,
}

impl<S> Hedge<S> {
    /// Wraps `inner`, hedging after a fixed `delay`.
    pub fn new(inner: S, delay: Duration) -> Self {
        HedgeLayer::fixed(delay).layer(inner)
    }

    /// A [`HedgeLayer`] with a fixed `delay`.
    pub fn layer(delay: Duration) -> HedgeLayer {
        HedgeLayer::fixed(delay)
    }
}

impl<S, C> Hedge<S, C> {
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

impl<S, C, Req> Service<Req> for Hedge<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    C: Classify<Req, S::Response> + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req, S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.config.deposit
            && let Some(b) = &self.config.budget
        {
            b.deposit();
        }
        let (delay, tracker) = match &self.config.delay {
            Delay::Fixed(d) => (Some(*d), None),
            Delay::Percentile(t) => {
                let now = Instant::now();
                (t.delay(now), Some((t.clone(), now)))
            }
        };
        let hedge = delay
            .filter(|_| self.classify.hedgeable(&req))
            .and_then(|delay| {
                let deadline =
                    crate::earliest(crate::deadline::current(), self.classify.deadline(&req));
                Some(Hedging {
                    req: self.classify.clone_request(&req)?,
                    svc: self.inner.clone(),
                    delay,
                    budget: self.config.budget.clone(),
                    classify: self.classify.clone(),
                    deadline,
                })
            });
        ResponseFuture::new(self.inner.call(req), hedge, tracker)
    }
}
