//! The queue conformance suite, written once over [`Queue`].
//!
//! Each check takes a maker that builds a fresh, empty queue with the given
//! [`Settings`]. Waits go through `tokio::time::sleep`, so a backend whose
//! clock follows `tokio::time` runs the suite under paused time (instantly),
//! and a broker backend runs it in real time, scaled by [`Settings::unit`].

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use std::future::Future;
use std::time::Duration;
use tower_firebreak::queue::{
    DeliveredResponse, Enqueued, Job, JobId, JobStatus, Queue, QueueError,
};

/// How a check wants its queue configured.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) capacity: usize,
    pub(crate) max_attempts: u32,
    pub(crate) retention: Duration,
    pub(crate) dead_letter_retention: Option<Duration>,
    /// The time unit of every wait; a backend with a coarse clock raises it.
    pub(crate) unit: Duration,
}

impl Settings {
    pub(crate) fn new(unit: Duration) -> Settings {
        Settings {
            capacity: 1_000,
            max_attempts: 10,
            retention: Duration::from_secs(3600),
            dead_letter_retention: None,
            unit,
        }
    }
}

/// A queue and whatever must live as long as it (a temp dir, a broker
/// namespace).
pub(crate) struct Fixture<Q> {
    pub(crate) queue: Q,
    pub(crate) _keep: Box<dyn Send + Sync>,
}

pub(crate) trait Maker<Q>: Fn(Settings) -> Self::Fut {
    type Fut: Future<Output = Fixture<Q>>;
}

impl<Q, F, Fut> Maker<Q> for F
where
    F: Fn(Settings) -> Fut,
    Fut: Future<Output = Fixture<Q>>,
{
    type Fut = Fut;
}

fn job(path: &str, body: &'static str) -> Job {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("text/plain"));
    headers.append("x-multi", HeaderValue::from_static("a"));
    headers.append("x-multi", HeaderValue::from_static("b"));
    Job::new(Method::POST, path.parse().unwrap())
        .with_headers(headers)
        .with_body(Bytes::from_static(body.as_bytes()))
}

fn response(status: u16, body: &'static str) -> DeliveredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("x-result", HeaderValue::from_static("yes"));
    DeliveredResponse {
        status,
        headers,
        body: Bytes::from_static(body.as_bytes()),
    }
}

async fn wait(u: Duration, units: u32) {
    tokio::time::sleep(u * units).await;
}

pub(crate) async fn enqueue_lease_ack<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let id = q
        .enqueue(job("/orders?x=1", "order-1").with_idempotency_key("k1"))
        .await
        .unwrap();
    assert_eq!(q.status(&id).await.unwrap(), Some(JobStatus::Queued));

    let leased = q.lease(10, s.unit * 50).await.unwrap();
    assert_eq!(leased.len(), 1);
    let l = &leased[0];
    assert_eq!(l.lease.id(), &id);
    assert_eq!(l.job.body().as_ref(), b"order-1");
    assert_eq!(l.job.method(), Method::POST);
    assert_eq!(l.job.uri(), "/orders?x=1");
    assert_eq!(l.job.idempotency_key(), Some("k1"));
    let multi: Vec<_> = l.job.headers().get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    assert_eq!(l.job.attempts(), 1);
    assert_eq!(q.status(&id).await.unwrap(), Some(JobStatus::InFlight));
    assert!(
        q.lease(10, s.unit * 50).await.unwrap().is_empty(),
        "leased twice"
    );

    q.ack(&l.lease, response(201, "created")).await.unwrap();
    match q.status(&id).await.unwrap() {
        Some(JobStatus::Delivered {
            status,
            body,
            headers,
            attempts,
            ..
        }) => {
            assert_eq!(status, 201);
            assert_eq!(body.as_ref(), b"created");
            assert_eq!(headers["x-result"], "yes");
            assert_eq!(attempts, 1);
        }
        other => panic!("expected Delivered, got {other:?}"),
    }
    assert!(
        q.lease(10, s.unit * 50).await.unwrap().is_empty(),
        "delivered job leased again"
    );
    assert_eq!(q.depth().await.unwrap(), 0);
    let err = q.ack(&l.lease, response(200, "again")).await.unwrap_err();
    assert!(matches!(err, QueueError::LeaseLost { .. }), "{err}");
}

