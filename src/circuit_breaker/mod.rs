//! Stop calling a dependency that is down, and give it room to recover.
//!
//! A [`CircuitBreaker`] watches the outcomes of the calls it lets through.
//! When too many fail (or are too slow), it *opens*: for
//! [`open_for`](CircuitBreakerBuilder::open_for) every call fails at once with
//! [`CircuitOpen`], whose [`retry_after`](CircuitOpen::retry_after) is the real
//! time left, and the inner service is not called at all. Then it turns
//! *half-open* and lets exactly [`half_open_calls`](CircuitBreakerBuilder::half_open_calls)
//! probes through; their outcomes decide whether it closes again or reopens.
//!
//! ```text
//!            rate >= threshold              open_for elapsed
//!  Closed ─────────────────────────▶ Open ─────────────────────▶ HalfOpen
//!    ▲                                 ▲                            │
//!    │      probes fail / stall        └────────────────────────────┤
//!    └──────────────────────────────────────────────────────────────┘
//!                           probes succeed
//! ```
//!
//! [`CircuitBreakerHandle`] adds [`ForcedOpen`](State::ForcedOpen) and
//! [`Disabled`](State::Disabled) (calls pass, outcomes are still recorded,
//! the breaker never opens), and [`reset`](CircuitBreakerHandle::reset) back to
//! Closed.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, State};
//! use tower_firebreak::{error, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let breaker = CircuitBreakerLayer::builder()
//!     .count_window(10)
//!     .minimum_calls(4)
//!     .failure_rate(0.5)
//!     .open_for(Duration::from_secs(5))
//!     .build()?;
//! let handle = breaker.handle();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(service_fn(|fail: bool| async move {
//!         if fail { Err::<(), BoxError>("down".into()) } else { Ok(()) }
//!     }));
//!
//! for _ in 0..4 {
//!     let _ = svc.clone().oneshot(true).await;
//! }
//! assert_eq!(handle.state(), State::Open);
//!
//! // The call is not made; the error says when to try again.
//! let err = svc.clone().oneshot(false).await.unwrap_err();
//! let open = error::find::<CircuitOpen>(&*err).expect("rejected by the breaker");
//! assert!(open.retry_after() <= Duration::from_secs(5));
//! # Ok(())
//! # }
//! ```
//!
//! # Defaults
//!
//! | setting | default | Resilience4j's default |
//! | --- | --- | --- |
//! | window | [`count_window`](CircuitBreakerBuilder::count_window)`(100)` | count, 100 |
//! | [`minimum_calls`](CircuitBreakerBuilder::minimum_calls) | 20 (at most the count window) | 100 |
//! | [`failure_rate`](CircuitBreakerBuilder::failure_rate) | 0.5 | 50 % |
//! | [`slow_call_rate`](CircuitBreakerBuilder::slow_call_rate) / [`slow_call_duration`](CircuitBreakerBuilder::slow_call_duration) | off; 1.0 / 60 s once one is set | 100 % / 60 s |
//! | [`open_for`](CircuitBreakerBuilder::open_for) | 30 s | 60 s |
//! | [`max_open_for`](CircuitBreakerBuilder::max_open_for) (backoff) | off; jitter 0.2 once on | off |
//! | [`half_open_calls`](CircuitBreakerBuilder::half_open_calls) | 10 | 10 |
//! | [`max_wait_in_half_open`](CircuitBreakerBuilder::max_wait_in_half_open) | wait for the probes | 0 (wait) |
//! | [`backpressure`](CircuitBreakerBuilder::backpressure) | off | — |
//! | keyed: `max_keys` / `idle_timeout` | 1024 / 10 min | — |
//!
//! The same values are the `DEFAULT_*` constants of [`CircuitBreakerConfig`].
//! Slow-call detection is off by default because it costs two clock reads per
//! call, and a 100 % threshold at 60 s only trips when every call hangs a
//! minute, which a timeout inside the breaker reports as failures anyway.
//!
//! # Windows and thresholds
//!
//! - **Count window** (`count_window(n)`): the last `n` outcomes, a ring of
//!   `n` slots and one packed counter word. O(1) per call, fixed memory.
//!   Each service made by the layer (its clones share it) takes ring
//!   positions 16 at a time, so services on different cores do not contend
//!   on one cursor; with several of them recording at once, the ring holds
//!   the last `n` calls give or take 16 per service.
//! - **Time window** (`time_window(d)`): the outcomes of the last `d`, in 10
//!   buckets of `d / 10`; a bucket leaves the window whole. O(1) per call,
//!   fixed memory.
//! - **Consecutive failures** (`consecutive_failures(k)`): opens after `k`
//!   failures in a row; a success resets the run. Slow calls do not count.
//!
//! The rates are fractions in `0.0..=1.0` of the calls in the window. The
//! breaker opens when a rate is **at or above** its threshold, and only once
//! the window holds `minimum_calls` calls.
//!
//! Half-open, the breaker admits exactly `half_open_calls` probes, reserved
//! with one compare-and-swap so that no more pass under any contention. When
//! they have all finished, it judges their failure and slow rates against the
//! same thresholds: below both, it closes (with an empty window); otherwise
//! it reopens. A probe whose future is dropped before it finishes gives its
//! slot back. With [`max_wait_in_half_open`](CircuitBreakerBuilder::max_wait_in_half_open),
//! the first call that finds every slot taken that long after the first
//! probe began reopens the breaker. A call that finishes after the state it was admitted in has
//! ended is not counted.
//!
//! With [`max_open_for`](CircuitBreakerBuilder::max_open_for), repeated opens
//! back off the way Envoy and Finagle lengthen ejection: each open that
//! follows a failed half-open lasts twice the one before, up to the cap,
//! shortened at random by up to [`open_jitter`](CircuitBreakerBuilder::open_jitter).
//! Closing resets it.
//!
//! # What counts as a failure
//!
//! By default `Err` is a failure and `Ok` a success. Our own rejections
//! (another breaker's `CircuitOpen`, `BulkheadFull`, `RateLimited`,
//! `DeadlineExceeded`) are not counted at all: they say nothing about the
//! dependency. An attempt timeout ([`Elapsed`](crate::timeout::Elapsed)) from
//! a timeout layer inside the breaker *is* a failure: that is how a hanging
//! dependency opens it. So is a deadline that fired only after the attempt
//! had nearly all of its own timeout (see [`crate::timeout`]); a deadline
//! that cut an attempt well short is not counted. So inside a server whose
//! callers send their budgets (`grpc-timeout`), set the attempt timeout to
//! what a healthy dependency needs, below the budgets callers send: with a
//! 10 s attempt timeout and 2 s budgets, every call to a hung dependency is
//! cut by the caller's deadline and, on failures alone, the breaker never
//! opens. Slow-call detection catches it too: a call cut by the caller's
//! deadline, or dropped, before the dependency answered counts as a *slow*
//! call (not a failure) once it has run for `slow_call_duration`, since the
//! dependency was that slow at least; set `slow_call_duration` below the
//! budgets callers send. Cut or dropped sooner, it is not counted; nor is
//! it in the consecutive-failures mode, where a call that is not a failure
//! would end the run. Pass a classifier with
//! [`classifier`](CircuitBreakerBuilder::classifier) to judge responses:
//! [`HttpClassifier`](crate::classify::HttpClassifier) (5xx, optionally 429
//! and 408) or [`GrpcClassifier`](crate::classify::GrpcClassifier). See
//! [`classify`](crate::classify).
//!
//! # Readiness
//!
//! By default `poll_ready` is the inner service's and reserves nothing; the
//! decision is made in `call`, and a rejected call returns `CircuitOpen`
//! without calling the inner service. This is what axum needs, since it
//! ignores backpressure. While the breaker is open or half-open, an inner
//! service that is not ready does not hold the caller: `poll_ready` answers
//! ready and `call` rejects. A dependency that is down often leaves its
//! client not ready for good (tonic's `Channel` once its queue has filled
//! with calls to a host that does not answer), and the breaker must still
//! fail fast. Such a call takes no probe slot (local backpressure must not
//! fail a probe); half-open, it is rejected with a `retry_after` of zero,
//! and probes go out once the inner service is ready. Callers already
//! waiting for the inner service when the breaker opens are woken and
//! rejected. Keyed breakers cannot do this: their `poll_ready` has no key,
//! so it always waits for the inner service.
//!
//! With [`backpressure(true)`](CircuitBreakerBuilder::backpressure),
//! `poll_ready` is not ready while the breaker is open, and is woken by a
//! timer when it turns half-open (while forced open it checks again every
//! `open_for`). A `tower::balance` balancer then routes around an open
//! endpoint, the way linkerd's failure accrual works. A half-open breaker
//! with every probe slot taken is ready; `call` rejects. The timer needs a
//! Tokio runtime with the time driver enabled. `poll_ready` never reserves a
//! probe slot, so a clone carries no reservation and `Clone` is plain.
//!
//! # Events
//!
//! Every state change is a `tracing` event (`warn` when opening, `info`
//! otherwise) with the fields `layer = "circuit_breaker"`, `from` and `to`;
//! each rejection is a `debug` event. [`CircuitBreakerHandle::subscribe`]
//! gives a `tokio::sync::broadcast` stream of [`Event`]s for your own
//! metrics.
//!
//! # Per-key breakers
//!
//! [`KeyedCircuitBreakerLayer`] keeps one breaker per key (a host, a route,
//! a tenant), with a bound on live keys and eviction of idle ones. A named
//! one registers itself as one entry, its keys counted by state (see
//! [`KeyedBreakerStatus`](crate::registry::KeyedBreakerStatus)).
//!
//! # Differences from Resilience4j and tower-resilience
//!
//! - The hot path takes no lock and allocates nothing when closed: admission
//!   is one atomic load, and recording an outcome in the steady state writes
//!   only cache lines of the calling service's own lane (its reference count
//!   and ring position), so cores do not contend. tower-resilience 0.13
//!   boxes each future and takes a
//!   `tokio::sync::Mutex` twice per call.
//! - Slow-call detection is off unless asked for (see [Defaults](#defaults)).
//! - Half-open probes are reserved atomically, and a cancelled probe returns
//!   its slot instead of leaving the breaker stuck half-open.
//! - `retry_after` on the rejection is the time actually left in the open
//!   state, ready for a `Retry-After` header.

