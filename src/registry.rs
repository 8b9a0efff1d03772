//! Every named breaker, bulkhead, rate limiter and queue in one place, for
//! operators: a [`Snapshot`] of their state, and (feature `metrics`) the
//! `firebreak.*` series.
//!
//! A [`Registry`] is an explicit value, not a global: build one at start-up,
//! add each named component to it, and hand it to the
//! [`admin`](crate::admin) router (feature `axum`). Tests build their own
//! registries and never see another test's breakers. A component's name is
//! the one given to its builder (`.name("payments")`, or `name` in its
//! config); adding an unnamed component is a [`ConfigError`].
//!
//! ```
//! use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
//! use tower_firebreak::registry::Registry;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_firebreak::BoxError> {
//! let registry = Registry::new();
//! let payments = CircuitBreakerLayer::builder().name("payments").build()?;
//! registry.add_breaker(payments.handle())?;
//!
//! let snapshot = registry.snapshot().await;
//! assert_eq!(snapshot.breakers[0].name, "payments");
//! assert_eq!(snapshot.breakers[0].state, "closed");
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! With the `metrics` feature, every *named* layer records these series on
//! the [`metrics`](https://docs.rs/metrics) facade, with the recorder the
//! application installed (Prometheus, OpenTelemetry, statsd…). Names follow
//! OpenTelemetry's dotted style; the Prometheus exporter writes the dots as
//! underscores. Every series has a `name` label, the component's name.
//!
//! | series | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `firebreak.calls` | counter | `layer`, `outcome` | breaker: `success`, `failure`, `rejected`; bulkhead and rate limit: `admitted`, `rejected`; defer: `deferred` |
//! | `firebreak.rejections` | counter | `layer`, `kind` | `circuit_open`, `bulkhead_full`, `rate_limited` |
//! | `firebreak.breaker.state` | gauge | `state` | 1 for the current state, 0 for the others |
//! | `firebreak.breaker.transitions` | counter | `from`, `to` | state changes |
//! | `firebreak.breaker.probes` | counter | `outcome` | half-open probes finished: `success`, `failure` |
//! | `firebreak.retry.attempts` | counter | | retries scheduled (the first attempt is not counted) |
//! | `firebreak.retry.gave_up` | counter | `reason` | retryable failures returned to the caller: `max_attempts`, `deadline`, `budget` (the retry budget was exhausted) |
//! | `firebreak.bulkhead.in_flight` | gauge | | calls in flight (sampled by [`Registry::snapshot`]) |
//! | `firebreak.bulkhead.wait` | histogram (s) | | how long an admitted call waited for its slot (only calls that waited) |
//! | `firebreak.queue.depth` | gauge | | jobs waiting (sampled by [`Registry::snapshot`]) |
//! | `firebreak.queue.oldest_age` | gauge (s) | | age of the oldest waiting job (sampled) |
//! | `firebreak.queue.dead_letters` | gauge | | jobs in the dead-letter store (sampled) |
//! | `firebreak.defer.enqueue.duration` | histogram (s) | | storing a deferred request |
//! | `firebreak.replay.duration` | histogram (s) | | one replayed send |
//! | `firebreak.replay.jobs` | counter | `outcome` | `delivered`, `failed` (given back with a backoff), `breaker_open` (given back unsent), `expired` (TTL passed, dead-lettered) |
//!
//! A retry policy is named with [`RetryPolicy::name`](crate::retry::RetryPolicy::name);
//! it has no registry entry (it has no state worth listing).
//!
//! An unnamed layer records nothing, and without the feature the calls are
//! compiled out. The handles are registered when the layer is built, so a
//! call only bumps an atomic. The breakers of a keyed layer record nothing
//! unless the layer opts in with
//! [`label_keys`](crate::circuit_breaker::KeyedCircuitBreakerLayer::label_keys):
//! then each key's breaker records the breaker series with a `key` label
//! next to the layer's `name` (one series per key, so opt in only for a
//! small key set). Keyed breakers have no registry entry; their states are
//! in [`KeyedCircuitBreakerHandle::states`](crate::circuit_breaker::KeyedCircuitBreakerHandle::states).
//!
//! The gauges marked *sampled* are set when a snapshot is taken; the admin
//! router's `GET /metrics` takes one before it renders.

use crate::ConfigError;
use crate::bulkhead::BulkheadHandle;
use crate::circuit_breaker::CircuitBreakerHandle;
use crate::observe::QueueMetrics;
use crate::queue::{DeadLetter, JobId, Queue, QueueError};
use crate::rate_limit::RateLimitLayer;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A queue with its type erased, for the registry and the admin router.
pub(crate) trait DynQueue: Send + Sync {
    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>>;
    fn oldest_age(&self) -> BoxFuture<'_, Result<Option<Duration>, QueueError>>;
    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, QueueError>>;
    fn redrive<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<bool, QueueError>>;
    fn metrics(&self) -> &QueueMetrics;
}

