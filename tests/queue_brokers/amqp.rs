use crate::support::{fleet, unique};
use std::time::Duration;
use tower_firebreak::queue::amqp::{AmqpQueue, RedisStatusStore};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const REDIS: &str = "redis://127.0.0.1:6379";

async fn connect(name: &str) -> AmqpQueue<RedisStatusStore> {
    let timeout = Duration::from_secs(5);
    let store = RedisStatusStore::connect_with_timeout(REDIS, name, timeout)
        .await
        .unwrap_or_else(|e| panic!("Redis at {REDIS} (the status store) is unreachable ({e})"));
    AmqpQueue::builder()
        .name(name)
        .op_timeout(timeout)
        .connect(AMQP, store)
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ at {AMQP} is unreachable ({e}); start it (see shared/DESIGN.md)")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_two_shares_one_queue() {
    let name = unique("fleet");
    let a = connect(&name).await;
    let b = connect(&name).await;
    fleet(a, b).await;
    // The lease timers still parked in retry queues would come back to a
    // queue no one reads: delete the run's queues and exchange.
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
