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
    /// and a half-open probe gives its slot back so another caller can probe;
    /// but with slow-call detection on (and a window, not the
    /// consecutive-failures mode), a call dropped (or cut by the caller's
    /// deadline) before the dependency answered, after running for
    /// `slow_call_duration`, counts as a slow call.
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
    /// No answer has come from the dependency yet: set until the inner
    /// future returns, and kept when it returns `DeadlineExceeded` (the
    /// caller's budget cut the call). See `Breaker::record_unanswered`.
    unanswered: bool,
}

impl Call {
    pub(crate) fn new(lane: Arc<Lane>, ticket: Ticket) -> Self {
        Call {
            lane,
            ticket,
            unanswered: true,
        }
    }

    /// The inner future returned `result`: an answer, unless the caller's
    /// deadline cut the call.
    #[inline]
    pub(crate) fn returned<T>(&mut self, result: &Result<T, BoxError>) {
        self.unanswered = match result {
            Ok(_) => false,
            Err(e) => cut_by_deadline(e),
        };
    }

    /// Records the outcome; the probe slot, if any, is then spent.
    #[inline]
    pub(crate) fn finish(mut self, outcome: Outcome) {
        if outcome == Outcome::Ignore && self.unanswered {
            self.lane.record_unanswered(&self.ticket);
        } else {
            let now = self
                .lane
                .breaker
                .needs_clock(&self.ticket)
                .then(Instant::now);
            self.lane.record(&self.ticket, outcome, now);
        }
        // Recorded: dropping `self` must not record again.
        self.ticket.spend();
        self.unanswered = false;
    }
}

/// A `DeadlineExceeded` that the attempt timeout did not cause: the
/// caller's budget ran out while the dependency had not answered.
#[cold]
fn cut_by_deadline(e: &BoxError) -> bool {
    crate::error::Rejection::of(&**e)
        .is_some_and(|r| r.kind() == crate::error::RejectionKind::DeadlineExceeded)
        && crate::error::find::<crate::timeout::Elapsed>(&**e).is_none()
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.unanswered {
            // Dropped before the dependency answered (the caller's deadline
            // or the caller itself gave up): slow if it ran long enough, and
            // otherwise nothing (a probe gives its slot back).
            self.lane.record_unanswered(&self.ticket);
        } else if self.ticket.is_probe() {
            // Answered, but the outcome was never told (a streaming
            // classifier's body dropped before its end): give the slot back.
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
                let mut call = call.take().expect("polled after completion");
                call.returned(&out);
                Poll::Ready(this.classifier.classify_stream(out, Completion::new(call)))
            }
            KindProj::Rejected { retry_after } => {
                Poll::Ready(Err(CircuitOpen::new(*retry_after).into()))
            }
        }
    }
}
