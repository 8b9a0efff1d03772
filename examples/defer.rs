//! Defer: requests that fail while a dependency is down are stored, answered
//! `202 Accepted` with a job id, and replayed once it is back.
//!
//! Run: `cargo run --example defer`
//!
//! Service B (a real axum server on 127.0.0.1) is down at first: it answers
//! 503. Service A forwards `POST /orders` to B through hyper, behind an
//! attempt timeout and `defer`. While B is down, A answers each order with
//! `202` and a `firebreak-job-id`; a repeated `Idempotency-Key` gets the same
//! job. Then B comes back, a `Replayer` delivers the jobs at 5 a second, and
//! each job's status shows B's stored answer.
//!
//! The queue here is a `MemoryQueue`; use `queue::disk::DiskQueue::open(path)`
//! (the default `disk` feature) to keep deferred jobs across restarts.

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tower::ServiceBuilder;
use tower_firebreak::BoxError;
use tower_firebreak::defer::{DeferLayer, JOB_ID_HEADER, Replayer};
use tower_firebreak::http::RejectionResponseLayer;
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::queue::{JobId, JobStatus, Queue};
use tower_firebreak::timeout::TimeoutLayer;

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Service B: 503 while `down`, then creates the order.
async fn order(State(down): State<Arc<AtomicBool>>, headers: HeaderMap) -> impl IntoResponse {
    if down.load(Ordering::SeqCst) {
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
    let down = Arc::new(AtomicBool::new(true));
    let b = serve(
        Router::new()
            .route("/orders", post(order))
            .with_state(down.clone()),
    )
    .await;

    // A's client for B: the stack `defer` protects, and the replayer reuses.
    let to_b = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(2)))
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());

    let queue = MemoryQueue::new();
    let forward = ServiceBuilder::new()
        .layer(RejectionResponseLayer::new())
        .map_request(move |mut req: axum::extract::Request| {
            *req.uri_mut() = format!("http://{b}/orders").parse().unwrap();
            req
        })
        .layer(DeferLayer::new(queue.clone()).status_path("/jobs"))
        .service(to_b.clone());
    let a = serve(Router::new().route_service("/orders", forward)).await;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut ids = Vec::new();
    for key in ["order-1", "order-2", "order-3", "order-1"] {
        let req = http::Request::post(format!("http://{a}/orders"))
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from(format!("{{\"key\":\"{key}\"}}"))))?;
        let res = client.request(req).await?;
        let status = res.status();
        let id: JobId = res.headers()[JOB_ID_HEADER].to_str()?.parse()?;
        let body = res.into_body().collect().await?.to_bytes();
        println!(
            "B is down: {key} -> {status} {}",
            String::from_utf8_lossy(&body)
        );
        if status == StatusCode::ACCEPTED {
            ids.push(id);
        }
    }

    println!("B is back; replaying at 5 a second");
    down.store(false, Ordering::SeqCst);
    let replayer = Replayer::new(queue.clone(), to_b)
        .rate_per_second(5)
        .spawn();
    while queue.depth().await? > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replayer.shutdown().await;

    for id in &ids {
        if let Some(JobStatus::Delivered { status, body, .. }) = queue.status(id).await? {
            println!(
                "job {id}: delivered, B said {status} {:?}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    Ok(())
}
