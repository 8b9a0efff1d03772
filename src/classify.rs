//! What counts as a failure of the dependency.
//!
//! A [`Classify`] looks at the result of one call and returns an [`Outcome`].
//! The circuit breaker counts failures against its thresholds; a retry policy
//! can use the same classifiers.
//!
//! | classifier | success | failure | ignored |
//! | --- | --- | --- | --- |
//! | [`DefaultClassifier`] | `Ok` | `Err` | our own shed rejections |
//! | [`HttpClassifier`] | anything else | 5xx (tower-http's `ServerErrorsAsFailures`), and 429 / 408 if asked | as above |
//! | [`GrpcClassifier`] | other codes | `grpc-status` UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN | as above |
//!
//! # Our own rejections
//!
//! An error that [`Rejection::of`] recognises as a *shed* call
//! ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen),
//! [`BulkheadFull`](crate::bulkhead::BulkheadFull),
//! [`RateLimited`](crate::rate_limit::RateLimited)) never reached the
//! dependency, and a [`DeadlineExceeded`](crate::deadline::DeadlineExceeded)
//! means the caller's budget ran out: neither says anything about the
//! dependency, so both are [`Outcome::Ignore`]. An attempt timeout
//! ([`Elapsed`](crate::timeout::Elapsed)) *is* counted as a failure: in the
//! standard pipeline the timeout sits inside the breaker, and a hanging
//! dependency must be able to open it.

use crate::BoxError;
use crate::error::{Rejection, RejectionKind};
use http::{Response, StatusCode};
use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, GrpcErrorsAsFailures, ServerErrorsAsFailures,
};

pub use tower_http::classify::GrpcCode;

/// How one call is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The dependency answered well.
    Success,
    /// The dependency failed.
    Failure,
    /// Says nothing about the dependency (for example, one of our own
    /// rejections): not counted at all.
    Ignore,
}

/// Decides whether the result of a call is a success or a failure.
///
/// Implement it for your own response types:
///
/// ```
/// use tower_firebreak::classify::{Classify, Outcome, classify_error};
/// use tower_firebreak::BoxError;
///
/// #[derive(Clone, Copy, Debug)]
/// struct NegativeIsFailure;
///
/// impl Classify<i64> for NegativeIsFailure {
///     fn classify(&self, result: Result<&i64, &BoxError>) -> Outcome {
///         match result {
///             Ok(v) if *v < 0 => Outcome::Failure,
///             Ok(_) => Outcome::Success,
///             Err(e) => classify_error(e),
///         }
///     }
/// }
/// ```
pub trait Classify<Res> {
    /// Classifies one result. The error has already been converted into a
    /// [`BoxError`].
    fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome;
}

/// The default rule for errors: a failure, unless it is one of our own
/// rejections that says nothing about the dependency (see the
/// [module docs](self)).
pub fn classify_error(err: &BoxError) -> Outcome {
    match Rejection::of(&**err) {
        Some(r) if r.is_shed() || r.kind() == RejectionKind::DeadlineExceeded => Outcome::Ignore,
        _ => Outcome::Failure,
    }
}

/// `Ok` is a success, `Err` a failure (our own shed rejections are ignored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultClassifier;

impl<Res> Classify<Res> for DefaultClassifier {
    #[inline]
    fn classify(&self, result: Result<&Res, &BoxError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => classify_error(e),
        }
    }
}

/// HTTP responses: 5xx is a failure, as tower-http's
/// [`ServerErrorsAsFailures`] decides; 429 Too Many Requests and 408 Request
/// Timeout may be added.
///
/// ```
/// use tower_firebreak::classify::{Classify, HttpClassifier, Outcome};
///
/// let c = HttpClassifier::new().too_many_requests(true);
/// let res = http::Response::builder().status(503).body(()).unwrap();
/// assert_eq!(c.classify(Ok(&res)), Outcome::Failure);
/// let res = http::Response::builder().status(429).body(()).unwrap();
/// assert_eq!(c.classify(Ok(&res)), Outcome::Failure);
/// let res = http::Response::builder().status(404).body(()).unwrap();
/// assert_eq!(c.classify(Ok(&res)), Outcome::Success);
/// ```
#[derive(Clone, Debug, Default)]
pub struct HttpClassifier {
    server_errors: ServerErrorsAsFailures,
    too_many_requests: bool,
    request_timeout: bool,
}

