//! Protect your own axum server with the server preset, and see what a burst
//! of requests gets.
//!
//! Run: `cargo run --example axum_server --features axum`
//!
//! The `Router` takes `Resilience::server()` directly with `.layer(...)`:
//! a rate limit of 20 a second, at most 4 requests in flight, and a 300 ms
//! deadline per request. The example fires 30 requests at once at `/work`
//! (each takes 50 ms), prints how many got `200`, `429 Too Many Requests`
//! (with the limiter's `Retry-After`) and `503 Service Unavailable` (the
//! bulkhead shed them), then calls `/slow`, which the deadline cuts with a
//! `504` and a problem-details body. It ends by itself.

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::time::Duration;
use tower_firebreak::BoxError;
use tower_firebreak::preset::Resilience;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Five lines of protection: the preset, built once, checked at build().
    let protection = Resilience::server()
        .rate_limit(20)
        .bulkhead(4)
        .deadline(Duration::from_millis(300))
        .build()?;
    let app = Router::new()
        .route(
            "/work",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                "done"
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "too late"
            }),
        )
        .layer(protection.infallible());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    println!("serving on http://{addr}: rate limit 20/s, bulkhead 4, deadline 300 ms");

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            let req = http::Request::get(format!("http://{addr}{path}")).body(Empty::new())?;
            let res = client.request(req).await?;
            let status = res.status();
            let retry_after = res
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap_or("?").to_owned());
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, retry_after, body))
        }
    };

    println!("a burst of 30 requests to /work:");
    let burst: Vec<_> = (0..30).map(|_| tokio::spawn(get("/work"))).collect();
    let mut tally: BTreeMap<u16, usize> = BTreeMap::new();
    let mut shown = BTreeMap::new();
    for call in burst {
        let (status, retry_after, body) = call.await??;
        *tally.entry(status.as_u16()).or_default() += 1;
        shown.entry(status.as_u16()).or_insert((retry_after, body));
    }
    for (status, n) in &tally {
        let (retry_after, body) = &shown[status];
        let retry_after = retry_after
            .as_ref()
            .map(|s| format!(", Retry-After: {s}"))
            .unwrap_or_default();
        println!(
            "  {n:2} x {status}{retry_after}: {}",
            String::from_utf8_lossy(body)
        );
    }

    // Let the limiter refill before the last call.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _, body) = get("/slow").await?;
    println!(
        "/slow (5 s of work) -> {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}
