//! Makers for the broker backends: each talks to the real broker on this
//! machine and panics with a clear message when it is unreachable.

use crate::suite::{Fixture, Settings};

#[cfg(feature = "redis")]
pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Whether the `conf-<uuid v7>` name inside `s` was made before `ms`.
#[cfg(any(feature = "redis", feature = "nats"))]
fn made_before(s: &str, ms: u64) -> bool {
    s.find("conf-")
        .and_then(|pos| s.get(pos + 5..pos + 17))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .is_some_and(|made| made < ms)
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
        let mut keys: Vec<String> = Vec::new();
        for pattern in ["fb:{conf-*", "fba:{conf-*"] {
            keys.extend(
                redis::cmd("KEYS")
                    .arg(pattern)
                    .query::<Vec<String>>(&mut c)
                    .unwrap_or_default(),
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let old: Vec<&String> = keys
            .iter()
            .filter(|k| made_before(k, now - 600_000))
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
    let mut builder = tower_firebreak::queue::redis::RedisQueue::builder()
        .name(&name)
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .op_timeout(std::time::Duration::from_secs(5));
    if let Some(r) = s.dead_letter_retention {
        builder = builder.dead_letter_retention(r);
    }
    let queue = builder.connect(REDIS_URL).await.unwrap_or_else(|e| {
        panic!("Redis at {REDIS_URL} is unreachable ({e}); start it (`bash .ci/test` starts it)")
    });
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}

#[cfg(feature = "nats")]
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
            if made_before(&name, now - 600_000) {
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
    let mut builder = tower_firebreak::queue::nats::NatsQueue::builder()
        .name(&name)
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .op_timeout(std::time::Duration::from_secs(5));
    if let Some(r) = s.dead_letter_retention {
        builder = builder.dead_letter_retention(r);
    }
    let queue = builder
        .connect(NATS_URL)
        .await
        .unwrap_or_else(|e| {
            panic!("NATS at {NATS_URL} is unreachable ({e}); start it with JetStream (`bash .ci/test` starts it)")
        });
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}

#[cfg(feature = "amqp")]
pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The RabbitMQ queues of earlier runs: each maker records its queue name
/// in a Redis list, and the first maker of a run deletes the queues (and
/// exchange) of names more than ten minutes old.
#[cfg(feature = "amqp")]
const AMQP_REGISTRY: &str = "fb-tests:amqp-queues";

#[cfg(feature = "amqp")]
async fn sweep_old_amqp_queues() {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(mut c) = redis::Client::open(REDIS_URL).and_then(|c| c.get_connection()) else {
            return;
        };
        let names: Vec<String> = redis::cmd("LRANGE")
            .arg(AMQP_REGISTRY)
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let old: Vec<String> = names
            .into_iter()
            .filter(|n| made_before(n, now - 600_000))
            .collect();
        if old.is_empty() {
            return;
        }
        let Ok(conn) =
            lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await
        else {
            return;
        };
        let Ok(ch) = conn.create_channel().await else {
            return;
        };
        for name in old {
            for q in [format!("fb.{name}"), format!("fb.{name}.dead")] {
                let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
            }
            let _ = ch
                .exchange_delete(format!("fb.{name}.dlx").as_str().into(), Default::default())
                .await;
            let _: Result<(), _> = redis::cmd("LREM")
                .arg(AMQP_REGISTRY)
                .arg(0)
                .arg(&name)
                .query(&mut c);
        }
    })
    .await;
}

#[cfg(feature = "amqp")]
pub(crate) async fn amqp(
    s: Settings,
) -> Fixture<tower_firebreak::queue::amqp::AmqpQueue<tower_firebreak::queue::amqp::RedisStatusStore>>
{
    use tower_firebreak::queue::amqp::{AmqpQueue, RedisStatusStore};
    sweep_old_redis_queues();
    sweep_old_amqp_queues().await;
    let name = unique("conf");
    if let Ok(mut c) = redis::Client::open(REDIS_URL).and_then(|c| c.get_connection()) {
        let _: Result<(), _> = redis::cmd("RPUSH")
            .arg(AMQP_REGISTRY)
            .arg(&name)
            .query(&mut c);
    }
    let timeout = std::time::Duration::from_secs(5);
    let store = RedisStatusStore::connect_with_timeout(REDIS_URL, &name, timeout)
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {REDIS_URL} (the status store) is unreachable ({e}); start it (`bash .ci/test` starts it)")
        });
    let mut builder = AmqpQueue::builder()
        .name(&name)
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .op_timeout(timeout);
    if let Some(r) = s.dead_letter_retention {
        builder = builder.dead_letter_retention(r);
    }
    let queue = builder.connect(AMQP_URL, store).await.unwrap_or_else(|e| {
        panic!("RabbitMQ at {AMQP_URL} is unreachable ({e}); start it (`bash .ci/test` starts it)")
    });
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}
