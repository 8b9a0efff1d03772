use super::{CallDeadline, GRPC_TIMEOUT_HEADER, TIMEOUT_HEADER, current, format_grpc_timeout};
use http::HeaderValue;
use std::task::{Context, Poll};
use tokio::time::Instant;
use tower::{Layer, Service};

/// Writes the time left in the call onto each outgoing request.
///
/// Put it innermost in a client stack, right above the HTTP client, so each
/// retry attempt carries the time left *at that attempt*. gRPC requests
/// (`content-type: application/grpc…`) get `grpc-timeout`; other requests get
/// [`TIMEOUT_HEADER`](super::TIMEOUT_HEADER). A request with no deadline is
/// passed on untouched.
///
/// `poll_ready` and errors are the inner service's.
#[derive(Clone, Debug)]
pub struct PropagateDeadline<S> {
    inner: S,
}

impl<S> PropagateDeadline<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        PropagateDeadline { inner }
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
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let at = match (req.extensions().get::<CallDeadline>(), current()) {
            (Some(e), Some(c)) => Some(e.at().min(c)),
            (Some(e), None) => Some(e.at()),
            (None, c) => c,
        };
        if let Some(at) = at {
            let left = at.saturating_duration_since(Instant::now());
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
        self.inner.call(req)
    }
}

/// Applies [`PropagateDeadline`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PropagateDeadlineLayer {
    _priv: (),
}

impl PropagateDeadlineLayer {
    /// A new layer.
    pub const fn new() -> Self {
        PropagateDeadlineLayer { _priv: () }
    }
}

impl<S> Layer<S> for PropagateDeadlineLayer {
    type Service = PropagateDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateDeadline::new(inner)
    }
}
