//! End to end over HTTP/1: a real axum Router on 127.0.0.1:0 that answers
//! 503, called through a real hyper client behind BufferRequestBody and Retry.

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tower::{ServiceBuilder, ServiceExt};
use tower_firebreak::retry::{BufferRequestBodyLayer, ReplayBody, RetryLayer, RetryPolicy};

/// Serves a router whose every route answers 503 and counts its hits.
async fn serve_503() -> (String, Arc<AtomicU32>) {
    let hits = Arc::new(AtomicU32::new(0));
    let app = axum::Router::new().fallback({
        let hits = hits.clone();
        move || {
            hits.fetch_add(1, Ordering::SeqCst);
            async { StatusCode::SERVICE_UNAVAILABLE }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/orders"), hits)
}

async fn send(req: Request<Full<Bytes>>) -> StatusCode {
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::exponential(Duration::from_millis(5))
                .max_attempts(3)
                .http(),
        ))
        .service(client);
    svc.oneshot(req).await.unwrap().status()
}

fn request(method: Method, uri: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(b"{\"qty\":1}")))
        .unwrap()
}

#[tokio::test]
async fn a_post_without_idempotency_key_reaches_the_server_once() {
    let (uri, hits) = serve_503().await;
    assert_eq!(send(request(Method::POST, &uri, None)).await, 503);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_post_with_idempotency_key_is_retried() {
    let (uri, hits) = serve_503().await;
    assert_eq!(
        send(request(Method::POST, &uri, Some("order-7"))).await,
        503
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_get_is_retried() {
    let (uri, hits) = serve_503().await;
    assert_eq!(send(request(Method::GET, &uri, None)).await, 503);
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}
