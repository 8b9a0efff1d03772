//! The response future of [`Bulkhead`](super::Bulkhead) and [`KeyedBulkhead`](super::KeyedBulkhead).

use super::{BulkheadFull, Permit, Slots, wait_for_slot};
use crate::BoxError;
use crate::error::RejectionKind;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Sleep;
use tower::Service;

type Acquire = Pin<Box<dyn Future<Output = Permit> + Send + Sync>>;

pin_project! {
    /// The response future of a bulkhead.
    ///
    /// It holds the call's slot: dropping it releases the slot.
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
            permit: Option<Permit>,
        },
        // Contended path only: the acquire future is boxed, the happy path never is.
        Waiting {
            acquire: Acquire,
            #[pin]
            sleep: Sleep,
            svc: Option<S>,
            req: Option<Req>,
            max_concurrent: usize,
        },
        Full {
            max_concurrent: usize,
        },
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn running(fut: S::Future, permit: Permit) -> Self {
        ResponseFuture {
            state: State::Running {
                fut,
                permit: Some(permit),
            },
        }
    }

    pub(crate) fn full(max_concurrent: usize) -> Self {
        ResponseFuture {
            state: State::Full { max_concurrent },
        }
    }

    pub(crate) fn waiting(svc: S, req: Req, slots: Arc<Slots>, max_wait: Duration) -> Self {
        let max_concurrent = slots.max;
        ResponseFuture {
            state: State::Waiting {
                acquire: Box::pin(wait_for_slot(slots)),
                sleep: tokio::time::sleep(max_wait),
                svc: Some(svc),
                req: Some(req),
                max_concurrent,
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
                StateProj::Running { fut, permit } => {
                    let out = ready!(fut.poll(cx));
                    // Free the slot now, not when the caller drops the future.
                    permit.take();
                    return Poll::Ready(out.map_err(Into::into));
                }
                StateProj::Full { max_concurrent } => {
                    return Poll::Ready(Err(BulkheadFull::new(*max_concurrent).into()));
                }
                StateProj::Waiting {
                    acquire,
                    sleep,
                    svc,
                    req,
                    max_concurrent,
                } => {
                    let permit = match acquire.as_mut().poll(cx) {
                        Poll::Ready(p) => p,
                        Poll::Pending => {
                            ready!(sleep.poll(cx));
                            crate::trace::rejected("bulkhead", RejectionKind::BulkheadFull, None);
                            let m = *max_concurrent;
                            state.set(State::Full { max_concurrent: m });
                            continue;
                        }
                    };
                    let mut s = svc.take().expect("polled after completion");
                    let r = req.take().expect("polled after completion");
                    // `s` was made ready by the caller's `poll_ready` before `call`.
                    let fut = s.call(r);
                    state.set(State::Running {
                        fut,
                        permit: Some(permit),
                    });
                }
            }
        }
    }
}
