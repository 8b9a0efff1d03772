//! The response future of [`Hedge`](super::Hedge).

use super::latency::LatencyTracker;
use crate::BoxError;
use crate::retry::{Classify, RetryBudget};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// The response future of [`Hedge`](super::Hedge).
    pub struct ResponseFuture<S, Req, F, C> {
        #[pin]
        primary: Option<F>,
        #[pin]
        secondary: Option<F>,
        // Armed on the first Pending: an answer that is ready at once costs
        // no timer.
        #[pin]
        timer: Option<Sleep>,
        hedge: Option<Hedging<S, Req, C>>,
        tracker: Option<(Arc<LatencyTracker>, Instant)>,
    }
}

/// What the second copy needs until it is sent.
pub(super) struct Hedging<S, Req, C> {
    pub(super) req: Req,
    pub(super) svc: S,
    pub(super) delay: Duration,
    pub(super) budget: Option<RetryBudget>,
    pub(super) classify: C,
    /// The call's deadline: no copy is sent once it has passed.
    pub(super) deadline: Option<Instant>,
}

impl<S, Req, F, C> ResponseFuture<S, Req, F, C> {
    pub(super) fn new(
        primary: F,
        hedge: Option<Hedging<S, Req, C>>,
        tracker: Option<(Arc<LatencyTracker>, Instant)>,
    ) -> Self {
        ResponseFuture {
            primary: Some(primary),
            secondary: None,
            timer: None,
            hedge,
            tracker,
        }
    }
}

impl<S, Req, F, C> fmt::Debug for ResponseFuture<S, Req, F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("hedge_pending", &self.hedge.is_some())
            .field("hedged", &self.secondary.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, Req, F, T, E, C> Future for ResponseFuture<S, Req, F, C>
where
    S: Service<Req, Future = F, Response = T, Error = E>,
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    C: Classify<Req, T>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // The first answer wins and the other copy is dropped (cancelled)
            // with this future. A copy that fails while the other is still in
            // flight does not end the call: the other may yet succeed.
            if let Some(p) = this.primary.as_mut().as_pin_mut()
                && let Poll::Ready(res) = p.poll(cx)
            {
                if res.is_err() && this.secondary.is_some() {
                    this.primary.set(None);
                } else {
                    return Poll::Ready(finish(this.tracker, res));
                }
            }
            if let Some(s) = this.secondary.as_mut().as_pin_mut()
                && let Poll::Ready(res) = s.poll(cx)
            {
                if res.is_err() && this.primary.is_some() {
                    this.secondary.set(None);
                } else {
                    return Poll::Ready(finish(this.tracker, res));
                }
            }
            let Some(h) = this.hedge.as_mut() else {
                return Poll::Pending;
            };
            if this.timer.is_none() {
                this.timer.set(Some(tokio::time::sleep(h.delay)));
            }
            let timer = this.timer.as_mut().as_pin_mut().expect("armed above");
            if timer.poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Not past the call's deadline (the copy would be cut off at
            // once), and not with a body that can no longer be replayed.
            let skip = if h.deadline.is_some_and(|d| Instant::now() >= d) {
                Some("deadline")
            } else if !h.classify.can_send(&h.req) {
                Some("not_replayable")
            } else {
                None
            };
            if let Some(reason) = skip {
                crate::trace::hedge_skipped(reason);
                *this.hedge = None;
                return Poll::Pending;
            }
            match h.svc.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => {
                    crate::trace::hedge_skipped("not_ready");
                    *this.hedge = None;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {
                    // Withdrawn once the copy can go, so a copy that is
                    // never sent costs no token.
                    if let Some(b) = h.budget.take()
                        && !b.withdraw()
                    {
                        crate::trace::hedge_skipped("budget");
                        *this.hedge = None;
                        return Poll::Pending;
                    }
                    let Hedging { req, mut svc, .. } = this.hedge.take().expect("present");
                    crate::trace::hedge_sent();
                    this.secondary.set(Some(svc.call(req)));
                    // Loop to poll the second copy once, registering its waker.
                }
            }
        }
    }
}

fn finish<T, E: Into<BoxError>>(
    tracker: &mut Option<(Arc<LatencyTracker>, Instant)>,
    res: Result<T, E>,
) -> Result<T, BoxError> {
    if res.is_ok()
        && let Some((t, start)) = tracker.take()
    {
        t.record(start.elapsed());
    }
    res.map_err(Into::into)
}
