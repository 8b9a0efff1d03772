//! Answer a failed call another way: with a value, a function of the error,
//! or another service.
//!
//! [`Fallback`] calls the inner service; when the call fails with an error
//! that the predicate selects (by default, every error: the dependency's
//! failures and our own rejections alike), it answers with the fallback
//! instead. The happy path is typed and unboxed: a call that succeeds costs a
//! match, plus a clone of the request only for a [service
//! fallback](FallbackLayer::service), which needs the request again.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{fallback::FallbackLayer, timeout::TimeoutLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(FallbackLayer::value("cached answer"))
//!     .layer(TimeoutLayer::new(Duration::from_millis(100)))
//!     .service(service_fn(|_: ()| async {
//!         tokio::time::sleep(Duration::from_secs(5)).await;
//!         Ok::<_, BoxError>("fresh answer")
//!     }));
//! assert_eq!(svc.oneshot(()).await.unwrap(), "cached answer");
//! # }
//! ```
//!
//! Only rejections, with a function of the error:
//!
//! ```
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{error::Rejection, fallback::FallbackLayer, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = FallbackLayer::with_fn(|err: BoxError| {
//!     Ok::<_, BoxError>(format!("degraded: {}", Rejection::of(&*err).unwrap().kind()))
//! })
//! .when(|err| Rejection::of(err).is_some());
//! # let _ = layer;
//! # }
//! ```
//!
//! # Readiness
//!
//! `poll_ready` waits for the inner service. A readiness error the
//! predicate selects (a `Buffer` whose worker died, a channel that cannot
//! connect) is a failed call too: `poll_ready` reports ready and keeps it,
//! and the next call gets the fallback without reaching the inner service.
//! So a `Fallback` around one endpoint of a `tower::balance` balancer would
//! hide that endpoint's failure from the balancer: put it around the
//! balancer instead. A service fallback is driven to readiness only when
//! it is needed (it is called with `oneshot`).

pub mod future;
mod layer;

pub use self::layer::FallbackLayer;

use crate::BoxError;
use std::error::Error;
use std::future::{Future, Ready, ready};
use std::task::{Context, Poll};
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

/// What answers instead of a failed call.
///
/// Implemented by [`Value`], [`FromFn`] and [`FromService`]; write your own
/// for anything else.
pub trait Recover<Req, Resp> {
    /// What is kept of the request before the inner call, for the fallback.
    type Saved;
    /// The fallback's future.
    type Future: Future<Output = Result<Resp, BoxError>>;

    /// Keeps what the fallback needs of `req`. Runs on every call, so keep it cheap.
    fn save(&self, req: &Req) -> Self::Saved;

    /// Answers instead of the failed call.
    fn recover(&mut self, saved: Self::Saved, err: BoxError) -> Self::Future;
}

/// A fixed answer, cloned for each failed call. See [`FallbackLayer::value`].
#[derive(Clone, Debug)]
pub struct Value<T>(T);

impl<Req, T: Clone> Recover<Req, T> for Value<T> {
    type Saved = ();
    type Future = Ready<Result<T, BoxError>>;

    fn save(&self, _: &Req) {}

    fn recover(&mut self, _: (), _: BoxError) -> Self::Future {
        ready(Ok(self.0.clone()))
    }
}

/// An answer computed from the error. See [`FallbackLayer::with_fn`].
#[derive(Clone, Debug)]
pub struct FromFn<F>(F);

impl<Req, Resp, F> Recover<Req, Resp> for FromFn<F>
where
    F: FnMut(BoxError) -> Result<Resp, BoxError>,
{
    type Saved = ();
    type Future = Ready<Result<Resp, BoxError>>;

    fn save(&self, _: &Req) {}

    fn recover(&mut self, _: (), err: BoxError) -> Self::Future {
        ready((self.0)(err))
    }
}

/// Another service, called with a clone of the request. See [`FallbackLayer::service`].
#[derive(Clone, Debug)]
pub struct FromService<S>(S);

impl<Req, S> Recover<Req, S::Response> for FromService<S>
where
    Req: Clone,
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Saved = Req;
    type Future = future::MapErr<Oneshot<S, Req>>;

    fn save(&self, req: &Req) -> Req {
        req.clone()
    }

    fn recover(&mut self, req: Req, _: BoxError) -> Self::Future {
        future::MapErr::new(self.0.clone().oneshot(req))
    }
}

/// Selects which errors fall back.
pub trait Predicate {
    /// Whether `err` should be answered by the fallback.
    fn select(&self, err: &(dyn Error + 'static)) -> bool;
}

/// The default predicate: every error.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnyError;

impl Predicate for AnyError {
    fn select(&self, _: &(dyn Error + 'static)) -> bool {
        true
    }
}

impl<F: Fn(&(dyn Error + 'static)) -> bool> Predicate for F {
    fn select(&self, err: &(dyn Error + 'static)) -> bool {
        self(err)
    }
}

/// Answers failed calls with a fallback. See the [module docs](self).
///
/// A readiness error of the inner service (a `Buffer` whose worker died, a
/// `Channel` that cannot connect) that the predicate selects is answered
/// too: `poll_ready` reports ready, and the next call gets the fallback
/// without reaching the inner service.
#[derive(Debug)]
pub struct Fallback<S, R, P = AnyError> {
    inner: S,
    recover: R,
    predicate: P,
    /// A readiness error kept for the next call's fallback.
    ready_err: Option<BoxError>,
}

impl<S: Clone, R: Clone, P: Clone> Clone for Fallback<S, R, P> {
    fn clone(&self) -> Self {
        Fallback::new(
            self.inner.clone(),
            self.recover.clone(),
            self.predicate.clone(),
        )
    }
}

impl<S, R, P> Fallback<S, R, P> {
    /// Wraps `inner`, answering the errors `predicate` selects with `recover`.
    pub const fn new(inner: S, recover: R, predicate: P) -> Self {
        Fallback {
            inner,
            recover,
            predicate,
            ready_err: None,
        }
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

impl<S, Req, R, P> Service<Req> for Fallback<S, R, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    R: Recover<Req, S::Response> + Clone,
    P: Predicate + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future, R, P, Req, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.ready_err.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                if !self.predicate.select(&*e) {
                    return Poll::Ready(Err(e));
                }
                self.ready_err = Some(e);
                Poll::Ready(Ok(()))
            }
            other => other.map_err(Into::into),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let saved = self.recover.save(&req);
        if let Some(err) = self.ready_err.take() {
            tracing::debug!(
                target: "tower_firebreak",
                layer = "fallback",
                error = %err,
                "answering with the fallback (the service was not ready)"
            );
            return future::ResponseFuture::recovering(self.recover.recover(saved, err));
        }
        future::ResponseFuture::new(
            self.inner.call(req),
            saved,
            self.recover.clone(),
            self.predicate.clone(),
        )
    }
}
