//! Circuit breaker overhead, per BENCH.md: one criterion group with the bare
//! service, our breaker closed and open, our keyed breaker closed (1 key,
//! and 1000 keys in turn), and tower-resilience 0.13's breaker closed; then
//! the 2-worker scaling figures (one shared breaker, and the keyed breaker
//! with the workers on different keys and on the same keys at once). Allocations per call are counted
//! by `benches/breaker_alloc.rs`, so that the counting allocator's own atomic
//! counters do not slow the timed runs here.
//!
//! `cargo bench --bench breaker -- --warm-up-time 1 --measurement-time 3`

// A benchmark measures wall-clock time, which is what std's Instant is for.
#![allow(clippy::disallowed_types)]

use criterion::{Criterion, criterion_group};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};

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

/// Our keyed breaker, closed, one breaker per `x % keys`.
fn ours_keyed<S>(inner: S, keys: u64) -> impl Service<u64, Response = u64, Error = BoxError> + Clone
where
    S: Service<u64, Response = u64, Error = BoxError> + Clone,
{
    CircuitBreakerConfig {
        max_keys: 1024,
        ..Default::default()
    }
    .into_keyed_layer(move |x: &u64| *x % keys)
    .unwrap()
    .layer(inner)
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
    g.bench_function("firebreak forced open (rejection, no clock read)", |b| {
        let layer = ours();
        layer.handle().force_open();
        let mut svc = layer.layer(bare());
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                drive(&mut svc, iters).await;
                start.elapsed()
            })
        })
    });
    // u64::MAX: every call a new key, into a full table of 1024.
    for keys in [1u64, 1000, u64::MAX] {
        let name = if keys == u64::MAX {
            "firebreak keyed closed (a new key each call, full table)".to_owned()
        } else {
            format!("firebreak keyed closed ({keys} keys)")
        };
        g.bench_function(name, |b| {
            let mut svc = ours_keyed(bare(), keys);
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    drive(&mut svc, iters).await;
                    start.elapsed()
                })
            })
        });
    }
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

/// Calls per second with `workers` tokio workers, each driving its own clone
/// of one service: through one shared closed breaker, or (`breaker: false`)
/// the bare service, the control that shows how far the machine itself
/// scales at that moment. `spin` is CPU work per call in the inner service.
fn throughput(workers: usize, spin: u32, breaker: bool) -> f64 {
    throughput_of(
        workers,
        spin,
        if breaker { Kind::Breaker } else { Kind::Bare },
    )
}

#[derive(Clone, Copy)]
enum Kind {
    Bare,
    Breaker,
    /// A keyed breaker with 1000 keys, each worker cycling through them:
    /// in step (`true`: both call the same key at about the same time) or
    /// half the keys apart.
    Keyed(bool),
}

fn throughput_of(workers: usize, spin: u32, kind: Kind) -> f64 {
    let per_task: u64 = if spin == 0 { 2_000_000 } else { 200_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_time()
        .build()
        .unwrap();
    let layer = ours();
    let keyed = CircuitBreakerConfig {
        max_keys: 1024,
        ..Default::default()
    }
    .into_keyed_layer(|x: &u64| *x % 1000)
    .unwrap();
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..workers as u64)
            .map(|w| {
                let offset = match kind {
                    Kind::Keyed(false) => w * 500,
                    _ => 0,
                };
                let inner = service_fn(move |x: u64| async move {
                    let mut v = x;
                    for _ in 0..spin {
                        v = black_box(v.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                    Ok::<_, BoxError>(v)
                });
                use tower::util::Either::{Left, Right};
                let mut svc = match kind {
                    Kind::Breaker => Left(Left(layer.layer(inner))),
                    Kind::Keyed(_) => Left(Right(keyed.layer(inner))),
                    Kind::Bare => Right(inner),
                };
                tokio::spawn(async move {
                    for i in 0..per_task {
                        let r: Result<u64, BoxError> = match svc.ready().await {
                            Ok(s) => s.call(black_box(i + offset)).await,
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
    (workers as u64 * per_task) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Trials of 1 and 2 workers are interleaved, so that load from other
/// processes hits both alike; each figure is the median of 7.
fn scaling() {
    for spin in [0u32, 200] {
        let mut r = [vec![], vec![], vec![], vec![]];
        for _ in 0..7 {
            r[0].push(throughput(1, spin, true));
            r[1].push(throughput(2, spin, true));
            r[2].push(throughput(1, spin, false));
            r[3].push(throughput(2, spin, false));
        }
        let [one, two, bare1, bare2] = r.map(median);
        if spin == 0 {
            for in_step in [false, true] {
                let mut k = [vec![], vec![]];
                for _ in 0..7 {
                    k[0].push(throughput_of(1, spin, Kind::Keyed(in_step)));
                    k[1].push(throughput_of(2, spin, Kind::Keyed(in_step)));
                }
                let [k1, k2] = k.map(median);
                let how = if in_step {
                    "workers on the same key at once"
                } else {
                    "workers on different keys"
                };
                println!(
                    "scaling, inner spin {spin}: keyed breaker (1000 keys, {how}) 1 worker {:.1} M calls/s, 2 workers {:.1} M calls/s, ratio {:.2}x",
                    k1 / 1e6,
                    k2 / 1e6,
                    k2 / k1,
                );
            }
        }
        println!(
            "scaling, inner spin {spin}: breaker 1 worker {:.1} M calls/s, 2 workers {:.1} M calls/s, ratio {:.2}x; \
             bare service {:.1} -> {:.1} M calls/s, ratio {:.2}x",
            one / 1e6,
            two / 1e6,
            two / one,
            bare1 / 1e6,
            bare2 / 1e6,
            bare2 / bare1,
        );
    }
}

criterion_group!(benches, bench_group);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    scaling();
}
