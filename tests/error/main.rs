//! The error model, and the public contract every layer keeps.

use bytes::Bytes;
use http_body_util::Full;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::buffer::Buffer;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::bulkhead::{BulkheadFull, BulkheadLayer, KeyedBulkheadLayer};
use tower_firebreak::circuit_breaker::CircuitOpen;
use tower_firebreak::deadline::{DeadlineExceeded, DeadlineLayer, PropagateDeadlineLayer};
use tower_firebreak::error::{self, Rejection, RejectionKind};
use tower_firebreak::rate_limit::{KeyedRateLimitLayer, RateLimitLayer, RateLimited};
use tower_firebreak::timeout::{Elapsed, TimeoutLayer};
use tower_firebreak::{BoxError, ConfigError};

/// A service whose readiness fails with one of our rejections: tower's Buffer
/// then wraps the error in its own `ServiceError`.
#[derive(Clone)]
struct FailsReady;

impl Service<()> for FailsReady {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Err(BulkheadFull::new(3).into()))
    }

    fn call(&mut self, _: ()) -> Self::Future {
        std::future::ready(Ok(()))
    }
}

#[tokio::test]
async fn find_walks_the_source_chain_through_tower_buffer() {
    let svc = Buffer::new(FailsReady, 8);
    let err = svc.oneshot(()).await.unwrap_err();
    // The outermost error is Buffer's own wrapper, not ours...
    assert!(!err.is::<BulkheadFull>());
    // ...and find still sees through it.
    assert_eq!(
        error::find::<BulkheadFull>(&*err).unwrap().max_concurrent(),
        3
    );
    let r = Rejection::of(&*err).unwrap();
    assert_eq!(r.kind(), RejectionKind::BulkheadFull);
    assert!(r.is_shed());
}

#[tokio::test(start_paused = true)]
async fn call_errors_through_buffer_keep_their_type() {
    let inner = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(10)))
        .service(service_fn(|_: ()| async {
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        }));
    let err = Buffer::new(inner, 8).oneshot(()).await.unwrap_err();
    assert!(error::find::<Elapsed>(&*err).is_some());
}

#[derive(Debug)]
struct Wrapper(BoxError);

impl std::fmt::Display for Wrapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wrapped")
    }
}

