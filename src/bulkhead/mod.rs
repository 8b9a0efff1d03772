//! Bound how many calls run at once, and fail the rest fast.
//!
//! A [`Bulkhead`] lets at most `max_concurrent` calls into the inner service at
//! a time. A call that finds no free slot waits at most
//! [`max_wait`](BulkheadLayer::max_wait) (by default not at all) and then fails
//! with [`BulkheadFull`]. A slow dependency can then hold only its own slots,
//! and the caller's other routes keep working. Waiting calls are served in
//! the order they began waiting (their response future's first poll): a
//! freed slot goes to the one that has waited longest, and a call that
//! arrives while others wait queues behind them.
//!
//! [`KeyedBulkhead`] keeps one pool per key (a tenant, a route, a host), so one
//! noisy key cannot take every slot.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{bulkhead::BulkheadLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(BulkheadLayer::new(64).max_wait(Duration::from_millis(10)))
//!     .service(service_fn(|x: u32| async move { Ok::<_, BoxError>(x * 2) }));
//! assert_eq!(svc.oneshot(21).await?, 42);
//! # Ok(())
//! # }
//! ```
//!
//! # Defaults
//!
//! [`BulkheadConfig::default()`]: 1000 concurrent calls, no waiting, at most
//! 1024 keys for a keyed bulkhead (the permit limit and queue limit of
//! Microsoft's standard HTTP resilience handler).
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's and reserves no slot: axum and other
//! callers that ignore backpressure still get a bounded bulkhead. The slot is
//! taken in `call` and held by the response future; it is released as soon as
//! the inner future completes, or when the response future is dropped
//! (cancelled).
//!
//! # Differences from `tower::limit::ConcurrencyLimit`
//!
//! `ConcurrencyLimit` waits for a permit in `poll_ready`, without bound, and
//! only sheds load when wrapped in `LoadShed`. Behind axum, which does not use
//! backpressure, it can queue calls forever. A `Bulkhead` never waits longer
//! than `max_wait`, and its rejection is a typed error.

mod config;
mod error;
pub mod future;
mod keyed;
mod layer;

pub use self::config::BulkheadConfig;
pub use self::error::BulkheadFull;
pub use self::keyed::{KeyedBulkhead, KeyedBulkheadLayer};
pub use self::layer::BulkheadLayer;

use crate::BoxError;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Semaphore;
use tower::Service;

/// Bounds the calls in flight. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Bulkhead<S> {
    inner: S,
    // None: no bound (a preset stage turned off).
    pool: Option<Pool>,
}

/// One pool of slots, shared by every clone of a service.
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    slots: Arc<Slots>,
    max_wait: Duration,
}

/// The slots of one pool, and the calls waiting for one.
#[derive(Debug)]
pub(crate) struct Slots {
    count: Count,
    waiters: AtomicUsize,
    max: usize,
    pub(crate) obs: crate::observe::BulkheadMetrics,
    name: Option<Arc<str>>,
    /// `obs` is this pool's alone (a keyed pool with a `key` label), not
    /// shared with other pools.
    own_series: bool,
}

/// How a pool counts its taken slots.
#[derive(Debug)]
enum Count {
    /// Without `max_wait` no call ever waits, so there is no order to keep:
    /// an atomic counter, one atomic operation to take a slot and one to give
    /// it back, with no mutex on release (half the happy path's cost of a
    /// semaphore).
    Counter(AtomicUsize),
    /// With `max_wait`: tokio's semaphore, whose waiters are served first
    /// come, first served. A freed slot goes straight to the oldest waiter;
    /// a call that arrives while others wait queues behind them rather than
    /// taking it. (A counter with a wake-up let newcomers overtake a woken
    /// waiter, which then queued again at the back, so under steady load the
    /// same call could wait out its whole `max_wait`.)
    Queue(Semaphore),
}

