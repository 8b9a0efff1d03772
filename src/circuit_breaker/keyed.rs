use super::breaker::{Breaker, Lane, Settings};
use super::future::{Call, ResponseFuture};
use super::{CircuitBreakerHandle, State};
use crate::BoxError;
use crate::classify::{ClassifyStream, DefaultClassifier};
use crate::registry::{KEYED_LIST_LIMIT, KeyedBreakerView, KeyedStates, Registry};
use crate::shards::{Sharded, lock};
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};

/// One breaker per key. See the [module docs](super#per-key-breakers).
///
/// The key function runs on every request, and the key table is 16 hash
/// tables by key hash, each behind a `std::sync::Mutex` held only to look
/// the key up (never across an await), so calls of different keys on
/// different threads seldom wait for each other: this is the flexible path,
/// not the lock-free one. A key not in the table takes one more mutex, the
/// table's own, under which breakers are made, swept and evicted.
///
/// At most `max_keys` breakers live at once. When a new key arrives,
/// breakers unused for `idle_timeout` are dropped unless they are open with
/// time left, forced open or disabled (checked at most once per
/// `idle_timeout`, or per a sixteenth of it while the table is full); if the
/// table is still full, closed breakers go (and half-open ones idle for
/// `idle_timeout`, as a sweep would drop), least recently used first: one,
/// or in a table of 64 keys or more up to `max_keys / 32` at once, so that
/// a stream of new keys scans the table once per batch, not once per key.
/// If none can go (every breaker is open, half-open and in use, forced
/// open or disabled), none goes:
/// evicting one would let calls through to a key that is failing, or undo
/// an operator. The new key then shares one overflow breaker with every
/// other key that finds no place (it opens if they fail), until a place
/// frees, which a table full of forced-open or disabled breakers, or of
/// failing keys that keep calling, may never do; the table is looked at
/// again at most once a second. The overflow breaker has no key:
/// [`KeyedCircuitBreakerHandle::get`] gives `None` for a key it serves, and
/// the status shows it apart (`overflow`); with `label_keys` its metrics
/// carry `key="(overflow)"`. Memory stays bounded under any number of
/// keys.
/// A call in flight on an evicted breaker still completes normally.
///
/// The readiness mode does not apply: a keyed breaker cannot know the key in
/// `poll_ready`, so it always decides in `call`.
pub struct KeyedCircuitBreaker<S, K, F, C = DefaultClassifier> {
    inner: S,
    shared: Arc<Shared<K, F, C>>,
}

struct Entry {
    lane: Arc<Lane>,
    last_used: Instant,
}

struct Shared<K, F, C> {
    key_fn: F,
    classifier: C,
    settings: Settings,
    max_keys: usize,
    idle_timeout: Duration,
    /// In its own `Arc`, apart from the key function and classifier, so
    /// that a registry can hold it (weakly) with only `K: Send + 'static`.
    breakers: Arc<Keys<K>>,
    /// Where a named layer is registered (`None`: the global registry).
    registry: Option<Registry>,
}

/// The key table, as the registry sees it.
///
/// A call of a key in the table locks only that key's shard (see
/// [`Sharded`]). Everything else (making a breaker for a new key, sweeping
/// idle ones, evicting, the overflow breaker) runs under `table`, which is
/// taken before any shard, never while one is held.
struct Keys<K> {
    map: Sharded<K, Entry>,
    table: Mutex<Table>,
    /// Set by `label_keys`: each key's breaker records the layer's series
    /// with a `key` label, and the registry may list the key.
    label: OnceLock<fn(&K) -> String>,
}

impl<K> Keys<K> {
    fn new() -> Self {
        Keys {
            map: Sharded::new(),
            table: Mutex::new(Table::new()),
            label: OnceLock::new(),
        }
    }

    /// The table's own state; taken before any shard.
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }
}

