//! Makers for the broker backends: each talks to the real broker on this
//! machine and panics with a clear message when it is unreachable.

use crate::suite::{Fixture, Settings};

#[cfg(feature = "redis")]
pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// The suite drops a fixture as soon as it has the queue, so the cleanup
/// guard cannot wait for the end of a check. Instead, each run deletes the
/// queues that runs of this suite made more than ten minutes ago (their
/// names carry a v7 uuid, which starts with a millisecond timestamp).
#[cfg(feature = "redis")]
fn sweep_old_redis_queues() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(mut c) = redis::Client::open(REDIS_URL).and_then(|c| c.get_connection()) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("fb:{conf-*")
            .query(&mut c)
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let old: Vec<&String> = keys
            .iter()
            .filter(|k| {
                k.get(9..21)
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .is_some_and(|ms| ms + 600_000 < now)
            })
            .collect();
        if !old.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(old).query(&mut c);
        }
    });
}

#[cfg(feature = "redis")]
pub(crate) async fn redis(s: Settings) -> Fixture<tower_firebreak::queue::redis::RedisQueue> {
    sweep_old_redis_queues();
    let name = unique("conf");
    let queue = tower_firebreak::queue::redis::RedisQueue::builder()
        .name(&name)
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .op_timeout(std::time::Duration::from_secs(5))
        .connect(REDIS_URL)
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {REDIS_URL} is unreachable ({e}); start it (see shared/DESIGN.md)")
        });
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}

pub(crate) const NATS_URL: &str = "nats://127.0.0.1:4222";

/// Deletes the JetStream streams (and so the KV buckets) that runs of this
/// suite made more than ten minutes ago; see `sweep_old_redis_queues`.
#[cfg(feature = "nats")]
async fn sweep_old_nats_queues() {
    use futures_util::TryStreamExt;
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(client) = async_nats::connect(NATS_URL).await else {
            return;
        };
        let js = async_nats::jetstream::new(client);
        let names: Vec<String> = js.stream_names().try_collect().await.unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for name in names {
            let Some(pos) = name.find("conf-") else {
                continue;
            };
            let old = name
                .get(pos + 5..pos + 17)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .is_some_and(|ms| ms + 600_000 < now);
            if old {
                let _ = js.delete_stream(&name).await;
            }
        }
    })
    .await;
}

#[cfg(feature = "nats")]
pub(crate) async fn nats(s: Settings) -> Fixture<tower_firebreak::queue::nats::NatsQueue> {
    sweep_old_nats_queues().await;
    let name = unique("conf");
    let queue = tower_firebreak::queue::nats::NatsQueue::builder()
        .name(&name)
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .op_timeout(std::time::Duration::from_secs(5))
        .connect(NATS_URL)
        .await
        .unwrap_or_else(|e| {
            panic!("NATS at {NATS_URL} is unreachable ({e}); start it with JetStream (see shared/DESIGN.md)")
        });
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}

#[cfg(feature = "amqp")]
pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[cfg(feature = "amqp")]
pub(crate) async fn amqp(
    s: Settings,
) -> Fixture<tower_firebreak::queue::amqp::AmqpQueue<tower_firebreak::queue::amqp::RedisStatusStore>>
{
    use tower_firebreak::queue::amqp::{AmqpQueue, RedisStatusStore};
    let name = unique("conf");
    let timeout = std::time::Duration::from_secs(5);
    let store = RedisStatusStore::connect_with_timeout(REDIS_URL, &name, timeout)
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {REDIS_URL} (the status store) is unreachable ({e}); start it (see shared/DESIGN.md)")
        });
    let queue = AmqpQueue::builder()
        .name(&name)
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .op_timeout(timeout)
        .connect(AMQP_URL, store)
        .await
        .unwrap_or_else(|e| {
            panic!("RabbitMQ at {AMQP_URL} is unreachable ({e}); start it (see shared/DESIGN.md)")
        });
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}
