use std::error::Error;
use std::fmt;

/// A request body longer than the defer layer buffers. Answered with
/// `413 Payload Too Large`; the request is neither sent nor queued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyTooLarge {
    limit: usize,
}

impl BodyTooLarge {
    /// A body over `limit` bytes.
    pub const fn new(limit: usize) -> Self {
        BodyTooLarge { limit }
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body over the {} byte limit", self.limit)
    }
}

impl Error for BodyTooLarge {}
