//! The backoff schedule, jitter, attempts and what is retried, under paused time.

use crate::support::{Script, Step, ms};
use std::time::Duration;
use tower::{Layer, ServiceExt};
use tower_firebreak::bulkhead::BulkheadFull;
use tower_firebreak::circuit_breaker::CircuitOpen;
use tower_firebreak::rate_limit::RateLimited;
use tower_firebreak::retry::{Action, RetryLayer, RetryPolicy, classify_fn};
use tower_firebreak::timeout::Elapsed;
use tower_firebreak::{BoxError, deadline::DeadlineExceeded};

async fn run(policy: RetryPolicy, script: &Script<u32>) -> Result<u32, BoxError> {
    RetryLayer::new(policy)
        .layer(script.service::<u32>())
        .oneshot(1)
        .await
}

#[tokio::test(start_paused = true)]
async fn exponential_no_jitter_waits_exactly_the_schedule() {
    let script = Script::always_err("down");
    let policy = RetryPolicy::exponential(ms(100))
        .max_attempts(5)
        .no_jitter();
    let err = run(policy, &script).await.unwrap_err();
    assert_eq!(err.to_string(), "down");
    assert_eq!(script.attempts(), 5);
    assert_eq!(script.gaps(), [ms(100), ms(200), ms(400), ms(800)]);
}

#[tokio::test(start_paused = true)]
async fn max_delay_caps_each_delay() {
    let script = Script::always_err("down");
    let policy = RetryPolicy::exponential(ms(100))
        .max_attempts(6)
        .max_delay(ms(300))
        .no_jitter();
    run(policy, &script).await.unwrap_err();
    assert_eq!(script.gaps(), [ms(100), ms(200), ms(300), ms(300), ms(300)]);
}

#[tokio::test(start_paused = true)]
async fn linear_and_fixed_schedules() {
    let script = Script::always_err("down");
    run(
        RetryPolicy::linear(ms(50)).max_attempts(4).no_jitter(),
        &script,
    )
    .await
    .unwrap_err();
    assert_eq!(script.gaps(), [ms(50), ms(100), ms(150)]);

    let script = Script::always_err("down");
    run(
        RetryPolicy::fixed(ms(70)).max_attempts(4).no_jitter(),
        &script,
    )
    .await
    .unwrap_err();
    assert_eq!(script.gaps(), [ms(70), ms(70), ms(70)]);
}

#[tokio::test(start_paused = true)]
async fn max_total_delay_matches_the_schedule() {
    let p = RetryPolicy::exponential(ms(100))
        .max_attempts(5)
        .max_delay(ms(300))
        .no_jitter();
    assert_eq!(p.max_total_delay(), ms(100 + 200 + 300 + 300));
    assert_eq!(
        RetryPolicy::fixed(ms(10)).max_attempts(1).max_total_delay(),
        Duration::ZERO
    );
}

#[tokio::test(start_paused = true)]
async fn full_jitter_stays_within_zero_and_the_cap() {
    let caps = [ms(100), ms(200), ms(400), ms(400), ms(400)];
    let mut below_cap = 0;
    for _ in 0..200 {
        let script = Script::always_err("down");
        let policy = RetryPolicy::exponential(ms(100))
            .max_attempts(6)
            .max_delay(ms(400));
        run(policy, &script).await.unwrap_err();
        let gaps = script.gaps();
        assert_eq!(gaps.len(), caps.len());
        for (gap, cap) in gaps.iter().zip(caps) {
            assert!(*gap <= cap, "jittered delay {gap:?} above its cap {cap:?}");
            if *gap < cap {
                below_cap += 1;
            }
        }
    }
    // Jitter is on by default: nearly every delay is below its cap.
    assert!(
        below_cap > 900,
        "only {below_cap} of 1000 delays were jittered"
    );
}

#[tokio::test(start_paused = true)]
async fn decorrelated_jitter_stays_within_base_and_three_times_previous() {
    for _ in 0..200 {
        let script = Script::always_err("down");
        let policy = RetryPolicy::decorrelated_jitter(ms(10))
            .max_attempts(8)
            .max_delay(ms(500));
        run(policy, &script).await.unwrap_err();
        let mut prev = ms(10);
        for gap in script.gaps() {
            let upper = (prev * 3).min(ms(500));
            assert!(
                gap >= ms(10) && gap <= upper,
                "{gap:?} outside 10ms..={upper:?}"
            );
            prev = gap;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn success_after_failures_is_returned() {
    let script = Script::new([
        (ms(5), Step::Err("a")),
        (ms(5), Step::Err("b")),
        (ms(5), Step::Ok(42)),
    ]);
    let policy = RetryPolicy::exponential(ms(10)).max_attempts(3).no_jitter();
    assert_eq!(run(policy, &script).await.unwrap(), 42);
    assert_eq!(script.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_one_never_retries() {
    let script = Script::always_err("down");
    run(RetryPolicy::exponential(ms(1)).max_attempts(1), &script)
        .await
        .unwrap_err();
    assert_eq!(script.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn our_shed_rejections_are_not_retried() {
    let errors: [fn() -> BoxError; 4] = [
        || BulkheadFull::new(8).into(),
        || RateLimited::new(ms(100)).into(),
        || CircuitOpen::new(ms(100)).into(),
        || DeadlineExceeded::new().into(),
    ];
    for make in errors {
        let script = Script::new([]).then_always(Duration::ZERO, Step::ErrBox(make));
        let err = run(RetryPolicy::exponential(ms(1)).max_attempts(5), &script)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), make().to_string());
        assert_eq!(script.attempts(), 1, "{err} was retried");
    }
}

#[tokio::test(start_paused = true)]
async fn an_attempt_timeout_is_retried() {
    let script =
        Script::new([]).then_always(Duration::ZERO, Step::ErrBox(|| Elapsed::new(ms(5)).into()));
    run(RetryPolicy::exponential(ms(1)).max_attempts(4), &script)
        .await
        .unwrap_err();
    assert_eq!(script.attempts(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_custom_classifier_decides() {
    let script = Script::new([
        (ms(1), Step::Ok(0)),
        (ms(1), Step::Ok(0)),
        (ms(1), Step::Ok(7)),
    ]);
    let policy = RetryPolicy::fixed(ms(10))
        .no_jitter()
        .max_attempts(5)
        .classify(classify_fn(|_: &u32, r: &Result<u32, BoxError>| match r {
            Ok(0) => Action::Retry,
            _ => Action::Done,
        }));
    let svc = RetryLayer::new(policy).layer(script.service::<u32>());
    assert_eq!(svc.oneshot(1).await.unwrap(), 7);
    assert_eq!(script.gaps(), [ms(10), ms(10)]);
}
