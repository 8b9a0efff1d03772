//! A gateway (service A) calling a flaky service B through hyper, with the
//! client preset and `defer` on the disk queue.
//!
//! Run: `cargo run --example axum_gateway --features axum`
//!
//! A forwards `POST /orders` to B through hyper's client, behind
//! `Resilience::builder()` (deadline, retry, breaker, attempt timeout) and a
//! `DeferLayer` on a `DiskQueue` in a temporary directory; the jobs status
//! route (`GET /jobs/{id}`) is mounted on A. B is down at first: A answers
//! each order `202 Accepted` with a `firebreak-job-id`, after fsyncing it.
//! Then B comes back, flaky (it fails every third call), a `Replayer`
//! drains the queue through the same client stack, and the example polls
//! A's status route until every job reads `delivered`. It ends by itself.

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tower::ServiceBuilder;
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::CircuitBreakerConfig;
use tower_firebreak::defer::{DeferLayer, JOB_ID_HEADER, Replayer, status_router};
use tower_firebreak::http::RejectionResponseLayer;
use tower_firebreak::preset::{Resilience, ResilienceConfig};
use tower_firebreak::queue::JobId;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::retry::ReplayBody;

async fn serve(router: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Ok(addr)
}

#[derive(Clone, Default)]
struct B {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

/// Service B: 503 while down; once up, still fails every third call.
async fn order(State(b): State<B>, headers: HeaderMap) -> impl IntoResponse {
    let n = b.calls.fetch_add(1, Ordering::SeqCst);
    if b.down.load(Ordering::SeqCst) || n % 3 == 2 {
        return (StatusCode::SERVICE_UNAVAILABLE, "down".to_owned());
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    (StatusCode::CREATED, format!("order {key} created"))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let b = B::default();
    b.down.store(true, Ordering::SeqCst);
    let b_addr = serve(
        Router::new()
            .route("/orders", post(order))
            .with_state(b.clone()),
    )
    .await?;

    // A's client for B: the standard client pipeline around hyper. The
    // preset buffers request bodies so that retries can replay them, so the
    // hyper client takes `ReplayBody<_>` bodies.
    let preset = Resilience::builder()
        .deadline(Duration::from_secs(3))
        .attempt_timeout(Duration::from_millis(500))
        .max_attempts(3)
        .circuit_breaker(CircuitBreakerConfig {
            open_for: Duration::from_secs(1),
            ..ResilienceConfig::default_breaker()
        })
        .build()?;
    let breaker = preset.breaker();
    let hyper = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let to_b = ServiceBuilder::new().layer(preset).service(hyper);

    let dir = tempfile::tempdir()?;
    let queue = DiskQueue::open(dir.path().join("jobs.redb"))?;
    let forward = ServiceBuilder::new()
        .layer(RejectionResponseLayer::new())
        .map_request(move |mut req: axum::extract::Request| {
            *req.uri_mut() = format!("http://{b_addr}/orders").parse().unwrap();
            req
        })
        .layer(DeferLayer::new(queue.clone()).status_path("/jobs"))
        .service(to_b.clone());
    let a = serve(
        Router::new()
            .route_service("/orders", forward)
            .merge(status_router(queue.clone())),
    )
    .await?;
    println!(
        "B on {b_addr} is down; A on {a} defers to {}",
        dir.path().display()
    );

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut ids = Vec::new();
    for key in ["order-1", "order-2", "order-3"] {
        let req = http::Request::post(format!("http://{a}/orders"))
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from(format!("{{\"key\":\"{key}\"}}"))))?;
        let res = client.request(req).await?;
        let status = res.status();
        let id = res
            .headers()
            .get(JOB_ID_HEADER)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        println!("POST /orders {key} -> {status}, job {id:?}");
        if status == StatusCode::ACCEPTED {
            ids.push(id.unwrap_or_default().parse::<JobId>()?);
        }
    }
    println!("the breaker on A's calls to B is {:?}", breaker.state());

    println!("B is back (flaky); replaying the queue");
    b.down.store(false, Ordering::SeqCst);
    // Gated on the breaker: nothing is leased while it is open.
    let replayer = Replayer::new(queue.clone(), to_b)
        .rate_per_second(5)
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
        .breaker(breaker.clone())
        .spawn();

    let status_client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut last = vec![String::new(); ids.len()];
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut delivered = 0;
        for (i, id) in ids.iter().enumerate() {
            let req = http::Request::get(format!("http://{a}/jobs/{id}")).body(Empty::new())?;
            let res = status_client.request(req).await?;
            let body = res.into_body().collect().await?.to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body)?;
            let state = json["status"].as_str().unwrap_or("?").to_owned();
            if state != last[i] {
                println!("GET /jobs/{id} -> {json}");
                last[i] = state.clone();
            }
            if state == "delivered" {
                delivered += 1;
            }
        }
        if delivered == ids.len() {
            println!(
                "all {delivered} jobs delivered; B saw {} calls",
                b.calls.load(Ordering::SeqCst)
            );
            break;
        }
        if tokio::time::Instant::now() > give_up {
            println!("gave up waiting: {delivered} of {} delivered", ids.len());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replayer.shutdown().await;
    Ok(())
}
