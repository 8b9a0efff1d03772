use super::{ChaosLayer, HttpStatus, Phase, Schedule};
use crate::ConfigError;
use serde::Deserialize;

/// Settings for a [`ChaosLayer`], loadable with serde.
///
/// ```
/// # use tower_firebreak::chaos::ChaosConfig;
/// let cfg: ChaosConfig = toml::from_str(r#"
///     seed = 7
///     repeat = true
///     error_status = 503
///
///     [[phases]]
///     kind = "healthy"
///     duration = "2s"
///
///     [[phases]]
///     kind = "failing"
///     duration = "2s"
///     faults = { error_rate = 0.5, latency_rate = 0.2, latency = { distribution = "fixed", delay = "2s" } }
/// "#).unwrap();
/// let layer = cfg.into_http_layer().unwrap();
/// assert_eq!(layer.seed(), 7);
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ChaosConfig {
    /// The seed of the fault draws. Default: 0.
    pub seed: u64,
    /// Start over after the last phase. Default: `false`.
    pub repeat: bool,
    /// The HTTP status of an injected error, for
    /// [`into_http_layer`](Self::into_http_layer). Default: 503.
    pub error_status: u16,
    /// The phases, in order. Default: none (always healthy).
    pub phases: Vec<Phase>,
}

impl ChaosConfig {
    /// The default status of an injected HTTP error.
    pub const DEFAULT_ERROR_STATUS: u16 = 503;

    /// The schedule these settings describe.
    pub fn schedule(&self) -> Schedule {
        let s = Schedule::new(self.phases.clone());
        if self.repeat { s.repeat() } else { s }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.schedule().validate()?;
        self.status()?;
        Ok(())
    }

    fn status(&self) -> Result<http::StatusCode, ConfigError> {
        http::StatusCode::from_u16(self.error_status).map_err(|_| {
            ConfigError::new(
                "error_status",
                self.error_status,
                "must be an HTTP status code (100..=999)",
            )
        })
    }

    /// Checks the settings and builds a layer whose injected errors are
    /// `Err`s, started now.
    pub fn into_layer(self) -> Result<ChaosLayer, ConfigError> {
        self.validate()?;
        ChaosLayer::builder(self.schedule()).seed(self.seed).build()
    }

    /// Checks the settings and builds a layer whose injected errors are HTTP
    /// responses of [`error_status`](Self::error_status), started now.
    pub fn into_http_layer(self) -> Result<ChaosLayer<HttpStatus>, ConfigError> {
        let status = self.status()?;
        self.validate()?;
        ChaosLayer::builder(self.schedule())
            .seed(self.seed)
            .http_status(status)
            .build()
    }
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            seed: 0,
            repeat: false,
            error_status: Self::DEFAULT_ERROR_STATUS,
            phases: Vec::new(),
        }
    }
}
