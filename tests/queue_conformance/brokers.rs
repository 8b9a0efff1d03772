//! Makers for the broker backends: each talks to the real broker on this
//! machine and panics with a clear message when it is unreachable.

use crate::suite::{Fixture, Settings};

pub(crate) const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A name no other test (or earlier run) uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Deletes a Redis queue's keys when the test is done.
#[cfg(feature = "redis")]
struct RedisCleanup(String);

#[cfg(feature = "redis")]
impl Drop for RedisCleanup {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(REDIS_URL) else {
            return;
        };
        let Ok(mut c) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("fb:{{{}}}:*", self.0))
            .query(&mut c)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut c);
        }
    }
}

#[cfg(feature = "redis")]
pub(crate) async fn redis(s: Settings) -> Fixture<tower_firebreak::queue::redis::RedisQueue> {
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
        _keep: Box::new(RedisCleanup(name)),
    }
}
