use super::{Pool, future::ResponseFuture};
use crate::BoxError;
use crate::error::RejectionKind;
use crate::registry::{KeyedBulkheadInfo, KeyedBulkheadView, Registry};
use crate::shards::{Sharded, lock};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

/// One bulkhead pool per key. See the [module docs](super).
///
/// The key function runs on every request. At most `max_keys` pools live at
/// once; when a new key arrives and the table is full, idle pools (no call in
/// flight) are dropped to make room, and if every pool is busy the call is
/// rejected with [`BulkheadFull`](super::BulkheadFull). Memory therefore
/// stays bounded under any number of distinct keys. A table found full of
/// busy pools is taken to stay so for 50 ms: new keys meanwhile are refused
/// without scanning it again (so a pool that goes idle in that time makes
/// room only after it).
///
/// The pools sit in 16 hash tables by key hash, each behind its own
/// `std::sync::Mutex`: a call locks only its key's table, so calls of
/// different keys on different threads seldom wait for each other. A key
/// without a pool takes one more mutex, under which pools are made and
/// dropped.
pub struct KeyedBulkhead<S, K, F> {
    inner: S,
    shared: Arc<Shared<K, F>>,
}

struct Shared<K, F> {
    key_fn: F,
    /// In its own `Arc`, apart from the key function, so that a registry
    /// can hold it (weakly) with only `K: Send + 'static`.
    pools: Arc<Pools<K>>,
    /// Set by `name` (where `K: Send + 'static` is known): the pools as a
    /// registry holds them.
    view: Option<Weak<dyn KeyedBulkheadView>>,
    /// Where a named layer registers (`None`: the global registry).
    registry: Option<Registry>,
    max_concurrent: usize,
    max_wait: Duration,
    max_keys: usize,
    /// The layer's name: every pool records the bulkhead series under it.
    name: Option<Arc<str>>,
    /// Set by `label_keys`: each pool's series carry a `key` label too.
    key_label: Option<fn(&K) -> String>,
    /// The layer's own series (no `key` label): shared by every pool
    /// unless keys are labelled, and for rejections of a new key when the
    /// table is full.
    obs: crate::observe::BulkheadMetrics,
}

/// The pools by key.
struct Pools<K> {
    map: Sharded<K, Pool>,
    /// Held (before any shard of `map`) to make or drop pools, so that the
    /// bound on them holds, and to count them, so that a count is of one
    /// moment.
    making: Mutex<Making>,
}

/// What the `making` lock guards besides the making itself.
#[derive(Default)]
struct Making {
    /// Until when a full table found with every pool busy is taken to stay
    /// so: new keys are refused without scanning it again.
    full_until: Option<tokio::time::Instant>,
}

/// How long a full table of busy pools is taken to stay so before it is
/// scanned again for idle pools. Each scan reads every pool; without this,
/// a stream of new keys (one per client address, say) at a full table
/// would scan it for every call it refuses.
const FULL_RECHECK: Duration = Duration::from_millis(50);

impl<K: Hash + Eq, F> Shared<K, F> {
    /// The pool for `key`, which had none when the caller looked: made
    /// now, or made by another call meanwhile; `None` when the table is
    /// full and every pool in it is busy.
    fn new_pool(&self, hash: u64, key: K) -> Option<Pool> {
        let pools = &self.pools.map;
        let mut making = lock(&self.pools.making);
        if let Some(p) = pools.with(hash, &key, |p| p.clone()) {
            return Some(p);
        }
        if pools.len() >= self.max_keys {
            let now = tokio::time::Instant::now();
            if making.full_until.is_some_and(|until| now < until) {
                return None;
            }
            pools.retain(|_, p| !p.is_idle());
            if pools.len() >= self.max_keys {
                making.full_until = Some(crate::later(now, FULL_RECHECK));
                return None;
            }
        }
        let p = match self.key_label {
            // Its own series, looked up once, when the key arrives.
            Some(label) if self.name.is_some() => Pool::keyed(
                self.max_concurrent,
                self.max_wait,
                self.name.clone(),
                Some(&label(&key)),
            ),
            _ => Pool::with_metrics(
                self.max_concurrent,
                self.max_wait,
                self.name.clone(),
                self.obs.clone(),
            ),
        };
        pools.insert(hash, key, p.clone());
        Some(p)
    }
}

