use crate::support::{Proxy, fleet, produce, unique};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tower_firebreak::queue::amqp::{AmqpQueue, RedisStatusStore};
use tower_firebreak::queue::{DeliveredResponse, Job, Queue};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS: &str = "redis://127.0.0.1:6379";

async fn connect(url: &str, name: &str, op_timeout: Duration) -> AmqpQueue<RedisStatusStore> {
    let store = RedisStatusStore::connect_with_timeout(REDIS, name, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("Redis at {REDIS} (the status store) is unreachable ({e})"));
    AmqpQueue::builder()
        .name(name)
        .op_timeout(op_timeout)
        .connect(url, store)
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ at {AMQP} is unreachable ({e}); start it (see shared/DESIGN.md)")
        })
}

/// Deletes a run's queues, exchange and status records: the lease timers
/// still parked in retry queues would otherwise come back to a queue no one
/// reads.
async fn cleanup(name: &str) {
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for q in [format!("fb.{name}"), format!("fb.{name}.dead")] {
        ch.queue_delete(q.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    ch.exchange_delete(format!("fb.{name}.dlx").as_str().into(), Default::default())
        .await
        .unwrap();
    let mut c = redis::Client::open(REDIS)
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("fba:{{{name}}}:*"))
        .query(&mut c)
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query(&mut c).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_two_shares_one_queue() {
    let name = unique("fleet");
    let a = connect(AMQP, &name, Duration::from_secs(5)).await;
    let b = connect(AMQP, &name, Duration::from_secs(5)).await;
    fleet(a, b).await;
    cleanup(&name).await;
}

/// The shared RabbitMQ must not be stopped, so the test cuts the
/// connection with a proxy instead: it checks fast failures while the
/// broker is unreachable, no false success, reconnection, and that every
/// acknowledged job is leasable. (It cannot check that RabbitMQ keeps
/// acknowledged jobs across its own restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_fails_fast_and_keeps_every_acknowledged_job() {
    let name = unique("outage");
    let mut proxy = Proxy::start(5672).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let q = connect(&url, &name, Duration::from_millis(500)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce(q.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.cut().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore().await;
    // A successful enqueue proves the link is back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut probe = None;
    while probe.is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let job = Job::new(http::Method::POST, "/probe".parse().unwrap());
        probe = q.enqueue(job).await.ok();
    }
    let probe = probe.expect("no enqueue succeeded within 30 s of the link coming back");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let log = producer.await.unwrap();
    eprintln!(
        "amqp outage: {} acknowledged, {} unavailable (slowest {:?})",
        log.acked.len(),
        log.errors,
        log.slowest_error
    );
    assert!(log.other_errors.is_empty(), "{:?}", log.other_errors);
    assert!(log.errors > 0, "no enqueue failed while the link was cut");
    assert!(
        log.slowest_error <= Duration::from_millis(900),
        "an enqueue took {:?} to fail",
        log.slowest_error
    );
    let mut acked: HashSet<_> = log.acked.iter().copied().collect();
    acked.insert(probe);
    let mut leased = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !acked.is_subset(&leased) && tokio::time::Instant::now() < deadline {
        let batch = q.lease(100, Duration::from_secs(60)).await.unwrap();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for l in batch {
            leased.insert(*l.lease.id());
            q.ack(&l.lease, DeliveredResponse::default()).await.unwrap();
        }
    }
    let lost: Vec<_> = acked.difference(&leased).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged jobs lost: {lost:?}",
        lost.len()
    );
    let phantom: Vec<_> = leased.difference(&acked).collect();
    assert!(
        phantom.is_empty(),
        "jobs stored though their enqueue failed: {phantom:?}"
    );
    proxy.cut().await;
    cleanup(&name).await;
}
