//! Inject faults on purpose: latency, errors, hangs and aborted connections,
//! on a schedule of phases, reproducible from a seed.
//!
//! [`Chaos`] sits in front of a service, usually a test double of a
//! dependency or a real server under test, and decides for each call, from a
//! seeded generator and the [`Phase`] in force, whether to
//!
//! - add **latency** ([`Latency`]: fixed, uniform or exponential),
//! - answer with an **error** without calling the service (an `Err`
//!   [`InjectedFault`], or with [`ChaosBuilder::http_status`] an HTTP response
//!   such as 503),
//! - **hang**: do nothing until the phase ends (for ever in an open-ended
//!   phase), then call the service, the way a stalled process answers late,
//! - **abort** the call with an `Err`. Behind a hyper server, a service error
//!   makes hyper close the connection without answering, which the client
//!   sees as a dropped connection.
//!
//! A [`Schedule`] strings [`Phase`]s together (healthy, failing, recovering),
//! timed from a start instant, once or over and over.
//!
//! # Reproducible
//!
//! The faults of the `n`-th call through a layer depend only on the seed, on
//! `n` and on the phase in force. Under paused time (`tokio::time::pause`),
//! the same seed gives the same faults on every run. All timing uses
//! `tokio::time`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::chaos::{ChaosLayer, Faults, InjectedFault, Phase, Schedule};
//! use tower_firebreak::{error, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! // Healthy for 1 s, then every call fails for 2 s, then healthy again.
//! let schedule = Schedule::new(vec![
//!     Phase::healthy(Duration::from_secs(1)),
//!     Phase::failing(Duration::from_secs(2), Faults::none().errors(1.0)),
//! ]);
//! let chaos = ChaosLayer::builder(schedule).seed(42).build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(chaos.clone())
//!     .service(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
//!
//! assert_eq!(svc.clone().oneshot(1).await?, 1);
//! tokio::time::sleep(Duration::from_secs(1)).await;
//! let err = svc.clone().oneshot(2).await.unwrap_err();
//! assert!(error::find::<InjectedFault>(&*err).is_some());
//! tokio::time::sleep(Duration::from_secs(2)).await;
//! assert_eq!(svc.oneshot(3).await?, 3);
//! assert_eq!(chaos.stats().errors, 1);
//! # Ok(())
//! # }
//! ```
//!
//! A [`ChaosConfig`] loads the same settings from a file.
//!
//! # Defaults
//!
//! Seed 0; the schedule timed from when [`ChaosBuilder::build`] runs;
//! injected errors as `Err`s ([`AsError`]). [`ChaosConfig`] defaults to no
//! phases (always healthy) and status 503 for
//! [`into_http_layer`](ChaosConfig::into_http_layer). Bad rates, or more
//! than one fault share adding up past 1, are a
//! [`ConfigError`](crate::ConfigError) from `build()`.
//!
//! # In the fault benchmark
//!
//! `examples/fault_bench.rs` puts this layer in front of a real axum server
//! (served through hyper, so an abort really drops the connection) to compare
//! protection stacks under each fault.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's. A call that is delayed or hangs hands
//! the ready service to its response future and keeps a clone (as the
//! bulkhead does when it waits), so the service must be `Clone`.

mod config;
mod error;
pub mod future;
mod layer;
mod schedule;

pub use self::config::ChaosConfig;
pub use self::error::{FaultKind, InjectedFault};
pub use self::layer::{ChaosBuilder, ChaosLayer};
pub use self::schedule::{Faults, Latency, Phase, PhaseKind, Schedule};

use self::schedule::SplitMix64;
use crate::BoxError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::Service;

/// How an injected error reaches the caller. See [`AsError`] and [`HttpStatus`].
pub trait Reply<T> {
    /// The answer to a call that gets an injected error.
    fn error(&self) -> Result<T, BoxError>;
}

/// Injected errors are `Err(`[`InjectedFault`]`)`. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct AsError;

impl<T> Reply<T> for AsError {
    fn error(&self) -> Result<T, BoxError> {
        Err(InjectedFault::new(FaultKind::Error).into())
    }
}

/// Injected errors are HTTP responses with this status and an empty body,
/// marked with the header [`INJECTED_HEADER`].
#[derive(Clone, Copy, Debug)]
pub struct HttpStatus {
    status: http::StatusCode,
}

/// The header on a response that the chaos layer made up.
pub const INJECTED_HEADER: &str = "firebreak-chaos";

impl HttpStatus {
    /// Answer injected errors with `status`.
    pub const fn new(status: http::StatusCode) -> Self {
        HttpStatus { status }
    }

    /// The status.
    pub fn status(&self) -> http::StatusCode {
        self.status
    }
}

impl<B: Default> Reply<http::Response<B>> for HttpStatus {
    fn error(&self) -> Result<http::Response<B>, BoxError> {
        let mut res = http::Response::new(B::default());
        *res.status_mut() = self.status;
        res.headers_mut().insert(
            INJECTED_HEADER,
            http::HeaderValue::from_static("injected-error"),
        );
        Ok(res)
    }
}

/// What a chaos layer has done so far. Every field counts calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChaosStats {
    /// Calls made through the layer.
    pub calls: u64,
    /// Calls handed to the inner service (delayed or not, after a hang or not).
    pub passed: u64,
    /// Calls given extra latency.
    pub delayed: u64,
    /// Calls answered with an injected error.
    pub errors: u64,
    /// Calls that hung.
    pub hangs: u64,
    /// Calls aborted.
    pub aborts: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    calls: AtomicU64,
    passed: AtomicU64,
    delayed: AtomicU64,
    errors: AtomicU64,
    hangs: AtomicU64,
    aborts: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ChaosStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ChaosStats {
            calls: get(&self.calls),
            passed: get(&self.passed),
            delayed: get(&self.delayed),
            errors: get(&self.errors),
            hangs: get(&self.hangs),
            aborts: get(&self.aborts),
        }
    }

    pub(crate) fn passed(&self) {
        self.passed.fetch_add(1, Ordering::Relaxed);
    }
}

