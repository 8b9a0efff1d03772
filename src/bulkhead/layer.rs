use super::{Bulkhead, Pool};
use std::time::Duration;
use tower::Layer;

/// Applies a [`Bulkhead`]. Every service made from one layer shares one pool.
///
/// See the [module docs](super).
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    pool: Pool,
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
        }
    }

    /// How long a call may wait for a slot before failing with
    /// [`BulkheadFull`](super::BulkheadFull). Default: zero (fail at once).
    pub fn max_wait(self, max_wait: Duration) -> Self {
        BulkheadLayer {
            pool: Pool::named(self.pool.max_concurrent(), max_wait, self.pool.name()),
        }
    }

    /// Names the bulkhead: the `name` label of its metrics (feature
    /// `metrics`) and its entry in a [`Registry`](crate::registry::Registry).
    /// An unnamed bulkhead records no metrics.
    pub fn name(self, name: impl Into<String>) -> Self {
        let name: String = name.into();
        BulkheadLayer {
            pool: Pool::named(
                self.pool.max_concurrent(),
                self.pool.max_wait(),
                Some(name.into()),
            ),
        }
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
        Bulkhead::from_pool(inner, Some(self.pool.clone()))
    }
}
