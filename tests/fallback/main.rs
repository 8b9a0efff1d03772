//! The fallback layer: a value, a function of the error, or another service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::BulkheadFull;
use tower_firebreak::error::{self, Rejection};
use tower_firebreak::fallback::FallbackLayer;
use tower_firebreak::timeout::TimeoutLayer;

fn failing(
    err: fn() -> BoxError,
) -> impl tower::Service<u32, Response = String, Error = BoxError, Future: Send> + Clone {
    service_fn(move |_: u32| async move { Err::<String, _>(err()) })
}

#[tokio::test(start_paused = true)]
async fn a_value_answers_a_timed_out_call() {
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::value("stale".to_owned()))
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .service(service_fn(|_: u32| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>("fresh".to_owned())
        }));
    let start = tokio::time::Instant::now();
    assert_eq!(svc.oneshot(1).await.unwrap(), "stale");
    assert_eq!(start.elapsed(), Duration::from_millis(100));
}

#[tokio::test]
async fn success_passes_through_untouched() {
    let svc = FallbackLayer::value("fallback".to_owned()).layer(service_fn(|x: u32| async move {
        Ok::<_, BoxError>(x.to_string())
    }));
    assert_eq!(svc.oneshot(7).await.unwrap(), "7");
}

#[tokio::test]
async fn a_function_sees_the_error_and_may_fail_itself() {
    let svc = FallbackLayer::with_fn(|err: BoxError| {
        if error::find::<BulkheadFull>(&*err).is_some() {
            Ok("shed, try later".to_owned())
        } else {
            Err(err)
        }
    })
    .layer(failing(|| BulkheadFull::new(1).into()));
    assert_eq!(svc.oneshot(1).await.unwrap(), "shed, try later");

    let svc = FallbackLayer::with_fn(|err: BoxError| Err::<String, _>(err))
        .layer(failing(|| std::io::Error::other("db down").into()));
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(error::find::<std::io::Error>(&*err).is_some());
}

#[tokio::test]
async fn the_predicate_chooses_which_errors_fall_back() {
    let layer = FallbackLayer::value("fallback".to_owned()).when(|e| Rejection::of(e).is_some());
    // Our rejection: answered by the fallback.
    let svc = layer.layer(failing(|| BulkheadFull::new(1).into()));
    assert_eq!(svc.oneshot(1).await.unwrap(), "fallback");
    // The dependency's own error: passed through unchanged.
    let svc = layer.layer(failing(|| std::io::Error::other("boom").into()));
    let err = svc.oneshot(1).await.unwrap_err();
    assert_eq!(err.to_string(), "boom");
}

#[tokio::test]
async fn another_service_gets_the_same_request() {
    let backup_calls = Arc::new(AtomicUsize::new(0));
    let b = backup_calls.clone();
    let backup = service_fn(move |x: u32| {
        b.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(format!("backup {x}")) }
    });
    let svc = FallbackLayer::service(backup)
        .layer(failing(|| std::io::Error::other("primary down").into()));
    assert_eq!(svc.clone().oneshot(42).await.unwrap(), "backup 42");
    assert_eq!(backup_calls.load(Ordering::SeqCst), 1);

    // The backup is not called when the primary answers.
    let backup = service_fn(|_: u32| async { Ok::<_, BoxError>("backup".to_owned()) });
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let primary = service_fn(move |x: u32| {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(format!("primary {x}")) }
    });
    let svc = FallbackLayer::service(backup).layer(primary);
    assert_eq!(svc.oneshot(1).await.unwrap(), "primary 1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A service that is never ready: its `poll_ready` fails (a `Buffer` whose
/// worker died, a channel that cannot connect). It counts the calls that
/// reach it.
#[derive(Clone, Default)]
struct NeverReady(Arc<AtomicUsize>);

impl tower::Service<u32> for NeverReady {
    type Response = String;
    type Error = BoxError;
    type Future = std::future::Ready<Result<String, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Err("the dependency's connection is gone".into()))
    }

    fn call(&mut self, _: u32) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok("fresh".to_owned()))
    }
}

/// A readiness error is a failed call too: the fallback answers it, and
/// the inner service is never called. One the predicate does not select
/// stays an error.
#[tokio::test]
async fn a_readiness_error_gets_the_fallback() {
    let inner = NeverReady::default();
    let svc = FallbackLayer::value("stale".to_owned()).layer(inner.clone());
    assert_eq!(svc.oneshot(1).await.unwrap(), "stale");
    assert_eq!(inner.0.load(Ordering::SeqCst), 0);

    let svc = FallbackLayer::value("stale".to_owned())
        .when(|e: &(dyn std::error::Error + 'static)| e.to_string().contains("timeout"))
        .layer(inner);
    let err = svc.oneshot(1).await.unwrap_err();
    assert!(err.to_string().contains("connection is gone"), "{err}");
}
