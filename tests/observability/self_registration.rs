//! Named components register themselves (issue 9): through the real
//! layers, into `Registry::global()` (seen in its snapshot and in the admin
//! router's `/firebreak/status`) or into the registry given with
//! `.registry(..)`, and leave it when dropped.
//!
//! The global registry is shared by every test in this binary, so each test
//! uses names of its own.

#[path = "../support/mod.rs"]
mod support;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::admin::Admin;
use tower_firebreak::bulkhead::{BulkheadLayer, KeyedBulkheadLayer};
use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};
use tower_firebreak::defer::{DeferLayer, Replayer};
use tower_firebreak::preset::{Resilience, ResilienceConfig};
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::rate_limit::{KeyedRateLimitLayer, RateLimitLayer};
use tower_firebreak::registry::{Registry, Snapshot};

fn echo() -> impl Service<u32, Response = u32, Error = BoxError> + Clone {
    service_fn(|x: u32| async move { Ok::<_, BoxError>(x) })
}

fn breakers(s: &Snapshot) -> Vec<&str> {
    s.breakers.iter().map(|b| b.name.as_str()).collect()
}

fn bulkheads(s: &Snapshot) -> Vec<&str> {
    s.bulkheads.iter().map(|b| b.name.as_str()).collect()
}

fn limiters(s: &Snapshot) -> Vec<&str> {
    s.rate_limits.iter().map(|b| b.name.as_str()).collect()
}

fn queues(s: &Snapshot) -> Vec<&str> {
    s.queues.iter().map(|b| b.name.as_str()).collect()
}

async fn status_json(admin: &axum::Router) -> serde_json::Value {
    let (status, _, body) =
        support::in_process(admin, http::Method::GET, "/firebreak/status").await;
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).unwrap()
}

