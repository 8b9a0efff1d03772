//! Making HTTP requests replayable by buffering their bodies.

use crate::BoxError;
use crate::wake::WakerSet;
use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use tower::{Layer, Service};

/// The caller's request body failed while it was being sent: the client
/// went away or broke off its upload, or a retry's copy could not be sent
/// because the body went over the replay limit.
///
/// This is what a [`ReplayBody`] yields instead of the body's own error
/// (kept as the [`source`](std::error::Error::source) where there is one).
/// An HTTP client that fails a call because its request body failed keeps
/// that error in its chain, so the call's error says whose fault it was:
/// [`classify_error`](crate::classify::classify_error) does not count it as
/// the dependency's failure, and a breaker does not open over clients that
/// abort their uploads. hyper's HTTP/1 client keeps it; its HTTP/2 client
/// (and so tonic) only logs a request body's error and resets the stream,
/// so over HTTP/2 the call fails with the reset, which counts.
#[derive(Debug)]
pub struct RequestBodyError {
    message: String,
    source: Option<BoxError>,
}

impl RequestBodyError {
    fn new(message: String) -> Self {
        RequestBodyError {
            message,
            source: None,
        }
    }

    fn caused_by(source: BoxError) -> Self {
        RequestBodyError {
            message: source.to_string(),
            source: Some(source),
        }
    }
}

impl fmt::Display for RequestBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request body failed: {}", self.message)
    }
}

impl std::error::Error for RequestBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

/// A request body that records what it streams, so that it can be sent
/// again.
///
/// Made by [`BufferRequestBody`]. The first attempt streams the caller's
/// body as it arrives (nothing waits for its end: a client-streaming or
/// bidirectional gRPC call flows) and every frame read, up to the limit,
/// is kept. A copy (see [`ReplayableBody`](super::ReplayableBody)) sends
/// what was kept, then reads on where the stream is, so a retry works
/// whether the failed attempt read all, part or none of the body. A body
/// that grows over the limit stops being kept: it still flows to the end,
/// but is not sent again.
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
    /// One copy of a recorded body.
    Copy {
        tee: Arc<Tee<B>>,
        /// The next recorded chunk to send.
        pos: usize,
        /// Bytes sent so far, for the size hint.
        sent: u64,
        /// The end (trailers, or none) was sent.
        done: bool,
    },
}

/// What the copies of one body share: the caller's body, and what has been
/// read of it.
struct Tee<B> {
    limit: usize,
    /// The original body's size hint, for the copies' own.
    hint: SizeHint,
    state: Mutex<Recorded<B>>,
}

struct Recorded<B> {
    /// The data frames read, in order (dropped once over the limit).
    chunks: Vec<Bytes>,
    /// How many data frames have been read (`chunks.len()` until capped).
    read: usize,
    /// How many bytes have been read.
    len: usize,
    /// Over the limit, or the body failed: no new copy can be sent.
    capped: bool,
    /// The body has ended: `Some(trailers)`.
    end: Option<Option<HeaderMap>>,
    /// The body failed with this (a copy at the head reports it).
    failed: Option<String>,
    rest: B,
    /// The tasks of the copies waiting at the head for `rest`'s next frame:
    /// `rest` is polled with a waker that wakes them all, so a copy whose
    /// attempt stopped polling it (but is still alive) holds no one up.
    waiting: Arc<WakerSet>,
}

impl<B> Tee<B> {
    fn lock(&self) -> MutexGuard<'_, Recorded<B>> {
        self.state.lock().unwrap_or_else(|e| {
            // The caller's body panicked while it was polled: its state is
            // unknown, so no copy reads it again, and none is sent again.
            let mut state = e.into_inner();
            state
                .failed
                .get_or_insert_with(|| "the request body panicked while it was read".to_owned());
            state.capped = true;
            state
        })
    }
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

    /// A body that records what `body` streams, up to `limit` bytes, for
    /// copies to send again.
    pub fn recording(body: B, limit: usize) -> Self
    where
        B: Body,
    {
        let hint = body.size_hint();
        ReplayBody {
            kind: Kind::Copy {
                tee: Arc::new(Tee {
                    limit,
                    hint,
                    state: Mutex::new(Recorded {
                        chunks: Vec::new(),
                        read: 0,
                        len: 0,
                        capped: false,
                        end: None,
                        failed: None,
                        rest: body,
                        waiting: Arc::default(),
                    }),
                }),
                pos: 0,
                sent: 0,
                done: false,
            },
        }
    }

    /// Whether this body can (still) be sent again: not over the limit, and
    /// not failed.
    pub fn is_replayable(&self) -> bool {
        match &self.kind {
            Kind::Buffered { .. } => true,
            Kind::Partial { .. } => false,
            Kind::Copy { tee, .. } => !tee.lock().capped,
        }
    }

    /// A copy to send again, from its start; `None` for a body over the
    /// limit.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            Kind::Buffered { data, trailers } => Some(ReplayBody {
                kind: Kind::Buffered {
                    data: data.clone(),
                    trailers: trailers.clone(),
                },
            }),
            Kind::Partial { .. } => None,
            Kind::Copy { tee, .. } => {
                if tee.lock().capped {
                    return None;
                }
                Some(ReplayBody {
                    kind: Kind::Copy {
                        tee: tee.clone(),
                        pos: 0,
                        sent: 0,
                        done: false,
                    },
                })
            }
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
            Kind::Copy { pos, sent, .. } => f
                .debug_struct("ReplayBody::Copy")
                .field("pos", pos)
                .field("sent", sent)
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
            Kind::Copy {
                tee,
                pos,
                sent,
                done,
            } => poll_copy(tee, pos, sent, done, cx),
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
                    Some(Err(e)) => {
                        Poll::Ready(Some(Err(RequestBodyError::caused_by(e.into()).into())))
                    }
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
            Kind::Copy { tee, pos, done, .. } => {
                let state = tee.lock();
                *done
                    || (*pos >= state.read
                        && match &state.end {
                            Some(trailers) => trailers.is_none(),
                            None => state.rest.is_end_stream() && state.failed.is_none(),
                        })
            }
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
            // The caller's hint, less what this copy has sent.
            Kind::Copy { tee, sent, .. } => {
                let mut hint = SizeHint::new();
                hint.set_lower(tee.hint.lower().saturating_sub(*sent));
                if let Some(u) = tee.hint.upper() {
                    hint.set_upper(u.saturating_sub(*sent));
                }
                hint
            }
        }
    }
}

