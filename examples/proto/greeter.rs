//! `demo.Greeter` (examples/proto/greeter.proto), written by hand the way
//! tonic-build would generate it: the prost messages, the server's routing,
//! and a client call. Shared by the `tonic_server` and `tonic_client`
//! examples through `#[path]`.

use bytes::Bytes;
use http::uri::PathAndQuery;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::{Status, server::NamedService};
use tonic_prost::ProstCodec;
use tower::Service;
use tower_firebreak::BoxError;

/// The request of `SayHello`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HelloRequest {
    #[prost(string, tag = "1")]
    pub(crate) name: String,
}

/// The reply of `SayHello`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct HelloReply {
    #[prost(string, tag = "1")]
    pub(crate) message: String,
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The server: greets; `slow` takes 3 s, `down` fails with UNAVAILABLE, and
/// every fifth other call fails once with UNAVAILABLE (a flaky dependency
/// that a retry hides).
#[derive(Clone, Default)]
pub(crate) struct Greeter {
    pub(crate) calls: Arc<AtomicU64>,
}

impl NamedService for Greeter {
    const NAME: &'static str = "demo.Greeter";
}

struct SayHello(Greeter);

impl tonic::server::UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = BoxFut<Result<tonic::Response<HelloReply>, Status>>;

    fn call(&mut self, req: tonic::Request<HelloRequest>) -> Self::Future {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let name = req.into_inner().name;
            match name.as_str() {
                "down" => return Err(Status::unavailable("greeter is down")),
                "slow" => tokio::time::sleep(Duration::from_secs(3)).await,
                _ if n % 5 == 4 => return Err(Status::unavailable("greeter hiccup")),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            Ok(tonic::Response::new(HelloReply {
                message: format!("hello, {name}"),
            }))
        })
    }
}

impl Service<http::Request<Body>> for Greeter {
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
                "/demo.Greeter/SayHello" => {
                    let mut grpc =
                        tonic::server::Grpc::new(ProstCodec::<HelloReply, HelloRequest>::default());
                    Ok(grpc.unary(SayHello(me), req).await)
                }
                _ => Ok(Status::unimplemented("no such method").into_http()),
            }
        })
    }
}

/// One `SayHello` call on `svc`, as a generated client makes it.
#[allow(dead_code)] // the server example does not call
pub(crate) async fn say_hello<S>(svc: S, name: &str) -> Result<String, Status>
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<BoxError>,
    S::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
{
    let mut client = tonic::client::Grpc::new(svc);
    client
        .ready()
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    client
        .unary(
            tonic::Request::new(HelloRequest {
                name: name.to_owned(),
            }),
            PathAndQuery::from_static("/demo.Greeter/SayHello"),
            ProstCodec::<HelloRequest, HelloReply>::default(),
        )
        .await
        .map(|r| r.into_inner().message)
}

/// What the server answered: calls that reached the handler, and our
/// layers' rejections by kind.
#[derive(Clone, Default)]
pub(crate) struct Tally {
    pub(crate) rejected: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl Tally {
    fn observe(&self, e: BoxError) -> BoxError {
        let kind = tower_firebreak::error::Rejection::of(&*e)
            .map(|r| r.kind().to_string())
            .unwrap_or_else(|| "other error".to_owned());
        *self.rejected.lock().unwrap().entry(kind).or_default() += 1;
        e
    }
}

/// Serves `greeter` on `listener` until `stop` completes, protected on the
/// server side: a rate limit of 10 a second (burst 10), at most 4 calls in
/// flight, and a 5 s deadline that the caller's `grpc-timeout` shortens.
/// `GrpcRejectionLayer` answers each rejection with its gRPC status.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    greeter: Greeter,
    tally: Tally,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use tower_firebreak::bulkhead::BulkheadLayer;
    use tower_firebreak::deadline::DeadlineLayer;
    use tower_firebreak::grpc::GrpcRejectionLayer;
    use tower_firebreak::rate_limit::RateLimitLayer;

    let protection = tower::ServiceBuilder::new()
        .layer(GrpcRejectionLayer::new())
        .map_err(move |e: BoxError| tally.observe(e))
        .layer(RateLimitLayer::per_second(10).burst(10))
        .layer(BulkheadLayer::new(4))
        .layer(DeadlineLayer::new(Duration::from_secs(5)));
    tonic::transport::Server::builder()
        .layer(protection)
        .add_service(greeter)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), stop)
        .await
}
