//! Per-call overhead of each layer on a trivial ready service, side by side
//! with tower's own layers, in one criterion run (method: ../shared/BENCH.md).
//!
//! Run: `cargo bench --bench overhead`
//!
//! After the criterion group it prints allocations per call for each case,
//! counted by a global allocator over 100,000 calls minus a zero-call run.
//!
//! Then it prints `paired` ratios: each of our layers against tower's
//! equivalent, timed in alternating blocks of 20,000 calls (41 rounds, the
//! order flipped every round), so that a noisy spell on this shared machine
//! hits both sides of a ratio alike; the median and the middle 80% of the
//! per-round ratios are shown. Criterion's medians are measured seconds
//! apart, and one noisy spell can move one of them alone.
//! `cargo bench --bench overhead -- paired` prints only these.
//!
//! # What metrics cost (feature `metrics`; `prometheus` for the last column)
//!
//! `cargo bench --bench overhead --features prometheus -- metrics/` adds the
//! `metrics` group, in the same run and binary: for the breaker, bulkhead
//! and rate limiter,
//! - `unnamed`: no name, so no metric handles. This is the code a build
//!   without the feature runs: every hook is
//!   `#[cfg(feature = "metrics")] if let Some(m) = &self.inner { .. }`
//!   (`src/observe.rs`), so with the feature it costs one `None` check on a
//!   field the call already has in cache, and without it nothing at all;
//!   an unnamed layer is an upper bound on the feature-off cost;
//! - `named, no recorder`: the handles exist but point at the facade's
//!   no-op recorder (a library user before the application installs one);
//! - `named, prometheus`: the Prometheus recorder installed, every call
//!   bumps its counters; it then prints allocations per call (0 expected).
//!
//! next to `bare`, plus `call span, no subscriber` (`CallSpanLayer` with no
//! `tracing` subscriber). The recorder is process-wide, so the
//! `prometheus` cases run last.
#![allow(missing_docs, clippy::disallowed_types)]

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use http_body_util::Full;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use std::alloc::System;
use std::future::Future;
use std::hint::black_box;
use std::time::Duration;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::{BulkheadLayer, KeyedBulkheadLayer};
#[cfg(feature = "metrics")]
use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
use tower_firebreak::deadline::{CallDeadline, DeadlineLayer};
use tower_firebreak::rate_limit::RateLimitLayer;
use tower_firebreak::timeout::TimeoutLayer;

// stats_alloc counts every allocation without any unsafe code of ours.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn allocated() -> (u64, u64) {
    let s = GLOBAL.stats();
    (s.allocations as u64, s.bytes_allocated as u64)
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

type HttpReq = http::Request<Full<Bytes>>;

fn http_req(_: u64) -> HttpReq {
    http::Request::new(Full::default())
}

fn bare_http() -> impl Service<
    HttpReq,
    Response = (),
    Error = BoxError,
    Future = impl Future<Output = Result<(), BoxError>>,
> + Clone {
    service_fn(|_: HttpReq| std::future::ready(Ok::<_, BoxError>(())))
}

/// What the deadline's one required step costs by itself: carrying
/// `CallDeadline` in the request's extensions. `http::Extensions` boxes its
/// map and each value, so a fresh request pays three allocations here.
fn bare_http_with_call_deadline() -> impl Service<HttpReq, Response = (), Error = BoxError> {
    let mut inner = bare_http();
    service_fn(move |mut req: HttpReq| {
        let at = tokio::time::Instant::now() + Duration::from_secs(1);
        req.extensions_mut().insert(CallDeadline::new(at));
        inner.call(req)
    })
}

/// Never limits: the per-second rate is far above what one core can call.
const NEVER: u32 = u32::MAX;

/// Calls `svc` `n` times by `&mut`, with `ready().await` and `call`.
async fn drive<S, Req>(svc: &mut S, n: u64, mk: impl Fn(u64) -> Req)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        let s = svc.ready().await.unwrap();
        black_box(s.call(mk(black_box(i))).await.unwrap());
    }
}

