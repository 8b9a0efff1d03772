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
//! | [`GrpcClassifier`] | other codes | `grpc-status` (headers or trailers) UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN | as above |
//!
//! A [`Classify`] decides as soon as the call returns. A classifier that must
//! wait for the end of the response body (gRPC puts the status of a streamed
//! response in its trailers) implements [`ClassifyStream`] instead; every
//! `Classify` is a `ClassifyStream` that decides at once.
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
//! ([`Elapsed`]) *is* counted as a failure: in the
//! standard pipeline the timeout sits inside the breaker, and a hanging
//! dependency must be able to open it. So is a `DeadlineExceeded` caused by
//! an `Elapsed`: the deadline fired first, but only after the attempt had
//! nearly all of its own timeout (see [`crate::timeout`]). (With slow-call
//! detection on, the breaker still counts a `DeadlineExceeded` call as
//! slow once it has run for `slow_call_duration`; see
//! [`circuit_breaker`](crate::circuit_breaker#what-counts-as-a-failure).) A call that
//! failed because the caller's request body did
//! ([`RequestBodyError`](crate::retry::RequestBodyError), an aborted upload)
//! is not counted either.

use crate::BoxError;
use crate::circuit_breaker::future::Call;
use crate::error::{Rejection, RejectionKind};
use crate::timeout::Elapsed;
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcEosErrorsAsFailures,
    GrpcErrorsAsFailures, ServerErrorsAsFailures,
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
    /// rejections): not counted at all. But a circuit breaker with slow-call
    /// detection counts a call cut by the caller's deadline as slow once it
    /// has run for `slow_call_duration`.
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
    // The caller's own request body failed (an aborted upload): nothing is
    // known of the dependency.
    if crate::error::find::<crate::retry::RequestBodyError>(&**err).is_some() {
        return Outcome::Ignore;
    }
    match Rejection::of(&**err) {
        Some(r) if r.is_shed() => Outcome::Ignore,
        // The deadline cut the attempt, but only after the dependency had
        // nearly all of its attempt timeout: that is the dependency hanging.
        Some(r)
            if r.kind() == RejectionKind::DeadlineExceeded
                && crate::error::find::<Elapsed>(&**err).is_some() =>
        {
            Outcome::Failure
        }
        Some(r) if r.kind() == RejectionKind::DeadlineExceeded => Outcome::Ignore,
        _ => Outcome::Failure,
    }
}

/// A classifier that may decide after the call has returned: at the end of
/// the response body, for instance.
///
/// It receives the call's result and a [`Completion`], and must either call
/// [`Completion::record`] or move the `Completion` into the response (a body
/// wrapper) and record later. A `Completion` dropped without a record counts
/// as [`Outcome::Ignore`].
///
/// Every [`Classify`] implements it and decides at once.
pub trait ClassifyStream<Res> {
    /// What the caller gets: `Res`, or `Res` with a wrapped body.
    type Response;

    /// Classifies `result` now or later, and passes it on.
    fn classify_stream(
        &self,
        result: Result<Res, BoxError>,
        completion: Completion,
    ) -> Result<Self::Response, BoxError>;
}

impl<C, Res> ClassifyStream<Res> for C
where
    C: Classify<Res>,
{
    type Response = Res;

    #[inline]
    fn classify_stream(
        &self,
        result: Result<Res, BoxError>,
        completion: Completion,
    ) -> Result<Res, BoxError> {
        completion.record(self.classify(result.as_ref()));
        result
    }
}

/// A call admitted by a circuit breaker whose outcome is still to be told.
///
/// Dropping it unrecorded counts as [`Outcome::Ignore`]: a half-open probe
/// gives its slot back. (One exception: with slow-call detection on, a call
/// whose result was a `DeadlineExceeded` not caused by the attempt timeout,
/// and that ran for `slow_call_duration`, counts as slow when its outcome
/// is `Ignore`; see
/// [`circuit_breaker`](crate::circuit_breaker#what-counts-as-a-failure).)
pub struct Completion {
    call: Call,
}

impl Completion {
    pub(crate) fn new(call: Call) -> Self {
        Completion { call }
    }

