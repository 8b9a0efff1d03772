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
            pool: Pool::new(self.pool.max_concurrent(), max_wait),
        }
    }

    /// Calls in flight right now through every service made from this layer.
    pub fn in_flight(&self) -> usize {
        self.pool.in_flight()
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::from_pool(inner, self.pool.clone())
    }
}
