//! Durable enqueue throughput of the disk queue, with fsync on.
//!
//! ```text
//! cargo bench --bench queue                     # 3 s per row
//! QUEUE_BENCH_SECS=10 cargo bench --bench queue
//! ```
//!
//! For 1, 16 and 256 concurrent producers it reports durable jobs per
//! second and the p50/p99 enqueue latency, and beside them, from the same
//! run and the same disk, redb's single-commit rate: one write transaction
//! with `Durability::Immediate` per job, which is what a queue without
//! group commit could at best do.

use hdrhistogram::Histogram;
use redb::{Database, Durability, TableDefinition};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::queue::{Job, Queue};

const BODY: usize = 256;

fn job(producer: usize, i: u64) -> Job {
    Job::new(http::Method::POST, "/orders".parse().unwrap())
        .with_body(vec![b'x'; BODY])
        .with_idempotency_key(format!("{producer}-{i}"))
}

struct Row {
    name: String,
    jobs: u64,
    secs: f64,
    p50: Duration,
    p99: Duration,
}

impl Row {
    fn rate(&self) -> f64 {
        self.jobs as f64 / self.secs
    }
}

async fn disk(producers: usize, run_for: Duration) -> Row {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let queue = DiskQueue::open(dir.path().join("bench.redb")).unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..producers)
        .map(|p| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3).unwrap();
                let mut i = 0;
                while start.elapsed() < run_for {
                    let t = Instant::now();
                    queue.enqueue(job(p, i)).await.unwrap();
                    hist.record(t.elapsed().as_micros() as u64).unwrap();
                    i += 1;
                }
                hist
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(queue.depth().await.unwrap() as u64, hist.len());
    Row {
        name: format!("DiskQueue, {producers} producers"),
        jobs: hist.len(),
        secs,
        p50: Duration::from_micros(hist.value_at_quantile(0.5)),
        p99: Duration::from_micros(hist.value_at_quantile(0.99)),
    }
}

/// One redb write transaction, fsynced, per job: the rate without group
/// commit. Same record size as the queue's JSON envelope.
fn redb_single_commit(run_for: Duration) -> Row {
    const T: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("jobs");
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let db = Database::create(dir.path().join("baseline.redb")).unwrap();
    let record = tower_firebreak::queue::codec::Format::Json.encode(&job(0, 0));
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let start = Instant::now();
    let mut i = 0u128;
    while start.elapsed() < run_for {
        let t = Instant::now();
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(Durability::Immediate);
        txn.open_table(T)
            .unwrap()
            .insert(i, record.as_slice())
            .unwrap();
        txn.commit().unwrap();
        hist.record(t.elapsed().as_micros() as u64).unwrap();
        i += 1;
    }
    Row {
        name: "redb, one fsynced txn per job".into(),
        jobs: hist.len(),
        secs: start.elapsed().as_secs_f64(),
        p50: Duration::from_micros(hist.value_at_quantile(0.5)),
        p99: Duration::from_micros(hist.value_at_quantile(0.99)),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then a short smoke run is enough.
    let bench = std::env::args().any(|a| a == "--bench");
    let secs = std::env::var("QUEUE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 3.0 } else { 0.2 });
    let run_for = Duration::from_secs_f64(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let baseline = Arc::new(rt.block_on(async {
        tokio::task::spawn_blocking(move || redb_single_commit(run_for))
            .await
            .unwrap()
    }));
    let mut rows = Vec::new();
    for producers in [1, 16, 256] {
        rows.push(rt.block_on(disk(producers, run_for)));
    }

    println!("| setup | durable jobs/s | vs redb single commit | p50 | p99 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for row in std::iter::once(&*baseline).chain(&rows) {
        println!(
            "| {} | {:.0} | {:.1}x | {:.2} ms | {:.2} ms |",
            row.name,
            row.rate(),
            row.rate() / baseline.rate(),
            row.p50.as_secs_f64() * 1e3,
            row.p99.as_secs_f64() * 1e3,
        );
    }
    println!(
        "({secs} s per row, {BODY}-byte bodies, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
