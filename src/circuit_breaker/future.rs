//! The response future of [`CircuitBreaker`](super::CircuitBreaker).

use super::CircuitOpen;
use super::breaker::{Lane, Ticket};
use crate::BoxError;
use crate::classify::{ClassifyStream, Completion, Outcome};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Instant;

pin_project! {
    /// The response future of a circuit breaker.
    ///
    /// An admitted call records its outcome when the inner future completes
    /// (or, with a [`ClassifyStream`] such as the gRPC classifier, when the
    /// response body ends). Dropping the future before then records nothing,
    /// and a half-open probe gives its slot back so another caller can probe.
    pub struct ResponseFuture<F, C, Res> {
        #[pin]
        kind: Kind<F>,
        _res: PhantomData<fn() -> Res>,
        classifier: C,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called {
            #[pin]
            fut: F,
            call: Option<Call>,
        },
        Rejected {
            retry_after: Duration,
        },
    }
}

/// An admitted call's claim on the breaker.
pub(crate) struct Call {
    lane: Arc<Lane>,
    ticket: Ticket,
}

impl Call {
    pub(crate) fn new(lane: Arc<Lane>, ticket: Ticket) -> Self {
        Call { lane, ticket }
    }

    /// Records the outcome; the probe slot, if any, is then spent.
    #[inline]
    pub(crate) fn finish(mut self, outcome: Outcome) {
        let now = self
            .lane
            .breaker
            .needs_clock(&self.ticket)
            .then(Instant::now);
        self.lane.record(&self.ticket, outcome, now);
        // Recorded: dropping `self` must not give the probe slot back.
        self.ticket.spend();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A probe still marked here never completed (its future was
        // dropped): give the slot back. Completion clears the mark.
        if self.ticket.is_probe() {
            self.lane.record(&self.ticket, Outcome::Ignore, None);
        }
    }
}

impl<F, C, Res> ResponseFuture<F, C, Res> {
    pub(crate) fn called(fut: F, call: Call, classifier: C) -> Self {
        ResponseFuture {
            kind: Kind::Called {
                fut,
                call: Some(call),
            },
            _res: PhantomData,
            classifier,
        }
    }

    pub(crate) fn rejected(retry_after: Duration, classifier: C) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { retry_after },
            _res: PhantomData,
            classifier,
        }
    }
}

impl<F, C, Res> fmt::Debug for ResponseFuture<F, C, Res> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C, Res, E> Future for ResponseFuture<F, C, Res>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    C: ClassifyStream<Res>,
{
    type Output = Result<C::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Called { fut, call } => {
                let out = ready!(fut.poll(cx)).map_err(Into::into);
                let call = call.take().expect("polled after completion");
                Poll::Ready(this.classifier.classify_stream(out, Completion::new(call)))
            }
            KindProj::Rejected { retry_after } => {
                Poll::Ready(Err(CircuitOpen::new(*retry_after).into()))
            }
        }
    }
}