fn json_names(v: &serde_json::Value, kind: &str) -> Vec<String> {
    v[kind]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_named_breaker_is_in_the_global_registry_and_status_until_dropped() {
    let admin: axum::Router = Admin::global().router();
    let layer = CircuitBreakerLayer::builder()
        .name("sr-breaker")
        .build()
        .unwrap();
    let mut svc = layer.layer(echo());
    assert_eq!(svc.ready().await.unwrap().call(7).await.unwrap(), 7);

    let snap = Registry::global().snapshot().await;
    let entry = snap
        .breakers
        .iter()
        .find(|b| b.name == "sr-breaker")
        .expect("registered when built");
    assert_eq!(entry.state, "closed");
    assert_eq!(entry.calls, 1);
    let json = status_json(&admin).await;
    assert!(json_names(&json, "breakers").contains(&"sr-breaker".to_owned()));

    // The admin router operates it through the registry.
    let (status, _) = post(&admin, "/firebreak/breakers/sr-breaker/force-open").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(layer.handle().state(), State::ForcedOpen);

    // The service still holds the breaker: still listed.
    drop(layer);
    assert!(Registry::global().breaker("sr-breaker").is_some());
    drop(svc);
    assert!(Registry::global().breaker("sr-breaker").is_none());
    assert!(!breakers(&Registry::global().snapshot().await).contains(&"sr-breaker"));
    let json = status_json(&admin).await;
    assert!(!json_names(&json, "breakers").contains(&"sr-breaker".to_owned()));
}

#[tokio::test(start_paused = true)]
async fn a_breaker_from_config_registers_and_an_unnamed_one_does_not() {
    let unnamed = CircuitBreakerConfig::default().into_layer().unwrap();
    let named = CircuitBreakerConfig {
        name: Some("sr-config-breaker".into()),
        ..CircuitBreakerConfig::default()
    }
    .into_layer()
    .unwrap();
    let snap = Registry::global().snapshot().await;
    assert!(breakers(&snap).contains(&"sr-config-breaker"));
    // Other tests run in parallel; only this test's two layers are counted.
    let ours = snap
        .breakers
        .iter()
        .filter(|b| b.name.starts_with("sr-config"))
        .count();
    assert_eq!(ours, 1);
    drop((unnamed, named));
}

#[tokio::test(start_paused = true)]
async fn a_named_bulkhead_registers_with_its_first_service_and_leaves_with_the_last() {
    let layer = BulkheadLayer::new(3)
        .name("sr-bulkhead")
        .max_wait(Duration::from_millis(5));
    assert!(
        Registry::global().bulkhead("sr-bulkhead").is_none(),
        "not in use yet"
    );
    let a = layer.layer(echo());
    let b = layer.layer(echo());
    let snap = Registry::global().snapshot().await;
    let found: Vec<_> = snap
        .bulkheads
        .iter()
        .filter(|h| h.name == "sr-bulkhead")
        .collect();
    assert_eq!(found.len(), 1, "two services of one layer are one entry");
    assert_eq!(found[0].max_concurrent, 3);
    drop(layer);
    drop(a);
    assert!(Registry::global().bulkhead("sr-bulkhead").is_some());
    drop(b);
    assert!(!bulkheads(&Registry::global().snapshot().await).contains(&"sr-bulkhead"));
}

#[tokio::test(start_paused = true)]
async fn a_limiter_registers_its_final_settings_in_the_registry_it_was_given() {
    let mine = Registry::new();
    let layer = RateLimitLayer::per_second(50)
        .name("sr-limiter")
        .registry(&mine)
        .burst(10)
        .max_wait(Duration::from_millis(20));
    let svc = layer.layer(echo());
    let snap = mine.snapshot().await;
    assert_eq!(limiters(&snap), ["sr-limiter"]);
    assert_eq!(snap.rate_limits[0].burst, 10);
    assert_eq!(snap.rate_limits[0].replenish_interval_ms, 20.0);
    assert!(!limiters(&Registry::global().snapshot().await).contains(&"sr-limiter"));
    drop((layer, svc));
    assert!(mine.snapshot().await.rate_limits.is_empty());
}

#[tokio::test(start_paused = true)]
async fn two_live_breakers_under_one_name_show_the_newer_then_the_older() {
    let mine = Registry::new();
    let build = || {
        CircuitBreakerLayer::builder()
            .name("twice")
            .registry(&mine)
            .build()
            .unwrap()
    };
    let older = build();
    let newer = build();
    newer.handle().force_open();
    let snap = mine.snapshot().await;
    assert_eq!(breakers(&snap), ["twice"], "one entry per name");
    assert_eq!(snap.breakers[0].state, "forced_open", "the newer one");
    drop(newer);
    let snap = mine.snapshot().await;
    assert_eq!(snap.breakers[0].state, "closed", "the older one again");
    older.handle().force_open();
    assert_eq!(mine.breaker("twice").unwrap().state(), State::ForcedOpen);
}

#[tokio::test(start_paused = true)]
async fn explicit_adds_still_work_and_keep_the_component() {
    let mine = Registry::new();
    let breaker = CircuitBreakerLayer::builder()
        .name("kept")
        .registry(&mine)
        .build()
        .unwrap();
    // Already registered weakly; the explicit add makes it one strong entry.
    mine.add_breaker(breaker.handle()).unwrap();
    let bulkhead = BulkheadLayer::new(2).name("kept").registry(&mine);
    mine.add_bulkhead(bulkhead.handle()).unwrap();
    let limiter = RateLimitLayer::per_second(5).name("kept");
    mine.add_rate_limit(&limiter).unwrap();
    mine.add_queue("kept", MemoryQueue::new());
    drop((breaker, bulkhead, limiter));
    let snap = mine.snapshot().await;
    assert_eq!(breakers(&snap), ["kept"]);
    assert_eq!(bulkheads(&snap), ["kept"]);
    assert_eq!(limiters(&snap), ["kept"]);
    assert_eq!(queues(&snap), ["kept"]);
    assert_eq!(snap.queues[0].depth, Some(0));
    // Unnamed components are still refused.
    let unnamed = CircuitBreakerLayer::builder().build().unwrap();
    assert_eq!(
        mine.add_breaker(unnamed.handle()).unwrap_err().field(),
        "name"
    );
}

type Req = http::Request<Full<Bytes>>;

#[tokio::test(start_paused = true)]
async fn a_defer_layer_and_its_replayer_register_their_queue_once() {
    let mine = Registry::new();
    let queue = MemoryQueue::new();
    let layer = DeferLayer::new(queue.clone())
        .name("sr-orders")
        .registry(&mine);
    assert!(mine.snapshot().await.queues.is_empty(), "not in use yet");
    let svc = layer.layer(service_fn(|_: Req| async {
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new())))
    }));
    assert_eq!(queues(&mine.snapshot().await), ["sr-orders"]);

    let replayer = Replayer::new(
        queue,
        service_fn(|_: Req| async {
            Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new())))
        }),
    )
    .name("sr-orders")
    .registry(&mine)
    .spawn();
    assert_eq!(queues(&mine.snapshot().await), ["sr-orders"]);

    // The replayer alone keeps the queue listed.
    drop((layer, svc));
    let snap = mine.snapshot().await;
    assert_eq!(queues(&snap), ["sr-orders"]);
    assert_eq!(snap.queues[0].depth, Some(0));
    replayer.shutdown().await;
    assert!(mine.snapshot().await.queues.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_named_preset_registers_its_stages_and_validation_registers_nothing() {
    let mine = Registry::new();
    let config = ResilienceConfig {
        name: Some("sr-preset".into()),
        ..ResilienceConfig::default()
    };
    config.validate().unwrap();
    assert!(Registry::global().breaker("sr-preset").is_none());

    let layer = Resilience::builder()
        .name("sr-preset")
        .rate_limit(100)
        .registry(&mine)
        .build()
        .unwrap();
    let svc = layer.layer(service_fn(|_: http::Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new())))
    }));
    let snap = mine.snapshot().await;
    assert_eq!(breakers(&snap), ["sr-preset"]);
    assert_eq!(bulkheads(&snap), ["sr-preset"]);
    assert_eq!(limiters(&snap), ["sr-preset"]);
    drop((layer, svc));
    let snap = mine.snapshot().await;
    assert!(snap.breakers.is_empty() && snap.bulkheads.is_empty() && snap.rate_limits.is_empty());
}

