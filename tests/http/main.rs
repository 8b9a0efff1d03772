//! Our rejections as HTTP responses, over real sockets.

#[path = "../support/mod.rs"]
mod support;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use std::time::Duration;
use tower::{ServiceBuilder, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::BulkheadFull;
use tower_firebreak::circuit_breaker::CircuitOpen;
use tower_firebreak::http::{PROBLEM_JSON, RejectionResponseLayer, error_response, handle_error};
use tower_firebreak::rate_limit::RateLimitLayer;
use tower_firebreak::timeout::TimeoutLayer;

/// A service that always fails with `err`.
fn failing(
    err: fn() -> BoxError,
) -> impl tower::Service<
    axum::extract::Request,
    Response = axum::response::Response,
    Error = BoxError,
    Future: Send,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(
        move |_: axum::extract::Request| async move { Err::<axum::response::Response, _>(err()) },
    )
}

fn problem(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).expect("a JSON problem body")
}

#[tokio::test(start_paused = true)]
async fn each_rejection_maps_to_its_status_header_and_problem_body() {
    // (the error, its status, its kind, its Retry-After)
    type Case = (fn() -> BoxError, u16, &'static str, Option<&'static str>);
    let cases: [Case; 4] = [
        (
            || CircuitOpen::new(Duration::from_millis(2500)).into(),
            503,
            "circuit_open",
            Some("3"),
        ),
        (|| BulkheadFull::new(8).into(), 503, "bulkhead_full", None),
        (
            || tower_firebreak::deadline::DeadlineExceeded::new().into(),
            504,
            "deadline_exceeded",
            None,
        ),
        (
            || tower_firebreak::timeout::Elapsed::new(Duration::from_secs(1)).into(),
            504,
            "timeout",
            None,
        ),
    ];
    let client = support::client();
    for (err, status, kind, retry_after) in cases {
        // Both ways: HandleErrorLayer with our handler, and the infallible layer.
        let with_handler = Router::new().route_service(
            "/",
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(handle_error))
                .service(failing(err)),
        );
        let addr = support::serve(with_handler).await;
        let a = support::get(&client, addr, "/").await;
        let infallible = Router::new().route_service(
            "/",
            ServiceBuilder::new()
                .layer(RejectionResponseLayer::new())
                .service(failing(err)),
        );
        let addr = support::serve(infallible).await;
        let b = support::get(&client, addr, "/").await;
        for answer in [a, b] {
            assert_eq!(answer.status, status, "{kind}");
            assert_eq!(answer.headers[http::header::CONTENT_TYPE], PROBLEM_JSON);
            assert_eq!(
                answer
                    .headers
                    .get(http::header::RETRY_AFTER)
                    .map(|v| v.to_str().unwrap()),
                retry_after,
                "{kind}"
            );
            let p = problem(&answer.body);
            assert_eq!(p["status"], status);
            assert_eq!(p["kind"], kind);
            assert!(p["type"].as_str().unwrap().starts_with("https://"));
            assert!(!p["title"].as_str().unwrap().is_empty());
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_router_takes_our_stack_directly_and_answers_429_with_the_limiters_retry_after() {
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                "ok"
            }),
        )
        .route(
            "/hang",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                "late"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(RejectionResponseLayer::new())
                .layer(RateLimitLayer::per_second(1).burst(2))
                .layer(TimeoutLayer::new(Duration::from_secs(1))),
        );
    let addr = support::serve(app).await;
    let client = support::client();
    assert_eq!(support::get(&client, addr, "/").await.status, 200);
    let hang = support::get(&client, addr, "/hang").await;
    assert_eq!(hang.status, 504);
    assert_eq!(problem(&hang.body)["kind"], "timeout");
    // The hang took a second: the limiter refilled one permit meanwhile.
    assert_eq!(support::get(&client, addr, "/").await.status, 200);
    let limited = support::get(&client, addr, "/").await;
    assert_eq!(limited.status, 429);
    let p = problem(&limited.body);
    assert_eq!(p["kind"], "rate_limited");
    // The header is the limiter's own answer, rounded up to whole seconds.
    let ms = p["retry_after_ms"].as_u64().unwrap();
    assert!(ms > 0 && ms <= 1000, "{ms}");
    assert_eq!(limited.headers[http::header::RETRY_AFTER], "1");
}

#[test]
fn an_unknown_error_is_a_500_that_does_not_leak_its_text() {
    let err: BoxError = std::io::Error::other("password=hunter2 at db-7").into();
    let res = error_response(&*err);
    assert_eq!(res.status(), 500);
    let body = futures_body(res);
    assert!(!body.contains("hunter2"));
    assert_eq!(problem(body.as_bytes())["status"], 500);
}

fn futures_body(res: http::Response<http_body_util::Full<bytes::Bytes>>) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let b = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap();
        String::from_utf8(b.to_bytes().to_vec()).unwrap()
    })
}

#[tokio::test]
async fn retry_after_rounds_up_to_whole_seconds() {
    use tower_firebreak::http::retry_after_value;
    assert_eq!(retry_after_value(Duration::ZERO), "0");
    assert_eq!(retry_after_value(Duration::from_millis(1)), "1");
    assert_eq!(retry_after_value(Duration::from_secs(2)), "2");
    assert_eq!(retry_after_value(Duration::from_millis(2001)), "3");
    // A forced-open breaker's `open_for` may be `Duration::MAX`.
    assert_eq!(
        retry_after_value(Duration::MAX),
        u64::MAX.to_string().as_str()
    );
    let res = tower_firebreak::http::error_response(
        &tower_firebreak::circuit_breaker::CircuitOpen::new(Duration::MAX),
    );
    let bytes = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["retry_after_ms"], u64::MAX);
}

/// A real breaker behind a real socket: once open, the 503's Retry-After is
/// the time left in the open breaker (rounded up to whole seconds), not its
/// configured open time, and the problem body carries it in milliseconds.
#[tokio::test(start_paused = true)]
async fn an_open_breaker_answers_503_with_its_time_left_as_retry_after() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State};

    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .open_for(Duration::from_secs(10))
        .open_jitter(0.0)
        .build()
        .unwrap();
    let handle = breaker.handle();
    let dependency = service_fn(move |_: axum::extract::Request| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<axum::response::Response, BoxError>(std::io::Error::other("refused").into()) }
    });
    let app = Router::new().route_service(
        "/",
        ServiceBuilder::new()
            .layer(RejectionResponseLayer::new())
            .layer(breaker)
            .service(dependency),
    );
    let addr = support::serve(app).await;
    let client = support::client();
    for _ in 0..2 {
        assert_eq!(support::get(&client, addr, "/").await.status, 500);
    }
    assert_eq!(handle.state(), State::Open);
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let open = support::get(&client, addr, "/").await;
    assert_eq!(open.status, 503);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the open breaker let a call through"
    );
    let left = handle.retry_after().expect("still open");
    let header: u64 = open.headers[http::header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // 6.5 s were left: 7, within a second of the breaker's own answer.
    assert_eq!(header, 7);
    assert!(
        header.abs_diff(left.as_secs()) <= 1,
        "{header} s vs {left:?}"
    );
    let p = problem(&open.body);
    assert_eq!(p["kind"], "circuit_open");
    let ms = p["retry_after_ms"].as_u64().unwrap();
    assert!(
        ms.abs_diff(left.as_millis() as u64) <= 100,
        "{ms} ms vs {left:?}"
    );
}
