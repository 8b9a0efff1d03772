use crate::support::{Proxy, fleet, outage, unique};
use std::time::Duration;
use tower_firebreak::queue::amqp::{AmqpQueue, RedisStatusStore};

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
/// connection with a proxy instead: `503`s while the broker is unreachable,
/// no false `202`, reconnection, and every `202` delivered. (It cannot check
/// that RabbitMQ keeps acknowledged jobs across its own restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_answers_503_fast_and_delivers_every_202() {
    let name = unique("outage");
    let mut proxy = Proxy::start(5672).await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let q = connect(&url, &name, Duration::from_millis(500)).await;
    // The status store is not behind the proxy, so no request is left
    // half-stored by the cut: none answered 503 may be delivered.
    outage(q, &mut proxy, Duration::from_secs(1), 0).await;
    proxy.cut().await;
    cleanup(&name).await;
}