impl<K: Send + 'static> KeyedBulkheadView for Pools<K> {
    fn counts(&self) -> (usize, usize, usize) {
        let _making = lock(&self.making);
        let (mut in_flight, mut waiting) = (0, 0);
        self.map.each_shard(|pools| {
            for (_, _, p) in pools.iter() {
                in_flight += p.in_flight();
                waiting += p.handle().waiting();
            }
        });
        // Under `making`, nothing is added or removed meanwhile.
        (self.map.len(), in_flight, waiting)
    }

    fn sample(&self) {
        // Held while the clone below lives: no pool is judged idle (only
        // under this lock) while the clone counts against it.
        let _making = lock(&self.making);
        let mut shared = None;
        let mut total = 0;
        self.map.each_shard(|pools| {
            for (_, _, p) in pools.iter() {
                if p.own_series() {
                    p.sample_in_flight(p.in_flight());
                } else {
                    total += p.in_flight();
                    shared.get_or_insert_with(|| p.clone());
                }
            }
        });
        if let Some(p) = shared {
            p.sample_in_flight(total);
        }
    }
}

impl<S: Clone, K, F> Clone for KeyedBulkhead<S, K, F> {
    fn clone(&self) -> Self {
        KeyedBulkhead {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, K, F> fmt::Debug for KeyedBulkhead<S, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBulkhead")
            .field("inner", &self.inner)
            .field("max_concurrent", &self.shared.max_concurrent)
            .field("max_keys", &self.shared.max_keys)
            .finish_non_exhaustive()
    }
}

impl<S, K, F> KeyedBulkhead<S, K, F> {
    /// Pools alive right now.
    pub fn keys(&self) -> usize {
        self.shared.pools.map.len()
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

impl<S, K, F, Req> Service<Req> for KeyedBulkhead<S, K, F>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone,
    F: Fn(&Req) -> K,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.shared.key_fn)(&req);
        let pools = &self.shared.pools.map;
        let hash = pools.hash(&key);
        let pool = pools
            .with(hash, &key, |p| p.clone())
            .or_else(|| self.shared.new_pool(hash, key));
        match pool {
            Some(p) => p.call(&mut self.inner, req),
            None => {
                self.shared.obs.rejected();
                tracing::debug!(
                    target: "tower_firebreak",
                    layer = "bulkhead",
                    kind = RejectionKind::BulkheadFull.as_str(),
                    max_keys = self.shared.max_keys,
                    "every keyed pool is busy and the key table is full"
                );
                ResponseFuture::full(self.shared.max_concurrent)
            }
        }
    }
}

/// Applies a [`KeyedBulkhead`]. Every service made from one layer shares its pools.
pub struct KeyedBulkheadLayer<K, F> {
    shared: Arc<Shared<K, F>>,
}

impl<K, F> Clone for KeyedBulkheadLayer<K, F> {
    fn clone(&self) -> Self {
        KeyedBulkheadLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<K, F> fmt::Debug for KeyedBulkheadLayer<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBulkheadLayer")
            .field("max_concurrent", &self.shared.max_concurrent)
            .field("max_wait", &self.shared.max_wait)
            .field("max_keys", &self.shared.max_keys)
            .finish_non_exhaustive()
    }
}

impl<K, F> KeyedBulkheadLayer<K, F> {
    /// The default bound on live keys.
    pub const DEFAULT_MAX_KEYS: usize = 1024;

    /// `max_concurrent` calls at once for each key returned by `key_fn`.
    ///
    /// # Panics
    ///
    /// If `max_concurrent` is zero.
    pub fn new(max_concurrent: usize, key_fn: F) -> Self {
        assert!(
            max_concurrent > 0,
            "bulkhead max_concurrent must be at least 1"
        );
        Self::from_parts(
            max_concurrent,
            Duration::ZERO,
            Self::DEFAULT_MAX_KEYS,
            key_fn,
        )
    }

    pub(crate) fn from_parts(
        max_concurrent: usize,
        max_wait: Duration,
        max_keys: usize,
        key_fn: F,
    ) -> Self {
        KeyedBulkheadLayer {
            shared: Arc::new(Shared {
                key_fn,
                pools: Arc::new(Pools {
                    map: Sharded::new(),
                    making: Mutex::new(Making::default()),
                }),
                view: None,
                registry: None,
                max_concurrent,
                max_wait,
                max_keys,
                name: None,
                key_label: None,
                obs: crate::observe::BulkheadMetrics::default(),
            }),
        }
    }

    fn unwrap_shared(self) -> Shared<K, F> {
        Arc::try_unwrap(self.shared)
            .unwrap_or_else(|_| panic!("configure a KeyedBulkheadLayer before cloning it"))
    }

    fn rebuild(self, max_wait: Duration, max_keys: usize) -> Self {
        let mut shared = self.unwrap_shared();
        shared.max_wait = max_wait;
        shared.max_keys = max_keys;
        KeyedBulkheadLayer {
            shared: Arc::new(shared),
        }
    }

