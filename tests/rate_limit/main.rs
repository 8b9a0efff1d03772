//! The GCRA rate limiter, direct and keyed, reject and wait modes.

#[path = "../support/mod.rs"]
mod support;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use governor::clock::FakeRelativeClock;
use governor::{Quota, RateLimiter};
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
    // Two calls at the same instant: one gets the permit at 100 ms; the other
    // would need 200 ms, over max_wait, and is refused at 100 ms.
    let a = tokio::spawn(svc.clone().oneshot(1));
    let b = tokio::spawn(svc.clone().oneshot(2));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let (ok, err) = match (a, b) {
        (Ok(x), Err(e)) | (Err(e), Ok(x)) => (x, e),
        other => panic!("expected one success and one refusal, got {other:?}"),
    };
    assert!(ok == 1 || ok == 2);
    assert_eq!(
        error::find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_millis(100)
    );
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