impl<K: Send + 'static> KeyedBreakerView for Keys<K> {
    fn states(&self) -> KeyedStates {
        // Under the table's lock, nothing is added or removed meanwhile.
        let table = self.lock();
        let label = self.label.get();
        let mut by_state = BTreeMap::new();
        let mut listed = Vec::new();
        self.map.each_shard(|map| {
            for (_, k, e) in map.iter() {
                let state = e.lane.breaker.state().as_str();
                *by_state.entry(state).or_insert(0) += 1;
                if let Some(label) = label {
                    listed.push((label(k), state));
                }
            }
        });
        KeyedStates {
            keys: self.map.len(),
            by_state,
            listed: label.map(|_| {
                listed.sort_unstable();
                listed.truncate(KEYED_LIST_LIMIT);
                listed
            }),
            overflow: table.overflow.as_ref().map(|l| l.breaker.state().as_str()),
        }
    }

    fn reset_all(&self) -> usize {
        let (lanes, overflow): (Vec<_>, _) = {
            let mut table = self.lock();
            // Every place is about to be closed, and so evictable.
            table.saturated_until = None;
            let mut lanes = Vec::new();
            self.map
                .each_shard(|map| lanes.extend(map.iter().map(|(_, _, e)| e.lane.breaker.clone())));
            (lanes, table.overflow.as_ref().map(|l| l.breaker.clone()))
        };
        // Outside the lock: a reset emits events and tracing.
        for b in lanes.iter().chain(&overflow) {
            CircuitBreakerHandle::new(b.clone()).reset();
        }
        lanes.len()
    }
}

/// How long a table found full of breakers that are not closed is taken to
/// stay so before it is scanned again.
const SATURATED_RECHECK: Duration = Duration::from_secs(1);

/// A full table evicts up to `max_keys / EVICT_SHARE` closed breakers at
/// once (at least one).
const EVICT_SHARE: usize = 32;

/// An eviction candidate, ordered by its last use.
struct Victim<K> {
    used: Instant,
    hash: u64,
    key: K,
}

impl<K> PartialEq for Victim<K> {
    fn eq(&self, other: &Self) -> bool {
        self.used == other.used
    }
}

impl<K> Eq for Victim<K> {}

impl<K> PartialOrd for Victim<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<K> Ord for Victim<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.used.cmp(&other.used)
    }
}

/// The key table's own state, apart from its entries.
struct Table {
    /// When idle breakers were last swept out.
    swept: Instant,
    /// The breaker that new keys share while the table is full and none of
    /// its breakers is closed (see `lane_for`); made when first needed.
    overflow: Option<Arc<Lane>>,
    /// Until when a full table is taken to have no closed breaker, so that
    /// the keys sent to `overflow` do not each scan the table.
    saturated_until: Option<Instant>,
}

impl Table {
    fn new() -> Self {
        Table {
            swept: Instant::now(),
            overflow: None,
            saturated_until: None,
        }
    }
}

