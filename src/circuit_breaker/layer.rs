use super::breaker::{Breaker, Settings};
use super::{CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandle};
use crate::ConfigError;
use crate::classify::DefaultClassifier;
use crate::registry::Registry;
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
            registry: None,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A named breaker registers itself in `registry` (`None`: the global one).
    pub(crate) fn from_settings(
        settings: Settings,
        classifier: C,
        registry: Option<&Registry>,
    ) -> Self {
        let breaker = Arc::new(Breaker::new(settings));
        crate::registry::target(registry).register_breaker(&breaker);
        CircuitBreakerLayer {
            breaker,
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
    registry: Option<Registry>,
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
    ///
    /// A call cut by the caller's deadline, or dropped, before the
    /// dependency answered, is slow (not failed) if it had run for `d`
    /// (not in the consecutive-failures mode).
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
    /// of the first probe's start. Default: wait for them.
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
    /// `metrics`) and its entry in a [`Registry`]: a named breaker
    /// registers itself in [`Registry::global()`] (or the one given to
    /// [`registry`](Self::registry)) when it is built, and leaves it when
    /// the layer and its services are dropped. An unnamed breaker records
    /// no metrics and registers nowhere. Default: none.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// The registry a named breaker registers itself in, instead of
    /// [`Registry::global()`]. See [self-registration](crate::registry#self-registration).
    ///
    /// ```
    /// use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
    /// use tower_firebreak::registry::Registry;
    ///
    /// let registry = Registry::new();
    /// let layer = CircuitBreakerLayer::builder()
    ///     .name("payments")
    ///     .registry(&registry)
    ///     .build()
    ///     .unwrap();
    /// assert!(registry.breaker("payments").is_some());
    /// # let _ = layer;
    /// ```
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Decides what counts as a failure. Default: [`DefaultClassifier`].
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerBuilder<C2> {
        CircuitBreakerBuilder {
            config: self.config,
            classifier,
            registry: self.registry,
        }
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        let settings = self.config.settings()?;
        Ok(CircuitBreakerLayer::from_settings(
            settings,
            self.classifier,
            self.registry.as_ref(),
        ))
    }
}
