//! The response future of [`RateLimit`](super::RateLimit) and [`KeyedRateLimit`](super::KeyedRateLimit).

use super::{Check, RateLimited, Wait};
use crate::BoxError;
use crate::error::RejectionKind;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
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
        // Wait mode only: wait for the turn in line, then sleep until
        // governor's next permit, re-check, and give up at `until`. Boxed
        // whole: the wait path is the slow path, and inline it would make
        // every response future (the happy path's) several times larger to
        // build, move and drop.
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
        // Until the turn comes, `until`; then the next check.
        #[pin]
        sleep: Sleep,
        svc: Option<S>,
        req: Option<Req>,
        check: InLine,
        until: Instant,
        // When the first check is due once the turn comes.
        due: Instant,
        turn: Turn,
    }
}

type Acquire =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send + Sync>>;

/// A waiting call's place: behind others, or first in line (holding the
/// line's one permit, given back when the call leaves).
enum Turn {
    Queued(Acquire),
    // Held for its drop, which hands the turn to the next in line.
    First(#[allow(dead_code)] OwnedSemaphorePermit),
}

/// The call's [`Check`]; dropping it takes the call out of its line.
struct InLine(Check);

impl Drop for InLine {
    fn drop(&mut self) {
        let _ = (self.0)(Wait::Leave);
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

    /// A call in line (`check` already counts it there); its first check
    /// is due `wait` from now, once its turn comes.
    pub(crate) fn waiting(
        svc: S,
        req: Req,
        check: Check,
        turn: Arc<Semaphore>,
        wait: Duration,
        max_wait: Duration,
    ) -> Self {
        let now = Instant::now();
        let (due, until) = (crate::later(now, wait), crate::later(now, max_wait));
        // First in line at once, or queued (in the order of first polls).
        let (turn, sleep) = match turn.clone().try_acquire_owned() {
            Ok(p) => (Turn::First(p), due),
            Err(_) => (Turn::Queued(Box::pin(turn.acquire_owned())), until),
        };
        ResponseFuture {
            state: State::Waiting {
                wait: Box::pin(Waiting {
                    sleep: tokio::time::sleep_until(sleep),
                    svc: Some(svc),
                    req: Some(req),
                    check: InLine(check),
                    until,
                    due,
                    turn,
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
                    let (mut sleep, svc, req, until) = (w.sleep, w.svc, w.req, w.until);
                    let check = &w.check.0;
                    if let Turn::Queued(acquire) = w.turn {
                        match acquire.as_mut().poll(cx) {
                            Poll::Ready(Ok(first)) => {
                                *w.turn = Turn::First(first);
                                sleep.as_mut().reset(*w.due);
                            }
                            // The line's semaphore is never closed; were it,
                            // the call would wait out `until`.
                            Poll::Ready(Err(_)) => {
                                *w.turn = Turn::Queued(Box::pin(std::future::pending()));
                                continue;
                            }
                            Poll::Pending => {
                                ready!(sleep.as_mut().poll(cx));
                                let wait = check(Wait::Behind).err().unwrap_or_default();
                                let retry_after = gave_up(check, wait);
                                state.set(State::Rejected { retry_after });
                                continue;
                            }
                        }
                    }
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
                                let retry_after = gave_up(check, wait);
                                state.set(State::Rejected { retry_after });
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

/// A waiting call gives up: counted and traced; its `retry_after`.
fn gave_up(check: &Check, retry_after: Duration) -> Duration {
    let _ = check(Wait::GaveUp);
    crate::trace::rejected("rate_limit", RejectionKind::RateLimited, Some(retry_after));
    retry_after
}
