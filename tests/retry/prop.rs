//! For any sequence of outcomes: attempts never exceed max_attempts, and the
//! time spent sleeping between attempts never exceeds the deadline.

use crate::support::{Script, Step};
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
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
