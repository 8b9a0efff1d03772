//! The retry layer's happy path (the first attempt succeeds), beside tower's
//! `Retry` with a policy that never retries and tower-resilience 0.13's retry.
//!
//! Run: `cargo bench --bench retry -- --warm-up-time 1 --measurement-time 3`.
//! It prints allocations per call first (stats_alloc's counting global
//! allocator over 100k calls, minus a zero-call run), then criterion's figures.

use criterion::{Criterion, criterion_group};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::future::Ready;
use std::hint::black_box;
use std::time::Duration;
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::retry::{RetryBudget, RetryLayer, RetryPolicy};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// tower's `Retry` with the cheapest honest policy: it clones the request (as
/// any retry must, to be able to retry) and never retries.
#[derive(Clone, Copy)]
struct NeverRetry;

impl<E> tower::retry::Policy<u64, u64, E> for NeverRetry {
    type Future = Ready<()>;
    fn retry(&mut self, _: &mut u64, _: &mut Result<u64, E>) -> Option<Ready<()>> {
        None
    }
    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        Some(*req)
    }
}

/// `NeverRetry` plus what any budgeted policy must do on every call: one
/// deposit into tower's `TpsBudget`. It prices the budget itself.
#[derive(Clone)]
struct NeverRetryTps(std::sync::Arc<tower::retry::budget::TpsBudget>);

impl<E> tower::retry::Policy<u64, u64, E> for NeverRetryTps {
    type Future = Ready<()>;
    fn retry(&mut self, _: &mut u64, _: &mut Result<u64, E>) -> Option<Ready<()>> {
        None
    }
    fn clone_request(&mut self, req: &u64) -> Option<u64> {
        use tower::retry::budget::Budget;
        self.0.deposit();
        Some(*req)
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

fn bare() -> impl Service<
    u64,
    Response = u64,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<u64, BoxError>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    service_fn(|x: u64| async move { Ok::<_, BoxError>(x) })
}

async fn drive<S>(svc: &mut S, iters: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    for i in 0..iters {
        let s = svc.ready().await.unwrap();
        black_box(s.call(black_box(i)).await.unwrap());
    }
}

/// Allocations and bytes per call over `n` calls, minus a zero-call run.
fn allocs_per_call<S>(rt: &Runtime, mut svc: S, n: u64) -> (f64, f64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let mut measure = |iters| {
        let region = Region::new(GLOBAL);
        rt.block_on(drive(&mut svc, iters));
        let c = region.change();
        (c.allocations, c.bytes_allocated)
    };
    let (a_zero, b_zero) = measure(0);
    let (a, b) = measure(n);
    (
        (a - a_zero) as f64 / n as f64,
        (b - b_zero) as f64 / n as f64,
    )
}

fn ours() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(10)).max_attempts(3)
}

fn ours_budget() -> RetryPolicy {
    ours().budget(RetryBudget::new(Duration::from_secs(10), 10, 0.2))
}

fn resilience() -> tower_resilience::retry::RetryLayer<u64, u64, BoxError> {
    tower_resilience::retry::RetryLayer::<u64, u64, BoxError>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(10))
        .build()
}

macro_rules! cases {
    ($m:ident) => {
        $m!("bare", bare());
        $m!(
            "tower Retry (never retries)",
            tower::retry::RetryLayer::new(NeverRetry).layer(bare())
        );
        $m!(
            "tower Retry + TpsBudget deposit",
            tower::retry::RetryLayer::new(NeverRetryTps(std::sync::Arc::new(
                tower::retry::budget::TpsBudget::new(Duration::from_secs(10), 10, 0.2)
            )))
            .layer(bare())
        );
        $m!("firebreak Retry", RetryLayer::new(ours()).layer(bare()));
        $m!(
            "firebreak Retry + budget",
            RetryLayer::new(ours_budget()).layer(bare())
        );
        $m!("tower-resilience 0.13 retry", resilience().layer(bare()));
    };
}

fn report_allocations() {
    let rt = runtime();
    println!("allocations per call (100k calls, minus a zero-call run):");
    macro_rules! alloc_case {
        ($name:expr, $svc:expr) => {{
            let (a, b) = allocs_per_call(&rt, $svc, 100_000);
            println!("  {:<32} {:>6.2} allocs  {:>8.1} bytes", $name, a, b);
        }};
    }
    cases!(alloc_case);
}

fn retry(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("retry");
    macro_rules! bench_case {
        ($name:expr, $svc:expr) => {{
            let mut svc = $svc;
            group.bench_function($name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = tokio::time::Instant::now();
                        drive(&mut svc, iters).await;
                        start.elapsed()
                    })
                })
            });
        }};
    }
    cases!(bench_case);
    group.finish();
}

criterion_group!(benches, retry);

fn main() {
    report_allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
