//! What the `metrics` feature costs on the hot path, in one criterion run
//! (method: ../shared/BENCH.md).
//!
//! Run: `cargo bench --bench metrics --features prometheus`
//!
//! For each layer, three cases side by side:
//! - `unnamed`: no name, so no metric handles; the same code a build
//!   without the feature runs, plus one `Option` check;
//! - `named, no recorder`: the handles exist but point at the facade's no-op
//!   recorder (what a library user gets before installing an exporter);
//! - `named, prometheus`: the Prometheus recorder installed, every call
//!   bumps its counter.
//!
//! Also `call span, no subscriber`: [`CallSpanLayer`] with no `tracing`
//! subscriber installed.
//!
//! [`CallSpanLayer`]: tower_firebreak::span::CallSpanLayer
//!
//! The recorder is process-wide, so the `named, prometheus` cases run last.
//! A build without the feature is measured by `benches/overhead.rs`.
#![allow(missing_docs, clippy::disallowed_types)]

use criterion::{Criterion, criterion_group};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use std::alloc::System;
use std::hint::black_box;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::BulkheadLayer;
use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
use tower_firebreak::rate_limit::RateLimitLayer;

// stats_alloc counts every allocation without any unsafe code of ours.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations per call over 100,000 calls, minus a zero-call run (which
/// counts building the service).
fn allocs_per_call<S, F>(make: F) -> f64
where
    F: Fn() -> S,
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    let rt = rt();
    let run = |n: u64| {
        let before = GLOBAL.stats().allocations;
        rt.block_on(async {
            let mut svc = make();
            drive(&mut svc, n).await;
        });
        GLOBAL.stats().allocations - before
    };
    // The first run registers the series (a one-off allocation).
    run(0);
    let base = run(0);
    let total = run(100_000);
    (total as f64 - base as f64) / 100_000.0
}

fn rt() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

type Bare = tower::util::ServiceFn<fn(u64) -> std::future::Ready<Result<u64, BoxError>>>;

fn bare() -> Bare {
    service_fn(|x: u64| std::future::ready(Ok::<_, BoxError>(x)))
}

async fn drive<S>(svc: &mut S, n: u64)
where
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        let s = svc.ready().await.unwrap();
        black_box(s.call(black_box(i)).await.unwrap());
    }
}

fn case<S, F>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    make: F,
) where
    F: Fn() -> S,
    S: Service<u64>,
    S::Error: std::fmt::Debug,
{
    let rt = rt();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut svc = rt.block_on(async { make() });
            rt.block_on(async {
                let start = std::time::Instant::now();
                drive(&mut svc, iters).await;
                start.elapsed()
            })
        })
    });
}

fn breaker(name: Option<&str>) -> impl Service<u64, Error = BoxError> {
    let mut b = CircuitBreakerLayer::builder();
    if let Some(n) = name {
        b = b.name(n);
    }
    b.build().unwrap().layer(bare())
}

fn bulkhead(name: Option<&str>) -> impl Service<u64, Error = BoxError> {
    let mut l = BulkheadLayer::new(1000);
    if let Some(n) = name {
        l = l.name(n);
    }
    l.layer(bare())
}

fn limiter(name: Option<&str>) -> impl Service<u64, Error = BoxError> {
    let mut l = RateLimitLayer::per_second(u32::MAX);
    if let Some(n) = name {
        l = l.name(n);
    }
    l.layer(bare())
}

fn cases(c: &mut Criterion, recorder: &str) {
    let mut g = c.benchmark_group("metrics");
    if recorder == "no recorder" {
        case(&mut g, "bare", bare);
        case(&mut g, "breaker closed, unnamed", || breaker(None));
        case(&mut g, "bulkhead, unnamed", || bulkhead(None));
        case(&mut g, "rate limit, unnamed", || limiter(None));
        // No subscriber: the span's callsite is disabled.
        case(&mut g, "call span, no subscriber", || {
            tower_firebreak::span::CallSpanLayer::new("s").layer(bare())
        });
    }
    case(
        &mut g,
        &format!("breaker closed, named, {recorder}"),
        || breaker(Some("b")),
    );
    case(&mut g, &format!("bulkhead, named, {recorder}"), || {
        bulkhead(Some("h"))
    });
    case(&mut g, &format!("rate limit, named, {recorder}"), || {
        limiter(Some("l"))
    });
    g.finish();
}

fn no_recorder(c: &mut Criterion) {
    cases(c, "no recorder");
}

fn prometheus(c: &mut Criterion) {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("install the recorder");
    cases(c, "prometheus");
    println!(
        "allocations per call with the Prometheus recorder: breaker {:.3}, bulkhead {:.3}, rate limit {:.3}",
        allocs_per_call(|| breaker(Some("b"))),
        allocs_per_call(|| bulkhead(Some("h"))),
        allocs_per_call(|| limiter(Some("l"))),
    );
    // The counters really were recorded.
    assert!(handle.render().contains("firebreak_calls{"));
}

criterion_group!(benches, no_recorder, prometheus);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
