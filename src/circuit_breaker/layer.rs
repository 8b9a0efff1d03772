use super::breaker::{Breaker, Settings};
use super::{CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandle};
use crate::ConfigError;
use crate::classify::DefaultClassifier;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower::Layer;

/// Applies a [`CircuitBreaker`]. Every service made from one layer (and its
/// clones) shares one breaker.
///
/// `CircuitBreakerLayer` with no parameters written is the layer with the
/// [`DefaultClassifier`]. See the [module docs](super).
pub struct CircuitBreakerLayer<C = DefaultClassifier> {
    breaker: Arc<Breaker>,
    classifier: C,
}

impl<C: Clone> Clone for CircuitBreakerLayer<C> {
    fn clone(&self) -> Self {
        CircuitBreakerLayer {
            breaker: self.breaker.clone(),
            classifier: self.classifier.clone(),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl CircuitBreakerLayer {
    /// Starts a builder with the [defaults](super#defaults).
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder {
            config: CircuitBreakerConfig::default(),
            classifier: DefaultClassifier,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    pub(crate) fn from_settings(settings: Settings, classifier: C) -> Self {
        CircuitBreakerLayer {
            breaker: Arc::new(Breaker::new(settings)),
            classifier,
        }
    }

    /// A handle on the shared breaker: read its state, force it open, reset
    /// it, or subscribe to its events.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle::new(self.breaker.clone())
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(inner, self.breaker.clone(), self.classifier.clone())
    }
}

/// Builds a [`CircuitBreakerLayer`]; start with [`CircuitBreakerLayer::builder`].
///
/// Every setting is checked in [`build`](Self::build), which names the field
/// at fault. The fields and defaults are those of [`CircuitBreakerConfig`].
#[derive(Clone, Debug)]
pub struct CircuitBreakerBuilder<C = DefaultClassifier> {
    config: CircuitBreakerConfig,
    classifier: C,
}

impl<C> CircuitBreakerBuilder<C> {
    /// Judges the last `n` calls. Default: 100.
    pub fn count_window(mut self, n: usize) -> Self {
        self.config.count_window = Some(n);
        self
    }

    /// Judges the calls of the last `d`, kept in 10 buckets of `d / 10`.
    pub fn time_window(mut self, d: Duration) -> Self {
        self.config.time_window = Some(d);
        self
    }

    /// Opens after `k` failures in a row, instead of judging a rate (the
    /// "consecutive failures" breaker of Polly v7 and Hystrix's successors).
    pub fn consecutive_failures(mut self, k: u32) -> Self {
        self.config.consecutive_failures = Some(k);
        self
    }

    /// Calls the window must hold before a rate is judged. Default: 20.
    pub fn minimum_calls(mut self, n: usize) -> Self {
        self.config.minimum_calls = n;
        self
    }

    /// Opens when at least this fraction of calls fail, in (0.0, 1.0].
    /// Default: 0.5.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.config.failure_rate = rate;
        self
    }

    /// Opens when at least this fraction of calls are slow, in (0.0, 1.0].
    /// Turns slow-call detection on.
    pub fn slow_call_rate(mut self, rate: f64) -> Self {
        self.config.slow_call_rate = Some(rate);
        self
    }

    /// A call that takes at least `d` is slow. Turns slow-call detection on.
    pub fn slow_call_duration(mut self, d: Duration) -> Self {
        self.config.slow_call_duration = Some(d);
        self
    }

    /// How long the breaker stays open before it lets probes through.
    /// Default: 30 s.
    pub fn open_for(mut self, d: Duration) -> Self {
        self.config.open_for = d;
        self
    }

    /// Backoff on repeated opens: each open in a row (without closing in
    /// between) lasts twice the one before, capped at `max`, and shortened
    /// at random by up to [`open_jitter`](Self::open_jitter).
    pub fn max_open_for(mut self, max: Duration) -> Self {
        self.config.max_open_for = Some(max);
        self
    }

    /// The jitter of backed-off opens, in 0.0..1.0. Default: 0.2.
    pub fn open_jitter(mut self, fraction: f64) -> Self {
        self.config.open_jitter = fraction;
        self
    }

    /// Probes let through while half-open. Default: 10.
    pub fn half_open_calls(mut self, n: usize) -> Self {
        self.config.half_open_calls = n;
        self
    }

    /// Goes back to Open when the probes have not all finished within `d`
    /// of turning half-open. Default: wait for them.
    pub fn max_wait_in_half_open(mut self, d: Duration) -> Self {
        self.config.max_wait_in_half_open = Some(d);
        self
    }

    /// Readiness mode: while open, `poll_ready` is not ready until the
    /// breaker turns half-open. See [Readiness](super#readiness).
    pub fn backpressure(mut self, on: bool) -> Self {
        self.config.backpressure = on;
        self
    }

    /// Names the breaker: the `name` label of its metrics (feature
    /// `metrics`) and its entry in a [`Registry`](crate::registry::Registry).
    /// An unnamed breaker records no metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Decides what counts as a failure. Default: [`DefaultClassifier`].
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerBuilder<C2> {
        CircuitBreakerBuilder {
            config: self.config,
            classifier,
        }
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        let settings = self.config.settings()?;
        Ok(CircuitBreakerLayer::from_settings(
            settings,
            self.classifier,
        ))
    }
}
