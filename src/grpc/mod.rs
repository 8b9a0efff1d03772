//! Our rejections as gRPC statuses, per DESIGN.md's table.
//!
//! | error | gRPC code | metadata |
//! | --- | --- | --- |
//! | [`Elapsed`](crate::timeout::Elapsed), [`DeadlineExceeded`](crate::deadline::DeadlineExceeded) | `DEADLINE_EXCEEDED` (4) | |
//! | [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) | `UNAVAILABLE` (14) | `grpc-retry-pushback-ms` |
//! | [`BulkheadFull`](crate::bulkhead::BulkheadFull) | `RESOURCE_EXHAUSTED` (8) | |
//! | [`RateLimited`](crate::rate_limit::RateLimited) | `RESOURCE_EXHAUSTED` (8) | `grpc-retry-pushback-ms` |
//! | any other error | `UNKNOWN` (2) | |
//!
//! `grpc-retry-pushback-ms` carries the rejection's real `retry_after` (the
//! time left in the open breaker, the limiter's next permit), as gRPC's retry
//! design (A6) defines it: clients that honour it wait that long.
//!
//! - On a **server** (tonic's `Server::builder().layer(...)`, or any
//!   `http`-based gRPC server), [`GrpcRejectionLayer`] answers a rejected call
//!   with a gRPC "Trailers-Only" response carrying the right status, instead
//!   of the `UNKNOWN` a server makes of an arbitrary error.
//! - On a **client** (feature `tonic`), [`to_status`] turns an error of our
//!   layers around a `tonic::transport::Channel` into a `tonic::Status`, and
//!   `StatusLayer` does it for every call, so the generated client returns
//!   the right code.
//!
//! The deadline travels as `grpc-timeout`: see [`deadline`](crate::deadline).

use crate::http::{Answer, AnswerLayer, ErrorMapping};

/// gRPC answers: a Trailers-Only response per [`error_response`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TrailersOnly;

impl ErrorMapping for TrailersOnly {
    fn response(err: &(dyn Error + 'static)) -> http::Response<Full<Bytes>> {
        error_response(err)
    }
}

/// Answers every error of the inner service with a gRPC Trailers-Only
/// response ([`error_response`]), so the service is infallible and each
/// rejection reaches the client with its own code. Put it outermost on a gRPC
/// server: `Server::builder().layer(...)` in tonic. See [`Answer`].
pub type GrpcRejection<S> = Answer<S, TrailersOnly>;

/// Applies [`GrpcRejection`].
pub type GrpcRejectionLayer = AnswerLayer<TrailersOnly>;

#[cfg(feature = "tonic")]
mod status;
#[cfg(feature = "tonic")]
pub use self::status::{StatusFuture, StatusLayer, StatusService, to_status};

use crate::error::{Rejection, RejectionKind};
use bytes::Bytes;
use http::HeaderValue;
use http_body_util::Full;
use std::error::Error;

/// The metadata key of gRPC's retry pushback (milliseconds).
pub const PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// gRPC status codes used here (their numbers are fixed by the gRPC spec).
pub mod code {
    /// `UNKNOWN`.
    pub const UNKNOWN: i32 = 2;
    /// `DEADLINE_EXCEEDED`.
    pub const DEADLINE_EXCEEDED: i32 = 4;
    /// `RESOURCE_EXHAUSTED`.
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// `UNAVAILABLE`.
    pub const UNAVAILABLE: i32 = 14;
}

/// The gRPC status code for a kind of rejection.
pub fn code_for(kind: RejectionKind) -> i32 {
    match kind {
        RejectionKind::Timeout | RejectionKind::DeadlineExceeded => code::DEADLINE_EXCEEDED,
        RejectionKind::CircuitOpen => code::UNAVAILABLE,
        RejectionKind::BulkheadFull | RejectionKind::RateLimited => code::RESOURCE_EXHAUSTED,
    }
}

/// A wait as `grpc-retry-pushback-ms`: whole milliseconds, rounded up (as
/// `Retry-After` rounds up to whole seconds), so a client that obeys it
/// never comes back early; 0.4 ms is 1, not "retry now".
fn pushback_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The code, message and pushback for `err`.
pub(crate) fn parts(err: &(dyn Error + 'static)) -> (i32, String, Option<u64>) {
    match Rejection::of(err) {
        Some(r) => (
            code_for(r.kind()),
            format!("{}: {err}", r.kind()),
            r.retry_after().map(pushback_ms),
        ),
        // Like the HTTP mapping, an unknown error's text is not echoed.
        None => (code::UNKNOWN, "internal error".to_owned(), None),
    }
}

/// A gRPC "Trailers-Only" response for `err`: HTTP 200, `content-type:
/// application/grpc`, and `grpc-status`, `grpc-message` and (where there is
/// one) `grpc-retry-pushback-ms` in the headers, with an empty body.
pub fn error_response(err: &(dyn Error + 'static)) -> http::Response<Full<Bytes>> {
    let (code, message, pushback) = parts(err);
    let mut res = http::Response::new(Full::default());
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(crate::classify::GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
        h.insert("grpc-message", v);
    }
    if let Some(ms) = pushback {
        h.insert(PUSHBACK_HEADER, HeaderValue::from(ms));
    }
    res
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII
/// (0x20–0x7E), and `%` itself (gRPC over HTTP/2 spec).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
