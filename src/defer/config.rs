use super::{DeferLayer, Replayer};
use crate::ConfigError;
use crate::queue::Queue;
use serde::Deserialize;
use std::time::Duration;

/// Settings for a [`DeferLayer`], loadable with serde.
///
/// ```
/// # use tower_firebreak::defer::DeferConfig;
/// # use tower_firebreak::queue::memory::MemoryQueue;
/// let cfg: DeferConfig = serde_json::from_str(
///     r#"{ "max_body": 65536, "status_path": "/jobs", "ttl": "1h" }"#,
/// ).unwrap();
/// let layer = cfg.into_layer(MemoryQueue::new()).unwrap();
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DeferConfig {
    /// The largest request body that is buffered (and so may be deferred), in
    /// bytes. A larger body gets `413 Payload Too Large`. Default: 1 MiB.
    pub max_body: usize,
    /// How long the whole request body may take to arrive; a slower one
    /// gets `408 Request Timeout`. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Where the status route is mounted (`/jobs` serves `/jobs/{id}`).
    /// When set, a deferred answer carries `Location: {status_path}/{id}`.
    /// Default: none.
    pub status_path: Option<String>,
    /// The `Retry-After` of a `202 Accepted` when the rejection that caused
    /// it gave no better hint. Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// How long a deferred job may wait for delivery before it is
    /// dead-lettered. Default: none (only the queue's attempt limit).
    #[serde(with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Names the queue for metrics (feature `metrics`); see
    /// [`DeferLayer::name`]. Default: none.
    pub name: Option<String>,
}

impl DeferConfig {
    /// The default body limit: 1 MiB.
    pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
    /// The default time the request body may take to arrive: 30 s.
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// The default `Retry-After` of a deferred answer.
    pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body == 0 {
            return Err(ConfigError::new(
                "max_body",
                self.max_body,
                "must be above zero",
            ));
        }
        if self.body_timeout.is_zero() {
            return Err(ConfigError::new(
                "body_timeout",
                self.body_timeout,
                "must be above zero",
            ));
        }
        if let Some(path) = &self.status_path
            && (!path.starts_with('/') || path.ends_with('/') && path.len() > 1)
        {
            return Err(ConfigError::new(
                "status_path",
                path,
                "must start with '/' and not end with '/'",
            ));
        }
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new("ttl", self.ttl, "must be above zero"));
        }
        Ok(())
    }

    /// Checks the settings and builds the layer over `queue`.
    pub fn into_layer<Q: Queue>(self, queue: Q) -> Result<DeferLayer<Q>, ConfigError> {
        self.validate()?;
        let mut layer = DeferLayer::new(queue)
            .max_body(self.max_body)
            .body_timeout(self.body_timeout)
            .retry_after(self.retry_after);
        if let Some(path) = self.status_path {
            layer = layer.status_path(path);
        }
        if let Some(ttl) = self.ttl {
            layer = layer.ttl(ttl);
        }
        if let Some(name) = self.name {
            layer = layer.name(name);
        }
        Ok(layer)
    }
}

impl Default for DeferConfig {
    fn default() -> Self {
        DeferConfig {
            max_body: Self::DEFAULT_MAX_BODY,
            body_timeout: Self::DEFAULT_BODY_TIMEOUT,
            status_path: None,
            retry_after: Self::DEFAULT_RETRY_AFTER,
            ttl: None,
            name: None,
        }
    }
}