impl Slots {
    fn try_take(&self) -> bool {
        match &self.count {
            Count::Counter(in_flight) => {
                let mut cur = in_flight.load(Ordering::SeqCst);
                loop {
                    if cur >= self.max {
                        return false;
                    }
                    match in_flight.compare_exchange_weak(
                        cur,
                        cur + 1,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(_) => return true,
                        Err(now) => cur = now,
                    }
                }
            }
            // Fails while anyone waits: a free permit is handed to the
            // oldest waiter before it could be taken here.
            Count::Queue(sem) => sem.try_acquire().map(|p| p.forget()).is_ok(),
        }
    }

    fn in_flight(&self) -> usize {
        match &self.count {
            Count::Counter(in_flight) => in_flight.load(Ordering::SeqCst),
            Count::Queue(sem) => self.max.saturating_sub(sem.available_permits()),
        }
    }

    pub(crate) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn give_back(&self) {
        match &self.count {
            Count::Counter(in_flight) => {
                in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            Count::Queue(sem) => sem.add_permits(1),
        }
    }
}

/// A read-only view of a bulkhead, for a [`Registry`](crate::registry::Registry).
#[derive(Clone, Debug)]
pub struct BulkheadHandle {
    slots: Arc<Slots>,
}

impl BulkheadHandle {
    pub(crate) fn from_slots(slots: Arc<Slots>) -> Self {
        BulkheadHandle { slots }
    }

    pub(crate) fn slots(&self) -> &Arc<Slots> {
        &self.slots
    }

    /// The bulkhead's name, if it was given one.
    pub fn name(&self) -> Option<&str> {
        self.slots.name.as_deref()
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    /// Calls waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.slots.waiters.load(Ordering::SeqCst)
    }

    /// The bound on calls in flight.
    pub fn max_concurrent(&self) -> usize {
        self.slots.max
    }

    /// Sets the in-flight gauge from the live count (feature `metrics`).
    pub(crate) fn sample(&self) {
        self.slots.obs.in_flight(self.in_flight());
    }
}

/// A taken slot; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct Permit {
    slots: Arc<Slots>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.slots.give_back();
    }
}

/// Waits its turn for a slot. Slow path only: callers box this future.
/// Dropped while it waits, it leaves the queue; a slot already handed to it
/// goes back to the semaphore, and so to the next waiter.
pub(crate) async fn wait_for_slot(slots: Arc<Slots>) -> Permit {
    struct Waiting<'a>(&'a AtomicUsize);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let started = tokio::time::Instant::now();
    slots.waiters.fetch_add(1, Ordering::SeqCst);
    let _waiting = Waiting(&slots.waiters);
    match &slots.count {
        // The semaphore is never closed, so `acquire` cannot fail.
        Count::Queue(sem) => {
            if let Ok(p) = sem.acquire().await {
                p.forget();
            } else {
                std::future::pending::<()>().await;
            }
        }
        // Pools without `max_wait` reject rather than wait.
        Count::Counter(_) => std::future::pending::<()>().await,
    }
    slots.obs.waited(started.elapsed());
    Permit {
        slots: slots.clone(),
    }
}

impl Pool {
    pub(crate) fn new(max_concurrent: usize, max_wait: Duration) -> Self {
        Pool::named(max_concurrent, max_wait, None)
    }

    pub(crate) fn named(max_concurrent: usize, max_wait: Duration, name: Option<Arc<str>>) -> Self {
        Pool::keyed(max_concurrent, max_wait, name, None)
    }

    /// A pool whose metrics (when `name` is set) carry a `key` label too.
    pub(crate) fn keyed(
        max_concurrent: usize,
        max_wait: Duration,
        name: Option<Arc<str>>,
        key: Option<&str>,
    ) -> Self {
        let obs = crate::observe::BulkheadMetrics::new(name.as_deref(), key);
        Pool::build(max_concurrent, max_wait, name, obs, key.is_some())
    }

    /// A pool recording into `obs` (a keyed layer's pools share the
    /// layer's series when their keys are not labelled).
    pub(crate) fn with_metrics(
        max_concurrent: usize,
        max_wait: Duration,
        name: Option<Arc<str>>,
        obs: crate::observe::BulkheadMetrics,
    ) -> Self {
        Pool::build(max_concurrent, max_wait, name, obs, false)
    }