pub(crate) async fn lease_respects_max_and_order<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(q.enqueue(job(&format!("/j/{i}"), "x")).await.unwrap());
        wait(s.unit, 1).await;
    }
    let first = q.lease(2, s.unit * 50).await.unwrap();
    let got: Vec<JobId> = first.iter().map(|l| *l.lease.id()).collect();
    assert_eq!(got, ids[..2], "oldest first");
    let rest = q.lease(10, s.unit * 50).await.unwrap();
    let got: Vec<JobId> = rest.iter().map(|l| *l.lease.id()).collect();
    assert_eq!(got, ids[2..]);
    assert_eq!(q.depth().await.unwrap(), 5, "in-flight jobs count in depth");
}

pub(crate) async fn nack_delays_redelivery<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let id = q.enqueue(job("/n", "n")).await.unwrap();
    let l = q.lease(1, s.unit * 50).await.unwrap().remove(0);
    q.nack(&l.lease, s.unit * 5).await.unwrap();
    assert_eq!(q.status(&id).await.unwrap(), Some(JobStatus::Queued));
    assert!(
        q.lease(1, s.unit * 50).await.unwrap().is_empty(),
        "visible before its delay"
    );
    wait(s.unit, 3).await;
    assert!(
        q.lease(1, s.unit * 50).await.unwrap().is_empty(),
        "visible before its delay"
    );
    wait(s.unit, 3).await;
    let again = q.lease(1, s.unit * 50).await.unwrap();
    assert_eq!(again.len(), 1, "not visible after its delay");
    assert_eq!(again[0].lease.id(), &id);
    assert_eq!(again[0].job.attempts(), 2);
    let err = q.nack(&l.lease, Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, QueueError::LeaseLost { .. }), "{err}");
}

pub(crate) async fn expired_lease_returns_job<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let id = q.enqueue(job("/e", "e")).await.unwrap();
    let first = q.lease(1, s.unit * 2).await.unwrap().remove(0);
    assert!(q.lease(1, s.unit * 2).await.unwrap().is_empty());
    wait(s.unit, 3).await;
    let second = q.lease(1, s.unit * 20).await.unwrap();
    assert_eq!(second.len(), 1, "an expired lease did not return the job");
    let second = &second[0];
    assert_eq!(second.lease.id(), &id);
    assert_eq!(second.job.attempts(), 2);
    assert_ne!(second.lease, first.lease);

    // The first holder comes back late: every settle on its lease is refused.
    for err in [
        q.ack(&first.lease, response(200, "late"))
            .await
            .unwrap_err(),
        q.nack(&first.lease, Duration::ZERO).await.unwrap_err(),
        q.dead_letter(&first.lease, "late").await.unwrap_err(),
    ] {
        assert!(
            matches!(err, QueueError::LeaseLost { id: lost } if lost == id),
            "{err}"
        );
    }
    assert_eq!(q.status(&id).await.unwrap(), Some(JobStatus::InFlight));
    q.ack(&second.lease, response(200, "ok")).await.unwrap();
    assert!(matches!(
        q.status(&id).await.unwrap(),
        Some(JobStatus::Delivered { status: 200, .. })
    ));
}

pub(crate) async fn dead_letter_after_max_attempts<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings {
        max_attempts: 2,
        ..Settings::new(unit)
    };
    let q = make(s).await.queue;
    let id = q.enqueue(job("/m", "m")).await.unwrap();
    for attempt in 1..=2 {
        let l = q.lease(1, s.unit * 50).await.unwrap();
        assert_eq!(l.len(), 1, "attempt {attempt} not leased");
        assert_eq!(l[0].job.attempts(), attempt);
        q.nack(&l[0].lease, Duration::ZERO).await.unwrap();
    }
    assert!(
        q.lease(1, s.unit * 50).await.unwrap().is_empty(),
        "leased past max_attempts"
    );
    match q.status(&id).await.unwrap() {
        Some(JobStatus::DeadLettered {
            reason, attempts, ..
        }) => {
            assert!(reason.contains("max attempts"), "{reason}");
            assert_eq!(attempts, 2);
        }
        other => panic!("expected DeadLettered, got {other:?}"),
    }
    assert_eq!(q.depth().await.unwrap(), 0);
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].job.body().as_ref(), b"m");
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);

    // Redrive: back in the queue with fresh attempts.
    assert!(q.redrive(&id).await.unwrap());
    assert!(!q.redrive(&id).await.unwrap(), "redriven twice");
    assert_eq!(q.status(&id).await.unwrap(), Some(JobStatus::Queued));
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    let l = q.lease(1, s.unit * 50).await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].job.attempts(), 1);
}