/// State shared by a layer and every service made from it.
#[derive(Debug)]
pub(crate) struct Shared {
    schedule: Schedule,
    seed: u64,
    start: Instant,
    pub(crate) stats: Counters,
}

/// What happens to one call.
#[derive(Debug, PartialEq)]
enum Plan {
    Pass { delay: Duration },
    Error { delay: Duration },
    Abort { delay: Duration },
    Hang { until: Option<Instant> },
}

impl Shared {
    fn new(schedule: Schedule, seed: u64, start: Instant) -> Self {
        Shared {
            schedule,
            seed,
            start,
            stats: Counters::default(),
        }
    }

    fn plan(&self, now: Instant) -> Plan {
        let n = self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let pos = self.schedule.at(now.saturating_duration_since(self.start));
        let Some(faults) = pos.faults else {
            return Plan::Pass {
                delay: Duration::ZERO,
            };
        };
        let s = pos.scale;
        // Three draws for every call, used or not, so one call's faults never
        // shift another's.
        let mut rng = SplitMix64::for_call(self.seed, n);
        let (pick, late, how_late) = (rng.next_f64(), rng.next_f64(), rng.next_f64());
        let delay = match &faults.latency {
            Some(l) if late < faults.latency_rate * s => l.sample(how_late),
            _ => Duration::ZERO,
        };
        let mut edge = faults.abort_rate * s;
        if pick < edge {
            return Plan::Abort { delay };
        }
        edge += faults.hang_rate * s;
        if pick < edge {
            return Plan::Hang {
                until: pos.ends_at.map(|e| crate::later(self.start, e)),
            };
        }
        edge += faults.error_rate * s;
        if pick < edge {
            return Plan::Error { delay };
        }
        Plan::Pass { delay }
    }
}

/// Injects faults into calls to the inner service. See the [module docs](self).
#[derive(Debug)]
pub struct Chaos<S, R = AsError> {
    inner: S,
    shared: std::sync::Arc<Shared>,
    reply: R,
}

impl<S: Clone, R: Clone> Clone for Chaos<S, R> {
    fn clone(&self) -> Self {
        Chaos {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            reply: self.reply.clone(),
        }
    }
}

impl<S, R> Chaos<S, R> {
    /// What has been injected so far, across every service sharing this
    /// service's layer.
    pub fn stats(&self) -> ChaosStats {
        self.shared.stats.snapshot()
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

impl<S> Chaos<S> {
    /// Wraps `inner`; a shorthand for `ChaosLayer::builder(schedule).seed(seed)`
    /// started now.
    pub fn new(inner: S, schedule: Schedule, seed: u64) -> Result<Self, crate::ConfigError> {
        Ok(tower::Layer::layer(&Self::layer(schedule, seed)?, inner))
    }

    /// A [`ChaosLayer`] following `schedule` with `seed`, started now;
    /// [`ChaosLayer::builder`] has the other settings.
    pub fn layer(schedule: Schedule, seed: u64) -> Result<ChaosLayer, crate::ConfigError> {
        ChaosLayer::builder(schedule).seed(seed).build()
    }
}

impl<S, R, Req> Service<Req> for Chaos<S, R>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    R: Reply<S::Response>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let stats = &self.shared.stats;
        let now = Instant::now();
        let take_ready = |inner: &mut S| {
            // The ready service goes with the request; `self` keeps a fresh clone.
            let clone = inner.clone();
            std::mem::replace(inner, clone)
        };
        match self.shared.plan(now) {
            Plan::Pass { delay } if delay.is_zero() => {
                stats.passed();
                future::ResponseFuture::calling(self.inner.call(req))
            }
            Plan::Pass { delay } => {
                crate::trace::injected("latency", delay);
                stats.delayed.fetch_add(1, Ordering::Relaxed);
                let svc = take_ready(&mut self.inner);
                future::ResponseFuture::call_at(
                    crate::later(now, delay),
                    svc,
                    req,
                    self.shared.clone(),
                )
            }
            Plan::Error { delay } => {
                crate::trace::injected("error", delay);
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if !delay.is_zero() {
                    stats.delayed.fetch_add(1, Ordering::Relaxed);
                }
                future::ResponseFuture::reply_at(crate::later(now, delay), self.reply.error())
            }
            Plan::Abort { delay } => {
                crate::trace::injected("abort", delay);
                stats.aborts.fetch_add(1, Ordering::Relaxed);
                if !delay.is_zero() {
                    stats.delayed.fetch_add(1, Ordering::Relaxed);
                }
                let err = InjectedFault::new(FaultKind::Abort).into();
                future::ResponseFuture::reply_at(crate::later(now, delay), Err(err))
            }
            Plan::Hang { until: Some(at) } => {
                crate::trace::injected("hang", at.saturating_duration_since(now));
                stats.hangs.fetch_add(1, Ordering::Relaxed);
                let svc = take_ready(&mut self.inner);
                future::ResponseFuture::call_at(at, svc, req, self.shared.clone())
            }
            Plan::Hang { until: None } => {
                crate::trace::injected("hang", Duration::MAX);
                stats.hangs.fetch_add(1, Ordering::Relaxed);
                future::ResponseFuture::hang()
            }
        }
    }
}
