//! Every transition, under paused time.

use crate::support::{Cmd, Counter, call};
use std::sync::Arc;
use std::time::Duration;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_firebreak::circuit_breaker::{
    CircuitBreakerHandle, CircuitBreakerLayer, CircuitOpen, Event, State,
};
use tower_firebreak::error;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn retry_after(err: &BoxError) -> Duration {
    error::find::<CircuitOpen>(&**err)
        .expect("a CircuitOpen rejection")
        .retry_after()
}

/// count window 10, at least 4 calls, 50 %, open 10 s, 3 probes.
fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(4)
        .failure_rate(0.5)
        .open_for(secs(10))
        .half_open_calls(3)
        .build()
        .unwrap()
}

async fn open_it<S>(svc: &mut S, handle: &CircuitBreakerHandle)
where
    S: Service<Cmd, Response = (), Error = BoxError>,
{
    for _ in 0..4 {
        let _ = call(svc, Cmd::Fail).await;
    }
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn opens_at_the_threshold_once_minimum_calls_are_in() {
    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());

    // Three failures: 100 %, but fewer than minimum_calls.
    for _ in 0..3 {
        assert!(call(&mut svc, Cmd::Fail).await.is_err());
    }
    assert_eq!(h.state(), State::Closed);
    // Fourth call, a success: 3 of 4 failed.
    call(&mut svc, Cmd::Ok).await.unwrap();
    assert_eq!(h.state(), State::Open);
    assert_eq!(c.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_rate_exactly_at_the_threshold_opens_and_below_does_not() {
    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());
    // 1 of 4 = 0.25.
    call(&mut svc, Cmd::Ok).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Closed);
    // 2 of 5 = 0.4.
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Closed);
    // 3 of 6 = 0.5: at the threshold.
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
}

/// A rate whose product with the window is not exact in floating point
/// (0.55 × 100 is 55.00000000000001) still opens at exactly that share:
/// 55 failures of 100.
#[tokio::test(start_paused = true)]
async fn a_rate_that_float_multiplication_rounds_up_still_opens_at_it() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(100)
        .minimum_calls(100)
        .failure_rate(0.55)
        .build()
        .unwrap();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());
    for _ in 0..45 {
        call(&mut svc, Cmd::Ok).await.unwrap();
    }
    for _ in 0..54 {
        let _ = call(&mut svc, Cmd::Fail).await;
    }
    assert_eq!(h.state(), State::Closed, "99 calls, under minimum_calls");
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open, "55 of 100 failed, at 0.55");
}

#[tokio::test(start_paused = true)]
async fn the_count_window_forgets_old_outcomes() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(4)
        .minimum_calls(4)
        .failure_rate(0.75)
        .build()
        .unwrap();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());
    // F F S S: 50 %.
    let _ = call(&mut svc, Cmd::Fail).await;
    let _ = call(&mut svc, Cmd::Fail).await;
    call(&mut svc, Cmd::Ok).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    // S S S F: the first two failures have left the window; 25 %.
    call(&mut svc, Cmd::Ok).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Closed);
    // S F F F: 75 %.
    let _ = call(&mut svc, Cmd::Fail).await;
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn open_rejects_without_calling_inner_with_the_real_time_left() {
    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());
    open_it(&mut svc, &h).await;
    let before = c.calls();

    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), secs(10));
    tokio::time::advance(Duration::from_millis(3_250)).await;
    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), Duration::from_millis(6_750));
    assert_eq!(h.retry_after(), Some(Duration::from_millis(6_750)));
    assert_eq!(
        c.calls(),
        before,
        "a rejected call reached the inner service"
    );
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn open_turns_half_open_after_open_for() {
    let layer = breaker();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10) - Duration::from_nanos(1)).await;
    assert_eq!(h.state(), State::Open);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert_eq!(h.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_n_probes_to_concurrent_callers() {
    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let svc = layer.layer(c.service());
    let mut s = svc.clone();
    open_it(&mut s, &h).await;
    tokio::time::advance(secs(10)).await;
    let before = c.calls();

    // Twenty callers at once, each on its own clone, all hanging.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move { svc.oneshot(Cmd::Hang).await }));
    }
    // Let every task run until it is either rejected or hangs.
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(c.calls() - before, 3, "exactly half_open_calls probes pass");
    let mut rejected = 0;
    for t in tasks.iter_mut() {
        if t.is_finished() {
            let err = t.await.unwrap().unwrap_err();
            assert_eq!(retry_after(&err), Duration::ZERO);
            rejected += 1;
        }
    }
    assert_eq!(rejected, 17);
    assert_eq!(h.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn successful_probes_close_it_with_an_empty_window() {
    let layer = breaker();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10)).await;
    for i in 0..3 {
        assert_eq!(h.state(), State::HalfOpen, "probe {i}");
        call(&mut svc, Cmd::Ok).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
    // The failures that opened it are forgotten: three more stay under
    // minimum_calls.
    for _ in 0..3 {
        let _ = call(&mut svc, Cmd::Fail).await;
    }
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn failing_probes_reopen_it() {
    let layer = breaker();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10)).await;
    // 2 of 3 probes fail: 67 % >= 50 %.
    call(&mut svc, Cmd::Ok).await.unwrap();
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(
        h.state(),
        State::HalfOpen,
        "decided only when all probes are in"
    );
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
    assert_eq!(h.retry_after(), Some(secs(10)));
}