pub(crate) async fn dead_letter_when_lease_expires_past_max_attempts<Q: Queue>(
    unit: Duration,
    make: impl Maker<Q>,
) {
    let s = Settings {
        max_attempts: 1,
        ..Settings::new(unit)
    };
    let q = make(s).await.queue;
    let id = q.enqueue(job("/x", "x")).await.unwrap();
    assert_eq!(q.lease(1, s.unit * 2).await.unwrap().len(), 1);
    wait(s.unit, 3).await;
    assert!(q.lease(1, s.unit * 2).await.unwrap().is_empty());
    assert!(matches!(
        q.status(&id).await.unwrap(),
        Some(JobStatus::DeadLettered { .. })
    ));
}

pub(crate) async fn dead_letter_after_ttl<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let expiring = q
        .enqueue(job("/t", "t").with_ttl(s.unit * 3))
        .await
        .unwrap();
    let lasting = q
        .enqueue(job("/t2", "t2").with_ttl(s.unit * 100))
        .await
        .unwrap();
    wait(s.unit, 4).await;
    let leased = q.lease(10, s.unit * 50).await.unwrap();
    let ids: Vec<JobId> = leased.iter().map(|l| *l.lease.id()).collect();
    assert_eq!(ids, [lasting], "a job past its TTL was leased");
    match q.status(&expiring).await.unwrap() {
        Some(JobStatus::DeadLettered { reason, .. }) => assert!(reason.contains("ttl"), "{reason}"),
        other => panic!("expected DeadLettered, got {other:?}"),
    }
}

pub(crate) async fn explicit_dead_letter<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let id = q.enqueue(job("/d", "d")).await.unwrap();
    let l = q.lease(1, s.unit * 50).await.unwrap().remove(0);
    q.dead_letter(&l.lease, "downstream said 400")
        .await
        .unwrap();
    match q.status(&id).await.unwrap() {
        Some(JobStatus::DeadLettered {
            reason, attempts, ..
        }) => {
            assert_eq!(reason, "downstream said 400");
            assert_eq!(attempts, 1);
        }
        other => panic!("expected DeadLettered, got {other:?}"),
    }
    assert!(q.lease(1, s.unit * 50).await.unwrap().is_empty());
    let err = q.ack(&l.lease, response(200, "")).await.unwrap_err();
    assert!(matches!(err, QueueError::LeaseLost { .. }), "{err}");
}

/// `dead_letters(limit)` is the `limit` lowest ids, whatever order the jobs
/// died in (here the reverse of id order), and a redrive takes one out.
pub(crate) async fn dead_letters_are_a_page_in_id_order<Q: Queue>(
    unit: Duration,
    make: impl Maker<Q>,
) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(q.enqueue(job(&format!("/p{i}"), "p")).await.unwrap());
    }
    let mut leased = q.lease(5, s.unit * 50).await.unwrap();
    assert_eq!(leased.len(), 5);
    leased.sort_by_key(|l| std::cmp::Reverse(*l.lease.id()));
    for l in &leased {
        q.dead_letter(&l.lease, "by hand").await.unwrap();
    }
    let page = async |n| -> Vec<JobId> {
        q.dead_letters(n)
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect()
    };
    assert_eq!(page(2).await, ids[..2]);
    assert_eq!(page(10).await, ids);
    assert!(page(0).await.is_empty());
    assert!(q.redrive(&ids[0]).await.unwrap());
    assert_eq!(page(2).await, ids[1..3]);
}

