//! Retries never sleep past the call's deadline.

use crate::support::{Script, Step, ms};
use bytes::Bytes;
use http_body_util::Full;
use std::time::Duration;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_firebreak::deadline::{DeadlineExceeded, DeadlineLayer};
use tower_firebreak::error;
use tower_firebreak::retry::{RetryLayer, RetryPolicy};

type Req = http::Request<Full<Bytes>>;

fn req() -> Req {
    http::Request::new(Full::new(Bytes::from_static(b"hi")))
}

#[tokio::test(start_paused = true)]
async fn a_one_second_deadline_stops_retries_that_hang_at_one_second() {
    // Each attempt takes 600 ms and fails: the second attempt is cut by the
    // deadline at exactly 1 s.
    let script = Script::<u32>::new([]).then_always(ms(600), Step::Err("slow failure"));
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(RetryLayer::new(
            RetryPolicy::fixed(ms(100)).max_attempts(10).no_jitter(),
        ))
        .service(script.service::<Req>());
    let t0 = Instant::now();
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert!(error::find::<DeadlineExceeded>(&*err).is_some(), "{err}");
    assert_eq!(script.attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_could_not_start_in_time_returns_the_last_error_early() {
    // Attempts take 400 ms: the second ends at 900 ms, and a third could only
    // start at 1,000 ms, the deadline. The caller gets the real error at 900 ms.
    let script = Script::<u32>::new([]).then_always(ms(400), Step::Err("upstream 503"));
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(RetryLayer::new(
            RetryPolicy::fixed(ms(100)).max_attempts(10).no_jitter(),
        ))
        .service(script.service::<Req>());
    let t0 = Instant::now();
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(t0.elapsed(), ms(900));
    assert_eq!(err.to_string(), "upstream 503");
    assert_eq!(script.attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_longer_than_the_time_left_is_not_waited_for() {
    let script = Script::<http::Response<()>>::new([]).then_always(
        ms(10),
        Step::Ok(
            http::Response::builder()
                .status(503)
                .header("retry-after", "5")
                .body(())
                .unwrap(),
        ),
    );
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(2)))
        .layer(RetryLayer::new(
            RetryPolicy::fixed(ms(100))
                .max_attempts(10)
                .max_delay(Duration::from_secs(30))
                .http(),
        ))
        .service(script.service::<Req>());
    let t0 = Instant::now();
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(t0.elapsed(), ms(10));
    assert_eq!(script.attempts(), 1);
}
