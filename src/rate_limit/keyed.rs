use super::layer::nonzero;
use super::{Check, Line, TokioClock, Verdict, Wait, future::ResponseFuture, respond, verdict};
use crate::BoxError;
use crate::observe::LimiterMetrics;
use crate::registry::{KeyedLimiterView, Registry};
use crate::shards::Sharded;
use governor::Quota;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service};

type KeyedLimiter<K> =
    governor::RateLimiter<K, DashMapStateStore<K>, TokioClock, NoOpMiddleware<super::Tick>>;

/// Wait mode's lines, one per key with calls waiting (see [`Line`]). A key's
/// line is made by its first waiting call and dropped with its last, so the
/// table holds only keys with calls in them; both happen under the key's
/// shard lock ([`Sharded`]). A call looks its key's line up only while some
/// key has waiting calls: then every call hashes its key and locks its
/// shard once.
pub(crate) struct KeyedLines<K> {
    lines: Sharded<K, Arc<Line>>,
    /// Calls waiting, across keys.
    waiting: AtomicUsize,
    interval: Duration,
}

impl<K: Hash + Eq + Clone> KeyedLines<K> {
    fn new(interval: Duration) -> Self {
        KeyedLines {
            lines: Sharded::new(),
            waiting: AtomicUsize::new(0),
            interval,
        }
    }

