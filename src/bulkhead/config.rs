use super::{BulkheadLayer, KeyedBulkheadLayer};
use crate::ConfigError;
use serde::Deserialize;
use std::hash::Hash;
use std::time::Duration;

/// Settings for a [`BulkheadLayer`] or [`KeyedBulkheadLayer`], loadable with serde.
///
/// ```
/// # use tower_firebreak::bulkhead::BulkheadConfig;
/// let cfg: BulkheadConfig = toml::from_str(r#"
///     name = "search"
///     max_concurrent = 32
///     max_wait = "5ms"
/// "#).unwrap();
/// let layer = cfg.into_layer().unwrap();
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BulkheadConfig {
    /// Calls allowed at once. Default: 1000. Must be at least 1.
    pub max_concurrent: usize,
    /// How long a call may wait for a slot. Default: zero (fail at once).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// For a keyed bulkhead, the bound on live pools. Default: 1024. Must be at least 1.
    pub max_keys: usize,
    /// The `name` label of its metrics and its [`Registry`](crate::registry::Registry)
    /// entry: see [`BulkheadLayer::name`] and [`KeyedBulkheadLayer::name`].
    /// Default: none (no metrics, not registered).
    pub name: Option<String>,
}

impl BulkheadConfig {
    /// The default bound on concurrent calls.
    pub const DEFAULT_MAX_CONCURRENT: usize = 1000;
    /// The default wait for a slot.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::ZERO;
    /// The default bound on live keyed pools.
    pub const DEFAULT_MAX_KEYS: usize = 1024;

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent == 0 {
            return Err(ConfigError::new(
                "max_concurrent",
                self.max_concurrent,
                "must be at least 1",
            ));
        }
        if self.max_keys == 0 {
            return Err(ConfigError::new(
                "max_keys",
                self.max_keys,
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Checks the settings and builds a [`BulkheadLayer`].
    pub fn into_layer(self) -> Result<BulkheadLayer, ConfigError> {
        self.validate()?;
        let layer = BulkheadLayer::new(self.max_concurrent).max_wait(self.max_wait);
        Ok(match self.name {
            Some(name) => layer.name(name),
            None => layer,
        })
    }

    /// Checks the settings and builds a [`KeyedBulkheadLayer`] with `key_fn`.
    pub fn into_keyed_layer<K, F>(self, key_fn: F) -> Result<KeyedBulkheadLayer<K, F>, ConfigError>
    where
        K: Hash + Eq + Send + 'static,
    {
        self.validate()?;
        let layer = KeyedBulkheadLayer::from_parts(
            self.max_concurrent,
            self.max_wait,
            self.max_keys,
            key_fn,
        );
        Ok(match self.name {
            Some(name) => layer.name(name),
            None => layer,
        })
    }
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        BulkheadConfig {
            max_concurrent: Self::DEFAULT_MAX_CONCURRENT,
            max_wait: Self::DEFAULT_MAX_WAIT,
            max_keys: Self::DEFAULT_MAX_KEYS,
            name: None,
        }
    }
}
