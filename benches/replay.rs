//! How fast a `Replayer` drains a backlog from the disk queue, one delivery
//! at a time against several in flight (`ReplayerConfig::concurrency`).
//!
//! Each case fills a fresh `DiskQueue` with `N` jobs, starts a replayer with
//! an unlimited pace into a downstream that answers after a fixed latency,
//! and times until every job is acked (the queue's depth is zero). The cases
//! take turns, round after round, so each ratio compares runs made side by
//! side; the table gives the median of the rounds.
//!
//! `cargo bench --bench replay --features disk`

// A benchmark measures wall-clock time, which is what std's Instant is for.
#![allow(clippy::disallowed_types)]

use bytes::Bytes;
use http_body_util::Full;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tower::service_fn;
use tower_firebreak::BoxError;
use tower_firebreak::defer::Replayer;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::queue::{Job, Queue};

type Req = http::Request<Full<Bytes>>;

fn job(i: usize) -> Job {
    Job::new(
        http::Method::POST,
        "http://orders.internal/orders".parse().unwrap(),
    )
    .with_body(format!("{{\"order\":{i}}}"))
    .with_idempotency_key(format!("order-{i}"))
}

/// Fills `queue` with `n` jobs, 64 producers at a time (group commits).
async fn fill(queue: &DiskQueue, n: usize) {
    let mut next = 0;
    while next < n {
        let end = (next + 64).min(n);
        let batch: Vec<_> = (next..end)
            .map(|i| {
                let q = queue.clone();
                tokio::spawn(async move { q.enqueue(job(i)).await.unwrap() })
            })
            .collect();
        for t in batch {
            t.await.unwrap();
        }
        next = end;
    }
}

/// Seconds to drain `n` jobs with `concurrency` deliveries in flight into a
/// downstream of `latency`.
async fn drain(dir: &std::path::Path, n: usize, latency: Duration, concurrency: usize) -> f64 {
    let path = dir.join(format!("replay-{}.redb", rand_suffix()));
    let queue = DiskQueue::open(&path).unwrap();
    fill(&queue, n).await;
    assert_eq!(queue.depth().await.unwrap(), n);
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let downstream = service_fn(move |_: Req| {
        sent2.fetch_add(1, Ordering::Relaxed);
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let start = Instant::now();
    let handle = Replayer::new(queue.clone(), downstream)
        .rate_per_second(1_000_000)
        .burst(10_000)
        .batch(64)
        .concurrency(concurrency)
        .poll_interval(Duration::from_millis(1))
        .spawn();
    while queue.depth().await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = start.elapsed().as_secs_f64();
    handle.shutdown().await;
    assert_eq!(sent.load(Ordering::Relaxed), n, "each job sent once");
    drop(queue);
    let _ = std::fs::remove_file(&path);
    took
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // then one small round is enough to show it runs.
    let bench = std::env::args().any(|a| a == "--bench");
    let (rounds, n) = if bench { (3, 2000) } else { (1, 100) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let latencies = [Duration::ZERO, Duration::from_millis(2)];
    let concurrencies = [1usize, 4, 16];
    let mut rates = vec![vec![Vec::new(); concurrencies.len()]; latencies.len()];
    let mut ratios = vec![vec![Vec::new(); concurrencies.len()]; latencies.len()];
    for _ in 0..rounds {
        for (li, &latency) in latencies.iter().enumerate() {
            let mut one = 0.0;
            for (ci, &c) in concurrencies.iter().enumerate() {
                let secs = rt.block_on(drain(dir.path(), n, latency, c));
                let rate = n as f64 / secs;
                if c == 1 {
                    one = rate;
                }
                rates[li][ci].push(rate);
                ratios[li][ci].push(rate / one);
            }
        }
    }
    println!(
        "| downstream latency | concurrency | acked jobs/s (median of {rounds}) | vs one at a time (same round, median) |"
    );
    println!("| --- | ---: | ---: | ---: |");
    for (li, latency) in latencies.iter().enumerate() {
        for (ci, c) in concurrencies.iter().enumerate() {
            println!(
                "| {latency:?} | {c} | {:.0} | {:.2}× |",
                median(rates[li][ci].clone()),
                median(ratios[li][ci].clone()),
            );
        }
    }
}