fn case<S, Req, F>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    allocs: &mut Vec<(String, f64, f64)>,
    name: &str,
    make: F,
    mk: fn(u64) -> Req,
) where
    F: Fn() -> S,
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let rt = rt();
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut svc = rt.block_on(async { make() });
            rt.block_on(async {
                let start = std::time::Instant::now();
                drive(&mut svc, iters, mk).await;
                start.elapsed()
            })
        })
    });
    let count = |n: u64| {
        rt.block_on(async {
            let mut svc = make();
            drive(&mut svc, 10, mk).await;
            let (a0, b0) = allocated();
            drive(&mut svc, n, mk).await;
            let (a1, b1) = allocated();
            (a1 - a0, b1 - b0)
        })
    };
    let (a, b) = count(100_000);
    let (a_zero, b_zero) = count(0);
    allocs.push((
        name.to_owned(),
        (a - a_zero) as f64 / 100_000.0,
        (b - b_zero) as f64 / 100_000.0,
    ));
}

fn ours_vs_tower(c: &mut Criterion) {
    let mut allocs = Vec::new();
    let mut g = c.benchmark_group("overhead");
    let a = &mut allocs;
    let id = |x: u64| x;

    case(&mut g, a, "bare", bare, id);
    case(
        &mut g,
        a,
        "firebreak timeout",
        || TimeoutLayer::new(Duration::from_secs(1)).layer(bare()),
        id,
    );
    case(
        &mut g,
        a,
        "tower timeout",
        || tower::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(bare()),
        id,
    );
    case(
        &mut g,
        a,
        "firebreak bulkhead",
        || BulkheadLayer::new(1000).layer(bare()),
        id,
    );
    case(
        &mut g,
        a,
        "firebreak bulkhead, max_wait",
        || {
            BulkheadLayer::new(1000)
                .max_wait(Duration::from_millis(10))
                .layer(bare())
        },
        id,
    );
    case(
        &mut g,
        a,
        "firebreak keyed bulkhead (1000 keys)",
        || KeyedBulkheadLayer::new(1000, |x: &u64| *x % 1000).layer(bare()),
        id,
    );
    case(
        &mut g,
        a,
        "tower load_shed+concurrency_limit",
        || {
            ServiceBuilder::new()
                .load_shed()
                .concurrency_limit(1000)
                .service(bare())
        },
        id,
    );
    case(
        &mut g,
        a,
        "firebreak rate_limit",
        || RateLimitLayer::per_second(NEVER).layer(bare()),
        id,
    );
    case(
        &mut g,
        a,
        "tower rate_limit",
        || {
            ServiceBuilder::new()
                .rate_limit(u64::MAX, Duration::from_secs(1))
                .service(bare())
        },
        id,
    );
    case(
        &mut g,
        a,
        "firebreak rate_limit+bulkhead+timeout",
        || {
            ServiceBuilder::new()
                .layer(RateLimitLayer::per_second(NEVER))
                .layer(BulkheadLayer::new(1000))
                .layer(TimeoutLayer::new(Duration::from_secs(1)))
                .service(bare())
        },
        id,
    );

    case(&mut g, a, "bare http", bare_http, http_req);
    case(
        &mut g,
        a,
        "firebreak deadline (http)",
        || DeadlineLayer::new(Duration::from_secs(1)).layer(bare_http()),
        http_req,
    );
    case(
        &mut g,
        a,
        "bare http + CallDeadline extension",
        bare_http_with_call_deadline,
        http_req,
    );
    case(
        &mut g,
        a,
        "tower timeout (http)",
        || tower::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(bare_http()),
        http_req,
    );
    g.finish();
    print_allocs("overhead group", allocs);
}

#[cfg(feature = "metrics")]
mod with_metrics {
    use super::*;

    pub(super) fn breaker(name: Option<&str>) -> impl Service<u64, Error = BoxError> {
        let mut b = CircuitBreakerLayer::builder();
        if let Some(n) = name {
            b = b.name(n);
        }
        b.build().unwrap().layer(bare())
    }

    pub(super) fn bulkhead(name: Option<&str>) -> impl Service<u64, Error = BoxError> {
        let mut l = BulkheadLayer::new(1000);
        if let Some(n) = name {
            l = l.name(n);
        }
        l.layer(bare())
    }

    pub(super) fn limiter(name: Option<&str>) -> impl Service<u64, Error = BoxError> {
        let mut l = RateLimitLayer::per_second(NEVER);
        if let Some(n) = name {
            l = l.name(n);
        }
        l.layer(bare())
    }

