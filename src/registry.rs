//! Every named breaker, bulkhead, rate limiter and queue in one place, for
//! operators: a [`Snapshot`] of their state, and (feature `metrics`) the
//! `firebreak.*` series.
//!
//! # Self-registration
//!
//! A component given a name (`.name("payments")` on its builder, or `name`
//! in its config) registers itself in the process-wide
//! [`Registry::global()`], or in the registry given to its builder with
//! `.registry(&registry)` (for tests and multi-tenant applications). The
//! [`admin`](crate::admin) router (feature `axum`) serves the global one by
//! default. When it registers:
//!
//! | component | registers when |
//! | --- | --- |
//! | [`CircuitBreakerLayer`](crate::circuit_breaker::CircuitBreakerLayer) | `build()` (or `CircuitBreakerConfig::into_layer`) |
//! | [`BulkheadLayer`](crate::bulkhead::BulkheadLayer), [`RateLimitLayer`] | it makes its first service (`Layer::layer`): these builders have no `build()`, and `burst`/`max_wait` may still change the limiter before then |
//! | [`DeferLayer`](crate::defer::DeferLayer) (its queue) | it makes its first service |
//! | [`Replayer`](crate::defer::Replayer) (its queue) | `spawn()` |
//! | the [`Resilience`](crate::preset::Resilience) preset's stages | as above, each under the preset's `name` |
//!
//! Self-registered components are held by **weak reference**: once the
//! layer and every service made from it are dropped (a replayer: once it
//! stops), the component leaves the snapshot instead of being kept alive
//! by the registry. Unnamed components never register. Components added
//! explicitly with the `add_*` methods are held strongly, as before.
//!
//! **One name, two live components.** The registry keeps both and shows
//! the newer one; when the newer one is dropped, the older one shows again.
//! Registering a second live breaker, bulkhead or rate limiter under a name
//! logs a `tracing` warning (target `tower_firebreak`): their metrics
//! series would be summed too. Queues do not warn: a `DeferLayer` and its
//! `Replayer` name the same queue on purpose. The same component
//! registered again (every service made from one layer) is one entry.
//!
//! **Keyed layers** register by the same rules, as one entry per layer in
//! [`Snapshot::keyed_breakers`], [`Snapshot::keyed_bulkheads`] and
//! [`Snapshot::keyed_rate_limits`]:
//!
//! | component | registers when |
//! | --- | --- |
//! | [`KeyedCircuitBreakerLayer`](crate::circuit_breaker::KeyedCircuitBreakerLayer) | `CircuitBreakerConfig::into_keyed_layer`, in the global registry; [`registry`](crate::circuit_breaker::KeyedCircuitBreakerLayer::registry) moves it |
//! | [`KeyedBulkheadLayer`](crate::bulkhead::KeyedBulkheadLayer), [`KeyedRateLimitLayer`](crate::rate_limit::KeyedRateLimitLayer) | it makes its first service, in the registry given to its `registry` (default: the global one) |
//!
//! Their entries count live keys, never hold them: see
//! [`KeyedBreakerStatus`] for which key strings are shown. The admin
//! router's `reset` of a keyed breaker resets every live key
//! ([`Registry::reset_keyed_breaker`]) and its overflow breaker;
//! `force-open` is refused with 409, since keys that arrive later would
//! start closed (or share the overflow breaker).
//!
//! ```
//! use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
//! use tower_firebreak::registry::Registry;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_firebreak::BoxError> {
//! // Its own registry, as a test would use; without `.registry(..)` the
//! // breaker goes to `Registry::global()`.
//! let registry = Registry::new();
//! let payments = CircuitBreakerLayer::builder()
//!     .name("payments")
//!     .registry(&registry)
//!     .build()?;
//!
//! let snapshot = registry.snapshot().await;
//! assert_eq!(snapshot.breakers[0].name, "payments");
//! assert_eq!(snapshot.breakers[0].state, "closed");
//!
//! drop(payments);
//! assert!(registry.snapshot().await.breakers.is_empty());
//!
//! // Explicitly added components stay until the registry is dropped.
//! let orders = CircuitBreakerLayer::builder().name("orders").build()?;
//! registry.add_breaker(orders.handle())?;
//! drop(orders);
//! assert_eq!(registry.snapshot().await.breakers[0].name, "orders");
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! With the `metrics` feature, every *named* layer records these series on
//! the [`metrics`](https://docs.rs/metrics) facade, with the recorder the
//! application installed (Prometheus, OpenTelemetry, statsd…). Names follow
//! OpenTelemetry's dotted style; the Prometheus exporter writes the dots as
//! underscores. Every series has a `name` label, the component's name.
//!
//! | series | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `firebreak.calls` | counter | `layer`, `outcome` | breaker: `success`, `failure`, `rejected`; bulkhead and rate limit: `admitted`, `rejected` (a limiter in wait mode counts a call when its wait ends: `admitted`, or `rejected` when it gave up; a cancelled wait is not counted); defer: `deferred` |
//! | `firebreak.rejections` | counter | `layer`, `kind` | `circuit_open`, `bulkhead_full`, `rate_limited` |
//! | `firebreak.breaker.state` | gauge | `state` | 1 for the current state, 0 for the others |
//! | `firebreak.breaker.transitions` | counter | `from`, `to` | state changes |
//! | `firebreak.breaker.probes` | counter | `outcome` | half-open probes finished: `success`, `failure` |
//! | `firebreak.retry.attempts` | counter | | retries scheduled (the first attempt is not counted) |
//! | `firebreak.retry.gave_up` | counter | `reason` | retryable failures returned to the caller: `max_attempts`, `deadline`, `budget` (the retry budget was exhausted) |
//! | `firebreak.bulkhead.in_flight` | gauge | | calls in flight (sampled by [`Registry::snapshot`]) |
//! | `firebreak.bulkhead.wait` | histogram (s) | | how long an admitted call waited for its slot (only calls that waited) |
//! | `firebreak.queue.depth` | gauge | | jobs waiting (sampled by [`Registry::snapshot`]) |
//! | `firebreak.queue.oldest_age` | gauge (s) | | age of the oldest waiting job (sampled) |
//! | `firebreak.queue.dead_letters` | gauge | | jobs in the dead-letter store (sampled) |
//! | `firebreak.defer.enqueue.duration` | histogram (s) | | storing a deferred request |
//! | `firebreak.replay.duration` | histogram (s) | | one replayed send |
//! | `firebreak.replay.jobs` | counter | `outcome` | `delivered`, `failed` (given back with a backoff), `breaker_open` (given back unsent), `expired` (TTL passed, dead-lettered) |
//!
//! A retry policy is named with [`RetryPolicy::name`](crate::retry::RetryPolicy::name);
//! it has no registry entry (it has no state worth listing).
//!
//! An unnamed layer records nothing, and without the feature the calls are
//! compiled out. The handles are registered when the layer is built, so a
//! call only bumps an atomic. The breakers of a keyed layer record nothing
//! unless the layer opts in with
//! [`label_keys`](crate::circuit_breaker::KeyedCircuitBreakerLayer::label_keys):
//! then each key's breaker records the breaker series with a `key` label
//! next to the layer's `name` (one series per key, so opt in only for a
//! small key set). A named keyed breaker's registry entry counts its keys
//! by state; each key's state is also in
//! [`KeyedCircuitBreakerHandle::states`](crate::circuit_breaker::KeyedCircuitBreakerHandle::states).
//!
//! The gauges marked *sampled* are set when a snapshot is taken; the admin
//! router's `GET /metrics` takes one before it renders.

