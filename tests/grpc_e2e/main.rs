//! DESIGN.md's gRPC column end to end: a real tonic `Server` and a real
//! tonic `Channel` on 127.0.0.1:0, our layers on either side, the codes and
//! `grpc-retry-pushback-ms` as a generated client sees them, and
//! `grpc-timeout` carried from the client's deadline to the server's.
//!
//! The messages are `tests/proto/echo.proto`, written by hand with prost's
//! derive as in `tests/retry/grpc.rs`, so no protoc is needed. Real time,
//! not paused: hyper's HTTP/2 connection runs its own timers.
#![cfg(feature = "tonic")]

use bytes::Bytes;
use http::uri::PathAndQuery;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::{Channel, Server, server::TcpIncoming};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower::{Service, ServiceBuilder};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::BulkheadLayer;
use tower_firebreak::circuit_breaker::{CircuitBreakerHandle, CircuitBreakerLayer};
use tower_firebreak::classify::GrpcClassifier;
use tower_firebreak::deadline::{self, DeadlineExceeded, DeadlineLayer, PropagateDeadlineLayer};
use tower_firebreak::error::find;
use tower_firebreak::grpc::{GrpcRejectionLayer, PUSHBACK_HEADER, StatusLayer};
use tower_firebreak::rate_limit::RateLimitLayer;

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

/// `test.Echo`: fails its first `failures` calls with UNAVAILABLE, takes
/// `delay` to answer, and records the deadline it ran under.
#[derive(Clone, Default)]
struct Echo {
    failures: u32,
    delay: Duration,
    calls: Arc<AtomicU32>,
    /// `deadline::current()`'s time left when the handler started.
    budget_seen: Arc<Mutex<Option<Duration>>>,
}

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Say(Echo);

impl tonic::server::UnaryService<SayRequest> for Say {
    type Response = SayReply;
    type Future = BoxFut<Result<tonic::Response<SayReply>, Status>>;

