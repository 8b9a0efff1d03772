use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// The whole call ran out of its time budget.
///
/// Raised by [`Deadline`](super::Deadline) when the budget runs out, by an
/// inner [`Timeout`](crate::timeout::Timeout) whose timer the deadline cut
/// short, and by [`PropagateDeadline`](super::PropagateDeadline) for a gRPC
/// client's own timeout at the deadline (which it keeps as the
/// [`source`](Error::source), so tonic still recognises it).
#[derive(Clone, Debug, Default)]
pub struct DeadlineExceeded {
    source: Option<Arc<dyn Error + Send + Sync>>,
}

impl DeadlineExceeded {
    /// A new `DeadlineExceeded`.
    pub const fn new() -> Self {
        DeadlineExceeded { source: None }
    }

    /// A `DeadlineExceeded` that `cause` stands for.
    pub(crate) fn caused_by(cause: crate::BoxError) -> Self {
        DeadlineExceeded {
            source: Some(Arc::from(cause)),
        }
    }
}

/// Every `DeadlineExceeded` is equal: the cause is not compared.
impl PartialEq for DeadlineExceeded {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for DeadlineExceeded {}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl Error for DeadlineExceeded {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
