//! The `Resilience` preset: defaults, contradictions, config files, and the
//! stack end to end around an axum router and a hyper client.

#[path = "../support/mod.rs"]
mod support;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_firebreak::circuit_breaker::State;
use tower_firebreak::error::{Rejection, RejectionKind};
#[cfg(any(feature = "toml", feature = "yaml"))]
use tower_firebreak::preset::Policies;
use tower_firebreak::preset::{Resilience, ResilienceConfig, Stage};
use tower_firebreak::retry::RetryConfig;

/// Every row of the defaults table in the preset's docs, checked against the
/// values the code really uses.
#[test]
fn the_documented_defaults_are_the_code_defaults() {
    let doc = include_str!("../../src/preset.rs");
    let mut rows = 0;
    let d = ResilienceConfig::default();
    let on = |s: &str| -> bool {
        match s {
            "rate_limit" => matches!(d.rate_limit, Stage::On(_)),
            _ => unreachable!(),
        }
    };
    for line in doc.lines() {
        let Some(row) = line.strip_prefix("//! | `") else {
            continue;
        };
        let mut cells = row.split('|').map(str::trim);
        let key = cells.next().unwrap().trim_end_matches('`');
        let documented = cells.next().unwrap();
        let Stage::On(b) = &d.bulkhead else {
            panic!("bulkhead on")
        };
        let Stage::On(dl) = &d.deadline else {
            panic!("deadline on")
        };
        let Stage::On(r) = &d.retry else {
            panic!("retry on")
        };
        let Stage::On(cb) = &d.circuit_breaker else {
            panic!("breaker on")
        };
        let Stage::On(t) = &d.timeout else {
            panic!("timeout on")
        };
        let fmt = |v: Duration| humantime_fmt(v);
        let actual = match key {
            "rate_limit" => (if on("rate_limit") { "on" } else { "off" }).to_owned(),
            "bulkhead.max_concurrent" => b.max_concurrent.to_string(),
            "bulkhead.max_wait" => fmt(b.max_wait),
            "deadline.budget" => fmt(dl.budget),
            "retry.max_attempts" => r.max_attempts.to_string(),
            "retry.base_delay" => fmt(r.base_delay),
            "retry.budget.ratio" => r.budget.ratio.to_string(),
            "circuit_breaker.time_window" => fmt(cb.time_window.expect("a time window")),
            "circuit_breaker.minimum_calls" => cb.minimum_calls.to_string(),
            "circuit_breaker.failure_rate" => cb.failure_rate.to_string(),
            "circuit_breaker.open_for" => fmt(cb.open_for),
            "timeout.timeout" => fmt(t.timeout),
            other => panic!("the docs name a setting the test does not know: {other}"),
        };
        assert_eq!(documented, actual, "the documented default of {key}");
        rows += 1;
    }
    assert_eq!(rows, 12, "every row of the defaults table was checked");
}

