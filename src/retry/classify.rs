use super::body::ReplayBody;
use crate::BoxError;
use crate::deadline::{CallDeadline, DeadlineExceeded};
use crate::error::{self, Rejection};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{Empty, Full};
use std::fmt;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// What to do with the result of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Return the result to the caller.
    Done,
    /// Retry after the policy's backoff delay.
    Retry,
    /// Retry after this delay, which the server asked for (`Retry-After`,
    /// `grpc-retry-pushback-ms`). The policy still caps it by `max_delay` and
    /// by the time left before the deadline.
    RetryAfter(Duration),
}

/// Decides which results are worth another attempt, and how to replay a
/// request.
///
/// [`DefaultClassifier`] serves plain requests, [`HttpClassifier`] HTTP and
/// gRPC; [`classify_fn`] turns a closure into a classifier.
pub trait Classify<Req, Res> {
    /// What to do with `result`, the outcome of sending `req`.
    fn classify(&self, req: &Req, result: &Result<Res, BoxError>) -> Action;

    /// A copy of `req` to send again, or `None` when it cannot be replayed
    /// (the call then goes once and is never retried).
    fn clone_request(&self, req: &Req) -> Option<Req>;

    /// The request's own deadline, if it carries one. The policy also reads
    /// [`deadline::current()`](crate::deadline::current); the earlier wins.
    fn deadline(&self, _req: &Req) -> Option<Instant> {
        None
    }

    /// Whether a second copy of `req` may be sent while the first is still
    /// in flight (see [`Hedge`](crate::hedge::Hedge)). Default: `true`.
    fn hedgeable(&self, _req: &Req) -> bool {
        true
    }

    /// Whether `copy`, made by [`clone_request`](Self::clone_request)
    /// earlier, can still be sent: `false` once a body it replays has gone
    /// over its replay limit. A hedge checks it just before sending its
    /// copy. Default: `true`.
    fn can_send(&self, _copy: &Req) -> bool {
        true
    }
}

/// Whether an error must never be retried by default: one of our own shed
/// rejections (the call never reached the service, and retrying would feed
/// the overload), or the whole call running out of time.
fn is_final(err: &BoxError) -> bool {
    if Rejection::of(&**err).is_some_and(|r| r.is_shed()) {
        return true;
    }
    error::find::<DeadlineExceeded>(&**err).is_some()
}

/// Whether the request of a failed attempt certainly never reached the
/// server: its connection was refused.
fn never_sent(err: &BoxError) -> bool {
    error::find::<std::io::Error>(&**err)
        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The classifier for plain requests: retries any `Err` except this crate's
/// shed rejections ([`CircuitOpen`](crate::circuit_breaker::CircuitOpen),
/// [`BulkheadFull`](crate::bulkhead::BulkheadFull),
/// [`RateLimited`](crate::rate_limit::RateLimited)) and
/// [`DeadlineExceeded`]; an attempt [`Elapsed`](crate::timeout::Elapsed) is
/// retried. `Ok` is never retried. Requests are replayed with `Clone`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassifier;

impl<Req: Clone, Res> Classify<Req, Res> for DefaultClassifier {
    #[inline]
    fn classify(&self, _req: &Req, result: &Result<Res, BoxError>) -> Action {
        match result {
            Err(e) if !is_final(e) => Action::Retry,
            _ => Action::Done,
        }
    }

    #[inline]
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// A classifier made from a closure; see [`classify_fn`].
#[derive(Clone, Copy)]
pub struct ClassifyFn<F> {
    f: F,
}

/// Makes a classifier from a closure `Fn(&Req, &Result<Res, BoxError>) -> Action`.
/// Requests are replayed with `Clone`.
///
/// ```
/// use tower_firebreak::retry::{Action, RetryPolicy, classify_fn};
/// use tower_firebreak::BoxError;
/// use std::time::Duration;
///
/// // Retry only answers that say "busy".
/// let policy = RetryPolicy::exponential(Duration::from_millis(10))
///     .classify(classify_fn(|_req: &u32, res: &Result<&str, BoxError>| match res {
///         Ok("busy") => Action::Retry,
///         _ => Action::Done,
///     }));
/// # let _ = policy;
/// ```
pub fn classify_fn<F>(f: F) -> ClassifyFn<F> {
    ClassifyFn { f }
}

impl<F> fmt::Debug for ClassifyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClassifyFn").finish_non_exhaustive()
    }
}

