//! The total deadline: across retries, into inner timeouts, and over the wire.

#[path = "../support/mod.rs"]
mod support;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::Full;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::deadline::{
    self, CallDeadline, DeadlineConfig, DeadlineExceeded, DeadlineLayer, PropagateDeadlineLayer,
    TIMEOUT_HEADER,
};
use tower_firebreak::error::{self, Rejection, RejectionKind};
use tower_firebreak::timeout::TimeoutLayer;
use tower_firebreak::{BoxError, ConfigError};

type Req = http::Request<Full<Bytes>>;

fn req() -> Req {
    http::Request::new(Full::default())
}

/// Retries every error after 100 ms, without end: only the deadline stops it.
#[derive(Clone)]
struct AlwaysRetry;

impl<Res> tower::retry::Policy<Req, Res, BoxError> for AlwaysRetry {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _: &mut Req, result: &mut Result<Res, BoxError>) -> Option<Self::Future> {
        result
            .is_err()
            .then(|| tokio::time::sleep(Duration::from_millis(100)))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let mut r = http::Request::new(req.body().clone());
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

#[tokio::test(start_paused = true)]
async fn one_second_across_retries_stops_the_call_at_one_second() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let hang = service_fn(move |_: Req| {
        a.fetch_add(1, Ordering::SeqCst);
        async {
            std::future::pending::<()>().await;
            Ok::<http::Response<()>, BoxError>(http::Response::new(()))
        }
    });
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(tower::retry::RetryLayer::new(AlwaysRetry))
        .layer(TimeoutLayer::new(Duration::from_millis(350)))
        .service(hang);

    let start = Instant::now();
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert!(error::find::<DeadlineExceeded>(&*err).is_some(), "{err}");
    // 0–350 ms, 450–800 ms, then 900 ms until the deadline cut the third short.
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn inner_timeout_shrinks_to_the_time_left() {
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(300)))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .service(service_fn(|_: Req| async {
            // The attempt sees the deadline while it runs.
            let d = deadline::current().expect("a deadline in scope");
            assert_eq!(d - Instant::now(), Duration::from_millis(300));
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        }));
    let start = Instant::now();
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(
        Rejection::of(&*err).unwrap().kind(),
        RejectionKind::DeadlineExceeded
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_in_the_request_extensions() {
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(2)))
        .service(service_fn(|r: Req| async move {
            let d = *r.extensions().get::<CallDeadline>().expect("CallDeadline");
            Ok::<_, BoxError>(d.remaining())
        }));
    let left = svc.oneshot(req()).await.unwrap();
    assert_eq!(left, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn an_incoming_header_shortens_the_budget_and_an_expired_one_is_refused() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut svc =
        ServiceBuilder::new()
            .layer(DeadlineLayer::new(Duration::from_secs(10)))
            .service(service_fn(move |r: Req| {
                c.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<_, BoxError>(r.extensions().get::<CallDeadline>().unwrap().remaining())
                }
            }));
    let mut r = req();
    r.headers_mut()
        .insert("grpc-timeout", "250m".parse().unwrap());
    assert_eq!(
        svc.ready().await.unwrap().call(r).await.unwrap(),
        Duration::from_millis(250)
    );
    let mut r = req();
    r.headers_mut()
        .insert(TIMEOUT_HEADER, "1500".parse().unwrap());
    assert_eq!(
        svc.ready().await.unwrap().call(r).await.unwrap(),
        Duration::from_millis(1500)
    );
    // A longer header never extends our own budget.
    let mut r = req();
    r.headers_mut()
        .insert(TIMEOUT_HEADER, "60000".parse().unwrap());
    assert_eq!(
        svc.ready().await.unwrap().call(r).await.unwrap(),
        Duration::from_secs(10)
    );
    // Already out of time: the inner service is never called.
    let before = calls.load(Ordering::SeqCst);
    let mut r = req();
    r.headers_mut().insert(TIMEOUT_HEADER, "0".parse().unwrap());
    let err = svc.ready().await.unwrap().call(r).await.unwrap_err();
    assert!(error::find::<DeadlineExceeded>(&*err).is_some());
    assert_eq!(calls.load(Ordering::SeqCst), before);
}

