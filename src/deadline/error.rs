use std::fmt;

/// The whole call ran out of its time budget.
///
/// Raised by [`Deadline`](super::Deadline) when the budget runs out, and by an
/// inner [`Timeout`](crate::timeout::Timeout) whose timer the deadline cut
/// short.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DeadlineExceeded {
    _priv: (),
}

impl DeadlineExceeded {
    /// A new `DeadlineExceeded`.
    pub const fn new() -> Self {
        DeadlineExceeded { _priv: () }
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}
