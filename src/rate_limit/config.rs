use super::{KeyedRateLimitLayer, RateLimitLayer};
use crate::ConfigError;
use governor::Quota;
use serde::Deserialize;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// What a call over the limit gets.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// Fail at once with [`RateLimited`](super::RateLimited). The default.
    #[default]
    Reject,
    /// Wait for the next permit, up to `max_wait`.
    Wait,
}

/// Settings for a [`RateLimitLayer`] or [`KeyedRateLimitLayer`], loadable with serde.
///
/// ```
/// # use tower_firebreak::rate_limit::RateLimitConfig;
/// let cfg: RateLimitConfig = toml::from_str(r#"
///     per_second = 50
///     burst = 10
///     mode = "wait"
///     max_wait = "200ms"
/// "#).unwrap();
/// let layer = cfg.into_layer().unwrap();
/// assert_eq!(layer.quota().burst_size().get(), 10);
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Calls a second on average. Default: 1000. Must be at least 1.
    pub per_second: u32,
    /// Calls allowed at one instant. Default: `None`, the per-second rate. At least 1.
    pub burst: Option<u32>,
    /// Reject (default) or wait.
    pub mode: RateLimitMode,
    /// In wait mode, the longest a call waits for its permit. Default: 1 s.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// The `name` label of its metrics and its [`Registry`](crate::registry::Registry)
    /// entry: see [`RateLimitLayer::name`] and [`KeyedRateLimitLayer::name`].
    /// Default: none (no metrics, not registered).
    pub name: Option<String>,
}

impl RateLimitConfig {
    /// The default rate.
    pub const DEFAULT_PER_SECOND: u32 = 1000;
    /// The default longest wait in wait mode.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);

    fn quota(&self) -> Result<(Quota, Option<Duration>), ConfigError> {
        let rate = NonZeroU32::new(self.per_second)
            .ok_or_else(|| ConfigError::new("per_second", self.per_second, "must be at least 1"))?;
        let mut quota = Quota::per_second(rate);
        if let Some(b) = self.burst {
            let b = NonZeroU32::new(b)
                .ok_or_else(|| ConfigError::new("burst", b, "must be at least 1"))?;
            quota = quota.allow_burst(b);
        }
        let wait = match self.mode {
            RateLimitMode::Reject => None,
            RateLimitMode::Wait if self.max_wait.is_zero() => {
                return Err(ConfigError::new(
                    "max_wait",
                    self.max_wait,
                    "must be above zero in wait mode (use mode = \"reject\" to fail at once)",
                ));
            }
            RateLimitMode::Wait => Some(self.max_wait),
        };
        Ok((quota, wait))
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.quota().map(|_| ())
    }

    /// Checks the settings and builds a [`RateLimitLayer`].
    pub fn into_layer(self) -> Result<RateLimitLayer, ConfigError> {
        let (quota, wait) = self.quota()?;
        let layer = RateLimitLayer::from_quota(quota, wait);
        Ok(match self.name {
            Some(name) => layer.name(name),
            None => layer,
        })
    }

    /// Checks the settings and builds a [`KeyedRateLimitLayer`] with `key_fn`.
    pub fn into_keyed_layer<K, F>(self, key_fn: F) -> Result<KeyedRateLimitLayer<K, F>, ConfigError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let (quota, wait) = self.quota()?;
        let layer = KeyedRateLimitLayer::from_parts(quota, wait, Arc::new(key_fn));
        Ok(match self.name {
            Some(name) => layer.name(name),
            None => layer,
        })
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_second: Self::DEFAULT_PER_SECOND,
            burst: None,
            mode: RateLimitMode::Reject,
            max_wait: Self::DEFAULT_MAX_WAIT,
            name: None,
        }
    }
}