pub(crate) mod breaker;
mod config;
mod error;
pub mod future;
mod keyed;
mod layer;
mod window;

pub use self::config::CircuitBreakerConfig;
pub use self::error::CircuitOpen;
pub use self::keyed::{KeyedCircuitBreaker, KeyedCircuitBreakerHandle, KeyedCircuitBreakerLayer};
pub use self::layer::{CircuitBreakerBuilder, CircuitBreakerLayer};

use self::breaker::{Breaker, Lane, Readiness};
use self::future::Call;
use crate::BoxError;
use crate::classify::{ClassifyStream, DefaultClassifier};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Sleep;
use tower::Service;

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Calls pass; outcomes are recorded.
    Closed,
    /// Calls are rejected until `open_for` has passed.
    Open,
    /// A fixed number of probes pass; the rest are rejected.
    HalfOpen,
    /// Rejects every call until [`CircuitBreakerHandle::reset`].
    ForcedOpen,
    /// Calls pass and outcomes are recorded, but the breaker never opens.
    Disabled,
}

impl State {
    /// A short, stable, lowercase name, for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something a breaker did, as sent to [`CircuitBreakerHandle::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The breaker changed state.
    Transition {
        /// The state before.
        from: State,
        /// The state after.
        to: State,
    },
    /// A call was rejected.
    Rejected {
        /// The state that rejected it.
        state: State,
        /// The `retry_after` the caller was given.
        retry_after: Duration,
    },
}

