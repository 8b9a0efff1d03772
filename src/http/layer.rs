use super::future::ResponseFuture;
use crate::BoxError;
use http_body_util::Either;
use std::convert::Infallible;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Turns every error of the inner service into its HTTP response
/// ([`error_response`](super::error_response)), so the service is infallible.
///
/// The response body is `Either<B, Full<Bytes>>`: the inner body, or ours.
///
/// `poll_ready` is the inner service's. None of our layers fail readiness; if
/// the inner service does, the error is kept and answers the next call as a
/// response, since an infallible service has no other way to report it.
#[derive(Debug)]
pub struct RejectionResponse<S> {
    inner: S,
    ready_err: Option<BoxError>,
}

// By hand: a clone must not inherit an error that belongs to this instance's
// next call.
impl<S: Clone> Clone for RejectionResponse<S> {
    fn clone(&self) -> Self {
        RejectionResponse::new(self.inner.clone())
    }
}

impl<S> RejectionResponse<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        RejectionResponse {
            inner,
            ready_err: None,
        }
    }

    /// A [`RejectionResponseLayer`].
    pub fn layer() -> RejectionResponseLayer {
        RejectionResponseLayer::new()
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

impl<S, Req, B> Service<Req> for RejectionResponse<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Either<B, http_body_util::Full<bytes::Bytes>>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready_err.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                self.ready_err = Some(e.into());
                Poll::Ready(Ok(()))
            }
            other => other.map(|_| Ok(())),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.ready_err.take() {
            Some(err) => ResponseFuture::failed(err),
            None => ResponseFuture::new(self.inner.call(req)),
        }
    }
}

/// Applies [`RejectionResponse`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RejectionResponseLayer {
    _priv: (),
}

impl RejectionResponseLayer {
    /// A new layer.
    pub const fn new() -> Self {
        RejectionResponseLayer { _priv: () }
    }
}

impl<S> Layer<S> for RejectionResponseLayer {
    type Service = RejectionResponse<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RejectionResponse::new(inner)
    }
}
