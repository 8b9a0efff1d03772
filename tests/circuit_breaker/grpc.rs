//! The gRPC classifier: status from the headers, or from the trailers at the
//! end of the body.

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State};
use tower_firebreak::classify::GrpcClassifier;

#[derive(Clone, Copy)]
enum Reply {
    /// A message, then trailers with this grpc-status.
    Trailers(u8),
    /// A trailers-only response: grpc-status in the headers.
    Headers(u8),
    /// A proxy's answer: this HTTP status, no grpc-status at all.
    Proxy(u16),
}

fn grpc_service() -> impl Service<
    Reply,
    Response = Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>,
    Error = BoxError,
    Future: Send,
> + Clone {
    service_fn(|reply: Reply| async move {
        let res = match reply {
            Reply::Trailers(code) => {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", code.to_string().parse().unwrap());
                let body = Full::new(Bytes::from_static(b"message"))
                    .with_trailers(std::future::ready(Some(Ok(t))))
                    .boxed();
                Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .unwrap()
            }
            Reply::Headers(code) => Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", code.to_string())
                .body(Full::new(Bytes::new()).boxed())
                .unwrap(),
            Reply::Proxy(status) => Response::builder()
                .status(status)
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from_static(b"upstream connect error")).boxed())
                .unwrap(),
        };
        Ok::<_, BoxError>(res)
    })
}

fn layer() -> CircuitBreakerLayer<GrpcClassifier> {
    CircuitBreakerLayer::builder()
        .consecutive_failures(2)
        .open_for(Duration::from_secs(10))
        .half_open_calls(1)
        .classifier(GrpcClassifier::new())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_status_in_the_trailers_counts_when_the_body_ends() {
    let layer = layer();
    let h = layer.handle();
    let mut svc = layer.layer(grpc_service());

    let a = svc
        .ready()
        .await
        .unwrap()
        .call(Reply::Trailers(14))
        .await
        .unwrap();
    let b = svc
        .ready()
        .await
        .unwrap()
        .call(Reply::Trailers(14))
        .await
        .unwrap();
    assert_eq!(
        h.state(),
        State::Closed,
        "nothing is known before the trailers"
    );
    let trailers = a.into_body().collect().await.unwrap().trailers().cloned();
    assert_eq!(trailers.unwrap()["grpc-status"], "14");
    assert_eq!(h.state(), State::Closed);
    b.into_body().collect().await.unwrap();
    assert_eq!(h.state(), State::Open, "two UNAVAILABLE in a row");
}

#[tokio::test(start_paused = true)]
async fn ok_and_client_fault_codes_are_successes() {
    let layer = layer();
    let h = layer.handle();
    let mut svc = layer.layer(grpc_service());
    for reply in [
        Reply::Trailers(14),
        Reply::Trailers(0),
        Reply::Trailers(13),
        Reply::Trailers(5), // NOT_FOUND: the caller's fault
        Reply::Trailers(4),
        Reply::Headers(3), // INVALID_ARGUMENT
    ] {
        let res = svc.ready().await.unwrap().call(reply).await.unwrap();
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_trailers_only_failure_counts_at_once() {
    let layer = layer();
    let h = layer.handle();
    let mut svc = layer.layer(grpc_service());
    let _a = svc
        .ready()
        .await
        .unwrap()
        .call(Reply::Headers(14))
        .await
        .unwrap();
    let _b = svc
        .ready()
        .await
        .unwrap()
        .call(Reply::Headers(8))
        .await
        .unwrap();
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_body_is_dropped_gives_its_slot_back() {
    let layer = layer();
    let h = layer.handle();
    let mut svc = layer.layer(grpc_service());
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call(Reply::Headers(14)).await;
    }
    assert_eq!(h.state(), State::Open);
    tokio::time::advance(Duration::from_secs(10)).await;

    let probe = svc
        .ready()
        .await
        .unwrap()
        .call(Reply::Trailers(0))
        .await
        .unwrap();
    assert!(
        svc.ready()
            .await
            .unwrap()
            .call(Reply::Trailers(0))
            .await
            .is_err(),
        "the only slot is held by the unread body"
    );
    drop(probe);
    let probe = svc
        .ready()
        .await
        .unwrap()
        .call(Reply::Trailers(0))
        .await
        .unwrap();
    assert_eq!(h.state(), State::HalfOpen);
    probe.into_body().collect().await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

/// A proxy in front of the server (Envoy's "upstream connect error") answers
/// HTTP 503 with no `grpc-status`; the client makes UNAVAILABLE of it, so the
/// breaker counts it as a failure. Before, a missing `grpc-status` waited
/// for trailers that never came, and the call counted as a success.
#[tokio::test(start_paused = true)]
async fn a_proxys_http_error_counts_as_the_code_a_client_makes_of_it() {
    for (status, opens) in [
        (503, true),
        (502, true),
        (504, true),
        (429, true),
        (500, true),
        (404, false),
    ] {
        let layer = layer();
        let h = layer.handle();
        let mut svc = layer.layer(grpc_service());
        for _ in 0..2 {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(Reply::Proxy(status))
                .await
                .unwrap();
            res.into_body().collect().await.unwrap();
        }
        let want = if opens { State::Open } else { State::Closed };
        assert_eq!(h.state(), want, "HTTP {status}");
    }
}
