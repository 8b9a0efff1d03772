use super::{PUSHBACK_HEADER, parts};
use crate::BoxError;
use crate::error::Rejection;
use pin_project_lite::pin_project;
use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tonic::metadata::MetadataValue;
use tower::{Layer, Service};

/// The `tonic::Status` for `err`: our rejections get their code, message and
/// `grpc-retry-pushback-ms` metadata; a `Status` already in the error's
/// source chain is kept as it is; tonic's own `TimeoutExpired` (the
/// `Channel` enforcing `grpc-timeout`) is `DEADLINE_EXCEEDED`; anything else
/// is `UNKNOWN`.
pub fn to_status(err: &(dyn Error + 'static)) -> tonic::Status {
    if Rejection::of(err).is_none() {
        if let Some(status) = crate::error::find::<tonic::Status>(err) {
            return status.clone();
        }
        // tonic's Channel enforces the `grpc-timeout` that
        // `PropagateDeadline` writes, at the same instant as the caller's
        // `Deadline`; when its timer wins, the call still ran out of time.
        if crate::error::find::<tonic::TimeoutExpired>(err).is_some() {
            return tonic::Status::deadline_exceeded(format!("deadline exceeded: {err}"));
        }
        return tonic::Status::unknown(err.to_string());
    }
    let (code, message, pushback) = parts(err);
    let mut status = tonic::Status::new(tonic::Code::from_i32(code), message);
    if let Some(ms) = pushback {
        status
            .metadata_mut()
            .insert(PUSHBACK_HEADER, MetadataValue::from(ms));
    }
    status
}

/// [`to_status`], keeping `err` as the new status's source, so that
/// [`find`](crate::error::find) and [`Rejection::of`] still see our
/// rejection through it (a breaker or retry outside [`StatusLayer`] must not
/// count an open breaker as the dependency's failure).
fn into_status(err: BoxError) -> tonic::Status {
    let mut status = to_status(&*err);
    // A status found in the chain is passed on as it was.
    let passed_on =
        Rejection::of(&*err).is_none() && crate::error::find::<tonic::Status>(&*err).is_some();
    if !passed_on {
        status.set_source(std::sync::Arc::from(err));
    }
    status
}

/// Turns the errors of a gRPC client stack into `tonic::Status`, so a
/// generated client sees `UNAVAILABLE` for an open breaker, not `UNKNOWN`.
///
/// Put it outermost around the layers on a `tonic::transport::Channel`.
#[derive(Clone, Debug)]
pub struct StatusService<S> {
    inner: S,
}

impl<S> StatusService<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        StatusService { inner }
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

impl<S, Req> Service<Req> for StatusService<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = StatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| Box::new(into_status(e.into())) as BoxError)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        StatusFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`StatusService`].
    #[derive(Debug)]
    pub struct StatusFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, T, E> Future for StatusFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(
            ready!(self.project().inner.poll(cx))
                .map_err(|e| Box::new(into_status(e.into())) as BoxError),
        )
    }
}

/// Applies [`StatusService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StatusLayer {
    _priv: (),
}

impl StatusLayer {
    /// A new layer.
    pub const fn new() -> Self {
        StatusLayer { _priv: () }
    }
}

impl<S> Layer<S> for StatusLayer {
    type Service = StatusService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusService::new(inner)
    }
}
