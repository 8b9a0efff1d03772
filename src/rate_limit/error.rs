use std::fmt;
use std::time::Duration;

/// The rate limiter refused the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Duration,
}

impl RateLimited {
    /// A refusal whose next permit comes after `retry_after`.
    pub const fn new(retry_after: Duration) -> Self {
        RateLimited { retry_after }
    }

    /// When the limiter's next permit comes, as governor computed it.
    ///
    /// In wait mode, a call refused because calls wait ahead of it gets the
    /// wait the line means for it instead: until the next permit, then one
    /// permit interval for each call ahead (see
    /// [`RateLimitLayer::max_wait`](super::RateLimitLayer::max_wait)).
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rate limited; retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for RateLimited {}
