//! Allocations per call through the circuit breaker: a counting
//! `#[global_allocator]` over 100k calls, minus a zero-call run (BENCH.md).
//!
//! `cargo bench --bench breaker_alloc` (or, in the production-config build,
//! `cargo bench -p firebreak-prod-bench --bench breaker_alloc`). It fails if
//! our closed breaker allocates on a call; the open breaker's rejection
//! boxes its `CircuitOpen` (one 16-byte allocation), which it prints. It
//! also prints the memory a keyed breaker holds per key (bytes allocated
//! and not freed over 1000 new keys).

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::hint::black_box;
use std::time::Duration;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, State};

// stats_alloc's instrumented System allocator, rather than an `unsafe`
// `GlobalAlloc` of our own.
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

fn ours_open(rt: &tokio::runtime::Runtime) -> impl Service<u64, Response = u64, Error = BoxError> {
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
    layer.layer(bare())
}

fn theirs(rt: &tokio::runtime::Runtime) -> impl Service<u64, Response = u64> {
    let _g = rt.enter();
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(20)
        .wait_duration_in_open(Duration::from_secs(3600))
        .build()
        .unwrap()
        .layer(bare())
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

fn per_call<S: Service<u64, Response = u64>>(
    rt: &tokio::runtime::Runtime,
    svc: &mut S,
) -> (f64, f64) {
    const N: u64 = 100_000;
    let r = Region::new(GLOBAL);
    rt.block_on(drive(svc, 0));
    let base = r.change();
    let r = Region::new(GLOBAL);
    rt.block_on(drive(svc, N));
    let run = r.change();
    (
        (run.allocations as f64 - base.allocations as f64) / N as f64,
        (run.bytes_allocated as f64 - base.bytes_allocated as f64) / N as f64,
    )
}

/// Bytes a keyed breaker holds per key: allocated and not freed while 1000
/// new keys each make one call.
fn per_key(rt: &tokio::runtime::Runtime) -> f64 {
    const KEYS: u64 = 1000;
    let layer = CircuitBreakerConfig {
        count_window: Some(100),
        max_keys: 10_000,
        ..CircuitBreakerConfig::default()
    }
    .into_keyed_layer(|k: &u64| *k)
    .unwrap();
    let mut svc = layer.layer(bare());
    rt.block_on(drive(&mut svc, 1));
    let r = Region::new(GLOBAL);
    rt.block_on(async {
        for k in 1..=KEYS {
            let r = svc.ready().await.expect("ready").call(k).await;
            let _ = black_box(r);
        }
    });
    let c = r.change();
    (c.bytes_allocated as f64 - c.bytes_deallocated as f64) / KEYS as f64
}

fn main() {
    let rt = rt();
    let (a, b) = per_call(&rt, &mut bare());
    println!("allocations per call, bare: {a:.2} ({b:.1} B)");
    let (a, b) = per_call(&rt, &mut ours().layer(bare()));
    println!("allocations per call, firebreak closed: {a:.2} ({b:.1} B)");
    assert!(a == 0.0 && b == 0.0, "the closed breaker allocated");
    let (a, b) = per_call(&rt, &mut ours_open(&rt));
    println!("allocations per call, firebreak open (rejection): {a:.2} ({b:.1} B)");
    assert!(
        a <= 1.0,
        "the open breaker's rejection allocated more than its error box"
    );
    let (a, b) = per_call(&rt, &mut theirs(&rt));
    println!("allocations per call, tower-resilience 0.13 closed: {a:.2} ({b:.1} B)");
    println!(
        "memory per key, keyed firebreak breaker: {:.0} B",
        per_key(&rt)
    );
}