#[cfg(feature = "toml")]
#[tokio::test(start_paused = true)]
async fn names_in_toml_reach_the_registry() {
    use tower_firebreak::bulkhead::BulkheadConfig;
    use tower_firebreak::preset::Policies;
    use tower_firebreak::rate_limit::RateLimitConfig;

    let policies = Policies::from_toml(
        r#"
        [policies.payments]
        name = "sr-toml-payments"
        rate_limit = { per_second = 200 }
        bulkhead = { name = "sr-toml-pool", max_concurrent = 7 }
        "#,
    )
    .unwrap();
    assert!(
        Registry::global().breaker("sr-toml-payments").is_none(),
        "parsing and validating register nothing"
    );
    let layer = policies.layer("payments").unwrap();
    assert!(Registry::global().breaker("sr-toml-payments").is_some());
    let svc = layer.layer(service_fn(|_: http::Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new())))
    }));
    let snap = Registry::global().snapshot().await;
    assert!(limiters(&snap).contains(&"sr-toml-payments"));
    let pool = snap
        .bulkheads
        .iter()
        .find(|b| b.name == "sr-toml-pool")
        .expect("the stage's own name wins");
    assert_eq!(pool.max_concurrent, 7);
    assert!(!bulkheads(&snap).contains(&"sr-toml-payments"));
    drop((layer, svc));

    // The stage configs take a name, and still refuse unknown fields.
    let b: BulkheadConfig = toml::from_str("name = \"x\"\nmax_concurrent = 2").unwrap();
    assert_eq!(b.name.as_deref(), Some("x"));
    let r: RateLimitConfig = toml::from_str("name = \"y\"").unwrap();
    assert_eq!(r.name.as_deref(), Some("y"));
    assert!(toml::from_str::<BulkheadConfig>("nmae = \"x\"").is_err());
    assert!(toml::from_str::<RateLimitConfig>("nmae = \"x\"").is_err());
    assert!(
        Policies::from_toml("[policies.p]\nnmae = \"x\"").is_err(),
        "a misspelt name is refused"
    );
}

