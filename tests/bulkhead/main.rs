//! The bulkhead: bounded concurrency, bounded waiting, released permits.

#[path = "../support/mod.rs"]
mod support;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::routing::get;
use proptest::prelude::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::bulkhead::{BulkheadConfig, BulkheadFull, BulkheadLayer, KeyedBulkheadLayer};
use tower_firebreak::error::{self, Rejection, RejectionKind};

#[tokio::test(start_paused = true)]
async fn the_extra_call_fails_after_max_wait_and_not_before() {
    let layer = BulkheadLayer::new(2).max_wait(Duration::from_millis(100));
    let (mock, mut handle) = tower_test::mock::pair::<u32, u32>();
    let svc = layer.layer(mock);
    handle.allow(10);

    let a = tokio::spawn(svc.clone().oneshot(1));
    let b = tokio::spawn(svc.clone().oneshot(2));
    let (_, ra) = handle.next_request().await.unwrap();
    let (_, _rb) = handle.next_request().await.unwrap();
    assert_eq!(layer.in_flight(), 2);

    let start = Instant::now();
    let c = tokio::spawn(svc.clone().oneshot(3));
    tokio::time::sleep(Duration::from_millis(99)).await;
    assert!(!c.is_finished(), "rejected before max_wait");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let err = c.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(
        error::find::<BulkheadFull>(&*err).unwrap().max_concurrent(),
        2
    );
    assert_eq!(
        Rejection::of(&*err).unwrap().kind(),
        RejectionKind::BulkheadFull
    );

    // A waiter gets the slot the moment one frees up.
    let d = tokio::spawn(svc.clone().oneshot(4));
    tokio::time::sleep(Duration::from_millis(30)).await;
    ra.send_response(10);
    assert_eq!(a.await.unwrap().unwrap(), 10);
    let (req, rd) = handle.next_request().await.unwrap();
    assert_eq!(req, 4);
    rd.send_response(40);
    assert_eq!(d.await.unwrap().unwrap(), 40);
    drop(b);
}

/// A freed slot goes to the call that has waited longest, never to a call
/// that arrives after it (which waits behind it instead), and waiters are
/// served in the order they came.
#[tokio::test(start_paused = true)]
async fn a_freed_slot_goes_to_the_oldest_waiter_not_a_newcomer() {
    use futures_util::FutureExt;
    use tokio::sync::oneshot;
    let layer = BulkheadLayer::new(1).max_wait(Duration::from_secs(1));
    let mut svc = layer.layer(service_fn(|rx: oneshot::Receiver<u32>| async move {
        Ok::<_, BoxError>(rx.await.unwrap_or(0))
    }));
    let (ta, ra) = oneshot::channel();
    let (tb, rb) = oneshot::channel();
    let (tc, rc) = oneshot::channel();
    let (td, rd) = oneshot::channel();
    let mut a = Box::pin(svc.ready().await.unwrap().call(ra));
    let mut b = Box::pin(svc.ready().await.unwrap().call(rb));
    let mut c = Box::pin(svc.ready().await.unwrap().call(rc));
    assert!((&mut a).now_or_never().is_none(), "a holds the slot");
    assert!((&mut b).now_or_never().is_none(), "b waits");
    assert!((&mut c).now_or_never().is_none(), "c waits behind b");
    assert_eq!(layer.handle().waiting(), 2);

    // a finishes; before b is polled again, d arrives. It must not take
    // the slot that b has waited for.
    ta.send(1).unwrap();
    assert_eq!((&mut a).now_or_never().unwrap().unwrap(), 1);
    tb.send(2).unwrap();
    tc.send(3).unwrap();
    td.send(4).unwrap();
    let mut d = Box::pin(svc.ready().await.unwrap().call(rd));
    assert!((&mut d).now_or_never().is_none(), "d overtook two waiters");
    // c is polled first, but b came first.
    assert!((&mut c).now_or_never().is_none(), "c overtook b");
    assert_eq!((&mut b).now_or_never().unwrap().unwrap(), 2);
    assert!((&mut d).now_or_never().is_none(), "d overtook c");
    assert_eq!((&mut c).now_or_never().unwrap().unwrap(), 3);
    assert_eq!((&mut d).now_or_never().unwrap().unwrap(), 4);
    assert_eq!(layer.in_flight(), 0);
    assert_eq!(layer.handle().waiting(), 0);
}

