//! The response future of [`Answer`](super::Answer).

use super::ErrorMapping;
use crate::BoxError;
use bytes::Bytes;
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pin_project! {
    /// The response future of [`Answer`](super::Answer).
    pub struct ResponseFuture<F, M> {
        #[pin]
        inner: Option<F>,
        failed: Option<BoxError>,
        _mapping: PhantomData<fn() -> M>,
    }
}

impl<F, M> ResponseFuture<F, M> {
    pub(crate) fn new(inner: F) -> Self {
        ResponseFuture {
            inner: Some(inner),
            failed: None,
            _mapping: PhantomData,
        }
    }

    pub(crate) fn failed(err: BoxError) -> Self {
        ResponseFuture {
            inner: None,
            failed: Some(err),
            _mapping: PhantomData,
        }
    }
}

impl<F, M> fmt::Debug for ResponseFuture<F, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, M, B, E> Future for ResponseFuture<F, M>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    M: ErrorMapping,
{
    type Output = Result<http::Response<Either<B, Full<Bytes>>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match this.inner.as_pin_mut() {
            Some(inner) => ready!(inner.poll(cx)).map_err(Into::into),
            None => Err(this.failed.take().expect("polled after completion")),
        };
        Poll::Ready(Ok(match res {
            Ok(res) => res.map(Either::Left),
            Err(e) => M::response(&*e).map(Either::Right),
        }))
    }
}
