use super::breaker::{Backoff, MAX_HALF_OPEN_CALLS, Settings, WindowKind};
use super::window::MAX_COUNT_WINDOW;
use super::{CircuitBreakerLayer, KeyedCircuitBreakerLayer};
use crate::ConfigError;
use crate::classify::DefaultClassifier;
use serde::Deserialize;
use std::hash::Hash;
use std::time::Duration;

/// Settings for a [`CircuitBreakerLayer`], loadable with serde.
///
/// At most one of `count_window`, `time_window` and `consecutive_failures`
/// may be set; with none, the window counts the last
/// [`DEFAULT_COUNT_WINDOW`](Self::DEFAULT_COUNT_WINDOW) calls.
///
/// ```
/// # use tower_firebreak::circuit_breaker::CircuitBreakerConfig;
/// let cfg: CircuitBreakerConfig = toml::from_str(r#"
///     time_window = "10s"
///     minimum_calls = 20
///     failure_rate = 0.5
///     open_for = "5s"
///     max_open_for = "1m"
/// "#).unwrap();
/// let layer = cfg.into_layer().unwrap();
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Count the last N calls. Default: 100 when no other window is set.
    /// At most 32767.
    pub count_window: Option<usize>,
    /// Count the calls of the last D, in 10 buckets of D/10.
    #[serde(with = "humantime_serde")]
    pub time_window: Option<Duration>,
    /// Open after this many failures in a row, instead of a rate.
    pub consecutive_failures: Option<u32>,
    /// Calls the window must hold before a rate is judged. Default: 20.
    /// A count window of N judges after at most N calls.
    pub minimum_calls: usize,
    /// Open when at least this fraction of calls failed. Default: 0.5.
    /// In (0.0, 1.0].
    pub failure_rate: f64,
    /// Open when at least this fraction of calls was slow. Setting it (or
    /// `slow_call_duration`) turns slow-call detection on. Default: off; once
    /// on, 1.0.
    pub slow_call_rate: Option<f64>,
    /// A call at least this long is slow. Default: 60 s, once detection is on.
    /// A call that ran this long and then was cut by the caller's deadline
    /// or dropped, unanswered, is slow too (and not a failure), except in
    /// the consecutive-failures mode.
    #[serde(with = "humantime_serde")]
    pub slow_call_duration: Option<Duration>,
    /// How long the breaker stays open before probing. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
    /// Turns on backoff: each open in a row lasts twice the one before, up
    /// to this. Default: off.
    #[serde(with = "humantime_serde")]
    pub max_open_for: Option<Duration>,
    /// With backoff, each open is shortened by up to this fraction, at
    /// random, so that many breakers do not probe in step. Default: 0.2.
    pub open_jitter: f64,
    /// Probes admitted while half-open. Default: 10.
    pub half_open_calls: usize,
    /// Back to Open if the probes have not finished after this long. Default:
    /// wait for them.
    #[serde(with = "humantime_serde")]
    pub max_wait_in_half_open: Option<Duration>,
    /// Readiness mode: `poll_ready` waits while the breaker is open. Default:
    /// false (`poll_ready` passes; `call` rejects).
    pub backpressure: bool,
    /// For keyed breakers, the bound on live keys. Default: 1024.
    pub max_keys: usize,
    /// For keyed breakers, a closed breaker unused this long may be dropped.
    /// Default: 10 min.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Names the breaker: the `name` label of its metrics (feature
    /// `metrics`) and its entry in a [`Registry`](crate::registry::Registry),
    /// which it joins when built (see
    /// [self-registration](crate::registry#self-registration)).
    /// Default: none (no metrics, not registered).
    pub name: Option<String>,
}

