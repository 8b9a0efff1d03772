use super::{Bulkhead, Pool};
use crate::registry::Registry;
use std::time::Duration;
use tower::Layer;

/// Applies a [`Bulkhead`]. Every service made from one layer shares one pool.
///
/// See the [module docs](super).
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    pool: Pool,
    registry: Option<Registry>,
}

impl BulkheadLayer {
    /// At most `max_concurrent` calls at once, and no waiting.
    ///
    /// # Panics
    ///
    /// If `max_concurrent` is zero;
    /// [`BulkheadConfig`](super::BulkheadConfig) reports that as a `ConfigError` instead.
    pub fn new(max_concurrent: usize) -> Self {
        assert!(
            max_concurrent > 0,
            "bulkhead max_concurrent must be at least 1"
        );
        BulkheadLayer {
            pool: Pool::new(max_concurrent, Duration::ZERO),
            registry: None,
        }
    }

    /// How long a call may wait for a slot before failing with
    /// [`BulkheadFull`](super::BulkheadFull). Default: zero (fail at once).
    ///
    /// Waiting calls are served in the order they began waiting (their
    /// response future's first poll): a freed slot goes to the call that
    /// has waited longest, and a call that arrives while others wait queues
    /// behind them.
    pub fn max_wait(self, max_wait: Duration) -> Self {
        BulkheadLayer {
            pool: Pool::named(self.pool.max_concurrent(), max_wait, self.pool.name()),
            registry: self.registry,
        }
    }

    /// Names the bulkhead: the `name` label of its metrics (feature
    /// `metrics`) and its entry in a [`Registry`]: a named bulkhead
    /// registers itself in [`Registry::global()`] (or the one given to
    /// [`registry`](Self::registry)) when it makes its first service, and
    /// leaves it when the layer and its services are dropped. An unnamed
    /// bulkhead records no metrics and registers nowhere. Default: none.
    pub fn name(self, name: impl Into<String>) -> Self {
        let name: String = name.into();
        BulkheadLayer {
            pool: Pool::named(
                self.pool.max_concurrent(),
                self.pool.max_wait(),
                Some(name.into()),
            ),
            registry: self.registry,
        }
    }

    /// The registry a named bulkhead registers itself in, instead of
    /// [`Registry::global()`]. See [self-registration](crate::registry#self-registration).
    ///
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_firebreak::{BoxError, bulkhead::BulkheadLayer, registry::Registry};
    ///
    /// let registry = Registry::new();
    /// let layer = BulkheadLayer::new(8).name("search").registry(&registry);
    /// assert!(registry.bulkhead("search").is_none()); // not used yet
    /// let svc = layer.layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    /// assert_eq!(registry.bulkhead("search").unwrap().max_concurrent(), 8);
    /// # let _ = svc;
    /// ```
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// A read-only view of the shared pool, for a registry.
    pub fn handle(&self) -> super::BulkheadHandle {
        self.pool.handle()
    }

    /// Calls in flight right now through every service made from this layer.
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight()
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.pool.register(self.registry.as_ref());
        Bulkhead::from_pool(inner, Some(self.pool.clone()))
    }
}
