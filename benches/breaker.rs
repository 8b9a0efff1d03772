//! Circuit breaker overhead, per BENCH.md: one criterion group with the bare
//! service, our breaker closed and open, and tower-resilience 0.13's breaker
//! closed; then allocations per call and the 2-worker scaling figure.
//!
//! `cargo bench --bench breaker -- --warm-up-time 1 --measurement-time 3`

// A benchmark measures wall-clock time, which is what std's Instant is for.
#![allow(clippy::disallowed_types)]

use criterion::{Criterion, criterion_group};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State};

// The counting allocator: stats_alloc's instrumented System allocator (the
// crate forbids `unsafe`, so it cannot implement `GlobalAlloc` itself).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn bare()
-> impl Service<u64, Response = u64, Error = BoxError, Future: Send + 'static> + Clone + Send + 'static
{
    service_fn(|x: u64| async move { Ok::<_, BoxError>(x) })
}

fn ours() -> CircuitBreakerLayer {
    CircuitBreakerLayer::builder()
        .count_window(100)
        .minimum_calls(20)
        .failure_rate(0.5)
        .open_for(Duration::from_secs(3600))
        .build()
        .unwrap()
}

/// Our breaker, tripped for real (not forced): rejections read the clock.
fn ours_open<S>(
    rt: &tokio::runtime::Runtime,
    inner: S,
) -> impl Service<u64, Response = u64, Error = BoxError>
where
    S: Service<u64, Response = u64, Error = BoxError> + Clone,
{
    let layer = ours();
    let h = layer.handle();
    let mut tripper = layer.layer(service_fn(|_: u64| async {
        Err::<u64, BoxError>("down".into())
    }));
    rt.block_on(async {
        for _ in 0..20 {
            let _ = tripper.ready().await.unwrap().call(0).await;
        }
    });
    assert_eq!(h.state(), State::Open);
    layer.layer(inner)
}

fn theirs<S>(inner: S) -> impl Service<u64, Response = u64>
where
    S: Service<u64, Response = u64, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(20)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .unwrap()
        .layer(inner)
}

async fn drive<S>(svc: &mut S, iters: u64)
where
    S: Service<u64, Response = u64>,
{
    for i in 0..iters {
        let r = svc
            .ready()
            .await
            .ok()
            .expect("ready")
            .call(black_box(i))
            .await;
        let _ = black_box(r);
    }
}

fn bench_group(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("breaker");

    g.bench_function("bare", |b| {
        let mut svc = bare();
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                drive(&mut svc, iters).await;
                start.elapsed()
            })
        })
    });
    g.bench_function("firebreak closed", |b| {
        let mut svc = ours().layer(bare());
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                drive(&mut svc, iters).await;
                start.elapsed()
            })
        })
    });
    g.bench_function("firebreak open (rejection)", |b| {
        let mut svc = ours_open(&rt, bare());
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                drive(&mut svc, iters).await;
                start.elapsed()
            })
        })
    });
    g.bench_function("tower-resilience 0.13 closed", |b| {
        let mut svc = rt.block_on(async { theirs(bare()) });
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                drive(&mut svc, iters).await;
                start.elapsed()
            })
        })
    });
    g.finish();
}

/// Allocations per call over 100k calls, minus a zero-call run.
fn allocations() {
    const N: u64 = 100_000;
    let rt = rt();
    let count = |svc: &mut dyn FnMut(u64)| {
        let r = Region::new(GLOBAL);
        svc(0);
        let base = r.change();
        let r = Region::new(GLOBAL);
        svc(N);
        let run = r.change();
        (
            (run.allocations as f64 - base.allocations as f64) / N as f64,
            (run.bytes_allocated as f64 - base.bytes_allocated as f64) / N as f64,
        )
    };
    let mut closed = ours().layer(bare());
    let (a, b) = count(&mut |n| rt.block_on(drive(&mut closed, n)));
    println!("allocations per call, firebreak closed: {a:.2} ({b:.1} B)");
    let mut open = ours_open(&rt, bare());
    let (a, b) = count(&mut |n| rt.block_on(drive(&mut open, n)));
    println!("allocations per call, firebreak open (rejection): {a:.2} ({b:.1} B)");
    let mut t = rt.block_on(async { theirs(bare()) });
    let (a, b) = count(&mut |n| rt.block_on(drive(&mut t, n)));
    println!("allocations per call, tower-resilience 0.13 closed: {a:.2} ({b:.1} B)");
}

/// Calls per second through one shared closed breaker, with `workers` tokio
/// workers each driving its own clone. `spin` is CPU work per call in the
/// inner service (0 = the bare service).
fn throughput(workers: usize, spin: u32) -> f64 {
    const PER_TASK: u64 = 2_000_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_time()
        .build()
        .unwrap();
    let layer = ours();
    let per_task = PER_TASK / u64::from(spin.max(1)).min(PER_TASK);
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        rt.block_on(async {
            let tasks: Vec<_> = (0..workers)
                .map(|_| {
                    let mut svc = layer.layer(service_fn(move |x: u64| async move {
                        let mut v = x;
                        for _ in 0..spin {
                            v = black_box(v.wrapping_mul(6364136223846793005).wrapping_add(1));
                        }
                        Ok::<_, BoxError>(v)
                    }));
                    tokio::spawn(async move {
                        for i in 0..per_task {
                            let r: Result<u64, BoxError> = match svc.ready().await {
                                Ok(s) => s.call(black_box(i)).await,
                                Err(e) => Err(e),
                            };
                            let _ = black_box(r);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let secs = start.elapsed().as_secs_f64();
        best = best.max((workers as u64 * per_task) as f64 / secs);
    }
    best
}

fn scaling() {
    for spin in [0u32, 200] {
        let one = throughput(1, spin);
        let two = throughput(2, spin);
        println!(
            "scaling, inner spin {spin}: 1 worker {:.1} M calls/s, 2 workers {:.1} M calls/s, ratio {:.2}x",
            one / 1e6,
            two / 1e6,
            two / one
        );
    }
}

criterion_group!(benches, bench_group);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    allocations();
    scaling();
}