/// A name given in TOML becomes the `name` label of the stages' series;
/// keyed layers label their keys only when asked. A recorder local to this
/// test captures the handles, which are made when the layers are built.
#[cfg(all(feature = "prometheus", feature = "toml"))]
#[tokio::test(start_paused = true)]
async fn names_in_toml_and_keyed_layers_reach_the_metrics_labels() {
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tower_firebreak::bulkhead::{BulkheadConfig, KeyedBulkheadLayer};
    use tower_firebreak::preset::Policies;
    use tower_firebreak::rate_limit::KeyedRateLimitLayer;
    use tower_firebreak::retry::{ReplayBody, RetryConfig};

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let policies = Policies::from_toml(
        r#"
        [policies.payments]
        name = "m-payments"
        rate_limit = { per_second = 200 }
        "#,
    )
    .unwrap();
    let (mut preset, mut by_tenant, mut per_tenant, mut labelled, retry) =
        metrics::with_local_recorder(&recorder, || {
            let ok = || {
                service_fn(|_: http::Request<ReplayBody<Full<Bytes>>>| async {
                    Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new())))
                })
            };
            (
                policies.layer("payments").unwrap().layer(ok()),
                KeyedBulkheadLayer::new(1, |k: &u32| *k)
                    .name("m-tenants")
                    .layer(echo()),
                KeyedRateLimitLayer::per_second(1, |k: &u32| *k)
                    .name("m-limits")
                    .layer(echo()),
                BulkheadConfig {
                    name: Some("m-labelled".into()),
                    ..BulkheadConfig::default()
                }
                .into_keyed_layer(|k: &u32| *k)
                .unwrap()
                .label_keys()
                .layer(echo()),
                toml::from_str::<RetryConfig>("name = \"m-retry\"")
                    .unwrap()
                    .policy()
                    .unwrap(),
            )
        });
    let _ = retry;
    for _ in 0..2 {
        let res = preset
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(Full::new(Bytes::new())))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    for key in [1, 2, 2] {
        by_tenant.ready().await.unwrap().call(key).await.unwrap();
        // A labelled key's series are made when the key first arrives, in
        // `call`, so that runs under the local recorder too.
        let labelled = labelled.ready().await.unwrap();
        let fut = metrics::with_local_recorder(&recorder, || labelled.call(key));
        fut.await.unwrap();
    }
    // One a second per key: key 2's second call is rejected.
    for key in [1, 2] {
        per_tenant.ready().await.unwrap().call(key).await.unwrap();
    }
    assert!(per_tenant.ready().await.unwrap().call(2).await.is_err());

    let text = handle.render();
    // `firebreak_calls` lines as (label set, value), whatever the label order.
    let calls: Vec<(std::collections::BTreeSet<String>, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("firebreak_calls{"))
        .map(|l| {
            let (labels, value) = l.rsplit_once("} ").unwrap();
            (
                labels.split(',').map(str::to_owned).collect(),
                value.parse().unwrap(),
            )
        })
        .collect();
    let value = |labels: &[&str]| -> Option<f64> {
        let want: std::collections::BTreeSet<String> =
            labels.iter().map(|l| (*l).to_owned()).collect();
        calls.iter().find(|(l, _)| *l == want).map(|(_, v)| *v)
    };
    let check = |labels: &[&str], want: f64| {
        assert_eq!(value(labels), Some(want), "{labels:?} in:\n{text}");
    };
    check(
        &[
            r#"name="m-payments""#,
            r#"layer="rate_limit""#,
            r#"outcome="admitted""#,
        ],
        2.0,
    );
    check(
        &[
            r#"name="m-payments""#,
            r#"layer="bulkhead""#,
            r#"outcome="admitted""#,
        ],
        2.0,
    );
    check(
        &[
            r#"name="m-payments""#,
            r#"layer="circuit_breaker""#,
            r#"outcome="success""#,
        ],
        2.0,
    );
    // Keyed, unlabelled: summed over the keys, no `key` label.
    check(
        &[
            r#"name="m-tenants""#,
            r#"layer="bulkhead""#,
            r#"outcome="admitted""#,
        ],
        3.0,
    );
    check(
        &[
            r#"name="m-limits""#,
            r#"layer="rate_limit""#,
            r#"outcome="admitted""#,
        ],
        2.0,
    );
    check(
        &[
            r#"name="m-limits""#,
            r#"layer="rate_limit""#,
            r#"outcome="rejected""#,
        ],
        1.0,
    );
    assert!(
        !calls
            .iter()
            .any(|(l, _)| l.contains(r#"name="m-tenants""#)
                && l.iter().any(|x| x.starts_with("key="))),
        "no key label without label_keys:\n{text}"
    );
    // Keyed, labelled: one series per key.
    check(
        &[
            r#"name="m-labelled""#,
            r#"key="1""#,
            r#"layer="bulkhead""#,
            r#"outcome="admitted""#,
        ],
        1.0,
    );
    check(
        &[
            r#"name="m-labelled""#,
            r#"key="2""#,
            r#"layer="bulkhead""#,
            r#"outcome="admitted""#,
        ],
        2.0,
    );
}

