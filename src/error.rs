//! The error model shared by every layer.
//!
//! Every service in this crate has `Error = BoxError`. Each rejection is its own
//! small type ([`Elapsed`], [`DeadlineExceeded`], [`BulkheadFull`],
//! [`RateLimited`], ...). Match on them by walking the `source()` chain with
//! [`find`], never with a plain `err.is::<T>()`: `tower::buffer::Buffer` and
//! other adapters wrap errors, and a downcast of only the outermost type then
//! silently stops matching.
//!
//! [`Rejection`] is a view over any error that tells a caller, in one call,
//! whether the error is one of ours and when to try again.
//!
//! [`Elapsed`]: crate::timeout::Elapsed
//! [`DeadlineExceeded`]: crate::deadline::DeadlineExceeded
//! [`BulkheadFull`]: crate::bulkhead::BulkheadFull
//! [`RateLimited`]: crate::rate_limit::RateLimited

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// The error type of every service in this crate.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// Finds the first error of type `T` in `err` or its `source()` chain.
///
/// ```
/// use tower_firebreak::{error, timeout::Elapsed, BoxError};
/// # use std::time::Duration;
///
/// let err: BoxError = Elapsed::new(Duration::from_secs(1)).into();
/// assert!(error::find::<Elapsed>(&*err).is_some());
/// ```
pub fn find<'a, T: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a T> {
    let mut cur: Option<&'a (dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

/// What kind of rejection an error is.
///
/// See [`Rejection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// One attempt took longer than its timeout ([`Elapsed`](crate::timeout::Elapsed)).
    Timeout,
    /// The whole call ran out of time ([`DeadlineExceeded`](crate::deadline::DeadlineExceeded)).
    DeadlineExceeded,
    /// The circuit breaker is open and the call was not made.
    CircuitOpen,
    /// The bulkhead had no free slot ([`BulkheadFull`](crate::bulkhead::BulkheadFull)).
    BulkheadFull,
    /// The rate limiter refused the call ([`RateLimited`](crate::rate_limit::RateLimited)).
    RateLimited,
}

impl RejectionKind {
    /// A short, stable, lowercase name, used as a label in logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectionKind::Timeout => "timeout",
            RejectionKind::DeadlineExceeded => "deadline_exceeded",
            RejectionKind::CircuitOpen => "circuit_open",
            RejectionKind::BulkheadFull => "bulkhead_full",
            RejectionKind::RateLimited => "rate_limited",
        }
    }
}

impl fmt::Display for RejectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A view over an error: is it a rejection by one of our layers, which kind,
/// and when may the caller try again?
///
/// ```
/// use tower_firebreak::error::{Rejection, RejectionKind};
/// use tower_firebreak::rate_limit::RateLimited;
/// use tower_firebreak::BoxError;
/// use std::time::Duration;
///
/// let err: BoxError = RateLimited::new(Duration::from_millis(250)).into();
/// let r = Rejection::of(&*err).expect("a rejection");
/// assert_eq!(r.kind(), RejectionKind::RateLimited);
/// assert_eq!(r.retry_after(), Some(Duration::from_millis(250)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    kind: RejectionKind,
    retry_after: Option<Duration>,
}

impl Rejection {
    /// Looks through `err` and its `source()` chain for one of this crate's
    /// rejections. Returns `None` when the error came from the inner service.
    pub fn of(err: &(dyn Error + 'static)) -> Option<Rejection> {
        use crate::{bulkhead, circuit_breaker, deadline, rate_limit, timeout};
        let mut cur: Option<&(dyn Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if e.is::<timeout::Elapsed>() {
                return Some(Rejection::new(RejectionKind::Timeout, None));
            }
            if e.is::<deadline::DeadlineExceeded>() {
                return Some(Rejection::new(RejectionKind::DeadlineExceeded, None));
            }
            if e.is::<bulkhead::BulkheadFull>() {
                return Some(Rejection::new(RejectionKind::BulkheadFull, None));
            }
            if let Some(r) = e.downcast_ref::<rate_limit::RateLimited>() {
                return Some(Rejection::new(
                    RejectionKind::RateLimited,
                    Some(r.retry_after()),
                ));
            }
            if let Some(o) = e.downcast_ref::<circuit_breaker::CircuitOpen>() {
                return Some(Rejection::new(
                    RejectionKind::CircuitOpen,
                    Some(o.retry_after()),
                ));
            }
            cur = e.source();
        }
        None
    }

    const fn new(kind: RejectionKind, retry_after: Option<Duration>) -> Self {
        Rejection { kind, retry_after }
    }

    /// The kind of rejection.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// When the caller may try again, where the layer knows it: the time left
    /// in an open breaker, or the rate limiter's next permit.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether this rejection was raised before the inner service was called
    /// (a shed call: breaker, bulkhead, rate limit), as opposed to a call that
    /// was started and ran out of time.
    pub fn is_shed(&self) -> bool {
        matches!(
            self.kind,
            RejectionKind::CircuitOpen | RejectionKind::BulkheadFull | RejectionKind::RateLimited
        )
    }
}

/// Bad settings: names the field, the value, and what is wrong with it.
///
/// Returned by every `build()` and every `XConfig::into_layer()`. A setting
/// that contradicts another names both.
///
/// ```
/// use tower_firebreak::bulkhead::BulkheadConfig;
///
/// let err = BulkheadConfig { max_concurrent: 0, ..Default::default() }
///     .into_layer()
///     .unwrap_err();
/// assert_eq!(err.field(), "max_concurrent");
/// assert_eq!(err.to_string(), "invalid max_concurrent = 0: must be at least 1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    value: String,
    reason: String,
    other: Option<(String, String)>,
}

impl ConfigError {
    /// A setting `field` whose `value` is wrong for `reason`.
    pub fn new(
        field: impl Into<String>,
        value: impl fmt::Debug,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: format!("{value:?}"),
            reason: reason.into(),
            other: None,
        }
    }

    /// Two settings that contradict each other.
    pub fn conflict(
        field: impl Into<String>,
        value: impl fmt::Debug,
        other_field: impl Into<String>,
        other_value: impl fmt::Debug,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: format!("{value:?}"),
            reason: reason.into(),
            other: Some((other_field.into(), format!("{other_value:?}"))),
        }
    }

    /// Prefixes the field names with `section.`, for nested configs.
    pub fn in_section(mut self, section: &str) -> Self {
        self.field = format!("{section}.{}", self.field);
        if let Some((f, _)) = &mut self.other {
            *f = format!("{section}.{f}");
        }
        self
    }

    /// The setting at fault.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The offending value, as `Debug` prints it.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The other setting, where two contradict each other.
    pub fn other_field(&self) -> Option<&str> {
        self.other.as_ref().map(|(f, _)| f.as_str())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.other {
            None => write!(
                f,
                "invalid {} = {}: {}",
                self.field, self.value, self.reason
            ),
            Some((of, ov)) => write!(
                f,
                "{} = {} contradicts {} = {}: {}",
                self.field, self.value, of, ov, self.reason
            ),
        }
    }
}

impl Error for ConfigError {}
