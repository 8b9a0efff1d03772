//! For any sequence of outcomes: attempts never exceed max_attempts, and the
//! time spent sleeping between attempts never exceeds the deadline.

use crate::support::{Script, Step, paused_runtime};
use bytes::Bytes;
use http_body_util::Full;
use proptest::prelude::*;
use std::time::Duration;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_firebreak::deadline::{DeadlineExceeded, DeadlineLayer};
use tower_firebreak::error;
use tower_firebreak::retry::{RetryLayer, RetryPolicy};

type Req = http::Request<Full<Bytes>>;

fn policy(kind: u8, base: Duration) -> RetryPolicy {
    match kind {
        0 => RetryPolicy::exponential(base),
        1 => RetryPolicy::decorrelated_jitter(base),
        2 => RetryPolicy::fixed(base),
        _ => RetryPolicy::linear(base),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn attempts_and_sleep_stay_within_bounds(
        outcomes in prop::collection::vec((0u64..400, any::<bool>()), 1..12),
        max_attempts in 1u32..8,
        deadline_ms in 50u64..3_000,
        base_ms in 1u64..500,
        max_delay_ms in 1u64..2_000,
        kind in 0u8..4,
        jitter in any::<bool>(),
    ) {
        let rt = paused_runtime();
        rt.block_on(async {
            let steps: Vec<_> = outcomes
                .iter()
                .map(|&(lat, ok)| {
                    (Duration::from_millis(lat), if ok { Step::Ok(()) } else { Step::Err("fail") })
                })
                .collect();
            let script = Script::new(steps).then_always(Duration::ZERO, Step::Err("fail"));
            let mut p = policy(kind, Duration::from_millis(base_ms))
                .max_attempts(max_attempts)
                .max_delay(Duration::from_millis(max_delay_ms.max(base_ms)));
            if !jitter {
                p = p.no_jitter();
            }
            let deadline = Duration::from_millis(deadline_ms);
            let svc = ServiceBuilder::new()
                .layer(DeadlineLayer::new(deadline))
                .layer(RetryLayer::new(p))
                .service(script.service::<Req>());
            let t0 = Instant::now();
            let res = svc.oneshot(http::Request::new(Full::new(Bytes::new()))).await;
            let elapsed = t0.elapsed();

            let starts = script.starts.lock().unwrap().clone();
            let ends = script.ends.lock().unwrap().clone();
            prop_assert!(starts.len() as u32 <= max_attempts, "{} attempts > {max_attempts}", starts.len());
            prop_assert!(elapsed <= deadline);
            let slept: Duration = starts.iter().skip(1).zip(&ends).map(|(s, e)| *s - *e).sum();
            prop_assert!(slept <= deadline, "slept {slept:?} > deadline {deadline:?}");
            // No attempt starts at or after the deadline.
            for s in &starts {
                prop_assert!(*s - t0 < deadline);
            }
            // When the deadline cut the call, it cut an attempt in flight, never a sleep.
            if let Err(e) = &res
                && error::find::<DeadlineExceeded>(&**e).is_some()
            {
                prop_assert_eq!(ends.len() + 1, starts.len(), "the deadline fired during a sleep");
            }
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Within one ttl window the budget is an exact token account: each call
    /// deposits 1, each retry costs 1/ratio, and `min_per_sec × ttl` retries
    /// are granted up front. A withdrawal fails exactly when the account
    /// cannot pay for it.
    #[test]
    fn the_budget_matches_a_token_account_within_a_window(
        ops in prop::collection::vec(any::<bool>(), 1..400),
        ratio_idx in 0usize..6,
        min_per_sec in 0u32..5,
        ttl_s in 1u64..10,
    ) {
        let rt = paused_runtime();
        let _g = rt.enter();
        let (ratio, cost) = [(0.1f32, 10i64), (0.2, 5), (0.25, 4), (0.5, 2), (1.0, 1), (1.0 / 7.0, 7)][ratio_idx];
        let budget = tower_firebreak::retry::RetryBudget::new(
            Duration::from_secs(ttl_s),
            min_per_sec,
            ratio,
        );
        let mut tokens = i64::from(min_per_sec) * ttl_s as i64 * cost;
        for deposit in ops {
            if deposit {
                budget.deposit();
                tokens += 1;
            } else {
                let granted = budget.withdraw();
                prop_assert_eq!(granted, tokens >= cost, "tokens {}", tokens);
                if granted {
                    tokens -= cost;
                }
            }
        }
    }

    /// The same bounds with the HTTP classifier, where the server may set the
    /// delay with Retry-After: a server-given delay never carries a retry past
    /// the deadline either.
    #[test]
    fn server_given_delays_stay_within_the_deadline(
        outcomes in prop::collection::vec((0u64..300, 0u8..4, 0u64..4), 1..10),
        max_attempts in 1u32..6,
        deadline_ms in 50u64..5_000,
        max_delay_ms in 1u64..5_000,
    ) {
        let rt = paused_runtime();
        rt.block_on(async {
            let steps: Vec<_> = outcomes
                .iter()
                .map(|&(lat, kind, after)| {
                    let res = |code: u16, after: Option<u64>| {
                        let mut b = http::Response::builder().status(code);
                        if let Some(a) = after {
                            b = b.header("retry-after", a.to_string());
                        }
                        Step::Ok(b.body(()).unwrap())
                    };
                    let step = match kind {
                        0 => res(200, None),
                        1 => res(503, Some(after)),
                        2 => res(429, None),
                        _ => Step::Err("connection reset"),
                    };
                    (Duration::from_millis(lat), step)
                })
                .collect();
            let script = Script::new(steps).then_always(Duration::ZERO, Step::Err("reset"));
            let policy = RetryPolicy::exponential(Duration::from_millis(50))
                .max_attempts(max_attempts)
                .max_delay(Duration::from_millis(max_delay_ms))
                .http();
            let deadline = Duration::from_millis(deadline_ms);
            let svc = ServiceBuilder::new()
                .layer(DeadlineLayer::new(deadline))
                .layer(RetryLayer::new(policy))
                .service(script.service::<Req>());
            let t0 = Instant::now();
            let res = svc.oneshot(http::Request::new(Full::new(Bytes::new()))).await;
            let starts = script.starts.lock().unwrap().clone();
            let ends = script.ends.lock().unwrap().clone();
            prop_assert!(starts.len() as u32 <= max_attempts);
            prop_assert!(t0.elapsed() <= deadline);
            for (s, e) in starts.iter().skip(1).zip(&ends) {
                prop_assert!(*s - *e <= Duration::from_millis(max_delay_ms), "a delay above max_delay");
            }
            for s in &starts {
                prop_assert!(*s - t0 < deadline);
            }
            if let Err(e) = &res
                && error::find::<DeadlineExceeded>(&**e).is_some()
            {
                prop_assert_eq!(ends.len() + 1, starts.len(), "the deadline fired during a sleep");
            }
            Ok(())
        })?;
    }
}
