use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// An attempt took longer than its [`Timeout`](super::Timeout).
#[derive(Clone, Debug)]
pub struct Elapsed {
    timeout: Duration,
    source: Option<Arc<dyn Error + Send + Sync>>,
}

impl Elapsed {
    /// An attempt that ran for longer than `timeout`.
    pub const fn new(timeout: Duration) -> Self {
        Elapsed {
            timeout,
            source: None,
        }
    }

    /// An attempt that ran for `timeout` and ended in `cause` (an inner
    /// layer's timer firing in the same instant as ours).
    pub(crate) fn caused_by(timeout: Duration, cause: crate::BoxError) -> Self {
        Elapsed {
            timeout,
            source: Some(Arc::from(cause)),
        }
    }

    /// The timeout that was exceeded.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Compares the timeouts; the cause is not compared.
impl PartialEq for Elapsed {
    fn eq(&self, other: &Self) -> bool {
        self.timeout == other.timeout
    }
}

impl Eq for Elapsed {}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt timed out after {:?}", self.timeout)
    }
}

impl Error for Elapsed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}