    /// The `metrics` group: `recorder` is `"no recorder"` or `"prometheus"`.
    pub(super) fn cases(c: &mut Criterion, recorder: &str) -> Vec<(String, f64, f64)> {
        let mut allocs = Vec::new();
        let a = &mut allocs;
        let id = |x: u64| x;
        let mut g = c.benchmark_group("metrics");
        if recorder == "no recorder" {
            case(&mut g, a, "bare", bare, id);
            case(&mut g, a, "breaker closed, unnamed", || breaker(None), id);
            case(&mut g, a, "bulkhead, unnamed", || bulkhead(None), id);
            case(&mut g, a, "rate limit, unnamed", || limiter(None), id);
            // No subscriber: the span's callsite is disabled.
            case(
                &mut g,
                a,
                "call span, no subscriber",
                || tower_firebreak::span::CallSpanLayer::new("s").layer(bare()),
                id,
            );
        }
        case(
            &mut g,
            a,
            &format!("breaker closed, named, {recorder}"),
            || breaker(Some("b")),
            id,
        );
        case(
            &mut g,
            a,
            &format!("bulkhead, named, {recorder}"),
            || bulkhead(Some("h")),
            id,
        );
        case(
            &mut g,
            a,
            &format!("rate limit, named, {recorder}"),
            || limiter(Some("l")),
            id,
        );
        g.finish();
        allocs
    }
}

#[cfg(feature = "metrics")]
fn metrics_no_recorder(c: &mut Criterion) {
    let allocs = with_metrics::cases(c, "no recorder");
    print_allocs("metrics group, no recorder", allocs);
}

#[cfg(feature = "prometheus")]
fn metrics_prometheus(c: &mut Criterion) {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("install the recorder");
    let allocs = with_metrics::cases(c, "prometheus");
    // The counters really were recorded.
    assert!(handle.render().contains("firebreak_calls{"));
    for (name, n, _) in &allocs {
        assert!(*n == 0.0, "{name}: {n} allocations per call");
    }
    print_allocs("metrics group, Prometheus recorder installed", allocs);
}

fn print_allocs(title: &str, allocs: Vec<(String, f64, f64)>) {
    println!("\nallocations per call, {title} (100,000 calls minus a zero-call run):");
    println!("{:<52} {:>10} {:>12}", "case", "allocs", "bytes");
    for (name, n, b) in allocs {
        println!("{name:<52} {n:>10.2} {b:>12.1}");
    }
}

#[cfg(not(feature = "metrics"))]
fn metrics_no_recorder(_: &mut Criterion) {}

#[cfg(not(feature = "prometheus"))]
fn metrics_prometheus(_: &mut Criterion) {}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = ours_vs_tower, metrics_no_recorder, metrics_prometheus
}

/// Our layer and tower's equivalent, timed in alternating blocks: the
/// per-round ratios of ours to tower's.
fn paired_ratios<A, B, Req>(
    rt: &Runtime,
    ours: impl FnOnce() -> A,
    tower: impl FnOnce() -> B,
    mk: fn(u64) -> Req,
) -> Vec<f64>
where
    A: Service<Req>,
    A::Error: std::fmt::Debug,
    B: Service<Req>,
    B::Error: std::fmt::Debug,
{
    const ROUNDS: usize = 41;
    const CALLS: u64 = 20_000;
    let (mut a, mut b) = rt.block_on(async { (ours(), tower()) });
    let time = |f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    rt.block_on(drive(&mut a, CALLS, mk));
    rt.block_on(drive(&mut b, CALLS, mk));
    let mut ratios = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let mut ta = 0.0;
        let mut tb = 0.0;
        let mut run_a = || ta = time(&mut || rt.block_on(drive(&mut a, CALLS, mk)));
        let mut run_b = || tb = time(&mut || rt.block_on(drive(&mut b, CALLS, mk)));
        if round % 2 == 0 {
            run_a();
            run_b();
        } else {
            run_b();
            run_a();
        }
        ratios.push(ta / tb);
    }
    ratios.sort_by(f64::total_cmp);
    ratios
}

