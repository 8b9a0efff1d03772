//! A time budget for a whole call, retries included, carried downstream.
//!
//! [`Deadline`] gives each request a point in time by which the whole call must
//! be answered. It sits outside the retry layer, so retries, backoff sleeps
//! and every attempt draw on the same budget, and it fails the call with
//! [`DeadlineExceeded`] when the budget runs out.
//!
//! The deadline travels three ways:
//!
//! - **Into inner layers.** While the call runs, [`current()`] returns the
//!   deadline, and an inner [`Timeout`](crate::timeout::Timeout) never waits
//!   past it: each attempt's timeout shrinks to the time left.
//! - **In the request.** A [`CallDeadline`] is put in the `http::Request`
//!   extensions, for handlers and for [`PropagateDeadline`].
//! - **Across the network.** [`PropagateDeadline`], the innermost layer of a
//!   client stack, writes the time left at each attempt as `grpc-timeout` on
//!   gRPC requests and as [`TIMEOUT_HEADER`] (`firebreak-timeout-ms`, whole
//!   milliseconds) on other HTTP requests. On the server, [`Deadline`] reads
//!   both headers back and keeps the earlier of its own budget and the
//!   caller's. A relative time, not a wall-clock instant, is sent, as gRPC
//!   does, so clock skew between hosts does not matter.
//!
//! The caller's budget runs from the moment [`Deadline`] reads it. A layer
//! outside it that may hold a request (a bulkhead with `max_wait`, a rate
//! limiter in wait mode) would re-base the budget on the time after the
//! wait; [`stamp_arrival`] in front of those layers reads the headers on
//! arrival instead (the [`Resilience`](crate::preset::Resilience) preset
//! does this whenever it has such a wait):
//!
//! ```
//! # use std::time::Duration;
//! # use tower::ServiceBuilder;
//! # use tower_firebreak::{bulkhead::BulkheadLayer, deadline::{self, DeadlineLayer}};
//! # let handler = tower::service_fn(|_: http::Request<String>| async {
//! #     Ok::<_, tower_firebreak::BoxError>(http::Response::new(String::new()))
//! # });
//! let svc = ServiceBuilder::new()
//!     .map_request(|mut req: http::Request<String>| {
//!         deadline::stamp_arrival(&mut req);
//!         req
//!     })
//!     .layer(BulkheadLayer::new(100).max_wait(Duration::from_millis(200)))
//!     .layer(DeadlineLayer::new(Duration::from_secs(10)))
//!     .service(handler);
//! # let _ = svc;
//! ```
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{deadline::{DeadlineExceeded, DeadlineLayer}, error, BoxError};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Duration::from_secs(1)))
//!     .service(service_fn(|_req: http::Request<Full<Bytes>>| async {
//!         tokio::time::sleep(Duration::from_secs(5)).await;
//!         Ok::<_, BoxError>(http::Response::new(()))
//!     }));
//!
//! let err = svc.oneshot(http::Request::new(Full::default())).await.unwrap_err();
//! assert!(error::find::<DeadlineExceeded>(&*err).is_some());
//! # }
//! ```
//!
//! # What it bounds
//!
//! The call ends when its response future resolves: for HTTP, when the
//! response head arrives. The same holds for the attempt timeout, a
//! bulkhead's permit and (except with [`GrpcClassifier`], which waits for
//! the trailers) the breaker's verdict. Reading the response body is
//! outside all of them, so a dependency that sends its head and then stalls
//! is not cut. To bound that, add tower-http's
//! `timeout::ResponseBodyTimeoutLayer` (an idle timeout between body frames)
//! next to the service.
//!
//! [`GrpcClassifier`]: crate::classify::GrpcClassifier
//!
//! # Defaults
//!
//! [`DeadlineConfig::default()`] is a 30 s budget (the total request timeout
//! of Microsoft's standard HTTP resilience handler) with incoming deadline
//! headers honoured.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's. The clock starts in `call`.

mod config;
mod error;
pub mod future;
mod layer;
mod propagate;

pub use self::config::DeadlineConfig;
pub use self::error::DeadlineExceeded;
pub use self::layer::DeadlineLayer;
pub use self::propagate::{PropagateDeadline, PropagateDeadlineLayer, PropagateFuture};

use crate::BoxError;
use http::HeaderMap;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::Service;

/// The header carrying the time left, in whole milliseconds, on HTTP requests
/// that are not gRPC.
pub const TIMEOUT_HEADER: &str = "firebreak-timeout-ms";

/// The gRPC deadline header (`grpc-timeout`), as the gRPC HTTP/2 protocol
/// spec defines it.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

tokio::task_local! {
    static CURRENT: Instant;
}

