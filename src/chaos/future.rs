//! The response future of [`Chaos`](super::Chaos).

use super::Shared;
use crate::BoxError;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::time::{Instant, Sleep};
use tower::Service;

pin_project! {
    /// The response future of [`Chaos`](super::Chaos).
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: State<S, Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S: Service<Req>, Req> {
        Calling {
            #[pin]
            fut: S::Future,
        },
        // Delayed or hanging until a known instant, then `next`.
        Waiting {
            #[pin]
            sleep: Sleep,
            next: Option<Next<S, Req>>,
        },
        Ready {
            out: Option<Result<S::Response, BoxError>>,
        },
        // A hang in an open-ended phase: never completes.
        Hanging,
    }
}

enum Next<S: Service<Req>, Req> {
    Call {
        svc: S,
        req: Req,
        shared: Arc<Shared>,
    },
    Reply(Result<S::Response, BoxError>),
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn calling(fut: S::Future) -> Self {
        ResponseFuture {
            state: State::Calling { fut },
        }
    }

    pub(crate) fn call_at(at: Instant, svc: S, req: Req, shared: Arc<Shared>) -> Self {
        ResponseFuture {
            state: State::Waiting {
                sleep: tokio::time::sleep_until(at),
                next: Some(Next::Call { svc, req, shared }),
            },
        }
    }

    pub(crate) fn reply_at(at: Instant, out: Result<S::Response, BoxError>) -> Self {
        let state = if at <= Instant::now() {
            State::Ready { out: Some(out) }
        } else {
            State::Waiting {
                sleep: tokio::time::sleep_until(at),
                next: Some(Next::Reply(out)),
            }
        };
        ResponseFuture { state }
    }

    pub(crate) fn hang() -> Self {
        ResponseFuture {
            state: State::Hanging,
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
                StateProj::Calling { fut } => {
                    return fut.poll(cx).map_err(Into::into);
                }
                StateProj::Ready { out } => {
                    return Poll::Ready(out.take().expect("polled after completion"));
                }
                StateProj::Hanging => return Poll::Pending,
                StateProj::Waiting { sleep, next } => {
                    ready!(sleep.poll(cx));
                    match next.take().expect("polled after completion") {
                        Next::Reply(out) => return Poll::Ready(out),
                        Next::Call {
                            mut svc,
                            req,
                            shared,
                        } => {
                            shared.stats.passed();
                            // `svc` was made ready by the caller's `poll_ready` before `call`.
                            let fut = svc.call(req);
                            state.set(State::Calling { fut });
                        }
                    }
                }
            }
        }
    }
}
