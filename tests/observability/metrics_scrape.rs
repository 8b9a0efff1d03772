//! Drives a breaker through open and close, a bulkhead and a limiter into
//! rejection, and two deferred jobs through replay (one delivered, one
//! dead-lettered and redriven), then scrapes the admin router's `/metrics`
//! and checks every series's value.
//!
//! Its own test binary: it installs the process-wide Prometheus recorder.

#[path = "../support/mod.rs"]
mod support;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tower::{Layer, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::admin::Admin;
use tower_firebreak::bulkhead::BulkheadLayer;
use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
use tower_firebreak::defer::{DeferConfig, DeferLayer, Replayer};
use tower_firebreak::queue::Queue;
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::rate_limit::RateLimitLayer;
use tower_firebreak::registry::Registry;
use tower_firebreak::retry::{RetryBudget, RetryLayer, RetryPolicy};

type Req = http::Request<Full<Bytes>>;
type Res = http::Response<Full<Bytes>>;

type Labels = BTreeSet<(String, String)>;

/// A Prometheus text exposition, as `series name -> [(labels, value)]`.
struct Scrape {
    text: String,
    series: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut series: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (key, value) = line.rsplit_once(' ').expect("name value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match key.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (key, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            series
                .entry(name.to_owned())
                .or_default()
                .push((labels, value));
        }
        Scrape { text, series }
    }

    /// The value of the one series `name` whose labels are exactly `labels`.
    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let found = self
            .series
            .get(name)
            .and_then(|all| all.iter().find(|(l, _)| *l == want))
            .map(|(_, v)| *v);
        match found {
            Some(v) => v,
            None => panic!("no series {name}{want:?} in the scrape:\n{}", self.text),
        }
    }

    #[track_caller]
    fn check(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let got = self.value(name, labels);
        assert_eq!(
            got, want,
            "{name}{labels:?} is {got}, expected {want}; scrape:\n{}",
            self.text
        );
    }
}

async fn scrape(admin: &axum::Router) -> Scrape {
    let (status, _, body) = get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    Scrape::parse(String::from_utf8(body.to_vec()).unwrap())
}

async fn get(admin: &axum::Router, path: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    support::in_process(admin, http::Method::GET, path).await
}

async fn get_json(admin: &axum::Router, path: &str) -> serde_json::Value {
    let (status, headers, body) = get(admin, path).await;
    assert_eq!(status, StatusCode::OK, "{path}");
    assert_eq!(headers["content-type"], "application/json", "{path}");
    serde_json::from_slice(&body).unwrap()
}

async fn post(admin: &axum::Router, path: &str) -> (StatusCode, Bytes) {
    let (status, _, body) = support::in_process(admin, http::Method::POST, path).await;
    (status, body)
}

