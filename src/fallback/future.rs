//! The response future of [`Fallback`](super::Fallback).

use super::{Predicate, Recover};
use crate::BoxError;
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

pin_project! {
    /// The response future of [`Fallback`](super::Fallback).
    pub struct ResponseFuture<F, R: Recover<Req, Resp>, P, Req, Resp> {
        #[pin]
        state: State<F, R, P, Req, Resp>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, R: Recover<Req, Resp>, P, Req, Resp> {
        Primary {
            #[pin]
            fut: F,
            saved: Option<R::Saved>,
            recover: R,
            predicate: P,
        },
        Recovering {
            #[pin]
            fut: R::Future,
        },
    }
}

impl<F, R: Recover<Req, Resp>, P, Req, Resp> ResponseFuture<F, R, P, Req, Resp> {
    /// Answers with the fallback's future at once.
    pub(crate) fn recovering(fut: R::Future) -> Self {
        ResponseFuture {
            state: State::Recovering { fut },
        }
    }

    pub(crate) fn new(fut: F, saved: R::Saved, recover: R, predicate: P) -> Self {
        ResponseFuture {
            state: State::Primary {
                fut,
                saved: Some(saved),
                recover,
                predicate,
            },
        }
    }
}

impl<F, R: Recover<Req, Resp>, P, Req, Resp> fmt::Debug for ResponseFuture<F, R, P, Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, E, R, P, Req, Resp> Future for ResponseFuture<F, R, P, Req, Resp>
where
    F: Future<Output = Result<Resp, E>>,
    E: Into<BoxError>,
    R: Recover<Req, Resp>,
    P: Predicate,
{
    type Output = Result<Resp, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Primary {
                    fut,
                    saved,
                    recover,
                    predicate,
                } => {
                    let err: BoxError = match ready!(fut.poll(cx)) {
                        Ok(res) => return Poll::Ready(Ok(res)),
                        Err(e) => e.into(),
                    };
                    if !predicate.select(&*err) {
                        return Poll::Ready(Err(err));
                    }
                    tracing::debug!(
                        target: "tower_firebreak",
                        layer = "fallback",
                        error = %err,
                        "answering with the fallback"
                    );
                    let saved = saved.take().expect("polled after completion");
                    let fut = recover.recover(saved, err);
                    state.set(State::Recovering { fut });
                }
                StateProj::Recovering { fut } => return fut.poll(cx),
            }
        }
    }
}

pin_project! {
    /// A future whose error is converted into [`BoxError`].
    #[derive(Debug)]
    pub struct MapErr<F> {
        #[pin]
        inner: F,
    }
}

impl<F> MapErr<F> {
    pub(crate) fn new(inner: F) -> Self {
        MapErr { inner }
    }
}

impl<F, T, E> Future for MapErr<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(Into::into)
    }
}