    /// Tells the breaker how the call went.
    #[inline]
    pub fn record(self, outcome: Outcome) {
        self.call.finish(outcome);
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Completion").finish_non_exhaustive()
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
    grpc_headers: Option<GrpcClassifier>,
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

    /// Whether a `grpc-status` in the response headers decides, as
    /// [`GrpcClassifier::new`] judges it (UNAVAILABLE, INTERNAL, ... are
    /// failures). gRPC answers a call that fails before any message this way
    /// (a "Trailers-Only" response, with HTTP status 200): tonic's servers
    /// for a handler's `Err`, and proxies. Default: no. The
    /// [preset](crate::preset) turns it on, so it sees those failures from
    /// gRPC dependencies too. A status sent in the trailers, after a
    /// message, is not seen: for that, use a [`GrpcClassifier`], which
    /// wraps the body to read them.
    ///
    /// ```
    /// use tower_firebreak::classify::{Classify, HttpClassifier, Outcome};
    ///
    /// let c = HttpClassifier::new().grpc_status_headers(true);
    /// let unavailable = http::Response::builder()
    ///     .header("content-type", "application/grpc")
    ///     .header("grpc-status", "14")
    ///     .body(())
    ///     .unwrap();
    /// assert_eq!(c.classify(Ok(&unavailable)), Outcome::Failure);
    /// assert_eq!(HttpClassifier::new().classify(Ok(&unavailable)), Outcome::Success);
    /// ```
    pub fn grpc_status_headers(mut self, judge: bool) -> Self {
        self.grpc_headers = judge.then(GrpcClassifier::new);
        self
    }
}

impl<B> Classify<Response<B>> for HttpClassifier {
    fn classify(&self, result: Result<&Response<B>, &BoxError>) -> Outcome {
        let res = match result {
            Ok(res) => res,
            Err(e) => return classify_error(e),
        };
        if let Some(grpc) = &self.grpc_headers
            && res.headers().contains_key(&GRPC_STATUS)
            && let Some(outcome) = grpc.classify_headers(res)
        {
            return outcome;
        }
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

/// `grpc-status`, parsed once: every place in the crate that reads or
/// writes it names it through this.
pub(crate) const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

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

/// gRPC responses: the `grpc-status` in the response headers, or else in the
/// trailers, decides, using tower-http's [`GrpcErrorsAsFailures`].
///
/// By default UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED
/// and UNKNOWN are failures, and every other code (NOT_FOUND,
/// INVALID_ARGUMENT, ... : the caller's fault) a success.
///
/// gRPC sends the status in the headers for a trailers-only response (how
/// servers and proxies answer a call that fails before any message), and in
/// the trailers otherwise. In a circuit breaker, a response whose headers do
/// not decide comes back with a [`GrpcBody`], which records the outcome when
/// the trailers arrive; a body dropped before then counts as neither. A
/// slow-call duration then runs to the end of the body.
///
/// ```
/// use tower_firebreak::classify::{GrpcClassifier, GrpcCode, Outcome};
///
/// let c = GrpcClassifier::new();
/// let res = http::Response::builder().header("grpc-status", "14").body(()).unwrap();
/// assert_eq!(c.classify_headers(&res), Some(Outcome::Failure)); // UNAVAILABLE
/// let res = http::Response::builder().header("grpc-status", "5").body(()).unwrap();
/// assert_eq!(c.classify_headers(&res), Some(Outcome::Success)); // NOT_FOUND
/// let c = c.failure(GrpcCode::NotFound);
/// assert_eq!(c.classify_headers(&res), Some(Outcome::Failure));
///
/// let mut trailers = http::HeaderMap::new();
/// trailers.insert("grpc-status", "4".parse().unwrap()); // DEADLINE_EXCEEDED
/// assert_eq!(c.classify_trailers(Some(&trailers)), Outcome::Failure);
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

/// The gRPC code a client gives a response with no `grpc-status` and an
/// HTTP status other than 200 (a proxy's answer, such as Envoy's 503): the
/// mapping of the gRPC spec (`doc/http-grpc-status-mapping.md`).
fn code_of_http(status: StatusCode) -> Option<GrpcCode> {
    Some(match status.as_u16() {
        200 => return None,
        400 => GrpcCode::Internal,
        401 => GrpcCode::Unauthenticated,
        403 => GrpcCode::PermissionDenied,
        404 => GrpcCode::Unimplemented,
        429 | 502 | 503 | 504 => GrpcCode::Unavailable,
        _ => GrpcCode::Unknown,
    })
}

impl GrpcClassifier {
    /// A response with no `grpc-status` whose HTTP status is not 200: a
    /// proxy answered instead of the server. The client sees the code of
    /// [`code_of_http`], so it is classified as that code.
    fn classify_http_status<B>(&self, res: &Response<B>) -> Option<Outcome> {
        if res.headers().contains_key("grpc-status") {
            return None;
        }
        let code = code_of_http(res.status())?;
        Some(if self.failing & code_bit(code) != 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        })
    }

    /// Classifies from the response headers alone: `None` when they carry
    /// no `grpc-status` and the trailers decide. A response with no
    /// `grpc-status` and an HTTP status other than 200 (a proxy's 503, say)
    /// is classified as the code a gRPC client makes of it (UNAVAILABLE for
    /// 429, 502, 503 and 504; UNKNOWN for most others).
    pub fn classify_headers<B>(&self, res: &Response<B>) -> Option<Outcome> {
        if let Some(outcome) = self.classify_http_status(res) {
            return Some(outcome);
        }
        match self.inner.clone().classify_response(res) {
            ClassifiedResponse::Ready(Ok(())) => Some(Outcome::Success),
            ClassifiedResponse::Ready(Err(_)) => Some(Outcome::Failure),
            ClassifiedResponse::RequiresEos(_) => None,
        }
    }

    /// Classifies from the trailers (`None`: the body ended without any).
    pub fn classify_trailers(&self, trailers: Option<&HeaderMap>) -> Outcome {
        let eos = match self.inner.clone().classify_response(&Response::new(())) {
            ClassifiedResponse::RequiresEos(eos) => eos,
            ClassifiedResponse::Ready(_) => unreachable!("an empty response has no grpc-status"),
        };
        eos_outcome(eos, trailers)
    }
}

fn eos_outcome(eos: GrpcEosErrorsAsFailures, trailers: Option<&HeaderMap>) -> Outcome {
    match eos.classify_eos(trailers) {
        Ok(()) => Outcome::Success,
        Err(_) => Outcome::Failure,
    }
}

impl<B> ClassifyStream<Response<B>> for GrpcClassifier {
    type Response = Response<GrpcBody<B>>;

