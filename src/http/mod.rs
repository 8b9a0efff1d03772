//! Our rejections as HTTP responses, per DESIGN.md's table.
//!
//! | error | status | headers |
//! | --- | --- | --- |
//! | [`Elapsed`](crate::timeout::Elapsed), [`DeadlineExceeded`](crate::deadline::DeadlineExceeded) | 504 Gateway Timeout | |
//! | [`CircuitOpen`](crate::circuit_breaker::CircuitOpen) | 503 Service Unavailable | `Retry-After` |
//! | [`BulkheadFull`](crate::bulkhead::BulkheadFull) | 503 Service Unavailable | |
//! | [`RateLimited`](crate::rate_limit::RateLimited) | 429 Too Many Requests | `Retry-After` |
//! | any other error | 500 Internal Server Error | |
//!
//! `Retry-After` is the rejection's real `retry_after` (the time left in the
//! open breaker, the limiter's next permit) in whole seconds, rounded up.
//!
//! Bodies are problem details (RFC 9457, `application/problem+json`) with the
//! rejection's kind:
//!
//! ```json
//! { "type": "https://docs.rs/tower-firebreak/latest/tower_firebreak/error/enum.RejectionKind.html#variant.RateLimited",
//!   "title": "Too Many Requests", "status": 429, "kind": "rate_limited",
//!   "detail": "rate limited; retry after 250ms", "retry_after_ms": 250 }
//! ```
//!
//! An error that is not one of our rejections gets a 500 whose body does not
//! repeat the error's text: it may hold details a server should not show.
//!
//! Two ways to use it:
//!
//! - [`handle_error`], a ready handler for axum's `HandleErrorLayer`;
//! - [`RejectionResponseLayer`], which makes any fallible HTTP service
//!   infallible (like tower-http's timeout), so a `Router` takes a stack of
//!   our layers directly with `.layer(...)`.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tower::ServiceBuilder;
//! use tower_firebreak::{http::RejectionResponseLayer, bulkhead::BulkheadLayer,
//!     timeout::TimeoutLayer};
//!
//! let app: Router = Router::new().route("/", get(|| async { "ok" })).layer(
//!     ServiceBuilder::new()
//!         .layer(RejectionResponseLayer::new())
//!         .layer(BulkheadLayer::new(64))
//!         .layer(TimeoutLayer::new(Duration::from_secs(2))),
//! );
//! ```

pub mod future;
mod layer;

pub use self::layer::{
    Answer, AnswerLayer, ErrorMapping, ProblemDetails, RejectionResponse, RejectionResponseLayer,
};

use crate::BoxError;
use crate::error::{Rejection, RejectionKind};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use std::error::Error;
use std::time::Duration;

/// The media type of problem details (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The status code for a kind of rejection.
pub fn status_code(kind: RejectionKind) -> StatusCode {
    match kind {
        RejectionKind::Timeout | RejectionKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        RejectionKind::CircuitOpen | RejectionKind::BulkheadFull => StatusCode::SERVICE_UNAVAILABLE,
        RejectionKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
    }
}

/// A `Retry-After` value: whole seconds, rounded up, so a caller that obeys
/// it never comes back early.
pub fn retry_after_value(after: Duration) -> HeaderValue {
    let secs = after
        .as_secs()
        .saturating_add(u64::from(after.subsec_nanos() > 0));
    HeaderValue::from(secs)
}

fn kind_type_uri(kind: RejectionKind) -> String {
    let variant = match kind {
        RejectionKind::Timeout => "Timeout",
        RejectionKind::DeadlineExceeded => "DeadlineExceeded",
        RejectionKind::CircuitOpen => "CircuitOpen",
        RejectionKind::BulkheadFull => "BulkheadFull",
        RejectionKind::RateLimited => "RateLimited",
    };
    format!(
        "https://docs.rs/tower-firebreak/latest/tower_firebreak/error/enum.RejectionKind.html#variant.{variant}"
    )
}

/// The response for `err`: the status, `Retry-After` and problem-details body
/// of DESIGN.md's table.
pub fn error_response(err: &(dyn Error + 'static)) -> http::Response<Full<Bytes>> {
    let (status, body, retry_after) = match Rejection::of(err) {
        Some(r) => {
            let status = status_code(r.kind());
            let mut body = serde_json::json!({
                "type": kind_type_uri(r.kind()),
                "title": status.canonical_reason().unwrap_or(""),
                "status": status.as_u16(),
                "kind": r.kind().as_str(),
                "detail": err.to_string(),
            });
            if let Some(after) = r.retry_after() {
                body["retry_after_ms"] = serde_json::json!(crate::duration_ms(after));
            }
            (status, body, r.retry_after())
        }
        None => {
            let status = StatusCode::INTERNAL_SERVER_ERROR;
            let body = serde_json::json!({
                "type": "about:blank",
                "title": status.canonical_reason().unwrap_or(""),
                "status": status.as_u16(),
            });
            (status, body, None)
        }
    };
    let mut res = http::Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(after) = retry_after {
        res.headers_mut()
            .insert(header::RETRY_AFTER, retry_after_value(after));
    }
    res
}

/// A ready handler for axum's `HandleErrorLayer`.
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, routing::get, error_handling::HandleErrorLayer};
/// use tower::ServiceBuilder;
/// use tower_firebreak::{http::handle_error, rate_limit::RateLimitLayer};
///
/// let app: Router = Router::new().route("/", get(|| async { "ok" })).layer(
///     ServiceBuilder::new()
///         .layer(HandleErrorLayer::new(handle_error))
///         .layer(RateLimitLayer::per_second(100)),
/// );
/// ```
pub async fn handle_error(err: BoxError) -> http::Response<Full<Bytes>> {
    error_response(&*err)
}
