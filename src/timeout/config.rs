use super::TimeoutLayer;
use crate::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// Settings for a [`TimeoutLayer`], loadable with serde.
///
/// Durations are written the way people write them: `"250ms"`, `"10s"`.
///
/// ```
/// # use tower_firebreak::timeout::TimeoutConfig;
/// let cfg: TimeoutConfig = serde_json::from_str(r#"{ "timeout": "250ms" }"#).unwrap();
/// let layer = cfg.into_layer().unwrap();
/// assert_eq!(layer.timeout(), std::time::Duration::from_millis(250));
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// How long one attempt may take. Default: 10 s. Must be above zero.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl TimeoutConfig {
    /// The default attempt timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.timeout.is_zero() {
            return Err(ConfigError::new(
                "timeout",
                self.timeout,
                "must be above zero",
            ));
        }
        Ok(())
    }

    /// Checks the settings and builds the layer.
    pub fn into_layer(self) -> Result<TimeoutLayer, ConfigError> {
        self.validate()?;
        Ok(TimeoutLayer::new(self.timeout))
    }
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}
