//! The response future of [`Timeout`](super::Timeout).

use super::Elapsed;
use crate::BoxError;
use crate::deadline::{self, DeadlineExceeded};
use crate::error::RejectionKind;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

pin_project! {
    /// The response future of [`Timeout`](super::Timeout).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        timer: Timer,
        // None: no attempt timeout of our own (a preset stage turned off);
        // only an enclosing deadline can still arm the timer.
        timeout: Option<Duration>,
    }
}

pin_project! {
    #[project = TimerProj]
    #[derive(Debug)]
    enum Timer {
        // No timer until the inner future first returns Pending: a service that
        // answers at once pays for no clock read and no timer registration.
        Unarmed,
        Armed {
            #[pin]
            sleep: Sleep,
            // Who set the timer, and what its firing means.
            fires: Fires,
        },
    }
}

/// What the armed timer means when it fires.
#[derive(Clone, Copy, Debug)]
enum Fires {
    /// Our own timeout: [`Elapsed`].
    Own,
    /// The enclosing deadline, well before our own timeout:
    /// [`DeadlineExceeded`], which says nothing about the dependency.
    Deadline,
    /// The enclosing deadline, but the attempt still had nearly all of its
    /// own timeout (`granted`): [`DeadlineExceeded`] caused by [`Elapsed`],
    /// which a breaker counts as the dependency's failure.
    DeadlineAfterFullAttempt { granted: Duration },
}

/// How much of its own timeout an attempt may lose to the deadline and still
/// count as having had the whole of it: a tenth.
///
/// An attempt timeout equal to the deadline is the common case. The attempt
/// starts a little after the deadline was stamped (the layers between them,
/// a first attempt that failed fast), so the deadline's timer is always the
/// one that fires. Without this margin a hung dependency would never open
/// the breaker in that set-up.
fn nearly_whole(own: Duration, granted: Duration) -> bool {
    granted >= own - own / 10
}

/// An inner layer's deadline error that arrives when our own timer is due
/// is the one our timer would have given (with the inner error kept as the
/// cause). A gRPC client that was sent the time left (`grpc-timeout`,
/// rounded down) runs its own timer to the same deadline, and since the
/// inner future is polled first, its error wins the tie; without this, a
/// hung dependency behind such a client would never be counted in the
/// set-up `nearly_whole` is for.
fn ours_if_at_our_time(timer: Pin<&mut Timer>, e: BoxError) -> BoxError {
    if let TimerProj::Armed {
        sleep,
        fires: Fires::DeadlineAfterFullAttempt { granted },
    } = timer.project()
        && Instant::now() >= sleep.deadline()
        && crate::error::find::<DeadlineExceeded>(&*e).is_some()
        && crate::error::find::<Elapsed>(&*e).is_none()
    {
        return DeadlineExceeded::caused_by(Elapsed::caused_by(*granted, e).into()).into();
    }
    e
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, timeout: Option<Duration>) -> Self {
        ResponseFuture {
            inner,
            timer: Timer::Unarmed,
            timeout,
        }
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(res) = this.inner.poll(cx) {
            return Poll::Ready(res.map_err(|e| ours_if_at_our_time(this.timer, e.into())));
        }
        if let TimerProj::Unarmed = this.timer.as_mut().project() {
            // The clock is read only with a timeout of our own.
            let own = this.timeout.map(|t| {
                let now = Instant::now();
                (t, now, crate::later(now, t))
            });
            let (at, fires) = match (own, deadline::current()) {
                // At the same instant, the deadline: the caller's time is up.
                (Some((t, now, own)), Some(d)) if d <= own => {
                    let granted = d.saturating_duration_since(now);
                    if nearly_whole(t, granted) {
                        (d, Fires::DeadlineAfterFullAttempt { granted })
                    } else {
                        (d, Fires::Deadline)
                    }
                }
                (Some((_, _, own)), _) => (own, Fires::Own),
                (None, Some(d)) => (d, Fires::Deadline),
                (None, None) => return Poll::Pending,
            };
            this.timer.set(Timer::Armed {
                sleep: tokio::time::sleep_until(at),
                fires,
            });
        }
        match this.timer.project() {
            TimerProj::Armed { sleep, fires } => {
                ready!(sleep.poll(cx));
                let err: BoxError = match *fires {
                    Fires::Own => {
                        crate::trace::rejected("timeout", RejectionKind::Timeout, None);
                        Elapsed::new(this.timeout.unwrap_or_default()).into()
                    }
                    Fires::Deadline => {
                        crate::trace::rejected("timeout", RejectionKind::DeadlineExceeded, None);
                        DeadlineExceeded::new().into()
                    }
                    Fires::DeadlineAfterFullAttempt { granted } => {
                        crate::trace::rejected("timeout", RejectionKind::DeadlineExceeded, None);
                        DeadlineExceeded::caused_by(Elapsed::new(granted).into()).into()
                    }
                };
                Poll::Ready(Err(err))
            }
            TimerProj::Unarmed => unreachable!("the timer was armed above"),
        }
    }
}
