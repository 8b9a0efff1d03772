//! End to end through a real tonic server and a tonic client on a real
//! channel: the retry stack sits between `tonic::client::Grpc` and the
//! `Channel`. The proto is `tests/proto/echo.proto`.

use http::uri::PathAndQuery;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::transport::{Channel, Server, server::TcpIncoming};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower::{Service, ServiceBuilder};
use tower_firebreak::retry::{BufferRequestBodyLayer, ReplayBody, RetryLayer, RetryPolicy};

#[derive(Clone, PartialEq, prost::Message)]
struct SayRequest {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SayReply {
    #[prost(string, tag = "1")]
    message: String,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `test.Echo`, hand-written the way tonic's generated server is: fails the
/// first `failures` calls with `code`, then echoes.
#[derive(Clone)]
struct Echo {
    failures: u32,
    code: Code,
    pushback: Option<&'static str>,
    calls: Arc<AtomicU32>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Say(Echo);

impl tonic::server::UnaryService<SayRequest> for Say {
    type Response = SayReply;
    type Future = BoxFut<Result<tonic::Response<SayReply>, Status>>;

    fn call(&mut self, req: tonic::Request<SayRequest>) -> Self::Future {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
        let (failures, code, pushback) = (self.0.failures, self.0.code, self.0.pushback);
        Box::pin(async move {
            if n < failures {
                let mut md = tonic::metadata::MetadataMap::new();
                if let Some(p) = pushback {
                    md.insert("grpc-retry-pushback-ms", p.parse().unwrap());
                }
                return Err(Status::with_metadata(code, format!("failure {n}"), md));
            }
            Ok(tonic::Response::new(SayReply {
                message: format!("hello, {}", req.into_inner().name),
            }))
        })
    }
}

impl Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFut<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            match req.uri().path() {
                "/test.Echo/Say" => {
                    let mut grpc =
                        tonic::server::Grpc::new(ProstCodec::<SayReply, SayRequest>::default());
                    Ok(grpc.unary(Say(me), req).await)
                }
                _ => Ok(Status::unimplemented("no such method").into_http()),
            }
        })
    }
}

/// Serves `echo` on 127.0.0.1:0 and returns a connected channel.
async fn serve(echo: Echo) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(echo)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn say(failures: u32, code: Code) -> (Result<String, Status>, u32) {
    say_with(failures, code, None).await
}

async fn say_with(
    failures: u32,
    code: Code,
    pushback: Option<&'static str>,
) -> (Result<String, Status>, u32) {
    let calls = Arc::new(AtomicU32::new(0));
    let channel = serve(Echo {
        failures,
        code,
        pushback,
        calls: calls.clone(),
    })
    .await;
    let stack = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::exponential(Duration::from_millis(10))
                .max_attempts(3)
                .no_jitter()
                .http(),
        ))
        .map_request(|r: http::Request<ReplayBody<Body>>| r.map(Body::new))
        .service(channel);
    let mut client = tonic::client::Grpc::new(stack);
    client.ready().await.unwrap();
    let res = client
        .unary(
            tonic::Request::new(SayRequest {
                name: "firebreak".into(),
            }),
            PathAndQuery::from_static("/test.Echo/Say"),
            ProstCodec::<SayRequest, SayReply>::default(),
        )
        .await
        .map(|r| r.into_inner().message);
    (res, calls.load(Ordering::SeqCst))
}

#[tokio::test]
async fn unavailable_twice_then_ok_is_retried_to_success() {
    let (res, calls) = say(2, Code::Unavailable).await;
    assert_eq!(res.unwrap(), "hello, firebreak");
    assert_eq!(calls, 3);
}

#[tokio::test]
async fn unavailable_past_max_attempts_returns_the_status() {
    let (res, calls) = say(5, Code::Unavailable).await;
    assert_eq!(res.unwrap_err().code(), Code::Unavailable);
    assert_eq!(calls, 3);
}

#[tokio::test]
async fn other_codes_are_not_retried() {
    let (res, calls) = say(1, Code::InvalidArgument).await;
    assert_eq!(res.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(calls, 1);
    let (res, calls) = say(1, Code::ResourceExhausted).await;
    assert_eq!(res.unwrap_err().code(), Code::ResourceExhausted);
    assert_eq!(calls, 1, "RESOURCE_EXHAUSTED without pushback was retried");
}

#[tokio::test]
async fn resource_exhausted_with_pushback_is_retried_after_it() {
    let t0 = tokio::time::Instant::now();
    let (res, calls) = say_with(1, Code::ResourceExhausted, Some("200")).await;
    assert_eq!(res.unwrap(), "hello, firebreak");
    assert_eq!(calls, 2);
    // The pushback (200 ms), not the 10 ms backoff, set the delay.
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
}
