use super::DeadlineLayer;
use crate::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// Settings for a [`DeadlineLayer`], loadable with serde.
///
/// ```
/// # use tower_firebreak::deadline::DeadlineConfig;
/// let cfg: DeadlineConfig = toml::from_str(r#"budget = "2s""#).unwrap();
/// assert_eq!(cfg.into_layer().unwrap().budget(), std::time::Duration::from_secs(2));
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DeadlineConfig {
    /// The budget of a whole call, retries included. Default: 30 s. Must be above zero.
    #[serde(with = "humantime_serde")]
    pub budget: Duration,
    /// Honour incoming `grpc-timeout` / `firebreak-timeout-ms`. Default: `true`.
    pub read_headers: bool,
}

impl DeadlineConfig {
    /// The default budget.
    pub const DEFAULT_BUDGET: Duration = Duration::from_secs(30);

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.budget.is_zero() {
            return Err(ConfigError::new(
                "budget",
                self.budget,
                "must be above zero",
            ));
        }
        Ok(())
    }

    /// Checks the settings and builds the layer.
    pub fn into_layer(self) -> Result<DeadlineLayer, ConfigError> {
        self.validate()?;
        Ok(DeadlineLayer::new(self.budget).read_headers(self.read_headers))
    }
}

impl Default for DeadlineConfig {
    fn default() -> Self {
        DeadlineConfig {
            budget: Self::DEFAULT_BUDGET,
            read_headers: true,
        }
    }
}