use crate::ConfigError;
use crate::bulkhead::{BulkheadHandle, Slots};
use crate::circuit_breaker::CircuitBreakerHandle;
use crate::circuit_breaker::breaker::Breaker;
use crate::observe::QueueMetrics;
#[cfg(feature = "axum")]
use crate::queue::DeadLetter;
use crate::queue::{JobId, Queue, QueueError};
use crate::rate_limit::RateLimitLayer;
use governor::Quota;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A queue with its type erased, for the registry and the admin router.
pub(crate) trait DynQueue: Send + Sync {
    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    fn oldest_age(&self) -> BoxFuture<'_, Result<Option<Duration>, QueueError>>;
    /// The admin router's listing (the snapshot only counts them).
    #[cfg(feature = "axum")]
    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, QueueError>>;
    fn dead_letter_count(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    fn redrive<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<bool, QueueError>>;
    fn metrics(&self) -> &QueueMetrics;
}

/// A queue handle and its sampled gauges. `Q` is the user's queue (added
/// with [`Registry::add_queue`]) or an `Arc` of it (a named
/// [`DeferLayer`](crate::defer::DeferLayer) or
/// [`Replayer`](crate::defer::Replayer) registering itself).
pub(crate) struct QueueEntry<Q> {
    queue: Q,
    obs: QueueMetrics,
}

impl<Q: Queue> QueueEntry<Arc<Q>> {
    /// The registration a named defer layer or replayer holds: the registry
    /// keeps only a weak reference to it.
    pub(crate) fn shared(name: &str, queue: Arc<Q>) -> Arc<dyn DynQueue> {
        Arc::new(QueueEntry {
            queue,
            obs: QueueMetrics::new(Some(name)),
        })
    }
}

impl<Q: Queue> DynQueue for QueueEntry<Arc<Q>> {
    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(self.queue.depth())
    }