    fn call(&mut self, req: tonic::Request<SayRequest>) -> Self::Future {
        let echo = self.0.clone();
        let n = echo.calls.fetch_add(1, Ordering::SeqCst);
        *echo.budget_seen.lock().unwrap() =
            deadline::current().map(|at| at.saturating_duration_since(Instant::now()));
        Box::pin(async move {
            if n < echo.failures {
                return Err(Status::unavailable(format!("handler failure {n}")));
            }
            tokio::time::sleep(echo.delay).await;
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

/// Serves `$echo` behind `Server::builder().layer($layer)` on 127.0.0.1:0
/// and returns a connected `Channel`.
macro_rules! serve {
    ($layer:expr, $echo:expr) => {{
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .layer($layer)
                .add_service($echo)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }};
}

/// One `Say` call through a generated-style client on `svc`.
async fn say<S>(svc: S) -> Result<String, Status>
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
            tonic::Request::new(SayRequest {
                name: "firebreak".into(),
            }),
            PathAndQuery::from_static("/test.Echo/Say"),
            ProstCodec::<SayRequest, SayReply>::default(),
        )
        .await
        .map(|r| r.into_inner().message)
}

fn pushback_ms(status: &Status) -> Option<u64> {
    status
        .metadata()
        .get(PUSHBACK_HEADER)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

fn grpc_breaker(open_for: Duration) -> CircuitBreakerLayer<GrpcClassifier> {
    CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .open_for(open_for)
        .classifier(GrpcClassifier::new())
        .build()
        .unwrap()
}

/// The pushback of an open breaker must be its time left: read the handle
/// right after the call, the pushback can only be a little larger.
fn assert_pushback_is_time_left(status: &Status, handle: &CircuitBreakerHandle) {
    let pushback = pushback_ms(status).expect("an open breaker's pushback");
    let left = handle
        .retry_after()
        .expect("the breaker is open")
        .as_millis() as u64;
    assert!(
        pushback >= left && pushback <= left + 200,
        "pushback {pushback} ms, time left {left} ms"
    );
}

/// The limiter allowed its one call at `t0`; `pushback` must be the time to
/// its next permit (1 s after `t0`), not a constant.
fn assert_pushback_is_next_permit(status: &Status, t0: Instant) {
    let pushback = pushback_ms(status).expect("a limiter's pushback");
    let waited = t0.elapsed().as_millis() as u64;
    assert!(
        pushback <= 1000 - 250 && pushback + waited >= 1000 - 50,
        "pushback {pushback} ms after {waited} ms"
    );
}

// ---- the server side: Server::builder().layer(GrpcRejectionLayer ...) ----

#[tokio::test]
async fn server_rate_limit_is_resource_exhausted_with_the_limiters_pushback() {
    let echo = Echo::default();
    let channel = serve!(
        ServiceBuilder::new()
            .layer(GrpcRejectionLayer::new())
            .layer(RateLimitLayer::per_second(1).burst(1)),
        echo.clone()
    );
    let t0 = Instant::now();
    assert_eq!(say(channel.clone()).await.unwrap(), "hello, firebreak");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = say(channel).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_pushback_is_next_permit(&status, t0);
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_bulkhead_is_resource_exhausted_without_pushback() {
    let echo = Echo {
        delay: Duration::from_millis(500),
        ..Echo::default()
    };
    let channel = serve!(
        ServiceBuilder::new()
            .layer(GrpcRejectionLayer::new())
            .layer(BulkheadLayer::new(1)),
        echo.clone()
    );
    let first = tokio::spawn(say(channel.clone()));
    while echo.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = say(channel).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(pushback_ms(&status), None);
    assert_eq!(first.await.unwrap().unwrap(), "hello, firebreak");
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_open_breaker_is_unavailable_with_its_time_left() {
    let echo = Echo {
        failures: 2,
        ..Echo::default()
    };
    let breaker = grpc_breaker(Duration::from_secs(5));
    let handle = breaker.handle();
    let channel = serve!(
        ServiceBuilder::new()
            .layer(GrpcRejectionLayer::new())
            .layer(breaker),
        echo.clone()
    );
    for _ in 0..2 {
        let status = say(channel.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(pushback_ms(&status), None, "the handler's own failure");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = say(channel).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_pushback_is_time_left(&status, &handle);
    assert!(pushback_ms(&status).unwrap() <= 4600, "{status:?}");
    assert_eq!(
        echo.calls.load(Ordering::SeqCst),
        2,
        "the open breaker let a call through"
    );
}

#[tokio::test]
async fn server_deadline_is_deadline_exceeded() {
    let echo = Echo {
        delay: Duration::from_secs(5),
        ..Echo::default()
    };
    let channel = serve!(
        ServiceBuilder::new()
            .layer(GrpcRejectionLayer::new())
            .layer(DeadlineLayer::new(Duration::from_millis(200))),
        echo.clone()
    );
    let t0 = Instant::now();
    let status = say(channel).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline"), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

// ---- the client side: StatusLayer around our layers on a Channel ----

#[tokio::test]
async fn client_rate_limit_is_resource_exhausted_with_the_limiters_pushback() {
    let echo = Echo::default();
    let channel = serve!(tower::layer::util::Identity::new(), echo.clone());
    let stack = ServiceBuilder::new()
        .layer(StatusLayer::new())
        .layer(RateLimitLayer::per_second(1).burst(1))
        .service(channel);
    let t0 = Instant::now();
    assert_eq!(say(stack.clone()).await.unwrap(), "hello, firebreak");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = say(stack).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_pushback_is_next_permit(&status, t0);
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client_bulkhead_is_resource_exhausted() {
    let echo = Echo {
        delay: Duration::from_millis(500),
        ..Echo::default()
    };
    let channel = serve!(tower::layer::util::Identity::new(), echo.clone());
    let stack = ServiceBuilder::new()
        .layer(StatusLayer::new())
        .layer(BulkheadLayer::new(1))
        .service(channel);
    let first = tokio::spawn(say(stack.clone()));
    while echo.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = say(stack).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(pushback_ms(&status), None);
    assert_eq!(first.await.unwrap().unwrap(), "hello, firebreak");
    assert_eq!(echo.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client_open_breaker_is_unavailable_with_its_time_left() {
    let echo = Echo {
        failures: 2,
        ..Echo::default()
    };
    let channel = serve!(tower::layer::util::Identity::new(), echo.clone());
    let breaker = grpc_breaker(Duration::from_secs(5));
    let handle = breaker.handle();
    let stack = ServiceBuilder::new()
        .layer(StatusLayer::new())
        .layer(breaker)
        .service(channel);
    for _ in 0..2 {
        let status = say(stack.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(pushback_ms(&status), None, "the handler's own failure");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = say(stack).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("circuit"), "{status:?}");
    assert_pushback_is_time_left(&status, &handle);
    assert!(pushback_ms(&status).unwrap() <= 4600, "{status:?}");
    assert_eq!(
        echo.calls.load(Ordering::SeqCst),
        2,
        "the open breaker let a call through"
    );
}

#[tokio::test]
async fn client_deadline_is_deadline_exceeded() {
    let echo = Echo {
        delay: Duration::from_secs(5),
        ..Echo::default()
    };
    let channel = serve!(tower::layer::util::Identity::new(), echo.clone());
    let stack = ServiceBuilder::new()
        .layer(StatusLayer::new())
        .layer(DeadlineLayer::new(Duration::from_millis(200)))
        .service(channel);
    let t0 = Instant::now();
    let status = say(stack).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

// ---- grpc-timeout from the client's deadline to the server's ----

/// Counts the server's `DeadlineExceeded` errors, and when the last came.
#[derive(Clone, Default)]
struct Cuts {
    count: Arc<AtomicU32>,
    at: Arc<Mutex<Option<Instant>>>,
}

impl Cuts {
    fn observe(&self, e: BoxError) -> BoxError {
        if find::<DeadlineExceeded>(&*e).is_some() {
            *self.at.lock().unwrap() = Some(Instant::now());
            self.count.fetch_add(1, Ordering::SeqCst);
        }
        e
    }
}

#[tokio::test]
async fn grpc_timeout_carries_the_clients_budget_to_the_server_handler() {
    let echo = Echo::default();
    // The server's own budget is far larger than the client's.
    let channel = serve!(
        ServiceBuilder::new()
            .layer(GrpcRejectionLayer::new())
            .layer(DeadlineLayer::new(Duration::from_secs(30))),
        echo.clone()
    );
    let stack = ServiceBuilder::new()
        .layer(StatusLayer::new())
        .layer(DeadlineLayer::new(Duration::from_millis(1500)))
        .layer(PropagateDeadlineLayer::new())
        .service(channel);
    assert_eq!(say(stack).await.unwrap(), "hello, firebreak");
    let seen = echo
        .budget_seen
        .lock()
        .unwrap()
        .expect("a deadline on the server");
    assert!(
        seen <= Duration::from_millis(1500) && seen >= Duration::from_millis(1200),
        "the handler saw {seen:?} left"
    );
}

#[tokio::test]
async fn a_slow_handler_is_cut_by_the_servers_deadline_at_the_clients_budget() {
    let echo = Echo {
        delay: Duration::from_secs(5),
        ..Echo::default()
    };
    let cuts = Cuts::default();
    let observe = cuts.clone();
    // The server's own budget (30 s) is far past the handler's 5 s: only
    // the client's grpc-timeout can make our layer cut the call early.
    let channel = serve!(
        ServiceBuilder::new()
            .layer(GrpcRejectionLayer::new())
            .map_err(move |e: BoxError| observe.observe(e))
            .layer(DeadlineLayer::new(Duration::from_secs(30))),
        echo.clone()
    );
    // Three clocks end this call at the same instant, give or take the
    // network: the client's DeadlineLayer, tonic's Channel and tonic's
    // Server (both also read grpc-timeout, from outside our layers), and our
    // server DeadlineLayer. When another one wins, the client's reset or
    // tonic's timeout drops our layer's future before it fires. So try a few
    // times: a server DeadlineLayer that ignored grpc-timeout would never
    // report a cut, and one that did must report it at the client's budget.
    let budget = Duration::from_millis(300);
    let stack = ServiceBuilder::new()
        .layer(StatusLayer::new())
        .layer(DeadlineLayer::new(budget))
        .layer(PropagateDeadlineLayer::new())
        .service(channel);
    for attempt in 0..10 {
        let t0 = Instant::now();
        let status = say(stack.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        // Let the server side settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cuts.count.load(Ordering::SeqCst) > 0 {
            let cut_after = cuts.at.lock().unwrap().unwrap() - t0;
            assert!(
                cut_after >= budget - Duration::from_millis(50)
                    && cut_after < budget + Duration::from_millis(150),
                "the server cut the call after {cut_after:?}"
            );
            eprintln!("the server's DeadlineLayer cut attempt {attempt} after {cut_after:?}");
            return;
        }
        eprintln!("attempt {attempt}: the call ended before the server's DeadlineLayer fired");
    }
    panic!("the server's DeadlineLayer never cut the call at the client's budget");
}
