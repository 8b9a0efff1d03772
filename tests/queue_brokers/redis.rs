use crate::support::{Broker, fleet, outage, spare_port, unique};
use std::time::Duration;
use tower_firebreak::queue::redis::RedisQueue;

const SHARED: &str = "redis://127.0.0.1:6379";

async fn connect(url: &str, name: &str, op_timeout: Duration) -> RedisQueue {
    RedisQueue::builder()
        .name(name)
        .op_timeout(op_timeout)
        .connect(url)
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {url} is unreachable ({e}); start it (see shared/DESIGN.md)")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_fast_and_delivers_every_202() {
    let dir = tempfile::tempdir().unwrap();
    let port = spare_port();
    let args = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir.path().to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut broker = Broker::start("redis-server", args, port);
    let url = format!("redis://127.0.0.1:{port}");
    let q = connect(&url, "outage", Duration::from_millis(300)).await;
    outage(q, &mut broker, Duration::from_secs(1), 1).await;
}