impl<K, F, C> Shared<K, F, C>
where
    K: Hash + Eq + Clone,
{
    /// A new breaker for `key`, or for the overflow (`None`, labelled
    /// `(overflow)`). Per-key breakers record metrics only when the user
    /// opted in to a `key` label (one series per key is unbounded
    /// cardinality).
    fn breaker(&self, key: Option<&K>) -> Breaker {
        match (self.breakers.label.get(), &self.settings.name) {
            (Some(label), Some(_)) => {
                let label = key.map_or_else(|| "(overflow)".to_owned(), label);
                Breaker::with_key(self.settings.clone(), Some(&label))
            }
            _ => {
                let mut settings = self.settings.clone();
                settings.name = None;
                Breaker::new(settings)
            }
        }
    }

    fn lane_for(&self, key: K) -> Arc<Lane> {
        let now = Instant::now();
        let keys = &*self.breakers;
        let map = &keys.map;
        let hash = map.hash(&key);
        let touch = |e: &mut Entry| {
            e.last_used = now;
            e.lane.clone()
        };
        if let Some(lane) = map.with(hash, &key, touch) {
            return lane;
        }
        let mut table = keys.lock();
        // Made by another call while this one waited for the table.
        if let Some(lane) = map.with(hash, &key, touch) {
            return lane;
        }
        if let (Some(until), Some(lane)) = (table.saturated_until, &table.overflow)
            && now < until
            && map.len() >= self.max_keys
        {
            return lane.clone();
        }
        // Sweep idle breakers at most once per idle_timeout, or per a
        // sixteenth of it when the table is full, so that a stream of new
        // keys does not pay a sweep each.
        let idle = self.idle_timeout;
        let since = now.saturating_duration_since(table.swept);
        if since >= idle || (map.len() >= self.max_keys && since >= idle / 16) {
            table.swept = now;
            // An idle breaker goes unless it is open with time left, or was
            // set by hand (forced open, disabled): one left half-open by a
            // key that stopped calling must not hold its place for good.
            map.retain(|_, e| {
                now.saturating_duration_since(e.last_used) < idle
                    || !matches!(e.lane.breaker.state(), State::Closed | State::HalfOpen)
            });
        }
        if map.len() >= self.max_keys {
            // The least recently used closed breakers, a share of the table
            // at once (one for a table under 2 × EVICT_SHARE), so that a
            // stream of new keys scans the table once per batch rather than
            // once per key: each with its last use, hash and key, the most
            // recent on top.
            let batch = (self.max_keys / EVICT_SHARE).max(1);
            let mut victims: BinaryHeap<Victim<K>> = BinaryHeap::with_capacity(batch + 1);
            map.each_shard(|shard| {
                for (h, k, e) in shard.iter() {
                    // Closed, or half-open and idle (which the sweep, skipped
                    // since the last, would have dropped).
                    let evictable = match e.lane.breaker.state() {
                        State::Closed => true,
                        State::HalfOpen => now.saturating_duration_since(e.last_used) >= idle,
                        _ => false,
                    };
                    if !evictable
                        || victims.len() == batch
                            && victims.peek().is_some_and(|v| v.used <= e.last_used)
                    {
                        continue;
                    }
                    victims.push(Victim {
                        used: e.last_used,
                        hash: *h,
                        key: k.clone(),
                    });
                    if victims.len() > batch {
                        victims.pop();
                    }
                }
            });
            if victims.is_empty() {
                // Every live breaker is open, half-open or set by hand:
                // evicting one would let calls through to a dependency that
                // is failing (or undo an operator). Keys without a place
                // share one breaker until one frees.
                table.saturated_until = Some(crate::later(now, SATURATED_RECHECK));
                return table
                    .overflow
                    .get_or_insert_with(|| Lane::new(Arc::new(self.breaker(None))))
                    .clone();
            }
            // Under `table`, nothing else removed them meanwhile (a call may
            // have used one since; it goes all the same).
            for v in victims {
                map.remove(v.hash, &v.key);
            }
        }
        let breaker = self.breaker(Some(&key));
        let lane = Lane::new(Arc::new(breaker));
        map.insert(
            hash,
            key,
            Entry {
                lane: lane.clone(),
                last_used: now,
            },
        );
        drop(table);
        lane
    }
}

impl<S: Clone, K, F, C> Clone for KeyedCircuitBreaker<S, K, F, C> {
    fn clone(&self) -> Self {
        KeyedCircuitBreaker {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, K, F, C> fmt::Debug for KeyedCircuitBreaker<S, K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreaker")
            .field("inner", &self.inner)
            .field("max_keys", &self.shared.max_keys)
            .finish_non_exhaustive()
    }
}

impl<S, K, F, C> KeyedCircuitBreaker<S, K, F, C> {
    /// A handle on every keyed breaker of this service's layer.
    pub fn handle(&self) -> KeyedCircuitBreakerHandle<K, F, C> {
        KeyedCircuitBreakerHandle {
            shared: self.shared.clone(),
        }
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

impl<S, K, F, C, Req> Service<Req> for KeyedCircuitBreaker<S, K, F, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone,
    F: Fn(&Req) -> K,
    C: ClassifyStream<S::Response> + Clone,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.shared.key_fn)(&req);
        let lane = self.shared.lane_for(key);
        match lane.breaker.admit() {
            Ok(ticket) => ResponseFuture::called(
                self.inner.call(req),
                Call::new(lane, ticket),
                self.shared.classifier.clone(),
            ),
            Err(retry_after) => {
                ResponseFuture::rejected(retry_after, self.shared.classifier.clone())
            }
        }
    }
}

