use super::{DirectLimiter, RateLimit, TokioClock};
use crate::observe::LimiterMetrics;
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
    name: Option<Arc<str>>,
    obs: Arc<LimiterMetrics>,
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
            name: None,
            obs: Arc::default(),
        }
    }

    /// Keeps the name (and its metrics) of `from` across a rebuild.
    fn named_as(mut self, from: RateLimitLayer) -> Self {
        self.name = from.name;
        self.obs = from.obs;
        self
    }

    /// Names the limiter: the `name` label of its metrics (feature
    /// `metrics`) and its entry in a [`Registry`](crate::registry::Registry).
    /// An unnamed limiter records no metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name: Arc<str> = name.into().into();
        self.obs = Arc::new(LimiterMetrics::new(Some(&name)));
        self.name = Some(name);
        self
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
        RateLimit {
            inner,
            limiter: Some(self.limiter.clone()),
            max_wait: self.max_wait,
            obs: self.obs.clone(),
        }
    }
}