/// Settings for a [`Replayer`], loadable with serde.
///
/// ```
/// # use tower_firebreak::defer::ReplayerConfig;
/// let cfg: ReplayerConfig = serde_json::from_str(
///     r#"{ "rate_per_second": 20, "visibility": "1m", "max_backoff": "30s" }"#,
/// ).unwrap();
/// cfg.validate().unwrap();
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ReplayerConfig {
    /// The most deliveries a second. Default: 10.
    pub rate_per_second: u32,
    /// How many deliveries may start at one instant (governor's burst).
    /// Default: 1, an even pace.
    pub burst: u32,
    /// How many jobs one lease call takes. Default: 16.
    pub batch: usize,
    /// The most deliveries in flight at once. Default: 1, one at a time,
    /// the gentlest on a dependency that has just recovered. One at a time
    /// caps the pace at one delivery per round trip, whatever
    /// `rate_per_second` says; raise it when the dependency's latency times
    /// the rate is above 1. With more than one, deliveries finish (and are
    /// acked) out of order, and a queue can commit their acks together.
    pub concurrency: usize,
    /// How long a leased job stays invisible to other replayers; it must be
    /// more than twice the longest delivery, since a batch sends until half
    /// of it has passed and gives back the rest. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub visibility: Duration,
    /// How long to wait before looking again when the queue is empty.
    /// Default: 100 ms.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// The first retry delay of a failed delivery, doubled for each further
    /// attempt. Default: 1 s.
    #[serde(with = "humantime_serde")]
    pub base_backoff: Duration,
    /// The longest retry delay. Default: 5 min.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long [`ReplayerHandle::shutdown`](super::ReplayerHandle::shutdown)
    /// lets an in-flight delivery finish before it gives the lease back.
    /// Default: 10 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The most bytes of a delivered response's body stored with the job;
    /// a longer body is cut, and marked with the header
    /// `firebreak-body-truncated: true`. Default: 1 MiB.
    pub max_response_body: usize,
    /// Names the queue for metrics (feature `metrics`); see
    /// [`Replayer::name`]. Default: none.
    pub name: Option<String>,
}

impl ReplayerConfig {
    /// The default pace: 10 deliveries a second.
    pub const DEFAULT_RATE_PER_SECOND: u32 = 10;
    /// The default burst: 1.
    pub const DEFAULT_BURST: u32 = 1;
    /// The default lease batch: 16 jobs.
    pub const DEFAULT_BATCH: usize = 16;
    /// The default deliveries in flight: 1.
    pub const DEFAULT_CONCURRENCY: usize = 1;
    /// The default visibility timeout: 30 s.
    pub const DEFAULT_VISIBILITY: Duration = Duration::from_secs(30);
    /// The default poll interval of an empty queue: 100 ms.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
    /// The default first retry delay: 1 s.
    pub const DEFAULT_BASE_BACKOFF: Duration = Duration::from_secs(1);
    /// The default longest retry delay: 5 min.
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
    /// The default shutdown grace: 10 s.
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// The default stored response body limit: 1 MiB.
    pub const DEFAULT_MAX_RESPONSE_BODY: usize = 1024 * 1024;

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rate_per_second == 0 {
            return Err(ConfigError::new(
                "rate_per_second",
                self.rate_per_second,
                "must be at least 1",
            ));
        }
        if self.burst == 0 {
            return Err(ConfigError::new("burst", self.burst, "must be at least 1"));
        }
        if self.batch == 0 {
            return Err(ConfigError::new("batch", self.batch, "must be at least 1"));
        }
        if self.concurrency == 0 {
            return Err(ConfigError::new(
                "concurrency",
                self.concurrency,
                "must be at least 1",
            ));
        }
        if self.visibility.is_zero() {
            return Err(ConfigError::new(
                "visibility",
                self.visibility,
                "must be above zero",
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(ConfigError::new(
                "poll_interval",
                self.poll_interval,
                "must be above zero",
            ));
        }
        if self.base_backoff > self.max_backoff {
            return Err(ConfigError::conflict(
                "base_backoff",
                self.base_backoff,
                "max_backoff",
                self.max_backoff,
                "the first delay must not exceed the longest",
            ));
        }
        Ok(())
    }

    /// Checks the settings and builds a replayer of `queue` into `service`.
    pub fn into_replayer<Q, S>(self, queue: Q, service: S) -> Result<Replayer<Q, S>, ConfigError>
    where
        Q: Queue,
    {
        self.validate()?;
        let name = self.name.clone();
        let replayer = Replayer::with_config(queue, service, self);
        Ok(match name {
            Some(n) => replayer.name(n),
            None => replayer,
        })
    }
}

impl Default for ReplayerConfig {
    fn default() -> Self {
        ReplayerConfig {
            rate_per_second: Self::DEFAULT_RATE_PER_SECOND,
            burst: Self::DEFAULT_BURST,
            batch: Self::DEFAULT_BATCH,
            concurrency: Self::DEFAULT_CONCURRENCY,
            visibility: Self::DEFAULT_VISIBILITY,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            base_backoff: Self::DEFAULT_BASE_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            max_response_body: Self::DEFAULT_MAX_RESPONSE_BODY,
            name: None,
        }
    }
}