fn humantime_fmt(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[test]
fn the_defaults_build() {
    let layer = Resilience::builder()
        .build()
        .expect("defaults are consistent");
    assert_eq!(layer.breaker().state(), State::Closed);
    Resilience::server()
        .build()
        .expect("server defaults are consistent");
}

#[cfg(feature = "toml")]
#[test]
fn a_config_file_with_a_contradiction_names_both_fields() {
    let err = Policies::from_toml(
        r#"
        [policies.search]
        retry = false

        [policies.payments]
        deadline = { budget = "1s" }
        timeout = { timeout = "2s" }
        "#,
    )
    .unwrap_err();
    assert_eq!(err.field(), "policies.payments.timeout.timeout");
    assert_eq!(err.other_field(), Some("policies.payments.deadline.budget"));
    let msg = err.to_string();
    assert!(
        msg.contains("policies.payments.timeout.timeout = 2s"),
        "{msg}"
    );
    assert!(
        msg.contains("policies.payments.deadline.budget = 1s"),
        "{msg}"
    );

    // Retry delays that cannot fit the deadline.
    let err = Policies::from_toml(
        r#"
        [policies.slow]
        deadline = { budget = "1s" }
        timeout = { timeout = "100ms" }
        retry = { max_attempts = 4, base_delay = "300ms", jitter = false }
        "#,
    )
    .unwrap_err();
    assert_eq!(err.field(), "policies.slow.retry.base_delay");
    assert_eq!(err.other_field(), Some("policies.slow.deadline.budget"));

    // A breaker window under twice the attempt timeout.
    let err = Policies::from_toml(
        r#"
        [policies.flaky]
        timeout = { timeout = "10s" }
        circuit_breaker = { time_window = "15s" }
        "#,
    )
    .unwrap_err();
    assert_eq!(err.field(), "policies.flaky.circuit_breaker.time_window");
    assert_eq!(err.other_field(), Some("policies.flaky.timeout.timeout"));

    // An absurd attempt timeout is no panic (twice it overflowed `Duration`):
    // no window holds two of it.
    let err = Policies::from_toml(
        r#"
        [policies.forever]
        deadline = false
        timeout = { timeout = "300000000000y" }
        circuit_breaker = { time_window = "60s" }
        "#,
    )
    .unwrap_err();
    assert_eq!(err.field(), "policies.forever.circuit_breaker.time_window");

    // A typo is an error too, not a silently ignored setting.
    let err = Policies::from_toml("[policies.a]\nbulkhed = { max_concurrent = 1 }").unwrap_err();
    assert!(err.to_string().contains("bulkhed"), "{err}");
}

#[cfg(feature = "yaml")]
#[test]
fn yaml_loads_the_same_policies() {
    let p = Policies::from_yaml(
        "policies:\n  payments:\n    deadline: { budget: 2s }\n    timeout: { timeout: 500ms }\n    rate_limit: { per_second: 200 }\n    retry: false\n",
    )
    .unwrap();
    let cfg = p.get("payments").unwrap();
    assert_eq!(cfg.retry, Stage::Off);
    assert!(matches!(&cfg.rate_limit, Stage::On(r) if r.per_second == 200));
    p.layer("payments").unwrap();
    assert!(p.layer("nope").is_err());
}

#[test]
fn builder_contradictions_are_config_errors() {
    let err = Resilience::builder()
        .deadline(Duration::from_millis(500))
        .retry(RetryConfig {
            max_attempts: 5,
            base_delay: Duration::from_millis(200),
            jitter: false,
            ..RetryConfig::default()
        })
        .attempt_timeout(Duration::from_millis(100))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "retry.base_delay");
}

/// A router protected by the server preset: the rate limit answers 429 with
/// the limiter's Retry-After and a problem body; the deadline answers 504.
#[tokio::test(start_paused = true)]
async fn a_router_takes_the_server_preset_directly() {
    let preset = Resilience::server()
        .rate_limit(2)
        .deadline(Duration::from_millis(300))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        )
        .layer(preset.infallible());
    let addr = support::serve(app).await;
    let client = support::client();
    assert_eq!(support::get(&client, addr, "/").await.status, 200);
    let slow = support::get(&client, addr, "/slow").await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.kind(), "deadline_exceeded");
    let limited = support::get(&client, addr, "/").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.kind(), "rate_limited");
    assert!(limited.headers.contains_key(http::header::RETRY_AFTER));
}

