//! Settings: serde, defaults, and errors that name the field.

use std::time::Duration;
use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};

#[test]
fn loads_from_toml_and_json() {
    let cfg: CircuitBreakerConfig = toml::from_str(
        r#"
        count_window = 50
        minimum_calls = 10
        failure_rate = 0.25
        slow_call_rate = 0.8
        slow_call_duration = "2s"
        open_for = "15s"
        max_open_for = "2m"
        half_open_calls = 4
        max_wait_in_half_open = "30s"
        backpressure = true
        "#,
    )
    .unwrap();
    assert_eq!(cfg.count_window, Some(50));
    assert_eq!(cfg.slow_call_duration, Some(Duration::from_secs(2)));
    assert_eq!(cfg.max_open_for, Some(Duration::from_secs(120)));
    cfg.into_layer().unwrap();

    let cfg: CircuitBreakerConfig =
        serde_json::from_str(r#"{"time_window": "30s", "open_for": "500ms"}"#).unwrap();
    assert_eq!(cfg.time_window, Some(Duration::from_secs(30)));
    assert_eq!(cfg.open_for, Duration::from_millis(500));
    assert_eq!(
        cfg.minimum_calls,
        CircuitBreakerConfig::DEFAULT_MINIMUM_CALLS
    );
}

#[test]
fn unknown_fields_are_refused() {
    let err = toml::from_str::<CircuitBreakerConfig>("failure_threshold = 0.5").unwrap_err();
    assert!(err.to_string().contains("failure_threshold"), "{err}");
}

#[test]
fn defaults_are_the_documented_constants() {
    let d = CircuitBreakerConfig::default();
    assert_eq!(d.count_window, None);
    assert_eq!(CircuitBreakerConfig::DEFAULT_COUNT_WINDOW, 100);
    assert_eq!(d.minimum_calls, 20);
    assert_eq!(d.failure_rate, 0.5);
    assert_eq!(d.open_for, Duration::from_secs(30));
    assert_eq!(d.half_open_calls, 10);
    assert_eq!(d.slow_call_rate, None);
    assert_eq!(d.max_wait_in_half_open, None);
    assert!(!d.backpressure);
    assert_eq!(d.max_keys, 1024);
    d.into_layer().unwrap();
}

#[test]
fn bad_settings_name_the_field() {
    let cases: Vec<(CircuitBreakerConfig, &str)> = vec![
        (
            CircuitBreakerConfig {
                count_window: Some(0),
                ..Default::default()
            },
            "count_window",
        ),
        (
            CircuitBreakerConfig {
                count_window: Some(40_000),
                ..Default::default()
            },
            "count_window",
        ),
        (
            CircuitBreakerConfig {
                time_window: Some(Duration::ZERO),
                ..Default::default()
            },
            "time_window",
        ),
        (
            CircuitBreakerConfig {
                consecutive_failures: Some(0),
                ..Default::default()
            },
            "consecutive_failures",
        ),
        (
            CircuitBreakerConfig {
                minimum_calls: 0,
                ..Default::default()
            },
            "minimum_calls",
        ),
        (
            CircuitBreakerConfig {
                failure_rate: 0.0,
                ..Default::default()
            },
            "failure_rate",
        ),
        (
            CircuitBreakerConfig {
                failure_rate: 1.5,
                ..Default::default()
            },
            "failure_rate",
        ),
        (
            CircuitBreakerConfig {
                failure_rate: f64::NAN,
                ..Default::default()
            },
            "failure_rate",
        ),
        (
            CircuitBreakerConfig {
                slow_call_rate: Some(2.0),
                ..Default::default()
            },
            "slow_call_rate",
        ),
        (
            CircuitBreakerConfig {
                slow_call_duration: Some(Duration::ZERO),
                ..Default::default()
            },
            "slow_call_duration",
        ),
        (
            CircuitBreakerConfig {
                open_for: Duration::ZERO,
                ..Default::default()
            },
            "open_for",
        ),
        (
            CircuitBreakerConfig {
                half_open_calls: 0,
                ..Default::default()
            },
            "half_open_calls",
        ),
        (
            CircuitBreakerConfig {
                max_wait_in_half_open: Some(Duration::ZERO),
                ..Default::default()
            },
            "max_wait_in_half_open",
        ),
        (
            CircuitBreakerConfig {
                max_keys: 0,
                ..Default::default()
            },
            "max_keys",
        ),
        (
            CircuitBreakerConfig {
                max_open_for: Some(Duration::from_secs(60)),
                open_jitter: 1.0,
                ..Default::default()
            },
            "open_jitter",
        ),
    ];
    for (cfg, field) in cases {
        let err = cfg.clone().into_layer().unwrap_err();
        assert_eq!(err.field(), field, "{cfg:?}: {err}");
    }
}

#[test]
fn contradictions_name_both_fields() {
    let err = CircuitBreakerLayer::builder()
        .count_window(10)
        .time_window(Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "count_window");
    assert_eq!(err.other_field(), Some("time_window"));

    let err = CircuitBreakerLayer::builder()
        .open_for(Duration::from_secs(10))
        .max_open_for(Duration::from_secs(5))
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "max_open_for");
    assert_eq!(err.other_field(), Some("open_for"));
    assert_eq!(
        err.to_string(),
        "max_open_for = 5s contradicts open_for = 10s: the cap must be at least the first open"
    );
}

#[test]
fn the_plain_name_is_the_default_classifier_layer() {
    // The contract: `build()` returns the plain `CircuitBreakerLayer`.
    let layer: Result<CircuitBreakerLayer, tower_firebreak::ConfigError> =
        CircuitBreakerLayer::builder().build();
    let handle = layer.unwrap().handle();
    let _: tower_firebreak::circuit_breaker::CircuitBreakerHandle = handle.clone();
}

#[test]
fn services_are_send_sync_clone_and_futures_send_static() {
    fn assert_all<T: Send + Sync + Clone + 'static>(_: &T) {}
    fn assert_fut<F: std::future::Future + Send + 'static>(_: F) {}
    use tower::{Layer, Service, service_fn};
    let layer = CircuitBreakerLayer::builder().build().unwrap();
    let mut svc = layer.layer(service_fn(|x: u64| async move {
        Ok::<_, tower_firebreak::BoxError>(x)
    }));
    assert_all(&svc);
    assert_fut(svc.call(1));
    let _ = tower::util::BoxCloneService::new(svc);
}
