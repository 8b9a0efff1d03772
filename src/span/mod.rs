//! One `tracing` span per protected call, with the layers' decisions as
//! fields.
//!
//! Put [`CallSpanLayer`] outermost in a stack. Every call then runs inside
//! a span named `firebreak.call`, so the events the inner layers emit
//! (`call rejected`, `retrying`, breaker state changes) are attached to it,
//! and when the call ends the span records:
//!
//! | field | value |
//! | --- | --- |
//! | `name` | the name given to the layer |
//! | `outcome` | `success`, `error` (the service failed) or `rejected` (one of our layers refused the call) |
//! | `rejected_by` | for `rejected`: `timeout`, `deadline_exceeded`, `circuit_open`, `bulkhead_full` or `rate_limited` |
//! | `retry_after_ms` | for `rejected`, when the rejection carries one |
//!
//! The span is at `INFO` level with target `tower_firebreak`. Without a
//! subscriber that wants it, creating it is a callsite check and nothing
//! more.
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::span::CallSpanLayer;
//! use tower_firebreak::timeout::TimeoutLayer;
//! use tower_firebreak::BoxError;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let svc = ServiceBuilder::new()
//!     .layer(CallSpanLayer::new("payments"))
//!     .layer(TimeoutLayer::new(Duration::from_secs(1)))
//!     .service(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
//! assert_eq!(svc.oneshot(7).await?, 7);
//! # Ok(())
//! # }
//! ```
//!
//! Deferred requests keep their trace: [`DeferLayer`](crate::defer::DeferLayer)
//! stores the W3C `traceparent` and `tracestate` headers with the job, and
//! the [`Replayer`](crate::defer::Replayer) sends them again, inside a
//! `firebreak.replay` span whose `traceparent` field is the stored value, so
//! the replayed call joins the trace of the request that was deferred.

pub mod future;

use crate::BoxError;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// Wraps each call in a `firebreak.call` span. See the [module docs](self).
#[derive(Clone)]
pub struct CallSpan<S> {
    inner: S,
    name: Arc<str>,
}

impl<S> CallSpan<S> {
    /// Wraps `inner`; `name` becomes the span's `name` field.
    pub fn new(inner: S, name: impl Into<String>) -> Self {
        CallSpan {
            inner,
            name: name.into().into(),
        }
    }

    /// A [`CallSpanLayer`] with this name.
    pub fn layer(name: impl Into<String>) -> CallSpanLayer {
        CallSpanLayer::new(name)
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

impl<S: fmt::Debug> fmt::Debug for CallSpan<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallSpan")
            .field("inner", &self.inner)
            .field("name", &self.name)
            .finish()
    }
}

/// Applies [`CallSpan`].
#[derive(Clone, Debug)]
pub struct CallSpanLayer {
    name: Arc<str>,
}

impl CallSpanLayer {
    /// Spans named after `name`.
    pub fn new(name: impl Into<String>) -> Self {
        CallSpanLayer {
            name: name.into().into(),
        }
    }
}

impl<S> Layer<S> for CallSpanLayer {
    type Service = CallSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallSpan {
            inner,
            name: self.name.clone(),
        }
    }
}

impl<S, Req> Service<Req> for CallSpan<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        call_in_span(&mut self.inner, req, call_span(&self.name))
    }
}

/// The `firebreak.call` span of one call.
pub(crate) fn call_span(name: &str) -> tracing::Span {
    tracing::info_span!(
        target: "tower_firebreak",
        "firebreak.call",
        name = name,
        outcome = tracing::field::Empty,
        rejected_by = tracing::field::Empty,
        retry_after_ms = tracing::field::Empty,
    )
}

/// Calls `inner` inside `span` (or [`Span::none`](tracing::Span::none)), and
/// records the outcome on it.
pub(crate) fn call_in_span<S, Req>(
    inner: &mut S,
    req: Req,
    span: tracing::Span,
) -> future::ResponseFuture<S::Future>
where
    S: Service<Req>,
{
    let fut = {
        let _g = span.enter();
        inner.call(req)
    };
    future::ResponseFuture::new(fut, span)
}
