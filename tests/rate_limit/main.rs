//! The GCRA rate limiter, direct and keyed, reject and wait modes.

#[path = "../support/mod.rs"]
mod support;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
use proptest::prelude::*;
use std::num::NonZeroU32;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::error::{self, Rejection, RejectionKind};
use tower_firebreak::rate_limit::{
    KeyedRateLimitLayer, RateLimitConfig, RateLimitLayer, RateLimitMode, RateLimited,
};

fn echo() -> impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone {
    service_fn(|x: u32| async move { Ok::<_, BoxError>(x) })
}

/// What governor itself says, on its own fake clock, for the same quota.
fn governor_wait_after(per_second: u32, burst: u32, calls: u32) -> Duration {
    let clock = FakeRelativeClock::default();
    let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap())
        .allow_burst(NonZeroU32::new(burst).unwrap());
    let lim = RateLimiter::direct_with_clock(quota, clock.clone());
    for _ in 0..calls {
        lim.check().unwrap();
    }
    use governor::clock::Clock;
    lim.check().unwrap_err().wait_time_from(clock.now())
}

#[tokio::test(start_paused = true)]
async fn exactly_burst_calls_pass_at_an_instant_and_the_next_learns_when() {
    let mut svc = ServiceBuilder::new()
        .layer(RateLimitLayer::per_second(10).burst(3))
        .service(echo());
    for i in 0..3 {
        assert_eq!(svc.ready().await.unwrap().call(i).await.unwrap(), i);
    }
    let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
    let limited = error::find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(limited.retry_after(), governor_wait_after(10, 3, 3));
    assert_eq!(limited.retry_after(), Duration::from_millis(100));
    let r = Rejection::of(&*err).unwrap();
    assert_eq!(r.kind(), RejectionKind::RateLimited);
    assert_eq!(r.retry_after(), Some(Duration::from_millis(100)));

    // One permit comes back after exactly retry_after, and only one.
    tokio::time::advance(Duration::from_millis(99)).await;
    assert!(svc.ready().await.unwrap().call(4).await.is_err());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(svc.ready().await.unwrap().call(5).await.unwrap(), 5);
    assert!(svc.ready().await.unwrap().call(6).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_limiter() {
    let layer = RateLimitLayer::per_second(1).burst(2);
    let a = tower::Layer::layer(&layer, echo());
    let b = tower::Layer::layer(&layer, echo());
    a.clone().oneshot(1).await.unwrap();
    b.clone().oneshot(2).await.unwrap();
    assert!(a.oneshot(3).await.is_err());
    assert!(b.oneshot(4).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn wait_mode_waits_for_the_permit_within_max_wait() {
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_second(10)
                .burst(1)
                .max_wait(Duration::from_millis(150)),
        )
        .service(echo());
    let start = Instant::now();
    svc.clone().oneshot(0).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    // Two calls at the same instant: the first waits for the permit at
    // 100 ms; the second, behind it, would get the one at 200 ms, over
    // max_wait, and is refused at once with that wait.
    let a = tokio::spawn(svc.clone().oneshot(1));
    let b = tokio::spawn(svc.clone().oneshot(2));
    let err = b.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        error::find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(200)
    );
    assert_eq!(a.await.unwrap().unwrap(), 1);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    // A wait longer than max_wait is refused at once, without waiting.
    let before = Instant::now();
    let lim = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_second(1)
                .burst(1)
                .max_wait(Duration::from_millis(10)),
        )
        .service(echo());
    lim.clone().oneshot(0).await.unwrap();
    let err = lim.oneshot(1).await.unwrap_err();
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(
        error::find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(1)
    );
}

/// Wait mode serves waiting calls in the order they came: a permit goes to
/// the call that has waited longest, never to one that arrived after it,
/// and only the first in line checks the limiter.
#[tokio::test(start_paused = true)]
async fn wait_mode_serves_waiting_calls_in_order() {
    use futures_util::FutureExt;
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_second(10)
                .burst(1)
                .max_wait(Duration::from_secs(1)),
        )
        .service(echo());
    let mut call = |x| Box::pin(svc.call(x));
    assert_eq!(call(0).now_or_never().unwrap().unwrap(), 0);
    let (mut c1, mut c2, mut c3) = (call(1), call(2), call(3));
    assert!((&mut c1).now_or_never().is_none());
    assert!((&mut c2).now_or_never().is_none());
    assert!((&mut c3).now_or_never().is_none());

    // The permit at 100 ms: a call arriving then queues behind the three,
    // and of the three, the first takes it whatever the order of polls.
    tokio::time::advance(Duration::from_millis(100)).await;
    let mut c4 = call(4);
    assert!(
        (&mut c4).now_or_never().is_none(),
        "c4 overtook three waiters"
    );
    assert!((&mut c3).now_or_never().is_none(), "c3 overtook c1");
    assert!((&mut c2).now_or_never().is_none(), "c2 overtook c1");
    assert_eq!((&mut c1).now_or_never().unwrap().unwrap(), 1);
    // Then one permit each 100 ms, in order.
    for (n, c) in [(2, &mut c2), (3, &mut c3), (4, &mut c4)] {
        assert!(c.now_or_never().is_none(), "c{n} before its permit");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(c.now_or_never().unwrap().unwrap(), n);
    }
}

