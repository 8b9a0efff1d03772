use std::fmt;

/// Which fault a [`Chaos`](super::Chaos) layer injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// An injected error in place of the inner service's answer.
    Error,
    /// An aborted connection. As the error of an HTTP server's service it
    /// makes hyper close the connection without an answer, so the client sees
    /// a connection reset or an incomplete message.
    Abort,
}

/// The error of a call that the chaos layer failed on purpose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedFault {
    kind: FaultKind,
}

impl InjectedFault {
    /// An injected fault of the given kind.
    pub const fn new(kind: FaultKind) -> Self {
        InjectedFault { kind }
    }

    /// Which fault was injected.
    pub fn kind(&self) -> FaultKind {
        self.kind
    }
}

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FaultKind::Error => f.write_str("chaos: injected error"),
            FaultKind::Abort => f.write_str("chaos: injected connection abort"),
        }
    }
}

impl std::error::Error for InjectedFault {}