    fn oldest_age(&self) -> BoxFuture<'_, Result<Option<Duration>, QueueError>> {
        Box::pin(self.queue.oldest_age())
    }

    #[cfg(feature = "axum")]
    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, QueueError>> {
        Box::pin(self.queue.dead_letters(limit))
    }

    fn dead_letter_count(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(self.queue.dead_letter_count())
    }

    fn redrive<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(self.queue.redrive(id))
    }

    fn metrics(&self) -> &QueueMetrics {
        &self.obs
    }
}

/// What the registry holds for one component: the component itself
/// (explicitly added with `add_*`), or a weak reference to it
/// (self-registered by a named layer, so that dropping every layer and
/// service takes it out of the registry instead of keeping it alive).
enum Held<T: ?Sized> {
    Strong(Arc<T>),
    Weak(Weak<T>),
}

impl<T: ?Sized> Held<T> {
    fn get(&self) -> Option<Arc<T>> {
        match self {
            Held::Strong(a) => Some(a.clone()),
            Held::Weak(w) => w.upgrade(),
        }
    }

    fn is_alive(&self) -> bool {
        match self {
            Held::Strong(_) => true,
            Held::Weak(w) => w.strong_count() > 0,
        }
    }

    fn ptr(&self) -> *const T {
        match self {
            Held::Strong(a) => Arc::as_ptr(a),
            Held::Weak(w) => w.as_ptr(),
        }
    }
}

/// One kind of component, by name. A name maps to every live instance
/// registered under it, oldest first: the newest live one is the one shown,
/// and when it is dropped the one before it shows again.
struct Entries<T: ?Sized, X = ()> {
    kind: &'static str,
    /// Whether a second live instance under one name deserves a warning
    /// (not for queues: a `DeferLayer` and its `Replayer` share the name of
    /// the queue they both use).
    warn_twice: bool,
    map: BTreeMap<String, Vec<(Held<T>, X)>>,
}

impl<T: ?Sized, X: Clone> Entries<T, X> {
    fn new(kind: &'static str, warn_twice: bool) -> Self {
        Entries {
            kind,
            warn_twice,
            map: BTreeMap::new(),
        }
    }

    fn insert(&mut self, name: &str, held: Held<T>, extra: X) {
        // Dropped components go here, so that an application which builds
        // and drops named layers and never takes a snapshot does not
        // collect dead entries. Registration is rare (build time), so a
        // pass over every entry is cheap enough.
        self.prune();
        let list = self.map.entry(name.to_owned()).or_default();
        let ptr = held.ptr();
        if let Some(i) = list
            .iter()
            .position(|(h, _)| std::ptr::addr_eq(h.ptr(), ptr))
        {
            // The same instance again (another service made from the same
            // layer, or an explicit add of a self-registered component):
            // keep one entry, the stronger hold, in its old place.
            if matches!(held, Held::Strong(_)) {
                list[i] = (held, extra);
            }
            return;
        }
        if self.warn_twice && !list.is_empty() {
            tracing::warn!(
                target: "tower_firebreak",
                kind = self.kind,
                name,
                "two live components registered under one name; the registry shows the newer one until it is dropped"
            );
        }
        list.push((held, extra));
    }

    fn get(&self, name: &str) -> Option<(Arc<T>, X)> {
        let list = self.map.get(name)?;
        list.iter()
            .rev()
            .find_map(|(h, x)| Some((h.get()?, x.clone())))
    }

    fn prune(&mut self) {
        self.map.retain(|_, list| {
            list.retain(|(h, _)| h.is_alive());
            !list.is_empty()
        });
    }

