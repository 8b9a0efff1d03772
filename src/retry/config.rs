use super::{RetryBudget, RetryLayer, RetryPolicy};
use crate::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// The shape of the delays, in a [`RetryConfig`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackoffKind {
    /// [`RetryPolicy::exponential`] (the default).
    #[default]
    Exponential,
    /// [`RetryPolicy::decorrelated_jitter`].
    DecorrelatedJitter,
    /// [`RetryPolicy::fixed`].
    Fixed,
    /// [`RetryPolicy::linear`].
    Linear,
}

/// Settings for a [`RetryBudget`], in a [`RetryConfig`].
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Whether retries are bounded by a budget at all. Default: `true`.
    pub enabled: bool,
    /// How long a call counts toward the budget. Default: 10 s; 1 s..=60 s.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Retries a second always allowed. Default: 10.
    pub min_per_sec: u32,
    /// The share of calls that may be retried. Default: 0.2; 0.0..=1000.0.
    pub ratio: f32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            enabled: true,
            ttl: RetryBudget::DEFAULT_TTL,
            min_per_sec: RetryBudget::DEFAULT_MIN_PER_SEC,
            ratio: RetryBudget::DEFAULT_RATIO,
        }
    }
}

/// Settings for a [`RetryLayer`], loadable with serde.
///
/// ```
/// # use tower_firebreak::retry::RetryConfig;
/// let cfg: RetryConfig = toml::from_str(r#"
///     max_attempts = 4
///     base_delay = "50ms"
///     max_delay = "2s"
///     [budget]
///     ratio = 0.1
/// "#).unwrap();
/// let layer = cfg.into_layer().unwrap();
/// assert_eq!(layer.policy().attempts_limit(), 4);
/// assert_eq!(layer.policy().retry_budget().unwrap().ratio(), 0.1);
///
/// let cfg: RetryConfig = toml::from_str("budget.enabled = false").unwrap();
/// assert!(cfg.into_layer().unwrap().policy().retry_budget().is_none());
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included. Default: 3. At least 1.
    pub max_attempts: u32,
    /// The shape of the delays. Default: `exponential`.
    pub backoff: BackoffKind,
    /// The first delay (the step of `linear`, the delay of `fixed`). Default: 100 ms.
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    /// The cap on one delay, `Retry-After` included. Default: 10 s. At least `base_delay`.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Full jitter. Default: `true`.
    pub jitter: bool,
    /// The retry budget. Default: 20% of the calls of the last 10 s plus 10
    /// retries a second.
    pub budget: RetryBudgetConfig,
    /// The `name` label of its metrics (feature `metrics`): see
    /// [`RetryPolicy::name`]. A retry policy has no registry entry.
    /// Default: none (no metrics).
    pub name: Option<String>,
}

impl RetryConfig {
    /// The default number of attempts.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = RetryPolicy::DEFAULT_MAX_ATTEMPTS;
    /// The default first delay.
    pub const DEFAULT_BASE_DELAY: Duration = RetryPolicy::DEFAULT_BASE_DELAY;
    /// The default cap on one delay.
    pub const DEFAULT_MAX_DELAY: Duration = RetryPolicy::DEFAULT_MAX_DELAY;

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy().map(|_| ())
    }

    /// Checks the settings and builds the policy.
    pub fn policy(&self) -> Result<RetryPolicy, ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "max_attempts",
                self.max_attempts,
                "must be at least 1",
            ));
        }
        if self.max_delay < self.base_delay {
            return Err(ConfigError::conflict(
                "max_delay",
                self.max_delay,
                "base_delay",
                self.base_delay,
                "the cap on a delay must be at least the first delay",
            ));
        }
        let policy = match self.backoff {
            BackoffKind::Exponential => RetryPolicy::exponential(self.base_delay),
            BackoffKind::DecorrelatedJitter => RetryPolicy::decorrelated_jitter(self.base_delay),
            BackoffKind::Fixed => RetryPolicy::fixed(self.base_delay),
            BackoffKind::Linear => RetryPolicy::linear(self.base_delay),
        };
        let mut policy = policy
            .max_attempts(self.max_attempts)
            .max_delay(self.max_delay);
        if !self.jitter {
            policy = policy.no_jitter();
        }
        if let Some(name) = &self.name {
            policy = policy.name(name.clone());
        }
        let b = &self.budget;
        if b.enabled {
            let budget = RetryBudget::try_new(b.ttl, b.min_per_sec, b.ratio)
                .map_err(|e| e.in_section("budget"))?;
            policy = policy.budget(budget);
        }
        Ok(policy)
    }

    /// Checks the settings and builds the layer, with the
    /// [`DefaultClassifier`](super::DefaultClassifier); call
    /// [`RetryPolicy::http`] on [`policy()`](Self::policy) for HTTP.
    pub fn into_layer(self) -> Result<RetryLayer, ConfigError> {
        Ok(RetryLayer::new(self.policy()?))
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            backoff: BackoffKind::Exponential,
            base_delay: Self::DEFAULT_BASE_DELAY,
            max_delay: Self::DEFAULT_MAX_DELAY,
            jitter: true,
            budget: RetryBudgetConfig::default(),
            name: None,
        }
    }
}