/// A call that joins a line it cannot get through within `max_wait` is
/// refused at once, with the wait the line means for it (the next permit,
/// then one interval per call ahead), instead of waiting out `max_wait`.
#[tokio::test(start_paused = true)]
async fn wait_mode_refuses_at_once_a_call_the_line_cannot_serve_in_time() {
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_second(10)
                .burst(1)
                .max_wait(Duration::from_millis(250)),
        )
        .service(echo());
    let start = Instant::now();
    svc.clone().oneshot(0).await.unwrap();
    let c1 = tokio::spawn(svc.clone().oneshot(1));
    let c2 = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(3).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        error::find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(300)
    );
    assert_eq!(c1.await.unwrap().unwrap(), 1);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(c2.await.unwrap().unwrap(), 2);
    assert_eq!(start.elapsed(), Duration::from_millis(200));
}

/// The line's estimate stays right between one call's permit and the next
/// call's first check: a call arriving then, which the line cannot serve in
/// time, is still refused at once.
#[tokio::test(start_paused = true)]
async fn the_estimate_holds_right_after_a_permit_is_taken() {
    use futures_util::FutureExt;
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_second(10)
                .burst(1)
                .max_wait(Duration::from_millis(150)),
        )
        .service(echo());
    let mut call = |x| Box::pin(svc.call(x));
    assert_eq!(call(0).now_or_never().unwrap().unwrap(), 0);
    let mut c1 = call(1);
    assert!((&mut c1).now_or_never().is_none());
    tokio::time::advance(Duration::from_millis(50)).await;
    // Behind c1: its permit at 200 ms is 150 ms away, within max_wait.
    let mut c2 = call(2);
    assert!((&mut c2).now_or_never().is_none());
    tokio::time::advance(Duration::from_millis(50)).await;
    assert_eq!((&mut c1).now_or_never().unwrap().unwrap(), 1);
    // c2 has not checked yet; a call now would get the permit at 300 ms.
    let err = call(3).now_or_never().unwrap().unwrap_err();
    assert_eq!(
        error::find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(200)
    );
    assert!((&mut c2).now_or_never().is_none());
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!((&mut c2).now_or_never().unwrap().unwrap(), 2);
}

