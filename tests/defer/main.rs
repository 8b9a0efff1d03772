//! The defer layer, its replayer and the status route.

#[path = "../support/mod.rs"]
mod support;

#[cfg(all(feature = "axum", feature = "disk"))]
mod e2e;
#[cfg(feature = "tonic")]
mod grpc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::CircuitOpen;
use tower_firebreak::defer::{DeferConfig, DeferLayer, JOB_ID_HEADER, Replayer, ReplayerConfig};
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::queue::{
    DeadLetter, DeliveredResponse, Enqueued, Job, JobId, JobStatus, Lease, Leased, Queue,
    QueueError,
};
use tower_firebreak::timeout::TimeoutLayer;

type Req = http::Request<Full<Bytes>>;
type Res = http::Response<Full<Bytes>>;

fn post(key: Option<&str>, body: &'static str) -> Req {
    let mut b = http::Request::post("http://orders.internal/orders");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

fn reply(status: u16, body: &'static str) -> Res {
    let mut res = http::Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res
}

struct Read {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Read {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
    fn job_id(&self) -> JobId {
        self.headers[JOB_ID_HEADER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

async fn read<B>(res: http::Response<B>) -> Read
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = res.into_parts();
    Read {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// An inner service that fails every call with `err()` and counts them.
fn failing(
    calls: Arc<AtomicUsize>,
    err: fn() -> BoxError,
) -> impl Service<Req, Response = Res, Error = BoxError, Future: Send> + Clone + Send {
    service_fn(move |_: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Err::<Res, _>(err()) }
    })
}

fn open_breaker() -> BoxError {
    CircuitOpen::new(Duration::from_millis(2500)).into()
}

// ---------------------------------------------------------------- DeferLayer

#[tokio::test(start_paused = true)]
async fn a_rejected_request_is_stored_and_answered_202() {
    let queue = MemoryQueue::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeferLayer::new(queue.clone())
        .status_path("/jobs")
        .layer(failing(calls.clone(), open_breaker));

    let req = http::Request::post("http://orders.internal/orders?x=1")
        .header("idempotency-key", "order-1")
        .header("x-tenant", "acme")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(Full::new(Bytes::from("{\"sku\":42}")))
        .unwrap();
    let res = read(svc.oneshot(req).await.unwrap()).await;

    assert_eq!(res.status, StatusCode::ACCEPTED);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let id = res.job_id();
    assert_eq!(res.headers["location"], format!("/jobs/{id}"));
    // The breaker's own retry_after (2.5 s), rounded up.
    assert_eq!(res.headers["retry-after"], "3");
    assert_eq!(res.headers["content-type"], "application/json");
    let body = res.json();
    assert_eq!(body["job_id"], id.to_string());
    assert_eq!(body["status"], "queued");
    assert_eq!(body["links"]["status"], format!("/jobs/{id}"));
    assert_eq!(queue.status(&id).await.unwrap(), Some(JobStatus::Queued));

    // What was stored is the whole request.
    let leased = queue.lease(10, Duration::from_secs(30)).await.unwrap();
    assert_eq!(leased.len(), 1);
    let job = &leased[0].job;
    assert_eq!(job.method(), http::Method::POST);
    assert_eq!(job.uri(), "http://orders.internal/orders?x=1");
    assert_eq!(job.body(), "{\"sku\":42}");
    assert_eq!(job.idempotency_key(), Some("order-1"));
    assert_eq!(job.headers()["x-tenant"], "acme");
    assert_eq!(job.trace_context()[0].0, "traceparent");
}

#[tokio::test(start_paused = true)]
async fn a_5xx_response_and_a_timeout_are_deferred() {
    let queue = MemoryQueue::new();
    let svc = DeferLayer::new(queue.clone()).layer(service_fn(|_: Req| async {
        Ok::<_, BoxError>(reply(503, "down"))
    }));
    let res = read(svc.oneshot(post(Some("k5"), "a")).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    // No rejection hint: the configured default, and no status path: no Location.
    assert_eq!(res.headers["retry-after"], "5");
    assert!(res.headers.get("location").is_none());
    assert!(res.json().get("links").is_none());

    let hanging = tower::ServiceBuilder::new()
        .layer(DeferLayer::new(queue.clone()))
        .layer(TimeoutLayer::new(Duration::from_secs(1)))
        .service(service_fn(|_: Req| {
            std::future::pending::<Result<Res, BoxError>>()
        }));
    let res = read(hanging.oneshot(post(Some("k6"), "b")).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    assert_eq!(queue.depth().await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_responses_retry_after_is_the_hint() {
    let queue = MemoryQueue::new();
    let svc = DeferLayer::new(queue).layer(service_fn(|_: Req| async {
        let mut res = reply(503, "down");
        res.headers_mut()
            .insert("retry-after", "42".parse().unwrap());
        Ok::<_, BoxError>(res)
    }));
    let res = read(svc.oneshot(post(Some("ra"), "a")).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    assert_eq!(res.headers["retry-after"], "42");
}

#[test]
fn the_service_is_clone_send_sync_and_its_future_send() {
    fn service<T: Clone + Send + Sync + 'static>(_: &T) {}
    fn future<F: Future + Send + 'static>(_: &F) {}
    let mut svc = DeferLayer::new(MemoryQueue::new()).layer(service_fn(|_: Req| async {
        Ok::<_, BoxError>(reply(200, "ok"))
    }));
    service(&svc);
    future(&svc.call(post(Some("k"), "x")));
    // So it can be boxed and shared, e.g. as axum state.
    let _boxed: tower::util::BoxCloneSyncService<axum::extract::Request, _, BoxError> =
        tower::util::BoxCloneSyncService::new(svc);
}

#[tokio::test(start_paused = true)]
async fn success_and_undeferrable_requests_pass_through() {
    let queue = MemoryQueue::new();
    // 2xx and 4xx responses are not failures.
    let ok = DeferLayer::new(queue.clone()).layer(service_fn(|req: Req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "payload", "the inner service sees the buffered body");
        Ok::<_, BoxError>(reply(404, "nope"))
    }));
    let res = read(ok.oneshot(post(Some("k1"), "payload")).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::NOT_FOUND);
    assert_eq!(res.body, "nope");

    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeferLayer::new(queue.clone()).layer(failing(calls.clone(), open_breaker));
    // No Idempotency-Key: the error passes through.
    let err = svc.clone().oneshot(post(None, "x")).await.unwrap_err();
    assert!(tower_firebreak::error::find::<CircuitOpen>(&*err).is_some());
    // A GET, even with a key: passes through.
    let get = http::Request::get("http://orders.internal/orders/1")
        .header("idempotency-key", "g1")
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = svc.clone().oneshot(get).await.unwrap_err();
    assert!(tower_firebreak::error::find::<CircuitOpen>(&*err).is_some());
    // A 5xx for an undeferrable request passes through as it is.
    let bad = DeferLayer::new(queue.clone()).layer(service_fn(|_: Req| async {
        Ok::<_, BoxError>(reply(500, "boom"))
    }));
    let res = read(bad.oneshot(post(None, "x")).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.body, "boom");
    // An error the predicate does not select passes through.
    let narrow = DeferLayer::new(queue.clone())
        .defer_error(|e| tower_firebreak::error::Rejection::of(e).is_some())
        .layer(service_fn(|_: Req| async {
            Err::<Res, BoxError>(std::io::Error::other("connection refused").into())
        }));
    assert!(narrow.oneshot(post(Some("k9"), "x")).await.is_err());

    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(queue.depth().await.unwrap(), 0, "nothing was queued");
}

#[tokio::test(start_paused = true)]
async fn a_custom_predicate_widens_what_is_deferrable() {
    let queue = MemoryQueue::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeferLayer::new(queue.clone())
        .deferrable(|parts| parts.uri.path().starts_with("/webhooks/"))
        .layer(failing(calls, open_breaker));
    let req = http::Request::post("http://hooks.internal/webhooks/1")
        .body(Full::new(Bytes::from("evt")))
        .unwrap();
    let res = read(svc.clone().oneshot(req).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::ACCEPTED);
    // It replaced the default: a keyed POST elsewhere now passes through.
    assert!(svc.oneshot(post(Some("k"), "x")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_repeated_key_gets_the_same_job_and_a_changed_body_gets_409() {
    let queue = MemoryQueue::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeferLayer::new(queue.clone())
        .status_path("/jobs")
        .layer(failing(calls, open_breaker));

    let first = read(
        svc.clone()
            .oneshot(post(Some("dup"), "same"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let id = first.job_id();

    let again = read(
        svc.clone()
            .oneshot(post(Some("dup"), "same"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.job_id(), id);
    assert_eq!(again.headers["location"], format!("/jobs/{id}"));
    assert_eq!(again.json()["status"], "queued");
    assert_eq!(queue.depth().await.unwrap(), 1);

    // Once delivered, the repeat shows the stored response.
    let leased = queue.lease(1, Duration::from_secs(30)).await.unwrap();
    let stored = DeliveredResponse {
        status: 201,
        body: Bytes::from("made"),
        ..Default::default()
    };
    queue.ack(&leased[0].lease, stored).await.unwrap();
    let again = read(
        svc.clone()
            .oneshot(post(Some("dup"), "same"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    let body = again.json();
    assert_eq!(body["status"], "delivered");
    assert_eq!(body["response"]["status"], 201);
    assert_eq!(body["response"]["body"], "made");

    let conflict = read(svc.oneshot(post(Some("dup"), "different")).await.unwrap()).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.headers["content-type"], "application/problem+json");
    assert_eq!(conflict.json()["kind"], "idempotency_key_conflict");
    assert!(conflict.headers.get(JOB_ID_HEADER).is_none());
}

/// Two callers that pick the same key (and the same request) get a job
/// each: a key dedups within the caller's credentials by default, so
/// neither is answered with the other's job id or stored response. The
/// same caller repeating gets its own job; `key_scope` moves the scope (a
/// tenant header) or removes it.
#[tokio::test(start_paused = true)]
async fn keys_dedup_per_caller_and_never_across_callers() {
    let as_caller = |auth: Option<&str>, tenant: Option<&str>| {
        let mut req = post(Some("order-7"), "same");
        if let Some(auth) = auth {
            req.headers_mut()
                .insert("authorization", auth.parse().unwrap());
        }
        if let Some(t) = tenant {
            req.headers_mut().insert("x-tenant", t.parse().unwrap());
        }
        req
    };
    macro_rules! ask {
        ($svc:expr, $auth:expr, $tenant:expr) => {
            read(
                $svc.clone()
                    .oneshot(as_caller($auth, $tenant))
                    .await
                    .unwrap(),
            )
            .await
        };
    }
    let calls = Arc::new(AtomicUsize::new(0));

    let queue = MemoryQueue::new();
    let svc = DeferLayer::new(queue.clone()).layer(failing(calls.clone(), open_breaker));
    let a = ask!(svc, Some("Bearer alice"), None);
    let b = ask!(svc, Some("Bearer bob"), None);
    assert_eq!(
        (a.status, b.status),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_ne!(a.job_id(), b.job_id(), "bob was given alice's job");
    let again = ask!(svc, Some("Bearer alice"), None);
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.job_id(), a.job_id());
    // No credentials: one scope for all such callers.
    let anon = ask!(svc, None, None);
    assert_eq!(anon.status, StatusCode::ACCEPTED);
    assert_eq!(queue.depth().await.unwrap(), 3);
    // The replayed request carries the caller's own key, not the scoped one.
    let leased = queue.lease(3, Duration::from_secs(30)).await.unwrap();
    for l in &leased {
        assert_eq!(l.job.headers()["idempotency-key"], "order-7");
    }

    // Scoped by a tenant header: new credentials, same tenant, same job.
    let queue = MemoryQueue::new();
    let svc = DeferLayer::new(queue.clone())
        .key_scope(|parts| Some(parts.headers.get("x-tenant")?.to_str().ok()?.to_owned()))
        .layer(failing(calls.clone(), open_breaker));
    let first = ask!(svc, Some("t1"), Some("acme"));
    let later = ask!(svc, Some("t2"), Some("acme"));
    let other = ask!(svc, Some("t1"), Some("globex"));
    assert_eq!(
        (first.status, later.status),
        (StatusCode::ACCEPTED, StatusCode::OK)
    );
    assert_eq!(first.job_id(), later.job_id());
    assert_eq!(other.status, StatusCode::ACCEPTED);
    assert_ne!(other.job_id(), first.job_id());

    // No scope: keys are global, whatever the credentials.
    let queue = MemoryQueue::new();
    let svc = DeferLayer::new(queue.clone())
        .key_scope(|_| None)
        .layer(failing(calls, open_breaker));
    let a = ask!(svc, Some("Bearer alice"), None);
    let b = ask!(svc, Some("Bearer bob"), None);
    assert_eq!((a.status, b.status), (StatusCode::ACCEPTED, StatusCode::OK));
    assert_eq!(a.job_id(), b.job_id());
}

/// A key that could not dedup (empty, too long, not printable ASCII, sent
/// twice) gets 400 at once, before the dependency or the queue sees the
/// request: otherwise it would be dropped or taken as another key, and
/// every retry would be stored again.
#[tokio::test(start_paused = true)]
async fn a_bad_idempotency_key_gets_400_and_is_never_sent_or_stored() {
    let queue = MemoryQueue::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeferLayer::new(queue.clone()).layer(failing(calls.clone(), open_breaker));
    let with = |values: &[&[u8]]| {
        let mut req = post(None, "body");
        for v in values {
            req.headers_mut()
                .append("idempotency-key", http::HeaderValue::from_bytes(v).unwrap());
        }
        req
    };
    let long = vec![b'k'; 256];
    let cases: [(&str, Req); 5] = [
        ("empty", with(&[b""])),
        ("blank", with(&[b"  "])),
        ("too long", with(&[&long])),
        ("not ASCII", with(&["caf\u{e9}".as_bytes()])),
        ("twice", with(&[b"a", b"b"])),
    ];
    for (what, req) in cases {
        let res = read(svc.clone().oneshot(req).await.unwrap()).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{what}");
        assert_eq!(res.json()["kind"], "bad_idempotency_key", "{what}");
        assert!(res.headers.get(JOB_ID_HEADER).is_none(), "{what}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(queue.depth().await.unwrap(), 0);

    // The longest key accepted is 255 bytes; a gRPC call gets
    // INVALID_ARGUMENT.
    let res = svc.clone().oneshot(with(&[&long[..255]])).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let mut grpc = with(&[b""]);
    grpc.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let res = svc.oneshot(grpc).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "3");
}

/// A body of `n` bytes sent in 1 KiB frames with no size hint (no
/// Content-Length), so only reading it reveals its size.
fn streamed(n: usize) -> http_body_util::StreamBody<futures_util_stream::Chunks> {
    http_body_util::StreamBody::new(futures_util_stream::Chunks(n))
}

mod futures_util_stream {
    use bytes::Bytes;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub(crate) struct Chunks(pub(crate) usize);

    impl futures_core::Stream for Chunks {
        type Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            let n = self.0.min(1024);
            self.0 -= n;
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![b'x'; n])))))
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_gets_413_and_is_never_sent_or_queued() {
    let queue = MemoryQueue::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeferLayer::new(queue.clone())
        .max_body(4096)
        .layer(failing(calls.clone(), open_breaker));

    // Declared too large: refused before reading.
    let declared = http::Request::post("http://orders.internal/orders")
        .header("idempotency-key", "big-1")
        .header("content-length", "5000")
        .body(streamed(5000))
        .unwrap();
    let res = read(svc.clone().oneshot(declared).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(res.json()["kind"], "body_too_large");

    // Undeclared: refused once the limit is crossed while reading.
    let undeclared = http::Request::post("http://orders.internal/orders")
        .header("idempotency-key", "big-2")
        .body(streamed(8192))
        .unwrap();
    let res = read(svc.clone().oneshot(undeclared).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);

    // At the limit: buffered, sent, deferred.
    let fits = http::Request::post("http://orders.internal/orders")
        .header("idempotency-key", "fits")
        .body(streamed(4096))
        .unwrap();
    let res = read(svc.oneshot(fits).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::ACCEPTED);

    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the body that fits was sent"
    );
    assert_eq!(
        queue.depth().await.unwrap(),
        1,
        "only the body that fits was queued"
    );
}

/// A request that may not be deferred passes through whatever its key:
/// `Defer` never looks at it.
#[tokio::test(start_paused = true)]
async fn a_request_that_may_not_be_deferred_is_not_refused_over_its_key() {
    let svc = DeferLayer::new(MemoryQueue::new()).layer(service_fn(|_: Req| async {
        Ok::<_, BoxError>(reply(200, "fine"))
    }));
    let req = http::Request::get("http://orders.internal/orders/1")
        .header("idempotency-key", "k".repeat(300))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = read(svc.oneshot(req).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, "fine");
}

/// A body that does not all arrive within the body timeout gets 408 at
/// that time, and is neither sent nor queued; a complete body arms no timer
/// and is not held to it.
#[tokio::test(start_paused = true)]
async fn a_body_that_trickles_past_the_body_timeout_gets_408() {
    use futures_util::StreamExt as _;
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = MemoryQueue::new();
    let layer = DeferLayer::new(queue.clone()).body_timeout(Duration::from_secs(5));
    let trickle = http_body_util::StreamBody::new(
        futures_util::stream::iter([Ok::<_, BoxError>(http_body::Frame::data(
            Bytes::from_static(b"half"),
        ))])
        .chain(futures_util::stream::pending()),
    );
    let req = http::Request::post("http://orders.internal/orders")
        .header("idempotency-key", "k")
        .body(trickle)
        .unwrap();
    let start = tokio::time::Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(60),
        layer
            .clone()
            .layer(failing(calls.clone(), open_breaker))
            .oneshot(req),
    )
    .await
    .expect("answered at the body timeout")
    .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    let res = read(res).await;
    assert_eq!(res.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(res.json()["kind"], "body_timeout");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never sent");
    assert_eq!(queue.depth().await.unwrap(), 0, "never queued");

    // A gRPC caller is told in gRPC's terms.
    let trickle = http_body_util::StreamBody::new(futures_util::stream::pending::<
        Result<http_body::Frame<Bytes>, BoxError>,
    >());
    let req = http::Request::post("http://orders.internal/orders.Orders/Create")
        .header("content-type", "application/grpc")
        .header("idempotency-key", "g")
        .body(trickle)
        .unwrap();
    let res = layer
        .clone()
        .layer(failing(calls.clone(), open_breaker))
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "never sent");

    // A whole body, and a failing call that takes longer than the body
    // timeout: deferred as usual.
    let slow_failure = service_fn(|_: Req| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Err::<Res, BoxError>(open_breaker())
    });
    let res = layer
        .layer(slow_failure)
        .oneshot(post(Some("k2"), "whole"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(queue.depth().await.unwrap(), 1);
}

/// A body that ends in an error is the client's (400), and one cut by an
/// outer limit whose error axum wraps is still 413: never a 500.
#[tokio::test(start_paused = true)]
async fn a_body_that_fails_to_read_gets_400_and_an_outer_limit_413() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = DeferLayer::new(MemoryQueue::new());
    let broken = http_body_util::StreamBody::new(futures_util::stream::iter([
        Ok(http_body::Frame::data(Bytes::from_static(b"half"))),
        Err::<http_body::Frame<Bytes>, BoxError>("connection reset".into()),
    ]));
    let req = http::Request::post("http://orders.internal/orders")
        .header("idempotency-key", "k")
        .body(broken)
        .unwrap();
    let res = layer
        .clone()
        .layer(failing(calls.clone(), open_breaker))
        .oneshot(req)
        .await
        .unwrap();
    let res = read(res).await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    assert_eq!(res.json()["kind"], "body_unreadable");

    #[cfg(feature = "axum")]
    {
        // tower-http's limit, seen through axum's body (which wraps errors).
        let limited = http_body_util::Limited::new(Full::new(Bytes::from(vec![b'x'; 64])), 16);
        let req = http::Request::post("http://orders.internal/orders")
            .header("idempotency-key", "k")
            .body(axum::body::Body::new(limited))
            .unwrap();
        let res = layer
            .layer(failing(calls.clone(), open_breaker))
            .oneshot(req)
            .await
            .unwrap();
        let res = read(res).await;
        assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// A gRPC failure answered "Trailers-Only" (HTTP 200, `grpc-status` in the
/// headers) is deferred like a 5xx; a gRPC OK or a client error is not.
#[tokio::test(start_paused = true)]
async fn a_grpc_failure_in_the_headers_is_deferred() {
    let grpc = |code: &'static str| {
        service_fn(move |_: Req| async move {
            let mut res = reply(200, "");
            res.headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            res.headers_mut()
                .insert("grpc-status", code.parse().unwrap());
            Ok::<_, BoxError>(res)
        })
    };
    let call = |key: &str| {
        http::Request::post("http://orders.internal/shop.Orders/Create")
            .header("content-type", "application/grpc")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let queue = MemoryQueue::new();
    for (code, deferred) in [("14", true), ("8", true), ("0", false), ("3", false)] {
        let svc = DeferLayer::new(queue.clone()).layer(grpc(code));
        let res = svc.oneshot(call(&format!("k{code}"))).await.unwrap();
        assert_eq!(
            res.headers().contains_key(JOB_ID_HEADER),
            deferred,
            "grpc-status {code}"
        );
    }
    assert_eq!(queue.depth().await.unwrap(), 2);
}

/// A queue whose backend is gone: every operation fails.
#[derive(Clone, Debug)]
struct BrokenQueue;

fn gone() -> QueueError {
    QueueError::unavailable(std::io::Error::other("disk gone"))
}

impl Queue for BrokenQueue {
    async fn submit(&self, _: Job) -> Result<Enqueued, QueueError> {
        Err(gone())
    }
    async fn lease(&self, _: usize, _: Duration) -> Result<Vec<Leased>, QueueError> {
        Err(gone())
    }
    async fn ack(&self, _: &Lease, _: DeliveredResponse) -> Result<(), QueueError> {
        Err(gone())
    }
    async fn nack(&self, _: &Lease, _: Duration) -> Result<(), QueueError> {
        Err(gone())
    }
    async fn dead_letter(&self, _: &Lease, _: &str) -> Result<(), QueueError> {
        Err(gone())
    }
    async fn status(&self, _: &JobId) -> Result<Option<JobStatus>, QueueError> {
        Err(gone())
    }
    async fn depth(&self) -> Result<usize, QueueError> {
        Err(gone())
    }
    async fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        Err(gone())
    }
    async fn dead_letters(&self, _: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Err(gone())
    }
    async fn redrive(&self, _: &JobId) -> Result<bool, QueueError> {
        Err(gone())
    }
}

/// A memory queue whose `status` fails: the status store is down while
/// submits still work.
#[derive(Clone, Default)]
struct NoStatus(MemoryQueue);

impl Queue for NoStatus {
    async fn submit(&self, job: Job) -> Result<Enqueued, QueueError> {
        self.0.submit(job).await
    }
    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Leased>, QueueError> {
        self.0.lease(max, visibility).await
    }
    async fn ack(&self, lease: &Lease, response: DeliveredResponse) -> Result<(), QueueError> {
        self.0.ack(lease, response).await
    }
    async fn nack(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        self.0.nack(lease, delay).await
    }
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), QueueError> {
        self.0.dead_letter(lease, reason).await
    }
    async fn status(&self, _: &JobId) -> Result<Option<JobStatus>, QueueError> {
        Err(gone())
    }
    async fn depth(&self) -> Result<usize, QueueError> {
        self.0.depth().await
    }
    async fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        self.0.oldest_age().await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.0.dead_letters(limit).await
    }
    async fn redrive(&self, id: &JobId) -> Result<bool, QueueError> {
        self.0.redrive(id).await
    }
}

/// A retry whose key already holds a job is answered 200 with that job,
/// even when the job's status cannot be read: a 503 would tell the caller
/// the request was not taken, and a retry under a new key would run it
/// twice.
#[tokio::test(start_paused = true)]
async fn a_retry_of_a_stored_request_is_not_503_when_its_status_is_unreadable() {
    let calls = Arc::new(AtomicUsize::new(0));
    let queue = NoStatus::default();
    let svc = DeferLayer::new(queue.clone()).layer(failing(calls.clone(), open_breaker));
    let first = read(svc.clone().oneshot(post(Some("k"), "x")).await.unwrap()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = read(svc.oneshot(post(Some("k"), "x")).await.unwrap()).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.job_id(), first.job_id());
    assert_eq!(again.json()["status"], "unknown");
    assert_eq!(queue.depth().await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_or_full_queue_gets_503_never_202() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = DeferLayer::new(BrokenQueue).layer(failing(calls.clone(), open_breaker));
    let res = read(svc.oneshot(post(Some("k"), "x")).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers["content-type"], "application/problem+json");
    assert_eq!(res.json()["kind"], "queue_unavailable");
    assert!(
        res.json()["detail"]
            .as_str()
            .unwrap()
            .contains("not accepted")
    );
    assert!(res.headers.get(JOB_ID_HEADER).is_none());
    // The open breaker's 2.5 s, rounded up, not the layer's default of 5 s.
    assert_eq!(res.headers["retry-after"], "3");

    let queue = MemoryQueue::builder().capacity(1).build().unwrap();
    let svc = DeferLayer::new(queue.clone()).layer(failing(calls, open_breaker));
    let first = read(svc.clone().oneshot(post(Some("a"), "x")).await.unwrap()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let full = read(svc.oneshot(post(Some("b"), "x")).await.unwrap()).await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.json()["kind"], "queue_full");
    assert_eq!(queue.depth().await.unwrap(), 1);
}

#[test]
fn config_defaults_and_validation() {
    let cfg = DeferConfig::default();
    assert_eq!(cfg.max_body, DeferConfig::DEFAULT_MAX_BODY);
    assert_eq!(cfg.max_body, 1024 * 1024);
    assert_eq!(cfg.body_timeout, Duration::from_secs(30));
    let err = serde_json::from_str::<DeferConfig>(r#"{ "body_timeout": "0s" }"#)
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "body_timeout");
    let err = DeferConfig {
        max_body: 0,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert_eq!(err.field(), "max_body");
    let err = serde_json::from_str::<DeferConfig>(r#"{ "status_path": "jobs" }"#)
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "status_path");

    let r = ReplayerConfig::default();
    assert_eq!(r.rate_per_second, ReplayerConfig::DEFAULT_RATE_PER_SECOND);
    let err = ReplayerConfig {
        rate_per_second: 0,
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert_eq!(err.field(), "rate_per_second");
    let err = ReplayerConfig {
        base_backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(1),
        ..Default::default()
    }
    .validate()
    .unwrap_err();
    assert_eq!(err.other_field(), Some("max_backoff"));
    assert_eq!(r.concurrency, 1);
    let err = serde_json::from_str::<ReplayerConfig>(r#"{ "concurrency": 0 }"#)
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(err.field(), "concurrency");
}

// ------------------------------------------------------------------ Replayer

fn job(key: &str, body: &'static str) -> Job {
    Job::new(
        http::Method::POST,
        "http://orders.internal/orders".parse().unwrap(),
    )
    .with_body(body)
    .with_idempotency_key(key)
}

/// Runs a replayer over `queue` into `downstream` until job `id` is
/// delivered (10 s at most), then shuts it down.
async fn replay_until_delivered<S>(queue: &MemoryQueue, downstream: S, id: &JobId)
where
    S: Service<Req, Response = http::Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let handle = Replayer::new(queue.clone(), downstream).spawn();
    wait_until(Duration::from_secs(10), || async {
        matches!(
            queue.status(id).await.unwrap(),
            Some(JobStatus::Delivered { .. })
        )
    })
    .await;
    handle.shutdown().await;
}

async fn wait_until<F, Fut>(limit: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(tokio::time::Instant::now() < until, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_replayer_delivers_and_stores_the_response() {
    let queue = MemoryQueue::new();
    let id = queue.enqueue(job("r1", "hello")).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let downstream = service_fn(move |req: Req| {
        let seen = seen2.clone();
        async move {
            let key = req.headers()["idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock().unwrap().push((key, body));
            let mut res = reply(201, "created");
            res.headers_mut().insert("x-order", "7".parse().unwrap());
            Ok::<_, BoxError>(res)
        }
    });
    replay_until_delivered(&queue, downstream, &id).await;
    match queue.status(&id).await.unwrap() {
        Some(JobStatus::Delivered {
            status,
            headers,
            body,
            attempts,
            ..
        }) => {
            assert_eq!(status, 201);
            assert_eq!(headers["x-order"], "7");
            assert!(headers.get("firebreak-body-truncated").is_none());
            assert_eq!(body, "created");
            assert_eq!(attempts, 1);
        }
        other => panic!("not delivered: {other:?}"),
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![("r1".to_owned(), Bytes::from("hello"))]
    );
}

/// The caller's time budget stored with the request (`firebreak-timeout-ms`,
/// `grpc-timeout`) ran out long before the replay: it is not sent, so a
/// forwarding stack does not cap every replay at what the caller had left.
#[tokio::test(start_paused = true)]
async fn a_replay_does_not_carry_the_callers_old_time_budget() {
    let queue = MemoryQueue::new();
    let mut headers = http::HeaderMap::new();
    headers.insert("firebreak-timeout-ms", "3".parse().unwrap());
    headers.insert("grpc-timeout", "3m".parse().unwrap());
    headers.insert("x-tenant", "t1".parse().unwrap());
    let id = queue
        .enqueue(job("r-budget", "hello").with_headers(headers))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let downstream = service_fn({
        let seen = seen.clone();
        move |req: Req| {
            seen.lock().unwrap().push(req.headers().clone());
            async move { Ok::<_, BoxError>(reply(201, "created")) }
        }
    });
    replay_until_delivered(&queue, downstream, &id).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].get("firebreak-timeout-ms").is_none(),
        "{:?}",
        seen[0]
    );
    assert!(seen[0].get("grpc-timeout").is_none(), "{:?}", seen[0]);
    assert_eq!(seen[0]["x-tenant"], "t1");
}

/// Two replayers on one queue, a dependency that takes 2 s a call, leases of
/// 10 s and batches of 8 sent one at a time: the tail of a batch would wait
/// past its lease, be leased by the other replayer, and be sent by both. A
/// replayer gives back what it has not sent by half the visibility timeout
/// (and leases smaller batches after), so no job is sent twice.
#[tokio::test(start_paused = true)]
async fn a_slow_dependency_does_not_let_leases_expire_inside_a_batch() {
    const JOBS: usize = 24;
    let queue = MemoryQueue::new();
    for i in 0..JOBS {
        queue.enqueue(job(&format!("slow-{i}"), "x")).await.unwrap();
    }
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let downstream = {
        let sent = sent.clone();
        service_fn(move |req: Req| {
            let sent = sent.clone();
            async move {
                let key = req.headers()["idempotency-key"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                sent.lock().unwrap().push(key);
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok::<_, BoxError>(reply(200, "ok"))
            }
        })
    };
    let replayer = |q: MemoryQueue| {
        Replayer::new(q, downstream.clone())
            .batch(8)
            .concurrency(1)
            .rate_per_second(100)
            .visibility(Duration::from_secs(10))
            .spawn()
    };
    let (a, b) = (replayer(queue.clone()), replayer(queue.clone()));
    wait_until(Duration::from_secs(120), || async {
        queue.depth().await.unwrap() == 0
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
    let sent = sent.lock().unwrap();
    let mut twice: Vec<&String> = sent
        .iter()
        .filter(|k| sent.iter().filter(|o| o == k).count() > 1)
        .collect();
    twice.dedup();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    assert_eq!(sent.len(), JOBS);
}

/// A service that is not ready for its first `not_ready_for` (a breaker in
/// readiness mode, open), then answers 200 and notes each job's key.
struct NotReadyAtFirst {
    not_ready_for: Duration,
    wait: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    ready: bool,
    sent: Arc<Mutex<Vec<String>>>,
}

impl Service<Req> for NotReadyAtFirst {
    type Response = Res;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Res, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        if !self.ready {
            let wait = self
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.not_ready_for)));
            std::task::ready!(wait.as_mut().poll(cx));
            self.ready = true;
        }
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = req.headers()["idempotency-key"].to_str().unwrap();
        self.sent.lock().unwrap().push(key.to_owned());
        std::future::ready(Ok(reply(200, "ok")))
    }
}

/// A service that stays not ready longer than the lease lasts: the job goes
/// back at half the visibility timeout instead of being sent after its
/// lease ran out (when another replayer has leased and sent it too).
#[tokio::test(start_paused = true)]
async fn a_service_not_ready_for_longer_than_the_lease_does_not_send_a_job_twice() {
    const JOBS: usize = 4;
    let queue = MemoryQueue::new();
    for i in 0..JOBS {
        queue.enqueue(job(&format!("late-{i}"), "x")).await.unwrap();
    }
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let replayer = |q: MemoryQueue| {
        let svc = NotReadyAtFirst {
            not_ready_for: Duration::from_secs(12),
            wait: None,
            ready: false,
            sent: sent.clone(),
        };
        Replayer::new(q, svc)
            .batch(8)
            .rate_per_second(100)
            .visibility(Duration::from_secs(10))
            .spawn()
    };
    let (a, b) = (replayer(queue.clone()), replayer(queue.clone()));
    wait_until(Duration::from_secs(120), || async {
        queue.depth().await.unwrap() == 0
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
    let mut sent = sent.lock().unwrap().clone();
    sent.sort();
    let len = sent.len();
    sent.dedup();
    assert_eq!(len, sent.len(), "a job was sent more than once: {sent:?}");
    assert_eq!(len, JOBS);
}

/// A lone replayer whose service stays not ready far longer than its
/// attempts' worth of half visibility timeouts waits for it without leasing,
/// so the job is sent when it is ready, not dead-lettered unsent.
#[tokio::test(start_paused = true)]
async fn a_long_not_ready_service_does_not_use_up_the_attempts() {
    let queue = MemoryQueue::builder().max_attempts(3).build().unwrap();
    let id = queue.enqueue(job("patient", "x")).await.unwrap();
    let sent: Arc<Mutex<Vec<String>>> = Arc::default();
    let svc = NotReadyAtFirst {
        not_ready_for: Duration::from_secs(300),
        wait: None,
        ready: false,
        sent: sent.clone(),
    };
    let handle = Replayer::new(queue.clone(), svc)
        .visibility(Duration::from_secs(10))
        .spawn();
    wait_until(Duration::from_secs(600), || {
        all_delivered(&queue, std::slice::from_ref(&id))
    })
    .await;
    handle.shutdown().await;
    assert_eq!(*sent.lock().unwrap(), ["patient"]);
    let Some(JobStatus::Delivered { attempts, .. }) = queue.status(&id).await.unwrap() else {
        unreachable!()
    };
    assert!(attempts <= 2, "{attempts} attempts");
}

/// Replays one job into `downstream` with a 2,500-byte response limit and
/// checks the stored body was cut there and marked.
async fn assert_stored_cut<S, B>(downstream: S)
where
    S: Service<Req, Response = http::Response<B>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let queue = MemoryQueue::new();
    let id = queue.enqueue(job("long", "x")).await.unwrap();
    let handle = Replayer::new(queue.clone(), downstream)
        .max_response_body(2500)
        .spawn();
    wait_until(Duration::from_secs(10), || {
        all_delivered(&queue, std::slice::from_ref(&id))
    })
    .await;
    handle.shutdown().await;
    let Some(JobStatus::Delivered { headers, body, .. }) = queue.status(&id).await.unwrap() else {
        unreachable!()
    };
    assert_eq!(body.len(), 2500);
    assert_eq!(headers["firebreak-body-truncated"], "true");
}

#[tokio::test(start_paused = true)]
async fn a_long_response_body_is_stored_cut_and_marked() {
    assert_stored_cut(service_fn(|_: Req| async {
        Ok::<_, BoxError>(http::Response::new(streamed(10_000)))
    }))
    .await;
}

#[tokio::test(start_paused = true)]
async fn failed_replays_back_off_and_dead_letter_after_max_attempts() {
    let queue = MemoryQueue::builder().max_attempts(3).build().unwrap();
    let id = queue.enqueue(job("f1", "x")).await.unwrap();
    let times = Arc::new(Mutex::new(Vec::new()));
    let times2 = times.clone();
    let downstream = service_fn(move |_: Req| {
        times2.lock().unwrap().push(tokio::time::Instant::now());
        async { Ok::<_, BoxError>(reply(503, "still down")) }
    });
    let handle = Replayer::new(queue.clone(), downstream)
        .backoff(Duration::from_secs(1), Duration::from_secs(60))
        .spawn();
    wait_until(Duration::from_secs(60), || async {
        matches!(
            queue.status(&id).await.unwrap(),
            Some(JobStatus::DeadLettered { .. })
        )
    })
    .await;
    handle.shutdown().await;
    let times = times.lock().unwrap().clone();
    assert_eq!(times.len(), 3, "one send per attempt");
    // Retry delays double: 1 s, then 2 s.
    assert!(times[1] - times[0] >= Duration::from_secs(1));
    assert!(times[2] - times[1] >= Duration::from_secs(2));
    match queue.status(&id).await.unwrap() {
        Some(JobStatus::DeadLettered {
            reason, attempts, ..
        }) => {
            assert_eq!(reason, "max attempts (3) reached");
            assert_eq!(attempts, 3);
        }
        other => panic!("not dead-lettered: {other:?}"),
    }
}

/// A downstream that never answers, and how many calls it has taken.
fn hanging() -> (
    Arc<AtomicUsize>,
    impl Service<Req, Response = Res, Error = BoxError, Future: Send + 'static> + Send + 'static,
) {
    let started = Arc::new(AtomicUsize::new(0));
    let started2 = started.clone();
    let svc = service_fn(move |_: Req| {
        started2.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<Res, BoxError>>()
    });
    (started, svc)
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_back_an_unfinished_delivery() {
    let queue = MemoryQueue::new();
    let id = queue.enqueue(job("s1", "x")).await.unwrap();
    let (started, hanging) = hanging();
    let handle = Replayer::new(queue.clone(), hanging)
        .shutdown_grace(Duration::from_secs(1))
        .spawn();
    wait_until(Duration::from_secs(5), || async {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(queue.status(&id).await.unwrap(), Some(JobStatus::InFlight));
    handle.shutdown().await;
    // Given back at once, not left to its 30 s visibility timeout.
    assert_eq!(queue.status(&id).await.unwrap(), Some(JobStatus::Queued));
}

#[tokio::test(start_paused = true)]
async fn a_slow_pace_leases_no_more_than_it_can_send_within_the_visibility() {
    let queue = MemoryQueue::new();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(queue.enqueue(job(&format!("b{i}"), "x")).await.unwrap());
    }
    let downstream = service_fn(|_: Req| async { Ok::<_, BoxError>(reply(200, "ok")) });
    // One a second, leases of 4 s: a batch of 16 would outlive its lease.
    let handle = Replayer::new(queue.clone(), downstream)
        .rate_per_second(1)
        .visibility(Duration::from_secs(4))
        .spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut in_flight = 0;
    for id in &ids {
        if queue.status(id).await.unwrap() == Some(JobStatus::InFlight) {
            in_flight += 1;
        }
    }
    assert!(in_flight <= 2, "{in_flight} leased at once");
    handle.shutdown().await;
}

/// A gRPC answer the way servers send it: HTTP 200, one message, and the
/// status in the trailers.
type Frames = futures_util::stream::Iter<
    std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
>;

fn grpc_reply(code: &'static str) -> http::Response<http_body_util::StreamBody<Frames>> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", code.parse().unwrap());
    trailers.insert("grpc-message", "from the trailers".parse().unwrap());
    let frames = vec![
        Ok(http_body::Frame::data(Bytes::from_static(
            b"\0\0\0\0\x02\x08\x07",
        ))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let mut res = http::Response::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )));
    res.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    res
}

/// Replays one job into a gRPC downstream answering with `codes[n]` on its
/// n-th call (the last code from then on): the calls made, and the job's
/// final status.
async fn replay_grpc(codes: &'static [&'static str]) -> (usize, JobStatus) {
    let queue = MemoryQueue::new();
    let id = queue.enqueue(job("g", "x")).await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    let downstream = service_fn(move |_: Req| {
        let n = calls2.fetch_add(1, Ordering::SeqCst);
        let code = codes[n.min(codes.len() - 1)];
        async move { Ok::<_, BoxError>(grpc_reply(code)) }
    });
    let handle = Replayer::new(queue.clone(), downstream)
        .backoff(Duration::from_secs(1), Duration::from_secs(10))
        .spawn();
    wait_until(Duration::from_secs(30), || {
        all_delivered(&queue, std::slice::from_ref(&id))
    })
    .await;
    handle.shutdown().await;
    let status = queue.status(&id).await.unwrap().expect("known job");
    (calls.load(Ordering::SeqCst), status)
}

#[tokio::test(start_paused = true)]
async fn a_grpc_failure_in_the_trailers_is_retried_and_the_success_stored_with_them() {
    // UNAVAILABLE (14) the first time, then OK.
    let (calls, status) = replay_grpc(&["14", "0"]).await;
    assert_eq!(calls, 2, "UNAVAILABLE was retried");
    match status {
        JobStatus::Delivered {
            status,
            headers,
            body,
            attempts,
            ..
        } => {
            assert_eq!(status, 200);
            assert_eq!(attempts, 2);
            assert_eq!(headers["grpc-status"], "0");
            assert_eq!(headers["grpc-message"], "from the trailers");
            assert_eq!(headers["content-type"], "application/grpc");
            assert_eq!(body, Bytes::from_static(b"\0\0\0\0\x02\x08\x07"));
        }
        other => panic!("not delivered: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_grpc_caller_error_is_delivered_not_retried() {
    // NOT_FOUND (5): the caller's fault, an answer to store.
    let (calls, status) = replay_grpc(&["5"]).await;
    assert_eq!(calls, 1);
    let JobStatus::Delivered { headers, .. } = status else {
        panic!("not delivered: {status:?}")
    };
    assert_eq!(headers["grpc-status"], "5");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_ends_is_stored_cut_at_the_limit() {
    // 10,000 bytes, then nothing more, ever (a stream, a long poll).
    assert_stored_cut(service_fn(|_: Req| async {
        use futures_util::StreamExt as _;
        let frames = futures_util::stream::iter((0..10).map(|_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![b'x'; 1000])))
        }))
        .chain(futures_util::stream::pending());
        Ok::<_, BoxError>(http::Response::new(http_body_util::StreamBody::new(frames)))
    }))
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_one_delivery_lets_the_others_settle_and_gives_its_job_back() {
    let queue = MemoryQueue::new();
    let (ids, _) = enqueue_n(&queue, "p", 3).await;
    let downstream = service_fn(|req: Req| async move {
        let key = req.headers()["idempotency-key"]
            .to_str()
            .unwrap()
            .to_owned();
        if key == "p01" {
            tokio::time::sleep(Duration::from_millis(100)).await;
            panic!("the service broke on {key}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, BoxError>(reply(200, "ok"))
    });
    let handle = Replayer::new(queue.clone(), downstream)
        .rate_per_second(1000)
        .burst(100)
        .concurrency(3)
        .spawn();
    wait_until(Duration::from_secs(10), || async { handle.is_finished() }).await;
    // The two sends in flight beside the panicking one were acked, and the
    // panicking one's job is back in the queue, not left to its lease.
    for i in [0, 2] {
        assert!(
            matches!(
                queue.status(&ids[i]).await.unwrap(),
                Some(JobStatus::Delivered { .. })
            ),
            "p0{i}"
        );
    }
    assert_eq!(
        queue.status(&ids[1]).await.unwrap(),
        Some(JobStatus::Queued)
    );
    // And the panic reaches whoever shuts the replayer down.
    let shut = tokio::spawn(handle.shutdown()).await;
    assert!(shut.is_err_and(|e| e.is_panic()), "the panic is resumed");
}

/// A downstream that takes `latency` per call and records how many calls it
/// had in flight at most, and which idempotency keys it saw.
#[derive(Clone, Default)]
struct Gauge {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<String>>>,
    /// Each call as it began: its key, the calls then in flight (itself
    /// included), and when.
    starts: Arc<Mutex<Vec<(String, usize, tokio::time::Instant)>>>,
}

impl Gauge {
    fn service(
        &self,
        latency: Duration,
        fail_first: Option<&'static str>,
    ) -> impl Service<Req, Response = Res, Error = BoxError, Future: Send + 'static>
    + Clone
    + Send
    + 'static {
        let g = self.clone();
        let failed = Arc::new(AtomicBool::new(false));
        service_fn(move |req: Req| {
            let g = g.clone();
            let failed = failed.clone();
            async move {
                let key = req.headers()["idempotency-key"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let n = g.now.fetch_add(1, Ordering::SeqCst) + 1;
                g.max.fetch_max(n, Ordering::SeqCst);
                g.starts
                    .lock()
                    .unwrap()
                    .push((key.clone(), n, tokio::time::Instant::now()));
                tokio::time::sleep(latency).await;
                g.now.fetch_sub(1, Ordering::SeqCst);
                let fail = Some(key.as_str()) == fail_first && !failed.swap(true, Ordering::SeqCst);
                g.keys.lock().unwrap().push(key);
                Ok::<_, BoxError>(if fail {
                    reply(503, "not yet")
                } else {
                    reply(200, "ok")
                })
            }
        })
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }

    fn keys(&self) -> Vec<String> {
        let mut k = self.keys.lock().unwrap().clone();
        k.sort();
        k
    }
}

async fn all_delivered(queue: &MemoryQueue, ids: &[JobId]) -> bool {
    for id in ids {
        if !matches!(
            queue.status(id).await.unwrap(),
            Some(JobStatus::Delivered { .. })
        ) {
            return false;
        }
    }
    true
}

async fn enqueue_n(queue: &MemoryQueue, prefix: &str, n: usize) -> (Vec<JobId>, Vec<String>) {
    let mut ids = Vec::new();
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("{prefix}{i:02}");
        ids.push(queue.enqueue(job(&key, "x")).await.unwrap());
        keys.push(key);
    }
    keys.sort();
    (ids, keys)
}

#[tokio::test(start_paused = true)]
async fn concurrency_sends_that_many_at_once_and_each_job_once() {
    let queue = MemoryQueue::new();
    let (ids, keys) = enqueue_n(&queue, "c", 20).await;
    let gauge = Gauge::default();
    let began = tokio::time::Instant::now();
    let handle = Replayer::new(queue.clone(), gauge.service(Duration::from_secs(1), None))
        .rate_per_second(1000)
        .burst(100)
        .concurrency(4)
        .spawn();
    wait_until(Duration::from_secs(60), || all_delivered(&queue, &ids)).await;
    let took = began.elapsed();
    handle.shutdown().await;
    assert_eq!(gauge.max(), 4, "in flight at most, and at some point");
    assert_eq!(gauge.keys(), keys, "every job sent exactly once");
    // 20 one-second calls, four at a time: 5 s of sends, plus a lease
    // boundary (the batch of 16 ends when its last delivery does). One at a
    // time would take 20 s.
    assert!(took >= Duration::from_secs(5), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn by_default_the_replayer_sends_one_at_a_time() {
    let queue = MemoryQueue::new();
    let (ids, keys) = enqueue_n(&queue, "d", 6).await;
    let gauge = Gauge::default();
    let handle = Replayer::new(queue.clone(), gauge.service(Duration::from_secs(1), None))
        .rate_per_second(1000)
        .burst(100)
        .spawn();
    wait_until(Duration::from_secs(60), || all_delivered(&queue, &ids)).await;
    handle.shutdown().await;
    assert_eq!(gauge.max(), 1);
    assert_eq!(gauge.keys(), keys);
}

#[tokio::test(start_paused = true)]
async fn a_failure_among_concurrent_sends_pauses_then_probes_alone() {
    let queue = MemoryQueue::new();
    let (ids, _) = enqueue_n(&queue, "f", 8).await;
    let gauge = Gauge::default();
    let began = tokio::time::Instant::now();
    let handle = Replayer::new(
        queue.clone(),
        gauge.service(Duration::from_millis(100), Some("f01")),
    )
    .rate_per_second(1000)
    .burst(100)
    .concurrency(4)
    .backoff(Duration::from_secs(5), Duration::from_secs(60))
    .spawn();
    // The first four go out together; f01 fails. The sends already in flight
    // finish, the rest of the batch goes back, and nothing is sent for the
    // 5 s backoff.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gauge.keys().len(), 4, "{:?}", gauge.keys());
    assert_eq!(gauge.now.load(Ordering::SeqCst), 0);
    // After the pause one job is sent alone; once it succeeds the replayer
    // goes back to four at a time.
    wait_until(Duration::from_secs(60), || all_delivered(&queue, &ids)).await;
    handle.shutdown().await;
    let keys = gauge.keys();
    assert_eq!(keys.len(), 9, "eight jobs, f01 twice: {keys:?}");
    assert_eq!(keys.iter().filter(|k| *k == "f01").count(), 2);
    assert_eq!(gauge.max(), 4);
    let starts = gauge.starts.lock().unwrap().clone();
    let (probe, alone, at) = &starts[4];
    assert_eq!(
        *alone, 1,
        "the first send after the pause is alone: {starts:?}"
    );
    assert!(
        *at - began >= Duration::from_secs(5),
        "{probe} sent at {:?}",
        *at - began
    );
    assert!(
        starts[5].2 >= *at + Duration::from_millis(100),
        "nothing more until the probe succeeded: {starts:?}"
    );
    match queue.status(&ids[1]).await.unwrap() {
        Some(JobStatus::Delivered { attempts, .. }) => assert_eq!(attempts, 2),
        other => panic!("f01: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_gives_back_every_delivery_in_flight() {
    let queue = MemoryQueue::new();
    let (ids, _) = enqueue_n(&queue, "s", 5).await;
    let (started, hanging) = hanging();
    let handle = Replayer::new(queue.clone(), hanging)
        .rate_per_second(1000)
        .burst(100)
        .concurrency(3)
        .shutdown_grace(Duration::from_secs(1))
        .spawn();
    wait_until(Duration::from_secs(5), || async {
        started.load(Ordering::SeqCst) == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        3,
        "no more than three at once"
    );
    handle.shutdown().await;
    for id in &ids {
        assert_eq!(queue.status(id).await.unwrap(), Some(JobStatus::Queued));
    }
}

/// A breaker around `downstream` that one failure opens for `open_for`,
/// with one probe slot and the HTTP classifier, opened by one live call
/// that got 503.
async fn opened_by_one_503<S>(
    downstream: S,
    open_for: Duration,
) -> (
    tower_firebreak::circuit_breaker::CircuitBreakerHandle,
    tower_firebreak::circuit_breaker::CircuitBreaker<S, tower_firebreak::classify::HttpClassifier>,
)
where
    S: Service<Req, Response = Res, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
    use tower_firebreak::classify::HttpClassifier;

    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(open_for)
        .half_open_calls(1)
        .classifier(HttpClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let protected = breaker.layer(downstream);
    let res = protected.clone().oneshot(post(Some("live"), "x")).await;
    assert_eq!(res.unwrap().status(), 503);
    (handle, protected)
}

/// A breaker (one failure opens it for 1 s; one probe slot) around a
/// downstream whose `mode` is 0: 503, 1: hang, 2: 200. One 503 opens it;
/// after 1 s, a live call takes the one probe slot and hangs (`mode` is then
/// 1). Returns the mode, the breaker, the protected service and that call.
async fn half_open_with_a_hung_live_probe() -> (
    Arc<AtomicUsize>,
    tower_firebreak::circuit_breaker::CircuitBreakerHandle,
    impl Service<Req, Response = Res, Error = BoxError, Future: Send + 'static> + Clone + Send + 'static,
    tokio::task::JoinHandle<Result<Res, BoxError>>,
) {
    use tower_firebreak::circuit_breaker::State as BreakerState;

    let mode = Arc::new(AtomicUsize::new(0));
    let mode2 = mode.clone();
    let downstream = service_fn(move |_: Req| {
        let mode = mode2.load(Ordering::SeqCst);
        async move {
            match mode {
                0 => Ok::<_, BoxError>(reply(503, "down")),
                1 => std::future::pending().await,
                _ => Ok(reply(200, "ok")),
            }
        }
    });
    let (handle, protected) = opened_by_one_503(downstream, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    mode.store(1, Ordering::SeqCst);
    let probe = tokio::spawn(protected.clone().oneshot(post(Some("live"), "x")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    (mode, handle, protected, probe)
}

/// `svc`, counting what it is handed (rejected by a layer inside or not).
fn counting<S>(
    svc: S,
) -> (
    Arc<AtomicUsize>,
    tower::util::MapRequest<S, impl FnMut(Req) -> Req + Clone + Send + 'static>,
) {
    let tried = Arc::new(AtomicUsize::new(0));
    let tried2 = tried.clone();
    let counted = tower::ServiceBuilder::new()
        .map_request(move |r: Req| {
            tried2.fetch_add(1, Ordering::SeqCst);
            r
        })
        .service(svc);
    (tried, counted)
}

/// Replay gating: while the breaker rejects, the replayer sends nothing to
/// the dependency and probes at most once per `retry_after`; after recovery
/// it keeps its pace.
/// Replay through the real circuit breaker: while the dependency is down the
/// breaker is open, and the replayer sends nothing but the breaker's own
/// half-open probes; after recovery it never exceeds its pace.
#[tokio::test(start_paused = true)]
async fn replay_waits_out_an_open_breaker_and_keeps_its_pace() {
    use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State as BreakerState};
    use tower_firebreak::classify::HttpClassifier;

    const JOBS: usize = 30;
    const RATE: u32 = 5;
    let queue = MemoryQueue::builder().max_attempts(100).build().unwrap();
    let mut ids = Vec::new();
    for i in 0..JOBS {
        ids.push(queue.enqueue(job(&format!("g{i}"), "x")).await.unwrap());
    }
    let down = Arc::new(AtomicBool::new(true));
    let outage_calls = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let (down2, outage2, sent2) = (down.clone(), outage_calls.clone(), sent.clone());
    let downstream = service_fn(move |_: Req| {
        let res = if down2.load(Ordering::SeqCst) {
            outage2.fetch_add(1, Ordering::SeqCst);
            reply(503, "down")
        } else {
            sent2.lock().unwrap().push(tokio::time::Instant::now());
            reply(200, "ok")
        };
        async move { Ok::<_, BoxError>(res) }
    });
    let breaker = CircuitBreakerLayer::builder()
        .count_window(4)
        .minimum_calls(2)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(2))
        .half_open_calls(1)
        .classifier(HttpClassifier::new())
        .build()
        .unwrap();
    let handle = breaker.handle();
    let mut protected = breaker.layer(downstream);
    // The dependency fails two calls, and the breaker opens.
    for _ in 0..2 {
        let res = protected
            .ready()
            .await
            .unwrap()
            .call(post(Some("warm"), "x"))
            .await;
        assert_eq!(res.unwrap().status(), 503);
    }
    assert_eq!(handle.state(), BreakerState::Open);
    let before = outage_calls.load(Ordering::SeqCst);

    // Count what the replayer hands the breaker, rejected or not.
    let (tried, counted) = counting(protected);
    // A short failure backoff, so only the breaker gating can hold the
    // replayer back for whole open periods.
    let replayer = Replayer::new(queue.clone(), counted)
        .rate_per_second(RATE)
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .spawn();
    tokio::time::sleep(Duration::from_secs(20)).await;
    // Gated by the breaker's retry_after, each 2 s open period costs at most
    // two tries: the one the breaker rejects, and the half-open probe.
    // Ungated, the replayer would try ~100 times at its pace in 20 s.
    let attempts = tried.load(Ordering::SeqCst);
    assert!(
        (1..=22).contains(&attempts),
        "{attempts} replays tried while the breaker was open"
    );
    let probes = outage_calls.load(Ordering::SeqCst) - before;
    // One half-open probe per 2 s open period at most; ungated, the replayer
    // would have sent ~100 calls at its pace in 20 s.
    assert!(
        (1..=11).contains(&probes),
        "{probes} calls reached the dependency while it was down"
    );
    assert!(sent.lock().unwrap().is_empty());

    down.store(false, Ordering::SeqCst);
    let recovered = tokio::time::Instant::now();
    wait_until(Duration::from_secs(120), || async {
        queue.depth().await.unwrap() == 0
    })
    .await;
    replayer.shutdown().await;
    assert_eq!(handle.state(), BreakerState::Closed);

    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), JOBS, "each job delivered once");
    assert!(
        sent[0] - recovered <= Duration::from_secs(3),
        "a probe soon after recovery ({:?})",
        sent[0] - recovered
    );
    // Never more than RATE sends in any one-second window.
    for w in sent.windows(RATE as usize + 1) {
        assert!(
            w[RATE as usize] - w[0] >= Duration::from_secs(1),
            "{} sends within {:?}",
            RATE + 1,
            w[RATE as usize] - w[0]
        );
    }
    for id in &ids {
        assert!(matches!(
            queue.status(id).await.unwrap(),
            Some(JobStatus::Delivered { status: 200, .. })
        ));
    }
}

/// A half-open breaker whose probe slots are all taken rejects with a
/// `retry_after` of zero. The replayer must not take that as "try again at
/// once": every lease is an attempt, and at its pace it would use a job's
/// attempts up in about a second, dead-lettering it unsent.
#[tokio::test(start_paused = true)]
async fn a_half_open_breaker_does_not_burn_a_jobs_attempts() {
    let queue = MemoryQueue::builder().max_attempts(10).build().unwrap();
    let id = queue.enqueue(job("h1", "x")).await.unwrap();
    let (_mode, _handle, protected, probe) = half_open_with_a_hung_live_probe().await;

    let (tried, counted) = counting(protected);
    let replayer = Replayer::new(queue.clone(), counted)
        .rate_per_second(10)
        .spawn();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let tries = tried.load(Ordering::SeqCst);
    // Held back by the job's backoff (1 s, 2 s, 4 s, ...), not ten a second.
    assert!((1..=4).contains(&tries), "{tries} tries in 5 s");
    assert_eq!(queue.status(&id).await.unwrap(), Some(JobStatus::Queued));
    // The replayer itself pauses for its base backoff only, not for the
    // job's (4 s by now): another job is tried soon.
    queue.enqueue(job("h2", "x")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        tried.load(Ordering::SeqCst) > tries,
        "the new job waited out the old job's backoff"
    );
    replayer.shutdown().await;
    probe.abort();
}

/// Gated on the breaker's handle, the replayer leases nothing while the
/// breaker is open: across an outage of many open periods, every attempt a
/// job spends is a send that reached the dependency (a half-open probe).
/// Ungated, each open period also costs the lease the breaker rejects.
#[tokio::test(start_paused = true)]
async fn a_replayer_gated_on_the_breaker_spends_attempts_only_on_probes() {
    use tower_firebreak::circuit_breaker::State as BreakerState;

    let queue = MemoryQueue::builder().max_attempts(100).build().unwrap();
    let id = queue.enqueue(job("gate", "x")).await.unwrap();
    let reached = Arc::new(AtomicUsize::new(0));
    let reached2 = reached.clone();
    let downstream = service_fn(move |_: Req| {
        reached2.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(reply(503, "down")) }
    });
    let (handle, protected) = opened_by_one_503(downstream, Duration::from_secs(2)).await;
    assert_eq!(handle.state(), BreakerState::Open);
    let before = reached.load(Ordering::SeqCst);

    let (tried, counted) = counting(protected);
    let replayer = Replayer::new(queue.clone(), counted)
        .rate_per_second(10)
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
        .breaker(handle.clone())
        .spawn();
    tokio::time::sleep(Duration::from_secs(20)).await;
    replayer.shutdown().await;

    let probes = reached.load(Ordering::SeqCst) - before;
    let tries = tried.load(Ordering::SeqCst);
    // One probe per 2 s open period: about ten in 20 s.
    assert!((8..=11).contains(&probes), "{probes} probes in 20 s");
    assert_eq!(tries, probes, "sends the open breaker rejected");
    // The job's attempts are its leases: one per probe, and the lease here.
    let leased = queue.lease(1, Duration::from_secs(30)).await.unwrap();
    assert_eq!(leased[0].lease.id(), &id);
    assert_eq!(leased[0].job.attempts() as usize, probes + 1);
}

/// Gated, the replayer leases nothing while live callers hold every
/// half-open probe slot (where an ungated one leases, is rejected with
/// `retry_after` zero, and spends the attempt); once the slot is free its
/// job is the probe, and is delivered on its first attempt.
#[tokio::test(start_paused = true)]
async fn a_gated_replayer_waits_while_live_callers_hold_the_probe_slots() {
    use tower_firebreak::circuit_breaker::State as BreakerState;

    let queue = MemoryQueue::builder().max_attempts(10).build().unwrap();
    let id = queue.enqueue(job("hf", "x")).await.unwrap();
    let (mode, handle, protected, probe) = half_open_with_a_hung_live_probe().await;

    let (tried, counted) = counting(protected);
    let replayer = Replayer::new(queue.clone(), counted)
        .rate_per_second(10)
        .breaker(handle.clone())
        .spawn();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        tried.load(Ordering::SeqCst),
        0,
        "sent while no probe slot was free"
    );
    assert_eq!(queue.status(&id).await.unwrap(), Some(JobStatus::Queued));

    // The live probe goes away (its slot comes back); the dependency is up.
    mode.store(2, Ordering::SeqCst);
    probe.abort();
    wait_until(Duration::from_secs(10), || async {
        matches!(
            queue.status(&id).await.unwrap(),
            Some(JobStatus::Delivered { .. })
        )
    })
    .await;
    replayer.shutdown().await;
    assert_eq!(tried.load(Ordering::SeqCst), 1);
    assert_eq!(handle.state(), BreakerState::Closed);
}

// -------------------------------------------------------------- status route

#[cfg(feature = "axum")]
mod status {
    use super::*;
    use tower_firebreak::defer::status_router;

    async fn get(queue: &MemoryQueue, path: &str) -> Read {
        let req = http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        read(status_router(queue.clone()).oneshot(req).await.unwrap()).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_route_serves_status_attempts_and_stored_response() {
        let queue = MemoryQueue::new();
        let id = queue.enqueue(job("st", "x")).await.unwrap();
        let res = get(&queue, &format!("/jobs/{id}")).await;
        assert_eq!(res.status, StatusCode::OK);
        assert_eq!(res.headers["content-type"], "application/json");
        assert_eq!(res.json()["status"], "queued");
        assert_eq!(res.json()["job_id"], id.to_string());

        let leased = queue.lease(1, Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            get(&queue, &format!("/jobs/{id}")).await.json()["status"],
            "in_flight"
        );
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/octet-stream".parse().unwrap());
        let stored = DeliveredResponse {
            status: 201,
            headers,
            body: Bytes::from_static(&[0xff, 0x00, 0x01]),
        };
        queue.ack(&leased[0].lease, stored).await.unwrap();
        let v = get(&queue, &format!("/jobs/{id}")).await.json();
        assert_eq!(v["status"], "delivered");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["response"]["status"], 201);
        assert_eq!(
            v["response"]["headers"]["content-type"],
            "application/octet-stream"
        );
        assert_eq!(v["response"]["body_encoding"], "base64");
        assert_eq!(v["response"]["body"], "/wAB");

        let unknown = get(&queue, &format!("/jobs/{}", JobId::new())).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.json()["kind"], "unknown_job");
        let bad = get(&queue, "/jobs/not-a-job").await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.json()["kind"], "invalid_job_id");
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_route_shows_dead_letters() {
        let queue = MemoryQueue::new();
        let id = queue.enqueue(job("dl", "x")).await.unwrap();
        let leased = queue.lease(1, Duration::from_secs(30)).await.unwrap();
        queue
            .dead_letter(&leased[0].lease, "gave up")
            .await
            .unwrap();
        let v = get(&queue, &format!("/jobs/{id}")).await.json();
        assert_eq!(v["status"], "dead_lettered");
        assert_eq!(v["reason"], "gave up");
        assert_eq!(v["attempts"], 1);
    }
}

// ------------------------------------------------------- durable, on disk

#[cfg(feature = "disk")]
#[tokio::test]
async fn a_deferred_request_survives_a_restart_of_the_disk_queue() {
    use tower_firebreak::queue::disk::DiskQueue;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("defer.redb");

    let id = {
        let queue = DiskQueue::open(&path).unwrap();
        let svc =
            DeferLayer::new(queue).layer(failing(Arc::new(AtomicUsize::new(0)), open_breaker));
        let res = read(
            svc.oneshot(post(Some("durable-1"), "keep me"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(res.status, StatusCode::ACCEPTED);
        res.job_id()
        // The layer, and with it the last handle on the queue, is dropped here.
    };

    let queue = DiskQueue::open(&path).unwrap();
    assert_eq!(queue.status(&id).await.unwrap(), Some(JobStatus::Queued));
    let downstream = service_fn(|req: Req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "keep me");
        Ok::<_, BoxError>(reply(201, "kept"))
    });
    let handle = Replayer::new(queue.clone(), downstream).spawn();
    wait_until(Duration::from_secs(20), || async {
        matches!(
            queue.status(&id).await.unwrap(),
            Some(JobStatus::Delivered { status: 201, .. })
        )
    })
    .await;
    handle.shutdown().await;
}
