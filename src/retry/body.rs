//! Making HTTP requests replayable by buffering their bodies.

use crate::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tower::{Layer, Service};

/// A request body that was buffered for replay, or, when it was over the
/// limit, the part that was read followed by the rest of the stream.
///
/// Made by [`BufferRequestBody`]. A buffered body can be sent again (see
/// [`ReplayableBody`](super::ReplayableBody)); a body over the limit goes
/// once.
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    Buffered {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Partial {
        head: Option<Bytes>,
        rest: B,
    },
}

impl<B> ReplayBody<B> {
    /// A body of `data`, replayable.
    pub fn buffered(data: Bytes) -> Self {
        ReplayBody {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers: None,
            },
        }
    }

    /// Whether this body can be sent again.
    pub fn is_replayable(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }

    /// A copy to send again; `None` for a body over the limit.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            Kind::Buffered { data, trailers } => Some(ReplayBody {
                kind: Kind::Buffered {
                    data: data.clone(),
                    trailers: trailers.clone(),
                },
            }),
            Kind::Partial { .. } => None,
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Buffered { data, .. } => f
                .debug_struct("ReplayBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Partial { head, .. } => f
                .debug_struct("ReplayBody::Partial")
                .field("head_len", &head.as_ref().map_or(0, Bytes::len))
                .finish_non_exhaustive(),
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Buffered { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Kind::Partial { head, rest } => {
                if let Some(h) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(h))));
                }
                match ready!(Pin::new(rest).poll_frame(cx)) {
                    None => Poll::Ready(None),
                    Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                    Some(Ok(frame)) => Poll::Ready(Some(Ok(
                        frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))
                    ))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Partial { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Partial { head, rest } => {
                let h = head.as_ref().map_or(0, |d| d.len() as u64);
                let r = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(r.lower().saturating_add(h));
                if let Some(u) = r.upper() {
                    hint.set_upper(u.saturating_add(h));
                }
                hint
            }
        }
    }
}

/// Buffers each request body, up to a limit, so that an inner
/// [`Retry`](super::Retry) can send it again.
///
/// The inner service gets `http::Request<ReplayBody<B>>`. A body within the
/// limit is read whole before the inner service is called (one copy, none
/// when it arrives in one chunk). A body whose size hint is over the limit is
/// passed on at once, and one that turns out to be larger is passed on as the
/// part already read followed by the rest of the stream; either way the
/// request goes once, unretried, and a `tracing` event (`debug`) says why.
///
/// The body must be `Unpin`; wrap another body in `Box::pin`.
///
/// # Readiness
///
/// `poll_ready` is the inner service's. Since the inner call happens after
/// the body has been read, `call` moves the ready inner service into the
/// response future and keeps a fresh clone, so the inner service must be
/// `Clone`.
#[derive(Clone, Debug)]
pub struct BufferRequestBody<S> {
    inner: S,
    limit: usize,
}

impl<S> BufferRequestBody<S> {
    /// The default limit: 64 KiB, like linkerd's `ReplayBody`.
    pub const DEFAULT_LIMIT: usize = 64 * 1024;

    /// Buffers bodies of up to `limit` bytes before calling `inner`.
    pub fn new(inner: S, limit: usize) -> Self {
        BufferRequestBody { inner, limit }
    }

    /// A [`BufferRequestBodyLayer`] with the default limit.
    pub fn layer() -> BufferRequestBodyLayer {
        BufferRequestBodyLayer::new()
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Applies [`BufferRequestBody`].
#[derive(Clone, Copy, Debug)]
pub struct BufferRequestBodyLayer {
    limit: usize,
}

impl BufferRequestBodyLayer {
    /// A layer with the default limit of 64 KiB.
    pub const fn new() -> Self {
        BufferRequestBodyLayer {
            limit: BufferRequestBody::<()>::DEFAULT_LIMIT,
        }
    }

    /// The largest body, in bytes, that is buffered for replay.
    pub const fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl Default for BufferRequestBodyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for BufferRequestBodyLayer {
    type Service = BufferRequestBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferRequestBody::new(inner, self.limit)
    }
}

impl<S, B> Service<http::Request<B>> for BufferRequestBody<S>
where
    S: Service<http::Request<ReplayBody<B>>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BufferFuture<S, B, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        if body.size_hint().lower() > self.limit as u64 {
            crate::trace::not_replayable("buffer_request_body", self.limit);
            let body = ReplayBody {
                kind: Kind::Partial {
                    head: None,
                    rest: body,
                },
            };
            let fut = self.inner.call(http::Request::from_parts(parts, body));
            return BufferFuture {
                state: State::Calling { fut },
            };
        }
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        BufferFuture {
            state: State::Collecting {
                parts: Some(parts),
                body: Some(body),
                chunks: Vec::new(),
                len: 0,
                limit: self.limit,
                svc: Some(svc),
            },
        }
    }
}

pin_project! {
    /// The response future of [`BufferRequestBody`].
    pub struct BufferFuture<S, B, F> {
        #[pin]
        state: State<S, B, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Collecting {
            parts: Option<http::request::Parts>,
            body: Option<B>,
            chunks: Vec<Bytes>,
            len: usize,
            limit: usize,
            svc: Option<S>,
        },
        Calling {
            #[pin]
            fut: F,
        },
    }
}

impl<S, B, F> fmt::Debug for BufferFuture<S, B, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferFuture").finish_non_exhaustive()
    }
}

fn concat(chunks: &mut Vec<Bytes>) -> Option<Bytes> {
    match chunks.len() {
        0 => None,
        1 => chunks.pop(),
        _ => {
            let total = chunks.iter().map(Bytes::len).sum();
            let mut buf = BytesMut::with_capacity(total);
            for c in chunks.drain(..) {
                buf.extend_from_slice(&c);
            }
            Some(buf.freeze())
        }
    }
}

impl<S, B, F, T, E> Future for BufferFuture<S, B, F>
where
    S: Service<http::Request<ReplayBody<B>>, Future = F, Response = T, Error = E>,
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Calling { fut } => return fut.poll(cx).map_err(Into::into),
                StateProj::Collecting {
                    parts,
                    body,
                    chunks,
                    len,
                    limit,
                    svc,
                } => {
                    let b = body.as_mut().expect("polled after completion");
                    let kind = match ready!(Pin::new(b).poll_frame(cx)) {
                        Some(Err(e)) => return Poll::Ready(Err(e.into())),
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(mut data) => {
                                let chunk = data.copy_to_bytes(data.remaining());
                                *len += chunk.len();
                                if !chunk.is_empty() {
                                    chunks.push(chunk);
                                }
                                if *len <= *limit {
                                    continue;
                                }
                                crate::trace::not_replayable("buffer_request_body", *limit);
                                Kind::Partial {
                                    head: concat(chunks),
                                    rest: body.take().expect("body present"),
                                }
                            }
                            Err(frame) => Kind::Buffered {
                                data: concat(chunks),
                                trailers: frame.into_trailers().ok(),
                            },
                        },
                        None => Kind::Buffered {
                            data: concat(chunks),
                            trailers: None,
                        },
                    };
                    let req = http::Request::from_parts(
                        parts.take().expect("parts present"),
                        ReplayBody { kind },
                    );
                    let fut = svc.take().expect("service present").call(req);
                    State::Calling { fut }
                }
            };
            this.state.set(next);
        }
    }
}