/// A waiter that gives up gives up its place, and a slot handed to a
/// waiter that is then dropped goes on to the next: none is lost.
#[tokio::test(start_paused = true)]
async fn a_waiter_that_leaves_passes_the_slot_on() {
    use futures_util::FutureExt;
    use tokio::sync::oneshot;
    let layer = BulkheadLayer::new(1).max_wait(Duration::from_millis(100));
    let mut svc = layer.layer(service_fn(|rx: oneshot::Receiver<u32>| async move {
        Ok::<_, BoxError>(rx.await.unwrap_or(0))
    }));
    let (ta, ra) = oneshot::channel();
    let (_tb, rb) = oneshot::channel();
    let (_tc, rc) = oneshot::channel();
    let (td, rd) = oneshot::channel();
    let mut a = Box::pin(svc.ready().await.unwrap().call(ra));
    let mut b = Box::pin(svc.ready().await.unwrap().call(rb));
    assert!((&mut a).now_or_never().is_none());
    assert!((&mut b).now_or_never().is_none());
    tokio::time::advance(Duration::from_millis(50)).await;
    let mut c = Box::pin(svc.ready().await.unwrap().call(rc));
    let mut d = Box::pin(svc.ready().await.unwrap().call(rd));
    assert!((&mut c).now_or_never().is_none());
    assert!((&mut d).now_or_never().is_none());
    assert_eq!(layer.handle().waiting(), 3);
    // b's max_wait runs out: it leaves the line.
    tokio::time::advance(Duration::from_millis(50)).await;
    let err = (&mut b).now_or_never().unwrap().unwrap_err();
    assert!(error::find::<BulkheadFull>(&*err).is_some());
    // a finishes: its slot is handed to c, which is dropped before it runs.
    ta.send(1).unwrap();
    assert_eq!((&mut a).now_or_never().unwrap().unwrap(), 1);
    drop(c);
    // The slot reaches d.
    td.send(4).unwrap();
    assert_eq!((&mut d).now_or_never().unwrap().unwrap(), 4);
    assert_eq!(layer.in_flight(), 0);
    assert_eq!(layer.handle().waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn without_max_wait_the_extra_call_fails_at_once_and_never_reaches_the_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let (c, g) = (calls.clone(), gate.clone());
    let svc = BulkheadLayer::new(1).layer(service_fn(move |_: ()| {
        c.fetch_add(1, Ordering::SeqCst);
        let g = g.clone();
        async move {
            g.notified().await;
            Ok::<_, BoxError>(())
        }
    }));
    let held = tokio::spawn(svc.clone().oneshot(()));
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let err = svc.clone().oneshot(()).await.unwrap_err();
    assert!(error::find::<BulkheadFull>(&*err).is_some());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    gate.notify_one();
    held.await.unwrap().unwrap();
    // The slot is free again: the next call reaches the service.
    let next = tokio::spawn(svc.clone().oneshot(()));
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    gate.notify_one();
    next.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_response_future_releases_its_slot() {
    let layer = BulkheadLayer::new(1);
    let mut svc = layer.layer(service_fn(|_: ()| async {
        std::future::pending::<()>().await;
        Ok::<(), BoxError>(())
    }));
    let fut = svc.ready().await.unwrap().call(());
    assert_eq!(layer.in_flight(), 1);
    drop(fut);
    assert_eq!(layer.in_flight(), 0);
    // A cancelled (aborted) task too.
    let task = tokio::spawn(svc.clone().oneshot(()));
    tokio::task::yield_now().await;
    assert_eq!(layer.in_flight(), 1);
    task.abort();
    let _ = task.await;
    assert_eq!(layer.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn keyed_pools_are_independent_and_bounded() {
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let layer = KeyedBulkheadLayer::new(1, |k: &u32| *k).max_keys(2);
    let svc = layer.layer(service_fn(move |_: u32| {
        let g = g.clone();
        async move {
            g.notified().await;
            Ok::<_, BoxError>(())
        }
    }));
    let a = tokio::spawn(svc.clone().oneshot(1));
    let b = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    assert_eq!(svc.keys(), 2);
    // Key 1 is full; key 2 is full; key 3 finds the table full of busy pools.
    assert!(error::find::<BulkheadFull>(&*svc.clone().oneshot(1).await.unwrap_err()).is_some());
    assert!(error::find::<BulkheadFull>(&*svc.clone().oneshot(3).await.unwrap_err()).is_some());
    assert_eq!(svc.keys(), 2);
    gate.notify_waiters();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    // The table was found full of busy pools: for 50 ms new keys are
    // refused without a scan, though the pools are idle now.
    tokio::time::advance(Duration::from_millis(49)).await;
    assert!(error::find::<BulkheadFull>(&*svc.clone().oneshot(4).await.unwrap_err()).is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    // Then the idle pools make room for new keys, and the table stays bounded.
    for k in 10..1000u32 {
        let call = svc.clone().oneshot(k);
        tokio::pin!(call);
        tokio::select! {
            biased;
            _ = &mut call => panic!("the gate is closed"),
            _ = tokio::task::yield_now() => {}
        }
        gate.notify_waiters();
        call.await.unwrap();
        assert!(svc.keys() <= 2);
    }
}

/// A key whose `Hash` panics once (user code, run under the pool table's
/// lock) fails that call only: the table is not left poisoned, so every
/// later call, and `keys()`, still work.
#[tokio::test(start_paused = true)]
async fn a_panic_in_a_keys_hash_does_not_break_later_calls() {
    static PANIC: AtomicBool = AtomicBool::new(false);
    #[derive(Clone, PartialEq, Eq)]
    struct Key(u32);
    impl std::hash::Hash for Key {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            assert!(
                !PANIC.swap(false, Ordering::SeqCst),
                "a key's hash panicked"
            );
            self.0.hash(h);
        }
    }
    let layer = KeyedBulkheadLayer::new(1, |k: &u32| Key(*k));
    let mut svc = layer.layer(service_fn(|k: u32| async move { Ok::<_, BoxError>(k) }));
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    PANIC.store(true, Ordering::SeqCst);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| svc.call(2)));
    assert!(panicked.is_err(), "the key's hash did not run");
    assert_eq!(svc.clone().oneshot(2).await.unwrap(), 2);
    assert_eq!(svc.clone().oneshot(1).await.unwrap(), 1);
    assert!(svc.keys() <= 2);
}

#[test]
fn config_defaults_and_errors() {
    let cfg = BulkheadConfig::default();
    assert_eq!(cfg.max_concurrent, 1000);
    assert_eq!(cfg.max_wait, Duration::ZERO);
    assert_eq!(cfg.max_keys, 1024);
    let err = BulkheadConfig {
        max_concurrent: 0,
        ..Default::default()
    }
    .into_layer()
    .unwrap_err();
    assert_eq!(err.field(), "max_concurrent");
    let err = BulkheadConfig {
        max_keys: 0,
        ..Default::default()
    }
    .into_keyed_layer::<(), _>(|_: &()| ())
    .unwrap_err();
    assert_eq!(err.field(), "max_keys");
    let cfg: BulkheadConfig = toml::from_str("max_concurrent = 8\nmax_wait = \"20ms\"").unwrap();
    assert_eq!(cfg.max_wait, Duration::from_millis(20));
    assert!(toml::from_str::<BulkheadConfig>("max_concurent = 8").is_err());
}

#[tokio::test(start_paused = true)]
async fn end_to_end_a_slow_route_cannot_take_the_fast_one_down() {
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let slow = Router::new()
        .route(
            "/slow",
            get(move || {
                let g = g.clone();
                async move {
                    g.notified().await;
                    "slow"
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(support::handle_error))
                .layer(BulkheadLayer::new(2)),
        );
    let app = Router::new()
        .route("/fast", get(|| async { "fast" }))
        .merge(slow);
    let addr = support::serve(app).await;
    let client = support::client();

    let c1 = client.clone();
    let c2 = client.clone();
    let h1 = tokio::spawn(async move { support::get(&c1, addr, "/slow").await });
    let h2 = tokio::spawn(async move { support::get(&c2, addr, "/slow").await });
    // Wait until both slow calls hold their slots.
    let mut third = support::get(&client, addr, "/slow").await;
    for _ in 0..100 {
        if third.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        third = support::get(&client, addr, "/slow").await;
    }
    assert_eq!(third.status, 503);
    assert_eq!(third.kind(), "bulkhead_full");
    assert_eq!(support::get(&client, addr, "/fast").await.status, 200);
    gate.notify_waiters();
    assert_eq!(h1.await.unwrap().status, 200);
    assert_eq!(h2.await.unwrap().status, 200);
}

#[derive(Clone, Debug)]
enum Op {
    Start { hold_ms: u64 },
    Cancel(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..50).prop_map(|hold_ms| Op::Start { hold_ms }),
        2 => (0usize..64).prop_map(Op::Cancel),
        2 => (0u64..40).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Under random concurrent calls, cancellations and time, the inner
    /// service never sees more than `n` calls at once, a call is rejected at
    /// once only when all `n` slots are taken, and every slot comes back.
    #[test]
    fn in_flight_never_exceeds_the_bound(
        n in 1usize..5,
        wait_ms in prop_oneof![Just(0u64), 1u64..30],
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let live = Arc::new(AtomicUsize::new(0));
            let broke = Arc::new(AtomicBool::new(false));
            let layer = BulkheadLayer::new(n).max_wait(Duration::from_millis(wait_ms));
            let (l, b) = (live.clone(), broke.clone());
            let mut svc = layer.layer(service_fn(move |hold_ms: u64| {
                struct Guard(Arc<AtomicUsize>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                if l.fetch_add(1, Ordering::SeqCst) + 1 > n {
                    b.store(true, Ordering::SeqCst);
                }
                let guard = Guard(l.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                    drop(guard);
                    Ok::<_, BoxError>(())
                }
            }));
            let mut tasks = Vec::new();
            for op in ops {
                match op {
                    Op::Start { hold_ms } => {
                        let before = layer.in_flight();
                        let fut = svc.ready().await.unwrap().call(hold_ms);
                        tasks.push(tokio::spawn(async move {
                            let res = fut.await;
                            (before, res)
                        }));
                    }
                    Op::Cancel(i) => {
                        if let Some(t) = tasks.get(i) {
                            t.abort();
                        }
                    }
                    Op::Advance(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                }
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                assert!(layer.in_flight() <= n);
                assert!(!broke.load(Ordering::SeqCst), "more than {n} calls in flight");
            }
            for t in tasks {
                if let Ok((before, Err(err))) = t.await {
                    assert!(error::find::<BulkheadFull>(&*err).is_some());
                    if wait_ms == 0 {
                        assert_eq!(before, n, "rejected with a free slot");
                    }
                }
            }
            assert_eq!(layer.in_flight(), 0, "a slot was never released");
            assert_eq!(live.load(Ordering::SeqCst), 0);
        });
    }
}

/// Two worker threads racing releases against waiters: the bound holds, no
/// waiter is stranded while a slot is free, and every slot comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_hammering_one_bulkhead_keep_the_bound() {
    let n = 2;
    let live = Arc::new(AtomicUsize::new(0));
    let broke = Arc::new(AtomicBool::new(false));
    let layer = BulkheadLayer::new(n).max_wait(Duration::from_secs(5));
    let (l, b) = (live.clone(), broke.clone());
    let svc = layer.layer(service_fn(move |_: u32| {
        let (l, b) = (l.clone(), b.clone());
        async move {
            if l.fetch_add(1, Ordering::SeqCst) + 1 > n {
                b.store(true, Ordering::SeqCst);
            }
            tokio::task::yield_now().await;
            l.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        }
    }));
    // With a 5 s max_wait and calls of microseconds, a rejection or a stall
    // here means a lost wake-up.
    support::hammer(svc, 8, 250, |_, res| {
        res.unwrap();
    })
    .await;
    assert!(
        !broke.load(Ordering::SeqCst),
        "more than {n} calls in flight"
    );
    assert_eq!(layer.in_flight(), 0);
}

/// Two worker threads calling many keys through a small table of keyed
/// pools: the table never holds more than `max_keys` pools, no key ever
/// has more than its `max_concurrent` calls in flight (as two pools for one
/// key would allow), and every call is answered. A guard for the sharded
/// table; the single-mutex table before it passed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_over_many_keys_keep_the_key_bound() {
    const KEYS: usize = 200;
    let live: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let broke = Arc::new(AtomicBool::new(false));
    let layer = KeyedBulkheadLayer::new(4, |k: &u64| *k).max_keys(16);
    let (l, b) = (live.clone(), broke.clone());
    let svc = layer.layer(service_fn(move |k: u64| {
        let (l, b) = (l.clone(), b.clone());
        async move {
            let slot = &l[usize::try_from(k).unwrap()];
            if slot.fetch_add(1, Ordering::SeqCst) + 1 > 4 {
                b.store(true, Ordering::SeqCst);
            }
            tokio::task::yield_now().await;
            slot.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(k)
        }
    }));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut worst) = (0, 0);
            for i in 0..2_000u64 {
                // A few hot keys, so that calls of one key overlap.
                let key = if i % 2 == 0 {
                    i % 3
                } else {
                    (i * 7 + t * 31) % 200
                };
                let probe = svc.clone();
                match svc.clone().oneshot(key).await {
                    Ok(k) => {
                        assert_eq!(k, key);
                        ok += 1;
                    }
                    Err(e) => assert!(error::find::<BulkheadFull>(&*e).is_some()),
                }
                worst = worst.max(probe.keys());
            }
            (ok, worst)
        }));
    }
    let all = async {
        let (mut ok, mut worst) = (0, 0);
        for t in tasks {
            let (o, w) = t.await.unwrap();
            ok += o;
            worst = worst.max(w);
        }
        (ok, worst)
    };
    let (ok, worst) = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every call was answered");
    assert!(worst <= 16, "the table held {worst} pools");
    assert!(ok > 0);
    assert!(
        !broke.load(Ordering::SeqCst),
        "a key had more than 4 calls in flight"
    );
}
