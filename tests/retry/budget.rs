//! The retry budget bounds retries under sustained failure.

use crate::support::{Script, ms, paused_runtime};
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};
use tower_firebreak::retry::{RetryBudget, RetryLayer, RetryPolicy};

/// Drives `calls` calls, one after another, at 100% failure; returns the
/// total number of attempts.
async fn drive(budget: RetryBudget, calls: usize) -> usize {
    let script = Script::<u32>::always_err("down");
    let layer = RetryLayer::new(
        RetryPolicy::exponential(ms(1))
            .max_attempts(10)
            .no_jitter()
            .budget(budget),
    );
    // Clones of one service share the layer's budget, as clones made per
    // connection or per request do.
    let svc = layer.layer(script.service::<u32>());
    for i in 0..calls {
        let mut s = svc.clone();
        s.ready().await.unwrap();
        s.call(i as u32).await.unwrap_err();
    }
    script.attempts()
}

#[tokio::test(start_paused = true)]
async fn budget_bounds_attempts_at_the_ratio() {
    // ratio 0.2, no floor: 1,000 calls may cause at most 200 retries.
    let attempts = drive(RetryBudget::new(Duration::from_secs(10), 0, 0.2), 1_000).await;
    assert!(attempts <= 1_200, "{attempts} attempts for 1,000 calls");
    // ... and the budget does grant them (each retry here sleeps 1 ms, far
    // inside the 10 s ttl, so no deposit expires).
    assert!(
        attempts >= 1_190,
        "only {attempts} attempts: the budget granted too little"
    );
}

#[tokio::test(start_paused = true)]
async fn the_floor_adds_min_per_sec_times_ttl() {
    // ratio 0.2 plus a floor of 5/s over a 2 s ttl: at most 200 + 10 retries.
    let attempts = drive(RetryBudget::new(Duration::from_secs(2), 5, 0.2), 1_000).await;
    assert!(attempts <= 1_200 + 10, "{attempts}");
    assert!(attempts >= 1_200, "{attempts}");
}

#[tokio::test(start_paused = true)]
async fn without_a_budget_every_call_uses_every_attempt() {
    let script = Script::<u32>::always_err("down");
    let svc = RetryLayer::new(RetryPolicy::exponential(ms(1)).max_attempts(3))
        .layer(script.service::<u32>());
    for i in 0..10 {
        svc.clone().oneshot(i).await.unwrap_err();
    }
    assert_eq!(script.attempts(), 30);
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_returns_the_original_error_unchanged() {
    #[derive(Debug)]
    struct Mine(u32);
    impl std::fmt::Display for Mine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "mine {}", self.0)
        }
    }
    impl std::error::Error for Mine {}

    let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.0);
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let svc = RetryLayer::new(
        RetryPolicy::exponential(ms(1))
            .max_attempts(5)
            .budget(budget),
    )
    .layer(tower::service_fn({
        let calls = calls.clone();
        move |x: u32| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move { Err::<u32, Mine>(Mine(x)) }
        }
    }));
    let err = svc.oneshot(9).await.unwrap_err();
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    let mine = err.downcast_ref::<Mine>().expect("the inner error itself");
    assert_eq!(mine.0, 9);
}

/// How many retries a budget of `ratio` (no floor) grants after `calls`
/// deposits at one instant.
fn granted(ratio: f32, calls: usize) -> usize {
    let b = RetryBudget::new(Duration::from_secs(10), 0, ratio);
    let rt = paused_runtime();
    let _g = rt.enter();
    for _ in 0..calls {
        b.deposit();
    }
    let mut granted = 0;
    while b.withdraw() {
        granted += 1;
    }
    granted
}

#[test]
fn common_ratios_grant_exactly_their_share() {
    for (ratio, per) in [
        (0.1f32, 10),
        (0.2, 5),
        (0.25, 4),
        (0.5, 2),
        (1.0, 1),
        // f32 truncation in TpsBudget alone would make these 999 and 6.
        (0.001, 1000),
        (1.0 / 7.0, 7),
        // Between two steps 1/n, the lower: TpsBudget alone grants 0.6 and
        // 0.75 every call a retry, 0.4 a half and 0.3 a third.
        (0.6, 2),
        (0.75, 2),
        (0.4, 3),
        (0.3, 4),
        (0.15, 7),
    ] {
        assert_eq!(granted(ratio, per * 100), 100, "ratio {ratio}");
    }
}

/// Over 1, a ratio grants that many retries a call, never more, within 1%
/// (tower counts in steps of 1/1000 of a token).
#[test]
fn ratios_over_one_grant_their_multiple() {
    for (ratio, granted_per_100) in [(2.0f32, 200), (2.5, 250), (3.0, 300), (1000.0, 100_000)] {
        let granted = granted(ratio, 100);
        assert!(
            granted <= granted_per_100 && granted * 100 >= granted_per_100 * 99,
            "ratio {ratio}: {granted} retries for 100 calls"
        );
    }
}

#[test]
fn out_of_range_settings_are_config_errors() {
    let e = RetryBudget::try_new(Duration::from_millis(10), 0, 0.2).unwrap_err();
    assert_eq!(e.field(), "ttl");
    let e = RetryBudget::try_new(Duration::from_secs(1), 0, -1.0).unwrap_err();
    assert_eq!(e.field(), "ratio");
}
