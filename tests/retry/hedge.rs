//! Hedged requests: first answer wins, the other is cancelled, budget honoured.

use crate::support::ms;
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, sleep};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::hedge::HedgeLayer;
use tower_firebreak::retry::RetryBudget;

/// Sets a flag when dropped: tells whether a call was cancelled.
struct DropFlag(Arc<AtomicUsize>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Copy `n` (0-based) of a call takes `latencies[n]`, the rest 10 ms. Counts
/// calls and dropped (finished or cancelled) calls.
#[derive(Clone)]
struct Endpoint {
    calls: Arc<AtomicU32>,
    dropped: Arc<AtomicUsize>,
    latencies: Arc<Mutex<Vec<Duration>>>,
}

impl Endpoint {
    fn new(latencies: &[Duration]) -> Self {
        Endpoint {
            calls: Arc::default(),
            dropped: Arc::default(),
            latencies: Arc::new(Mutex::new(latencies.iter().rev().copied().collect())),
        }
    }

    fn service<Req: Send + 'static>(
        &self,
    ) -> impl Service<
        Req,
        Response = u32,
        Error = BoxError,
        Future = impl Future<Output = Result<u32, BoxError>> + Send,
    > + Clone {
        let me = self.clone();
        service_fn(move |_req: Req| {
            let n = me.calls.fetch_add(1, Ordering::Relaxed);
            let latency = me.latencies.lock().unwrap().pop().unwrap_or(ms(10));
            let flag = DropFlag(me.dropped.clone());
            async move {
                let _flag = flag;
                sleep(latency).await;
                Ok::<_, BoxError>(n)
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_call_is_answered_at_the_hedge_delay_plus_the_fast_answer() {
    let ep = Endpoint::new(&[Duration::from_secs(5), ms(20)]);
    let svc = HedgeLayer::fixed(ms(100)).layer(ep.service::<u32>());
    let t0 = Instant::now();
    let answer = svc.oneshot(1).await.unwrap();
    assert_eq!(t0.elapsed(), ms(120));
    assert_eq!(answer, 1, "the second copy answered");
    assert_eq!(ep.calls.load(Ordering::Relaxed), 2);
    // Both calls are gone: the winner finished, the slow one was cancelled.
    assert_eq!(ep.dropped.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn a_fast_call_is_not_hedged() {
    let ep = Endpoint::new(&[ms(50)]);
    let svc = HedgeLayer::fixed(ms(100)).layer(ep.service::<u32>());
    assert_eq!(svc.oneshot(1).await.unwrap(), 0);
    assert_eq!(ep.calls.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failing_copy_waits_for_the_other() {
    let calls = Arc::new(AtomicU32::new(0));
    let svc = HedgeLayer::fixed(ms(100)).layer(service_fn({
        let calls = calls.clone();
        move |_: u32| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move {
                if n == 0 {
                    sleep(ms(150)).await;
                    Err::<u32, BoxError>("first copy failed".into())
                } else {
                    sleep(ms(200)).await;
                    Ok(n)
                }
            }
        }
    }));
    let t0 = Instant::now();
    assert_eq!(svc.oneshot(1).await.unwrap(), 1);
    assert_eq!(t0.elapsed(), ms(300));
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_sends_no_hedge() {
    let ep = Endpoint::new(&[Duration::from_secs(1)]);
    let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.0);
    let svc = HedgeLayer::fixed(ms(100))
        .budget(budget)
        .layer(ep.service::<u32>());
    let t0 = Instant::now();
    svc.oneshot(1).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(ep.calls.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn hedges_draw_on_the_budget() {
    // ratio 0.5, no floor, this layer depositing: 10 slow calls, 5 hedges.
    let ep = Endpoint::new(&[Duration::from_secs(1); 100]);
    let svc = HedgeLayer::fixed(ms(100))
        .own_budget(RetryBudget::new(Duration::from_secs(60), 0, 0.5))
        .layer(ep.service::<u32>());
    for i in 0..10 {
        svc.clone().oneshot(i).await.unwrap();
    }
    assert_eq!(ep.calls.load(Ordering::Relaxed), 15);
}

fn get(method: Method) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("http://b.internal/")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn only_idempotent_http_requests_are_hedged() {
    let ep = Endpoint::new(&[Duration::from_secs(1), ms(10), Duration::from_secs(1)]);
    let inner = ep.service::<Request<Full<Bytes>>>().map_response(|n| {
        let mut r = Response::new(());
        r.extensions_mut().insert(n);
        r
    });
    let svc = HedgeLayer::fixed(ms(100)).http().layer(inner);

    let t0 = Instant::now();
    svc.clone().oneshot(get(Method::GET)).await.unwrap();
    assert_eq!(t0.elapsed(), ms(110));
    assert_eq!(ep.calls.load(Ordering::Relaxed), 2);

    let t0 = Instant::now();
    svc.oneshot(get(Method::POST)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(ep.calls.load(Ordering::Relaxed), 3, "a POST was hedged");
}

#[tokio::test(start_paused = true)]
async fn the_percentile_delay_comes_from_the_last_window() {
    let mut lat = vec![Duration::from_secs(5)];
    lat.extend([ms(10); 150]);
    lat.push(Duration::from_secs(5));
    let ep = Endpoint::new(&lat);
    let svc =
        HedgeLayer::percentile_with(0.9, 50, Duration::from_secs(1)).layer(ep.service::<u32>());

    // No full window yet: no hedge.
    let t0 = Instant::now();
    svc.clone().oneshot(0).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(ep.calls.load(Ordering::Relaxed), 1);

    // 1.5 s of 10 ms calls: a full window of about 100 samples.
    for i in 0..150 {
        svc.clone().oneshot(i).await.unwrap();
    }
    assert_eq!(ep.calls.load(Ordering::Relaxed), 151);

    // A slow call is hedged at the 90th percentile, 10 ms, and the copy
    // answers 10 ms later. hdrhistogram keeps two significant digits, so the
    // delay reads back as 10.0..=10.1 ms.
    let t0 = Instant::now();
    svc.clone().oneshot(0).await.unwrap();
    let e = t0.elapsed();
    assert!(e >= ms(20) && e <= ms(21), "{e:?}");
    assert_eq!(ep.calls.load(Ordering::Relaxed), 153);
}

/// Only successes are timed. When none has come for two windows (the
/// dependency stopped answering), the delay learned while it was healthy is
/// not used: hedging then would send two copies of every call to it.
///
/// `quick` 10 ms calls follow the warm-up and the gap, then one slow call
/// (5 s) is timed: it must not be hedged.
async fn slow_call_after_a_gap(quick: usize) {
    let mut lat = vec![ms(10); 150 + quick];
    lat.push(Duration::from_secs(5));
    let ep = Endpoint::new(&lat);
    let svc =
        HedgeLayer::percentile_with(0.9, 50, Duration::from_secs(1)).layer(ep.service::<u32>());
    for i in 0..150 {
        svc.clone().oneshot(i).await.unwrap();
    }
    // Two windows without one success.
    sleep(Duration::from_secs(2)).await;
    for i in 0..quick {
        svc.clone().oneshot(i as u32).await.unwrap();
    }
    let t0 = Instant::now();
    svc.clone().oneshot(0).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(5), "not hedged");
    assert_eq!(
        ep.calls.load(Ordering::Relaxed) as usize,
        151 + quick,
        "no copy sent"
    );
}

#[tokio::test(start_paused = true)]
async fn no_hedge_on_a_delay_two_windows_stale() {
    slow_call_after_a_gap(0).await;
}

/// The first success after such a gap does not bring the old delay back:
/// the window it closes holds samples from before the gap.
#[tokio::test(start_paused = true)]
async fn the_first_success_after_a_gap_does_not_revive_the_old_delay() {
    slow_call_after_a_gap(1).await;
}

/// No copy goes out once the call's deadline has passed: with a 100 ms
/// deadline and a 100 ms hedge delay, both timers fire together, and the
/// copy would be cut off at once (its propagated timeout 0).
#[tokio::test(start_paused = true)]
async fn no_hedge_is_sent_past_the_deadline() {
    use tower_firebreak::deadline::{DeadlineExceeded, DeadlineLayer};
    let ep = Endpoint::new(&[Duration::from_secs(1)]);
    let svc = tower::ServiceBuilder::new()
        .layer(DeadlineLayer::new(ms(100)))
        .layer(HedgeLayer::fixed(ms(100)))
        .service(ep.service::<Request<Full<Bytes>>>());
    let err = svc.oneshot(get(Method::GET)).await.unwrap_err();
    assert!(
        tower_firebreak::error::find::<DeadlineExceeded>(&*err).is_some(),
        "{err:?}"
    );
    assert_eq!(
        ep.calls.load(Ordering::Relaxed),
        1,
        "a copy went out at the deadline"
    );
}