impl<F, Req: Clone, Res> Classify<Req, Res> for ClassifyFn<F>
where
    F: Fn(&Req, &Result<Res, BoxError>) -> Action,
{
    fn classify(&self, req: &Req, result: &Result<Res, BoxError>) -> Action {
        (self.f)(req, result)
    }

    #[inline]
    fn clone_request(&self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// A request body that can be sent again: [`Full<Bytes>`], [`Empty<Bytes>`],
/// or a [`ReplayBody`] that was buffered within its limit.
pub trait ReplayableBody: Sized {
    /// A fresh copy of the body, or `None` when it cannot be replayed.
    fn try_clone_body(&self) -> Option<Self>;

    /// Whether a copy made earlier can still be sent: `false` once a
    /// recording body has gone over its limit. Default: `true`.
    fn can_replay(&self) -> bool {
        true
    }
}

impl ReplayableBody for Full<Bytes> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayableBody for Empty<Bytes> {
    fn try_clone_body(&self) -> Option<Self> {
        Some(*self)
    }
}

impl<B> ReplayableBody for ReplayBody<B> {
    fn try_clone_body(&self) -> Option<Self> {
        self.try_clone()
    }

    fn can_replay(&self) -> bool {
        self.is_replayable()
    }
}

/// The header that makes a non-idempotent HTTP request safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The gRPC header by which a server asks the client to wait (gRFC A6).
pub const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

const GRPC_UNAVAILABLE: &[u8] = b"14";
const GRPC_RESOURCE_EXHAUSTED: &[u8] = b"8";

/// The classifier for HTTP and gRPC requests.
///
/// **HTTP.** A request is retryable when its method is idempotent (GET,
/// HEAD, OPTIONS, PUT, DELETE, TRACE) or it carries an `Idempotency-Key`
/// header. A retryable request is retried on an `Err` (a connection error, an
/// attempt timeout; not our shed rejections nor `DeadlineExceeded`) and on
/// 502, 503, 504, 429 and 408. A `Retry-After` header (seconds or an
/// HTTP-date) sets the least delay (never under the backoff). Any other request
/// is sent once.
///
/// **gRPC** (`content-type: application/grpc…`). A call is retried on
/// `UNAVAILABLE`, and on `RESOURCE_EXHAUSTED` only when the server sent
/// `grpc-retry-pushback-ms`, whose value then sets the least delay: the server's
/// answer says the call was not carried out. On an `Err` (an attempt
/// timeout, a connection reset) the call may have reached the server and
/// run, so, as a gRPC call is always a POST, it is retried then only with
/// an `Idempotency-Key`, or when the connection was refused (nothing was
/// sent).
/// A negative or malformed pushback means "do not retry" (gRFC A6). The
/// status is read from the response headers, where a server puts it when it
/// fails a call before sending a message (a "trailers-only" response, which
/// is how tonic answers an `Err(Status)`). A status in the trailers, after a
/// body, is not seen: the body is never read to find it.
///
/// The response body is never consumed, so a retried response is one whose
/// body nobody has read. Requests are replayed through [`ReplayableBody`],
/// and the call's deadline is read from its
/// [`CallDeadline`](crate::deadline::CallDeadline) extension.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpClassifier;

impl HttpClassifier {
    fn is_grpc(headers: &HeaderMap) -> bool {
        headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
    }

    fn is_idempotent<B>(req: &http::Request<B>) -> bool {
        matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        ) || req.headers().contains_key(IDEMPOTENCY_KEY)
    }

    fn classify_grpc<ResB>(res: &http::Response<ResB>) -> Action {
        let headers = res.headers();
        let Some(status) = headers.get(crate::classify::GRPC_STATUS) else {
            // No gRPC status: an HTTP error from a proxy in between. The gRPC
            // spec maps 502, 503 and 504 to UNAVAILABLE.
            return match res.status() {
                StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => Action::Retry,
                _ => Action::Done,
            };
        };
        let pushback = headers.get(GRPC_RETRY_PUSHBACK_MS).map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        });
        match (status.as_bytes(), pushback) {
            // A pushback that is present but not a non-negative integer
            // means the server does not want a retry.
            (GRPC_UNAVAILABLE | GRPC_RESOURCE_EXHAUSTED, Some(None)) => Action::Done,
            (GRPC_UNAVAILABLE | GRPC_RESOURCE_EXHAUSTED, Some(Some(d))) => Action::RetryAfter(d),
            (GRPC_UNAVAILABLE, None) => Action::Retry,
            _ => Action::Done,
        }
    }
}

/// Parses a `Retry-After` value: whole seconds, or an HTTP-date (its delay
/// from now, zero if it has passed). `None` when malformed.
pub fn parse_retry_after(value: &http::HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl<B, ResB> Classify<http::Request<B>, http::Response<ResB>> for HttpClassifier
where
    B: ReplayableBody,
{
    fn classify(
        &self,
        req: &http::Request<B>,
        result: &Result<http::Response<ResB>, BoxError>,
    ) -> Action {
        let grpc = Self::is_grpc(req.headers());
        let idempotent = Self::is_idempotent(req);
        // `req` is the copy kept for the next attempt: its body may have
        // gone over the replay limit since it was made.
        if !grpc && !idempotent || !req.body().can_replay() {
            return Action::Done;
        }
        let res = match result {
            Ok(res) => res,
            Err(e) if is_final(e) => return Action::Done,
            // A gRPC call that may have run is not sent again unless it is
            // marked safe to repeat.
            Err(e) if grpc && !idempotent && !never_sent(e) => {
                return Action::Done;
            }
            Err(_) => return Action::Retry,
        };
        if grpc {
            return Self::classify_grpc(res);
        }
        match res.status() {
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS
            | StatusCode::REQUEST_TIMEOUT => {
                match res
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(parse_retry_after)
                {
                    Some(d) => Action::RetryAfter(d),
                    None => Action::Retry,
                }
            }
            _ => Action::Done,
        }
    }

    fn clone_request(&self, req: &http::Request<B>) -> Option<http::Request<B>> {
        let body = req.body().try_clone_body()?;
        let mut copy = http::Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        Some(copy)
    }

    fn deadline(&self, req: &http::Request<B>) -> Option<Instant> {
        req.extensions().get::<CallDeadline>().map(CallDeadline::at)
    }

    /// Idempotent methods and requests with an `Idempotency-Key`; a gRPC call
    /// (always a POST) only with an `Idempotency-Key`.
    fn hedgeable(&self, req: &http::Request<B>) -> bool {
        Self::is_idempotent(req)
    }

    fn can_send(&self, copy: &http::Request<B>) -> bool {
        copy.body().can_replay()
    }
}
