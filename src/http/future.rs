//! The response future of [`RejectionResponse`](super::RejectionResponse).

use crate::BoxError;
use bytes::Bytes;
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pin_project! {
    /// The response future of [`RejectionResponse`](super::RejectionResponse).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        failed: Option<BoxError>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F) -> Self {
        ResponseFuture {
            inner: Some(inner),
            failed: None,
        }
    }

    pub(crate) fn failed(err: BoxError) -> Self {
        ResponseFuture {
            inner: None,
            failed: Some(err),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
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
            Err(e) => super::error_response(&*e).map(Either::Right),
        }))
    }
}