impl CircuitBreakerConfig {
    /// The default count window.
    pub const DEFAULT_COUNT_WINDOW: usize = 100;
    /// The default minimum number of calls before a rate is judged.
    pub const DEFAULT_MINIMUM_CALLS: usize = 20;
    /// The default failure rate threshold.
    pub const DEFAULT_FAILURE_RATE: f64 = 0.5;
    /// The slow-call rate threshold once slow-call detection is on.
    pub const DEFAULT_SLOW_CALL_RATE: f64 = 1.0;
    /// The slow-call duration once slow-call detection is on.
    pub const DEFAULT_SLOW_CALL_DURATION: Duration = Duration::from_secs(60);
    /// The default time spent open.
    pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(30);
    /// The default jitter of backed-off opens.
    pub const DEFAULT_OPEN_JITTER: f64 = 0.2;
    /// The default number of half-open probes.
    pub const DEFAULT_HALF_OPEN_CALLS: usize = 10;
    /// The default bound on live keyed breakers.
    pub const DEFAULT_MAX_KEYS: usize = 1024;
    /// The default idle time after which a closed keyed breaker may go.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.settings().map(|_| ())
    }

    pub(crate) fn settings(&self) -> Result<Settings, ConfigError> {
        let window = match (
            self.count_window,
            self.time_window,
            self.consecutive_failures,
        ) {
            (Some(_), Some(t), _) => {
                return Err(ConfigError::conflict(
                    "count_window",
                    self.count_window,
                    "time_window",
                    t,
                    "choose one window",
                ));
            }
            (Some(c), _, Some(k)) => {
                return Err(ConfigError::conflict(
                    "count_window",
                    c,
                    "consecutive_failures",
                    k,
                    "choose one window",
                ));
            }
            (_, Some(t), Some(k)) => {
                return Err(ConfigError::conflict(
                    "time_window",
                    t,
                    "consecutive_failures",
                    k,
                    "choose one window",
                ));
            }
            (Some(n), None, None) => {
                if n == 0 || n > MAX_COUNT_WINDOW {
                    return Err(ConfigError::new(
                        "count_window",
                        n,
                        format!("must be in 1..={MAX_COUNT_WINDOW}"),
                    ));
                }
                WindowKind::Count(n)
            }
            (None, Some(t), None) => {
                if t < Duration::from_millis(10) {
                    return Err(ConfigError::new("time_window", t, "must be at least 10ms"));
                }
                WindowKind::Time(t)
            }
            (None, None, Some(k)) => {
                if k == 0 {
                    return Err(ConfigError::new(
                        "consecutive_failures",
                        k,
                        "must be at least 1",
                    ));
                }
                WindowKind::Consecutive(k)
            }
            (None, None, None) => WindowKind::Count(Self::DEFAULT_COUNT_WINDOW),
        };
        if self.minimum_calls == 0 {
            return Err(ConfigError::new(
                "minimum_calls",
                self.minimum_calls,
                "must be at least 1",
            ));
        }
        let minimum_calls = match window {
            WindowKind::Count(n) => self.minimum_calls.min(n),
            _ => self.minimum_calls,
        };
        check_rate("failure_rate", self.failure_rate)?;
        let slow = match (self.slow_call_rate, self.slow_call_duration) {
            (None, None) => None,
            (rate, dur) => {
                let rate = rate.unwrap_or(Self::DEFAULT_SLOW_CALL_RATE);
                check_rate("slow_call_rate", rate)?;
                let dur = dur.unwrap_or(Self::DEFAULT_SLOW_CALL_DURATION);
                if dur.is_zero() {
                    return Err(ConfigError::new(
                        "slow_call_duration",
                        dur,
                        "must be more than zero",
                    ));
                }
                Some((rate, dur))
            }
        };
        if self.open_for.is_zero() {
            return Err(ConfigError::new(
                "open_for",
                self.open_for,
                "must be more than zero",
            ));
        }
        let backoff = match self.max_open_for {
            None => None,
            Some(max) => {
                if max < self.open_for {
                    return Err(ConfigError::conflict(
                        "max_open_for",
                        max,
                        "open_for",
                        self.open_for,
                        "the cap must be at least the first open",
                    ));
                }
                if !(0.0..1.0).contains(&self.open_jitter) {
                    return Err(ConfigError::new(
                        "open_jitter",
                        self.open_jitter,
                        "must be in 0.0..1.0",
                    ));
                }
                Some(Backoff {
                    max,
                    jitter: self.open_jitter,
                })
            }
        };
        if self.half_open_calls == 0 || self.half_open_calls > MAX_HALF_OPEN_CALLS {
            return Err(ConfigError::new(
                "half_open_calls",
                self.half_open_calls,
                format!("must be in 1..={MAX_HALF_OPEN_CALLS}"),
            ));
        }
        if let Some(w) = self.max_wait_in_half_open
            && w.is_zero()
        {
            return Err(ConfigError::new(
                "max_wait_in_half_open",
                w,
                "must be more than zero",
            ));
        }
        if self.max_keys == 0 {
            return Err(ConfigError::new(
                "max_keys",
                self.max_keys,
                "must be at least 1",
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err(ConfigError::new(
                "idle_timeout",
                self.idle_timeout,
                "must be more than zero",
            ));
        }
        Ok(Settings {
            window,
            minimum_calls,
            failure_rate: self.failure_rate,
            slow,
            open_for: self.open_for,
            backoff,
            half_open_calls: self.half_open_calls,
            max_wait_in_half_open: self.max_wait_in_half_open,
            backpressure: self.backpressure,
            name: self.name.as_deref().map(Into::into),
        })
    }

    /// Checks the settings and builds a [`CircuitBreakerLayer`] with the
    /// default classifier.
    ///
    /// A named breaker registers itself in
    /// [`Registry::global()`](crate::registry::Registry::global); use the
    /// builder's [`registry`](super::CircuitBreakerBuilder::registry) to
    /// choose another.
    pub fn into_layer(self) -> Result<CircuitBreakerLayer, ConfigError> {
        self.into_layer_in(DefaultClassifier, None)
    }

    /// Checks the settings and builds a [`CircuitBreakerLayer`] with
    /// `classifier` (for example [`HttpClassifier`](crate::classify::HttpClassifier)).
    pub fn into_layer_with<C>(self, classifier: C) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        self.into_layer_in(classifier, None)
    }

    /// As [`into_layer_with`](Self::into_layer_with), registering a named
    /// breaker in `registry` (`None`: the global one).
    pub(crate) fn into_layer_in<C>(
        self,
        classifier: C,
        registry: Option<&crate::registry::Registry>,
    ) -> Result<CircuitBreakerLayer<C>, ConfigError> {
        Ok(CircuitBreakerLayer::from_settings(
            self.settings()?,
            classifier,
            registry,
        ))
    }

    /// Checks the settings and builds a [`KeyedCircuitBreakerLayer`]: one
    /// breaker per key returned by `key_fn`.
    ///
    /// A named layer registers itself in
    /// [`Registry::global()`](crate::registry::Registry::global), as one
    /// entry counting its keys by state; its
    /// [`registry`](KeyedCircuitBreakerLayer::registry) moves it to another.
    pub fn into_keyed_layer<K, F>(
        self,
        key_fn: F,
    ) -> Result<KeyedCircuitBreakerLayer<K, F>, ConfigError>
    where
        K: Hash + Eq + Send + 'static,
    {
        let settings = self.settings()?;
        let layer = KeyedCircuitBreakerLayer::from_parts(
            settings,
            DefaultClassifier,
            key_fn,
            self.max_keys,
            self.idle_timeout,
        );
        layer.register();
        Ok(layer)
    }
}

fn check_rate(field: &str, rate: f64) -> Result<(), ConfigError> {
    if rate.is_finite() && rate > 0.0 && rate <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            rate,
            "must be a fraction in (0.0, 1.0]",
        ))
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            count_window: None,
            time_window: None,
            consecutive_failures: None,
            minimum_calls: Self::DEFAULT_MINIMUM_CALLS,
            failure_rate: Self::DEFAULT_FAILURE_RATE,
            slow_call_rate: None,
            slow_call_duration: None,
            open_for: Self::DEFAULT_OPEN_FOR,
            max_open_for: None,
            open_jitter: Self::DEFAULT_OPEN_JITTER,
            half_open_calls: Self::DEFAULT_HALF_OPEN_CALLS,
            max_wait_in_half_open: None,
            backpressure: false,
            max_keys: Self::DEFAULT_MAX_KEYS,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            name: None,
        }
    }
}