impl std::error::Error for Wrapper {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

#[test]
fn rejection_names_every_kind_and_its_retry_after() {
    let cases: Vec<(BoxError, RejectionKind, Option<Duration>)> = vec![
        (
            Elapsed::new(Duration::from_secs(1)).into(),
            RejectionKind::Timeout,
            None,
        ),
        (
            DeadlineExceeded::new().into(),
            RejectionKind::DeadlineExceeded,
            None,
        ),
        (
            BulkheadFull::new(1).into(),
            RejectionKind::BulkheadFull,
            None,
        ),
        (
            RateLimited::new(Duration::from_millis(7)).into(),
            RejectionKind::RateLimited,
            Some(Duration::from_millis(7)),
        ),
        (
            CircuitOpen::new(Duration::from_secs(3)).into(),
            RejectionKind::CircuitOpen,
            Some(Duration::from_secs(3)),
        ),
    ];
    for (err, kind, after) in cases {
        let wrapped = Wrapper(Wrapper(err).into());
        let r = Rejection::of(&wrapped).unwrap();
        assert_eq!(r.kind(), kind);
        assert_eq!(r.retry_after(), after);
    }
    let other: BoxError = std::io::Error::other("dependency failed").into();
    assert!(Rejection::of(&*other).is_none());
}

/// Errors get moved between containers: `Arc::from(Box<dyn Error>)` (what
/// tonic's `Status::from_error` does with every client error) copies the
/// value to a new place. A rejection keeps its `retry_after` through that.
#[test]
fn a_rejection_keeps_its_retry_after_when_moved_into_an_arc() {
    let cases: [(BoxError, Duration); 2] = [
        (
            CircuitOpen::new(Duration::from_millis(1500)).into(),
            Duration::from_millis(1500),
        ),
        (
            RateLimited::new(Duration::from_millis(40)).into(),
            Duration::from_millis(40),
        ),
    ];
    for (err, want) in cases {
        let shared: std::sync::Arc<dyn std::error::Error + Send + Sync> = err.into();
        let r = Rejection::of(&*shared).expect("still a rejection");
        assert_eq!(r.retry_after(), Some(want), "{shared}");
    }
}

#[test]
fn error_messages_are_lowercase_without_a_trailing_period() {
    let msgs = [
        Elapsed::new(Duration::from_secs(1)).to_string(),
        DeadlineExceeded::new().to_string(),
        BulkheadFull::new(4).to_string(),
        RateLimited::new(Duration::from_millis(5)).to_string(),
        CircuitOpen::new(Duration::from_secs(1)).to_string(),
        ConfigError::new("max_concurrent", 0, "must be at least 1").to_string(),
    ];
    for m in msgs {
        assert!(m.chars().next().unwrap().is_lowercase(), "{m}");
        assert!(!m.ends_with('.'), "{m}");
    }
}

#[test]
fn config_error_names_the_field_and_the_value() {
    let e = ConfigError::new("burst", 0u32, "must be at least 1");
    assert_eq!(e.to_string(), "invalid burst = 0: must be at least 1");
    assert_eq!(e.value(), "0");
    let c = ConfigError::conflict(
        "timeout",
        Duration::from_secs(5),
        "deadline",
        Duration::from_secs(1),
        "an attempt cannot outlive the whole call",
    )
    .in_section("policies.payments");
    assert_eq!(c.field(), "policies.payments.timeout");
    assert_eq!(c.other_field(), Some("policies.payments.deadline"));
    assert_eq!(
        c.to_string(),
        "policies.payments.timeout = 5s contradicts policies.payments.deadline = 1s: an attempt cannot outlive the whole call"
    );
}

type HttpReq = http::Request<Full<Bytes>>;

fn assert_contract<S, Req>(svc: S) -> BoxCloneSyncService<Req, S::Response, BoxError>
where
    S: Service<Req, Error = BoxError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    Req: 'static,
{
    BoxCloneSyncService::new(svc)
}

/// Every service is Clone + Send + Sync, its future is Send + 'static, and the
/// whole stack boxes as a cloneable service for axum state.
#[tokio::test]
async fn every_layer_keeps_the_public_contract() {
    let base = service_fn(|x: u64| async move { Ok::<_, BoxError>(x) });
    let stacked = ServiceBuilder::new()
        .layer(RateLimitLayer::per_second(1000))
        .layer(KeyedRateLimitLayer::per_second(1000, |x: &u64| *x % 7))
        .layer(BulkheadLayer::new(8))
        .layer(KeyedBulkheadLayer::new(8, |x: &u64| *x % 3))
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(base);
    let boxed = assert_contract(stacked);
    assert_eq!(boxed.oneshot(41).await.unwrap(), 41);

    let http_base = service_fn(|_: HttpReq| async { Ok::<_, BoxError>(http::Response::new(())) });
    let http = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(PropagateDeadlineLayer::new())
        .service(http_base);
    let boxed = assert_contract(http);
    boxed
        .oneshot(http::Request::new(Full::default()))
        .await
        .unwrap();

    // Layers themselves are Clone + Send + Sync, so users can keep them in structs.
    fn layer_ok<L: Layer<()> + Clone + Send + Sync + std::fmt::Debug>(_: &L) {}
    layer_ok(&TimeoutLayer::new(Duration::from_secs(1)));
    layer_ok(&BulkheadLayer::new(1));
    layer_ok(&RateLimitLayer::per_second(1));
    layer_ok(&DeadlineLayer::new(Duration::from_secs(1)));
}
