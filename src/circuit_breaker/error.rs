use std::fmt;
use std::time::Duration;

/// The circuit breaker is open: the call was not made.
///
/// [`retry_after`](Self::retry_after) comes from the breaker's real state:
///
/// | state | `retry_after` |
/// | --- | --- |
/// | Open | the time left until it turns half-open |
/// | HalfOpen, every probe slot taken | zero: a slot comes free when a probe finishes |
/// | ForcedOpen | `open_for`, as a hint: only a reset ends it |
///
/// Map it to `503 Service Unavailable` with a `Retry-After` header, or gRPC
/// `UNAVAILABLE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_after: Duration,
}

impl CircuitOpen {
    /// A rejection by an open breaker that will let a probe through after `retry_after`.
    pub const fn new(retry_after: Duration) -> Self {
        CircuitOpen { retry_after }
    }

    /// The time left until the breaker lets a probe through.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit open; retry after {:?}", self.retry_after)
    }
}

impl std::error::Error for CircuitOpen {}