#[tokio::test(start_paused = true)]
async fn one_failing_probe_of_three_still_closes_it() {
    let layer = breaker();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10)).await;
    let _ = call(&mut svc, Cmd::Fail).await;
    call(&mut svc, Cmd::Ok).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_slot_back() {
    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10)).await;

    let hung: Vec<_> = (0..3).map(|_| svc.call(Cmd::Hang)).collect();
    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), Duration::ZERO, "all three slots taken");
    drop(hung);
    // Three slots are free again: three probes succeed and close it.
    for _ in 0..3 {
        call(&mut svc, Cmd::Ok).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn stalled_probes_send_it_back_to_open() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(4)
        .open_for(secs(10))
        .half_open_calls(2)
        .max_wait_in_half_open(secs(5))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10)).await;
    let hung: Vec<_> = (0..2).map(|_| svc.call(Cmd::Hang)).collect();
    tokio::time::advance(secs(5) - Duration::from_millis(1)).await;
    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), Duration::ZERO);
    assert_eq!(h.state(), State::HalfOpen);
    tokio::time::advance(Duration::from_millis(1)).await;
    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), secs(10), "reopened for a fresh open_for");
    assert_eq!(h.state(), State::Open);
    // The stalled probes finishing late changes nothing.
    drop(hung);
    assert_eq!(h.state(), State::Open);
}

/// The wait for stalled probes counts from the first probe: a breaker that
/// turned half-open when someone read its state, long before any call, does
/// not reopen on a probe that has run for a millisecond.
#[tokio::test(start_paused = true)]
async fn the_stall_wait_counts_from_the_first_probe() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(4)
        .open_for(secs(10))
        .half_open_calls(1)
        .max_wait_in_half_open(secs(5))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10)).await;
    // An admin page looks: the breaker turns half-open with no call.
    assert_eq!(h.state(), State::HalfOpen);
    tokio::time::advance(secs(60)).await;
    let _probe = svc.call(Cmd::Hang);
    tokio::time::advance(Duration::from_millis(1)).await;
    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), Duration::ZERO);
    assert_eq!(h.state(), State::HalfOpen);
    // Five seconds after the probe began, it has stalled.
    tokio::time::advance(secs(5)).await;
    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), secs(10));
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn repeated_opens_back_off_up_to_the_cap_and_closing_resets_it() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(secs(1))
        .max_open_for(secs(4))
        .open_jitter(0.0)
        .half_open_calls(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    let _ = call(&mut svc, Cmd::Fail).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = h.retry_after().unwrap();
        seen.push(d);
        tokio::time::advance(d).await;
        let _ = call(&mut svc, Cmd::Fail).await; // the probe fails
    }
    assert_eq!(seen, [secs(1), secs(2), secs(4), secs(4)]);
    tokio::time::advance(secs(4)).await;
    call(&mut svc, Cmd::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.retry_after(), Some(secs(1)));
}

