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
//!   in a line served in order, and fails with `RateLimited` if none comes
//!   in time: at once when its permit is already known to come too late
//!   (wait mode).
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
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

/// What a waiting call asks of its limiter (one closure, so the future
/// stays one box wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// A permit check, by the first call in line. `Err` carries the wait
    /// until the next permit, which the line notes.
    Check,
    /// How long the line would take to serve a call that gave up in it
    /// (`Err`): its `retry_after`.
    Behind,
    /// The call got its permit (for the metrics; returns `Ok`).
    Admitted,
    /// The call gave up (for the metrics; returns `Ok`).
    GaveUp,
    /// The call leaves the line, admitted, given up or dropped: sent once,
    /// when the wait ends (returns `Ok`).
    Leave,
}

/// See [`Wait`].
pub(crate) type Check = Box<dyn Fn(Wait) -> Result<(), Duration> + Send + Sync>;

/// The calls waiting for one limiter's permits (or one key's), in wait
/// mode. They are served in the order they began waiting: only the first in
/// line checks the limiter, and sleeps until the next permit; the others
/// wait for their turn on a one-permit semaphore (tokio's, which serves its
/// waiters in order). A call that arrives while others wait joins the line
/// without checking the limiter, so it cannot take the permit the first in
/// line sleeps for; and it is refused at once when the line cannot serve
/// it within `max_wait`. Without a line every waiter slept until the same
/// next permit, all woke for it, one got it and the rest slept again, and a
/// call arriving at that instant could beat them all.
#[derive(Debug)]
pub(crate) struct Line {
    turn: Arc<Semaphore>,
    len: AtomicUsize,
    /// When the next permit is due, on the limiter's clock (`Tick`
    /// nanoseconds), as the line last learned it.
    next_due: AtomicU64,
    /// The limiter's interval between permits.
    interval: Duration,
}

impl Line {
    pub(crate) fn new(interval: Duration) -> Self {
        Line {
            turn: Arc::new(Semaphore::new(1)),
            len: AtomicUsize::new(0),
            next_due: AtomicU64::new(0),
            interval,
        }
    }

    /// Calls in line now.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    /// One more call in line (it then waits for its turn on [`Line::turn`]).
    fn join(&self) {
        self.len.fetch_add(1, Ordering::SeqCst);
    }

    /// One call fewer; returns how many are left.
    fn leave(&self) -> usize {
        self.len.fetch_sub(1, Ordering::SeqCst) - 1
    }

    /// Notes that the next permit comes `wait` after `now`.
    fn due(&self, now: Tick, wait: Duration) {
        self.next_due.store(
            (now + governor::nanos::Nanos::from(wait)).0,
            Ordering::SeqCst,
        );
    }

    /// How long a call that joins now, with `ahead` calls before it, would
    /// wait: until the next permit, then one interval for each call ahead
    /// (while calls wait, the limiter's burst is spent). An estimate: calls
    /// ahead that give up make it shorter.
    fn estimate(&self, now: Tick, ahead: usize) -> Duration {
        let next = Duration::from_nanos(self.next_due.load(Ordering::SeqCst).saturating_sub(now.0));
        let ahead = u32::try_from(ahead).unwrap_or(u32::MAX);
        next.saturating_add(self.interval.saturating_mul(ahead))
    }

    /// A call has joined: notes the next permit when the limiter gave it
    /// (`first`, the line being empty), at `now`.
    fn joined(&self, now: Tick, first: Option<Duration>) {
        if let Some(wait) = first {
            self.due(now, wait);
        }
    }

    /// The `retry_after` of a call that gives up in line: what a call
    /// joining behind the rest of the line would wait.
    fn behind(&self, now: Tick) -> Duration {
        self.estimate(now, self.len().saturating_sub(1))
    }

    /// A limiter check by the first in line, which notes the next permit:
    /// the wait governor gives, or after a permit taken one interval (the
    /// first in line takes it the moment it comes, with the burst spent).
    fn check(&self, now: Tick, first: Result<(), Duration>) -> Result<(), Duration> {
        self.due(now, first.err().unwrap_or(self.interval));
        first
    }
}