/// Applies a [`KeyedCircuitBreaker`]. Every service made from one layer
/// shares its breakers.
///
/// Build it from a [`CircuitBreakerConfig`](super::CircuitBreakerConfig)
/// with [`into_keyed_layer`](super::CircuitBreakerConfig::into_keyed_layer):
///
/// ```
/// use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, KeyedCircuitBreakerLayer};
///
/// // One breaker per upstream host.
/// let layer: KeyedCircuitBreakerLayer<String, _> =
///     CircuitBreakerConfig { max_keys: 64, ..Default::default() }
///     .into_keyed_layer(|req: &http::Request<()>| {
///         req.uri().host().unwrap_or_default().to_owned()
///     })
///     .unwrap();
/// # let _ = layer;
/// ```
pub struct KeyedCircuitBreakerLayer<K, F, C = DefaultClassifier> {
    shared: Arc<Shared<K, F, C>>,
}

impl<K, F, C> Clone for KeyedCircuitBreakerLayer<K, F, C> {
    fn clone(&self) -> Self {
        KeyedCircuitBreakerLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerLayer<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerLayer")
            .field("settings", &self.shared.settings)
            .field("max_keys", &self.shared.max_keys)
            .field("idle_timeout", &self.shared.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<K, F> KeyedCircuitBreakerLayer<K, F> {
    pub(crate) fn from_parts(
        settings: Settings,
        classifier: DefaultClassifier,
        key_fn: F,
        max_keys: usize,
        idle_timeout: Duration,
    ) -> Self {
        KeyedCircuitBreakerLayer {
            shared: Arc::new(Shared {
                key_fn,
                classifier,
                settings,
                max_keys,
                idle_timeout,
                breakers: Arc::new(Keys::new()),
                registry: None,
            }),
        }
    }
}

impl<K: Send + 'static, F, C> KeyedCircuitBreakerLayer<K, F, C> {
    /// Registers a named layer's key table in its registry.
    pub(crate) fn register(&self) {
        if let Some(name) = self.shared.settings.name.as_deref() {
            let view: Arc<dyn KeyedBreakerView> = self.shared.breakers.clone();
            crate::registry::target(self.shared.registry.as_ref()).register_keyed_breaker(
                name,
                &view,
                self.shared.max_keys,
            );
        }
    }

    /// Moves a named layer's registration to `registry`, out of the one it
    /// joined when it was built ([`Registry::global()`] unless an earlier
    /// call chose another). See
    /// [self-registration](crate::registry#self-registration).
    ///
    /// ```
    /// use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, KeyedCircuitBreakerLayer};
    /// use tower_firebreak::registry::Registry;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let registry = Registry::new();
    /// let layer: KeyedCircuitBreakerLayer<String, _> = CircuitBreakerConfig {
    ///     name: Some("doc-keyed-hosts".into()),
    ///     ..Default::default()
    /// }
    /// .into_keyed_layer(|host: &String| host.clone())
    /// .unwrap()
    /// .registry(&registry);
    /// assert_eq!(registry.snapshot().await.keyed_breakers[0].name, "doc-keyed-hosts");
    /// assert!(!Registry::global().has_keyed_breaker("doc-keyed-hosts"));
    /// # let _ = layer;
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If the layer was already cloned: call this first.
    pub fn registry(self, registry: &Registry) -> Self {
        let mut shared = Arc::try_unwrap(self.shared)
            .unwrap_or_else(|_| panic!("call registry before cloning the layer"));
        if let Some(name) = shared.settings.name.as_deref() {
            let view: Arc<dyn KeyedBreakerView> = shared.breakers.clone();
            crate::registry::target(shared.registry.as_ref()).unregister_keyed_breaker(name, &view);
        }
        shared.registry = Some(registry.clone());
        let layer = KeyedCircuitBreakerLayer {
            shared: Arc::new(shared),
        };
        layer.register();
        layer
    }
}

impl<K, F, C> KeyedCircuitBreakerLayer<K, F, C> {
    /// Uses `classifier` instead.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned: set the classifier first.
    pub fn classifier<C2>(self, classifier: C2) -> KeyedCircuitBreakerLayer<K, F, C2> {
        let shared = Arc::try_unwrap(self.shared)
            .unwrap_or_else(|_| panic!("set the classifier before cloning the layer"));
        KeyedCircuitBreakerLayer {
            shared: Arc::new(Shared {
                key_fn: shared.key_fn,
                classifier,
                settings: shared.settings,
                max_keys: shared.max_keys,
                idle_timeout: shared.idle_timeout,
                breakers: shared.breakers,
                registry: shared.registry,
            }),
        }
    }

    /// Opts in to per-key metrics (feature `metrics`): each key's breaker
    /// records the `firebreak.*` breaker series under the layer's `name`
    /// (set in [`CircuitBreakerConfig::name`](super::CircuitBreakerConfig::name))
    /// with a `key` label. Without this, or without a name, per-key breakers
    /// record no metrics: one series per key is unbounded cardinality, so
    /// opt in only for a small, known key set (a few upstream hosts). A
    /// recorder keeps an evicted key's series unless told to expire idle
    /// ones.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned: call this first.
    pub fn label_keys(self) -> Self
    where
        K: fmt::Display,
    {
        let shared = Arc::try_unwrap(self.shared)
            .unwrap_or_else(|_| panic!("call label_keys before cloning the layer"));
        // Set once, before any service exists; a second call changes nothing.
        let _ = shared.breakers.label.set(|k: &K| k.to_string());
        KeyedCircuitBreakerLayer {
            shared: Arc::new(shared),
        }
    }

    /// A handle on every breaker of this layer.
    pub fn handle(&self) -> KeyedCircuitBreakerHandle<K, F, C> {
        KeyedCircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, K, F, C> Layer<S> for KeyedCircuitBreakerLayer<K, F, C> {
    type Service = KeyedCircuitBreaker<S, K, F, C>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedCircuitBreaker {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A handle on the breakers of a [`KeyedCircuitBreakerLayer`].
pub struct KeyedCircuitBreakerHandle<K, F, C = DefaultClassifier> {
    shared: Arc<Shared<K, F, C>>,
}

impl<K, F, C> Clone for KeyedCircuitBreakerHandle<K, F, C> {
    fn clone(&self) -> Self {
        KeyedCircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<K, F, C> fmt::Debug for KeyedCircuitBreakerHandle<K, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakerHandle")
            .finish_non_exhaustive()
    }
}

impl<K, F, C> KeyedCircuitBreakerHandle<K, F, C>
where
    K: Hash + Eq + Clone,
{
    /// Every live key and its breaker's state.
    pub fn states(&self) -> Vec<(K, State)> {
        let keys = &self.shared.breakers;
        // Under the table's lock, so that the list is of one moment.
        let _table = keys.lock();
        let mut out = Vec::new();
        keys.map.each_shard(|map| {
            out.extend(
                map.iter()
                    .map(|(_, k, e)| (k.clone(), e.lane.breaker.state())),
            );
        });
        out
    }

    /// Live keys.
    pub fn len(&self) -> usize {
        self.shared.breakers.map.len()
    }

    /// Whether no key is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The handle of one key's breaker, if it is live. `None` also for a
    /// key that the overflow breaker serves (see [`overflow`](Self::overflow)).
    pub fn get(&self, key: &K) -> Option<CircuitBreakerHandle> {
        let map = &self.shared.breakers.map;
        map.with(map.hash(key), key, |e| {
            CircuitBreakerHandle::new(e.lane.breaker.clone())
        })
    }

    /// The handle of the breaker that new keys share while the table is
    /// full and none of its breakers is closed (see
    /// [`KeyedCircuitBreakerLayer`]); `None` until one was needed.
    pub fn overflow(&self) -> Option<CircuitBreakerHandle> {
        self.shared
            .breakers
            .lock()
            .overflow
            .as_ref()
            .map(|l| CircuitBreakerHandle::new(l.breaker.clone()))
    }
}