    /// The newest live instance of every name.
    fn live(&mut self) -> Vec<(String, Arc<T>, X)> {
        self.prune();
        self.map
            .iter()
            .filter_map(|(name, list)| {
                list.iter()
                    .rev()
                    .find_map(|(h, x)| Some((name.clone(), h.get()?, x.clone())))
            })
            .collect()
    }

    /// Takes out the entry of one instance (a keyed breaker moved to
    /// another registry with `.registry(..)`).
    fn remove(&mut self, name: &str, ptr: *const T) {
        if let Some(list) = self.map.get_mut(name) {
            list.retain(|(h, _)| !std::ptr::addr_eq(h.ptr(), ptr));
        }
        self.prune();
    }

    fn names(&self) -> Vec<&str> {
        self.map
            .iter()
            .filter(|(_, list)| list.iter().any(|(h, _)| h.is_alive()))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// A rate limiter's settings, next to the (weak) reference that says
/// whether it is still alive.
#[derive(Clone, Copy)]
struct Limiter {
    burst: u32,
    replenish: Duration,
}

impl From<Quota> for Limiter {
    fn from(quota: Quota) -> Self {
        Limiter {
            burst: quota.burst_size().get(),
            replenish: quota.replenish_interval(),
        }
    }
}

type LimiterState = dyn std::any::Any + Send + Sync;

/// How many keys a [`KeyedBreakerStatus`] lists at most.
pub const KEYED_LIST_LIMIT: usize = 100;

/// The per-key states of a keyed breaker, read under its table's lock.
pub(crate) struct KeyedStates {
    pub(crate) keys: usize,
    pub(crate) by_state: BTreeMap<&'static str, usize>,
    /// `Some` only when the layer labels its keys (`label_keys`): sorted,
    /// at most [`KEYED_LIST_LIMIT`].
    pub(crate) listed: Option<Vec<(String, &'static str)>>,
    /// The state of the breaker that new keys share while the table is full
    /// of breakers that are not closed; `None` until one was needed.
    pub(crate) overflow: Option<&'static str>,
}

/// A keyed breaker's table with its key type erased.
pub(crate) trait KeyedBreakerView: Send + Sync {
    fn states(&self) -> KeyedStates;
    /// Resets every live key's breaker; returns how many.
    fn reset_all(&self) -> usize;
}

/// A keyed bulkhead's pools with their key type erased.
pub(crate) trait KeyedBulkheadView: Send + Sync {
    /// Live pools, calls in flight and calls waiting, summed over the keys.
    fn counts(&self) -> (usize, usize, usize);
    /// Sets the in-flight gauges: each labelled key's own, or the layer's
    /// (summed over the keys) when the pools share it.
    fn sample(&self);
}

/// A keyed limiter's state with its key type erased.
pub(crate) trait KeyedLimiterView: Send + Sync {
    fn keys(&self) -> usize;
}

/// The fixed settings of a keyed bulkhead, kept next to its entry.
#[derive(Clone, Copy)]
pub(crate) struct KeyedBulkheadInfo {
    pub(crate) max_concurrent: usize,
    pub(crate) max_keys: usize,
}

struct Inner {
    breakers: Entries<Breaker>,
    bulkheads: Entries<Slots>,
    limiters: Entries<LimiterState, Limiter>,
    queues: Entries<dyn DynQueue>,
    keyed_breakers: Entries<dyn KeyedBreakerView, usize>,
    keyed_bulkheads: Entries<dyn KeyedBulkheadView, KeyedBulkheadInfo>,
    keyed_limiters: Entries<dyn KeyedLimiterView, Limiter>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            breakers: Entries::new("breaker", true),
            bulkheads: Entries::new("bulkhead", true),
            limiters: Entries::new("rate limit", true),
            queues: Entries::new("queue", false),
            keyed_breakers: Entries::new("keyed breaker", true),
            keyed_bulkheads: Entries::new("keyed bulkhead", true),
            keyed_limiters: Entries::new("keyed rate limit", true),
        }
    }
}

/// The named components of an application. Cheap to clone; clones share
/// one set. See the [module docs](self).
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Registry")
            .field("breakers", &inner.breakers.names())
            .field("bulkheads", &inner.bulkheads.names())
            .field("rate_limits", &inner.limiters.names())
            .field("queues", &inner.queues.names())
            .field("keyed_breakers", &inner.keyed_breakers.names())
            .field("keyed_bulkheads", &inner.keyed_bulkheads.names())
            .field("keyed_rate_limits", &inner.keyed_limiters.names())
            .finish()
    }
}

