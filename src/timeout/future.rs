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
            // True when the enclosing deadline, not our own timeout, set the timer.
            by_deadline: bool,
        },
    }
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
            return Poll::Ready(res.map_err(Into::into));
        }
        if let TimerProj::Unarmed = this.timer.as_mut().project() {
            let own = this.timeout.map(|t| crate::later(Instant::now(), t));
            let (at, by_deadline) = match (own, deadline::current()) {
                (Some(own), Some(d)) if d < own => (d, true),
                (Some(own), _) => (own, false),
                (None, Some(d)) => (d, true),
                (None, None) => return Poll::Pending,
            };
            this.timer.set(Timer::Armed {
                sleep: tokio::time::sleep_until(at),
                by_deadline,
            });
        }
        match this.timer.project() {
            TimerProj::Armed { sleep, by_deadline } => {
                ready!(sleep.poll(cx));
                let err: BoxError = if *by_deadline {
                    crate::trace::rejected("timeout", RejectionKind::DeadlineExceeded, None);
                    DeadlineExceeded::new().into()
                } else {
                    crate::trace::rejected("timeout", RejectionKind::Timeout, None);
                    Elapsed::new(this.timeout.unwrap_or_default()).into()
                };
                Poll::Ready(Err(err))
            }
            TimerProj::Unarmed => unreachable!("the timer was armed above"),
        }
    }
}