    fn build(
        max_concurrent: usize,
        max_wait: Duration,
        name: Option<Arc<str>>,
        obs: crate::observe::BulkheadMetrics,
        own_series: bool,
    ) -> Self {
        let (count, max) = if max_wait.is_zero() {
            (Count::Counter(AtomicUsize::new(0)), max_concurrent)
        } else {
            // More than tokio's semaphore can count is no bound anyway.
            let max = max_concurrent.min(Semaphore::MAX_PERMITS);
            (Count::Queue(Semaphore::new(max)), max)
        };
        Pool {
            slots: Arc::new(Slots {
                count,
                waiters: AtomicUsize::new(0),
                max,
                obs,
                name,
                own_series,
            }),
            max_wait,
        }
    }

    /// Whether this pool records into series of its own (see `own_series`).
    pub(crate) fn own_series(&self) -> bool {
        self.slots.own_series
    }

    /// Sets the pool's in-flight gauge to `n`.
    pub(crate) fn sample_in_flight(&self, n: usize) {
        self.slots.obs.in_flight(n);
    }

    /// Registers a named pool in `registry` (`None`: the global one).
    pub(crate) fn register(&self, registry: Option<&crate::registry::Registry>) {
        if self.slots.name.is_some() {
            crate::registry::target(registry).register_bulkhead(&self.slots);
        }
    }

    pub(crate) fn max_wait(&self) -> Duration {
        self.max_wait
    }

    pub(crate) fn name(&self) -> Option<Arc<str>> {
        self.slots.name.clone()
    }

    pub(crate) fn handle(&self) -> BulkheadHandle {
        BulkheadHandle {
            slots: self.slots.clone(),
        }
    }

    pub(crate) fn max_concurrent(&self) -> usize {
        self.slots.max
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    fn is_idle(&self) -> bool {
        self.in_flight() == 0 && Arc::strong_count(&self.slots) == 1
    }

    /// Takes a slot and calls `inner`, or waits for one (up to `max_wait`) or rejects.
    fn call<S, Req>(&self, inner: &mut S, req: Req) -> future::ResponseFuture<S, Req>
    where
        S: Service<Req> + Clone,
    {
        if self.slots.try_take() {
            let permit = Permit {
                slots: self.slots.clone(),
            };
            self.slots.obs.admitted();
            return future::ResponseFuture::running(inner.call(req), permit);
        }
        if self.max_wait.is_zero() {
            self.slots.obs.rejected();
            crate::trace::rejected("bulkhead", crate::error::RejectionKind::BulkheadFull, None);
            return future::ResponseFuture::full(self.slots.max);
        }
        // The ready service goes with the request; `self` keeps a fresh clone.
        let clone = inner.clone();
        let svc = std::mem::replace(inner, clone);
        future::ResponseFuture::waiting(svc, req, self.slots.clone(), self.max_wait)
    }
}

impl<S> Bulkhead<S> {
    /// Wraps `inner`, allowing `max_concurrent` calls at once and no waiting.
    pub fn new(inner: S, max_concurrent: usize) -> Self {
        Bulkhead {
            inner,
            pool: Some(Pool::new(max_concurrent, Duration::ZERO)),
        }
    }

    /// A [`BulkheadLayer`] with this bound.
    pub fn layer(max_concurrent: usize) -> BulkheadLayer {
        BulkheadLayer::new(max_concurrent)
    }

    pub(crate) fn from_pool(inner: S, pool: Option<Pool>) -> Self {
        Bulkhead { inner, pool }
    }

    /// Calls in flight right now, across every clone (zero when unbounded).
    pub fn in_flight(&self) -> usize {
        self.pool.as_ref().map_or(0, Pool::in_flight)
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

impl<S, Req> Service<Req> for Bulkhead<S>
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
        match &self.pool {
            Some(pool) => pool.call(&mut self.inner, req),
            None => future::ResponseFuture::unbounded(self.inner.call(req)),
        }
    }
}
