//! HTTP and gRPC retryability, Retry-After, pushback and body buffering.

use crate::support::{Script, Step, ms};
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_firebreak::retry::{BufferRequestBodyLayer, ReplayBody, RetryLayer, RetryPolicy};

type Req = Request<Full<Bytes>>;

fn status(code: u16) -> Response<()> {
    Response::builder().status(code).body(()).unwrap()
}

fn request(method: Method) -> Req {
    Request::builder()
        .method(method)
        .uri("http://b.internal/x")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap()
}

fn policy() -> RetryPolicy<tower_firebreak::retry::HttpClassifier> {
    RetryPolicy::exponential(ms(10))
        .max_attempts(3)
        .no_jitter()
        .http()
}

async fn attempts_for(req: Req, answer: Response<()>) -> (usize, Response<()>) {
    let script = Script::new([]).then_always(ms(1), Step::Ok(answer));
    let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
    let res = svc.oneshot(req).await.unwrap();
    (script.attempts(), res)
}

#[tokio::test(start_paused = true)]
async fn retryable_statuses_on_idempotent_methods_are_retried() {
    for method in [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
    ] {
        for code in [502, 503, 504, 429, 408] {
            let (n, res) = attempts_for(request(method.clone()), status(code)).await;
            assert_eq!(n, 3, "{method} {code}");
            assert_eq!(res.status(), code);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn other_statuses_are_not_retried() {
    for code in [200, 400, 404, 500, 501] {
        let (n, _) = attempts_for(request(Method::GET), status(code)).await;
        assert_eq!(n, 1, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn post_without_idempotency_key_is_never_retried() {
    for code in [502, 503, 504, 429, 408] {
        let (n, _) = attempts_for(request(Method::POST), status(code)).await;
        assert_eq!(n, 1, "POST {code}");
    }
    // Nor on an error.
    let script = Script::<Response<()>>::always_err("connection reset");
    let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
    svc.oneshot(request(Method::PATCH)).await.unwrap_err();
    assert_eq!(script.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn post_with_idempotency_key_is_retried() {
    let mut req = request(Method::POST);
    req.headers_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    let (n, _) = attempts_for(req, status(503)).await;
    assert_eq!(n, 3);
}

#[tokio::test(start_paused = true)]
async fn connection_errors_on_get_are_retried() {
    let script = Script::new([(ms(1), Step::Err("connection refused"))])
        .then_always(ms(1), Step::Ok(status(200)));
    let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
    assert_eq!(
        svc.oneshot(request(Method::GET)).await.unwrap().status(),
        200
    );
    assert_eq!(script.attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_is_waited_exactly() {
    let script = Script::new([(
        ms(0),
        Step::Ok(
            Response::builder()
                .status(503)
                .header("retry-after", "2")
                .body(())
                .unwrap(),
        ),
    )])
    .then_always(ms(0), Step::Ok(status(200)));
    let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
    let t0 = Instant::now();
    assert_eq!(
        svc.oneshot(request(Method::GET)).await.unwrap().status(),
        200
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(script.gaps(), [Duration::from_secs(2)]);
}

/// `Retry-After: 0` (a half-open breaker's "now") is the least the server
/// asks for, not a reason to skip the backoff: the retry waits the backoff
/// (10 ms here). Before, it went out at once.
#[tokio::test(start_paused = true)]
async fn retry_after_zero_still_waits_the_backoff() {
    let script = Script::new([(
        ms(0),
        Step::Ok(
            Response::builder()
                .status(503)
                .header("retry-after", "0")
                .body(())
                .unwrap(),
        ),
    )])
    .then_always(ms(0), Step::Ok(status(200)));
    let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
    assert_eq!(
        svc.oneshot(request(Method::GET)).await.unwrap().status(),
        200
    );
    assert_eq!(script.gaps(), [ms(10)]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_is_honoured() {
    let at = SystemTime::now() + Duration::from_secs(3);
    let script = Script::new([(
        ms(0),
        Step::Ok(
            Response::builder()
                .status(429)
                .header("retry-after", httpdate::fmt_http_date(at))
                .body(())
                .unwrap(),
        ),
    )])
    .then_always(ms(0), Step::Ok(status(200)));
    let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
    svc.oneshot(request(Method::GET)).await.unwrap();
    // An HTTP-date has whole seconds: 3 s from now, truncated, is in (2 s, 3 s].
    let gap = script.gaps()[0];
    assert!(
        gap > Duration::from_secs(1) && gap <= Duration::from_secs(3),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_capped_by_max_delay() {
    let script = Script::new([(
        ms(0),
        Step::Ok(
            Response::builder()
                .status(503)
                .header("retry-after", "120")
                .body(())
                .unwrap(),
        ),
    )])
    .then_always(ms(0), Step::Ok(status(200)));
    let svc = RetryLayer::new(policy().max_delay(ms(500))).layer(script.service::<Req>());
    svc.oneshot(request(Method::GET)).await.unwrap();
    assert_eq!(script.gaps(), [ms(500)]);
}

fn grpc_request() -> Req {
    Request::builder()
        .method(Method::POST)
        .uri("http://b.internal/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

fn grpc_status(code: u8, pushback: Option<&str>) -> Response<()> {
    let mut b = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string());
    if let Some(p) = pushback {
        b = b.header("grpc-retry-pushback-ms", p);
    }
    b.body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn grpc_unavailable_is_retried_although_the_method_is_post() {
    let (n, _) = attempts_for(grpc_request(), grpc_status(14, None)).await;
    assert_eq!(n, 3);
}

/// An attempt that failed with an `Err` (here a timeout) may have run on
/// the server: a gRPC call, always a POST, is sent again only with an
/// `Idempotency-Key`, or when its connection was refused.
#[tokio::test(start_paused = true)]
async fn a_grpc_call_that_may_have_run_is_retried_only_when_safe() {
    let timeout = || Step::ErrBox(|| tower_firebreak::timeout::Elapsed::new(ms(100)).into());
    let refused = || {
        Step::ErrBox(|| {
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused").into()
        })
    };
    let attempts = |req: Req, step: Step<Response<()>>| async move {
        let script = Script::new([]).then_always(ms(1), step);
        let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
        let _ = svc.oneshot(req).await;
        script.attempts()
    };
    assert_eq!(attempts(grpc_request(), timeout()).await, 1);
    let mut keyed = grpc_request();
    keyed
        .headers_mut()
        .insert("idempotency-key", "k1".parse().unwrap());
    assert_eq!(attempts(keyed, timeout()).await, 3);
    assert_eq!(attempts(grpc_request(), refused()).await, 3);
}

#[tokio::test(start_paused = true)]
async fn grpc_resource_exhausted_is_retried_only_with_pushback() {
    let (n, _) = attempts_for(grpc_request(), grpc_status(8, None)).await;
    assert_eq!(n, 1);

    let script = Script::new([(ms(0), Step::Ok(grpc_status(8, Some("300"))))])
        .then_always(ms(0), Step::Ok(grpc_status(0, None)));
    let svc = RetryLayer::new(policy()).layer(script.service::<Req>());
    svc.oneshot(grpc_request()).await.unwrap();
    assert_eq!(script.gaps(), [ms(300)]);
}

#[tokio::test(start_paused = true)]
async fn a_negative_pushback_means_do_not_retry() {
    let (n, _) = attempts_for(grpc_request(), grpc_status(14, Some("-1"))).await;
    assert_eq!(n, 1);
}

#[tokio::test(start_paused = true)]
async fn other_grpc_statuses_are_not_retried() {
    for code in [0, 2, 3, 4, 13] {
        let (n, _) = attempts_for(grpc_request(), grpc_status(code, None)).await;
        assert_eq!(n, 1, "grpc-status {code}");
    }
}

/// A streaming body that yields its chunks one poll at a time.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

fn chunked(parts: &[&'static [u8]]) -> Request<Chunks> {
    Request::builder()
        .method(Method::PUT)
        .uri("http://b.internal/x")
        .body(Chunks(
            parts.iter().map(|p| Bytes::from_static(p)).collect(),
        ))
        .unwrap()
}

/// An inner service that reads each request body whole and answers 503.
fn body_recorder(
    seen: Arc<Mutex<Vec<Bytes>>>,
) -> impl tower::Service<
    Request<ReplayBody<Chunks>>,
    Response = Response<()>,
    Error = tower_firebreak::BoxError,
    Future = impl Future<Output = Result<Response<()>, tower_firebreak::BoxError>> + Send,
> + Clone {
    tower::service_fn(move |req: Request<ReplayBody<Chunks>>| {
        let seen = seen.clone();
        async move {
            let body = req.into_body().collect().await?.to_bytes();
            seen.lock().unwrap().push(body);
            Ok(status(503))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_buffered_streaming_body_is_replayed_whole() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new().limit(16))
        .layer(RetryLayer::new(policy()))
        .service(body_recorder(seen.clone()));
    svc.oneshot(chunked(&[b"hello ", b"world"])).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|b| b == "hello world"), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_goes_once_and_whole() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new().limit(8))
        .layer(RetryLayer::new(policy()))
        .service(body_recorder(seen.clone()));
    svc.oneshot(chunked(&[b"hello ", b"world", b"!"]))
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "a body over the limit was retried");
    assert_eq!(seen[0], "hello world!");
}

/// A body fed by a channel, as a client-streaming or bidirectional gRPC
/// call's is: it ends only when the sender is dropped.
struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for Channel {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|c| c.map(|c| Ok(Frame::data(c))))
    }
}

/// The inner service is called at once, with the body still open: a server
/// that answers after the first message (a ping-pong stream) answers, where
/// a layer that read the body to its end first would wait for ever.
#[tokio::test(start_paused = true)]
async fn a_body_that_has_not_ended_flows_to_the_first_attempt() {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Bytes::from_static(b"ping")).await.unwrap();
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new())
        .layer(RetryLayer::new(policy()))
        .service(tower::service_fn(
            |req: Request<ReplayBody<Channel>>| async move {
                let mut body = req.into_body();
                let first = body.frame().await.unwrap()?.into_data().unwrap();
                assert_eq!(first, "ping");
                Ok::<_, tower_firebreak::BoxError>(status(200))
            },
        ));
    let req = Request::builder()
        .method(Method::PUT)
        .uri("http://b.internal/stream")
        .body(Channel(rx))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(req))
        .await
        .expect("the call waited for the body to end")
        .unwrap();
    assert_eq!(res.status(), 200);
    drop(tx);
}

/// A copy whose attempt stopped polling the stream but is still alive (a
/// client that keeps a finished attempt's body) holds no other copy up:
/// the next copy reads on by itself, and the first can still catch up.
#[tokio::test(start_paused = true)]
async fn a_copy_left_waiting_on_the_stream_does_not_hold_up_the_next() {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut first = ReplayBody::recording(Channel(rx), 1024);
    let mut second = first.try_clone().expect("replayable");
    // The first copy waits on the stream, then is never polled again.
    assert!(futures_util::poll!(first.frame()).is_pending());
    tx.send(Bytes::from_static(b"one")).await.unwrap();
    drop(tx);
    let got = tokio::time::timeout(Duration::from_secs(5), second.frame())
        .await
        .expect("the second copy waited for the first")
        .unwrap()
        .unwrap();
    assert_eq!(got.into_data().unwrap(), "one");
    assert!(second.frame().await.is_none());
    // The first copy sends the same frame from the record.
    let again = first.frame().await.unwrap().unwrap();
    assert_eq!(again.into_data().unwrap(), "one");
    assert!(first.frame().await.is_none());
}

/// Each attempt reads as much of the body as it likes: none (a refused
/// connection), part (an early 503), or all. The next attempt gets the
/// whole body every time: what was read is sent again, then the rest.
#[tokio::test(start_paused = true)]
async fn a_retry_sends_the_whole_body_whatever_the_failed_attempt_read() {
    let seen: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let attempt = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new().limit(64))
        .layer(RetryLayer::new(policy()))
        .service(tower::service_fn({
            let seen = seen.clone();
            move |req: Request<ReplayBody<Chunks>>| {
                let (seen, n) = (
                    seen.clone(),
                    attempt.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                );
                async move {
                    let mut body = req.into_body();
                    match n {
                        0 => Err("connection refused".into()),
                        1 => {
                            let first = body.frame().await.unwrap()?.into_data().unwrap();
                            seen.lock().unwrap().push(first);
                            Ok(status(503))
                        }
                        _ => {
                            let all = body.collect().await?.to_bytes();
                            seen.lock().unwrap().push(all);
                            Ok::<_, tower_firebreak::BoxError>(status(200))
                        }
                    }
                }
            }
        }));
    let res = svc.oneshot(chunked(&[b"hello ", b"world"])).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*seen.lock().unwrap(), ["hello ", "hello world"]);
}

#[tokio::test(start_paused = true)]
async fn the_default_limit_is_64_kib() {
    let big = vec![7u8; 64 * 1024];
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new())
        .layer(RetryLayer::new(policy()))
        .service(body_recorder(seen.clone()));
    let leaked: &'static [u8] = Box::leak(big.into_boxed_slice());
    svc.clone().oneshot(chunked(&[leaked])).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 3, "64 KiB exactly is buffered");
    seen.lock().unwrap().clear();
    svc.oneshot(chunked(&[leaked, b"x"])).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1, "one byte more is not");
}

/// A hedge does not send a copy whose body can no longer be replayed: the
/// first copy read past the replay limit, so the copy's body would fail
/// half-sent (and cost a budget token for nothing).
#[tokio::test(start_paused = true)]
async fn a_hedge_is_not_sent_once_the_body_went_over_the_replay_limit() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new().limit(4))
        .layer(tower_firebreak::hedge::HedgeLayer::fixed(ms(10)).http())
        .service(tower::service_fn({
            let calls = calls.clone();
            move |req: Request<ReplayBody<Chunks>>| {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    tokio::time::sleep(ms(100)).await;
                    assert_eq!(body, "hello world");
                    Ok::<_, tower_firebreak::BoxError>(status(200))
                }
            }
        }));
    let mut req = chunked(&[b"hello ", b"world"]);
    *req.method_mut() = Method::PUT;
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a copy with a body over the limit was sent"
    );
}
