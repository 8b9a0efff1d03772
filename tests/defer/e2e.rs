//! Issue 5's end-to-end test: a real downstream that fails, then hangs; a real
//! upstream that calls it through hyper with a breaker (stand-in), a timeout
//! and `defer` on a `DiskQueue`; then recovery and replay.

use super::support;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceBuilder;
use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State as BreakerState};
use tower_firebreak::classify::HttpClassifier;
use tower_firebreak::defer::{DeferLayer, JOB_ID_HEADER, Replayer, status_router};
use tower_firebreak::http::RejectionResponseLayer;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::queue::{JobId, Queue};
use tower_firebreak::timeout::TimeoutLayer;

const HEALTHY: u8 = 0;
const FAILING: u8 = 1;
const HANGING: u8 = 2;

#[derive(Default)]
struct Downstream {
    mode: AtomicU8,
    /// Successful receipts per idempotency key: the downstream dedups by
    /// key, and counts, so a second delivery of one key would show here.
    seen: Mutex<HashMap<String, u32>>,
    refused: AtomicUsize,
}

async fn orders(State(d): State<Arc<Downstream>>, headers: HeaderMap, body: Bytes) -> Response {
    match d.mode.load(Ordering::SeqCst) {
        FAILING => {
            d.refused.fetch_add(1, Ordering::SeqCst);
            (StatusCode::SERVICE_UNAVAILABLE, "down").into_response()
        }
        HANGING => std::future::pending().await,
        _ => {
            let key = headers["idempotency-key"].to_str().unwrap().to_owned();
            let first = {
                let mut seen = d.seen.lock().unwrap();
                let n = seen.entry(key.clone()).or_insert(0);
                *n += 1;
                *n == 1
            };
            let status = if first {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (
                status,
                format!("order {key}: {}", String::from_utf8_lossy(&body)),
            )
                .into_response()
        }
    }
}

async fn post_orders(
    client: &support::HttpClient,
    upstream: std::net::SocketAddr,
    keys: std::ops::Range<usize>,
) -> Vec<(String, JobId)> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in keys {
        let client = client.clone();
        tasks.spawn(async move {
            let key = format!("order-{i}");
            let req = http::Request::post(format!("http://{upstream}/orders"))
                .header("idempotency-key", &key)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!("{{\"n\":{i}}}"))))
                .unwrap();
            let res = support::send(&client, req).await;
            assert_eq!(res.status, StatusCode::ACCEPTED, "{key}: {:?}", res.body);
            assert!(res.headers.contains_key("retry-after"));
            let id: JobId = res.headers[JOB_ID_HEADER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(res.headers["location"], format!("/jobs/{id}"));
            (key, id)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        out.push(r.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_requests_are_accepted_then_delivered_exactly_once_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let queue = DiskQueue::open(dir.path().join("defer.redb")).unwrap();

    let downstream = Arc::new(Downstream::default());
    downstream.mode.store(FAILING, Ordering::SeqCst);
    let down_addr = support::serve(
        Router::new()
            .route("/orders", post(orders))
            .with_state(downstream.clone()),
    )
    .await;

    // The protected client stack: the real breaker (503s and timeouts count as
    // failures), attempt timeout, hyper. It stays open until reset, so the
    // test decides when the dependency has recovered.
    let breaker = CircuitBreakerLayer::builder()
        .count_window(20)
        .minimum_calls(10)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(600))
        .classifier(HttpClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let client_stack = ServiceBuilder::new()
        .layer(breaker)
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(support::client());

    // The upstream: a proxy route behind `defer`, and the status route.
    let proxy = ServiceBuilder::new()
        .layer(RejectionResponseLayer::new())
        .map_request(move |mut req: axum::extract::Request| {
            let path = req.uri().path_and_query().unwrap().as_str().to_owned();
            *req.uri_mut() = format!("http://{down_addr}{path}").parse().unwrap();
            req
        })
        .layer(DeferLayer::new(queue.clone()).status_path("/jobs"))
        .service(client_stack.clone());
    let upstream = support::serve(
        Router::new()
            .route_service("/orders", proxy)
            .merge(status_router(queue.clone())),
    )
    .await;
    let client = support::client();

    // The outage: 503s, then hangs, then an open breaker.
    let mut jobs = post_orders(&client, upstream, 0..100).await;
    let refused = downstream.refused.load(Ordering::SeqCst);
    assert!(refused >= 10, "the downstream saw the 503s ({refused})");
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "503s opened the breaker"
    );
    // Now the breaker answers for the downstream: the next call never reaches it.
    jobs.extend(post_orders(&client, upstream, 200..201).await);
    assert_eq!(downstream.refused.load(Ordering::SeqCst), refused);
    // Hangs: the attempt timeout answers, and the breaker opens again.
    handle.reset();
    downstream.mode.store(HANGING, Ordering::SeqCst);
    jobs.extend(post_orders(&client, upstream, 100..150).await);
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "timeouts opened the breaker"
    );
    // Healthy again, but the breaker is still open: calls are rejected fast.
    downstream.mode.store(HEALTHY, Ordering::SeqCst);
    jobs.extend(post_orders(&client, upstream, 150..200).await);
    assert!(
        downstream.seen.lock().unwrap().is_empty(),
        "nothing was delivered during the outage"
    );
    assert_eq!(jobs.len(), 201);
    let distinct: std::collections::HashSet<_> = jobs.iter().map(|(_, id)| *id).collect();
    assert_eq!(distinct.len(), 201, "one job per key");
    assert_eq!(queue.depth().await.unwrap(), 201);

    // Recovery, and replay through the same protected stack.
    handle.reset();
    let replayer = Replayer::new(queue.clone(), client_stack)
        .rate_per_second(200)
        .burst(20)
        .spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while queue.depth().await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replayer.shutdown().await;

    let seen = downstream.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 201, "every key reached the downstream");
    assert!(
        seen.values().all(|&n| n == 1),
        "exactly once per key: {:?}",
        seen.iter().filter(|(_, n)| **n != 1).collect::<Vec<_>>()
    );

    for (key, id) in &jobs {
        let res = support::get(&client, upstream, &format!("/jobs/{id}")).await;
        assert_eq!(res.status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&res.body).unwrap();
        assert_eq!(v["status"], "delivered", "{key}");
        assert_eq!(v["attempts"], 1, "{key}");
        assert_eq!(v["response"]["status"], 201, "{key}");
        let n = key.trim_start_matches("order-");
        assert_eq!(
            v["response"]["body"],
            format!("order {key}: {{\"n\":{n}}}"),
            "{key}"
        );
    }
}
