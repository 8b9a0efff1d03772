use super::JobId;
use crate::{BoxError, ConfigError};
use std::error::Error;
use std::fmt;
use std::path::PathBuf;

/// Why a queue operation failed.
///
/// [`QueueError::Full`] and [`QueueError::Unavailable`] are the two a
/// producer must expect in normal operation: `defer` answers both with 503,
/// and in neither case has the job been stored, but for the one exception
/// of a broker backend's request in flight (see
/// [`Unavailable`](QueueError::Unavailable)).
#[derive(Debug)]
#[non_exhaustive]
pub enum QueueError {
    /// The queue already holds `capacity` unfinished jobs. The job was not
    /// stored.
    Full {
        /// The configured bound on unfinished (queued and in-flight) jobs.
        capacity: usize,
    },
    /// The backend cannot take the operation now: an I/O error, a stopped
    /// writer, a lost broker connection, a broker that did not answer
    /// within its operation timeout. Nothing was stored by the failed call,
    /// with one exception that no network client can rule out, for the
    /// broker backends (Redis, NATS, RabbitMQ): the request in flight when
    /// the connection broke or the broker stopped, which the broker had
    /// already carried out (and, for Redis with `appendfsync always`,
    /// fsynced) but whose answer had not reached the client before its
    /// timeout. Its job may be stored; a retry with the same idempotency
    /// key then gets [`Enqueued::Existing`](super::Enqueued::Existing)
    /// instead of a second job. A request that a stalled (paused) Redis
    /// reads only after the call gave up is not stored: the Redis
    /// backend's submit script, and the RabbitMQ backend's claim in its
    /// Redis status store, check a deadline on Redis's clock. So a stall
    /// does not widen the exception to every request that timed out during
    /// it (a paused NATS server was tested to deliver none of them either).
    Unavailable {
        /// What went wrong.
        source: BoxError,
    },
    /// The stored data cannot be read: a corrupt or truncated queue file, or
    /// a record that does not decode.
    Corrupt {
        /// The file (or, for a broker, the location) that holds the bad data.
        path: PathBuf,
        /// What is wrong with it.
        source: BoxError,
    },
    /// Another handle, in this process or another one, already holds the
    /// queue file open.
    AlreadyOpen {
        /// The queue file.
        path: PathBuf,
    },
    /// A job with this idempotency key was already accepted for a different
    /// request (method, URI or body differ). `defer` answers 409.
    Conflict {
        /// The idempotency key.
        key: String,
        /// The job that holds the key.
        existing: JobId,
    },
    /// The lease is no longer held: the job was leased again after this
    /// lease's visibility timeout, or it was already acked, nacked or
    /// dead-lettered.
    LeaseLost {
        /// The job the lease was for.
        id: JobId,
    },
    /// The queue's settings are invalid.
    Config(ConfigError),
}

impl QueueError {
    /// A [`QueueError::Unavailable`] with the given cause.
    pub fn unavailable(source: impl Into<BoxError>) -> QueueError {
        QueueError::Unavailable {
            source: source.into(),
        }
    }

    /// A [`QueueError::Corrupt`] naming `path`.
    pub fn corrupt(path: impl Into<PathBuf>, source: impl Into<BoxError>) -> QueueError {
        QueueError::Corrupt {
            path: path.into(),
            source: source.into(),
        }
    }

    /// Whether the error says the job was refused because the queue is full
    /// or cannot be reached, so that a caller may try again later (503).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            QueueError::Full { .. } | QueueError::Unavailable { .. }
        )
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Full { capacity } => {
                write!(f, "queue full: {capacity} unfinished jobs")
            }
            QueueError::Unavailable { source } => write!(f, "queue unavailable: {source}"),
            QueueError::Corrupt { path, source } => {
                write!(f, "queue file {} is corrupt: {source}", path.display())
            }
            QueueError::AlreadyOpen { path } => {
                write!(f, "queue file {} is already open", path.display())
            }
            QueueError::Conflict { key, existing } => write!(
                f,
                "idempotency key {key:?} already used by job {existing} for a different request"
            ),
            QueueError::LeaseLost { id } => write!(f, "lease on job {id} is no longer held"),
            QueueError::Config(e) => write!(f, "invalid queue settings: {e}"),
        }
    }
}

impl Error for QueueError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            QueueError::Unavailable { source } | QueueError::Corrupt { source, .. } => {
                Some(&**source)
            }
            QueueError::Config(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ConfigError> for QueueError {
    fn from(e: ConfigError) -> Self {
        QueueError::Config(e)
    }
}
