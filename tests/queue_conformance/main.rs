//! Runs the conformance suite (`suite.rs`) against every backend built in.
//!
//! A new backend adds one `conformance!` line with a maker that returns a
//! fresh, empty queue for the given settings. A broker backend runs in real
//! time (`paused = false`) with a `unit` its timers can honour, e.g.
//! `conformance!(redis_queue, paused = false, unit = Duration::from_millis(200), redis);`.

use std::time::Duration;

mod suite;

use suite::{Fixture, Settings};
use tower_firebreak::queue::memory::MemoryQueue;

async fn memory(s: Settings) -> Fixture<MemoryQueue> {
    let mut builder = MemoryQueue::builder()
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention);
    if let Some(r) = s.dead_letter_retention {
        builder = builder.dead_letter_retention(r);
    }
    let queue = builder.build().unwrap();
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}

conformance!(
    memory_queue,
    paused = true,
    unit = Duration::from_millis(100),
    memory
);

#[cfg(feature = "disk")]
async fn disk(s: Settings) -> Fixture<tower_firebreak::queue::disk::DiskQueue> {
    let dir = tempfile::tempdir().unwrap();
    let mut builder = tower_firebreak::queue::disk::DiskQueue::builder()
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention);
    if let Some(r) = s.dead_letter_retention {
        builder = builder.dead_letter_retention(r);
    }
    let queue = builder.open(dir.path().join("queue.redb")).unwrap();
    Fixture {
        queue,
        _keep: Box::new(dir),
    }
}

#[cfg(feature = "disk")]
conformance!(
    disk_queue,
    paused = true,
    unit = Duration::from_millis(100),
    disk
);

// The suite in real time, as a broker backend runs it: keeps the checks
// honest for backends whose clock cannot be paused.
conformance!(
    memory_queue_real_time,
    paused = false,
    unit = Duration::from_millis(100),
    memory
);

// A queue shared through `Arc` is a queue too.
async fn arc_memory(s: Settings) -> Fixture<std::sync::Arc<MemoryQueue>> {
    let f = memory(s).await;
    Fixture {
        queue: std::sync::Arc::new(f.queue),
        _keep: f._keep,
    }
}

conformance!(
    arc_memory_queue,
    paused = true,
    unit = Duration::from_millis(100),
    arc_memory
);

#[cfg(any(feature = "redis", feature = "nats"))]
mod brokers;

#[cfg(feature = "redis")]
conformance!(
    redis_queue,
    paused = false,
    unit = Duration::from_millis(100),
    brokers::redis
);

#[cfg(feature = "nats")]
conformance!(
    nats_queue,
    paused = false,
    unit = Duration::from_millis(100),
    brokers::nats
);

#[cfg(feature = "amqp")]
conformance!(
    amqp_queue,
    paused = false,
    unit = Duration::from_millis(100),
    brokers::amqp
);