impl HttpClassifier {
    /// 5xx is a failure; everything else a success.
    pub fn new() -> Self {
        HttpClassifier::default()
    }

    /// Whether 429 Too Many Requests counts as a failure. Default: no.
    pub fn too_many_requests(mut self, failure: bool) -> Self {
        self.too_many_requests = failure;
        self
    }

    /// Whether 408 Request Timeout counts as a failure. Default: no.
    pub fn request_timeout(mut self, failure: bool) -> Self {
        self.request_timeout = failure;
        self
    }
}

impl<B> Classify<Response<B>> for HttpClassifier {
    fn classify(&self, result: Result<&Response<B>, &BoxError>) -> Outcome {
        let res = match result {
            Ok(res) => res,
            Err(e) => return classify_error(e),
        };
        match res.status() {
            StatusCode::TOO_MANY_REQUESTS if self.too_many_requests => return Outcome::Failure,
            StatusCode::REQUEST_TIMEOUT if self.request_timeout => return Outcome::Failure,
            _ => {}
        }
        match self.server_errors.clone().classify_response(res) {
            ClassifiedResponse::Ready(Ok(())) => Outcome::Success,
            ClassifiedResponse::Ready(Err(_)) => Outcome::Failure,
            // ServerErrorsAsFailures decides from the status line alone.
            ClassifiedResponse::RequiresEos(_) => Outcome::Success,
        }
    }
}

const ALL_GRPC_CODES: [GrpcCode; 17] = [
    GrpcCode::Ok,
    GrpcCode::Cancelled,
    GrpcCode::Unknown,
    GrpcCode::InvalidArgument,
    GrpcCode::DeadlineExceeded,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::PermissionDenied,
    GrpcCode::ResourceExhausted,
    GrpcCode::FailedPrecondition,
    GrpcCode::Aborted,
    GrpcCode::OutOfRange,
    GrpcCode::Unimplemented,
    GrpcCode::Internal,
    GrpcCode::Unavailable,
    GrpcCode::DataLoss,
    GrpcCode::Unauthenticated,
];

fn code_bit(code: GrpcCode) -> u32 {
    1 << (code as i32 as u32)
}

/// gRPC responses: the `grpc-status` in the response headers decides, using
/// tower-http's [`GrpcErrorsAsFailures`].
///
/// By default UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED
/// and UNKNOWN are failures, and every other code (NOT_FOUND,
/// INVALID_ARGUMENT, ... : the caller's fault) a success.
///
/// gRPC sends the status in the headers for a trailers-only response, which
/// is how servers and proxies answer a call that fails before any message.
/// A status that arrives later, in the trailers of a streamed body, is not
/// seen: such a response counts as a success.
///
/// ```
/// use tower_firebreak::classify::{Classify, GrpcClassifier, GrpcCode, Outcome};
///
/// let c = GrpcClassifier::new();
/// let res = http::Response::builder().header("grpc-status", "14").body(()).unwrap();
/// assert_eq!(c.classify(Ok(&res)), Outcome::Failure); // UNAVAILABLE
/// let res = http::Response::builder().header("grpc-status", "5").body(()).unwrap();
/// assert_eq!(c.classify(Ok(&res)), Outcome::Success); // NOT_FOUND
/// let c = c.failure(GrpcCode::NotFound);
/// assert_eq!(c.classify(Ok(&res)), Outcome::Failure);
/// ```
#[derive(Clone, Debug)]
pub struct GrpcClassifier {
    failing: u32,
    inner: GrpcErrorsAsFailures,
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        GrpcClassifier::new()
    }
}

impl GrpcClassifier {
    /// The codes that count as failures by default.
    pub const DEFAULT_FAILURES: [GrpcCode; 5] = [
        GrpcCode::Unavailable,
        GrpcCode::DeadlineExceeded,
        GrpcCode::Internal,
        GrpcCode::ResourceExhausted,
        GrpcCode::Unknown,
    ];