/// The counts in a breaker's sliding window; see
/// [`CircuitBreakerHandle::metrics`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Metrics {
    /// Calls in the window.
    pub calls: u64,
    /// Of those, failures.
    pub failures: u64,
    /// Of those, slow calls (only counted with slow-call detection on).
    pub slow_calls: u64,
}

impl Metrics {
    /// `failures / calls`, or 0 for an empty window.
    pub fn failure_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.failures as f64 / self.calls as f64
        }
    }

    /// `slow_calls / calls`, or 0 for an empty window.
    pub fn slow_call_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.slow_calls as f64 / self.calls as f64
        }
    }
}

/// A state change, as kept by [`CircuitBreakerHandle::recent_transitions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    from: State,
    to: State,
    reason: &'static str,
    at: std::time::SystemTime,
}

impl Transition {
    pub(crate) fn new(from: State, to: State, reason: &'static str) -> Self {
        Transition {
            from,
            to,
            reason,
            at: std::time::SystemTime::now(),
        }
    }

    /// The state left.
    pub fn from(&self) -> State {
        self.from
    }

    /// The state entered.
    pub fn to(&self) -> State {
        self.to
    }

    /// Why, in a few words ("failure or slow-call threshold reached").
    pub fn reason(&self) -> &'static str {
        self.reason
    }

    /// When, by the wall clock.
    pub fn at(&self) -> std::time::SystemTime {
        self.at
    }
}

