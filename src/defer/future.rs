//! The response future of [`Defer`](super::Defer).

use super::{Cause, DeferBody, Settings, body_too_slow, defer_request, too_large, unreadable_body};
use crate::BoxError;
use crate::queue::Queue;
use bytes::Bytes;
use http_body_util::combinators::Collect;
use http_body_util::{Either, Full, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::time::Sleep;
use tower::Service;

type Answer = Pin<Box<dyn Future<Output = http::Response<DeferBody>> + Send>>;

pin_project! {
    /// The response future of [`Defer`](super::Defer).
    ///
    /// It buffers the body, calls the inner service, and on a failure that
    /// is deferred, stores the job (the only boxed step: the queue's future
    /// cannot be named).
    pub struct ResponseFuture<S, B, Q>
    where
        S: Service<http::Request<Full<Bytes>>>,
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, B, Q>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, Q>
    where
        S: Service<http::Request<Full<Bytes>>>,
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        Buffering {
            #[pin]
            collect: Collect<Limited<B>>,
            // The body timeout, armed only once the body is not all there:
            // a body that is already complete costs no timer.
            #[pin]
            timer: Option<Sleep>,
            parts: Option<http::request::Parts>,
            // What the deferrable predicate said, in `call`.
            deferrable: bool,
            svc: Option<S>,
            queue: Arc<Q>,
            settings: Arc<Settings>,
        },
        Calling {
            #[pin]
            fut: S::Future,
            // The request to store, kept only when it may be deferred.
            saved: Option<http::Request<Bytes>>,
            queue: Arc<Q>,
            settings: Arc<Settings>,
        },
        Deferring {
            fut: Answer,
        },
        Ready {
            res: Option<http::Response<DeferBody>>,
        },
    }
}

impl<S, B, Q> ResponseFuture<S, B, Q>
where
    S: Service<http::Request<Full<Bytes>>>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    pub(crate) fn buffering(
        parts: http::request::Parts,
        deferrable: bool,
        collect: Collect<Limited<B>>,
        svc: S,
        queue: Arc<Q>,
        settings: Arc<Settings>,
    ) -> Self {
        ResponseFuture {
            state: State::Buffering {
                collect,
                timer: None,
                parts: Some(parts),
                deferrable,
                svc: Some(svc),
                queue,
                settings,
            },
        }
    }

    pub(crate) fn ready(res: http::Response<DeferBody>) -> Self {
        ResponseFuture {
            state: State::Ready { res: Some(res) },
        }
    }
}

impl<S, B, Q> fmt::Debug for ResponseFuture<S, B, Q>
where
    S: Service<http::Request<Full<Bytes>>>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Buffering { .. } => "buffering",
            State::Calling { .. } => "calling",
            State::Deferring { .. } => "deferring",
            State::Ready { .. } => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, Q, RB> Future for ResponseFuture<S, B, Q>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
    Q: Queue,
{
    type Output = Result<http::Response<Either<RB, DeferBody>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Buffering {
                    collect,
                    mut timer,
                    parts,
                    deferrable,
                    svc,
                    queue,
                    settings,
                } => {
                    let polled = collect.poll(cx);
                    let Poll::Ready(polled) = polled else {
                        if timer.is_none() {
                            timer.set(Some(tokio::time::sleep(settings.body_timeout)));
                        }
                        ready!(timer.as_pin_mut().expect("armed above").poll(cx));
                        let headers = &parts.as_ref().expect("polled after completion").headers;
                        let res = body_too_slow(settings.body_timeout, headers);
                        return Poll::Ready(Ok(res.map(Either::Right)));
                    };
                    let body = match polled {
                        Ok(collected) => collected.to_bytes(),
                        Err(e) => {
                            let headers = &parts.as_ref().expect("polled after completion").headers;
                            // Our limit, or an outer one (tower-http's
                            // `RequestBodyLimit`, whose error axum wraps).
                            let res = if crate::error::find::<LengthLimitError>(&*e).is_some() {
                                too_large(settings.max_body, headers)
                            } else {
                                unreadable_body(&*e, headers)
                            };
                            return Poll::Ready(Ok(res.map(Either::Right)));
                        }
                    };
                    let parts = parts.take().expect("polled after completion");
                    let saved = deferrable.then(|| {
                        let mut saved = http::Request::new(body.clone());
                        *saved.method_mut() = parts.method.clone();
                        *saved.uri_mut() = parts.uri.clone();
                        *saved.version_mut() = parts.version;
                        *saved.headers_mut() = parts.headers.clone();
                        saved
                    });
                    let req = http::Request::from_parts(parts, Full::new(body));
                    let fut = svc.take().expect("polled after completion").call(req);
                    State::Calling {
                        fut,
                        saved,
                        queue: queue.clone(),
                        settings: settings.clone(),
                    }
                }
                StateProj::Calling {
                    fut,
                    saved,
                    queue,
                    settings,
                } => {
                    let cause = match ready!(fut.poll(cx)) {
                        Ok(res) => {
                            if saved.is_none()
                                || !(settings.failed_response)(res.status(), res.headers())
                            {
                                return Poll::Ready(Ok(res.map(Either::Left)));
                            }
                            Cause::response(res.status(), res.headers())
                        }
                        Err(e) => {
                            let e: BoxError = e.into();
                            if saved.is_none() || !(settings.failed_error)(&*e) {
                                return Poll::Ready(Err(e));
                            }
                            Cause::error(&*e)
                        }
                    };
                    let req = saved.take().expect("checked above");
                    State::Deferring {
                        fut: Box::pin(defer_request(queue.clone(), settings.clone(), req, cause)),
                    }
                }
                StateProj::Deferring { fut } => {
                    let res = ready!(fut.as_mut().poll(cx));
                    return Poll::Ready(Ok(res.map(Either::Right)));
                }
                StateProj::Ready { res } => {
                    let res = res.take().expect("polled after completion");
                    return Poll::Ready(Ok(res.map(Either::Right)));
                }
            };
            this.state.set(next);
        }
    }
}
