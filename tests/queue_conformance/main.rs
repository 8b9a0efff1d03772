//! Runs the conformance suite (`suite.rs`) against every backend built in.
//!
//! A new backend adds one `conformance!` line with a maker that returns a
//! fresh, empty queue for the given settings.

mod suite;

use suite::{Fixture, Settings};
use tower_firebreak::queue::memory::MemoryQueue;

async fn memory(s: Settings) -> Fixture<MemoryQueue> {
    let queue = MemoryQueue::builder()
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .build()
        .unwrap();
    Fixture {
        queue,
        _keep: Box::new(()),
    }
}

conformance!(memory_queue, paused = true, memory);

#[cfg(feature = "disk")]
async fn disk(s: Settings) -> Fixture<tower_firebreak::queue::disk::DiskQueue> {
    let dir = tempfile::tempdir().unwrap();
    let queue = tower_firebreak::queue::disk::DiskQueue::builder()
        .capacity(s.capacity)
        .max_attempts(s.max_attempts)
        .retention(s.retention)
        .open(dir.path().join("queue.redb"))
        .unwrap();
    Fixture {
        queue,
        _keep: Box::new(dir),
    }
}

#[cfg(feature = "disk")]
conformance!(disk_queue, paused = true, disk);