/// A panic in the inner service's `clone` (made for a waiting call) leaves
/// no phantom call in the line, which would refuse every later call.
#[tokio::test(start_paused = true)]
async fn a_panicking_clone_leaves_no_call_in_line() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    struct Svc(Arc<AtomicBool>);
    impl Clone for Svc {
        fn clone(&self) -> Self {
            assert!(!self.0.swap(false, Ordering::SeqCst), "clone failed");
            Svc(self.0.clone())
        }
    }
    impl Service<u32> for Svc {
        type Response = u32;
        type Error = BoxError;
        type Future = std::future::Ready<Result<u32, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, x: u32) -> Self::Future {
            std::future::ready(Ok(x))
        }
    }
    let fail = Arc::new(AtomicBool::new(false));
    let mut svc = tower::Layer::layer(
        &RateLimitLayer::per_second(1)
            .burst(1)
            .max_wait(Duration::from_millis(500)),
        Svc(fail.clone()),
    );
    assert_eq!(svc.call(0).await.unwrap(), 0);
    tokio::time::advance(Duration::from_millis(600)).await;
    // This call would wait 400 ms; its clone panics.
    fail.store(true, Ordering::SeqCst);
    let panicked =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(svc.call(1)))).is_err();
    assert!(panicked);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(svc.call(2).await.unwrap(), 2);
}

/// A waiting call that is dropped leaves its line, first in it or not:
/// the next call takes its turn, and the line's estimate counts it no more.
#[tokio::test(start_paused = true)]
async fn a_dropped_waiting_call_leaves_its_line() {
    use futures_util::FutureExt;
    let mut svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_second(10)
                .burst(1)
                .max_wait(Duration::from_millis(250)),
        )
        .service(echo());
    let mut call = |x| Box::pin(svc.call(x));
    assert_eq!(call(0).now_or_never().unwrap().unwrap(), 0);
    let (mut c1, mut c2) = (call(1), call(2));
    assert!((&mut c1).now_or_never().is_none());
    assert!((&mut c2).now_or_never().is_none());
    // Full: a third would be served at 300 ms.
    let err = call(3).now_or_never().unwrap().unwrap_err();
    assert_eq!(
        error::find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(300)
    );
    // The first in line and the one behind it are dropped.
    drop(c1);
    drop(c2);
    let mut c4 = call(4);
    assert!((&mut c4).now_or_never().is_none());
    let mut c5 = call(5);
    assert!((&mut c5).now_or_never().is_none());
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!((&mut c5).now_or_never().is_none(), "c5 overtook c4");
    assert_eq!((&mut c4).now_or_never().unwrap().unwrap(), 4);
    assert!((&mut c5).now_or_never().is_none());
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!((&mut c5).now_or_never().unwrap().unwrap(), 5);
}

/// Two worker threads and many waiting callers: every call is served (no
/// turn is lost between the line's first call leaving and the next taking
/// over), and no faster than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_waiting_in_line_are_all_served() {
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::per_second(2000)
                .burst(1)
                .max_wait(Duration::from_secs(30)),
        )
        .service(echo());
    let start = Instant::now();
    // 400 calls at 2000 a second take 200 ms; a lost turn stalls a call
    // until its 30 s max_wait and fails it.
    support::hammer(svc, 8, 50, |req, res| assert_eq!(res.unwrap(), req)).await;
    assert!(start.elapsed() >= Duration::from_micros(399 * 500));
}

/// A keyed limiter keeps one line per key: a key's waiting calls are served
/// in order, and another key's calls never wait behind them.
#[tokio::test(start_paused = true)]
async fn keyed_wait_mode_keeps_one_line_per_key() {
    use futures_util::FutureExt;
    let layer = KeyedRateLimitLayer::per_second(10, |x: &u32| *x / 100)
        .burst(1)
        .max_wait(Duration::from_secs(1));
    let mut svc = tower::Layer::layer(&layer, echo());
    let mut call = |x| Box::pin(svc.call(x));
    assert_eq!(call(100).now_or_never().unwrap().unwrap(), 100);
    let (mut a1, mut a2) = (call(101), call(102));
    assert!((&mut a1).now_or_never().is_none());
    assert!((&mut a2).now_or_never().is_none());
    // Key 2 has its own permit and its own line.
    assert_eq!(call(200).now_or_never().unwrap().unwrap(), 200);
    tokio::time::advance(Duration::from_millis(100)).await;
    let mut a3 = call(103);
    assert!(
        (&mut a3).now_or_never().is_none(),
        "a newcomer overtook key 1's line"
    );
    assert!((&mut a2).now_or_never().is_none(), "a2 overtook a1");
    assert_eq!((&mut a1).now_or_never().unwrap().unwrap(), 101);
    assert_eq!(call(201).now_or_never().unwrap().unwrap(), 201);
    for (n, c) in [(102, &mut a2), (103, &mut a3)] {
        assert!(c.now_or_never().is_none());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(c.now_or_never().unwrap().unwrap(), n);
    }
    // The line is gone with its last call: a new call checks the limiter.
    tokio::time::advance(Duration::from_millis(100)).await;
    assert_eq!(call(104).now_or_never().unwrap().unwrap(), 104);
}