    /// Names the layer: every key's pool records the bulkhead series
    /// (feature `metrics`) under this `name` label, summed over the keys
    /// unless [`label_keys`](Self::label_keys) is set. An unnamed keyed
    /// bulkhead records nothing.
    ///
    /// A named keyed bulkhead registers itself in
    /// [`Registry::global()`](crate::registry::Registry::global) (or the one
    /// given to [`registry`](Self::registry)) when it makes its first
    /// service, as one entry with its live keys and the in-flight calls
    /// summed over them, and leaves it when the layer and its services are
    /// dropped. Default: none.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned: configure it first.
    pub fn name(self, name: impl Into<String>) -> Self
    where
        K: Send + 'static,
    {
        let mut shared = self.unwrap_shared();
        let view: Arc<dyn KeyedBulkheadView> = shared.pools.clone();
        shared.view = Some(Arc::downgrade(&view));
        let name: Arc<str> = name.into().into();
        shared.obs = crate::observe::BulkheadMetrics::new(Some(&name), None);
        shared.name = Some(name);
        KeyedBulkheadLayer {
            shared: Arc::new(shared),
        }
    }

    /// Adds a `key` label (the key's `Display`) to each pool's series, next
    /// to the layer's [`name`](Self::name): one series per key, so opt in
    /// only for a small, bounded key set. Default: off.
    ///
    /// ```
    /// use tower_firebreak::bulkhead::KeyedBulkheadLayer;
    ///
    /// let by_tenant: KeyedBulkheadLayer<String, _> = KeyedBulkheadLayer::new(16, |tenant: &String| tenant.clone())
    ///     .name("tenants")
    ///     .label_keys();
    /// # let _ = by_tenant;
    /// ```
    ///
    /// # Panics
    ///
    /// If the layer was already cloned: configure it first.
    pub fn label_keys(self) -> Self
    where
        K: fmt::Display,
    {
        let mut shared = self.unwrap_shared();
        shared.key_label = Some(|k: &K| k.to_string());
        KeyedBulkheadLayer {
            shared: Arc::new(shared),
        }
    }

    /// The registry a named keyed bulkhead registers itself in, instead of
    /// [`Registry::global()`]. See [self-registration](crate::registry#self-registration).
    ///
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_firebreak::{BoxError, bulkhead::KeyedBulkheadLayer, registry::Registry};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let registry = Registry::new();
    /// let layer: KeyedBulkheadLayer<String, _> = KeyedBulkheadLayer::new(4, |tenant: &String| tenant.clone())
    ///     .name("tenants")
    ///     .registry(&registry);
    /// let svc = layer.layer(service_fn(|t: String| async move { Ok::<_, BoxError>(t) }));
    /// let snapshot = registry.snapshot().await;
    /// assert_eq!(snapshot.keyed_bulkheads[0].name, "tenants");
    /// assert_eq!(snapshot.keyed_bulkheads[0].keys, 0);
    /// # let _ = svc;
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If the layer was already cloned: configure it first.
    pub fn registry(self, registry: &Registry) -> Self {
        let mut shared = self.unwrap_shared();
        shared.registry = Some(registry.clone());
        KeyedBulkheadLayer {
            shared: Arc::new(shared),
        }
    }

    /// How long a call may wait for a slot in its key's pool. Default: zero.
    /// Within a pool, waiting calls are served first come, first served.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned: configure it first.
    pub fn max_wait(self, max_wait: Duration) -> Self {
        let keys = self.shared.max_keys;
        self.rebuild(max_wait, keys)
    }

    /// At most this many pools at once. Default: 1024. At least 1.
    ///
    /// # Panics
    ///
    /// If the layer was already cloned, or `max_keys` is zero.
    pub fn max_keys(self, max_keys: usize) -> Self {
        assert!(max_keys > 0, "bulkhead max_keys must be at least 1");
        let wait = self.shared.max_wait;
        self.rebuild(wait, max_keys)
    }
}

impl<S, K, F> Layer<S> for KeyedBulkheadLayer<K, F> {
    type Service = KeyedBulkhead<S, K, F>;

    fn layer(&self, inner: S) -> Self::Service {
        let s = &self.shared;
        if let (Some(name), Some(view)) = (&s.name, &s.view) {
            crate::registry::target(s.registry.as_ref()).register_keyed_bulkhead(
                name,
                view.clone(),
                KeyedBulkheadInfo {
                    max_concurrent: s.max_concurrent,
                    max_keys: s.max_keys,
                },
            );
        }
        KeyedBulkhead {
            inner,
            shared: self.shared.clone(),
        }
    }
}
