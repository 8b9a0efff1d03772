use super::Deadline;
use std::time::Duration;
use tower::Layer;

/// Applies a [`Deadline`] to each call.
///
/// See the [module docs](super).
#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    budget: Duration,
    read_headers: bool,
}

impl DeadlineLayer {
    /// A layer that gives each call `budget` in all, retries included.
    pub const fn new(budget: Duration) -> Self {
        DeadlineLayer {
            budget,
            read_headers: true,
        }
    }

    /// Whether to honour an incoming `grpc-timeout` or `firebreak-timeout-ms`
    /// header (the earlier deadline wins). Default: `true`. Turn it off on a
    /// client stack whose requests carry headers it did not set.
    pub fn read_headers(mut self, read: bool) -> Self {
        self.read_headers = read;
        self
    }

    /// The configured budget.
    pub fn budget(&self) -> Duration {
        self.budget
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline::new(inner, self.budget).with_read_headers(self.read_headers)
    }
}