    /// A classifier with the [default failing codes](Self::DEFAULT_FAILURES).
    pub fn new() -> Self {
        Self::with_failures(Self::DEFAULT_FAILURES)
    }

    /// A classifier where exactly `codes` are failures.
    pub fn with_failures(codes: impl IntoIterator<Item = GrpcCode>) -> Self {
        let failing = codes
            .into_iter()
            .filter(|c| !matches!(c, GrpcCode::Ok))
            .fold(0, |m, c| m | code_bit(c));
        Self::from_mask(failing)
    }

    /// Also counts `code` as a failure (`Ok` never is).
    pub fn failure(self, code: GrpcCode) -> Self {
        if matches!(code, GrpcCode::Ok) {
            return self;
        }
        Self::from_mask(self.failing | code_bit(code))
    }

    /// Counts `code` as a success.
    pub fn success(self, code: GrpcCode) -> Self {
        Self::from_mask(self.failing & !code_bit(code))
    }

    fn from_mask(failing: u32) -> Self {
        let inner = ALL_GRPC_CODES
            .into_iter()
            .filter(|c| failing & code_bit(*c) == 0)
            .fold(GrpcErrorsAsFailures::new(), |g, c| g.with_success(c));
        GrpcClassifier { failing, inner }
    }
}

impl<B> Classify<Response<B>> for GrpcClassifier {
    fn classify(&self, result: Result<&Response<B>, &BoxError>) -> Outcome {
        let res = match result {
            Ok(res) => res,
            Err(e) => return classify_error(e),
        };
        match self.inner.clone().classify_response(res) {
            ClassifiedResponse::Ready(Ok(())) => Outcome::Success,
            ClassifiedResponse::Ready(Err(_)) => Outcome::Failure,
            // The status comes in the trailers, which are not seen here.
            ClassifiedResponse::RequiresEos(_) => Outcome::Success,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit_breaker::CircuitOpen;
    use crate::timeout::Elapsed;
    use std::time::Duration;

    #[test]
    fn own_rejections_are_ignored_but_timeouts_count() {
        let open: BoxError = CircuitOpen::new(Duration::from_secs(1)).into();
        assert_eq!(classify_error(&open), Outcome::Ignore);
        let elapsed: BoxError = Elapsed::new(Duration::from_secs(1)).into();
        assert_eq!(classify_error(&elapsed), Outcome::Failure);
        let other: BoxError = "boom".into();
        assert_eq!(classify_error(&other), Outcome::Failure);
    }

    #[test]
    fn grpc_codes() {
        let c = GrpcClassifier::new();
        for (code, want) in [
            ("0", Outcome::Success),
            ("2", Outcome::Failure),
            ("4", Outcome::Failure),
            ("8", Outcome::Failure),
            ("13", Outcome::Failure),
            ("14", Outcome::Failure),
            ("3", Outcome::Success),
            ("16", Outcome::Success),
        ] {
            let res = Response::builder()
                .header("grpc-status", code)
                .body(())
                .unwrap();
            assert_eq!(c.classify(Ok(&res)), want, "grpc-status {code}");
        }
        let c = c.success(GrpcCode::Unavailable);
        let res = Response::builder()
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        assert_eq!(c.classify(Ok(&res)), Outcome::Success);
    }

    #[test]
    fn http_statuses() {
        let c = HttpClassifier::new();
        for (status, want) in [
            (200, Outcome::Success),
            (404, Outcome::Success),
            (429, Outcome::Success),
            (408, Outcome::Success),
            (500, Outcome::Failure),
            (503, Outcome::Failure),
        ] {
            let res = Response::builder().status(status).body(()).unwrap();
            assert_eq!(c.classify(Ok(&res)), want, "{status}");
        }
        let c = c.request_timeout(true);
        let res = Response::builder().status(408).body(()).unwrap();
        assert_eq!(c.classify(Ok(&res)), Outcome::Failure);
    }
}