    /// `key`'s line, if calls wait in it.
    fn get(&self, key: &K) -> Option<Arc<Line>> {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return None;
        }
        self.lines.with(self.lines.hash(key), key, |l| l.clone())
    }

    /// Puts one call in `key`'s line, making the line if it has none;
    /// returns the line and the key's hash to [`leave`](Self::leave) by.
    fn join(&self, key: &K) -> (Arc<Line>, u64) {
        let hash = self.lines.hash(key);
        let line = self.lines.upsert(
            hash,
            key,
            || Arc::new(Line::new(self.interval)),
            |line| {
                line.join();
                line.clone()
            },
        );
        self.waiting.fetch_add(1, Ordering::SeqCst);
        (line, hash)
    }

    /// Takes one call out of `key`'s line, dropping the line with its last.
    fn leave(&self, key: &K, hash: u64) {
        self.lines.remove_if(hash, key, |line| line.leave() == 0);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

fn check_key<K: Hash + Eq + Clone>(limiter: &KeyedLimiter<K>, key: &K) -> Result<(), Duration> {
    limiter
        .check_key(key)
        .map_err(|nu| nu.wait_time_from(limiter.clock().now()))
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> KeyedLimiterView for KeyedLimiter<K> {
    fn keys(&self) -> usize {
        self.len()
    }
}

/// The limiter as a registry holds it; a plain `fn` so that the layer can
/// keep it without `K: Send + Sync + 'static` on every method (`name` has
/// those bounds and sets it).
type ToView<K> = fn(Arc<KeyedLimiter<K>>) -> Arc<dyn KeyedLimiterView>;

fn to_view<K: Hash + Eq + Clone + Send + Sync + 'static>(
    l: Arc<KeyedLimiter<K>>,
) -> Arc<dyn KeyedLimiterView> {
    l
}

/// One GCRA limit per key. See the [module docs](super).
pub struct KeyedRateLimit<S, K: Hash + Eq + Clone, F> {
    inner: S,
    limiter: Arc<KeyedLimiter<K>>,
    key_fn: Arc<F>,
    max_wait: Option<Duration>,
    lines: Arc<KeyedLines<K>>,
    obs: Arc<KeyedMetrics<K>>,
}

/// A named keyed limiter's series: one set for the layer, or (with
/// `label_keys`) one set per key, made when the key is first seen.
pub(crate) struct KeyedMetrics<K> {
    name: Option<Arc<str>>,
    all: LimiterMetrics,
    key_label: Option<fn(&K) -> String>,
    per_key: Mutex<HashMap<K, Arc<LimiterMetrics>>>,
}

impl<K> Default for KeyedMetrics<K> {
    fn default() -> Self {
        KeyedMetrics {
            name: None,
            all: LimiterMetrics::default(),
            key_label: None,
            per_key: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyedMetrics<K> {
    /// Records one decision for `key`.
    #[inline]
    fn record(&self, key: &K, admitted: bool) {
        let one = |m: &LimiterMetrics| {
            if admitted {
                m.admitted();
            } else {
                m.rejected();
            }
        };
        match (self.key_label, &self.name) {
            (Some(label), Some(name)) => {
                let m = {
                    let mut map = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
                    map.entry(key.clone())
                        .or_insert_with(|| {
                            Arc::new(LimiterMetrics::new(Some(name), Some(&label(key))))
                        })
                        .clone()
                };
                one(&m);
            }
            _ => one(&self.all),
        }
    }
}

impl<S: Clone, K: Hash + Eq + Clone, F> Clone for KeyedRateLimit<S, K, F> {
    fn clone(&self) -> Self {
        KeyedRateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            max_wait: self.max_wait,
            lines: self.lines.clone(),
            obs: self.obs.clone(),
        }
    }
}

impl<S: fmt::Debug, K: Hash + Eq + Clone, F> fmt::Debug for KeyedRateLimit<S, K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimit")
            .field("inner", &self.inner)
            .field("keys", &self.limiter.len())
            .finish_non_exhaustive()
    }
}

impl<S, K: Hash + Eq + Clone, F> KeyedRateLimit<S, K, F> {
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

impl<S, K, F, Req> Service<Req> for KeyedRateLimit<S, K, F>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Fn(&Req) -> K,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = (self.key_fn)(&req);
        let limiter = &self.limiter;
        let line = match self.max_wait {
            Some(_) => self.lines.get(&key),
            None => None,
        };
        let v = verdict(
            self.max_wait,
            line.as_deref(),
            || limiter.clock().now(),
            || check_key(limiter, &key),
        );
        match v {
            Verdict::Admit => self.obs.record(&key, true),
            Verdict::Reject(_) => self.obs.record(&key, false),
            Verdict::Wait(_) => {}
        }
        let (obs, lines) = (&self.obs, &self.lines);
        respond(&mut self.inner, req, v, self.max_wait, move |first| {
            let l = limiter.clone();
            let (obs, lines) = (obs.clone(), lines.clone());
            let (line, hash) = lines.join(&key);
            line.joined(l.clock().now(), first);
            let turn = line.turn.clone();
            let check: Check = Box::new(move |w| {
                match w {
                    Wait::Check => return line.check(l.clock().now(), check_key(&l, &key)),
                    Wait::Behind => return Err(line.behind(l.clock().now())),
                    Wait::Admitted => obs.record(&key, true),
                    Wait::GaveUp => obs.record(&key, false),
                    Wait::Leave => lines.leave(&key, hash),
                }
                Ok(())
            });
            (check, turn)
        })
    }
}

/// Applies a [`KeyedRateLimit`]. Every service made from one layer shares one
/// table of keys.
pub struct KeyedRateLimitLayer<K: Hash + Eq + Clone, F> {
    quota: Quota,
    limiter: Arc<KeyedLimiter<K>>,
    key_fn: Arc<F>,
    max_wait: Option<Duration>,
    lines: Arc<KeyedLines<K>>,
    obs: Arc<KeyedMetrics<K>>,
    /// Set by `name`.
    view: Option<ToView<K>>,
    /// Where a named layer registers (`None`: the global registry).
    registry: Option<Registry>,
}

