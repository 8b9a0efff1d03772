use super::Timeout;
use std::time::Duration;
use tower::Layer;

/// Applies a [`Timeout`] to each attempt.
///
/// See the [module docs](super).
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// A layer that fails each call with [`Elapsed`](super::Elapsed) after `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        TimeoutLayer { timeout }
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::new(inner, self.timeout)
    }
}
