//! The response future of [`CallSpan`](super::CallSpan).

use crate::BoxError;
use crate::error::Rejection;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tracing::Span;

pin_project! {
    /// Polls the inner future inside the call's span, and records the
    /// outcome on it.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, span: Span) -> Self {
        ResponseFuture { inner, span }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _g = this.span.enter();
        let out = ready!(this.inner.poll(cx)).map_err(Into::into);
        match &out {
            Ok(_) => {
                this.span.record("outcome", "success");
            }
            Err(e) => match Rejection::of(&**e) {
                Some(r) => {
                    this.span.record("outcome", "rejected");
                    this.span.record("rejected_by", r.kind().as_str());
                    if let Some(d) = r.retry_after() {
                        this.span.record("retry_after_ms", crate::duration_ms(d));
                    }
                }
                None => {
                    this.span.record("outcome", "error");
                }
            },
        }
        Poll::Ready(out)
    }
}