/// A limiter in wait mode counts the calls that waited: admitted when the
/// permit came, rejected when the wait gave up.
#[cfg(feature = "prometheus")]
#[tokio::test(start_paused = true)]
async fn a_waiting_limiter_counts_how_each_wait_ended() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let layer = metrics::with_local_recorder(&recorder, || {
        RateLimitLayer::per_second(1)
            .name("m-waiting")
            .max_wait(Duration::from_millis(1500))
    });
    let mut svc = layer.layer(echo());
    // The first passes at once; the next two both see a 1 s wait, within
    // 1.5 s. At 1 s one takes the permit; the other would wait until 2 s,
    // past its 1.5 s, and gives up.
    svc.ready().await.unwrap().call(1).await.unwrap();
    let a = svc.ready().await.unwrap().call(2);
    let b = svc.ready().await.unwrap().call(3);
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1, "{a:?} {b:?}");

    let text = handle.render();
    let line = |outcome: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("firebreak_calls{")
                    && l.contains(r#"name="m-waiting""#)
                    && l.contains(&format!(r#"outcome="{outcome}""#))
            })
            .unwrap_or_else(|| panic!("no {outcome} series in:\n{text}"))
            .rsplit_once(' ')
            .unwrap()
            .1
            .to_owned()
    };
    assert_eq!(line("admitted"), "2", "{text}");
    assert_eq!(line("rejected"), "1", "{text}");
}

/// A second live breaker under a name warns; the same breaker again (a
/// second service of one layer) and a queue named by both its DeferLayer
/// and its Replayer do not.
#[test]
fn a_second_live_component_under_one_name_is_warned_about() {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = Log::default();
    let writer = log.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let warnings = || {
        String::from_utf8(log.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("two live components"))
            .count()
    };
    tracing::subscriber::with_default(sub, || {
        let mine = Registry::new();
        let bulkhead = BulkheadLayer::new(1).name("w").registry(&mine);
        let _a = bulkhead.layer(echo());
        let _b = bulkhead.layer(echo());
        let queue = MemoryQueue::new();
        let defer = DeferLayer::new(queue.clone()).name("w").registry(&mine);
        let _d = defer.layer(service_fn(|_: Req| async {
            Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new())))
        }));
        mine.add_queue("w", queue);
        assert_eq!(warnings(), 0);
        let first = CircuitBreakerLayer::builder()
            .name("w")
            .registry(&mine)
            .build()
            .unwrap();
        let second = CircuitBreakerLayer::builder()
            .name("w")
            .registry(&mine)
            .build()
            .unwrap();
        assert_eq!(warnings(), 1);
        drop((first, second));
        // Both dropped: a new one under the name is not a second one.
        let _third = CircuitBreakerLayer::builder()
            .name("w")
            .registry(&mine)
            .build()
            .unwrap();
        assert_eq!(warnings(), 1);
    });
}

// ---- keyed layers -------------------------------------------------------

fn by_host() -> impl Service<String, Response = String, Error = BoxError> + Clone {
    service_fn(|host: String| async move { Ok::<_, BoxError>(host) })
}

