use std::fmt;

/// No slot came free in the [`Bulkhead`](super::Bulkhead) within its `max_wait`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkheadFull {
    max_concurrent: usize,
}

impl BulkheadFull {
    /// A bulkhead of `max_concurrent` slots was full.
    pub const fn new(max_concurrent: usize) -> Self {
        BulkheadFull { max_concurrent }
    }

    /// The bulkhead's bound.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bulkhead full ({} calls in flight)", self.max_concurrent)
    }
}

impl std::error::Error for BulkheadFull {}
