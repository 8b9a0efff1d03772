//! Shared helpers for the integration tests: a real axum server on
//! 127.0.0.1:0 and a real hyper client.
#![allow(dead_code, unreachable_pub, missing_docs)]

use axum::Router;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use tower_firebreak::BoxError;
use tower_firebreak::error::{Rejection, RejectionKind};

/// Serves `router` on 127.0.0.1:0 in a background task and returns its address.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    addr
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends a request and reads the whole answer.
pub async fn send(client: &HttpClient, req: http::Request<Full<Bytes>>) -> Answer {
    let res = client.request(req).await.expect("request failed");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Answer {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap();
    send(client, req).await
}

/// Maps our rejections to HTTP the way DESIGN.md's table does, for tests
/// written before the crate's own HTTP module.
pub async fn handle_error(err: BoxError) -> Response {
    let Some(r) = Rejection::of(&*err) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response();
    };
    let status = match r.kind() {
        RejectionKind::Timeout | RejectionKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        RejectionKind::CircuitOpen | RejectionKind::BulkheadFull => StatusCode::SERVICE_UNAVAILABLE,
        RejectionKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut res = (status, r.kind().as_str().to_owned()).into_response();
    if let Some(after) = r.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, secs.into());
    }
    res
}
