use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The body of an answer the defer layer gives itself: a JSON or
/// problem-details body for HTTP callers, or, for gRPC callers, one
/// message frame followed by trailers.
#[derive(Clone, Debug, Default)]
pub struct DeferBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl DeferBody {
    /// A body of `data` and no trailers.
    pub fn new(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        DeferBody {
            data: (!data.is_empty()).then_some(data),
            trailers: None,
        }
    }

    /// The same body, ending with `trailers`.
    pub(crate) fn with_trailers(mut self, trailers: HeaderMap) -> Self {
        self.trailers = Some(trailers);
        self
    }

    /// The data not yet read.
    pub(crate) fn data(&self) -> Option<&Bytes> {
        self.data.as_ref()
    }
}

impl Body for DeferBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