fn unnamed(what: &str) -> ConfigError {
    ConfigError::new(
        "name",
        Option::<String>::None,
        format!("a registered {what} needs a name; set one with .name(..)"),
    )
}

static GLOBAL: LazyLock<Registry> = LazyLock::new(Registry::new);

/// Where a named component registers itself: the [global](Registry::global)
/// registry unless a builder's `.registry(..)` chose another.
pub(crate) fn target(chosen: Option<&Registry>) -> &Registry {
    chosen.unwrap_or_else(|| Registry::global())
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The process-wide registry, into which every named breaker,
    /// bulkhead, rate limiter and queue registers itself unless its builder
    /// was given another with `.registry(..)`. It holds weak references:
    /// a component leaves it when its last layer and service are dropped.
    /// See [self-registration](self#self-registration).
    ///
    /// ```
    /// use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
    /// use tower_firebreak::registry::Registry;
    ///
    /// let layer = CircuitBreakerLayer::builder().name("doc-global").build().unwrap();
    /// assert!(Registry::global().breaker("doc-global").is_some());
    /// drop(layer);
    /// assert!(Registry::global().breaker("doc-global").is_none());
    /// ```
    pub fn global() -> &'static Registry {
        &GLOBAL
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a named breaker (from [`CircuitBreakerLayer::handle`](crate::circuit_breaker::CircuitBreakerLayer::handle)).
    /// The registry keeps it alive. While it is registered, another breaker
    /// of the same name added later is the one shown (see
    /// [self-registration](self#self-registration)).
    ///
    /// # Errors
    ///
    /// When the breaker has no name.
    pub fn add_breaker(&self, handle: CircuitBreakerHandle) -> Result<(), ConfigError> {
        let name = handle.name().ok_or_else(|| unnamed("breaker"))?.to_owned();
        self.lock()
            .breakers
            .insert(&name, Held::Strong(handle.breaker().clone()), ());
        Ok(())
    }

    pub(crate) fn register_breaker(&self, breaker: &Arc<Breaker>) {
        if let Some(name) = breaker.settings.name.as_deref() {
            self.lock()
                .breakers
                .insert(name, Held::Weak(Arc::downgrade(breaker)), ());
        }
    }

    /// Adds a named bulkhead (from [`BulkheadLayer::handle`](crate::bulkhead::BulkheadLayer::handle)).
    /// The registry keeps it alive.
    ///
    /// # Errors
    ///
    /// When the bulkhead has no name.
    pub fn add_bulkhead(&self, handle: BulkheadHandle) -> Result<(), ConfigError> {
        let name = handle.name().ok_or_else(|| unnamed("bulkhead"))?.to_owned();
        self.lock()
            .bulkheads
            .insert(&name, Held::Strong(handle.slots().clone()), ());
        Ok(())
    }

    pub(crate) fn register_bulkhead(&self, slots: &Arc<Slots>) {
        if let Some(name) = slots.name() {
            self.lock()
                .bulkheads
                .insert(name, Held::Weak(Arc::downgrade(slots)), ());
        }
    }

    /// Adds a named rate limiter. The registry keeps it alive.
    ///
    /// # Errors
    ///
    /// When the limiter has no name.
    pub fn add_rate_limit(&self, layer: &RateLimitLayer) -> Result<(), ConfigError> {
        let name = layer
            .get_name()
            .ok_or_else(|| unnamed("rate limit"))?
            .to_owned();
        let state: Arc<LimiterState> = layer.state();
        self.lock()
            .limiters
            .insert(&name, Held::Strong(state), layer.quota().into());
        Ok(())
    }

    pub(crate) fn register_rate_limit(&self, name: &str, state: &Arc<LimiterState>, quota: Quota) {
        self.lock()
            .limiters
            .insert(name, Held::Weak(Arc::downgrade(state)), quota.into());
    }

    /// Adds a queue under `name` (use the name given to its
    /// [`DeferLayer`](crate::defer::DeferLayer) and
    /// [`Replayer`](crate::defer::Replayer)). Pass a clone of the queue
    /// handle (or an `Arc` of it): the registry keeps it, reads its depth
    /// and dead letters, and the admin router redrives them.
    pub fn add_queue<Q: Queue>(&self, name: impl Into<String>, queue: Q) {
        let name = name.into();
        let entry: Arc<dyn DynQueue> = Arc::new(QueueEntry {
            queue: Arc::new(queue),
            obs: QueueMetrics::new(Some(&name)),
        });
        self.lock().queues.insert(&name, Held::Strong(entry), ());
    }

    pub(crate) fn register_queue(&self, name: &str, entry: &Arc<dyn DynQueue>) {
        self.lock()
            .queues
            .insert(name, Held::Weak(Arc::downgrade(entry)), ());
    }

    pub(crate) fn register_keyed_breaker(
        &self,
        name: &str,
        view: &Arc<dyn KeyedBreakerView>,
        max_keys: usize,
    ) {
        self.lock()
            .keyed_breakers
            .insert(name, Held::Weak(Arc::downgrade(view)), max_keys);
    }

    pub(crate) fn unregister_keyed_breaker(&self, name: &str, view: &Arc<dyn KeyedBreakerView>) {
        self.lock().keyed_breakers.remove(name, Arc::as_ptr(view));
    }

    pub(crate) fn register_keyed_bulkhead(
        &self,
        name: &str,
        view: Weak<dyn KeyedBulkheadView>,
        info: KeyedBulkheadInfo,
    ) {
        self.lock()
            .keyed_bulkheads
            .insert(name, Held::Weak(view), info);
    }

    pub(crate) fn register_keyed_rate_limit(
        &self,
        name: &str,
        view: &Arc<dyn KeyedLimiterView>,
        quota: Quota,
    ) {
        self.lock()
            .keyed_limiters
            .insert(name, Held::Weak(Arc::downgrade(view)), quota.into());
    }

    /// Resets every live key of the keyed breaker named `name`, and its
    /// overflow breaker; returns how many keys were reset, or `None` when no
    /// keyed breaker has that name.
    /// Keys that arrive later start closed anyway. There is no keyed
    /// `force_open`: a key first seen afterwards would start closed, so
    /// "every key open" cannot hold; force a key open through
    /// [`KeyedCircuitBreakerHandle::get`](crate::circuit_breaker::KeyedCircuitBreakerHandle::get).
    pub fn reset_keyed_breaker(&self, name: &str) -> Option<usize> {
        let (view, _) = self.lock().keyed_breakers.get(name)?;
        Some(view.reset_all())
    }

    /// Whether a live keyed breaker is registered under `name`.
    pub fn has_keyed_breaker(&self, name: &str) -> bool {
        self.lock().keyed_breakers.get(name).is_some()
    }

    /// The breaker named `name` (the newest live one of that name).
    pub fn breaker(&self, name: &str) -> Option<CircuitBreakerHandle> {
        let (b, ()) = self.lock().breakers.get(name)?;
        Some(CircuitBreakerHandle::new(b))
    }

    /// The bulkhead named `name` (the newest live one of that name).
    pub fn bulkhead(&self, name: &str) -> Option<BulkheadHandle> {
        let (s, ()) = self.lock().bulkheads.get(name)?;
        Some(BulkheadHandle::from_slots(s))
    }

    pub(crate) fn queues(&self) -> Vec<(String, Arc<dyn DynQueue>)> {
        self.lock()
            .queues
            .live()
            .into_iter()
            .map(|(k, v, ())| (k, v))
            .collect()
    }

    /// Moves the dead-lettered job `id` back to whichever registered queue
    /// holds it. Returns that queue's name, or `None` when no queue has it
    /// dead-lettered.
    ///
    /// # Errors
    ///
    /// The first queue error met, [`QueueError::Full`] among them.
    pub async fn redrive(&self, id: &JobId) -> Result<Option<String>, QueueError> {
        for (name, q) in self.queues() {
            if q.redrive(id).await? {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Every live component's state now. Also sets the sampled gauges
    /// (feature `metrics`): bulkhead in-flight, queue depth, oldest age and
    /// dead letters.
    pub async fn snapshot(&self) -> Snapshot {
        let (breakers, bulkheads, limiters, kb, kh, kl) = {
            let mut inner = self.lock();
            (
                inner.breakers.live(),
                inner.bulkheads.live(),
                inner.limiters.live(),
                inner.keyed_breakers.live(),
                inner.keyed_bulkheads.live(),
                inner.keyed_limiters.live(),
            )
        };
        let keyed_breakers = kb
            .into_iter()
            .map(|(name, v, max_keys)| {
                let s = v.states();
                KeyedBreakerStatus {
                    name,
                    kind: "keyed",
                    keys: s.keys,
                    max_keys,
                    by_state: s.by_state,
                    key_states: s.listed.map(|l| {
                        l.into_iter()
                            .map(|(key, state)| KeyStateStatus { key, state })
                            .collect()
                    }),
                    overflow: s.overflow,
                }
            })
            .collect();
        let keyed_bulkheads = kh
            .into_iter()
            .map(|(name, v, info)| {
                v.sample();
                let (keys, in_flight, waiting) = v.counts();
                KeyedBulkheadStatus {
                    name,
                    kind: "keyed",
                    keys,
                    max_keys: info.max_keys,
                    in_flight,
                    waiting,
                    max_concurrent_per_key: info.max_concurrent,
                }
            })
            .collect();
        let keyed_rate_limits = kl
            .into_iter()
            .map(|(name, v, l)| KeyedRateLimitStatus {
                name,
                kind: "keyed",
                keys: v.keys(),
                burst: l.burst,
                replenish_interval_ms: l.replenish.as_secs_f64() * 1e3,
            })
            .collect();
        let breakers = breakers
            .into_iter()
            .map(|(name, b, ())| {
                let h = CircuitBreakerHandle::new(b);
                let m = h.metrics();
                BreakerStatus {
                    state: h.state().as_str(),
                    calls: m.calls,
                    failures: m.failures,
                    slow_calls: m.slow_calls,
                    failure_rate: m.failure_rate(),
                    retry_after_ms: h.retry_after().map(crate::duration_ms),
                    transitions: h
                        .recent_transitions()
                        .into_iter()
                        .map(|t| TransitionStatus {
                            from: t.from().as_str(),
                            to: t.to().as_str(),
                            reason: t.reason(),
                            at_unix_ms: unix_ms(t.at()),
                        })
                        .collect(),
                    name,
                }
            })
            .collect();
        let bulkheads = bulkheads
            .into_iter()
            .map(|(name, s, ())| {
                let h = BulkheadHandle::from_slots(s);
                h.sample();
                BulkheadStatus {
                    in_flight: h.in_flight(),
                    waiting: h.waiting(),
                    max_concurrent: h.max_concurrent(),
                    name,
                }
            })
            .collect();
        let rate_limits = limiters
            .into_iter()
            .map(|(name, _, l)| RateLimitStatus {
                name,
                burst: l.burst,
                replenish_interval_ms: l.replenish.as_secs_f64() * 1e3,
            })
            .collect();
        let mut queues = Vec::new();
        for (name, q) in self.queues() {
            queues.push(queue_status(name, &*q).await);
        }
        Snapshot {
            breakers,
            bulkheads,
            rate_limits,
            queues,
            keyed_breakers,
            keyed_bulkheads,
            keyed_rate_limits,
        }
    }
}

async fn queue_status(name: String, q: &dyn DynQueue) -> QueueStatus {
    let read = async {
        let depth = q.depth().await?;
        let oldest = q.oldest_age().await?;
        let dead = q.dead_letter_count().await?;
        Ok::<_, QueueError>((depth, oldest, dead))
    };
    match read.await {
        Ok((depth, oldest, dead)) => {
            q.metrics().sampled(depth, oldest, dead);
            QueueStatus {
                name,
                depth: Some(depth),
                oldest_age_ms: oldest.map(crate::duration_ms),
                dead_letters: Some(dead),
                error: None,
            }
        }
        Err(e) => QueueStatus {
            name,
            depth: None,
            oldest_age_ms: None,
            dead_letters: None,
            error: Some(e.to_string()),
        },
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, crate::duration_ms)
}

/// Every registered component's state, as served by `GET /firebreak/status`.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The breakers, by name.
    pub breakers: Vec<BreakerStatus>,
    /// The bulkheads, by name.
    pub bulkheads: Vec<BulkheadStatus>,
    /// The rate limiters, by name.
    pub rate_limits: Vec<RateLimitStatus>,
    /// The queues, by name.
    pub queues: Vec<QueueStatus>,
    /// The keyed breakers (one breaker per key), by name.
    pub keyed_breakers: Vec<KeyedBreakerStatus>,
    /// The keyed bulkheads (one pool per key), by name.
    pub keyed_bulkheads: Vec<KeyedBulkheadStatus>,
    /// The keyed rate limiters (one limit per key), by name.
    pub keyed_rate_limits: Vec<KeyedRateLimitStatus>,
}

/// One keyed breaker in a [`Snapshot`].
///
/// Keys are label-like data: their number is bounded only by the layer's
/// `max_keys`, and they may name tenants or hosts. So the snapshot always
/// counts the keys by state, and lists key strings only when the layer
/// opted in with
/// [`label_keys`](crate::circuit_breaker::KeyedCircuitBreakerLayer::label_keys)
/// (the same opt-in as a `key` label on the metrics), and then at most the
/// first [`KEYED_LIST_LIMIT`] keys in sorted order.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct KeyedBreakerStatus {
    /// Its name.
    pub name: String,
    /// Always `keyed`.
    pub kind: &'static str,
    /// Live keys (one breaker each).
    pub keys: usize,
    /// The bound on live keys.
    pub max_keys: usize,
    /// Live keys by state (`closed`, `open`, `half_open`, `forced_open`,
    /// `disabled`); states with no key are left out.
    pub by_state: BTreeMap<&'static str, usize>,
    /// With `label_keys`: the first [`KEYED_LIST_LIMIT`] keys, sorted, with
    /// their states. `None` when the layer does not label its keys.
    pub key_states: Option<Vec<KeyStateStatus>>,
    /// The state of the overflow breaker, which keys without a place share
    /// while the table is full and none of its breakers is closed (see
    /// [`KeyedCircuitBreakerLayer`](crate::circuit_breaker::KeyedCircuitBreakerLayer));
    /// `None` until one was needed.
    pub overflow: Option<&'static str>,
}

/// One key of a [`KeyedBreakerStatus`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct KeyStateStatus {
    /// The key, as its `Display` writes it.
    pub key: String,
    /// Its breaker's state.
    pub state: &'static str,
}