/// Many keys waiting at once (spread over the limiter's tables of lines):
/// each key's line serves its own calls, and every line is gone after.
#[tokio::test(start_paused = true)]
async fn keyed_wait_mode_with_many_keys_waiting() {
    use futures_util::FutureExt;
    // Many polls in one task turn: out of tokio's cooperative budget, a
    // timer or semaphore would answer Pending.
    use tokio::task::unconstrained;
    let layer = KeyedRateLimitLayer::per_second(10, |x: &u32| *x % 1000)
        .burst(1)
        .max_wait(Duration::from_millis(250));
    let mut svc = tower::Layer::layer(&layer, echo());
    let mut waiting = Vec::new();
    for key in 0..64u32 {
        assert_eq!(
            unconstrained(svc.call(key))
                .now_or_never()
                .unwrap()
                .unwrap(),
            key
        );
        for n in 1..=2u32 {
            let mut c = Box::pin(svc.call(n * 1000 + key));
            assert!(unconstrained(&mut c).now_or_never().is_none());
            waiting.push((n, key, c));
        }
        // A third call of the key would be served at 300 ms: refused now.
        let err = unconstrained(svc.call(3000 + key))
            .now_or_never()
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error::find::<RateLimited>(&*err).unwrap().retry_after(),
            Duration::from_millis(300)
        );
    }
    for round in 1..=2u32 {
        tokio::time::advance(Duration::from_millis(100)).await;
        for (n, key, c) in &mut waiting {
            if *n == round {
                let got = unconstrained(c).now_or_never();
                assert!(
                    got.is_some(),
                    "round {round}: call {n} of key {key} not served"
                );
                assert_eq!(got.unwrap().unwrap(), *n * 1000 + *key);
            } else if *n > round {
                assert!(unconstrained(c).now_or_never().is_none());
            }
        }
    }
    // No key has a line left: after a permit's interval, each key's next
    // call checks the limiter and passes.
    tokio::time::advance(Duration::from_millis(100)).await;
    for key in 0..64u32 {
        assert_eq!(
            unconstrained(svc.call(4000 + key))
                .now_or_never()
                .unwrap()
                .unwrap(),
            4000 + key
        );
    }
}

