use super::{DirectLimiter, Line, RateLimit, TokioClock};
use crate::observe::LimiterMetrics;
use crate::registry::Registry;
use governor::Quota;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tower::Layer;

/// Applies a [`RateLimit`]. Every service made from one layer shares one limiter.
///
/// See the [module docs](super).
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    quota: Quota,
    limiter: Arc<DirectLimiter>,
    max_wait: Option<Duration>,
    /// Wait mode's line, shared by every service of the layer.
    line: Option<Arc<Line>>,
    name: Option<Arc<str>>,
    obs: Arc<LimiterMetrics>,
    registry: Option<Registry>,
}

pub(crate) fn nonzero(field: &'static str, v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or_else(|| panic!("rate limit {field} must be at least 1"))
}

impl RateLimitLayer {
    /// `per_second` calls a second, with a burst of the same size.
    ///
    /// # Panics
    ///
    /// If `per_second` is zero; [`RateLimitConfig`](super::RateLimitConfig)
    /// reports that as a `ConfigError` instead.
    pub fn per_second(per_second: u32) -> Self {
        Self::from_quota(Quota::per_second(nonzero("per_second", per_second)), None)
    }

    pub(crate) fn from_quota(quota: Quota, max_wait: Option<Duration>) -> Self {
        RateLimitLayer {
            quota,
            limiter: Arc::new(governor::RateLimiter::direct_with_clock(
                quota,
                TokioClock::new(),
            )),
            max_wait,
            line: max_wait.map(|_| Arc::new(Line::new(quota.replenish_interval()))),
            name: None,
            obs: Arc::default(),
            registry: None,
        }
    }

    /// Keeps the name (and its metrics) of `from` across a rebuild.
    fn named_as(mut self, from: RateLimitLayer) -> Self {
        self.name = from.name;
        self.obs = from.obs;
        self.registry = from.registry;
        self
    }

    /// Names the limiter: the `name` label of its metrics (feature
    /// `metrics`) and its entry in a [`Registry`]: a named limiter
    /// registers itself in [`Registry::global()`] (or the one given to
    /// [`registry`](Self::registry)) when it makes its first service, and
    /// leaves it when the layer and its services are dropped. An unnamed
    /// limiter records no metrics and registers nowhere. Default: none.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name: Arc<str> = name.into().into();
        self.obs = Arc::new(LimiterMetrics::new(Some(&name), None));
        self.name = Some(name);
        self
    }

    /// The registry a named limiter registers itself in, instead of
    /// [`Registry::global()`]. See [self-registration](crate::registry#self-registration).
    ///
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_firebreak::{BoxError, rate_limit::RateLimitLayer, registry::Registry};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let registry = Registry::new();
    /// let layer = RateLimitLayer::per_second(50).name("search").burst(10).registry(&registry);
    /// let svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    /// let snapshot = registry.snapshot().await;
    /// assert_eq!(snapshot.rate_limits[0].name, "search");
    /// assert_eq!(snapshot.rate_limits[0].burst, 10);
    /// # let _ = svc;
    /// # }
    /// ```
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// The shared limiter, as the registry holds it.
    pub(crate) fn state(&self) -> Arc<dyn std::any::Any + Send + Sync> {
        self.limiter.clone()
    }

    /// The limiter's name, if it was given one.
    pub fn get_name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// How many calls may pass at one instant (governor's burst size).
    /// Default: the per-second rate.
    ///
    /// # Panics
    ///
    /// If `burst` is zero.
    pub fn burst(self, burst: u32) -> Self {
        Self::from_quota(
            self.quota.allow_burst(nonzero("burst", burst)),
            self.max_wait,
        )
        .named_as(self)
    }

    /// Wait mode: a call over the limit waits for its permit, for at most
    /// `max_wait`, instead of failing at once.
    ///
    /// Waiting calls form a line, served in the order they began waiting
    /// (their response future's first poll):
    /// only the first in line checks the limiter (one wake-up per permit,
    /// not one per waiting call), and a call that arrives while others wait
    /// queues behind them instead of taking the permit the first is about to
    /// get. A call whose wait would pass `max_wait` is refused at once,
    /// without waiting: with an empty line when governor's next permit is
    /// further off than `max_wait` (`retry_after` is governor's answer);
    /// behind others when the next permit plus one permit interval per call
    /// ahead is (`retry_after` is that sum, an estimate: calls ahead that
    /// give up shorten it).
    pub fn max_wait(self, max_wait: Duration) -> Self {
        Self::from_quota(self.quota, Some(max_wait)).named_as(self)
    }

    /// The GCRA quota.
    pub fn quota(&self) -> Quota {
        self.quota
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        if let Some(name) = &self.name {
            crate::registry::target(self.registry.as_ref()).register_rate_limit(
                name,
                &self.state(),
                self.quota,
            );
        }
        RateLimit {
            inner,
            limiter: Some(self.limiter.clone()),
            max_wait: self.max_wait,
            line: self.line.clone(),
            obs: self.obs.clone(),
        }
    }
}