fn paired() {
    let rt = rt();
    fn tower_timeout_http() -> impl Service<HttpReq, Error = BoxError> {
        tower::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(bare_http())
    }
    let rows = [
        (
            "firebreak timeout / tower timeout",
            paired_ratios(
                &rt,
                || TimeoutLayer::new(Duration::from_secs(1)).layer(bare()),
                || tower::timeout::TimeoutLayer::new(Duration::from_secs(1)).layer(bare()),
                |x| x,
            ),
        ),
        (
            "firebreak bulkhead / tower load_shed+concurrency_limit",
            paired_ratios(
                &rt,
                || BulkheadLayer::new(1000).layer(bare()),
                || {
                    ServiceBuilder::new()
                        .load_shed()
                        .concurrency_limit(1000)
                        .service(bare())
                },
                |x| x,
            ),
        ),
        (
            // With `max_wait`, waiters are served in order by tokio's
            // semaphore, the one tower's `ConcurrencyLimit` uses.
            "firebreak bulkhead, max_wait / tower load_shed+concurrency_limit",
            paired_ratios(
                &rt,
                || {
                    BulkheadLayer::new(1000)
                        .max_wait(Duration::from_millis(10))
                        .layer(bare())
                },
                || {
                    ServiceBuilder::new()
                        .load_shed()
                        .concurrency_limit(1000)
                        .service(bare())
                },
                |x| x,
            ),
        ),
        (
            "firebreak rate_limit / tower rate_limit",
            paired_ratios(
                &rt,
                || RateLimitLayer::per_second(NEVER).layer(bare()),
                || {
                    ServiceBuilder::new()
                        .rate_limit(u64::MAX, Duration::from_secs(1))
                        .service(bare())
                },
                |x| x,
            ),
        ),
        (
            // Wait mode: a line of waiting calls, read (one atomic load)
            // before the limiter.
            "firebreak rate_limit, max_wait / tower rate_limit",
            paired_ratios(
                &rt,
                || {
                    RateLimitLayer::per_second(NEVER)
                        .max_wait(Duration::from_millis(10))
                        .layer(bare())
                },
                || {
                    ServiceBuilder::new()
                        .rate_limit(u64::MAX, Duration::from_secs(1))
                        .service(bare())
                },
                |x| x,
            ),
        ),
        (
            // Tower's limiter shared across clones, as ours is: behind a
            // `Buffer` (tower's documented way to share a limit), which
            // sends every call through a channel to one worker task.
            "firebreak rate_limit / tower buffer+rate_limit (shared)",
            paired_ratios(
                &rt,
                || RateLimitLayer::per_second(NEVER).layer(bare()),
                || {
                    ServiceBuilder::new()
                        .buffer(1024)
                        .rate_limit(u64::MAX, Duration::from_secs(1))
                        .service(bare())
                },
                |x| x,
            ),
        ),
        (
            // What sharing one limiter across clones costs by itself: ours is
            // shared (axum clones a service per request), tower's is per clone
            // and touches no atomic. One compare-and-swap on a shared word,
            // added to tower's limiter, shows the price of that difference.
            "tower rate_limit + one shared CAS / tower rate_limit",
            paired_ratios(
                &rt,
                || {
                    use std::sync::atomic::{AtomicU64, Ordering::*};
                    let shared = std::sync::Arc::new(AtomicU64::new(0));
                    ServiceBuilder::new()
                        .rate_limit(u64::MAX, Duration::from_secs(1))
                        .service(service_fn(move |x: u64| {
                            let v = shared.load(Acquire);
                            let _ = black_box(shared.compare_exchange_weak(
                                v,
                                v.wrapping_add(1),
                                AcqRel,
                                Acquire,
                            ));
                            std::future::ready(Ok::<_, BoxError>(x))
                        }))
                },
                || {
                    ServiceBuilder::new()
                        .rate_limit(u64::MAX, Duration::from_secs(1))
                        .service(bare())
                },
                |x| x,
            ),
        ),
        (
            "firebreak deadline (http) / tower timeout (http)",
            paired_ratios(
                &rt,
                || DeadlineLayer::new(Duration::from_secs(1)).layer(bare_http()),
                tower_timeout_http,
                http_req,
            ),
        ),
        (
            "CallDeadline extension alone / tower timeout (http)",
            paired_ratios(
                &rt,
                bare_http_with_call_deadline,
                tower_timeout_http,
                http_req,
            ),
        ),
    ];
    println!("paired: ours / tower, alternating blocks of 20,000 calls, 41 rounds");
    println!("| pair | median | middle 80% |");
    println!("| --- | ---: | ---: |");
    for (name, r) in rows {
        let n = r.len();
        println!(
            "| {name} | {:.2}x | {:.2}x to {:.2}x |",
            r[n / 2],
            r[n / 10],
            r[n - 1 - n / 10]
        );
    }
}

fn main() {
    // Criterion's filter, if one was given: `paired` runs unless a filter
    // leaves it out.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let only_paired = filters.iter().any(|f| f == "paired");
    if !only_paired {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    // `cargo test --benches` runs this without `--bench`: criterion then
    // only checks each case once, and so does this.
    let bench = std::env::args().any(|a| a == "--bench");
    if bench && (filters.is_empty() || filters.iter().any(|f| "paired".contains(f.as_str()))) {
        paired();
    }
}