/// A handle on a shared breaker. Clone it freely; every method is
/// synchronous and needs no runtime.
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    breaker: Arc<Breaker>,
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("state", &self.breaker.state())
            .finish()
    }
}

impl CircuitBreakerHandle {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Self {
        CircuitBreakerHandle { breaker }
    }

    pub(crate) fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// The state a call would meet now. An open breaker whose `open_for` has
    /// passed turns half-open here, as it would on the next call.
    pub fn state(&self) -> State {
        self.breaker.state()
    }

    /// Rejects every call until [`reset`](Self::reset).
    pub fn force_open(&self) {
        self.breaker.force_open();
    }

    /// Closes the breaker with an empty window, whatever its state.
    pub fn reset(&self) {
        self.breaker.reset();
    }

    /// Lets every call through and never opens; outcomes are still
    /// recorded. [`reset`](Self::reset) turns the breaker back on.
    pub fn disable(&self) {
        self.breaker.disable();
    }

    /// The time left before an open breaker lets probes through, or `None`
    /// when it is not open.
    pub fn retry_after(&self) -> Option<Duration> {
        self.breaker.open_remaining()
    }

    /// The calls in the sliding window now: how many, how many failed, how
    /// many were slow.
    ///
    /// The window is emptied when the breaker closes (and on
    /// [`reset`](Self::reset) and [`disable`](Self::disable)); while it is
    /// open or half-open, this is the window that opened it. While
    /// [`Disabled`](State::Disabled) it keeps counting. In the
    /// consecutive-failures mode, `calls` and `failures` are both the current
    /// run of failures.
    pub fn metrics(&self) -> Metrics {
        let s = self.breaker.counts();
        Metrics {
            calls: s.total,
            failures: s.failures,
            slow_calls: s.slow,
        }
    }

    /// The breaker's name, if it was given one.
    pub fn name(&self) -> Option<&str> {
        self.breaker.settings.name.as_deref()
    }

    /// The last 16 state changes, oldest first.
    pub fn recent_transitions(&self) -> Vec<Transition> {
        self.breaker.recent()
    }

    /// A stream of state changes and rejections.
    ///
    /// Events are sent only once someone has subscribed. A receiver that
    /// falls behind by more than 256 events sees `RecvError::Lagged`: while
    /// the breaker is open under load, rejections can crowd state changes
    /// out of its window. For state changes alone, use
    /// [`subscribe_transitions`](Self::subscribe_transitions).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.breaker.subscribe()
    }

    /// A stream of state changes only ([`Event::Transition`]), on a channel
    /// of its own, so that no number of rejections pushes one out. A
    /// receiver that falls behind by more than 64 changes sees
    /// `RecvError::Lagged`.
    pub fn subscribe_transitions(&self) -> broadcast::Receiver<Event> {
        self.breaker.subscribe_transitions()
    }
}

