//! The response future of [`RateLimit`](super::RateLimit) and [`KeyedRateLimit`](super::KeyedRateLimit).

use super::{Check, RateLimited, Wait};
use crate::BoxError;
use crate::error::RejectionKind;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// The response future of a rate limiter.
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Running {
            #[pin]
            fut: S::Future,
        },
        // Wait mode only: sleep until governor's next permit, re-check, and
        // give up at `until`. Boxed whole: the wait path is the slow path,
        // and inline it would make every response future (the happy path's)
        // several times larger to build, move and drop.
        Waiting {
            wait: Pin<Box<Waiting<S, Req>>>,
        },
        Rejected {
            retry_after: Duration,
        },
    }
}

pin_project! {
    struct Waiting<S, Req> {
        #[pin]
        sleep: Sleep,
        svc: Option<S>,
        req: Option<Req>,
        check: Check,
        until: Instant,
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn running(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Running { fut },
        }
    }

    pub(crate) fn rejected(retry_after: Duration) -> Self {
        ResponseFuture {
            state: State::Rejected { retry_after },
        }
    }

    pub(crate) fn waiting(
        svc: S,
        req: Req,
        check: Check,
        wait: Duration,
        max_wait: Duration,
    ) -> Self {
        let now = Instant::now();
        ResponseFuture {
            state: State::Waiting {
                wait: Box::pin(Waiting {
                    sleep: tokio::time::sleep_until(crate::later(now, wait)),
                    svc: Some(svc),
                    req: Some(req),
                    check,
                    until: crate::later(now, max_wait),
                }),
            },
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Running { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Rejected { retry_after } => {
                    return Poll::Ready(Err(RateLimited::new(*retry_after).into()));
                }
                StateProj::Waiting { wait } => {
                    let w = wait.as_mut().project();
                    let (mut sleep, svc, req, check, until) =
                        (w.sleep, w.svc, w.req, w.check, w.until);
                    ready!(sleep.as_mut().poll(cx));
                    match check(Wait::Check) {
                        Ok(()) => {
                            let _ = check(Wait::Admitted);
                            let mut s = svc.take().expect("polled after completion");
                            let r = req.take().expect("polled after completion");
                            // `s` was made ready by the caller's `poll_ready` before `call`.
                            let fut = s.call(r);
                            state.set(State::Running { fut });
                        }
                        Err(wait) => {
                            let now = Instant::now();
                            if crate::later(now, wait) > *until {
                                let _ = check(Wait::GaveUp);
                                crate::trace::rejected(
                                    "rate_limit",
                                    RejectionKind::RateLimited,
                                    Some(wait),
                                );
                                state.set(State::Rejected { retry_after: wait });
                            } else {
                                sleep.as_mut().reset(crate::later(now, wait));
                            }
                        }
                    }
                }
            }
        }
    }
}
