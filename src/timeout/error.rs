use std::fmt;
use std::time::Duration;

/// An attempt took longer than its [`Timeout`](super::Timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Elapsed {
    timeout: Duration,
}

impl Elapsed {
    /// An attempt that ran for longer than `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        Elapsed { timeout }
    }

    /// The timeout that was exceeded.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt timed out after {:?}", self.timeout)
    }
}

impl std::error::Error for Elapsed {}