struct QueueEntry<Q> {
    queue: Q,
    obs: QueueMetrics,
}

impl<Q: Queue> DynQueue for QueueEntry<Q> {
    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(self.queue.depth())
    }

    fn oldest_age(&self) -> BoxFuture<'_, Result<Option<Duration>, QueueError>> {
        Box::pin(self.queue.oldest_age())
    }

    fn dead_letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<DeadLetter>, QueueError>> {
        Box::pin(self.queue.dead_letters(limit))
    }

    fn redrive<'a>(&'a self, id: &'a JobId) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(self.queue.redrive(id))
    }

    fn metrics(&self) -> &QueueMetrics {
        &self.obs
    }
}

#[derive(Clone)]
struct Limiter {
    burst: u32,
    replenish: Duration,
}

#[derive(Default)]
struct Inner {
    breakers: BTreeMap<String, CircuitBreakerHandle>,
    bulkheads: BTreeMap<String, BulkheadHandle>,
    limiters: BTreeMap<String, Limiter>,
    queues: BTreeMap<String, Arc<dyn DynQueue>>,
}

/// The named components of an application. Cheap to clone; clones share
/// one set. See the [module docs](self).
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Registry")
            .field("breakers", &inner.breakers.keys().collect::<Vec<_>>())
            .field("bulkheads", &inner.bulkheads.keys().collect::<Vec<_>>())
            .field("rate_limits", &inner.limiters.keys().collect::<Vec<_>>())
            .field("queues", &inner.queues.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn unnamed(what: &str) -> ConfigError {
    ConfigError::new(
        "name",
        Option::<String>::None,
        format!("a registered {what} needs a name; set one with .name(..)"),
    )
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a named breaker (from [`CircuitBreakerLayer::handle`](crate::circuit_breaker::CircuitBreakerLayer::handle)).
    /// A breaker of the same name is replaced.
    ///
    /// # Errors
    ///
    /// When the breaker has no name.
    pub fn add_breaker(&self, handle: CircuitBreakerHandle) -> Result<(), ConfigError> {
        let name = handle.name().ok_or_else(|| unnamed("breaker"))?.to_owned();
        self.lock().breakers.insert(name, handle);
        Ok(())
    }

    /// Adds a named bulkhead (from [`BulkheadLayer::handle`](crate::bulkhead::BulkheadLayer::handle)).
    ///
    /// # Errors
    ///
    /// When the bulkhead has no name.
    pub fn add_bulkhead(&self, handle: BulkheadHandle) -> Result<(), ConfigError> {
        let name = handle.name().ok_or_else(|| unnamed("bulkhead"))?.to_owned();
        self.lock().bulkheads.insert(name, handle);
        Ok(())
    }

    /// Adds a named rate limiter's settings.
    ///
    /// # Errors
    ///
    /// When the limiter has no name.
    pub fn add_rate_limit(&self, layer: &RateLimitLayer) -> Result<(), ConfigError> {
        let name = layer
            .get_name()
            .ok_or_else(|| unnamed("rate limit"))?
            .to_owned();
        let quota = layer.quota();
        self.lock().limiters.insert(
            name,
            Limiter {
                burst: quota.burst_size().get(),
                replenish: quota.replenish_interval(),
            },
        );
        Ok(())
    }

    /// Adds a queue under `name` (use the name given to its
    /// [`DeferLayer`](crate::defer::DeferLayer) and
    /// [`Replayer`](crate::defer::Replayer)). Pass a clone of the queue
    /// handle (or an `Arc` of it): the registry reads its depth and
    /// dead letters, and the admin router redrives them.
    pub fn add_queue<Q: Queue>(&self, name: impl Into<String>, queue: Q) {
        let name = name.into();
        let entry = QueueEntry {
            queue,
            obs: QueueMetrics::new(Some(&name)),
        };
        self.lock().queues.insert(name, Arc::new(entry));
    }

    /// The breaker named `name`.
    pub fn breaker(&self, name: &str) -> Option<CircuitBreakerHandle> {
        self.lock().breakers.get(name).cloned()
    }

    pub(crate) fn queues(&self) -> Vec<(String, Arc<dyn DynQueue>)> {
        self.lock()
            .queues
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Moves the dead-lettered job `id` back to whichever registered queue
    /// holds it. Returns that queue's name, or `None` when no queue has it
    /// dead-lettered.
    ///
    /// # Errors
    ///
    /// The first queue error met, [`QueueError::Full`] among them.
    pub async fn redrive(&self, id: &JobId) -> Result<Option<String>, QueueError> {
        for (name, q) in self.queues() {
            if q.redrive(id).await? {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Every component's state now. Also sets the sampled gauges (feature
    /// `metrics`): bulkhead in-flight, queue depth, oldest age and dead
    /// letters.
    pub async fn snapshot(&self) -> Snapshot {
        let (breakers, bulkheads, limiters) = {
            let inner = self.lock();
            (
                inner.breakers.clone(),
                inner.bulkheads.clone(),
                inner.limiters.clone(),
            )
        };
        let breakers = breakers
            .into_iter()
            .map(|(name, h)| {
                let m = h.metrics();
                BreakerStatus {
                    state: h.state().as_str(),
                    calls: m.calls,
                    failures: m.failures,
                    slow_calls: m.slow_calls,
                    failure_rate: m.failure_rate(),
                    retry_after_ms: h.retry_after().map(|d| d.as_millis() as u64),
                    transitions: h
                        .recent_transitions()
                        .into_iter()
                        .map(|t| TransitionStatus {
                            from: t.from().as_str(),
                            to: t.to().as_str(),
                            reason: t.reason(),
                            at_unix_ms: unix_ms(t.at()),
                        })
                        .collect(),
                    name,
                }
            })
            .collect();
        let bulkheads = bulkheads
            .into_iter()
            .map(|(name, h)| {
                h.sample();
                BulkheadStatus {
                    in_flight: h.in_flight(),
                    waiting: h.waiting(),
                    max_concurrent: h.max_concurrent(),
                    name,
                }
            })
            .collect();
        let rate_limits = limiters
            .into_iter()
            .map(|(name, l)| RateLimitStatus {
                name,
                burst: l.burst,
                replenish_interval_ms: l.replenish.as_secs_f64() * 1e3,
            })
            .collect();
        let mut queues = Vec::new();
        for (name, q) in self.queues() {
            queues.push(queue_status(name, &*q).await);
        }
        Snapshot {
            breakers,
            bulkheads,
            rate_limits,
            queues,
        }
    }
}

/// How many dead letters a snapshot counts at most.
const DEAD_LETTER_COUNT_LIMIT: usize = 10_000;

async fn queue_status(name: String, q: &dyn DynQueue) -> QueueStatus {
    let read = async {
        let depth = q.depth().await?;
        let oldest = q.oldest_age().await?;
        let dead = q.dead_letters(DEAD_LETTER_COUNT_LIMIT).await?.len();
        Ok::<_, QueueError>((depth, oldest, dead))
    };
    match read.await {
        Ok((depth, oldest, dead)) => {
            q.metrics().sampled(depth, oldest, dead);
            QueueStatus {
                name,
                depth: Some(depth),
                oldest_age_ms: oldest.map(|d| d.as_millis() as u64),
                dead_letters: Some(dead),
                error: None,
            }
        }
        Err(e) => QueueStatus {
            name,
            depth: None,
            oldest_age_ms: None,
            dead_letters: None,
            error: Some(e.to_string()),
        },
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Every registered component's state, as served by `GET /firebreak/status`.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Snapshot {
    /// The breakers, by name.
    pub breakers: Vec<BreakerStatus>,
    /// The bulkheads, by name.
    pub bulkheads: Vec<BulkheadStatus>,
    /// The rate limiters, by name.
    pub rate_limits: Vec<RateLimitStatus>,
    /// The queues, by name.
    pub queues: Vec<QueueStatus>,
}

/// One breaker in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct BreakerStatus {
    /// Its name.
    pub name: String,
    /// `closed`, `open`, `half_open`, `forced_open` or `disabled`.
    pub state: &'static str,
    /// Calls in the sliding window.
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow_calls: u64,
    /// `failures / calls`, 0 when the window is empty.
    pub failure_rate: f64,
    /// While open: the time until probes pass.
    pub retry_after_ms: Option<u64>,
    /// The last 16 state changes, oldest first.
    pub transitions: Vec<TransitionStatus>,
}

/// One state change in a [`BreakerStatus`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct TransitionStatus {
    /// The state left.
    pub from: &'static str,
    /// The state entered.
    pub to: &'static str,
    /// Why.
    pub reason: &'static str,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// One bulkhead in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct BulkheadStatus {
    /// Its name.
    pub name: String,
    /// Calls in flight.
    pub in_flight: usize,
    /// Calls waiting for a slot.
    pub waiting: usize,
    /// The bound.
    pub max_concurrent: usize,
}

/// One rate limiter in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct RateLimitStatus {
    /// Its name.
    pub name: String,
    /// Calls that may pass at one instant.
    pub burst: u32,
    /// One permit comes back every this many milliseconds.
    pub replenish_interval_ms: f64,
}

/// One queue in a [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct QueueStatus {
    /// Its name.
    pub name: String,
    /// Jobs waiting; `None` when the queue could not be read.
    pub depth: Option<usize>,
    /// The age of the oldest waiting job.
    pub oldest_age_ms: Option<u64>,
    /// Jobs in the dead-letter store (counted up to 10,000).
    pub dead_letters: Option<usize>,
    /// Why the queue could not be read.
    pub error: Option<String>,
}