impl<K: Hash + Eq + Clone, F> Clone for KeyedRateLimitLayer<K, F> {
    fn clone(&self) -> Self {
        KeyedRateLimitLayer {
            quota: self.quota,
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            max_wait: self.max_wait,
            lines: self.lines.clone(),
            obs: self.obs.clone(),
            view: self.view,
            registry: self.registry.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone, F> fmt::Debug for KeyedRateLimitLayer<K, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("quota", &self.quota)
            .field("keys", &self.limiter.len())
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone, F> KeyedRateLimitLayer<K, F> {
    /// `per_second` calls a second for each key returned by `key_fn`, with a
    /// burst of the same size.
    ///
    /// # Panics
    ///
    /// If `per_second` is zero.
    pub fn per_second(per_second: u32, key_fn: F) -> Self {
        Self::from_parts(
            Quota::per_second(nonzero("per_second", per_second)),
            None,
            Arc::new(key_fn),
        )
    }

    pub(crate) fn from_parts(quota: Quota, max_wait: Option<Duration>, key_fn: Arc<F>) -> Self {
        KeyedRateLimitLayer {
            quota,
            limiter: Arc::new(governor::RateLimiter::dashmap_with_clock(
                quota,
                TokioClock::new(),
            )),
            key_fn,
            max_wait,
            lines: Arc::new(KeyedLines::new(quota.replenish_interval())),
            obs: Arc::default(),
            view: None,
            registry: None,
        }
    }

    /// Keeps the name, key labelling and registry of `from` across a rebuild.
    fn named_as(mut self, from: Self) -> Self {
        self.obs = from.obs;
        self.view = from.view;
        self.registry = from.registry;
        self
    }

    /// The registry a named keyed limiter registers itself in, instead of
    /// [`Registry::global()`]. See [self-registration](crate::registry#self-registration).
    ///
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_firebreak::{BoxError, rate_limit::KeyedRateLimitLayer, registry::Registry};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let registry = Registry::new();
    /// let layer: KeyedRateLimitLayer<String, _> = KeyedRateLimitLayer::per_second(10, |tenant: &String| tenant.clone())
    ///     .name("tenants")
    ///     .registry(&registry);
    /// let svc = layer.layer(service_fn(|t: String| async move { Ok::<_, BoxError>(t) }));
    /// assert_eq!(registry.snapshot().await.keyed_rate_limits[0].name, "tenants");
    /// # let _ = svc;
    /// # }
    /// ```
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// How many calls of one key may pass at one instant. Default: the rate.
    ///
    /// # Panics
    ///
    /// If `burst` is zero.
    pub fn burst(self, burst: u32) -> Self {
        Self::from_parts(
            self.quota.allow_burst(nonzero("burst", burst)),
            self.max_wait,
            self.key_fn.clone(),
        )
        .named_as(self)
    }

    /// Wait mode, bounded by `max_wait`. See [`RateLimitLayer::max_wait`](super::RateLimitLayer::max_wait).
    /// Each key has its own line, kept only while calls wait in it.
    pub fn max_wait(self, max_wait: Duration) -> Self {
        Self::from_parts(self.quota, Some(max_wait), self.key_fn.clone()).named_as(self)
    }

    /// Names the layer: every key's calls are recorded in the rate limit
    /// series (feature `metrics`) under this `name` label, summed over the
    /// keys unless [`label_keys`](Self::label_keys) is set. An unnamed keyed
    /// limiter records nothing.
    ///
    /// A named keyed limiter registers itself in
    /// [`Registry::global()`](crate::registry::Registry::global) (or the one
    /// given to [`registry`](Self::registry)) when it makes its first
    /// service, as one entry with its quota and the number of keys with
    /// live state, and leaves it when the layer and its services are
    /// dropped. Default: none.
    pub fn name(mut self, name: impl Into<String>) -> Self
    where
        K: Send + Sync + 'static,
    {
        self.view = Some(to_view::<K>);
        let name: Arc<str> = name.into().into();
        let key_label = self.obs.key_label;
        self.obs = Arc::new(KeyedMetrics {
            all: LimiterMetrics::new(Some(&name), None),
            name: Some(name),
            key_label,
            per_key: Mutex::new(HashMap::new()),
        });
        self
    }

    /// Adds a `key` label (the key's `Display`) to the series, next to the
    /// layer's [`name`](Self::name): one series per key, so opt in only for
    /// a small, bounded key set. It also costs a lock and a map look-up per
    /// call, which an unlabelled layer does not pay. [`retain_recent`](Self::retain_recent)
    /// forgets the per-key handles too. Default: off.
    ///
    /// ```
    /// use tower_firebreak::rate_limit::KeyedRateLimitLayer;
    ///
    /// let per_tenant: KeyedRateLimitLayer<String, _> = KeyedRateLimitLayer::per_second(100, |tenant: &String| tenant.clone())
    ///     .name("tenants")
    ///     .label_keys();
    /// # let _ = per_tenant;
    /// ```
    pub fn label_keys(mut self) -> Self
    where
        K: fmt::Display,
    {
        let name = self.obs.name.clone();
        self.obs = Arc::new(KeyedMetrics {
            all: LimiterMetrics::new(name.as_deref(), None),
            name,
            key_label: Some(|k: &K| k.to_string()),
            per_key: Mutex::new(HashMap::new()),
        });
        self
    }

    /// Drops the state of every key that is back to its fresh state, and
    /// shrinks the table. Run it on a schedule you choose, for example every
    /// minute from a `tokio::time::interval` task; a dropped key behaves
    /// exactly as before when it returns.
    pub fn retain_recent(&self) {
        prune(&self.limiter, &self.obs);
    }

    /// Runs [`retain_recent`](Self::retain_recent) every `every` from now,
    /// on a task of the current tokio runtime: the schedule is yours, the
    /// loop is ours. The task holds the limiter weakly, so it ends by itself
    /// at its first tick after this layer, its clones and its services are
    /// all dropped; abort the returned handle to stop it sooner.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) naming `prune_every` when
    /// `every` is zero, or so long that the first tick is past what the
    /// clock can count.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use tower_firebreak::rate_limit::KeyedRateLimitLayer;
    ///
    /// use std::net::IpAddr;
    ///
    /// let per_ip: KeyedRateLimitLayer<IpAddr, _> =
    ///     KeyedRateLimitLayer::per_second(50, |ip: &IpAddr| *ip);
    /// let pruner = per_ip.prune_every(Duration::from_secs(60)).unwrap();
    /// # pruner.abort();
    /// # }
    /// ```
    pub fn prune_every(
        &self,
        every: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, crate::ConfigError>
    where
        K: Send + Sync + 'static,
    {
        if every.is_zero() {
            return Err(crate::ConfigError::new(
                "prune_every",
                every,
                "must be more than zero",
            ));
        }
        let Some(start) = tokio::time::Instant::now().checked_add(every) else {
            return Err(crate::ConfigError::new(
                "prune_every",
                every,
                "is too long for the clock",
            ));
        };
        let limiter = Arc::downgrade(&self.limiter);
        let obs = Arc::downgrade(&self.obs);
        Ok(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(limiter), Some(obs)) = (limiter.upgrade(), obs.upgrade()) else {
                    return;
                };
                prune(&limiter, &obs);
            }
        }))
    }

    /// Keys with live state.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key has live state.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// Drops every key back in its fresh state, and the per-key metric handles.
fn prune<K: Hash + Eq + Clone>(limiter: &KeyedLimiter<K>, obs: &KeyedMetrics<K>) {
    limiter.retain_recent();
    limiter.shrink_to_fit();
    obs.per_key
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

impl<S, K: Hash + Eq + Clone, F> Layer<S> for KeyedRateLimitLayer<K, F> {
    type Service = KeyedRateLimit<S, K, F>;

    fn layer(&self, inner: S) -> Self::Service {
        if let (Some(name), Some(view)) = (&self.obs.name, self.view) {
            crate::registry::target(self.registry.as_ref()).register_keyed_rate_limit(
                name,
                &view(self.limiter.clone()),
                self.quota,
            );
        }
        KeyedRateLimit {
            inner,
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            max_wait: self.max_wait,
            lines: self.lines.clone(),
            obs: self.obs.clone(),
        }
    }
}