#[test]
fn grpc_timeout_parses_and_formats() {
    use deadline::{format_grpc_timeout, parse_grpc_timeout};
    assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
    assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
    assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
    assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
    assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
    for bad in ["", "m", "123456789m", "1x", "-1S", "1.5S", "5µ", "µ"] {
        assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
    }
    // The finest unit that fits gRPC's 8 digits.
    assert_eq!(format_grpc_timeout(Duration::from_millis(250)), "250000u");
    assert_eq!(format_grpc_timeout(Duration::from_secs(3600)), "3600000m");
    for d in [
        Duration::from_nanos(1),
        Duration::from_millis(250),
        Duration::from_secs(3),
        Duration::from_secs(200_000),
        Duration::from_secs(10 * 365 * 86_400),
    ] {
        let s = format_grpc_timeout(d);
        let back = parse_grpc_timeout(&s).expect("parses back");
        assert!(back <= d, "{s} must not promise more than {d:?}");
        assert!(
            d - back < d / 1000 + Duration::from_nanos(1),
            "{s} loses too much of {d:?}"
        );
    }
}

#[test]
fn config_defaults_and_errors() {
    let cfg = DeadlineConfig::default();
    assert_eq!(cfg.budget, Duration::from_secs(30));
    assert!(cfg.read_headers);
    let err: ConfigError = DeadlineConfig {
        budget: Duration::ZERO,
        ..Default::default()
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(err.field(), "budget");
    assert!(toml::from_str::<DeadlineConfig>("budjet = \"1s\"").is_err());
}

#[tokio::test(start_paused = true)]
async fn end_to_end_the_caller_deadline_crosses_the_wire_and_is_honoured() {
    // Server: honours the caller's deadline, and reports what it received.
    let server = Router::new()
        .route(
            "/echo",
            get(|headers: http::HeaderMap| async move {
                headers
                    .get(TIMEOUT_HEADER)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default()
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(20)).await;
                "late"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(support::handle_error))
                .layer(DeadlineLayer::new(Duration::from_secs(10))),
        );
    let addr = support::serve(server).await;

    // Client: a deadline of 2 s, written onto the wire by PropagateDeadline.
    let client = support::client();
    let mut stack = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(2)).read_headers(false))
        .layer(PropagateDeadlineLayer::new())
        .service(client.clone());

    let res = stack
        .ready()
        .await
        .unwrap()
        .call(
            http::Request::get(format!("http://{addr}/echo"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "2000");

    // The server stops at the caller's 500 ms rather than its own 10 s.
    let start = Instant::now();
    let mut r = http::Request::get(format!("http://{addr}/slow"))
        .body(Full::default())
        .unwrap();
    r.headers_mut()
        .insert(TIMEOUT_HEADER, "500".parse().unwrap());
    let answer = support::send(&client, r).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.kind(), "deadline_exceeded");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_requests_get_grpc_timeout() {
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(1500)))
        .layer(PropagateDeadlineLayer::new())
        .service(service_fn(|r: Req| async move {
            Ok::<_, BoxError>((
                r.headers().get("grpc-timeout").cloned(),
                r.headers().get(TIMEOUT_HEADER).cloned(),
            ))
        }));
    let mut r = req();
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "application/grpc+proto".parse().unwrap(),
    );
    let (grpc, http) = svc.oneshot(r).await.unwrap();
    let grpc = grpc.expect("grpc-timeout set");
    assert_eq!(
        deadline::parse_grpc_timeout(grpc.to_str().unwrap()),
        Some(Duration::from_millis(1500))
    );
    assert!(http.is_none());
}

