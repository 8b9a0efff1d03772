//! The response future of [`Deadline`](super::Deadline).

use super::{CURRENT, DeadlineExceeded};
use crate::BoxError;
use crate::error::RejectionKind;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::time::{Instant, Sleep};

pin_project! {
    /// The response future of [`Deadline`](super::Deadline).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        Running {
            #[pin]
            inner: F,
            // Armed only once the inner future returns Pending: a call that
            // answers at once never registers a timer.
            #[pin]
            sleep: Option<Sleep>,
            at: Instant,
        },
        // The deadline had passed before the call: the inner service was not called.
        Expired,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, at: Instant) -> Self {
        ResponseFuture {
            state: State::Running {
                inner,
                sleep: None,
                at,
            },
        }
    }

    pub(crate) fn expired() -> Self {
        ResponseFuture {
            state: State::Expired,
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
        match self.project().state.project() {
            StateProj::Expired => Poll::Ready(Err(DeadlineExceeded::new().into())),
            StateProj::Running {
                inner,
                mut sleep,
                at,
            } => {
                // Inner layers see the deadline while they run (see `current()`).
                if let Poll::Ready(res) = CURRENT.sync_scope(*at, || inner.poll(cx)) {
                    return Poll::Ready(res.map_err(Into::into));
                }
                if sleep.is_none() {
                    sleep.set(Some(tokio::time::sleep_until(*at)));
                }
                ready!(sleep.as_pin_mut().expect("armed above").poll(cx));
                crate::trace::rejected("deadline", RejectionKind::DeadlineExceeded, None);
                Poll::Ready(Err(DeadlineExceeded::new().into()))
            }
        }
    }
}
