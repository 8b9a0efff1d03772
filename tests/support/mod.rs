//! Shared helpers for the integration tests: a real axum server on
//! 127.0.0.1:0 and a real hyper client.
#![allow(dead_code, unreachable_pub, missing_docs, unused_imports)]

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

/// Sends an empty-bodied `method` request for `uri` to `router` in process
/// (no socket): the status, headers and body of its answer.
pub async fn in_process(
    router: &Router,
    method: http::Method,
    uri: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    use tower::ServiceExt as _;
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(axum::body::Body::empty())
        .unwrap();
    let (parts, body) = router.clone().oneshot(req).await.unwrap().into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

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

// ---- breaker-test helpers: a commandable service that counts its calls ----

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Service, ServiceExt, service_fn};

/// What the test service should do with one request.
#[derive(Clone)]
pub enum Cmd {
    Ok,
    Fail,
    /// An error the given value becomes (our own rejections, for instance).
    Error(Arc<dyn Fn() -> BoxError + Send + Sync>),
    /// Succeed after this long.
    Slow(Duration),
    /// Never answer.
    Hang,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Ok => f.write_str("Ok"),
            Cmd::Fail => f.write_str("Fail"),
            Cmd::Error(_) => f.write_str("Error(..)"),
            Cmd::Slow(d) => write!(f, "Slow({d:?})"),
            Cmd::Hang => f.write_str("Hang"),
        }
    }
}

/// A service that obeys `Cmd` and counts the calls that reach it.
#[derive(Clone, Debug, Default)]
pub struct Counter {
    pub calls: Arc<AtomicUsize>,
    /// Inner futures alive right now.
    pub live: Arc<AtomicUsize>,
    pub max_live: Arc<AtomicUsize>,
}

struct LiveGuard(Counter);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

type BoxFut = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

impl Counter {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn service(
        &self,
    ) -> impl Service<Cmd, Response = (), Error = BoxError, Future = BoxFut> + Clone + Send + use<>
    {
        let me = self.clone();
        service_fn(move |cmd: Cmd| -> BoxFut {
            me.calls.fetch_add(1, Ordering::SeqCst);
            let live = me.live.fetch_add(1, Ordering::SeqCst) + 1;
            me.max_live.fetch_max(live, Ordering::SeqCst);
            let guard = LiveGuard(me.clone());
            Box::pin(async move {
                let _guard = guard;
                match cmd {
                    Cmd::Ok => Ok(()),
                    Cmd::Fail => Err("dependency failed".into()),
                    Cmd::Error(f) => Err(f()),
                    Cmd::Slow(d) => {
                        tokio::time::sleep(d).await;
                        Ok(())
                    }
                    Cmd::Hang => std::future::pending().await,
                }
            })
        })
    }
}

/// Calls `svc` once with `ready().await` and `call`.
pub async fn call<S>(svc: &mut S, cmd: Cmd) -> Result<(), BoxError>
where
    S: Service<Cmd, Response = (), Error = BoxError>,
{
    svc.ready().await?.call(cmd).await
}

/// Drives `svc` from `tasks` tasks at once, `calls` calls each (request
/// `task * 1000 + i`), each call's result checked by `check`; fails if
/// they have not all finished within 60 s (a stall, such as a lost
/// wake-up).
pub async fn hammer<S, R>(svc: S, tasks: u32, calls: u32, check: fn(u32, Result<R, BoxError>))
where
    S: tower::Service<u32, Response = R> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    R: Send + 'static,
{
    use tower::ServiceExt as _;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let svc = svc.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..calls {
                let req = t * 1000 + i;
                check(req, svc.clone().oneshot(req).await.map_err(Into::into));
            }
        }));
    }
    let all = async {
        for h in handles {
            h.await.unwrap();
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("every call finished");
}
