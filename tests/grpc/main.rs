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