/// Limits the rate of calls. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    // None: no limit (a preset stage turned off).
    limiter: Option<Arc<DirectLimiter>>,
    max_wait: Option<Duration>,
    /// Wait mode's line, shared by every clone.
    line: Option<Arc<Line>>,
    obs: Arc<crate::observe::LimiterMetrics>,
}

impl<S> RateLimit<S> {
    /// No limit: a stage of a preset that is turned off.
    pub(crate) fn off(inner: S) -> Self {
        RateLimit {
            inner,
            limiter: None,
            max_wait: None,
            line: None,
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

/// What becomes of a call, as the direct and keyed limiters decide it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Verdict {
    Admit,
    /// Refused, with its `retry_after`.
    Reject(Duration),
    /// Waits in line: `Some(wait)` when the line was empty and the limiter
    /// put the next permit `wait` away; `None` when the call queues behind
    /// others and checks when its turn comes.
    Wait(Option<Duration>),
}

/// Decides a call. `line` is its line in wait mode when that has calls in
/// it; `check` checks the limiter (only when no line has calls).
pub(crate) fn verdict(
    max_wait: Option<Duration>,
    line: Option<&Line>,
    now: impl FnOnce() -> Tick,
    check: impl FnOnce() -> Result<(), Duration>,
) -> Verdict {
    if let (Some(max), Some(line)) = (max_wait, line) {
        let ahead = line.len();
        if ahead > 0 {
            let wait = line.estimate(now(), ahead);
            return if wait > max {
                Verdict::Reject(wait)
            } else {
                Verdict::Wait(None)
            };
        }
    }
    match (check(), max_wait) {
        (Ok(()), _) => Verdict::Admit,
        (Err(wait), Some(max)) if wait <= max => Verdict::Wait(Some(wait)),
        (Err(wait), _) => Verdict::Reject(wait),
    }
}

/// The response future for `verdict`. `join` puts a waiting call in its
/// line (noting the next permit when the verdict carries it) and returns
/// the call's [`Check`] and the line's turn.
pub(crate) fn respond<S, Req>(
    inner: &mut S,
    req: Req,
    verdict: Verdict,
    max_wait: Option<Duration>,
    join: impl FnOnce(Option<Duration>) -> (Check, Arc<Semaphore>),
) -> future::ResponseFuture<S, Req>
where
    S: Service<Req> + Clone,
{
    match verdict {
        Verdict::Admit => future::ResponseFuture::running(inner.call(req)),
        Verdict::Wait(first) => {
            // Cloned before the call joins its line: a panic in the clone
            // must not leave it counted there.
            let clone = inner.clone();
            let svc = std::mem::replace(inner, clone);
            let (check, turn) = join(first);
            future::ResponseFuture::waiting(
                svc,
                req,
                check,
                turn,
                first.unwrap_or_default(),
                max_wait.unwrap_or_default(),
            )
        }
        Verdict::Reject(wait) => {
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
        let line = self.line.as_deref();
        let v = verdict(
            self.max_wait,
            line,
            || limiter.clock().now(),
            || check_direct(limiter),
        );
        match v {
            Verdict::Admit => self.obs.admitted(),
            Verdict::Reject(_) => self.obs.rejected(),
            Verdict::Wait(_) => {}
        }
        let (obs, line) = (&self.obs, &self.line);
        respond(&mut self.inner, req, v, self.max_wait, |first| {
            let l = limiter.clone();
            let obs = obs.clone();
            let line = line.clone().expect("wait mode has a line");
            line.join();
            line.joined(l.clock().now(), first);
            let turn = line.turn.clone();
            let check: Check = Box::new(move |w| {
                match w {
                    Wait::Check => return line.check(l.clock().now(), check_direct(&l)),
                    Wait::Behind => return Err(line.behind(l.clock().now())),
                    Wait::Admitted => obs.admitted(),
                    Wait::GaveUp => obs.rejected(),
                    Wait::Leave => {
                        line.leave();
                    }
                }
                Ok(())
            });
            (check, turn)
        })
    }
}
