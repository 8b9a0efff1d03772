use super::future::ResponseFuture;
use crate::BoxError;
use bytes::Bytes;
use http_body_util::{Either, Full};
use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::marker::PhantomData;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// How an error becomes a response: [`ProblemDetails`] for HTTP,
/// [`TrailersOnly`](crate::grpc::TrailersOnly) for gRPC.
pub trait ErrorMapping {
    /// The response that answers `err`.
    fn response(err: &(dyn Error + 'static)) -> http::Response<Full<Bytes>>;
}

/// HTTP answers: DESIGN.md's status codes, `Retry-After` and problem-details
/// bodies ([`error_response`](super::error_response)).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProblemDetails;

impl ErrorMapping for ProblemDetails {
    fn response(err: &(dyn Error + 'static)) -> http::Response<Full<Bytes>> {
        super::error_response(err)
    }
}

/// Answers every error of the inner service with the response `M` makes of
/// it, so the service is infallible. Use it as [`RejectionResponse`] (HTTP)
/// or [`GrpcRejection`](crate::grpc::GrpcRejection).
///
/// The response body is `Either<B, Full<Bytes>>`: the inner body, or ours.
///
/// `poll_ready` is the inner service's. None of our layers fail readiness; if
/// the inner service does, the error is kept and answers the next call as a
/// response, since an infallible service has no other way to report it.
pub struct Answer<S, M> {
    inner: S,
    ready_err: Option<BoxError>,
    _mapping: PhantomData<fn() -> M>,
}

/// Our rejections as HTTP responses; see [`Answer`] and the [module docs](super).
pub type RejectionResponse<S> = Answer<S, ProblemDetails>;

// By hand: a clone must not inherit an error that belongs to this instance's
// next call.
impl<S: Clone, M> Clone for Answer<S, M> {
    fn clone(&self) -> Self {
        Answer::new(self.inner.clone())
    }
}

impl<S: fmt::Debug, M> fmt::Debug for Answer<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field("inner", &self.inner)
            .field("mapping", &std::any::type_name::<M>())
            .finish()
    }
}

impl<S, M> Answer<S, M> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Answer {
            inner,
            ready_err: None,
            _mapping: PhantomData,
        }
    }

    /// The layer that applies this service.
    pub fn layer() -> AnswerLayer<M> {
        AnswerLayer::new()
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

impl<S, M, Req, B> Service<Req> for Answer<S, M>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    M: ErrorMapping,
{
    type Response = http::Response<Either<B, Full<Bytes>>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future, M>;

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

/// Applies [`Answer`].
pub struct AnswerLayer<M> {
    _mapping: PhantomData<fn() -> M>,
}

/// Applies [`RejectionResponse`].
pub type RejectionResponseLayer = AnswerLayer<ProblemDetails>;

impl<M> AnswerLayer<M> {
    /// A new layer.
    pub const fn new() -> Self {
        AnswerLayer {
            _mapping: PhantomData,
        }
    }
}

impl<M> Default for AnswerLayer<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> Clone for AnswerLayer<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for AnswerLayer<M> {}

impl<M> fmt::Debug for AnswerLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnswerLayer")
            .field("mapping", &std::any::type_name::<M>())
            .finish()
    }
}

impl<S, M> Layer<S> for AnswerLayer<M> {
    type Service = Answer<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        Answer::new(inner)
    }
}
