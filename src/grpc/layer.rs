use super::future::ResponseFuture;
use crate::BoxError;
use http_body_util::Either;
use std::convert::Infallible;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Answers every error of the inner service with a gRPC Trailers-Only
/// response ([`error_response`](super::error_response)), so the service is
/// infallible and each rejection reaches the client with its own code.
///
/// Put it outermost on a gRPC server: `Server::builder().layer(...)` in tonic.
/// `poll_ready` is the inner service's; an error there is kept and answers the
/// next call.
#[derive(Debug)]
pub struct GrpcRejection<S> {
    inner: S,
    ready_err: Option<BoxError>,
}

// By hand: a clone must not inherit an error that belongs to this instance's next call.
impl<S: Clone> Clone for GrpcRejection<S> {
    fn clone(&self) -> Self {
        GrpcRejection::new(self.inner.clone())
    }
}

impl<S> GrpcRejection<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        GrpcRejection {
            inner,
            ready_err: None,
        }
    }

    /// A [`GrpcRejectionLayer`].
    pub fn layer() -> GrpcRejectionLayer {
        GrpcRejectionLayer::new()
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

impl<S, Req, B> Service<Req> for GrpcRejection<S>
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

/// Applies [`GrpcRejection`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcRejectionLayer {
    _priv: (),
}

impl GrpcRejectionLayer {
    /// A new layer.
    pub const fn new() -> Self {
        GrpcRejectionLayer { _priv: () }
    }
}

impl<S> Layer<S> for GrpcRejectionLayer {
    type Service = GrpcRejection<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcRejection::new(inner)
    }
}