/// One poll of a copy: the recorded chunks first, then the stream. Any copy
/// at the head may read the stream; the frame it gets is recorded, and the
/// others then send it from the record.
fn poll_copy<B>(
    tee: &Tee<B>,
    pos: &mut usize,
    sent: &mut u64,
    done: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    if *done {
        return Poll::Ready(None);
    }
    let mut state = tee.lock();
    if *pos < state.read {
        if state.capped {
            *done = true;
            let why = state.failed.clone().unwrap_or_else(|| {
                "the request body went over the replay limit and cannot be sent again".to_owned()
            });
            return Poll::Ready(Some(Err(RequestBodyError::new(why).into())));
        }
        let chunk = state.chunks[*pos].clone();
        *pos += 1;
        *sent += chunk.len() as u64;
        return Poll::Ready(Some(Ok(Frame::data(chunk))));
    }
    if let Some(trailers) = &state.end {
        *done = true;
        return Poll::Ready(trailers.clone().map(|t| Ok(Frame::trailers(t))));
    }
    if let Some(why) = &state.failed {
        *done = true;
        return Poll::Ready(Some(Err(RequestBodyError::new(why.clone()).into())));
    }
    let waiting = state.waiting.clone();
    waiting.add(cx.waker());
    let waker = Waker::from(waiting.clone());
    let polled = Pin::new(&mut state.rest).poll_frame(&mut Context::from_waker(&waker));
    let Poll::Ready(frame) = polled else {
        return Poll::Pending;
    };
    // The other copies at the head can send this frame from the record.
    waiting.wake_all();
    match frame {
        None => {
            state.end = Some(None);
            *done = true;
            Poll::Ready(None)
        }
        Some(Err(e)) => {
            let e = RequestBodyError::caused_by(e.into());
            state.failed = Some(e.message.clone());
            state.capped = true;
            state.chunks = Vec::new();
            *done = true;
            Poll::Ready(Some(Err(e.into())))
        }
        Some(Ok(frame)) => match frame.into_data() {
            Ok(mut data) => {
                let chunk = data.copy_to_bytes(data.remaining());
                state.read += 1;
                state.len = state.len.saturating_add(chunk.len());
                if !state.capped {
                    if state.len > tee.limit {
                        crate::trace::not_replayable("buffer_request_body", tee.limit);
                        state.capped = true;
                        state.chunks = Vec::new();
                    } else {
                        state.chunks.push(chunk.clone());
                    }
                }
                *pos += 1;
                *sent += chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Err(frame) => {
                let trailers = frame.into_trailers().ok();
                state.end = Some(trailers.clone());
                *done = true;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
        },
    }
}

/// Records each request body, up to a limit, as it streams, so that an
/// inner [`Retry`](super::Retry) (or [`Hedge`](crate::hedge::Hedge)) can
/// send it again.
///
/// The inner service gets `http::Request<ReplayBody<B>>` at once: nothing
/// waits for the body to end, so a client-streaming or bidirectional gRPC
/// call flows as it would without the layer. The body's frames are kept,
/// up to the limit, as the attempt reads them; a retry sends what was kept
/// and then reads on. A body whose size hint is over the limit is passed on
/// as it is, and one that turns out to be larger stops being kept; either
/// way the request goes once, unretried, and a `tracing` event (`debug`)
/// says why. (One race is left: a failed attempt that goes on streaming
/// the body during the retry's backoff, past the limit, leaves the retry a
/// copy that cannot be sent; it fails with that error instead of the
/// failed attempt's answer.)
///
/// The body must be `Unpin`; wrap another body in `Box::pin`.
///
/// # Readiness
///
/// `poll_ready` is the inner service's, and `call` calls it at once.
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
        let body = if body.size_hint().lower() > self.limit as u64 {
            crate::trace::not_replayable("buffer_request_body", self.limit);
            ReplayBody {
                kind: Kind::Partial {
                    head: None,
                    rest: body,
                },
            }
        } else {
            ReplayBody::recording(body, self.limit)
        };
        let fut = self.inner.call(http::Request::from_parts(parts, body));
        BufferFuture {
            state: State::Calling {
                fut,
                _types: PhantomData,
            },
        }
    }
}

pin_project! {
    /// The response future of [`BufferRequestBody`]: the inner service's.
    pub struct BufferFuture<S, B, F> {
        #[pin]
        state: State<S, B, F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, F> {
        Calling {
            #[pin]
            fut: F,
            _types: PhantomData<fn() -> (S, B)>,
        },
    }
}

impl<S, B, F> fmt::Debug for BufferFuture<S, B, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferFuture").finish_non_exhaustive()
    }
}

impl<S, B, F, T, E> Future for BufferFuture<S, B, F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Calling { fut, .. } => fut.poll(cx).map_err(Into::into),
        }
    }
}
