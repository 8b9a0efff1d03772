//! The chaos layer: each fault, the phases, and reproducibility from a seed.

use bytes::Bytes;
use http_body_util::Full;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::chaos::{
    ChaosConfig, ChaosLayer, FaultKind, Faults, INJECTED_HEADER, InjectedFault, Latency, Phase,
    PhaseKind, Schedule,
};
use tower_firebreak::error;

const S: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

/// An echo service that counts the calls it gets.
fn echo(
    count: Arc<AtomicU64>,
) -> impl Service<u64, Response = u64, Error = BoxError, Future: Send> + Clone {
    service_fn(move |x: u64| {
        count.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(x) }
    })
}

/// What happened to one call, as seen by the caller.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Seen {
    Ok,
    Error,
    Abort,
}

fn seen(r: &Result<u64, BoxError>) -> Seen {
    match r {
        Ok(_) => Seen::Ok,
        Err(e) => match error::find::<InjectedFault>(&**e)
            .expect("an injected fault")
            .kind()
        {
            FaultKind::Error => Seen::Error,
            FaultKind::Abort => Seen::Abort,
            _ => unreachable!(),
        },
    }
}

/// Runs `n` calls one after another and records what each one got.
async fn run(layer: &ChaosLayer, n: u64) -> Vec<Seen> {
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(echo(Arc::default()));
    let mut out = Vec::new();
    for i in 0..n {
        out.push(seen(&svc.clone().oneshot(i).await));
    }
    out
}

