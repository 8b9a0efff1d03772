//! The Redis backend against the Redis on this machine, beyond the
//! conformance suite: the cleanup of idle consumers of the stream's group.
#![cfg(feature = "redis")]

use std::time::Duration;
use tower_firebreak::queue::redis::{RedisQueue, RedisQueueBuilder};
use tower_firebreak::queue::{DeliveredResponse, Job, Queue};

const REDIS: &str = "redis://127.0.0.1:6379";

async fn connect(
    name: &str,
    settings: impl FnOnce(RedisQueueBuilder) -> RedisQueueBuilder,
) -> RedisQueue {
    settings(
        RedisQueue::builder()
            .name(name)
            .op_timeout(Duration::from_secs(5)),
    )
    .connect(REDIS)
    .await
    .unwrap_or_else(|e| {
        panic!("Redis at {REDIS} is unreachable ({e}); start it (see shared/DESIGN.md)")
    })
}

fn consumers(name: &str) -> Vec<String> {
    let mut c = redis::Client::open(REDIS)
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

fn cleanup(name: &str) {
    let mut c = redis::Client::open(REDIS)
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

/// A gone handle's consumer is deleted by another handle's lease once it
/// has been idle for `idle_consumer_ttl` with nothing pending; one that
/// holds a lease is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_without_pending_entries_are_deleted() {
    let name = format!("idlegc-{}", uuid::Uuid::now_v7().simple());
    let job = || Job::new(http::Method::POST, "/c".parse().unwrap());
    let gone = connect(&name, |b| b).await;
    let holder = connect(&name, |b| b).await;
    let sweeper = connect(&name, |b| b.idle_consumer_ttl(Duration::from_millis(300))).await;

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
    assert!(
        sweeper
            .lease(1, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    let (g, h) = (gone.consumer().to_owned(), holder.consumer().to_owned());
    let before = consumers(&name);
    assert!(
        before.contains(&g) && before.contains(&h),
        "deleted before they were idle: {before:?}"
    );

    drop(gone);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        sweeper
            .lease(1, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
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
        .connect(REDIS)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("idle_consumer_ttl"), "{err}");
}
