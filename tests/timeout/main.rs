//! The attempt timeout.

#[path = "../support/mod.rs"]
mod support;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use std::time::Duration;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_firebreak::ConfigError;
use tower_firebreak::error::{self, Rejection, RejectionKind};
use tower_firebreak::timeout::{Elapsed, TimeoutConfig, TimeoutLayer};

#[tokio::test(start_paused = true)]
async fn fires_at_exactly_the_configured_time() {
    let (svc, mut handle) = tower_test::mock::pair::<(), ()>();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(750)))
        .service(svc);
    handle.allow(1);
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(()));
    // The request reaches the inner service and is never answered.
    let (_req, _send) = handle.next_request().await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(750));
    let elapsed = error::find::<Elapsed>(&*err).expect("an Elapsed");
    assert_eq!(elapsed.timeout(), Duration::from_millis(750));
    assert_eq!(Rejection::of(&*err).unwrap().kind(), RejectionKind::Timeout);
}

#[tokio::test(start_paused = true)]
async fn an_answer_just_in_time_passes() {
    let (svc, mut handle) = tower_test::mock::pair::<(), &'static str>();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_millis(750)))
        .service(svc);
    handle.allow(1);
    let call = tokio::spawn(svc.oneshot(()));
    let (_req, send) = handle.next_request().await.unwrap();
    tokio::time::sleep(Duration::from_millis(749)).await;
    send.send_response("ok");
    assert_eq!(call.await.unwrap().unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_unchanged() {
    let (svc, mut handle) = tower_test::mock::pair::<(), ()>();
    let svc = tower::Layer::layer(&TimeoutLayer::new(Duration::from_secs(1)), svc);
    handle.allow(1);
    let call = tokio::spawn(svc.oneshot(()));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_error(std::io::Error::other("boom"));
    let err = call.await.unwrap().unwrap_err();
    assert!(error::find::<std::io::Error>(&*err).is_some());
    assert!(Rejection::of(&*err).is_none());
}

#[test]
fn config_rejects_zero_and_unknown_fields() {
    let err: ConfigError = TimeoutConfig {
        timeout: Duration::ZERO,
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(err.field(), "timeout");
    assert!(toml::from_str::<TimeoutConfig>("timout = \"1s\"").is_err());
    let cfg: TimeoutConfig = toml::from_str("").unwrap();
    assert_eq!(cfg, TimeoutConfig::default());
    assert_eq!(cfg.timeout, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn end_to_end_through_axum_answers_504() {
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .route("/fast", get(|| async { "fast" }))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(support::handle_error))
                .layer(TimeoutLayer::new(Duration::from_millis(200))),
        );
    let addr = support::serve(app).await;
    let client = support::client();
    let fast = support::get(&client, addr, "/fast").await;
    assert_eq!(fast.status, 200);
    assert_eq!(fast.body, "fast");
    let start = Instant::now();
    let slow = support::get(&client, addr, "/slow").await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.kind(), "timeout");
    assert!(start.elapsed() < Duration::from_secs(30));
}