/// The deadline of the call this task is processing, if a [`Deadline`] layer
/// is above it.
///
/// Available while the [`Deadline`]'s inner service is called and while its
/// response future is polled. It does not cross a task boundary (for example a
/// `tower::buffer::Buffer` between the two layers); the [`CallDeadline`]
/// request extension does.
pub fn current() -> Option<Instant> {
    CURRENT.try_with(|d| *d).ok()
}

/// The deadline of a request, in its `http::Request` extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CallDeadline {
    at: Instant,
}

impl CallDeadline {
    /// A deadline at `at`.
    pub fn new(at: Instant) -> Self {
        CallDeadline { at }
    }

    /// When the call must be answered by.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The time left, zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// Enforces a total time budget on each call. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    // None: pass every call through untouched (a preset stage turned off).
    budget: Option<Duration>,
    read_headers: bool,
}

impl<S> Deadline<S> {
    /// Wraps `inner` with a budget of `budget` for each whole call.
    pub const fn new(inner: S, budget: Duration) -> Self {
        Deadline {
            inner,
            budget: Some(budget),
            read_headers: true,
        }
    }

    /// No deadline: a stage of a preset that is turned off.
    pub(crate) const fn off(inner: S) -> Self {
        Deadline {
            inner,
            budget: None,
            read_headers: false,
        }
    }

    /// A [`DeadlineLayer`] with this budget.
    pub fn layer(budget: Duration) -> DeadlineLayer {
        DeadlineLayer::new(budget)
    }

    pub(crate) fn with_read_headers(mut self, read: bool) -> Self {
        self.read_headers = read;
        self
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

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let Some(budget) = self.budget else {
            return future::ResponseFuture::passthrough(self.inner.call(req));
        };
        let now = Instant::now();
        let mut at = crate::later(now, budget);
        if let Some(outer) = current() {
            at = at.min(outer);
        }
        if let Some(given) = req.extensions().get::<CallDeadline>() {
            at = at.min(given.at);
        }
        if let Some(left) = self
            .read_headers
            .then(|| from_headers(req.headers()))
            .flatten()
        {
            at = at.min(crate::later(now, left));
        }
        if at <= now {
            crate::trace::rejected(
                "deadline",
                crate::error::RejectionKind::DeadlineExceeded,
                None,
            );
            return future::ResponseFuture::expired();
        }
        req.extensions_mut().insert(CallDeadline { at });
        let fut = CURRENT.sync_scope(at, || self.inner.call(req));
        future::ResponseFuture::new(fut, at)
    }
}

/// Turns the caller's budget in `req`'s headers (as [`from_headers`] reads
/// them) into a [`CallDeadline`] from now, keeping an earlier one already
/// there. For a stack that may hold the request before its [`Deadline`]
/// reads the headers: the deadline layer then finds it, and the wait is
/// taken from the caller's budget instead of added to it. See the
/// [module docs](self).
///
/// [`Deadline`] honours a [`CallDeadline`] in the extensions whatever its
/// [`read_headers`](DeadlineLayer::read_headers) setting: stamp only in
/// front of a stack that should trust the caller's headers.
pub fn stamp_arrival<B>(req: &mut http::Request<B>) {
    let Some(left) = from_headers(req.headers()) else {
        return;
    };
    let mut at = crate::later(Instant::now(), left);
    if let Some(given) = req.extensions().get::<CallDeadline>() {
        at = at.min(given.at);
    }
    req.extensions_mut().insert(CallDeadline { at });
}

/// Reads the caller's time budget from `grpc-timeout` or
/// [`TIMEOUT_HEADER`], whichever is shorter. Malformed values are ignored.
pub fn from_headers(headers: &HeaderMap) -> Option<Duration> {
    // Parsed names: a `&str` key would be parsed and validated on every
    // call, and most requests carry neither header.
    static GRPC: http::HeaderName = http::HeaderName::from_static(GRPC_TIMEOUT_HEADER);
    static HTTP: http::HeaderName = http::HeaderName::from_static(TIMEOUT_HEADER);
    if headers.is_empty() {
        return None;
    }
    let grpc = headers
        .get(&GRPC)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let http = headers
        .get(&HTTP)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_millis);
    crate::earliest(grpc, http)
}

/// Parses a `grpc-timeout` value: at most 8 ASCII digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // Bytes, not chars: the last char of "5µ" is two bytes long.
    let (unit, digits) = v.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` value, choosing the finest unit that
/// fits the protocol's 8 digits. It rounds down, so the callee never believes
/// it has more time than the caller will wait.
pub fn format_grpc_timeout(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let v = nanos / per;
        if v <= MAX {
            return format!("{v}{unit}");
        }
    }
    format!("{MAX}H")
}
