//! Our rejections as gRPC statuses.

use std::time::Duration;
use tower::{Layer, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::BulkheadFull;
use tower_firebreak::circuit_breaker::CircuitOpen;
use tower_firebreak::deadline::DeadlineExceeded;
use tower_firebreak::grpc::{GrpcRejectionLayer, PUSHBACK_HEADER, error_response};
use tower_firebreak::rate_limit::RateLimited;

type Case = (fn() -> BoxError, &'static str, Option<&'static str>);

const CASES: [Case; 4] = [
    (
        || CircuitOpen::new(Duration::from_millis(1500)).into(),
        "14",
        Some("1500"),
    ),
    (
        || RateLimited::new(Duration::from_millis(40)).into(),
        "8",
        Some("40"),
    ),
    (|| BulkheadFull::new(2).into(), "8", None),
    (|| DeadlineExceeded::new().into(), "4", None),
];

#[test]
fn trailers_only_responses_carry_code_message_and_pushback() {
    for (err, code, pushback) in CASES {
        let e = err();
        let res = error_response(&*e);
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], code, "{e}");
        assert_eq!(
            res.headers()
                .get(PUSHBACK_HEADER)
                .map(|v| v.to_str().unwrap()),
            pushback
        );
        assert!(!res.headers()["grpc-message"].is_empty());
    }
    let other: BoxError = std::io::Error::other("secret détail 100%").into();
    let res = error_response(&*other);
    assert_eq!(res.headers()["grpc-status"], "2");
    assert_eq!(res.headers()["grpc-message"], "internal error");
}

#[tokio::test]
async fn the_server_layer_answers_a_rejection_instead_of_failing() {
    let svc = GrpcRejectionLayer::new().layer(service_fn(|_: ()| async {
        Err::<http::Response<http_body_util::Full<bytes::Bytes>>, BoxError>(
            CircuitOpen::new(Duration::from_secs(2)).into(),
        )
    }));
    let res = svc.oneshot(()).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(res.headers()[PUSHBACK_HEADER], "2000");
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn to_status_maps_codes_and_pushback_metadata() {
    use tower_firebreak::grpc::{StatusLayer, to_status};
    for (err, code, pushback) in CASES {
        let status = to_status(&*err());
        assert_eq!((status.code() as i32).to_string(), code);
        assert_eq!(
            status
                .metadata()
                .get(PUSHBACK_HEADER)
                .map(|v| v.to_str().unwrap()),
            pushback
        );
    }
    // A Status from the transport passes through as it is.
    let upstream: BoxError = Box::new(tonic::Status::not_found("no such user"));
    assert_eq!(to_status(&*upstream).code(), tonic::Code::NotFound);
    // The Channel's own grpc-timeout ran out: the call missed its deadline.
    let expired: BoxError = Box::new(tonic::TimeoutExpired(()));
    assert_eq!(to_status(&*expired).code(), tonic::Code::DeadlineExceeded);

    // The layer hands tonic a Status it recognises.
    let svc = StatusLayer::new().layer(service_fn(|_: ()| async {
        Err::<(), BoxError>(RateLimited::new(Duration::from_millis(5)).into())
    }));
    let err = svc.oneshot(()).await.unwrap_err();
    let status = tonic::Status::from_error(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(status.metadata().get(PUSHBACK_HEADER).unwrap(), "5");
}

/// The status `StatusLayer` makes of our rejection keeps the rejection as
/// its source, so `find` and `Rejection::of` still see it (a breaker or a
/// retry outside the layer must not count an open breaker as the
/// dependency's failure).
#[tokio::test]
async fn the_status_keeps_our_rejection_in_its_source_chain() {
    use tower_firebreak::error::{Rejection, RejectionKind, find};
    use tower_firebreak::grpc::StatusLayer;
    let svc = StatusLayer::new().layer(service_fn(|_: ()| async {
        Err::<(), BoxError>(CircuitOpen::new(Duration::from_secs(2)).into())
    }));
    let err = svc.oneshot(()).await.unwrap_err();
    let status = find::<tonic::Status>(&*err).expect("a tonic::Status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        find::<CircuitOpen>(&*err).is_some(),
        "the rejection is gone: {err:?}"
    );
    assert_eq!(
        Rejection::of(&*err).map(|r| r.kind()),
        Some(RejectionKind::CircuitOpen)
    );
}

/// tonic's `Channel` enforces the `grpc-timeout` that `PropagateDeadline`
/// writes, at the instant the caller's deadline passes; when its timer
/// fires first, the call fails with tonic's `TimeoutExpired`. That is the
/// caller's deadline, not the dependency's failure: `PropagateDeadline`
/// makes it `DeadlineExceeded`, which a breaker ignores. An attempt timeout
/// of the channel's own (`Endpoint::timeout`), with time left in the call,
/// stays tonic's error, a failure.
#[tokio::test(start_paused = true)]
async fn tonics_timeout_at_the_callers_deadline_is_deadline_exceeded() {
    use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State};
    use tower_firebreak::deadline::{DeadlineLayer, PropagateDeadlineLayer};
    let channel = service_fn(|req: http::Request<()>| async move {
        // The channel's timer: the propagated grpc-timeout, or 50 ms.
        let left = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| tower_firebreak::deadline::parse_grpc_timeout(v.to_str().unwrap()))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        tokio::time::sleep(left).await;
        Err::<http::Response<()>, BoxError>(tonic::TimeoutExpired(()).into())
    });
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .build()
        .unwrap();
    let h = breaker.handle();
    let grpc = || {
        http::Request::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
    };

    let svc = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_millis(20)))
        .layer(breaker.clone())
        .layer(PropagateDeadlineLayer::new())
        .service(channel);
    let err = svc.oneshot(grpc()).await.unwrap_err();
    assert!(find_deadline(&err), "{err:?}");
    assert_eq!(
        h.state(),
        State::Closed,
        "the caller's deadline opened the breaker"
    );
    // tonic's own error is kept as the source: a generated client (no
    // `StatusLayer`) still gets the code tonic gives it, not UNKNOWN.
    assert_eq!(
        tonic::Status::from_error(err).code(),
        tonic::Code::Cancelled
    );

    // The channel's own 50 ms timeout, with 950 ms left: a failure.
    let svc = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(breaker)
        .layer(PropagateDeadlineLayer::new())
        .service(channel);
    let err = svc.oneshot(grpc()).await.unwrap_err();
    assert!(!find_deadline(&err), "{err:?}");
    assert_eq!(h.state(), State::Open);
}

fn find_deadline(err: &BoxError) -> bool {
    tower_firebreak::error::find::<DeadlineExceeded>(&**err).is_some()
}

/// The pushback rounds up to whole milliseconds, as `Retry-After` rounds up
/// to whole seconds: a limiter's next permit 0.4 ms away is "1", not "0"
/// ("retry now"), and an absurd wait does not wrap.
#[test]
fn pushback_rounds_up_and_saturates() {
    for (wait, want) in [
        (Duration::from_micros(400), "1"),
        (Duration::from_micros(1500), "2"),
        (Duration::from_millis(40), "40"),
        (Duration::MAX, "18446744073709551615"),
    ] {
        let res = error_response(&*BoxError::from(RateLimited::new(wait)));
        assert_eq!(res.headers()[PUSHBACK_HEADER], want, "{wait:?}");
    }
}