/// `Duration::MAX` as "wait as long as it takes" (and as a timeout or a
/// deadline: no limit) waits, where `now + Duration::MAX` would panic.
#[tokio::test(start_paused = true)]
async fn a_max_wait_of_duration_max_waits_instead_of_panicking() {
    let svc = ServiceBuilder::new()
        .layer(tower_firebreak::timeout::TimeoutLayer::new(Duration::MAX))
        .layer(tower_firebreak::deadline::DeadlineLayer::new(Duration::MAX))
        .layer(
            RateLimitLayer::per_second(1)
                .burst(1)
                .max_wait(Duration::MAX),
        )
        .service(service_fn(|req: http::Request<()>| async move {
            drop(req);
            Ok::<_, BoxError>(())
        }));
    let start = Instant::now();
    svc.clone().oneshot(http::Request::new(())).await.unwrap();
    svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn keyed_limits_are_per_key_and_pruned_on_schedule() {
    let layer = KeyedRateLimitLayer::per_second(5, |k: &u32| *k % 10_000).burst(1);
    let svc = tower::Layer::layer(&layer, echo());
    svc.clone().oneshot(1).await.unwrap();
    svc.clone().oneshot(2).await.unwrap();
    let err = svc.clone().oneshot(10_001).await.unwrap_err();
    assert_eq!(
        error::find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(200)
    );
    for k in 0..10_000u32 {
        let _ = svc.clone().oneshot(k).await;
    }
    assert_eq!(layer.len(), 10_000);
    // Still inside every key's window: nothing may be forgotten yet.
    layer.retain_recent();
    assert_eq!(layer.len(), 10_000);
    // Once every key's cell is back to its fresh state, all go.
    tokio::time::advance(Duration::from_secs(1)).await;
    layer.retain_recent();
    assert_eq!(layer.len(), 0);
    assert!(layer.is_empty());
    // A pruned key behaves as a fresh one.
    svc.oneshot(1).await.unwrap();
}

/// `prune_every` runs the pruning on a task: keys back in their fresh state
/// go at its next tick, not before; the task ends once the layer and its
/// services are dropped; a zero period is a config error.
#[tokio::test(start_paused = true)]
async fn prune_every_prunes_on_its_schedule_and_stops_with_the_layer() {
    let layer = KeyedRateLimitLayer::per_second(10, |k: &u32| *k).burst(1);
    let svc = tower::Layer::layer(&layer, echo());
    for bad in [Duration::ZERO, Duration::MAX] {
        assert_eq!(layer.prune_every(bad).unwrap_err().field(), "prune_every");
    }
    let pruner = layer.prune_every(Duration::from_secs(5)).unwrap();
    for k in 0..1000u32 {
        svc.clone().oneshot(k).await.unwrap();
    }
    assert_eq!(layer.len(), 1000);
    // Fresh again after 100 ms, but the first tick is at 5 s.
    tokio::time::sleep(Duration::from_millis(4900)).await;
    assert_eq!(layer.len(), 1000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(layer.len(), 0);
    // New keys wait for the next tick.
    for k in 0..10u32 {
        svc.clone().oneshot(k).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(layer.len(), 0);
    drop((layer, svc));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(pruner.is_finished(), "the pruner outlived its limiter");
}

#[test]
fn config_defaults_and_errors() {
    let cfg = RateLimitConfig::default();
    assert_eq!(cfg.per_second, 1000);
    assert_eq!(cfg.burst, None);
    assert_eq!(cfg.mode, RateLimitMode::Reject);
    let err = RateLimitConfig {
        per_second: 0,
        ..Default::default()
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(err.field(), "per_second");
    let err = RateLimitConfig {
        burst: Some(0),
        ..Default::default()
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(err.field(), "burst");
    let err = RateLimitConfig {
        mode: RateLimitMode::Wait,
        max_wait: Duration::ZERO,
        ..Default::default()
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(err.field(), "max_wait");
    assert!(toml::from_str::<RateLimitConfig>("mode = \"queue\"").is_err());
    let layer = toml::from_str::<RateLimitConfig>("per_second = 7")
        .unwrap()
        .into_layer()
        .unwrap();
    assert_eq!(layer.quota().burst_size().get(), 7);
}

#[tokio::test(start_paused = true)]
async fn end_to_end_axum_answers_429_with_retry_after() {
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(support::handle_error))
            .layer(RateLimitLayer::per_second(1).burst(2)),
    );
    let addr = support::serve(app).await;
    let client = support::client();
    assert_eq!(support::get(&client, addr, "/").await.status, 200);
    assert_eq!(support::get(&client, addr, "/").await.status, 200);
    let third = support::get(&client, addr, "/").await;
    assert_eq!(third.status, 429);
    assert_eq!(third.headers[http::header::RETRY_AFTER], "1");
    assert_eq!(third.kind(), "rate_limited");
}

#[derive(Clone, Debug)]
enum LineOp {
    Call,
    Drop(usize),
    Advance(u64),
}

fn line_op() -> impl Strategy<Value = LineOp> {
    prop_oneof![
        5 => Just(LineOp::Call),
        1 => (0usize..64).prop_map(LineOp::Drop),
        3 => (0u64..40).prop_map(LineOp::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random calls, drops and time against a wait-mode limiter, time
    /// moving a millisecond at a time and every live call polled after each
    /// step: no call is answered later than `max_wait` after it was made
    /// (and none is left waiting), the calls admitted are admitted in the
    /// order they were made, their times keep GCRA's bound, and once all is
    /// done no line is left behind.
    #[test]
    fn wait_mode_line_model(
        per_second in prop_oneof![Just(5u32), Just(10), Just(20), Just(25), Just(40), Just(50)],
        burst in 1u32..4,
        max_wait_ms in 1u64..400,
        ops in proptest::collection::vec(line_op(), 1..60),
    ) {
        use futures_util::FutureExt;
        use std::future::Future;
        use std::pin::Pin;
        use tokio::task::unconstrained;
        type Fut = Pin<Box<dyn Future<Output = Result<u32, BoxError>>>>;
        struct Call {
            fut: Option<Fut>,
            made: Duration,
            done: Option<(Duration, bool)>,
        }
        fn poll_all(calls: &mut [Call], now: Duration, admitted: &mut Vec<(usize, Duration)>) {
            for (id, c) in calls.iter_mut().enumerate() {
                let Some(fut) = c.fut.as_mut() else { continue };
                if let Some(out) = unconstrained(fut).now_or_never() {
                    c.fut = None;
                    c.done = Some((now, out.is_ok()));
                    if out.is_ok() {
                        admitted.push((id, now));
                    }
                }
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let max_wait = Duration::from_millis(max_wait_ms);
            let interval = Duration::from_millis(1000 / u64::from(per_second));
            let layer = RateLimitLayer::per_second(per_second)
                .burst(burst)
                .max_wait(max_wait);
            let mut svc = tower::Layer::layer(&layer, echo());
            let start = Instant::now();
            let mut calls: Vec<Call> = Vec::new();
            let mut admitted = Vec::new();
            let step = Duration::from_millis(1);
            for op in ops {
                match op {
                    LineOp::Call => {
                        let id = u32::try_from(calls.len()).unwrap();
                        calls.push(Call {
                            fut: Some(Box::pin(svc.call(id))),
                            made: start.elapsed(),
                            done: None,
                        });
                    }
                    LineOp::Drop(i) => {
                        if !calls.is_empty() {
                            let n = calls.len();
                            calls[i % n].fut = None;
                        }
                    }
                    LineOp::Advance(ms) => {
                        // The last step's calls are polled after the next
                        // op: a call made then comes at the instant a
                        // permit is due, before the waiters see it.
                        for k in 0..ms {
                            tokio::time::advance(step).await;
                            if k + 1 < ms {
                                poll_all(&mut calls, start.elapsed(), &mut admitted);
                            }
                        }
                        continue;
                    }
                }
                poll_all(&mut calls, start.elapsed(), &mut admitted);
            }
            // Let every call end.
            for _ in 0..=max_wait_ms {
                tokio::time::advance(step).await;
                poll_all(&mut calls, start.elapsed(), &mut admitted);
            }
            for (id, c) in calls.iter().enumerate() {
                assert!(c.fut.is_none(), "call {id} still waits past max_wait");
                if let Some((at, _)) = c.done {
                    assert!(at - c.made <= max_wait, "call {id} answered {:?} after it was made", at - c.made);
                }
            }
            // Admitted in the order made.
            for w in admitted.windows(2) {
                assert!(w[0].0 < w[1].0, "call {} admitted before call {}", w[0].0, w[1].0);
            }
            // GCRA: a permit each interval, at most `burst` at once.
            let tolerance = interval * (burst - 1);
            let mut tat = Duration::ZERO;
            for &(id, at) in &admitted {
                assert!(tat.saturating_sub(at) <= tolerance, "call {id} admitted too soon at {at:?}");
                tat = tat.max(at) + interval;
            }
            // No line is left: after the bucket refills, `burst` calls pass at once.
            tokio::time::advance(interval * burst).await;
            for i in 0..burst {
                let out = unconstrained(svc.call(10_000 + i)).now_or_never();
                assert!(matches!(out, Some(Ok(_))), "a line was left behind");
            }
        });
    }
}