/// A server preset whose bulkhead may hold a call (`max_wait`): the
/// caller's budget (`grpc-timeout`) runs from the request's arrival, not
/// from the end of the wait. A budget that ran out in the wait ends the call
/// there, before it reaches the handler.
#[tokio::test(start_paused = true)]
async fn the_callers_budget_runs_from_arrival_through_the_bulkhead_wait() {
    use tower_firebreak::bulkhead::BulkheadConfig;
    use tower_firebreak::deadline::CallDeadline;
    use tower_firebreak::preset::ResilienceBuilder;

    let preset = ResilienceBuilder::from_config(ResilienceConfig {
        retry: Stage::Off,
        circuit_breaker: Stage::Off,
        timeout: Stage::Off,
        bulkhead: Stage::On(BulkheadConfig {
            max_concurrent: 1,
            max_wait: Duration::from_secs(1),
            ..BulkheadConfig::default()
        }),
        ..ResilienceConfig::default()
    })
    .build()
    .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let svc = preset.layer(tower::service_fn(
        move |req: http::Request<tower_firebreak::retry::ReplayBody<Full<Bytes>>>| {
            let at = req.extensions().get::<CallDeadline>().map(CallDeadline::at);
            seen2.lock().unwrap().push(at);
            async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok::<_, tower_firebreak::BoxError>(http::Response::new(Full::new(Bytes::new())))
            }
        },
    ));
    let call = |budget: Option<&str>| {
        let mut req = http::Request::new(Full::new(Bytes::new()));
        if let Some(b) = budget {
            req.headers_mut().insert("grpc-timeout", b.parse().unwrap());
        }
        svc.clone().oneshot(req)
    };
    let arrival = tokio::time::Instant::now();
    // The first call holds the one permit for 500 ms; the second waits for
    // it, then runs to the budget its caller sent at arrival.
    let (first, second) = tokio::join!(call(None), call(Some("2S")));
    first.unwrap();
    second.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1], Some(arrival + Duration::from_secs(2)));

    // A 300 ms budget runs out during the 500 ms wait.
    let arrival = tokio::time::Instant::now();
    let (first, late) = tokio::join!(call(None), call(Some("300m")));
    first.unwrap();
    let err = late.unwrap_err();
    assert_eq!(
        Rejection::of(&*err).unwrap().kind(),
        RejectionKind::DeadlineExceeded,
        "{err}"
    );
    assert_eq!(
        tokio::time::Instant::now() - arrival,
        Duration::from_millis(500)
    );
}