#[tokio::test(start_paused = true)]
async fn fixed_latency_delays_the_call_to_the_inner_service() {
    let layer = ChaosLayer::builder(Schedule::always(
        Faults::none().latency(Latency::fixed(MS(250)), 1.0),
    ))
    .build()
    .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(echo(count.clone()));
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(7));
    tokio::time::sleep(MS(249)).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        0,
        "not called before the delay"
    );
    assert_eq!(call.await.unwrap().unwrap(), 7);
    assert_eq!(start.elapsed(), MS(250));
    assert_eq!(count.load(Ordering::SeqCst), 1);
    let stats = layer.stats();
    assert_eq!((stats.calls, stats.delayed, stats.passed), (1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn latency_distributions_stay_in_range_and_hit_the_rate() {
    for latency in [
        Latency::uniform(MS(100), MS(300)),
        Latency::exponential(MS(50), MS(400)),
    ] {
        let (lo, hi) = match latency {
            Latency::Uniform { min, max } => (min, max),
            _ => (Duration::ZERO, MS(400)),
        };
        let layer = ChaosLayer::builder(Schedule::always(
            Faults::none().latency(latency.clone(), 0.3),
        ))
        .seed(11)
        .build()
        .unwrap();
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(echo(Arc::default()));
        let mut slow = 0;
        let mut total = Duration::ZERO;
        for i in 0..2000 {
            let t = Instant::now();
            svc.clone().oneshot(i).await.unwrap();
            let took = t.elapsed();
            if !took.is_zero() {
                slow += 1;
                total += took;
                assert!(took >= lo && took <= hi, "{latency:?}: {took:?}");
            }
        }
        // 30% of 2000 = 600; a fair generator lands well within ±80.
        assert!((520..=680).contains(&slow), "{latency:?}: {slow} delayed");
        assert_eq!(layer.stats().delayed, slow);
        if let Latency::Exponential { mean, .. } = latency {
            let avg = total / slow as u32;
            assert!(avg > mean / 2 && avg < mean * 2, "mean {avg:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn errors_at_a_rate_never_reach_the_inner_service() {
    let layer = ChaosLayer::builder(Schedule::always(Faults::none().errors(0.5)))
        .seed(3)
        .build()
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(echo(count.clone()));
    let mut errors = 0;
    for i in 0..1000 {
        match svc.clone().oneshot(i).await {
            Ok(x) => assert_eq!(x, i),
            Err(e) => {
                let f = error::find::<InjectedFault>(&*e).unwrap();
                assert_eq!(f.kind(), FaultKind::Error);
                assert_eq!(e.to_string(), "chaos: injected error");
                errors += 1;
            }
        }
    }
    assert!((440..=560).contains(&errors), "{errors} errors");
    assert_eq!(count.load(Ordering::SeqCst), 1000 - errors);
    let stats = layer.stats();
    assert_eq!(stats.errors, errors);
    assert_eq!(stats.passed, 1000 - errors);
}

#[tokio::test(start_paused = true)]
async fn http_errors_are_responses_with_the_status() {
    let layer = ChaosLayer::builder(Schedule::always(Faults::none().errors(1.0)))
        .http_status(http::StatusCode::SERVICE_UNAVAILABLE)
        .build()
        .unwrap();
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(|_req: http::Request<()>| async {
                Ok::<_, BoxError>(http::Response::new(Full::<Bytes>::from("real")))
            }));
    let res = svc.oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[INJECTED_HEADER], "injected-error");
}

#[tokio::test(start_paused = true)]
async fn a_hang_lasts_until_its_phase_ends() {
    let layer = ChaosLayer::builder(Schedule::new(vec![
        Phase::healthy(S(1)),
        Phase::failing(S(10), Faults::none().hangs(1.0)),
    ]))
    .build()
    .unwrap();
    let start = layer.start();
    let count = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(echo(count.clone()));
    tokio::time::sleep(S(3)).await;
    let call = tokio::spawn(svc.clone().oneshot(1));
    tokio::time::sleep(S(7)).await;
    assert!(
        !call.is_finished(),
        "still hanging 1 s before the phase ends"
    );
    assert_eq!(count.load(Ordering::SeqCst), 0);
    assert_eq!(call.await.unwrap().unwrap(), 1);
    assert_eq!(start.elapsed(), S(11), "answered when the phase ended");
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // After the schedule, healthy again: an immediate answer.
    let t = Instant::now();
    assert_eq!(svc.oneshot(2).await.unwrap(), 2);
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(layer.stats().hangs, 1);
}

#[tokio::test(start_paused = true)]
async fn a_hang_in_an_open_ended_phase_never_answers() {
    let layer = ChaosLayer::builder(Schedule::always(Faults::none().hangs(1.0)))
        .build()
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(echo(count.clone()));
    let r = tokio::time::timeout(Duration::from_secs(3600), svc.oneshot(1)).await;
    assert!(r.is_err(), "no answer within an hour");
    assert_eq!(count.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn aborts_are_errors_of_their_own_kind() {
    let layer = ChaosLayer::builder(Schedule::always(Faults::none().aborts(1.0)))
        .http_status(http::StatusCode::SERVICE_UNAVAILABLE)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_req: http::Request<()>| async {
            Ok::<_, BoxError>(http::Response::new(Full::<Bytes>::default()))
        }));
    let err = svc.oneshot(http::Request::new(())).await.unwrap_err();
    let f = error::find::<InjectedFault>(&*err).unwrap();
    assert_eq!(f.kind(), FaultKind::Abort);
    assert_eq!(layer.stats().aborts, 1);
}

/// Behind a real hyper server, an abort closes the connection: the client
/// gets an error, not a response.
#[tokio::test]
async fn an_abort_behind_hyper_drops_the_connection() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let layer = ChaosLayer::builder(Schedule::always(Faults::none().aborts(1.0)))
        .http_status(http::StatusCode::SERVICE_UNAVAILABLE)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new().layer(layer).service(service_fn(
        |_req: http::Request<hyper::body::Incoming>| async {
            Ok::<_, BoxError>(http::Response::new(Full::<Bytes>::from("ok")))
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Full::default())
        .unwrap();
    let err = client.request(req).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("IncompleteMessage") || text.contains("reset") || text.contains("closed"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn phases_follow_the_schedule_and_recovery_fades_out() {
    let faults = Faults::none().errors(1.0);
    let layer = ChaosLayer::builder(Schedule::new(vec![
        Phase::healthy(S(1)),
        Phase::failing(S(1), faults.clone()),
        Phase::recovering(S(2), faults),
    ]))
    .seed(5)
    .build()
    .unwrap();
    let start = layer.start();
    // 100 calls spread over each 100 ms slice of the 5 s.
    let mut errors_per_slice = Vec::new();
    for slice in 0..50u64 {
        tokio::time::sleep_until(start + MS(100 * slice)).await;
        let seen = run(&layer, 100).await;
        errors_per_slice.push(seen.iter().filter(|s| **s == Seen::Error).count());
    }
    assert!(errors_per_slice[..10].iter().all(|&e| e == 0), "healthy");
    assert!(
        errors_per_slice[10..20].iter().all(|&e| e == 100),
        "failing"
    );
    let early: usize = errors_per_slice[20..25].iter().sum();
    let late: usize = errors_per_slice[35..40].iter().sum();
    // Rates 1.0 → 0.0 over 2 s: about 89% in the first 0.5 s, 14% in the last.
    assert!(early > 350 && late < 150, "early {early}, late {late}");
    assert!(
        errors_per_slice[40..].iter().all(|&e| e == 0),
        "healthy after"
    );
    assert_eq!(layer.phase_at(start + MS(500)), PhaseKind::Healthy);
    assert_eq!(layer.phase_at(start + MS(1500)), PhaseKind::Failing);
    assert_eq!(layer.phase_at(start + MS(2500)), PhaseKind::Recovering);
    assert_eq!(layer.phase_at(start + S(9)), PhaseKind::Healthy);
}

#[tokio::test(start_paused = true)]
async fn a_repeating_schedule_flaps() {
    let layer = ChaosLayer::builder(
        Schedule::new(vec![
            Phase::healthy(S(2)),
            Phase::failing(S(2), Faults::none().errors(1.0)),
        ])
        .repeat(),
    )
    .build()
    .unwrap();
    let start = layer.start();
    for (at, expect) in [
        (MS(1000), Seen::Ok),
        (MS(2500), Seen::Error),
        (MS(4100), Seen::Ok),
        (MS(7999), Seen::Error),
        (MS(100_001), Seen::Ok),
        (MS(102_001), Seen::Error),
    ] {
        tokio::time::sleep_until(start + at).await;
        assert_eq!(run(&layer, 1).await, vec![expect], "at {at:?}");
    }
    let timeline = layer.schedule().timeline(S(5));
    assert_eq!(
        timeline,
        vec![
            (S(0), S(2), PhaseKind::Healthy),
            (S(2), S(4), PhaseKind::Failing),
            (S(4), S(5), PhaseKind::Healthy),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_faults() {
    let faults = Faults::none().errors(0.3).aborts(0.2);
    let build = |seed| {
        ChaosLayer::builder(Schedule::always(faults.clone()))
            .seed(seed)
            .build()
            .unwrap()
    };
    let a = run(&build(99), 500).await;
    let b = run(&build(99), 500).await;
    let c = run(&build(100), 500).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    let count = |v: &[Seen], s| v.iter().filter(|x| **x == s).count();
    assert!((100..=200).contains(&count(&a, Seen::Error)));
    assert!((60..=140).contains(&count(&a, Seen::Abort)));
}

#[tokio::test(start_paused = true)]
async fn faults_do_not_depend_on_how_concurrent_calls_interleave() {
    // The n-th call's fault depends on n only: whatever the calls do in
    // between (here, some are slow), the sequence is the same.
    let faults = Faults::none()
        .errors(0.4)
        .latency(Latency::uniform(MS(1), MS(50)), 0.5);
    let layer = |seed| {
        ChaosLayer::builder(Schedule::always(faults.clone()))
            .seed(seed)
            .build()
            .unwrap()
    };
    let sequential = run(&layer(8), 200).await;
    let l = layer(8);
    let svc = ServiceBuilder::new()
        .layer(l.clone())
        .service(echo(Arc::default()));
    let mut calls = Vec::new();
    for i in 0..200 {
        // `call` runs in order here; the responses finish in any order.
        let mut s = svc.clone();
        s.ready().await.unwrap();
        calls.push(tokio::spawn(s.call(i)));
    }
    let mut concurrent = Vec::new();
    for c in calls {
        concurrent.push(seen(&c.await.unwrap()));
    }
    assert_eq!(sequential, concurrent);
}

#[test]
fn config_loads_and_rejects_bad_settings() {
    let cfg: ChaosConfig = toml::from_str(
        r#"
        seed = 1
        [[phases]]
        kind = "healthy"
        duration = "1s"
        [[phases]]
        kind = "failing"
        faults = { hang_rate = 1.0 }
        "#,
    )
    .unwrap();
    let schedule = cfg.schedule();
    assert_eq!(schedule.phases()[1].duration, None);
    assert_eq!(schedule.phases()[1].faults.hang_rate, 1.0);
    assert!(cfg.clone().into_layer().is_ok());

    let bad = |cfg: ChaosConfig| cfg.validate().unwrap_err();
    let mut c = cfg.clone();
    c.phases[1].faults.error_rate = 1.5;
    let e = bad(c);
    assert_eq!(e.field(), "phases[1].faults.error_rate");

    let mut c = cfg.clone();
    c.phases[1].faults.error_rate = 0.5;
    assert!(bad(c).to_string().contains("must not exceed 1.0"));

    let mut c = cfg.clone();
    c.repeat = true;
    assert_eq!(bad(c).field(), "phases[1].duration");

    let mut c = cfg.clone();
    c.phases[0].faults.latency_rate = 0.5;
    assert_eq!(bad(c).field(), "phases[0].faults.latency_rate");

    let mut c = cfg.clone();
    c.error_status = 42;
    assert_eq!(bad(c).field(), "error_status");

    let e = toml::from_str::<ChaosConfig>("seeds = 1").unwrap_err();
    assert!(e.to_string().contains("seeds"));

    let e = ChaosLayer::builder(Schedule::always(
        Faults::none().latency(Latency::uniform(S(2), S(1)), 1.0),
    ))
    .build()
    .unwrap_err();
    assert_eq!(e.other_field(), Some("phases[0].faults.latency.max"));
}

#[tokio::test(start_paused = true)]
async fn chaos_new_wraps_a_service_directly() {
    use tower_firebreak::chaos::Chaos;
    let count = Arc::new(AtomicU64::new(0));
    let svc = Chaos::new(
        echo(count.clone()),
        Schedule::always(Faults::none().errors(1.0)),
        1,
    )
    .unwrap();
    assert_eq!(svc.get_ref().clone().oneshot(5).await.unwrap(), 5);
    let err = svc.clone().oneshot(6).await.unwrap_err();
    assert!(error::find::<InjectedFault>(&*err).is_some());
    assert_eq!(svc.stats().errors, 1);
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "only the direct call reached it"
    );
    assert!(Chaos::new(echo(count), Schedule::always(Faults::none().hangs(2.0)), 1).is_err());
}

proptest::proptest! {
    /// The phase in force at any instant is the one `timeline()` shows there,
    /// for schedules that repeat or not.
    #[test]
    fn phase_at_agrees_with_the_timeline(
        phases in proptest::collection::vec((0u8..3, 0u64..3_000), 1..5),
        repeat in proptest::bool::ANY,
        at_ms in 0u64..30_000,
    ) {
        let kinds = [PhaseKind::Healthy, PhaseKind::Failing, PhaseKind::Recovering];
        let phases: Vec<_> = phases
            .into_iter()
            .map(|(k, d)| Phase {
                kind: kinds[k as usize],
                duration: Some(MS(d)),
                faults: Faults::none().errors(1.0),
            })
            .collect();
        let schedule = Schedule::new(phases);
        let schedule = if repeat { schedule.repeat() } else { schedule };
        let Ok(layer) = ChaosLayer::builder(schedule.clone()).start_at(Instant::now()).build()
        else {
            // Only a repeating schedule of zero-length phases is refused.
            proptest::prop_assert!(repeat);
            proptest::prop_assert!(schedule.phases().iter().all(|p| p.duration == Some(Duration::ZERO)));
            return Ok(());
        };
        let at = MS(at_ms);
        let expected = schedule
            .timeline(MS(30_001))
            .into_iter()
            .find(|&(s, e, _)| s <= at && at < e)
            .map_or(PhaseKind::Healthy, |(_, _, k)| k);
        proptest::prop_assert_eq!(layer.phase_at(layer.start() + at), expected);
    }
}

#[tokio::test(start_paused = true)]
async fn boxes_as_a_clone_sync_service_with_send_futures() {
    // The public contract (DESIGN.md): Clone + Send + Sync services and
    // Send + 'static futures, so a stack can be boxed and shared as axum state.
    let layer = ChaosLayer::builder(Schedule::always(
        Faults::none().latency(Latency::fixed(MS(10)), 1.0),
    ))
    .build()
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(echo(Arc::default()));
    let boxed = tower::util::BoxCloneSyncService::new(svc);
    let answer = tokio::spawn(boxed.clone().oneshot(3)).await.unwrap();
    assert_eq!(answer.unwrap(), 3);
}

/// `Duration::MAX` anywhere in a schedule ("for as long as can be") is no
/// panic: not in validation (a repeating cycle's sum), not on a call (a
/// latency, a hang until a phase ends, a phase boundary after the clock
/// passed an earlier one).
#[tokio::test(start_paused = true)]
async fn duration_max_in_a_schedule_does_not_panic() {
    let count = Arc::new(AtomicU64::new(0));
    let slow = ChaosLayer::builder(Schedule::always(
        Faults::none().latency(Latency::fixed(Duration::MAX), 1.0),
    ))
    .build()
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(slow)
        .service(echo(count.clone()));
    let r = tokio::time::timeout(S(60), svc.oneshot(1)).await;
    assert!(r.is_err(), "a call delayed for ever answered");

    let hang = ChaosLayer::builder(Schedule::new(vec![
        Phase::healthy(S(1)),
        Phase::failing(Duration::MAX, Faults::none().hangs(1.0)),
    ]))
    .build()
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(hang)
        .service(echo(count.clone()));
    tokio::time::sleep(S(2)).await;
    let r = tokio::time::timeout(S(60), svc.oneshot(2)).await;
    assert!(r.is_err(), "a call in an endless hang answered");
    assert_eq!(count.load(Ordering::SeqCst), 0);

    // A repeating schedule whose cycle does not fit a Duration.
    let repeating = ChaosLayer::builder(
        Schedule::new(vec![
            Phase::failing(Duration::MAX, Faults::none().errors(1.0)),
            Phase::healthy(S(1)),
        ])
        .repeat(),
    )
    .build();
    if let Ok(layer) = repeating {
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(echo(count.clone()));
        assert!(svc.oneshot(3).await.is_err(), "the failing phase is first");
    }
}