async fn post(admin: &axum::Router, uri: &str) -> (StatusCode, Bytes) {
    let (status, _, body) = support::in_process(admin, http::Method::POST, uri).await;
    (status, body)
}

fn json_entry<'a>(
    v: &'a serde_json::Value,
    kind: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    v[kind]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
}

#[tokio::test(start_paused = true)]
async fn a_named_keyed_breaker_counts_its_keys_by_state_and_leaves_when_dropped() {
    let admin: axum::Router = Admin::global().router();
    let layer = CircuitBreakerConfig {
        name: Some("sr-keyed-breaker".into()),
        max_keys: 64,
        ..CircuitBreakerConfig::default()
    }
    .into_keyed_layer(|host: &String| host.clone())
    .unwrap();
    assert!(
        Registry::global().has_keyed_breaker("sr-keyed-breaker"),
        "registered when built, as a plain breaker is"
    );
    let handle = layer.handle();
    let mut svc = layer.layer(by_host());
    for host in ["a", "b", "c", "a"] {
        svc.ready().await.unwrap().call(host.into()).await.unwrap();
    }
    handle.get(&"b".to_owned()).unwrap().force_open();

    let snap = Registry::global().snapshot().await;
    let entry = snap
        .keyed_breakers
        .iter()
        .find(|b| b.name == "sr-keyed-breaker")
        .expect("listed");
    assert_eq!(entry.kind, "keyed");
    assert_eq!(entry.keys, 3);
    assert_eq!(entry.max_keys, 64);
    assert_eq!(entry.by_state.get("closed"), Some(&2));
    assert_eq!(entry.by_state.get("forced_open"), Some(&1));
    assert!(
        entry.key_states.is_none(),
        "keys are listed only with label_keys"
    );
    // Not mixed into the plain breakers.
    assert!(!breakers(&snap).contains(&"sr-keyed-breaker"));

    let json = status_json(&admin).await;
    let e = json_entry(&json, "keyed_breakers", "sr-keyed-breaker").expect("in the JSON");
    assert_eq!(e["kind"], "keyed");
    assert_eq!(e["keys"], 3);
    assert_eq!(e["by_state"]["closed"], 2);
    assert_eq!(e["by_state"]["forced_open"], 1);
    assert!(e["key_states"].is_null());
    // The fields existing consumers read are still there.
    for kind in ["breakers", "bulkheads", "rate_limits", "queues"] {
        assert!(json[kind].is_array(), "{kind}");
    }

    // force-open of a whole keyed breaker is refused, and says why.
    let (status, body) = post(&admin, "/firebreak/breakers/sr-keyed-breaker/force-open").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(String::from_utf8_lossy(&body).contains("keyed breaker"));
    // reset resets every live key.
    let (status, _) = post(&admin, "/firebreak/breakers/sr-keyed-breaker/reset").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(handle.get(&"b".to_owned()).unwrap().state(), State::Closed);
    let json = status_json(&admin).await;
    let e = json_entry(&json, "keyed_breakers", "sr-keyed-breaker").unwrap();
    assert_eq!(e["by_state"]["closed"], 3);
    assert!(e["by_state"].get("forced_open").is_none());

    // The service and the handle hold it; with every one dropped it is gone.
    drop(layer);
    assert!(Registry::global().has_keyed_breaker("sr-keyed-breaker"));
    drop((svc, handle));
    assert!(!Registry::global().has_keyed_breaker("sr-keyed-breaker"));
    let snap = Registry::global().snapshot().await;
    assert!(
        !snap
            .keyed_breakers
            .iter()
            .any(|b| b.name == "sr-keyed-breaker")
    );
    let json = status_json(&admin).await;
    assert!(json_entry(&json, "keyed_breakers", "sr-keyed-breaker").is_none());
    let (status, _) = post(&admin, "/firebreak/breakers/sr-keyed-breaker/reset").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn a_labelled_keyed_breaker_lists_at_most_100_sorted_keys_in_its_own_registry() {
    let registry = Registry::new();
    let layer = CircuitBreakerConfig {
        name: Some("sr-keyed-labelled".into()),
        max_keys: 500,
        ..CircuitBreakerConfig::default()
    }
    .into_keyed_layer(|host: &String| host.clone())
    .unwrap()
    .registry(&registry)
    .label_keys();
    assert!(
        !Registry::global().has_keyed_breaker("sr-keyed-labelled"),
        "moved out of the global registry"
    );
    let handle = layer.handle();
    let mut svc = layer.layer(by_host());
    // In reverse, so that sorting is what puts them in order.
    for i in (0..150).rev() {
        svc.ready()
            .await
            .unwrap()
            .call(format!("h{i:03}"))
            .await
            .unwrap();
    }
    handle.get(&"h001".to_owned()).unwrap().force_open();

    let snap = registry.snapshot().await;
    let entry = &snap.keyed_breakers[0];
    assert_eq!(entry.name, "sr-keyed-labelled");
    assert_eq!(entry.keys, 150);
    assert_eq!(entry.by_state.get("closed"), Some(&149));
    let listed = entry.key_states.as_ref().expect("labelled keys are listed");
    assert_eq!(listed.len(), 100);
    let keys: Vec<&str> = listed.iter().map(|k| k.key.as_str()).collect();
    let want: Vec<String> = (0..100).map(|i| format!("h{i:03}")).collect();
    assert_eq!(keys, want);
    assert_eq!(listed[1].state, "forced_open");
    assert_eq!(listed[0].state, "closed");

    let json = status_json(&Admin::new(registry.clone()).router()).await;
    let e = json_entry(&json, "keyed_breakers", "sr-keyed-labelled").unwrap();
    assert_eq!(e["key_states"].as_array().unwrap().len(), 100);
    assert_eq!(e["key_states"][1]["key"], "h001");
    assert_eq!(e["key_states"][1]["state"], "forced_open");

    drop((layer, svc, handle));
    assert!(registry.snapshot().await.keyed_breakers.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_named_keyed_bulkhead_registers_with_its_first_service_with_keys_and_in_flight() {
    let registry = Registry::new();
    let layer = KeyedBulkheadLayer::new(2, |host: &String| host.clone())
        .name("sr-keyed-bulkhead")
        .registry(&registry)
        .max_keys(10);
    assert!(
        registry.snapshot().await.keyed_bulkheads.is_empty(),
        "not in use yet"
    );
    // An inner service that never answers, so calls stay in flight.
    let hang = service_fn(|_: String| std::future::pending::<Result<String, BoxError>>());
    let mut svc = layer.layer(hang);
    let mut calls = Vec::new();
    for host in ["a", "a", "b"] {
        calls.push(svc.ready().await.unwrap().call(host.into()));
    }
    let snap = registry.snapshot().await;
    assert_eq!(snap.keyed_bulkheads.len(), 1);
    let entry = &snap.keyed_bulkheads[0];
    assert_eq!(entry.name, "sr-keyed-bulkhead");
    assert_eq!(entry.kind, "keyed");
    assert_eq!(entry.keys, 2);
    assert_eq!(entry.max_keys, 10);
    assert_eq!(entry.in_flight, 3);
    assert_eq!(entry.max_concurrent_per_key, 2);
    assert!(
        !Registry::global()
            .snapshot()
            .await
            .keyed_bulkheads
            .iter()
            .any(|b| b.name == "sr-keyed-bulkhead")
    );

    let admin = Admin::new(registry.clone()).router();
    let json = status_json(&admin).await;
    let e = json_entry(&json, "keyed_bulkheads", "sr-keyed-bulkhead").unwrap();
    assert_eq!(e["keys"], 2);
    assert_eq!(e["in_flight"], 3);

    drop(calls);
    assert_eq!(registry.snapshot().await.keyed_bulkheads[0].in_flight, 0);
    drop(layer);
    assert_eq!(
        registry.snapshot().await.keyed_bulkheads.len(),
        1,
        "the service holds it"
    );
    drop(svc);
    assert!(registry.snapshot().await.keyed_bulkheads.is_empty());
    let json = status_json(&admin).await;
    assert!(json_entry(&json, "keyed_bulkheads", "sr-keyed-bulkhead").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_named_keyed_rate_limit_registers_globally_with_its_key_count() {
    let admin: axum::Router = Admin::global().router();
    let layer = KeyedRateLimitLayer::per_second(5, |host: &String| host.clone())
        .name("sr-keyed-limit")
        .burst(2);
    let listed = |s: &Snapshot| {
        s.keyed_rate_limits
            .iter()
            .any(|l| l.name == "sr-keyed-limit")
    };
    assert!(
        !listed(&Registry::global().snapshot().await),
        "not in use yet"
    );
    let mut svc = layer.layer(by_host());
    for host in ["a", "b", "c", "a"] {
        svc.ready().await.unwrap().call(host.into()).await.unwrap();
    }
    let snap = Registry::global().snapshot().await;
    let entry = snap
        .keyed_rate_limits
        .iter()
        .find(|l| l.name == "sr-keyed-limit")
        .expect("registered at its first service");
    assert_eq!(entry.kind, "keyed");
    assert_eq!(entry.keys, 3);
    assert_eq!(entry.burst, 2);
    assert_eq!(entry.replenish_interval_ms, 200.0);
    assert!(!limiters(&snap).contains(&"sr-keyed-limit"));

    let json = status_json(&admin).await;
    let e = json_entry(&json, "keyed_rate_limits", "sr-keyed-limit").unwrap();
    assert_eq!(e["keys"], 3);
    assert_eq!(e["burst"], 2);

    drop((layer, svc));
    assert!(!listed(&Registry::global().snapshot().await));
    let json = status_json(&admin).await;
    assert!(json_entry(&json, "keyed_rate_limits", "sr-keyed-limit").is_none());
}

/// A page on another site cannot make an operator's browser change state
/// through the admin router (a bodiless cross-site `POST` needs no
/// preflight): a browser's `POST` that is not marked same-origin and lacks
/// the admin header gets 403 and changes nothing. The status page's own
/// requests (which send the header, also behind a proxy that rewrites
/// `Host`, and on plain HTTP where no `Sec-Fetch-Site` is sent) and clients
/// that are not browsers (no `Origin`, no `Sec-Fetch-Site`) still work.
#[tokio::test]
async fn the_admin_router_refuses_cross_site_posts() {
    let registry = Registry::new();
    let layer = CircuitBreakerLayer::builder()
        .name("csrf-breaker")
        .build()
        .unwrap();
    let h = layer.handle();
    registry.add_breaker(h.clone()).unwrap();
    let admin = Admin::new(registry).router();
    let post = |headers: &[(&str, &str)]| {
        let mut req = http::Request::post("/firebreak/breakers/csrf-breaker/force-open")
            .header("host", "ops.internal:8080");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(axum::body::Body::empty()).unwrap();
        let admin = admin.clone();
        async move { admin.oneshot(req).await.unwrap().status() }
    };

    for headers in [
        &[("sec-fetch-site", "cross-site")][..],
        &[("sec-fetch-site", "same-site")],
        &[("origin", "https://evil.example")],
        &[("origin", "null")],
        // Same host, but nothing a cross-site form could not send too.
        &[("origin", "http://ops.internal:8080")],
    ] {
        assert_eq!(post(headers).await, StatusCode::FORBIDDEN, "{headers:?}");
        assert_eq!(h.state(), State::Closed, "{headers:?} changed the breaker");
    }
    for headers in [
        &[
            ("sec-fetch-site", "same-origin"),
            ("origin", "http://ops.internal:8080"),
        ][..],
        &[("origin", "http://admin.corp"), ("x-firebreak-admin", "1")],
        &[],
    ] {
        h.reset();
        assert_eq!(post(headers).await, StatusCode::NO_CONTENT, "{headers:?}");
        assert_eq!(h.state(), State::ForcedOpen);
    }
    // Reads are not affected.
    let req = http::Request::get("/firebreak/status")
        .header("sec-fetch-site", "cross-site")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(admin.oneshot(req).await.unwrap().status(), StatusCode::OK);
}
