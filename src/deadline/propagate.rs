use super::{
    CallDeadline, DeadlineExceeded, GRPC_TIMEOUT_HEADER, TIMEOUT_HEADER, current,
    format_grpc_timeout, from_headers,
};
use crate::BoxError;
use http::HeaderValue;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service};

/// Writes the time left in the call onto each outgoing request.
///
/// Put it innermost in a client stack, right above the HTTP client, so each
/// retry attempt carries the time left *at that attempt*. gRPC requests
/// (`content-type: application/grpc…`) get `grpc-timeout`; other requests get
/// [`TIMEOUT_HEADER`](super::TIMEOUT_HEADER). A request with neither a
/// deadline nor an [`attempt_timeout`](PropagateDeadline::attempt_timeout)
/// is passed on untouched.
///
/// The value is the least of: the time left in the call, the attempt
/// timeout set with [`attempt_timeout`](PropagateDeadline::attempt_timeout)
/// (the client gives up on an attempt then, so the server need not work
/// longer), and a timeout the request already carries in either header
/// (tonic's `Request::set_timeout`, say), which is never replaced by a
/// longer one.
///
/// A gRPC client (tonic's `Channel`) enforces the `grpc-timeout` it is
/// given, at the instant the call's deadline passes, and when its timer
/// fires before ours the call fails with tonic's `TimeoutExpired`. Once the
/// deadline has passed, such an error is the caller's deadline, so (with
/// the `tonic` feature, which lets it recognise tonic's error) this service
/// returns [`DeadlineExceeded`] instead, with tonic's error as its source:
/// a circuit breaker does not count it as the dependency's failure, and the
/// caller sees one error for one cause. Every other error is the inner service's, boxed.
#[derive(Clone, Debug)]
pub struct PropagateDeadline<S> {
    inner: S,
    attempt: Option<Duration>,
}

impl<S> PropagateDeadline<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        PropagateDeadline {
            inner,
            attempt: None,
        }
    }

    /// Also caps the value at `timeout` from the attempt's start: the
    /// attempt timeout of the [`Timeout`](crate::timeout::Timeout) above
    /// (`None`: no cap). With it, a call with no deadline still tells the
    /// server how long this attempt will be waited for.
    pub fn attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt = timeout;
        self
    }

    /// A [`PropagateDeadlineLayer`].
    pub fn layer() -> PropagateDeadlineLayer {
        PropagateDeadlineLayer::new()
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<http::Request<B>> for PropagateDeadline<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let at = crate::earliest(
            req.extensions().get::<CallDeadline>().map(CallDeadline::at),
            current(),
        );
        let now = (at.is_some() || self.attempt.is_some()).then(Instant::now);
        let attempt_ends = self.attempt.zip(now).map(|(t, now)| crate::later(now, t));
        let until = crate::earliest(at, attempt_ends);
        if let (Some(until), Some(now)) = (until, now) {
            let mut left = until.saturating_duration_since(now);
            if let Some(given) = from_headers(req.headers()) {
                left = left.min(given);
            }
            let is_grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let (name, value) = if is_grpc {
                (GRPC_TIMEOUT_HEADER, format_grpc_timeout(left))
            } else {
                (TIMEOUT_HEADER, left.as_millis().to_string())
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                req.headers_mut().insert(name, v);
            }
        }
        PropagateFuture {
            inner: self.inner.call(req),
            at,
        }
    }
}

pin_project! {
    /// The response future of [`PropagateDeadline`].
    #[derive(Debug)]
    pub struct PropagateFuture<F> {
        #[pin]
        inner: F,
        at: Option<Instant>,
    }
}

impl<F, T, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let at = *this.at;
        Poll::Ready(ready!(this.inner.poll(cx)).map_err(|e| {
            let e = e.into();
            if at.is_some_and(|at| Instant::now() >= at) && is_client_timeout(&*e) {
                Box::new(DeadlineExceeded::caused_by(e))
            } else {
                e
            }
        }))
    }
}

/// Whether `err` is a gRPC client's own timeout (tonic's `TimeoutExpired`).
#[cfg(feature = "tonic")]
fn is_client_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::find::<tonic::TimeoutExpired>(err).is_some()
}

#[cfg(not(feature = "tonic"))]
fn is_client_timeout(_: &(dyn std::error::Error + 'static)) -> bool {
    false
}

/// Applies [`PropagateDeadline`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateDeadlineLayer {
    attempt: Option<Duration>,
}

impl PropagateDeadlineLayer {
    /// A new layer.
    pub const fn new() -> Self {
        PropagateDeadlineLayer { attempt: None }
    }

    /// See [`PropagateDeadline::attempt_timeout`].
    pub fn attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.attempt = timeout;
        self
    }
}

impl<S> Layer<S> for PropagateDeadlineLayer {
    type Service = PropagateDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateDeadline::new(inner).attempt_timeout(self.attempt)
    }
}
