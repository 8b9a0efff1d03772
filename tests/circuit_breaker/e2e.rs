//! End to end: an axum downstream that starts failing, an upstream hyper
//! client behind the breaker with the HTTP classifier, served by axum.

use axum::Router;
use axum::extract::State as AxumState;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Layer, ServiceExt};
use tower_firebreak::circuit_breaker::{
    CircuitBreaker, CircuitBreakerHandle, CircuitBreakerLayer, CircuitOpen, State,
};
use tower_firebreak::classify::HttpClassifier;
use tower_firebreak::error;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[derive(Default)]
struct Downstream {
    failing: AtomicBool,
    hits: AtomicUsize,
}

async fn downstream(AxumState(d): AxumState<Arc<Downstream>>) -> StatusCode {
    d.hits.fetch_add(1, Ordering::SeqCst);
    if d.failing.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

#[derive(Clone)]
struct Upstream {
    client: CircuitBreaker<HttpClient, HttpClassifier>,
    downstream: SocketAddr,
}

/// The mapping issue 7 will provide for everyone: CircuitOpen → 503 with
/// Retry-After, in whole seconds rounded up.
async fn upstream(AxumState(up): AxumState<Upstream>) -> Response {
    let req = http::Request::get(format!("http://{}/", up.downstream))
        .body(Empty::new())
        .unwrap();
    match up.client.clone().oneshot(req).await {
        Ok(res) => res.status().into_response(),
        Err(err) => match error::find::<CircuitOpen>(&*err) {
            Some(open) => {
                let secs = open.retry_after().as_secs_f64().ceil() as u64;
                let mut res = StatusCode::SERVICE_UNAVAILABLE.into_response();
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                res
            }
            None => StatusCode::BAD_GATEWAY.into_response(),
        },
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn get_status(client: &HttpClient, addr: SocketAddr) -> (StatusCode, Option<String>) {
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    let res = client.request(req).await.unwrap();
    let retry = res
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status(), retry)
}

#[tokio::test]
async fn breaker_opens_fails_fast_and_recovers() {
    let down = Arc::new(Downstream::default());
    let down_addr = serve(
        Router::new()
            .route("/", get(downstream))
            .with_state(down.clone()),
    )
    .await;

    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(5)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(1))
        .half_open_calls(2)
        .classifier(HttpClassifier::new())
        .build()
        .unwrap();
    let handle: CircuitBreakerHandle = layer.handle();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let up = Upstream {
        client: layer.layer(client.clone()),
        downstream: down_addr,
    };
    let up_addr = serve(Router::new().route("/", get(upstream)).with_state(up)).await;

    // Healthy.
    for _ in 0..3 {
        assert_eq!(get_status(&client, up_addr).await, (StatusCode::OK, None));
    }
    assert_eq!(down.hits.load(Ordering::SeqCst), 3);

    // The downstream starts failing: 503s pass through until the third
    // failure makes 3 of 6 calls, and the breaker opens.
    down.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            get_status(&client, up_addr).await,
            (StatusCode::SERVICE_UNAVAILABLE, None)
        );
    }
    assert_eq!(handle.state(), State::Open);
    let hits_when_opened = down.hits.load(Ordering::SeqCst);
    assert_eq!(hits_when_opened, 6);

    // Open: fail fast with Retry-After; the downstream sees nothing.
    for _ in 0..20 {
        assert_eq!(
            get_status(&client, up_addr).await,
            (StatusCode::SERVICE_UNAVAILABLE, Some("1".to_owned()))
        );
    }
    assert_eq!(down.hits.load(Ordering::SeqCst), hits_when_opened);

    // The downstream recovers; after open_for two probes close the breaker.
    down.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    assert_eq!(handle.state(), State::HalfOpen);
    for _ in 0..2 {
        assert_eq!(get_status(&client, up_addr).await, (StatusCode::OK, None));
    }
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(down.hits.load(Ordering::SeqCst), hits_when_opened + 2);
    assert_eq!(get_status(&client, up_addr).await, (StatusCode::OK, None));
}