#[tokio::test(start_paused = true)]
async fn backoff_jitter_only_shortens() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(secs(10))
        .max_open_for(secs(40))
        .open_jitter(0.5)
        .half_open_calls(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    let _ = call(&mut svc, Cmd::Fail).await;
    let mut seen = Vec::new();
    for n in 0..6u32 {
        let d = h.retry_after().unwrap();
        let full = secs(10 * 2u64.pow(n)).min(secs(40));
        assert!(d <= full && d >= full / 2, "open {n}: {d:?} vs {full:?}");
        seen.push(d);
        tokio::time::advance(d).await;
        let _ = call(&mut svc, Cmd::Fail).await;
    }
    // Jitter really varies the opens that hit the cap.
    assert!(seen[2..].windows(2).any(|w| w[0] != w[1]), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_buckets_that_slide_out() {
    let layer = CircuitBreakerLayer::builder()
        .time_window(secs(10))
        .minimum_calls(4)
        .failure_rate(0.5)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    let _ = call(&mut svc, Cmd::Fail).await;
    let _ = call(&mut svc, Cmd::Fail).await;
    tokio::time::advance(secs(10)).await;
    // The two failures have left the window: 1 of 3 counted so far.
    call(&mut svc, Cmd::Ok).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Closed);
    // Within one window: 2 of 4.
    tokio::time::advance(secs(5)).await;
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_mode() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    let _ = call(&mut svc, Cmd::Fail).await;
    let _ = call(&mut svc, Cmd::Fail).await;
    call(&mut svc, Cmd::Ok).await.unwrap();
    let _ = call(&mut svc, Cmd::Fail).await;
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Closed);
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_it() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(4)
        .minimum_calls(4)
        .slow_call_duration(secs(1))
        .slow_call_rate(0.5)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    call(&mut svc, Cmd::Ok).await.unwrap();
    call(&mut svc, Cmd::Slow(Duration::from_millis(999)))
        .await
        .unwrap();
    call(&mut svc, Cmd::Slow(secs(1))).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed, "1 of 4 slow");
    call(&mut svc, Cmd::Slow(secs(2))).await.unwrap();
    assert_eq!(h.state(), State::Open, "2 of 4 slow");
}