fn order(key: &str, body: &'static str) -> Req {
    http::Request::post("http://orders.internal/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn reply(status: u16) -> Res {
    let mut res = http::Response::new(Full::new(Bytes::new()));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res
}

#[tokio::test(start_paused = true)]
async fn every_series_has_the_value_the_calls_made() {
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder in this binary");
    let registry = Registry::new();

    // ------------------------------------------------------------ breaker
    let breaker = CircuitBreakerLayer::builder()
        .name("payments")
        .count_window(4)
        .minimum_calls(4)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(1))
        .half_open_calls(1)
        .build()
        .unwrap();
    let handle = breaker.handle();
    registry.add_breaker(handle.clone()).unwrap();
    let svc = breaker.layer(service_fn(|fail: bool| async move {
        if fail {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    }));
    for _ in 0..4 {
        assert!(svc.clone().oneshot(true).await.is_err());
    }
    assert_eq!(handle.state(), State::Open);
    for _ in 0..2 {
        assert!(svc.clone().oneshot(false).await.is_err(), "rejected");
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    svc.clone().oneshot(false).await.expect("the probe passes");
    assert_eq!(handle.state(), State::Closed);

    // A call dropped unanswered after `slow_call_duration` is counted as
    // slow, under its own outcome.
    let slowcut = CircuitBreakerLayer::builder()
        .name("slowcut")
        .slow_call_duration(Duration::from_secs(1))
        .build()
        .unwrap();
    let hung = slowcut.layer(service_fn(|_: ()| {
        std::future::pending::<Result<(), BoxError>>()
    }));
    let cut = tokio::time::timeout(Duration::from_secs(2), hung.oneshot(())).await;
    assert!(cut.is_err(), "the hung call is cut");

    // ------------------------------------------------------ keyed breakers
    let keyed = |name: &str| CircuitBreakerConfig {
        name: Some(name.to_owned()),
        count_window: Some(2),
        minimum_calls: 2,
        ..Default::default()
    };
    let host = |req: &(&'static str, bool)| req.0;
    let call = |req: (&'static str, bool)| async move {
        if req.1 {
            Err::<(), BoxError>("down".into())
        } else {
            Ok(())
        }
    };
    let labelled = keyed("upstreams")
        .into_keyed_layer(host)
        .unwrap()
        .label_keys()
        .layer(service_fn(call));
    let quiet = keyed("quiet")
        .into_keyed_layer(host)
        .unwrap()
        .layer(service_fn(call));
    for req in [("a", true), ("a", true), ("b", false)] {
        let _ = labelled.clone().oneshot(req).await;
        let _ = quiet.clone().oneshot(req).await;
    }

    // ----------------------------------------------------------- bulkhead
    let bulkhead = BulkheadLayer::new(1).name("inventory");
    registry.add_bulkhead(bulkhead.handle()).unwrap();
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let held = Arc::new(tokio::sync::Mutex::new(Some(held)));
    let bsvc = bulkhead.layer(service_fn(move |_: ()| {
        let held = held.clone();
        async move {
            if let Some(rx) = held.lock().await.take() {
                let _ = rx.await;
            }
            Ok::<_, BoxError>(())
        }
    }));
    let in_flight = tokio::spawn(bsvc.clone().oneshot(()));
    tokio::task::yield_now().await;
    assert!(bsvc.clone().oneshot(()).await.is_err(), "bulkhead full");

    // Keyed bulkheads with calls held in flight: the layer's gauge (keys
    // not labelled) is the sum over the keys, a labelled key's its own.
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let held_svc = move |_: &'static str| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            Ok::<_, BoxError>(())
        }
    };
    let pooled = tower_firebreak::bulkhead::KeyedBulkheadLayer::new(4, |k: &&'static str| *k)
        .name("by-tenant")
        .registry(&registry);
    let labelled = tower_firebreak::bulkhead::KeyedBulkheadLayer::new(4, |k: &&'static str| *k)
        .name("by-host")
        .label_keys()
        .registry(&registry);
    let psvc = pooled.layer(service_fn(held_svc.clone()));
    let lsvc = labelled.layer(service_fn(held_svc));
    let mut keyed_calls = Vec::new();
    for key in ["a", "a", "b"] {
        keyed_calls.push(tokio::spawn(psvc.clone().oneshot(key)));
        keyed_calls.push(tokio::spawn(lsvc.clone().oneshot(key)));
    }
    tokio::task::yield_now().await;

    // A bulkhead whose second call waits 100 ms for the first's slot.
    let waiting = BulkheadLayer::new(1)
        .max_wait(Duration::from_secs(1))
        .name("stock");
    let (free, hold) = tokio::sync::oneshot::channel::<()>();
    let hold = Arc::new(tokio::sync::Mutex::new(Some(hold)));
    let wsvc = waiting.layer(service_fn(move |_: ()| {
        let hold = hold.clone();
        async move {
            if let Some(rx) = hold.lock().await.take() {
                let _ = rx.await;
            }
            Ok::<_, BoxError>(())
        }
    }));
    let first = tokio::spawn(wsvc.clone().oneshot(()));
    tokio::task::yield_now().await;
    let second = tokio::spawn(wsvc.clone().oneshot(()));
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(100)).await;
    let _ = free.send(());
    first.await.unwrap().unwrap();
    second.await.unwrap().expect("got the slot after 100 ms");

    // --------------------------------------------------------- rate limit
    let limit = RateLimitLayer::per_second(1).burst(1).name("api");
    registry.add_rate_limit(&limit).unwrap();
    let lsvc = limit.layer(service_fn(|_: ()| async { Ok::<_, BoxError>(()) }));
    lsvc.clone().oneshot(()).await.unwrap();
    assert!(lsvc.clone().oneshot(()).await.is_err(), "rate limited");

    // -------------------------------------------------------------- retry
    let failing = service_fn(|_: u32| async { Err::<(), BoxError>("flaky".into()) });
    let retried = RetryLayer::new(
        RetryPolicy::fixed(Duration::from_millis(10))
            .no_jitter()
            .max_attempts(3)
            .name("search"),
    )
    .layer(failing);
    assert!(
        retried.oneshot(1).await.is_err(),
        "three attempts, all failed"
    );
    // A budget with nothing in it: no retry at all.
    let broke = RetryLayer::new(
        RetryPolicy::fixed(Duration::from_millis(10))
            .budget(RetryBudget::new(Duration::from_secs(1), 0, 0.0))
            .name("search"),
    )
    .layer(failing);
    assert!(broke.oneshot(1).await.is_err());

    // -------------------------------------------- defer, replay, dead letter
    let queue = MemoryQueue::builder().max_attempts(2).build().unwrap();
    registry.add_queue("orders", queue.clone());
    let app = DeferLayer::new(queue.clone())
        .name("orders")
        .layer(service_fn(|_: Req| async { Ok::<_, BoxError>(reply(503)) }));
    for (key, body) in [("k1", "good"), ("k2", "bad")] {
        let res = app.clone().oneshot(order(key, body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    // The name can come from config too.
    let from_config = DeferConfig {
        name: Some("configured".into()),
        ..Default::default()
    }
    .into_layer(MemoryQueue::new())
    .unwrap()
    .layer(service_fn(|_: Req| async { Ok::<_, BoxError>(reply(503)) }));
    let res = from_config.oneshot(order("k3", "x")).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    let bad_sends = Arc::new(AtomicUsize::new(0));
    let counted = bad_sends.clone();
    let upstream = service_fn(move |req: Req| {
        let counted = counted.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if &body[..] == b"good" {
                Ok::<_, BoxError>(reply(200))
            } else {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(reply(500))
            }
        }
    });
    let replayer = Replayer::new(queue.clone(), upstream)
        .name("orders")
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .poll_interval(Duration::from_millis(10))
        .spawn();
    for _ in 0..1000 {
        if queue.dead_letters(10).await.unwrap().len() == 1 && queue.depth().await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replayer.shutdown().await;
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "the bad job is dead-lettered");
    assert_eq!(
        bad_sends.load(Ordering::SeqCst),
        2,
        "max_attempts(2): sent twice"
    );

    // ------------------------------------------------------------- scrape
    let admin: axum::Router = Admin::new(registry.clone()).prometheus(prometheus).router();
    let s = scrape(&admin).await;
    s.check(
        "firebreak_bulkhead_in_flight",
        &[("name", "by-tenant")],
        3.0,
    );
    s.check(
        "firebreak_bulkhead_in_flight",
        &[("name", "by-host"), ("key", "a")],
        2.0,
    );
    s.check(
        "firebreak_bulkhead_in_flight",
        &[("name", "by-host"), ("key", "b")],
        1.0,
    );
    open_gate.send_replace(true);
    for c in keyed_calls {
        c.await.unwrap().unwrap();
    }

    let cb = |name, outcome| {
        [
            ("layer", "circuit_breaker"),
            ("name", name),
            ("outcome", outcome),
        ]
    };
    s.check("firebreak_calls", &cb("payments", "failure"), 4.0);
    s.check("firebreak_calls", &cb("payments", "rejected"), 2.0);
    s.check("firebreak_calls", &cb("payments", "success"), 1.0);
    s.check("firebreak_calls", &cb("slowcut", "unanswered_slow"), 1.0);
    s.check("firebreak_calls", &cb("slowcut", "success"), 0.0);
    s.check(
        "firebreak_rejections",
        &[
            ("layer", "circuit_breaker"),
            ("name", "payments"),
            ("kind", "circuit_open"),
        ],
        2.0,
    );
    let tr = |from, to| [("name", "payments"), ("from", from), ("to", to)];
    s.check("firebreak_breaker_transitions", &tr("closed", "open"), 1.0);
    s.check(
        "firebreak_breaker_transitions",
        &tr("open", "half_open"),
        1.0,
    );
    s.check(
        "firebreak_breaker_transitions",
        &tr("half_open", "closed"),
        1.0,
    );
    s.check(
        "firebreak_breaker_probes",
        &[("name", "payments"), ("outcome", "success")],
        1.0,
    );
    s.check(
        "firebreak_breaker_probes",
        &[("name", "payments"), ("outcome", "failure")],
        0.0,
    );
    let st = |state| [("name", "payments"), ("state", state)];
    s.check("firebreak_breaker_state", &st("closed"), 1.0);
    s.check("firebreak_breaker_state", &st("open"), 0.0);
    s.check("firebreak_breaker_state", &st("half_open"), 0.0);

    let bh = |outcome| {
        [
            ("layer", "bulkhead"),
            ("name", "inventory"),
            ("outcome", outcome),
        ]
    };
    s.check("firebreak_calls", &bh("admitted"), 1.0);
    s.check("firebreak_calls", &bh("rejected"), 1.0);
    s.check(
        "firebreak_rejections",
        &[
            ("layer", "bulkhead"),
            ("name", "inventory"),
            ("kind", "bulkhead_full"),
        ],
        1.0,
    );
    s.check(
        "firebreak_bulkhead_in_flight",
        &[("name", "inventory")],
        1.0,
    );

    let stock = |outcome| {
        [
            ("layer", "bulkhead"),
            ("name", "stock"),
            ("outcome", outcome),
        ]
    };
    s.check("firebreak_calls", &stock("admitted"), 2.0);
    s.check("firebreak_calls", &stock("rejected"), 0.0);
    s.check("firebreak_bulkhead_wait_count", &[("name", "stock")], 1.0);
    s.check("firebreak_bulkhead_wait_sum", &[("name", "stock")], 0.1);

    let rl = |outcome| {
        [
            ("layer", "rate_limit"),
            ("name", "api"),
            ("outcome", outcome),
        ]
    };
    s.check("firebreak_calls", &rl("admitted"), 1.0);
    s.check("firebreak_calls", &rl("rejected"), 1.0);
    s.check(
        "firebreak_rejections",
        &[
            ("layer", "rate_limit"),
            ("name", "api"),
            ("kind", "rate_limited"),
        ],
        1.0,
    );

    let key = |k, state| [("name", "upstreams"), ("key", k), ("state", state)];
    s.check("firebreak_breaker_state", &key("a", "open"), 1.0);
    s.check("firebreak_breaker_state", &key("a", "closed"), 0.0);
    s.check("firebreak_breaker_state", &key("b", "closed"), 1.0);
    s.check(
        "firebreak_calls",
        &[
            ("layer", "circuit_breaker"),
            ("name", "upstreams"),
            ("key", "a"),
            ("outcome", "failure"),
        ],
        2.0,
    );
    s.check(
        "firebreak_breaker_transitions",
        &[
            ("name", "upstreams"),
            ("key", "a"),
            ("from", "closed"),
            ("to", "open"),
        ],
        1.0,
    );
    assert!(
        !s.text.contains("name=\"quiet\""),
        "keyed breakers without label_keys record nothing:\n{}",
        s.text
    );

    s.check("firebreak_retry_attempts", &[("name", "search")], 2.0);
    let gave_up = |reason| [("name", "search"), ("reason", reason)];
    s.check("firebreak_retry_gave_up", &gave_up("max_attempts"), 1.0);
    s.check("firebreak_retry_gave_up", &gave_up("budget"), 1.0);
    s.check("firebreak_retry_gave_up", &gave_up("deadline"), 0.0);

    s.check(
        "firebreak_calls",
        &[
            ("layer", "defer"),
            ("name", "orders"),
            ("outcome", "deferred"),
        ],
        2.0,
    );
    s.check(
        "firebreak_defer_enqueue_duration_count",
        &[("name", "orders")],
        2.0,
    );
    s.check(
        "firebreak_calls",
        &[
            ("layer", "defer"),
            ("name", "configured"),
            ("outcome", "deferred"),
        ],
        1.0,
    );
    // Three sends: the good job once, the bad one twice.
    s.check(
        "firebreak_replay_duration_count",
        &[("name", "orders")],
        3.0,
    );
    let jobs = |outcome| [("name", "orders"), ("outcome", outcome)];
    s.check("firebreak_replay_jobs", &jobs("delivered"), 1.0);
    s.check("firebreak_replay_jobs", &jobs("failed"), 2.0);
    s.check("firebreak_replay_jobs", &jobs("breaker_open"), 0.0);
    s.check("firebreak_queue_depth", &[("name", "orders")], 0.0);
    s.check("firebreak_queue_oldest_age", &[("name", "orders")], 0.0);
    s.check("firebreak_queue_dead_letters", &[("name", "orders")], 1.0);

    // ----------------------------------------------- the JSON routes
    let status = get_json(&admin, "/firebreak/status").await;
    assert_eq!(status["breakers"][0]["name"], "payments");
    assert_eq!(status["breakers"][0]["state"], "closed");
    let transitions: Vec<_> = status["breakers"][0]["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}>{}",
                t["from"].as_str().unwrap(),
                t["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        transitions,
        ["closed>open", "open>half_open", "half_open>closed"]
    );
    assert_eq!(status["bulkheads"][0]["name"], "inventory");
    assert_eq!(status["bulkheads"][0]["in_flight"], 1);
    assert_eq!(status["rate_limits"][0]["name"], "api");
    assert_eq!(status["rate_limits"][0]["burst"], 1);
    assert_eq!(status["queues"][0]["name"], "orders");
    assert_eq!(status["queues"][0]["depth"], 0);
    assert_eq!(status["queues"][0]["dead_letters"], 1);
    let listing = get_json(&admin, "/firebreak/jobs/dead").await;
    let letters = listing["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{listing}");
    assert_eq!(letters[0]["queue"], "orders");
    assert_eq!(letters[0]["id"], dead[0].id.to_string());
    assert_eq!(letters[0]["uri"], "http://orders.internal/orders");
    let (code, headers, _) = get(&admin, "/firebreak").await;
    assert_eq!(code, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        headers["location"], "firebreak/",
        "relative, so a nested router works"
    );
    let (code, headers, page) = get(&admin, "/firebreak/").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert!(
        std::str::from_utf8(&page)
            .unwrap()
            .contains("fetch('status'")
    );

    // ------------------------------------------- admin actions, then again
    let (status, _) = post(&admin, "/firebreak/breakers/payments/force-open").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(handle.state(), State::ForcedOpen);
    let (status, _) = post(&admin, "/firebreak/breakers/nope/reset").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = post(
        &admin,
        &format!("/firebreak/jobs/dead/{}/redrive", dead[0].id),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (status, _) = post(
        &admin,
        &format!("/firebreak/jobs/dead/{}/redrive", dead[0].id),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no longer dead-lettered");
    let s = scrape(&admin).await;
    s.check("firebreak_breaker_state", &st("forced_open"), 1.0);
    s.check("firebreak_breaker_state", &st("closed"), 0.0);
    s.check(
        "firebreak_breaker_transitions",
        &tr("closed", "forced_open"),
        1.0,
    );
    s.check("firebreak_queue_depth", &[("name", "orders")], 1.0);
    // The queues measure age by the wall clock, which paused time does not
    // stop: the redriven job was enqueued moments ago.
    let age = s.value("firebreak_queue_oldest_age", &[("name", "orders")]);
    assert!((0.0..60.0).contains(&age), "oldest age {age}");
    s.check("firebreak_queue_dead_letters", &[("name", "orders")], 0.0);

    let _ = release.send(());
    in_flight.await.unwrap().unwrap();
    let s = scrape(&admin).await;
    s.check(
        "firebreak_bulkhead_in_flight",
        &[("name", "inventory")],
        0.0,
    );
}