/// The header written never tells the server it has more time than the
/// client will wait: a shorter timeout the request already carries (tonic's
/// `Request::set_timeout` writes `grpc-timeout`) is kept, not replaced by
/// the deadline's 2 s; and the attempt timeout caps it too, with or without
/// a deadline (before, the preset sent the whole call's 30 s on an attempt
/// it gave up on after 1 s, and nothing without a deadline).
#[tokio::test(start_paused = true)]
async fn the_propagated_timeout_is_the_least_the_client_will_wait() {
    let echo = service_fn(|r: Req| async move {
        Ok::<_, BoxError>((
            r.headers()
                .get("grpc-timeout")
                .and_then(|v| deadline::parse_grpc_timeout(v.to_str().unwrap())),
            r.headers()
                .get(TIMEOUT_HEADER)
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap()),
        ))
    });
    let grpc = |timeout: Option<&str>| {
        let mut r = req();
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "application/grpc".parse().unwrap(),
        );
        if let Some(t) = timeout {
            r.headers_mut().insert("grpc-timeout", t.parse().unwrap());
        }
        r
    };

    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(2)).read_headers(false))
        .layer(PropagateDeadlineLayer::new())
        .service(echo);
    let (t, _) = client.clone().oneshot(grpc(Some("100m"))).await.unwrap();
    assert_eq!(
        t,
        Some(Duration::from_millis(100)),
        "the caller's own 100 ms was replaced"
    );
    let (t, _) = client.oneshot(grpc(None)).await.unwrap();
    assert_eq!(t, Some(Duration::from_secs(2)));

    // The attempt timeout caps it, deadline or not.
    let attempt = PropagateDeadlineLayer::new().attempt_timeout(Some(Duration::from_secs(1)));
    let client = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(30)))
        .layer(attempt)
        .service(echo);
    let (_, ms) = client.oneshot(req()).await.unwrap();
    assert_eq!(ms, Some(1000));
    let (_, ms) = attempt.layer(echo).oneshot(req()).await.unwrap();
    assert_eq!(ms, Some(1000));
    assert_eq!(
        PropagateDeadlineLayer::new()
            .layer(echo)
            .oneshot(req())
            .await
            .unwrap()
            .1,
        None
    );

    // The preset passes its attempt timeout on.
    let preset = tower_firebreak::preset::Resilience::builder()
        .deadline(Duration::from_secs(30))
        .attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    type Buffered = http::Request<tower_firebreak::retry::ReplayBody<Full<Bytes>>>;
    let echo_header = service_fn(|r: Buffered| async move {
        let mut res = http::Response::new(Full::<Bytes>::default());
        if let Some(v) = r.headers().get(TIMEOUT_HEADER) {
            res.headers_mut().insert("x-seen", v.clone());
        }
        Ok::<_, BoxError>(res)
    });
    let res = preset.layer(echo_header).oneshot(req()).await.unwrap();
    assert_eq!(res.headers()["x-seen"], "1000");
}

/// Deadline → breaker → attempt timeout, in front of a dependency that never
/// answers. `attempt` is the attempt timeout; each call starts `late` after
/// the deadline layer stamped it (the time the layers in between take).
/// Returns whether the breaker opened after four such calls.
async fn hung_calls_open_the_breaker(budget: Duration, attempt: Duration, late: Duration) -> bool {
    use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, State};
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .build()
        .unwrap();
    let h = breaker.handle();
    let mut svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(budget))
        .layer(breaker)
        .layer(TimeoutLayer::new(attempt))
        .service(service_fn(|_: Req| async {
            std::future::pending::<()>().await;
            Ok::<(), BoxError>(())
        }));
    for _ in 0..3 {
        let fut = svc.ready().await.unwrap().call(req());
        tokio::time::advance(late).await;
        let err = fut.await.unwrap_err();
        // The caller is told the budget ran out, whichever clock fired.
        assert_eq!(
            Rejection::of(&*err).unwrap().kind(),
            RejectionKind::DeadlineExceeded,
            "{err}"
        );
    }
    let open = h.state() == State::Open;
    if open {
        let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
        assert!(error::find::<CircuitOpen>(&*err).is_some(), "{err}");
    }
    open
}

/// An attempt timeout equal to the deadline: the deadline's timer fires a
/// hair earlier than the attempt's own, because the attempt started a little
/// after the deadline was stamped. The dependency still had (nearly) its
/// whole attempt timeout, so a hung dependency must open the breaker.
#[tokio::test(start_paused = true)]
async fn a_hung_dependency_opens_the_breaker_when_the_deadline_equals_the_attempt_timeout() {
    let s = Duration::from_secs(1);
    let late = Duration::from_millis(3);
    assert!(hung_calls_open_the_breaker(s, s, late).await);
}

/// A deadline that cuts an attempt well short of its own timeout says
/// nothing about the dependency: those calls are not counted.
#[tokio::test(start_paused = true)]
async fn an_attempt_cut_well_short_by_the_deadline_is_not_counted() {
    let late = Duration::from_millis(3);
    let opened =
        hung_calls_open_the_breaker(Duration::from_millis(500), Duration::from_secs(1), late).await;
    assert!(
        !opened,
        "the deadline gave the attempt only half its timeout"
    );
}

