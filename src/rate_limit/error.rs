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