/// The preset inside a request whose caller sent a 2 s budget (an outer
/// `Deadline`, as a server stack reading `grpc-timeout` gives), calling a
/// dependency that hangs: every call is cut by the caller's budget, before
/// the 10 s attempt timeout. On failures alone the breaker never opens; with
/// slow-call detection under the budget it does.
async fn behind_a_shorter_caller_budget(slow: Option<Duration>) -> State {
    use tower_firebreak::circuit_breaker::CircuitBreakerConfig;
    use tower_firebreak::deadline::DeadlineLayer;
    use tower_firebreak::retry::ReplayBody;

    let preset = Resilience::builder()
        .circuit_breaker(CircuitBreakerConfig {
            minimum_calls: 4,
            slow_call_duration: slow,
            ..ResilienceConfig::default_breaker()
        })
        .build()
        .unwrap();
    let breaker = preset.breaker();
    let hung = tower::service_fn(|_: http::Request<ReplayBody<Full<Bytes>>>| {
        std::future::pending::<Result<http::Response<Full<Bytes>>, tower_firebreak::BoxError>>()
    });
    let caller = DeadlineLayer::new(Duration::from_secs(2)).layer(preset.layer(hung));
    for _ in 0..4 {
        let started = tokio::time::Instant::now();
        let err = caller
            .clone()
            .oneshot(http::Request::new(Full::new(Bytes::new())))
            .await
            .unwrap_err();
        assert_eq!(
            Rejection::of(&*err).unwrap().kind(),
            RejectionKind::DeadlineExceeded,
            "{err}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
    breaker.state()
}

#[tokio::test(start_paused = true)]
async fn behind_a_shorter_caller_budget_slow_call_detection_opens_the_breaker() {
    assert_eq!(behind_a_shorter_caller_budget(None).await, State::Closed);
    assert_eq!(
        behind_a_shorter_caller_budget(Some(Duration::from_secs(1))).await,
        State::Open
    );
}

/// The client preset around hyper's legacy client: transient 503s are
/// retried to success; a dependency that keeps failing opens the breaker,
/// and then calls fail fast without reaching it.
#[tokio::test]
async fn the_client_preset_around_a_hyper_client() {
    let calls = Arc::new(AtomicUsize::new(0));
    let fail_until = Arc::new(AtomicUsize::new(2));
    let (c, f) = (calls.clone(), fail_until.clone());
    let downstream = Router::new().route(
        "/",
        get(move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let fail = n < f.load(Ordering::SeqCst);
            async move {
                if fail {
                    (http::StatusCode::SERVICE_UNAVAILABLE, "down")
                } else {
                    (http::StatusCode::OK, "up")
                }
            }
        }),
    );
    let addr = support::serve(downstream).await;

    let breaker_cfg = tower_firebreak::circuit_breaker::CircuitBreakerConfig {
        count_window: Some(10),
        time_window: None,
        minimum_calls: 4,
        failure_rate: 0.5,
        open_for: Duration::from_secs(30),
        ..ResilienceConfig::default_breaker()
    };
    let preset = Resilience::builder()
        .deadline(Duration::from_secs(5))
        .attempt_timeout(Duration::from_secs(1))
        .retry(RetryConfig {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            ..RetryConfig::default()
        })
        .circuit_breaker(breaker_cfg)
        .build()
        .unwrap();
    let breaker = preset.breaker();
    // The preset buffers bodies so retries can replay them: the client takes
    // `ReplayBody<B>` bodies.
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<tower_firebreak::retry::ReplayBody<Full<Bytes>>>();
    let mut client = ServiceBuilder::new().layer(preset).service(hyper);
    let get_root = || {
        http::Request::get(format!("http://{addr}/"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    // Two 503s, then 200: the retry hides the outage from the caller.
    let res = client
        .ready()
        .await
        .unwrap()
        .call(get_root())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "up");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Now B fails for good: the breaker sees the failures and opens.
    fail_until.store(usize::MAX, Ordering::SeqCst);
    for _ in 0..3 {
        let res = client.ready().await.unwrap().call(get_root()).await;
        if let Ok(r) = res {
            assert_eq!(r.status(), 503);
        }
    }
    assert_eq!(breaker.state(), State::Open);
    let before = calls.load(Ordering::SeqCst);
    let err = client
        .ready()
        .await
        .unwrap()
        .call(get_root())
        .await
        .unwrap_err();
    let r = Rejection::of(&*err).expect("a rejection");
    assert_eq!(r.kind(), RejectionKind::CircuitOpen);
    assert!(r.retry_after().unwrap() <= Duration::from_secs(30));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "an open breaker sends nothing"
    );
}

/// The breaker settings of the tests below: open after `k` failures in a row.
fn consecutive_failures(k: u32) -> tower_firebreak::circuit_breaker::CircuitBreakerConfig {
    tower_firebreak::circuit_breaker::CircuitBreakerConfig {
        consecutive_failures: Some(k),
        time_window: None,
        ..ResilienceConfig::default_breaker()
    }
}

/// A preset with one attempt and a breaker that opens after `k` failures
/// in a row.
fn one_attempt_preset(k: u32) -> tower_firebreak::preset::ResilienceLayer {
    Resilience::builder()
        .max_attempts(1)
        .circuit_breaker(consecutive_failures(k))
        .build()
        .unwrap()
}

/// With the attempt-timeout stage off, the budget is the attempt's timeout:
/// a dependency that hangs through a whole budget still opens the breaker
/// (the deadline's timer fires first, a hair before the attempt's would).
#[tokio::test(start_paused = true)]
async fn without_an_attempt_timeout_a_hung_dependency_still_opens_the_breaker() {
    let preset = Resilience::builder()
        .deadline(Duration::from_secs(1))
        .max_attempts(1)
        .circuit_breaker(consecutive_failures(2))
        .without("timeout")
        .build()
        .unwrap();
    let breaker = preset.breaker();
    let hung = tower::service_fn(|_: http::Request<_>| async {
        std::future::pending::<()>().await;
        Ok::<http::Response<Full<Bytes>>, tower_firebreak::BoxError>(http::Response::default())
    });
    let mut client = ServiceBuilder::new().layer(preset).service(hung);
    for _ in 0..2 {
        let fut = client
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(Full::<Bytes>::default()));
        // The layers between the deadline and the attempt take a moment.
        tokio::time::advance(Duration::from_millis(2)).await;
        let err = fut.await.unwrap_err();
        assert_eq!(
            Rejection::of(&*err).unwrap().kind(),
            RejectionKind::DeadlineExceeded,
            "{err}"
        );
    }
    assert_eq!(breaker.state(), State::Open);
}

/// The preset's breaker sees a gRPC dependency's failures sent the way
/// tonic sends a handler's `Err`: HTTP 200 with `grpc-status` in the
/// headers (Trailers-Only). A NOT_FOUND (the caller's fault) is not one.
#[tokio::test(start_paused = true)]
async fn the_preset_breaker_counts_grpc_failures_in_the_headers() {
    let preset = one_attempt_preset(3);
    let breaker = preset.breaker();
    let code = Arc::new(AtomicUsize::new(5)); // NOT_FOUND
    let c = code.clone();
    let grpc = tower::service_fn(move |_: http::Request<_>| {
        let res = http::Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", c.load(Ordering::SeqCst).to_string())
            .body(Full::<Bytes>::default())
            .unwrap();
        async move { Ok::<_, tower_firebreak::BoxError>(res) }
    });
    let mut client = ServiceBuilder::new().layer(preset).service(grpc);
    let grpc_req = || {
        http::Request::post("http://orders.internal/orders.Orders/Get")
            .header("content-type", "application/grpc")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    for _ in 0..5 {
        client
            .ready()
            .await
            .unwrap()
            .call(grpc_req())
            .await
            .unwrap();
    }
    assert_eq!(breaker.state(), State::Closed, "NOT_FOUND is not a failure");
    code.store(14, Ordering::SeqCst); // UNAVAILABLE
    for _ in 0..3 {
        client
            .ready()
            .await
            .unwrap()
            .call(grpc_req())
            .await
            .unwrap();
    }
    assert_eq!(breaker.state(), State::Open);
    let err = client
        .ready()
        .await
        .unwrap()
        .call(grpc_req())
        .await
        .unwrap_err();
    assert_eq!(
        Rejection::of(&*err).unwrap().kind(),
        RejectionKind::CircuitOpen
    );
}

/// A caller whose upload breaks off mid-body fails its call, but that is
/// the caller's fault: the breaker does not count it, however many do it.
/// Through a real hyper client, whose error keeps the body's error in its
/// chain.
#[tokio::test]
async fn aborted_uploads_do_not_open_the_breaker() {
    use http_body_util::combinators::BoxBody;
    use tower_firebreak::retry::{ReplayBody, RequestBodyError};
    let downstream = Router::new().route(
        "/",
        axum::routing::post(|body: Bytes| async move { body.len().to_string() }),
    );
    let addr = support::serve(downstream).await;
    let preset = one_attempt_preset(2);
    let breaker = preset.breaker();
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<ReplayBody<BoxBody<Bytes, tower_firebreak::BoxError>>>();
    let mut client = ServiceBuilder::new().layer(preset).service(hyper);
    for _ in 0..4 {
        // Half the body, then the client goes away.
        let frames = futures_util::stream::iter([
            Ok(http_body::Frame::data(Bytes::from_static(b"half"))),
            Err::<http_body::Frame<Bytes>, tower_firebreak::BoxError>("client went away".into()),
        ]);
        let body = BoxBody::new(http_body_util::StreamBody::new(frames));
        let req = http::Request::post(format!("http://{addr}/"))
            .header("content-length", "100")
            .body(body)
            .unwrap();
        let err = client.ready().await.unwrap().call(req).await.unwrap_err();
        assert!(
            tower_firebreak::error::find::<RequestBodyError>(&*err).is_some(),
            "{err:?}"
        );
    }
    assert_eq!(breaker.state(), State::Closed);
    assert_eq!(breaker.metrics().failures, 0);
}
