//! The futures and helper types of [`Retry`](super::Retry).

use super::RetryPolicy;
use crate::BoxError;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::Service;

/// The response future of [`Retry`](super::Retry): tower's retry future,
/// unboxed.
pub type ResponseFuture<S, C, Req> =
    tower::retry::future::ResponseFuture<RetryPolicy<C>, IntoBoxError<S>, Req>;

/// Turns the inner service's error into a [`BoxError`], so the retry policy
/// can look through it with [`error::find`](crate::error::find).
#[derive(Clone, Debug)]
pub struct IntoBoxError<S> {
    pub(super) inner: S,
}

impl<S, Req> Service<Req> for IntoBoxError<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = IntoBoxErrorFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        IntoBoxErrorFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`IntoBoxError`].
    #[derive(Debug)]
    pub struct IntoBoxErrorFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T, E> Future for IntoBoxErrorFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(Into::into)
    }
}

/// The wait before a retry.
///
/// The timer is boxed: it is large (over 100 bytes) and only a retry needs
/// one, while tower's retry future holds room for it on every call.
#[derive(Debug)]
pub struct Backoff {
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Backoff {
    pub(super) fn until(at: tokio::time::Instant) -> Self {
        Backoff {
            sleep: Box::pin(tokio::time::sleep_until(at)),
        }
    }
}

impl Future for Backoff {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.sleep.as_mut().poll(cx)
    }
}