/// One keyed bulkhead in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct KeyedBulkheadStatus {
    /// Its name.
    pub name: String,
    /// Always `keyed`.
    pub kind: &'static str,
    /// Live pools (one per key).
    pub keys: usize,
    /// The bound on live pools.
    pub max_keys: usize,
    /// Calls in flight, summed over the keys.
    pub in_flight: usize,
    /// Calls waiting for a slot, summed over the keys.
    pub waiting: usize,
    /// Each key's bound on calls in flight.
    pub max_concurrent_per_key: usize,
}

/// One keyed rate limiter in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct KeyedRateLimitStatus {
    /// Its name.
    pub name: String,
    /// Always `keyed`.
    pub kind: &'static str,
    /// Keys with live state (until
    /// [`retain_recent`](crate::rate_limit::KeyedRateLimitLayer::retain_recent)
    /// drops the fresh ones).
    pub keys: usize,
    /// Calls of one key that may pass at one instant.
    pub burst: u32,
    /// One permit of a key comes back every this many milliseconds.
    pub replenish_interval_ms: f64,
}

/// One breaker in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct BreakerStatus {
    /// Its name.
    pub name: String,
    /// `closed`, `open`, `half_open`, `forced_open` or `disabled`.
    pub state: &'static str,
    /// Calls in the sliding window.
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// `failures / calls`, 0 when the window is empty.
    pub failure_rate: f64,
    /// While open: the time until probes pass.
    pub retry_after_ms: Option<u64>,
    /// The last 16 state changes, oldest first.
    pub transitions: Vec<TransitionStatus>,
}

/// One state change in a [`BreakerStatus`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct TransitionStatus {
    /// The state left.
    pub from: &'static str,
    /// The state entered.
    pub to: &'static str,
    /// Why.
    pub reason: &'static str,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// One bulkhead in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct BulkheadStatus {
    /// Its name.
    pub name: String,
    /// Calls in flight.
    pub in_flight: usize,
    /// Calls waiting for a slot.
    pub waiting: usize,
    /// The bound.
    pub max_concurrent: usize,
}

/// One rate limiter in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct RateLimitStatus {
    /// Its name.
    pub name: String,
    /// Calls that may pass at one instant.
    pub burst: u32,
    /// One permit comes back every this many milliseconds.
    pub replenish_interval_ms: f64,
}

/// One queue in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct QueueStatus {
    /// Its name.
    pub name: String,
    /// Jobs waiting; `None` when the queue could not be read.
    pub depth: Option<usize>,
    /// The age of the oldest waiting job.
    pub oldest_age_ms: Option<u64>,
    /// Jobs in the dead-letter store ([`Queue::dead_letter_count`]).
    pub dead_letters: Option<usize>,
    /// Why the queue could not be read.
    pub error: Option<String>,
}
