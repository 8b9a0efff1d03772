use crate::support::{
    Stall, fleet, key, outage, private_redis, stored_none_after_the_stop, unique,
};
use std::time::Duration;
use tower_firebreak::queue::redis::{RedisQueue, RedisQueueBuilder};
use tower_firebreak::queue::{DeliveredResponse, Job, Queue};

const SHARED: &str = "redis://127.0.0.1:6379";

async fn connect(url: &str, name: &str, op_timeout: Duration) -> RedisQueue {
    connect_with(url, name, |b| b.op_timeout(op_timeout)).await
}

/// A handle with an `op_timeout` of 5 s and then `settings` applied.
async fn connect_with(
    url: &str,
    name: &str,
    settings: impl FnOnce(RedisQueueBuilder) -> RedisQueueBuilder,
) -> RedisQueue {
    settings(
        RedisQueue::builder()
            .name(name)
            .op_timeout(Duration::from_secs(5)),
    )
    .connect(url)
    .await
    .unwrap_or_else(|e| {
        panic!("Redis at {url} is unreachable ({e}); start it (`bash .ci/test` starts it)")
    })
}

fn cleanup(name: &str) {
    let mut c = redis::Client::open(SHARED)
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("fb:{{{name}}}:*"))
        .query(&mut c)
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query(&mut c).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_two_shares_one_queue() {
    let name = unique("fleet");
    let a = connect(SHARED, &name, Duration::from_secs(5)).await;
    let b = connect(SHARED, &name, Duration::from_secs(5)).await;
    assert_ne!(a.consumer(), b.consumer());
    fleet(a, b).await;
    cleanup(&name);
}

/// A private `redis-server` on a spare port, with its AOF fsynced on every
/// write, in `dir`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_fast_and_delivers_every_202() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = private_redis(dir.path());
    let url = format!("redis://127.0.0.1:{}", broker.port);
    let q = connect(&url, "outage", Duration::from_millis(300)).await;
    outage(q, &mut broker, Duration::from_secs(1), 1).await;
}

/// Redis paused (SIGSTOP) rather than killed: the commands of the requests
/// that time out meanwhile sit in its socket and run when it resumes
/// (SIGCONT), long after their callers got 503. The submit script's
/// deadline makes each of them a no-op then: no request sent during the
/// stall and answered 503 is stored (its idempotency key is not in the
/// queue's index, so it was never stored, and it is never delivered).
/// Only a request whose script Redis ran just before it stopped may be
/// stored though answered 503 (the in-flight exception): at most one, as
/// the producer sends one at a time. Every 202, before and after the
/// stall, is delivered exactly once (checked by `outage`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_stores_none_of_its_503s() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = private_redis(dir.path());
    let url = format!("redis://127.0.0.1:{}", broker.port);
    let q = connect(&url, "stall", Duration::from_millis(300)).await;
    let log = outage(q, &mut Stall(&mut broker), Duration::from_secs(1), 1).await;

    // The idempotency index (key -> job) keeps every key stored within
    // `retention` (24 h), delivered or not.
    let mut c = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    stored_none_after_the_stop(&log, |i| {
        redis::cmd("HEXISTS")
            .arg("fb:{stall}:i")
            .arg(key(i))
            .query(&mut c)
            .unwrap()
    });
}

/// `Duration::MAX` for "keep responses for ever": the ack still settles
/// the job (Redis's `PEXPIRE` refuses so large a value, after the ack
/// script had already changed the job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_of_duration_max_keeps_the_response() {
    let name = unique("forever");
    let q = connect_with(SHARED, &name, |b| b.retention(Duration::MAX)).await;
    let id = q
        .enqueue(Job::new(http::Method::POST, "/x".parse().unwrap()))
        .await
        .unwrap();
    let leased = q.lease(1, Duration::from_secs(30)).await.unwrap();
    q.ack(&leased[0].lease, DeliveredResponse::default())
        .await
        .unwrap();
    assert!(matches!(
        q.status(&id).await.unwrap(),
        Some(tower_firebreak::queue::JobStatus::Delivered { .. })
    ));
    cleanup(&name);
}

// The cleanup of idle consumers of the stream's group.

fn consumers(name: &str) -> Vec<String> {
    let mut c = redis::Client::open(SHARED)
        .unwrap()
        .get_connection()
        .unwrap();
    let rows: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(format!("fb:{{{name}}}:s"))
        .arg("fb")
        .query(&mut c)
        .unwrap();
    let mut names: Vec<String> = rows
        .into_iter()
        .map(|row| {
            let fields: Vec<redis::Value> = redis::from_redis_value(row).unwrap();
            redis::from_redis_value(fields[1].clone()).unwrap()
        })
        .collect();
    names.sort();
    names
}