    fn classify_stream(
        &self,
        result: Result<Response<B>, BoxError>,
        completion: Completion,
    ) -> Result<Self::Response, BoxError> {
        let res = match result {
            Ok(res) => res,
            Err(e) => {
                completion.record(classify_error(&e));
                return Err(e);
            }
        };
        if let Some(outcome) = self.classify_http_status(&res) {
            completion.record(outcome);
            return Ok(res.map(|inner| GrpcBody {
                inner,
                pending: None,
            }));
        }
        match self.inner.clone().classify_response(&res) {
            ClassifiedResponse::Ready(r) => {
                completion.record(if r.is_ok() {
                    Outcome::Success
                } else {
                    Outcome::Failure
                });
                Ok(res.map(|inner| GrpcBody {
                    inner,
                    pending: None,
                }))
            }
            ClassifiedResponse::RequiresEos(eos) => Ok(res.map(|inner| GrpcBody {
                inner,
                pending: Some((completion, eos)),
            })),
        }
    }
}

pin_project! {
    /// A gRPC response body that tells the circuit breaker the call's outcome
    /// when its trailers (or its end) arrive.
    ///
    /// A body dropped before its end counts as neither success nor failure.
    /// An error from the body is a failure.
    pub struct GrpcBody<B> {
        #[pin]
        inner: B,
        pending: Option<(Completion, GrpcEosErrorsAsFailures)>,
    }
}

impl<B> GrpcBody<B> {
    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: fmt::Debug> fmt::Debug for GrpcBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcBody")
            .field("inner", &self.inner)
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

impl<B: Body> Body for GrpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref()
                    && let Some((completion, eos)) = this.pending.take()
                {
                    completion.record(eos_outcome(eos, Some(trailers)));
                }
            }
            Some(Err(_)) => {
                if let Some((completion, _)) = this.pending.take() {
                    completion.record(Outcome::Failure);
                }
            }
            None => {
                if let Some((completion, eos)) = this.pending.take() {
                    completion.record(eos_outcome(eos, None));
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circuit_breaker::CircuitOpen;
    use crate::deadline::DeadlineExceeded;
    use std::time::Duration;

    #[test]
    fn own_rejections_are_ignored_but_timeouts_count() {
        let open: BoxError = CircuitOpen::new(Duration::from_secs(1)).into();
        assert_eq!(classify_error(&open), Outcome::Ignore);
        let elapsed: BoxError = Elapsed::new(Duration::from_secs(1)).into();
        assert_eq!(classify_error(&elapsed), Outcome::Failure);
        let other: BoxError = "boom".into();
        assert_eq!(classify_error(&other), Outcome::Failure);
        let out_of_time: BoxError = DeadlineExceeded::new().into();
        assert_eq!(classify_error(&out_of_time), Outcome::Ignore);
        let after_whole_attempt: BoxError =
            DeadlineExceeded::caused_by(Elapsed::new(Duration::from_secs(1)).into()).into();
        assert_eq!(classify_error(&after_whole_attempt), Outcome::Failure);
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
            assert_eq!(c.classify_headers(&res), Some(want), "grpc-status {code}");
        }
        assert_eq!(c.classify_headers(&Response::new(())), None);
        let c = c.success(GrpcCode::Unavailable);
        let res = Response::builder()
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        assert_eq!(c.classify_headers(&res), Some(Outcome::Success));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "13".parse().unwrap());
        assert_eq!(c.classify_trailers(Some(&t)), Outcome::Failure);
        assert_eq!(c.classify_trailers(None), Outcome::Success);
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
