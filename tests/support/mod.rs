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

impl Answer {
    /// The `kind` of a problem-details body.
    pub fn kind(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).expect("a problem body");
        v["kind"].as_str().expect("a kind").to_owned()
    }
}

/// The crate's own handler for axum's `HandleErrorLayer`.
pub async fn handle_error(err: BoxError) -> Response {
    tower_firebreak::http::handle_error(err)
        .await
        .into_response()
}