/// Fails calls fast while its dependency is down. See the [module docs](self).
pub struct CircuitBreaker<S, C = DefaultClassifier> {
    inner: S,
    lane: Arc<Lane>,
    classifier: C,
    // Readiness mode only: the timer until half-open.
    sleep: Option<Pin<Box<Sleep>>>,
    // The last `poll_ready` answered over a not-ready inner service (the
    // breaker was not closed), so `call` must not call it.
    skipped_inner: bool,
    // Closed, waiting for a not-ready inner service: woken by a trip too.
    // Boxed only on that path; dropped with the service.
    trip: Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

impl<S: Clone, C: Clone> Clone for CircuitBreaker<S, C> {
    fn clone(&self) -> Self {
        // A clone shares the breaker but not a pending readiness timer.
        CircuitBreaker {
            inner: self.inner.clone(),
            lane: self.lane.clone(),
            classifier: self.classifier.clone(),
            sleep: None,
            skipped_inner: false,
            trip: None,
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug> fmt::Debug for CircuitBreaker<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("breaker", &self.lane.breaker)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl<S> CircuitBreaker<S> {
    /// Wraps `inner` in a breaker with the [defaults](self#defaults). Prefer
    /// the layer: services made from one layer share one breaker.
    pub fn new(inner: S) -> Self {
        let settings = CircuitBreakerConfig::default()
            .settings()
            .expect("the defaults are valid");
        CircuitBreaker::from_parts(inner, Arc::new(Breaker::new(settings)), DefaultClassifier)
    }

    /// Starts a [`CircuitBreakerLayer`] builder.
    pub fn layer() -> CircuitBreakerBuilder {
        CircuitBreakerLayer::builder()
    }
}

impl<S, C> CircuitBreaker<S, C> {
    pub(crate) fn from_parts(inner: S, breaker: Arc<Breaker>, classifier: C) -> Self {
        CircuitBreaker {
            inner,
            lane: Lane::new(breaker),
            classifier,
            sleep: None,
            skipped_inner: false,
            trip: None,
        }
    }

    /// A handle on the shared breaker.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(self.lane.breaker.clone())
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

impl<S, C> CircuitBreaker<S, C> {
    /// The inner service is not ready. Not closed: answer ready, and reject
    /// in `call`. Closed: wait, for the inner service (whose waker is in)
    /// and for the next transition, checking again after each.
    #[cold]
    fn poll_trip<E>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), E>> {
        let breaker = &self.lane.breaker;
        loop {
            // Registered before the state is read: a trip after the read
            // reaches it, even before its first poll.
            let trip = self
                .trip
                .get_or_insert_with(|| Box::pin(breaker.trips.clone().notified_owned()));
            if breaker.not_closed() {
                self.trip = None;
                self.skipped_inner = true;
                return Poll::Ready(Ok(()));
            }
            if trip.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // A transition: look again, with a fresh registration.
            self.trip = None;
        }
    }
}

/// `poll_ready` for readiness mode: waits while the breaker is open.
pub(crate) fn poll_open(
    breaker: &Breaker,
    sleep: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        match breaker.readiness() {
            Readiness::Ready => {
                *sleep = None;
                return Poll::Ready(());
            }
            Readiness::WaitUntil(deadline) => {
                // Boxed once per open period, only in readiness mode.
                let s = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if s.deadline() != deadline {
                    s.as_mut().reset(deadline);
                }
                if s.as_mut().poll(cx).is_pending() {
                    // Registered after the state was read: a transition in
                    // between finds the waker, or has already changed what
                    // the next `readiness` reads; so check once more.
                    breaker.wake_on_transition(cx.waker());
                    if matches!(breaker.readiness(), Readiness::WaitUntil(_)) {
                        return Poll::Pending;
                    }
                    continue;
                }
            }
        }
    }
}

use std::future::Future as _;

impl<S, C, Req> Service<Req> for CircuitBreaker<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: ClassifyStream<S::Response> + Clone,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future, C, S::Response>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.lane.breaker.settings.backpressure
            && poll_open(&self.lane.breaker, &mut self.sleep, cx).is_pending()
        {
            return Poll::Pending;
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(r) => {
                self.skipped_inner = false;
                self.trip = None;
                Poll::Ready(r.map_err(Into::into))
            }
            Poll::Pending if self.lane.breaker.settings.backpressure => Poll::Pending,
            // Not ready. Open or half-open, do not wait for it: a
            // dependency that is down often leaves its client not ready
            // for good (a queue filled with calls to a host that does not
            // answer), and the breaker must still fail fast. Closed, wait
            // for it, and for a trip.
            Poll::Pending => self.poll_trip(cx),
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if self.skipped_inner {
            // Readiness was answered over a not-ready inner service, which
            // may not be called: rejected, without taking a probe slot.
            self.skipped_inner = false;
            let retry_after = self.lane.breaker.reject_unready();
            return future::ResponseFuture::rejected(retry_after, self.classifier.clone());
        }
        match self.lane.breaker.admit() {
            Ok(ticket) => future::ResponseFuture::called(
                self.inner.call(req),
                Call::new(self.lane.clone(), ticket),
                self.classifier.clone(),
            ),
            Err(retry_after) => {
                future::ResponseFuture::rejected(retry_after, self.classifier.clone())
            }
        }
    }
}