#[tokio::test(start_paused = true)]
async fn force_open_disable_and_reset() {
    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());

    h.force_open();
    assert_eq!(h.state(), State::ForcedOpen);
    let err = call(&mut svc, Cmd::Ok).await.unwrap_err();
    assert_eq!(retry_after(&err), secs(10));
    tokio::time::advance(secs(60)).await;
    assert_eq!(
        h.state(),
        State::ForcedOpen,
        "forced open does not time out"
    );
    assert_eq!(c.calls(), 0);

    h.disable();
    for _ in 0..20 {
        let _ = call(&mut svc, Cmd::Fail).await;
    }
    assert_eq!(h.state(), State::Disabled);
    assert_eq!(c.calls(), 20);

    h.reset();
    assert_eq!(h.state(), State::Closed);
    open_it(&mut svc, &h).await;
    h.reset();
    call(&mut svc, Cmd::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn handle_works_without_a_runtime_context() {
    let layer = breaker();
    let h = layer.handle();
    std::thread::spawn(move || {
        h.force_open();
        assert_eq!(h.state(), State::ForcedOpen);
        h.reset();
        assert_eq!(h.state(), State::Closed);
        h.disable();
        assert_eq!(h.state(), State::Disabled);
    })
    .join()
    .unwrap();
}

/// Rejections of an open breaker under load cannot crowd its state changes
/// out of a transitions-only receiver (the mixed stream lags at 256).
#[tokio::test(start_paused = true)]
async fn transitions_survive_a_flood_of_rejections() {
    let layer = breaker();
    let h = layer.handle();
    let mut mixed = h.subscribe();
    let mut changes = h.subscribe_transitions();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    for _ in 0..300 {
        let _ = call(&mut svc, Cmd::Ok).await;
    }
    tokio::time::advance(secs(10)).await;
    for _ in 0..3 {
        call(&mut svc, Cmd::Ok).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
    assert!(matches!(
        mixed.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_))
    ));
    let mut seen = Vec::new();
    while let Ok(Event::Transition { from, to }) = changes.try_recv() {
        seen.push((from, to));
    }
    assert_eq!(
        seen,
        [
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn events_stream_transitions_and_rejections() {
    let layer = breaker();
    let h = layer.handle();
    let mut events = h.subscribe();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    let _ = call(&mut svc, Cmd::Ok).await;
    tokio::time::advance(secs(10)).await;
    for _ in 0..3 {
        call(&mut svc, Cmd::Ok).await.unwrap();
    }
    let mut got = Vec::new();
    while let Ok(e) = events.try_recv() {
        got.push(e);
    }
    assert_eq!(
        got,
        [
            Event::Transition {
                from: State::Closed,
                to: State::Open
            },
            Event::Rejected {
                state: State::Open,
                retry_after: secs(10)
            },
            Event::Transition {
                from: State::Open,
                to: State::HalfOpen
            },
            Event::Transition {
                from: State::HalfOpen,
                to: State::Closed
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn our_own_rejections_are_not_counted_but_timeouts_are() {
    use tower_firebreak::bulkhead::BulkheadFull;
    use tower_firebreak::rate_limit::RateLimited;
    use tower_firebreak::timeout::Elapsed;

    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let mut svc = layer.layer(c.service());
    let ours: [Arc<dyn Fn() -> BoxError + Send + Sync>; 3] = [
        Arc::new(|| CircuitOpen::new(secs(1)).into()),
        Arc::new(|| BulkheadFull::new(1).into()),
        Arc::new(|| RateLimited::new(secs(1)).into()),
    ];
    for _ in 0..10 {
        for f in &ours {
            assert!(call(&mut svc, Cmd::Error(f.clone())).await.is_err());
        }
    }
    assert_eq!(h.state(), State::Closed);
    for _ in 0..4 {
        let _ = call(
            &mut svc,
            Cmd::Error(Arc::new(|| Elapsed::new(secs(1)).into())),
        )
        .await;
    }
    assert_eq!(
        h.state(),
        State::Open,
        "attempt timeouts are the dependency's"
    );
}

#[tokio::test(start_paused = true)]
async fn every_service_from_one_layer_shares_one_breaker() {
    let layer = breaker();
    let h = layer.handle();
    let c = Counter::default();
    let mut a = layer.layer(c.service());
    let mut b = layer.layer(c.service());
    let _ = call(&mut a, Cmd::Fail).await;
    let _ = call(&mut b, Cmd::Fail).await;
    let _ = call(&mut a.clone(), Cmd::Fail).await;
    let _ = call(&mut b, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
    assert!(call(&mut a, Cmd::Ok).await.is_err());
}

/// A stack layered per connection (a service that lives for one call)
/// still fills the count window: each service's first batch of ring
/// positions is one position, so no position goes unwritten.
#[tokio::test(start_paused = true)]
async fn services_that_live_for_one_call_still_fill_the_window() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(128)
        .minimum_calls(100)
        .failure_rate(0.5)
        .build()
        .unwrap();
    let h = layer.handle();
    let c = Counter::default();
    for _ in 0..99 {
        let _ = call(&mut layer.layer(c.service()), Cmd::Fail).await;
    }
    assert_eq!(h.metrics().calls, 99);
    assert_eq!(h.state(), State::Closed);
    let _ = call(&mut layer.layer(c.service()), Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_call_finishing_after_the_breaker_closed_again_is_not_counted() {
    let layer = breaker();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    // Admitted while closed, finishes much later.
    let late = tokio::spawn({
        let svc = svc.clone();
        svc.oneshot(Cmd::Slow(secs(30)))
    });
    tokio::task::yield_now().await;
    open_it(&mut svc, &h).await;
    tokio::time::advance(secs(10)).await;
    for _ in 0..3 {
        call(&mut svc, Cmd::Ok).await.unwrap();
    }
    assert_eq!(h.state(), State::Closed);
    late.await.unwrap().unwrap();
    for _ in 0..3 {
        let _ = call(&mut svc, Cmd::Fail).await;
    }
    // Had the late success counted, this would be 3 failures of 4 calls and
    // open it; uncounted, 3 calls stay under minimum_calls.
    assert_eq!(h.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn readiness_mode_waits_while_open() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(4)
        .open_for(secs(10))
        .half_open_calls(1)
        .backpressure(true)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    let start = tokio::time::Instant::now();
    // Paused time jumps to the timer: ready exactly when half-open.
    svc.ready().await.unwrap();
    assert_eq!(start.elapsed(), secs(10));
    assert_eq!(h.state(), State::HalfOpen);
    call(&mut svc, Cmd::Ok).await.unwrap();
    assert_eq!(h.state(), State::Closed);

    // Not ready while open: a bound on the wait fails.
    open_it(&mut svc, &h).await;
    assert!(tokio::time::timeout(secs(9), svc.ready()).await.is_err());
}

/// In readiness mode a `poll_ready` waiting out an open period (a balancer
/// or a buffer worker) is woken by an operator's `reset` at once, not when
/// the old timer would have fired.
#[tokio::test(start_paused = true)]
async fn readiness_mode_wakes_a_waiting_caller_on_reset() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(secs(3600))
        .backpressure(true)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
    let start = tokio::time::Instant::now();
    let waiting = tokio::spawn(svc.ready_oneshot());
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    h.reset();
    // Paused time would jump to the old timer if nothing woke the task.
    waiting.await.unwrap().unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "woken by the timer, not the reset"
    );
}

#[tokio::test(start_paused = true)]
async fn default_mode_is_ready_while_open_and_rejects_in_call() {
    let layer = breaker();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    open_it(&mut svc, &h).await;
    let ready = tokio::time::timeout(Duration::from_millis(1), svc.ready()).await;
    assert!(ready.is_ok(), "poll_ready passes in the default mode");
    assert!(call(&mut svc, Cmd::Ok).await.is_err());
}

/// A service from `layer` over a `tower_test` mock, whose first call
/// failed: a breaker that opens on one failure is then open.
async fn open_over_a_mock(
    layer: &CircuitBreakerLayer,
) -> (
    tower_firebreak::circuit_breaker::CircuitBreaker<tower_test::mock::Mock<u32, u32>>,
    tower_test::mock::Handle<u32, u32>,
) {
    let (inner, mut handle) = tower_test::mock::pair::<u32, u32>();
    let mut svc = layer.layer(inner);
    handle.allow(1);
    let res = svc.ready().await.unwrap().call(1);
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("down");
    assert!(res.await.is_err());
    (svc, handle)
}

/// An open or half-open breaker answers readiness without waiting for an
/// inner service that is not ready (a client whose queue filled with calls
/// to a host that does not answer), and rejects at once, without taking a
/// probe slot. Every rejection is an event. Once the inner service is
/// ready, the probe goes out.
#[tokio::test(start_paused = true)]
async fn an_open_breaker_fails_fast_even_when_the_inner_service_is_not_ready() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(secs(10))
        .half_open_calls(1)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut events = h.subscribe();
    let (mut svc, mut handle) = open_over_a_mock(&layer).await;
    assert_eq!(h.state(), State::Open);

    // The inner service is not ready from here on.
    handle.allow(0);
    let ready = tokio::time::timeout(Duration::from_millis(1), svc.ready()).await;
    assert!(
        ready.is_ok(),
        "an open breaker waits for no inner readiness"
    );
    let err = svc.call(2).await.unwrap_err();
    assert_eq!(retry_after(&err), secs(10));

    // Half-open and still not ready: callers are not held either.
    tokio::time::advance(secs(10)).await;
    for n in 0..3 {
        let ready = tokio::time::timeout(Duration::from_millis(1), svc.ready()).await;
        assert!(ready.is_ok(), "half-open, not ready: caller {n} held");
        let err = svc.call(3).await.unwrap_err();
        assert_eq!(retry_after(&err), Duration::ZERO);
    }
    assert_eq!(h.state(), State::HalfOpen);
    let mut rejected = 0;
    while let Ok(e) = events.try_recv() {
        if matches!(e, Event::Rejected { .. }) {
            rejected += 1;
        }
    }
    assert_eq!(rejected, 4, "every rejection is an event");

    // Once the inner service is ready, the probe goes out: no slot was
    // taken by the rejected calls.
    handle.allow(1);
    let res = svc.ready().await.unwrap().call(4);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req, 4);
    send.send_response(4);
    assert_eq!(res.await.unwrap(), 4);
    assert_eq!(h.state(), State::Closed);
}

/// Over a not-ready inner service, a rejection still makes the moves a
/// call would, and says what a rejection in that state says: an ended open
/// period turns half-open (and the event says so), a probe stalled past
/// `max_wait_in_half_open` reopens the breaker, and forced open gives
/// `open_for`.
#[tokio::test(start_paused = true)]
async fn a_not_ready_inner_service_meets_the_same_state_moves() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(secs(10))
        .half_open_calls(1)
        .max_wait_in_half_open(secs(5))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut events = h.subscribe();
    let (mut svc, mut handle) = open_over_a_mock(&layer).await;

    // The open period ends; the next rejection finds the breaker half-open.
    tokio::time::advance(secs(10)).await;
    handle.allow(0);
    svc.ready().await.unwrap();
    assert_eq!(retry_after(&svc.call(2).await.unwrap_err()), Duration::ZERO);
    let states: Vec<State> = std::iter::from_fn(|| events.try_recv().ok())
        .filter_map(|e| match e {
            Event::Rejected { state, .. } => Some(state),
            _ => None,
        })
        .collect();
    assert_eq!(states, [State::HalfOpen]);

    // A probe goes out and hangs, holding the inner service's only room.
    handle.allow(1);
    let _stuck = svc.ready().await.unwrap().call(3);
    let _held = handle.next_request().await.unwrap();
    handle.allow(0);
    tokio::time::advance(secs(5)).await;
    svc.ready().await.unwrap();
    let err = svc.call(4).await.unwrap_err();
    assert_eq!(h.state(), State::Open, "the stalled probe reopened it");
    assert_eq!(retry_after(&err), secs(10));

    // Forced open: the rejection gives `open_for`, as any forced-open one.
    h.force_open();
    svc.ready().await.unwrap();
    assert_eq!(retry_after(&svc.call(5).await.unwrap_err()), secs(10));
}

/// Half-open, a caller that finds the inner service briefly not ready (its
/// own concurrency limit, taken by a probe in flight) is rejected without
/// counting as a probe: local backpressure never reopens the breaker.
#[tokio::test(start_paused = true)]
async fn a_briefly_not_ready_inner_service_does_not_fail_probes() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(1)
        .failure_rate(0.5)
        .open_for(secs(10))
        .half_open_calls(2)
        .build()
        .unwrap();
    let h = layer.handle();
    let (mut a, mut handle) = open_over_a_mock(&layer).await;
    let mut b = a.clone();
    assert_eq!(h.state(), State::Open);
    tokio::time::advance(secs(10)).await;

    // Probe 1 goes out and is in flight; the inner service is then full.
    handle.allow(1);
    let probe1 = a.ready().await.unwrap().call(2);
    let (_, send1) = handle.next_request().await.unwrap();
    let ready = tokio::time::timeout(Duration::from_millis(1), b.ready()).await;
    assert!(ready.is_ok());
    assert_eq!(retry_after(&b.call(3).await.unwrap_err()), Duration::ZERO);
    // Room again: probe 2. The rejected caller took no probe slot.
    send1.send_response(2);
    assert_eq!(probe1.await.unwrap(), 2);
    assert_eq!(h.state(), State::HalfOpen);
    handle.allow(1);
    let probe2 = b.ready().await.unwrap().call(4);
    let (_, send2) = handle.next_request().await.unwrap();
    send2.send_response(4);
    assert_eq!(probe2.await.unwrap(), 4);
    assert_eq!(h.state(), State::Closed, "both probes succeeded");
}

/// A caller already waiting for a not-ready inner service when the breaker
/// opens is woken by the trip, and fails fast, instead of waiting on. Many
/// callers that waited before and are gone do not stand in its way.
#[tokio::test(start_paused = true)]
async fn a_caller_waiting_for_readiness_is_woken_when_the_breaker_opens() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(secs(10))
        .build()
        .unwrap();
    let h = layer.handle();
    let (inner, mut handle) = tower_test::mock::pair::<u32, u32>();
    let mut svc = layer.layer(inner);
    handle.allow(1);
    let res = svc.ready().await.unwrap().call(1);
    let (_, send) = handle.next_request().await.unwrap();
    // The inner service is full from here on. 300 callers wait a moment
    // and give up; then one waits on.
    handle.allow(0);
    for _ in 0..300 {
        let mut gone = svc.clone();
        let waited = tokio::time::timeout(Duration::from_millis(1), gone.ready()).await;
        assert!(waited.is_err(), "closed: it waits for the inner service");
    }
    let waiting = tokio::spawn({
        let mut other = svc.clone();
        async move {
            other.ready().await.unwrap();
            other.call(2).await
        }
    });
    tokio::task::yield_now().await;
    assert!(
        !waiting.is_finished(),
        "closed: it waits for the inner service"
    );
    send.send_error("down");
    assert!(res.await.is_err());
    assert_eq!(h.state(), State::Open);
    let start = tokio::time::Instant::now();
    let err = tokio::time::timeout(secs(60), waiting)
        .await
        .expect("woken by the trip")
        .unwrap()
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "woken by the trip");
    assert_eq!(retry_after(&err), secs(10));
}

#[tokio::test(start_paused = true)]
async fn huge_durations_do_not_overflow() {
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(Duration::MAX)
        .max_open_for(Duration::MAX)
        .backpressure(true)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    let _ = call(&mut svc, Cmd::Fail).await;
    assert_eq!(h.state(), State::Open);
    assert!(h.retry_after().unwrap() > secs(1_000_000_000));
    assert!(tokio::time::timeout(secs(3600), svc.ready()).await.is_err());
    h.force_open();
    assert!(tokio::time::timeout(secs(3600), svc.ready()).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn two_breakers_do_not_jitter_in_step() {
    let mut firsts = Vec::new();
    for _ in 0..2 {
        let layer = CircuitBreakerLayer::builder()
            .consecutive_failures(1)
            .open_for(secs(10))
            .max_open_for(secs(40))
            .open_jitter(0.5)
            .build()
            .unwrap();
        let h = layer.handle();
        let mut svc = layer.layer(Counter::default().service());
        let _ = call(&mut svc, Cmd::Fail).await;
        firsts.push(h.retry_after().unwrap());
    }
    assert_ne!(firsts[0], firsts[1]);
}

#[tokio::test(start_paused = true)]
async fn metrics_count_the_window_and_disabled_keeps_counting() {
    let layer = CircuitBreakerLayer::builder()
        .count_window(4)
        .minimum_calls(4)
        .failure_rate(1.0)
        .slow_call_duration(secs(1))
        .slow_call_rate(1.0)
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    let _ = call(&mut svc, Cmd::Fail).await;
    call(&mut svc, Cmd::Slow(secs(2))).await.unwrap();
    call(&mut svc, Cmd::Ok).await.unwrap();
    let m = h.metrics();
    assert_eq!((m.calls, m.failures, m.slow_calls), (3, 1, 1));
    assert!((m.failure_rate() - 1.0 / 3.0).abs() < 1e-9);

    h.disable();
    assert_eq!(h.metrics().calls, 0, "disable starts an empty window");
    for _ in 0..6 {
        let _ = call(&mut svc, Cmd::Fail).await;
    }
    let m = h.metrics();
    assert_eq!((m.calls, m.failures), (4, 4), "recorded, and never opens");
    assert_eq!(h.state(), State::Disabled);
    h.reset();
    assert_eq!(h.metrics().calls, 0);
}
