//! RetryConfig: defaults, parsing, and bad settings; the public contract's
//! auto traits.

use bytes::Bytes;
use http_body_util::Full;
use std::time::Duration;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::hedge::HedgeLayer;
use tower_firebreak::retry::{
    BufferRequestBodyLayer, ReplayBody, RetryBudget, RetryConfig, RetryLayer, RetryPolicy,
};

#[test]
fn defaults_are_the_documented_constants() {
    let cfg = RetryConfig::default();
    assert_eq!(cfg.max_attempts, RetryConfig::DEFAULT_MAX_ATTEMPTS);
    assert_eq!(cfg.max_attempts, 3);
    assert_eq!(cfg.base_delay, Duration::from_millis(100));
    assert_eq!(cfg.max_delay, Duration::from_secs(10));
    assert!(cfg.jitter);
    assert!(cfg.budget.enabled);
    assert_eq!(cfg.budget.ttl, RetryBudget::DEFAULT_TTL);
    assert_eq!(cfg.budget.min_per_sec, 10);
    assert_eq!(cfg.budget.ratio, 0.2);
    let layer = cfg.into_layer().unwrap();
    assert_eq!(layer.policy().attempts_limit(), 3);
    assert!(layer.policy().retry_budget().is_some());
}

#[test]
fn parses_every_field() {
    let cfg: RetryConfig = serde_json::from_str(
        r#"{ "max_attempts": 5, "backoff": "decorrelated_jitter", "base_delay": "20ms",
             "max_delay": "1s", "jitter": false,
             "budget": { "ttl": "5s", "min_per_sec": 1, "ratio": 0.1 } }"#,
    )
    .unwrap();
    let policy = cfg.policy().unwrap();
    assert_eq!(policy.attempts_limit(), 5);
    assert_eq!(policy.delay_cap(), Duration::from_secs(1));
    // no jitter, decorrelated: 60 ms, 180 ms, 540 ms, then the 1 s cap.
    assert_eq!(
        policy.max_total_delay(),
        Duration::from_millis(60 + 180 + 540 + 1000)
    );
    let b = policy.retry_budget().unwrap();
    assert_eq!(
        (b.ttl(), b.min_per_sec(), b.ratio()),
        (Duration::from_secs(5), 1, 0.1)
    );
}

#[test]
fn unknown_fields_are_rejected() {
    let err = serde_json::from_str::<RetryConfig>(r#"{ "max_retries": 3 }"#).unwrap_err();
    assert!(err.to_string().contains("max_retries"), "{err}");
    let err = serde_json::from_str::<RetryConfig>(r#"{ "budget": { "percent": 3 } }"#).unwrap_err();
    assert!(err.to_string().contains("percent"), "{err}");
}

#[test]
fn bad_settings_name_the_field() {
    let e = RetryConfig {
        max_attempts: 0,
        ..Default::default()
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(e.field(), "max_attempts");

    let e = RetryConfig {
        base_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(1),
        ..Default::default()
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(e.field(), "max_delay");
    assert_eq!(e.other_field(), Some("base_delay"));

    let mut cfg = RetryConfig::default();
    cfg.budget.ttl = Duration::from_secs(600);
    let e = cfg.into_layer().unwrap_err();
    assert_eq!(e.field(), "budget.ttl");
}

type Req = http::Request<Full<Bytes>>;

/// Layers are Clone, services Clone + Send + Sync, futures Send + 'static:
/// the whole stack boxes as a BoxCloneSyncService (axum state).
#[test]
fn stacks_box_as_clone_sync_services() {
    let budget = RetryBudget::default();
    let inner = service_fn(|_: http::Request<ReplayBody<Full<Bytes>>>| async {
        Ok::<_, BoxError>(http::Response::new(()))
    });
    let svc = ServiceBuilder::new()
        .layer(BufferRequestBodyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::default().http().budget(budget.clone()),
        ))
        .layer(
            HedgeLayer::fixed(Duration::from_millis(5))
                .http()
                .budget(budget),
        )
        .service(inner);
    let _boxed: BoxCloneSyncService<Req, http::Response<()>, BoxError> =
        BoxCloneSyncService::new(svc);

    let plain = RetryLayer::new(RetryPolicy::exponential(Duration::from_millis(1)))
        .layer(service_fn(|x: u32| async move { Ok::<_, BoxError>(x) }));
    let _boxed: BoxCloneSyncService<u32, u32, BoxError> = BoxCloneSyncService::new(plain);
}