pub(crate) async fn idempotency_keys<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let first = q
        .submit(job("/i", "body").with_idempotency_key("key-1"))
        .await
        .unwrap();
    let Enqueued::Created(id) = first else {
        panic!("first submit: {first:?}")
    };
    // Headers may differ between two sends of one request.
    let again = job("/i", "body")
        .with_headers(HeaderMap::new())
        .with_idempotency_key("key-1");
    assert_eq!(q.submit(again).await.unwrap(), Enqueued::Existing(id));
    assert_eq!(
        q.enqueue(job("/i", "body").with_idempotency_key("key-1"))
            .await
            .unwrap(),
        id
    );
    assert_eq!(q.depth().await.unwrap(), 1, "a duplicate was stored");

    for conflicting in [
        job("/i", "other body"),
        job("/other", "body"),
        Job::new(Method::PUT, "/i".parse().unwrap()).with_body("body"),
    ] {
        match q.submit(conflicting.with_idempotency_key("key-1")).await {
            Err(QueueError::Conflict { key, existing }) => {
                assert_eq!(key, "key-1");
                assert_eq!(existing, id);
            }
            other => panic!("expected Conflict, got {other:?}"),
        }
    }
    assert_eq!(q.depth().await.unwrap(), 1);

    // The key is still held once the job is delivered.
    let l = q.lease(10, s.unit * 50).await.unwrap().remove(0);
    q.ack(&l.lease, response(200, "done")).await.unwrap();
    assert_eq!(
        q.submit(job("/i", "body").with_idempotency_key("key-1"))
            .await
            .unwrap(),
        Enqueued::Existing(id)
    );
    // Another key is another job.
    let other = q
        .enqueue(job("/i", "body").with_idempotency_key("key-2"))
        .await
        .unwrap();
    assert_ne!(other, id);
}

pub(crate) async fn retention_purges_delivered<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings {
        retention: unit * 10,
        ..Settings::new(unit)
    };
    let q = make(s).await.queue;
    let id = q
        .enqueue(job("/r", "r").with_idempotency_key("rk"))
        .await
        .unwrap();
    let l = q.lease(1, s.unit * 50).await.unwrap().remove(0);
    q.ack(&l.lease, response(200, "kept")).await.unwrap();
    wait(s.unit, 5).await;
    let _ = q.lease(1, s.unit).await.unwrap();
    assert!(
        matches!(
            q.status(&id).await.unwrap(),
            Some(JobStatus::Delivered { .. })
        ),
        "purged before its retention"
    );
    wait(s.unit, 6).await;
    // Purging rides on the replayer's lease calls.
    let _ = q.lease(1, s.unit).await.unwrap();
    assert_eq!(
        q.status(&id).await.unwrap(),
        None,
        "kept past its retention"
    );
    let again = q
        .submit(job("/r", "r").with_idempotency_key("rk"))
        .await
        .unwrap();
    assert!(
        matches!(again, Enqueued::Created(new) if new != id),
        "{again:?}"
    );
}

pub(crate) async fn dead_letter_retention_purges<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings {
        dead_letter_retention: Some(unit * 10),
        ..Settings::new(unit)
    };
    let q = make(s).await.queue;
    let gone = q
        .enqueue(job("/g", "g").with_idempotency_key("gone"))
        .await
        .unwrap();
    let back = q
        .enqueue(job("/b", "b").with_idempotency_key("back"))
        .await
        .unwrap();
    for l in q.lease(2, s.unit * 100).await.unwrap() {
        q.dead_letter(&l.lease, "bad").await.unwrap();
    }
    // One is redriven and delivered before its dead letter would expire:
    // it must then keep its delivered status for the full `retention`.
    assert!(q.redrive(&back).await.unwrap());
    let l = q.lease(1, s.unit * 100).await.unwrap().remove(0);
    q.ack(&l.lease, response(200, "ok")).await.unwrap();
    wait(s.unit, 5).await;
    let _ = q.lease(1, s.unit).await.unwrap();
    assert!(
        matches!(
            q.status(&gone).await.unwrap(),
            Some(JobStatus::DeadLettered { .. })
        ),
        "purged before its retention"
    );
    wait(s.unit, 6).await;
    let _ = q.lease(1, s.unit).await.unwrap();
    assert_eq!(
        q.status(&gone).await.unwrap(),
        None,
        "kept past its retention"
    );
    assert!(q.dead_letters(10).await.unwrap().is_empty());
    assert!(
        matches!(
            q.status(&back).await.unwrap(),
            Some(JobStatus::Delivered { status: 200, .. })
        ),
        "a redriven job was purged with its old dead letter"
    );
    let again = q
        .submit(job("/g", "g").with_idempotency_key("gone"))
        .await
        .unwrap();
    assert!(
        matches!(again, Enqueued::Created(new) if new != gone),
        "{again:?}"
    );
}

