//! The tonic story: a gRPC unary call through `defer`, answered with the
//! job id in the response metadata.

use super::{BrokenQueue, failing, open_breaker};
use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use tower::Layer;
use tower_firebreak::defer::{DeferLayer, JOB_ID_HEADER, Replayer};
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::queue::{JobId, JobStatus, Queue};

/// A codec of raw message bytes, so the test needs no generated code; a
/// real client uses its prost codec the same way.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn call(message: &'static [u8], key: &str) -> tonic::Request<Bytes> {
    let mut req = tonic::Request::new(Bytes::from_static(message));
    req.metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    req
}

const CREATE: &str = "/shop.Orders/Create";

#[tokio::test(start_paused = true)]
async fn a_grpc_unary_call_is_deferred_with_the_job_id_in_metadata() {
    let queue = MemoryQueue::new();
    let svc =
        DeferLayer::new(queue.clone()).layer(failing(Arc::new(AtomicUsize::new(0)), open_breaker));
    let mut client = tonic::client::Grpc::new(svc);

    client.ready().await.unwrap();
    let res = client
        .unary(
            call(b"\x08\x2a", "grpc-1"),
            PathAndQuery::from_static(CREATE),
            Raw,
        )
        .await
        .expect("a deferred call is a successful call");
    let id: JobId = res
        .metadata()
        .get(JOB_ID_HEADER.as_str())
        .expect("the job id in the response metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(res.into_inner(), Bytes::new(), "an empty (default) message");

    // The call is stored as it was sent: path, gRPC framing, metadata.
    assert_eq!(queue.status(&id).await.unwrap(), Some(JobStatus::Queued));
    let leased = queue.lease(1, Duration::from_secs(30)).await.unwrap();
    let job = &leased[0].job;
    assert_eq!(job.uri().path(), CREATE);
    assert_eq!(job.headers()["content-type"], "application/grpc");
    assert_eq!(
        job.body(),
        &Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x2a])
    );
    assert_eq!(job.idempotency_key(), Some("grpc-1"));
    queue.nack(&leased[0].lease, Duration::ZERO).await.unwrap();

    // The same key again: the same job id.
    client.ready().await.unwrap();
    let again = client
        .unary(
            call(b"\x08\x2a", "grpc-1"),
            PathAndQuery::from_static(CREATE),
            Raw,
        )
        .await
        .unwrap();
    assert_eq!(
        again.metadata().get(JOB_ID_HEADER.as_str()).unwrap(),
        id.to_string().as_str()
    );

    // The same key for a different message: ALREADY_EXISTS.
    client.ready().await.unwrap();
    let err = client
        .unary(
            call(b"\x08\x2b", "grpc-1"),
            PathAndQuery::from_static(CREATE),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // The replayer sends the stored call as it is.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let server = tower::service_fn(move |req: http::Request<http_body_util::Full<Bytes>>| {
        let seen = seen2.clone();
        async move {
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            seen.lock()
                .unwrap()
                .push((parts.uri.path().to_owned(), body));
            let mut res = http::Response::new(http_body_util::Full::new(Bytes::new()));
            res.headers_mut()
                .insert("grpc-status", "0".parse().unwrap());
            Ok::<_, tower_firebreak::BoxError>(res)
        }
    });
    let replayer = Replayer::new(queue.clone(), server).spawn();
    while !matches!(
        queue.status(&id).await.unwrap(),
        Some(JobStatus::Delivered { .. })
    ) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replayer.shutdown().await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(
            CREATE.to_owned(),
            Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x2a])
        )]
    );
}

#[tokio::test(start_paused = true)]
async fn a_grpc_call_the_queue_cannot_take_is_unavailable() {
    let svc =
        DeferLayer::new(BrokenQueue).layer(failing(Arc::new(AtomicUsize::new(0)), open_breaker));
    let mut client = tonic::client::Grpc::new(svc);
    client.ready().await.unwrap();
    let err = client
        .unary(
            call(b"\x08\x01", "grpc-2"),
            PathAndQuery::from_static(CREATE),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("not accepted"), "{}", err.message());
    assert!(err.metadata().get(JOB_ID_HEADER.as_str()).is_none());
}

/// A repeat of a call whose job was dead-lettered is `ABORTED` with the
/// reason: an OK would read as success to a gRPC caller, who cannot see
/// the JSON status that says otherwise.
#[tokio::test(start_paused = true)]
async fn a_repeat_of_a_dead_lettered_grpc_call_is_aborted() {
    let queue = MemoryQueue::new();
    let svc =
        DeferLayer::new(queue.clone()).layer(failing(Arc::new(AtomicUsize::new(0)), open_breaker));
    let mut client = tonic::client::Grpc::new(svc);
    client.ready().await.unwrap();
    client
        .unary(
            call(b"\x08\x07", "grpc-3"),
            PathAndQuery::from_static(CREATE),
            Raw,
        )
        .await
        .unwrap();
    let leased = queue.lease(1, Duration::from_secs(30)).await.unwrap();
    queue
        .dead_letter(&leased[0].lease, "the dependency refused it")
        .await
        .unwrap();

    client.ready().await.unwrap();
    let err = client
        .unary(
            call(b"\x08\x07", "grpc-3"),
            PathAndQuery::from_static(CREATE),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        err.message().contains("the dependency refused it"),
        "{}",
        err.message()
    );
    assert_eq!(
        err.metadata().get(JOB_ID_HEADER.as_str()).unwrap(),
        leased[0].lease.id().to_string().as_str()
    );
}