/// The same set-up behind a client that runs its own timer to the deadline
/// it was sent (tonic, given `grpc-timeout`): its deadline error arrives in
/// the same instant as our timer, and wins the tie because the inner future
/// is polled first. It still counts as the dependency's failure.
#[tokio::test(start_paused = true)]
async fn a_hung_dependency_behind_a_client_with_its_own_deadline_timer_opens_the_breaker() {
    use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State};
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .build()
        .unwrap();
    let h = breaker.handle();
    let s = Duration::from_secs(1);
    let mut svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(s))
        .layer(breaker)
        .layer(TimeoutLayer::new(s))
        .service(service_fn(|_: Req| async {
            let d = deadline::current().expect("a deadline in scope");
            tokio::time::sleep_until(d).await;
            Err::<(), BoxError>(ClientTimeout(DeadlineExceeded::new()).into())
        }));
    for _ in 0..3 {
        let fut = svc.ready().await.unwrap().call(req());
        tokio::time::advance(Duration::from_millis(3)).await;
        let err = fut.await.unwrap_err();
        assert_eq!(
            Rejection::of(&*err).unwrap().kind(),
            RejectionKind::DeadlineExceeded,
            "{err}"
        );
        // The client's own error is kept in the chain.
        assert!(error::find::<ClientTimeout>(&*err).is_some(), "{err}");
    }
    assert_eq!(h.state(), State::Open);
}

/// Callers' budgets below the attempt timeout (2 s against 10 s): a hung
/// dependency is cut by the caller's deadline every time, which is not a
/// failure of the dependency. With slow-call detection on, a call cut after
/// running `slow_call_duration` was slow by definition, and the breaker
/// opens on the slow-call rate. `inner_timeout` puts the attempt timeout
/// inside the breaker (the call ends in `DeadlineExceeded`); without it the
/// deadline drops the breaker's future.
async fn cut_calls_open_a_slow_call_breaker(budget: Duration, inner_timeout: bool) -> bool {
    use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, State};
    let breaker = CircuitBreakerLayer::builder()
        .count_window(4)
        .minimum_calls(4)
        .slow_call_duration(Duration::from_secs(1))
        .slow_call_rate(1.0)
        .build()
        .unwrap();
    let h = breaker.handle();
    let hung = service_fn(|_: Req| async {
        std::future::pending::<()>().await;
        Ok::<(), BoxError>(())
    });
    let mut svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(budget))
        .layer(breaker)
        .option_layer(inner_timeout.then(|| TimeoutLayer::new(Duration::from_secs(10))))
        .service(hung)
        .boxed_clone();
    for _ in 0..4 {
        let started = Instant::now();
        let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
        assert_eq!(
            Rejection::of(&*err).unwrap().kind(),
            RejectionKind::DeadlineExceeded,
            "{err}"
        );
        assert_eq!(started.elapsed(), budget);
    }
    let m = h.metrics();
    let open = h.state() == State::Open;
    if open {
        assert_eq!((m.calls, m.failures, m.slow_calls), (4, 0, 4));
        let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
        assert!(error::find::<CircuitOpen>(&*err).is_some(), "{err}");
    } else {
        assert_eq!((m.calls, m.slow_calls), (0, 0), "nothing counted");
    }
    open
}

#[tokio::test(start_paused = true)]
async fn calls_cut_by_shorter_caller_budgets_open_a_slow_call_breaker() {
    assert!(cut_calls_open_a_slow_call_breaker(Duration::from_secs(2), true).await);
}

#[tokio::test(start_paused = true)]
async fn calls_dropped_at_the_callers_deadline_open_a_slow_call_breaker() {
    assert!(cut_calls_open_a_slow_call_breaker(Duration::from_secs(2), false).await);
}

/// Cut before `slow_call_duration`, a call says nothing: not counted.
#[tokio::test(start_paused = true)]
async fn calls_cut_before_the_slow_call_duration_are_not_counted() {
    assert!(!cut_calls_open_a_slow_call_breaker(Duration::from_millis(500), true).await);
    assert!(!cut_calls_open_a_slow_call_breaker(Duration::from_millis(500), false).await);
}

/// A client's timeout error (as tonic's `TimeoutExpired` is, once
/// `PropagateDeadline` has wrapped it as `DeadlineExceeded`).
#[derive(Debug)]
struct ClientTimeout(DeadlineExceeded);

impl std::fmt::Display for ClientTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client's own timer fired")
    }
}

impl std::error::Error for ClientTimeout {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The margin is a tenth of the attempt timeout: an attempt granted 900 ms
/// of its 1 s counts, one granted 890 ms does not.
#[tokio::test(start_paused = true)]
async fn the_margin_is_a_tenth_of_the_attempt_timeout() {
    let s = Duration::from_secs(1);
    assert!(hung_calls_open_the_breaker(s, s, Duration::from_millis(100)).await);
    assert!(!hung_calls_open_the_breaker(s, s, Duration::from_millis(110)).await);
}