pub(crate) async fn capacity_is_enforced<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings {
        capacity: 3,
        ..Settings::new(unit)
    };
    let q = make(s).await.queue;
    for i in 0..3 {
        q.enqueue(job(&format!("/c/{i}"), "c")).await.unwrap();
    }
    let err = q.enqueue(job("/c/3", "c")).await.unwrap_err();
    assert!(matches!(err, QueueError::Full { capacity: 3 }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(q.depth().await.unwrap(), 3);
    // In-flight jobs still count; a delivered one frees its slot.
    let l = q.lease(1, s.unit * 50).await.unwrap().remove(0);
    assert!(matches!(
        q.enqueue(job("/c/4", "c")).await,
        Err(QueueError::Full { .. })
    ));
    q.ack(&l.lease, response(200, "")).await.unwrap();
    q.enqueue(job("/c/5", "c")).await.unwrap();
    assert!(matches!(
        q.enqueue(job("/c/6", "c")).await,
        Err(QueueError::Full { .. })
    ));
    let all = q.lease(10, s.unit * 50).await.unwrap();
    assert_eq!(all.len(), 3, "a refused job was stored anyway");
}

pub(crate) async fn depth_and_oldest_age<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    assert_eq!(q.depth().await.unwrap(), 0);
    assert_eq!(q.oldest_age().await.unwrap(), None);
    q.enqueue(job("/a", "a")).await.unwrap();
    wait(s.unit, 5).await;
    q.enqueue(job("/b", "b")).await.unwrap();
    wait(s.unit, 1).await;
    assert_eq!(q.depth().await.unwrap(), 2);
    let age = q.oldest_age().await.unwrap().expect("an oldest job");
    assert!(age >= s.unit * 6 && age < s.unit * 9, "{age:?}");
    let l = q.lease(1, s.unit * 50).await.unwrap().remove(0);
    assert_eq!(l.job.uri(), "/a");
    q.ack(&l.lease, response(200, "")).await.unwrap();
    assert_eq!(q.depth().await.unwrap(), 1);
    let age = q.oldest_age().await.unwrap().expect("an oldest job");
    assert!(age >= s.unit && age < s.unit * 4, "{age:?}");
}

pub(crate) async fn unknown_id_has_no_status<Q: Queue>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    assert_eq!(q.status(&JobId::new()).await.unwrap(), None);
    assert!(!q.redrive(&JobId::new()).await.unwrap());
}

pub(crate) async fn concurrent_producers<Q: Queue + Clone>(unit: Duration, make: impl Maker<Q>) {
    let s = Settings::new(unit);
    let q = make(s).await.queue;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let q = q.clone();
            tokio::spawn(async move { q.enqueue(job(&format!("/p/{i}"), "p")).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 64);
    assert_eq!(q.depth().await.unwrap(), 64);
    let mut leased: Vec<JobId> = q
        .lease(100, s.unit * 50)
        .await
        .unwrap()
        .iter()
        .map(|l| *l.lease.id())
        .collect();
    leased.sort();
    assert_eq!(leased, ids);
}

/// Generates one `#[tokio::test]` per check for a backend.
///
/// `paused = true` runs the checks under paused tokio time; only a backend
/// whose clock is `tokio::time` can take it. `unit` is the time unit of
/// every wait (visibility timeouts, delays, TTLs are a few units): 100 ms
/// suits a real-time backend with millisecond timers; a broker with coarser
/// timers takes a larger one.
#[macro_export]
macro_rules! conformance {
    ($backend:ident, paused = $paused:literal, unit = $unit:expr, $make:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;

            $crate::conformance!(@tests $paused, $unit, $make;
                enqueue_lease_ack, lease_respects_max_and_order, nack_delays_redelivery,
                expired_lease_returns_job, dead_letter_after_max_attempts,
                dead_letter_when_lease_expires_past_max_attempts, dead_letter_after_ttl,
                explicit_dead_letter, dead_letters_are_a_page_in_id_order,
                idempotency_keys, retention_purges_delivered,
                dead_letter_retention_purges,
                capacity_is_enforced, depth_and_oldest_age, unknown_id_has_no_status,
                concurrent_producers);
        }
    };
    (@tests $paused:literal, $unit:expr, $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = $paused)]
            async fn $check() {
                $crate::suite::$check($unit, $make).await;
            }
        )*
    };
}