/// A gone handle's consumer is deleted by another handle's lease once it
/// has been idle for `idle_consumer_ttl` with nothing pending; one that
/// holds a lease is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_without_pending_entries_are_deleted() {
    let name = format!("idlegc-{}", uuid::Uuid::now_v7().simple());
    let job = || Job::new(http::Method::POST, "/c".parse().unwrap());
    let gone = connect_with(SHARED, &name, |b| b).await;
    let holder = connect_with(SHARED, &name, |b| b).await;
    let sweeper = connect_with(SHARED, &name, |b| {
        b.idle_consumer_ttl(Duration::from_millis(300))
    })
    .await;

    gone.enqueue(job()).await.unwrap();
    gone.enqueue(job()).await.unwrap();
    let l = gone
        .lease(1, Duration::from_secs(60))
        .await
        .unwrap()
        .remove(0);
    gone.ack(&l.lease, DeliveredResponse::default())
        .await
        .unwrap();
    // `holder` keeps a lease (a pending entry) while it is idle.
    let held = holder.lease(1, Duration::from_secs(60)).await.unwrap();
    assert_eq!(held.len(), 1);
    // The sweeper's lease call runs the cleanup; the queue has nothing left.
    let sweep = || async {
        let leased = sweeper.lease(1, Duration::from_secs(60)).await.unwrap();
        assert!(leased.is_empty(), "{leased:?}");
    };
    sweep().await;
    let (g, h) = (gone.consumer().to_owned(), holder.consumer().to_owned());
    let before = consumers(&name);
    assert!(
        before.contains(&g) && before.contains(&h),
        "deleted before they were idle: {before:?}"
    );

    drop(gone);
    tokio::time::sleep(Duration::from_millis(800)).await;
    sweep().await;
    let after = consumers(&name);
    assert!(
        !after.contains(&g),
        "an idle consumer without pending entries was kept: {after:?}"
    );
    assert!(
        after.contains(&h),
        "a consumer holding a lease was deleted: {after:?}"
    );
    // The lease held through the cleanup is still good.
    holder
        .ack(&held[0].lease, DeliveredResponse::default())
        .await
        .unwrap();
    cleanup(&name);
}

#[tokio::test]
async fn idle_consumer_ttl_must_be_above_zero() {
    let err = RedisQueue::builder()
        .idle_consumer_ttl(Duration::ZERO)
        .connect(SHARED)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("idle_consumer_ttl"), "{err}");
}

/// An expired lease behind many live ones comes back. `XAUTOCLAIM` looks
/// at no more than ten entries per job asked for, and a lease began its
/// scan at the start of the pending list every time, so one expired entry
/// behind 199 live ones was never reached by `lease(1, ..)` until they
/// settled. The scan now goes on where the last lease left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_behind_many_live_ones_comes_back() {
    let name = unique("deep");
    let q = connect(SHARED, &name, Duration::from_secs(5)).await;
    for i in 0..200 {
        q.enqueue(Job::new(
            http::Method::POST,
            format!("/deep/{i}").parse().unwrap(),
        ))
        .await
        .unwrap();
    }
    let live = q.lease(199, Duration::from_secs(600)).await.unwrap();
    assert_eq!(live.len(), 199);
    let short = q.lease(1, Duration::from_millis(100)).await.unwrap();
    assert_eq!(short.len(), 1);
    let expired = *short[0].lease.id();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut back = Vec::new();
    for _ in 0..4 {
        back = q.lease(1, Duration::from_secs(600)).await.unwrap();
        if !back.is_empty() {
            break;
        }
    }
    assert_eq!(
        back.len(),
        1,
        "the expired lease did not come back in 4 leases"
    );
    assert_eq!(*back[0].lease.id(), expired);
    assert_eq!(back[0].job.attempts(), 2);
    cleanup(&name);
}

/// A job record that does not decode (a newer version wrote it, say) is
/// dead-lettered as it is, with the reason: the jobs leased with it are
/// returned, and it does not come back to fail the next lease. Before, the
/// whole lease failed after every job in it was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_job_is_dead_lettered_and_the_rest_are_leased() {
    use tower_firebreak::queue::{Job, Queue};
    let name = unique("undecodable");
    let q = connect(SHARED, &name, Duration::from_secs(5)).await;
    let job = || Job::new(http::Method::POST, "/x".parse().unwrap());
    let a = q.enqueue(job()).await.unwrap();
    let b = q.enqueue(job()).await.unwrap();
    let mut c = redis::Client::open(SHARED)
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("fb:{{{name}}}:j"))
        .arg(a.to_string())
        .arg(&b"X{\"from\":\"a newer version\"}"[..])
        .query(&mut c)
        .unwrap();
    let leased = q.lease(10, Duration::from_secs(60)).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| *l.lease.id()).collect();
    assert_eq!(ids, [b]);
    crate::support::assert_dead_as_corrupt(&q, &a).await;
    assert!(
        q.lease(10, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);
    cleanup(&name);
}

/// `dead_letters(limit)` reads its page through the id index, not the
/// whole dead stream (the conformance suite checks the order): an entry the
/// page does not reach, here a foreign one in the stream, which the old
/// whole-stream read failed on, costs nothing; and the index is rebuilt
/// when it is missing (dead letters from before it existed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_read_one_page_through_the_id_index() {
    let name = unique("deadpage");
    let q = connect(SHARED, &name, Duration::from_secs(5)).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let job = Job::new(http::Method::POST, format!("/d{i}").parse().unwrap());
        ids.push(q.enqueue(job).await.unwrap());
    }
    for l in q.lease(3, Duration::from_secs(60)).await.unwrap() {
        q.dead_letter(&l.lease, "by hand").await.unwrap();
    }
    let page = async |n| -> Vec<_> {
        q.dead_letters(n)
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect()
    };
    let mut c = redis::Client::open(SHARED)
        .unwrap()
        .get_connection()
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(format!("fb:{{{name}}}:x"))
        .arg("*")
        .arg("foreign")
        .arg("entry")
        .query(&mut c)
        .unwrap();
    assert_eq!(page(2).await, ids[..2]);
    let _: () = redis::cmd("DEL")
        .arg(format!("fb:{{{name}}}:xi"))
        .query(&mut c)
        .unwrap();
    assert_eq!(page(3).await, ids);
    cleanup(&name);
}
