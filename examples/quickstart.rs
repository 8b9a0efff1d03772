//! Quickstart: an axum service A whose dependency B is flaky, protected by
//! firebreak's layers. Prints what each request got and how long it took.
//!
//! Run: `cargo run --example quickstart`
//!
//! B (a real axum server on 127.0.0.1) answers most calls at once but hangs
//! for 5 s on every third one. A calls B through hyper, behind a deadline and
//! an attempt timeout, and A's own route is guarded by a rate limit and a
//! bulkhead. Without the layers, every third caller of A would wait 5 s and
//! A's in-flight requests would pile up; with them, no call takes longer than
//! the attempt timeout and the excess is shed at once with a clear status.

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::BulkheadLayer;
use tower_firebreak::deadline::{DeadlineLayer, PropagateDeadlineLayer};
use tower_firebreak::error::Rejection;
use tower_firebreak::rate_limit::RateLimitLayer;
use tower_firebreak::timeout::TimeoutLayer;

type Upstream = BoxCloneSyncService<
    http::Request<Full<Bytes>>,
    http::Response<hyper::body::Incoming>,
    BoxError,
>;

/// A failed call to B as A's answer: our rejections per DESIGN.md's table
/// (504, 503, 429 + Retry-After, problem-details bodies); anything else is B's
/// failure, a 502.
fn to_response(err: &BoxError) -> Response {
    if Rejection::of(&**err).is_none() {
        return (StatusCode::BAD_GATEWAY, format!("dependency failed: {err}")).into_response();
    }
    tower_firebreak::http::error_response(&**err).into_response()
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Service B: hangs for 5 s on every third call.
async fn start_b() -> SocketAddr {
    let n = Arc::new(AtomicU64::new(0));
    let app = Router::new().route(
        "/work",
        get(move || {
            let n = n.fetch_add(1, Ordering::SeqCst);
            async move {
                if n % 3 == 2 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                format!("work #{n} done")
            }
        }),
    );
    serve(app).await
}

#[derive(Clone)]
struct AppState {
    b: SocketAddr,
    client: Upstream,
}

/// A's handler: calls B through the protected client.
async fn handler(State(s): State<AppState>) -> Response {
    let req = http::Request::get(format!("http://{}/work", s.b))
        .body(Full::default())
        .unwrap();
    match s.client.oneshot(req).await {
        Ok(res) => {
            let status = res.status();
            let body = res.into_body().collect().await.map(|b| b.to_bytes());
            (status, body.unwrap_or_default()).into_response()
        }
        Err(err) => to_response(&err),
    }
}

#[tokio::main]
async fn main() {
    let b = start_b().await;

    // Protect the calls to B: 1 s for the whole call, 300 ms per attempt,
    // and the time left written onto the request for B to honour.
    let hyper = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)).read_headers(false))
        .layer(TimeoutLayer::new(Duration::from_millis(300)))
        .layer(PropagateDeadlineLayer::new())
        .service(hyper)
        .map_err(BoxError::from);
    let state = AppState {
        b,
        client: BoxCloneSyncService::new(client),
    };

    // Protect A itself: at most 20 requests a second (burst 10) and 4 at once.
    let a = Router::new()
        .route("/", get(handler))
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(tower_firebreak::http::handle_error))
                .layer(RateLimitLayer::per_second(20).burst(10))
                .layer(BulkheadLayer::new(4)),
        );
    let a = serve(a).await;
    println!("B (flaky: every third call hangs 5 s) on {b}; A on {a}\n");

    let caller = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let call = |i: usize| {
        let caller = caller.clone();
        async move {
            let start = Instant::now();
            let res = caller
                .request(
                    http::Request::get(format!("http://{a}/"))
                        .body(Full::default())
                        .unwrap(),
                )
                .await
                .expect("A answers");
            let status = res.status();
            let retry = res
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| format!(" (Retry-After: {}s)", v.to_str().unwrap()))
                .unwrap_or_default();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            // Our rejections carry a problem-details body; show its kind.
            let text = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|p| p["kind"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            println!(
                "request {i:>2} -> {} {:<24} in {:>4} ms{retry}",
                status.as_u16(),
                text,
                start.elapsed().as_millis()
            );
            status
        }
    };

    println!("-- a burst of 12 requests at once --");
    let burst: Vec<_> = (1..=12).map(|i| tokio::spawn(call(i))).collect();
    let mut statuses = Vec::new();
    for h in burst {
        statuses.push(h.await.unwrap());
    }
    println!("\n-- then 12 requests, one every 100 ms --");
    for i in 13..=24 {
        statuses.push(call(i).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = |s: u16| statuses.iter().filter(|x| x.as_u16() == s).count();
    println!(
        "\nsummary: {} ok, {} timed out (504), {} shed by the bulkhead (503), {} rate limited (429)",
        count(200),
        count(504),
        count(503),
        count(429)
    );
    println!("no caller waited for B's 5 s hang: the attempt timeout answered within 300 ms.");
}
