//! The fault benchmark: what A's callers see when A's dependency B fails,
//! with each protection stack on A's client, side by side in one run.
//!
//! Run: `cargo run --release --example fault_bench` (a few minutes), or
//! `cargo run --release --example fault_bench -- --quick` (under a minute,
//! what CI runs). `--seed N` changes the chaos seed (default 8).
//!
//! Everything runs in this process, over loopback sockets:
//!
//! ```text
//! load generator ──HTTP──▶ A (axum) ──stack──▶ hyper ──HTTP──▶ B (axum + ChaosLayer)
//! open loop, constant       handler calls B         one stack per copy of A
//! arrival rate              through the stack
//! ```
//!
//! Each scenario runs every stack at once, each with its own A and B and the
//! same chaos schedule, seed and start instant. The load generator is open
//! loop: call `i` is due at `start + i / rate` and is sent then whether or not
//! earlier calls have answered, and its latency counts from when it was due.
//! A closed loop would wait for the slow calls and so send fewer of them,
//! which hides exactly the latency this benchmark is about (coordinated
//! omission, Gil Tene).
//!
//! Stacks: none; tower's own layers; tower-resilience 0.13; ours, the
//! `Resilience` preset; and ours with `defer` in front of the preset, on a
//! `DiskQueue` under `target/fault_bench/queues/`. For that last stack A
//! sends `POST`s with a unique `Idempotency-Key` (the load generator's call
//! number), so a failed call is stored and answered 202; a `Replayer` starts
//! when B recovers and delivers the jobs, paced, through the same preset. B
//! dedups by key, so after the drain a delivered job is a key B served, and a
//! lost one is a call A accepted (200 or 202) whose key B never served.
//!
//! Output: a table, verdicts, `target/fault_bench/results.json` and
//! `target/fault_bench/latency.svg` (A's p99 latency and in-flight calls over
//! time per stack, fault phases shaded). The verdicts that do not depend on
//! timing are checked, and the run exits non-zero if one fails.

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::StatusCode;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_firebreak::BoxError;
use tower_firebreak::chaos::{ChaosLayer, Faults, Latency, Phase, PhaseKind, Schedule};
use tower_firebreak::circuit_breaker::{
    CircuitBreakerConfig, CircuitBreakerHandle, State as BreakerState,
};
use tower_firebreak::defer::{DeferBody, DeferLayer, Replayer, ReplayerHandle};
use tower_firebreak::error::Rejection;
use tower_firebreak::preset::{Resilience, ResilienceConfig, ResilienceLayer};
use tower_firebreak::queue::Queue;
use tower_firebreak::queue::disk::DiskQueue;
use tower_firebreak::retry::{ReplayBody, RetryBudgetConfig, RetryConfig};

// ---------------------------------------------------------------------------
// Settings

/// The knobs every stack shares, so the stacks differ only in their layers.
#[derive(Clone, Copy, Debug, Serialize)]
struct Params {
    /// Calls per second offered to each copy of A.
    rate: u32,
    /// One attempt's timeout (every stack that has one).
    attempt_timeout: Duration,
    /// Our whole-call deadline (the preset's).
    deadline: Duration,
    /// The preset's retry: first delay (exponential, full jitter); its
    /// budget is [`RetryBudgetConfig::default()`].
    retry_base_delay: Duration,
    /// The preset's breaker: open after `breaker_consecutive` failed
    /// attempts in a row, for `breaker_open_for`.
    breaker_consecutive: u32,
    breaker_open_for: Duration,
    /// Probes the preset's breaker admits while half-open.
    breaker_probes: usize,
    /// Deliveries a second of the `defer` stack's replayer, and its burst.
    replay_rate: u32,
    replay_burst: u32,
    /// How long the run waits, after the load, for the replayer to empty
    /// the queue.
    drain_timeout: Duration,
    /// Calls to B in flight at once (bulkheads, tower's concurrency limit).
    concurrency: usize,
    /// Attempts per call, the first included, for the stacks that retry.
    attempts: u32,
    /// The load generator gives up on a call to A after this long.
    caller_timeout: Duration,
    /// The chaos seed.
    seed: u64,
}

impl Params {
    fn new(quick: bool, seed: u64) -> Self {
        Params {
            rate: if quick { 100 } else { 200 },
            attempt_timeout: Duration::from_secs(1),
            deadline: Duration::from_millis(2500),
            // The first delay tower-resilience's retry gets below, so the
            // two retries differ in their budget, not their backoff.
            retry_base_delay: Duration::from_millis(50),
            // Failures in a row, not a rate: a hang, a flap or a refused
            // connection fails every attempt, so the breaker opens on the
            // 15th (within 0.1-0.2 s of the first attempt timeouts, well
            // inside the 5-10 s hang), while "503 at 50%" has 15 failures in
            // a row with probability 2^-15 per attempt, so there the retries
            // and their budget do the work. A 50% failure rate threshold
            // would sit exactly at that scenario's error rate (a trial run
            // with 50% of the last 20 calls opened there and shed most
            // calls).
            breaker_consecutive: 15,
            breaker_open_for: Duration::from_secs(1),
            breaker_probes: 3,
            // Five times the offered rate: fast enough to drain an outage's
            // backlog in a few seconds, slow enough to be visibly paced.
            replay_rate: if quick { 500 } else { 1000 },
            replay_burst: 10,
            drain_timeout: Duration::from_secs(if quick { 10 } else { 30 }),
            concurrency: 50,
            attempts: 3,
            caller_timeout: Duration::from_secs(30),
            seed,
        }
    }
}

// ---------------------------------------------------------------------------
// Scenarios

/// What B does during one run.
struct Scenario {
    key: &'static str,
    title: String,
    /// The chaos layer's schedule; also what the plot shades.
    schedule: Schedule,
    /// B's listener is closed and its connections dropped over this window
    /// (connection refused), then the same port is bound again.
    outage: Option<(Duration, Duration)>,
    /// How long calls are offered.
    length: Duration,
    /// The (first) fault window, measured from the start.
    fault: (Duration, Duration),
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let s = |full: u64, q: u64| Duration::from_secs(if quick { q } else { full });
    let three = |before: Duration, during: Duration, after: Duration, faults: Faults| {
        Schedule::new(vec![
            Phase::healthy(before),
            Phase::failing(during, faults),
            Phase::healthy(after),
        ])
    };
    let mut out = Vec::new();

    let len = s(10, 3);
    out.push(Scenario {
        key: "healthy",
        title: "B healthy".into(),
        schedule: Schedule::default(),
        outage: None,
        length: len,
        fault: (len, len),
    });

    let (pre, hang, post) = (s(2, 1), s(10, 5), s(5, 2));
    out.push(Scenario {
        key: "hang",
        title: format!("B hangs for {} s", hang.as_secs()),
        schedule: three(pre, hang, post, Faults::none().hangs(1.0)),
        outage: None,
        length: pre + hang + post,
        fault: (pre, pre + hang),
    });

    let (pre, bad, post) = (s(2, 1), s(10, 3), s(3, 1));
    out.push(Scenario {
        key: "errors",
        title: format!("B returns 503 at 50% for {} s", bad.as_secs()),
        schedule: three(pre, bad, post, Faults::none().errors(0.5)),
        outage: None,
        length: pre + bad + post,
        fault: (pre, pre + bad),
    });

    out.push(Scenario {
        key: "slow",
        title: format!("B adds 2 s to 20% of calls for {} s", bad.as_secs()),
        schedule: three(
            pre,
            bad,
            post,
            Faults::none().latency(Latency::fixed(Duration::from_secs(2)), 0.2),
        ),
        outage: None,
        length: pre + bad + post,
        fault: (pre, pre + bad),
    });

    let flap = Duration::from_secs(2);
    out.push(Scenario {
        key: "flaps",
        title: "B flaps every 2 s (healthy, then every connection aborted)".into(),
        schedule: Schedule::new(vec![
            Phase::healthy(flap),
            Phase::failing(flap, Faults::none().aborts(1.0)),
        ])
        .repeat(),
        outage: None,
        length: s(20, 8),
        fault: (flap, flap * 2),
    });

    let (pre, down, post) = (s(2, 1), s(6, 3), s(4, 2));
    out.push(Scenario {
        key: "down",
        title: format!(
            "B down for {} s (connection refused), then back",
            down.as_secs()
        ),
        // No injected faults: the harness closes B's listener during the
        // failing phase. The phase is there for the plot and the verdicts.
        schedule: three(pre, down, post, Faults::none()),
        outage: Some((pre, pre + down)),
        length: pre + down + post,
        fault: (pre, pre + down),
    });
    out
}

// ---------------------------------------------------------------------------
// Protection stacks

type Req = http::Request<Full<Bytes>>;
type Body = BoxBody<Bytes, BoxError>;
/// A's client to B: every stack is one of these, so a new one is one more
/// entry in [`stacks`].
type Client = BoxCloneSyncService<Req, http::Response<Body>, BoxError>;

/// A named constructor of a protection stack.
struct Stack {
    name: &'static str,
    about: &'static str,
    /// Builds A's client; the path is a fresh file for a disk queue.
    build: fn(&Params, &Path) -> Built,
}

/// What a stack's constructor gives A.
struct Built {
    client: Client,
    /// For a stack with `defer`: its queue and the client its replayer
    /// sends through. A then sends POSTs with an `Idempotency-Key`.
    defer: Option<DeferParts>,
    /// Our breaker, to time the calls that arrive while it is open.
    breaker: Option<CircuitBreakerHandle>,
}

#[derive(Clone)]
struct DeferParts {
    queue: DiskQueue,
    replay: Client,
    /// The preset's breaker, which the replayer is gated on.
    breaker: CircuitBreakerHandle,
}

impl From<Client> for Built {
    fn from(client: Client) -> Self {
        Built {
            client,
            defer: None,
            breaker: None,
        }
    }
}

fn stacks() -> Vec<Stack> {
    vec![
        Stack {
            name: "none",
            about: "hyper alone",
            build: |p, _| stack_none(p).into(),
        },
        Stack {
            name: "tower",
            about: "tower: load shed + concurrency limit + retry (trivial policy) + timeout",
            build: |p, _| stack_tower(p).into(),
        },
        Stack {
            name: "tower-resilience",
            about: "tower-resilience 0.13: bulkhead + circuit breaker + retry + time limiter",
            build: |p, _| stack_tower_resilience(p).into(),
        },
        Stack {
            name: "ours (preset)",
            about: "firebreak: Resilience::builder() (bulkhead + deadline + retry with budget + breaker + attempt timeout)",
            build: |p, _| {
                let layer = preset_layer(p);
                Built {
                    client: preset_client(&layer),
                    defer: None,
                    breaker: Some(layer.breaker()),
                }
            },
        },
        Stack {
            name: "ours + defer",
            about: "firebreak: DeferLayer on a DiskQueue over the same preset; POSTs with an Idempotency-Key; a Replayer drains after recovery",
            build: stack_defer,
        },
    ]
}

/// hyper's pooled HTTP/1 client with our error and body types.
fn base_client() -> Client {
    let hyper = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_err(BoxError::from)
            .map_response(|r: http::Response<Incoming>| {
                r.map(|b| b.map_err(BoxError::from).boxed())
            })
            .service(hyper),
    )
}

fn stack_none(_: &Params) -> Client {
    base_client()
}

fn stack_tower(p: &Params) -> Client {
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(p.concurrency)
            .retry(TrivialRetry(p.attempts))
            .timeout(p.attempt_timeout)
            .service(base_client()),
    )
}

fn stack_tower_resilience(p: &Params) -> Client {
    use tower_resilience::bulkhead::BulkheadLayer as TrBulkhead;
    use tower_resilience::circuitbreaker::{CircuitBreakerError, CircuitBreakerLayer};
    use tower_resilience::retry::RetryLayer;
    use tower_resilience::timelimiter::{TimeLimiterError, TimeLimiterLayer};

    let time_limiter = TimeLimiterLayer::builder()
        .timeout_duration(p.attempt_timeout)
        .cancel_running_future(true)
        .build();
    let retry = RetryLayer::<Req, http::Response<Body>, BoxError>::builder()
        .max_attempts(p.attempts as usize)
        .exponential_backoff(Duration::from_millis(50))
        .retry_on(|e: &BoxError| shed_kind(e).is_none())
        .retry_on_response(|r: &http::Response<Body>| r.status().is_server_error())
        .build();
    let breaker = CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(20)
        .minimum_number_of_calls(10)
        .wait_duration_in_open(Duration::from_secs(2))
        .permitted_calls_in_half_open(3)
        .failure_classifier(|r: &Result<http::Response<Body>, BoxError>| match r {
            Ok(res) => res.status().is_server_error(),
            Err(_) => true,
        })
        .build()
        .expect("valid breaker settings");
    let bulkhead = TrBulkhead::builder()
        .max_concurrent_calls(p.concurrency)
        .reject_when_full()
        .build()
        .expect("valid bulkhead settings");

    // Each layer has its own error type; flatten them back to BoxError
    // between layers, keeping which ones were shed calls.
    let svc = ServiceBuilder::new()
        .layer(time_limiter)
        .service(base_client())
        .map_err(|e: TimeLimiterError<BoxError>| match e {
            TimeLimiterError::Timeout => BoxError::from(Failed("attempt timed out")),
            TimeLimiterError::Inner(e) => e,
        });
    let svc = ServiceBuilder::new().layer(retry).service(svc);
    let svc = ServiceBuilder::new().layer(breaker).service(svc).map_err(
        |e: CircuitBreakerError<BoxError>| match e {
            CircuitBreakerError::OpenCircuit => BoxError::from(Shed("circuit_open")),
            CircuitBreakerError::Inner(e) => e,
        },
    );
    let svc = ServiceBuilder::new()
        .layer(bulkhead)
        .service(svc)
        .map_err(|e| {
            if e.is_bulkhead() {
                BoxError::from(Shed("bulkhead_full"))
            } else {
                e.into_inner()
                    .unwrap_or_else(|| BoxError::from(Failed("bulkhead error")))
            }
        });
    BoxCloneSyncService::new(svc)
}

/// The preset with the settings in [`Params`].
fn preset_layer(p: &Params) -> ResilienceLayer {
    Resilience::builder()
        .bulkhead(p.concurrency)
        .deadline(p.deadline)
        .attempt_timeout(p.attempt_timeout)
        .retry(RetryConfig {
            max_attempts: p.attempts,
            base_delay: p.retry_base_delay,
            ..RetryConfig::default()
        })
        .circuit_breaker(CircuitBreakerConfig {
            count_window: None,
            time_window: None,
            consecutive_failures: Some(p.breaker_consecutive),
            open_for: p.breaker_open_for,
            half_open_calls: p.breaker_probes,
            ..ResilienceConfig::default_breaker()
        })
        .build()
        .expect("valid preset settings")
}

/// The preset around hyper (whose bodies the preset buffers for replay).
fn preset_client(layer: &ResilienceLayer) -> Client {
    let hyper = HyperClient::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: http::Response<Incoming>| {
                r.map(|b| b.map_err(BoxError::from).boxed())
            })
            .layer(layer.clone())
            .service(hyper),
    )
}

/// `defer` in front of the preset, on a disk queue at `path`. The replayer
/// sends through its own copy of the preset, which shares the breaker (and
/// bulkhead) with A's: nothing is replayed while the breaker is open.
fn stack_defer(p: &Params, path: &Path) -> Built {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the queue directory");
    }
    let _ = std::fs::remove_file(path);
    let queue = DiskQueue::builder()
        .capacity(1_000_000)
        // Every lease counts as an attempt, also one the breaker gave back
        // unsent: plenty, so that no job is dead-lettered in a long outage.
        .max_attempts(10_000)
        .open(path)
        .expect("open the disk queue");
    let layer = preset_layer(p);
    let client = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|r: http::Response<Either<Body, DeferBody>>| {
                r.map(|b| b.map_err(BoxError::from).boxed())
            })
            .layer(DeferLayer::new(queue.clone()))
            .service(preset_client(&layer)),
    );
    Built {
        client,
        defer: Some(DeferParts {
            queue,
            replay: preset_client(&layer),
            breaker: layer.breaker(),
        }),
        breaker: Some(layer.breaker()),
    }
}

/// tower's `Retry` with the policy people write first: retry any error or
/// 5xx at once, up to a number of attempts. No backoff, no budget.
#[derive(Clone)]
struct TrivialRetry(u32);

impl tower::retry::Policy<Req, http::Response<Body>, BoxError> for TrivialRetry {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _req: &mut Req,
        result: &mut Result<http::Response<Body>, BoxError>,
    ) -> Option<Self::Future> {
        let failed = match result {
            Ok(res) => res.status().is_server_error(),
            Err(_) => true,
        };
        (failed && self.0 > 1).then(|| {
            self.0 -= 1;
            std::future::ready(())
        })
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        let mut r = http::Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

/// A call a stack refused to make (a peer library's rejection, renamed).
#[derive(Debug)]
struct Shed(&'static str);

/// A peer library's failure, renamed.
#[derive(Debug)]
struct Failed(&'static str);

impl fmt::Display for Shed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}
impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for Shed {}
impl std::error::Error for Failed {}

/// Which layer refused the call without trying B (a rejection), if one
/// did, as opposed to trying and failing. One of [`SHED_KINDS`].
fn shed_kind(e: &BoxError) -> Option<&'static str> {
    if let Some(r) = Rejection::of(&**e).filter(|r| r.is_shed()) {
        return Some(r.kind().as_str());
    }
    if tower_firebreak::error::find::<tower::load_shed::error::Overloaded>(&**e).is_some() {
        return Some("load_shed");
    }
    tower_firebreak::error::find::<Shed>(&**e).map(|s| s.0)
}

/// Every rejection kind A reports (the body of its 503).
const SHED_KINDS: [&str; 5] = [
    "bulkhead_full",
    "circuit_open",
    "rate_limited",
    "load_shed",
    "other",
];

// ---------------------------------------------------------------------------
// Servers

/// A hyper HTTP/1 server on a fixed address that can be taken down
/// (listener closed, every connection dropped) and brought back.
struct Server {
    addr: SocketAddr,
    spawn: Box<dyn Fn(TcpListener) -> JoinHandle<()> + Send + Sync>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start<S, RB>(svc: S) -> Server
    where
        S: Service<http::Request<Incoming>, Response = http::Response<RB>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        RB: http_body::Body + Send + 'static,
        RB::Data: Send,
        RB::Error: Into<BoxError>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let spawn = Box::new(move |l: TcpListener| tokio::spawn(accept_loop(l, svc.clone())));
        let task = Some(spawn(listener));
        Server { addr, spawn, task }
    }

    /// Closes the listener and drops every connection: callers get
    /// connection refused, and calls in flight fail.
    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Binds the same port again.
    async fn up(&mut self) {
        for _ in 0..100 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.task = Some((self.spawn)(l));
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        panic!("could not bind {} again", self.addr);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.down();
    }
}

async fn accept_loop<S, RB>(listener: TcpListener, svc: S)
where
    S: Service<http::Request<Incoming>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    // Connections live in this set, so aborting this task drops them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors, most likely: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let svc = TowerToHyperService::new(svc.clone());
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A's calls in flight, the most seen at once, and how long the stack took
/// to reject the calls it shed, by kind, timed inside A.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
    /// Calls A's handler received in all.
    calls: AtomicU64,
    shed: Mutex<BTreeMap<&'static str, Histogram<u64>>>,
    /// How long the stack took (µs) to answer the calls that found our
    /// breaker open when they arrived and ended rejected by it.
    open_at_call: Mutex<Vec<u64>>,
}

struct InFlight<'a>(&'a Gauge);

impl Gauge {
    fn enter(&self) -> InFlight<'_> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        InFlight(self)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct AState {
    client: Client,
    b_url: Arc<str>,
    gauge: Arc<Gauge>,
    /// Send `POST` with `Idempotency-Key: <call number>` (deferrable)
    /// instead of `GET`.
    keyed: bool,
    breaker: Option<CircuitBreakerHandle>,
}

/// The load generator's call number, sent to A in this header.
const CALL_HEADER: &str = "x-call";

/// A's only route: call B through the stack and say what happened.
/// 200 = B answered 200; 202 = the stack deferred the call; 503 = the stack
/// shed the call (the body names the rejection); 502 = it failed.
async fn a_handler(State(st): State<AState>, headers: HeaderMap) -> (StatusCode, &'static str) {
    let _in_flight = st.gauge.enter();
    let req = if st.keyed {
        let call = headers
            .get(CALL_HEADER)
            .cloned()
            .unwrap_or(http::HeaderValue::from_static("-"));
        http::Request::post(&*st.b_url)
            .header("idempotency-key", call)
            .body(Full::new(Bytes::from_static(b"{\"work\":1}")))
    } else {
        http::Request::get(&*st.b_url).body(Full::default())
    }
    .expect("request");
    let open_at_call = st
        .breaker
        .as_ref()
        .is_some_and(|b| b.state() == BreakerState::Open);
    let called = Instant::now();
    match st.client.oneshot(req).await {
        Ok(res) => {
            let status = res.status();
            let body = res.into_body().collect().await;
            match (status, body) {
                (StatusCode::OK, Ok(_)) => (StatusCode::OK, "ok"),
                (StatusCode::ACCEPTED, _) => (StatusCode::ACCEPTED, "deferred"),
                _ => (StatusCode::BAD_GATEWAY, "failed"),
            }
        }
        Err(e) => match shed_kind(&e) {
            Some(kind) => {
                let took = called.elapsed().as_micros().max(1) as u64;
                st.gauge
                    .shed
                    .lock()
                    .expect("lock")
                    .entry(kind)
                    .or_insert_with(hist)
                    .saturating_record(took);
                if open_at_call && kind == "circuit_open" {
                    st.gauge.open_at_call.lock().expect("lock").push(took);
                }
                (StatusCode::SERVICE_UNAVAILABLE, kind)
            }
            None => (StatusCode::BAD_GATEWAY, "failed"),
        },
    }
}

// ---------------------------------------------------------------------------
// One run: one scenario, one stack

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Success,
    /// Shed by the stack; the kind is an index into [`SHED_KINDS`].
    Rejected(usize),
    Deferred,
    Failed,
}

impl Outcome {
    fn index(self) -> usize {
        match self {
            Outcome::Success => 0,
            Outcome::Rejected(_) => 1,
            Outcome::Deferred => 2,
            Outcome::Failed => 3,
        }
    }
}

/// One call from the load generator to A.
#[derive(Clone, Copy)]
struct Sample {
    /// The call number (`Idempotency-Key` for the keyed stack).
    call: u64,
    /// When it was due, seconds after the start.
    due: f64,
    /// From when it was due to the end of A's answer.
    latency: Duration,
    outcome: Outcome,
}

/// A copy of A and B for one stack, with its counters.
struct Rig {
    a: Server,
    b: Server,
    a_addr: SocketAddr,
    gauge: Arc<Gauge>,
    reached_b: Arc<AtomicU64>,
    in_flight: Arc<Mutex<Vec<(f64, usize)>>>,
    /// What B served of the keyed POSTs.
    served: Arc<Served>,
    defer: Option<DeferParts>,
    queue_path: PathBuf,
    /// The replayer's drain, once it ran.
    drain: Option<Drain>,
}

/// The keyed POSTs B's handler served (past the chaos layer), by key:
/// how many times, and when first (seconds after the start). B dedups by
/// key, so a delivery is a key in this map.
struct Served {
    start: Instant,
    by_key: Mutex<BTreeMap<u64, (u32, f64)>>,
}

async fn b_post(State(served): State<Arc<Served>>, headers: HeaderMap) -> &'static str {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(key) = key {
        let at = Instant::now()
            .saturating_duration_since(served.start)
            .as_secs_f64();
        served
            .by_key
            .lock()
            .expect("lock")
            .entry(key)
            .and_modify(|e| e.0 += 1)
            .or_insert((1, at));
    }
    "ok"
}

/// How the replayer emptied the queue after the load.
#[derive(Clone, Copy, Debug)]
struct Drain {
    /// When the replayer was started, seconds after the start (measured).
    replay_from: f64,
    /// Jobs left in the queue when the run stopped waiting.
    left: usize,
    /// Seconds after the start when the queue was empty (or the wait ended).
    done_at: f64,
}

async fn rig(
    stack: &Stack,
    params: &Params,
    sc: &Scenario,
    start: Instant,
    queue_path: PathBuf,
) -> Rig {
    let reached_b = Arc::new(AtomicU64::new(0));
    let served = Arc::new(Served {
        start,
        by_key: Mutex::default(),
    });
    let chaos = ChaosLayer::builder(sc.schedule.clone())
        .seed(params.seed)
        .start_at(start)
        .http_status(StatusCode::SERVICE_UNAVAILABLE)
        .build()
        .expect("valid schedule");
    let counter = reached_b.clone();
    let b_svc = ServiceBuilder::new()
        // Outside the chaos layer: every call that arrived at B counts,
        // including those B then failed on purpose.
        .map_request(move |r: http::Request<Incoming>| {
            counter.fetch_add(1, Ordering::Relaxed);
            r
        })
        .layer(chaos)
        .service(
            Router::new()
                .route("/work", get(|| async { "ok" }).post(b_post))
                .with_state(served.clone()),
        );
    let b = Server::start(b_svc).await;

    let gauge = Arc::new(Gauge::default());
    let built = (stack.build)(params, &queue_path);
    let state = AState {
        client: built.client,
        b_url: format!("http://{}/work", b.addr).into(),
        gauge: gauge.clone(),
        keyed: built.defer.is_some(),
        breaker: built.breaker,
    };
    let a = Server::start(Router::new().route("/", get(a_handler)).with_state(state)).await;
    Rig {
        a_addr: a.addr,
        a,
        b,
        gauge,
        reached_b,
        in_flight: Arc::default(),
        served,
        defer: built.defer,
        queue_path,
        drain: None,
    }
}

/// How many calls the load generator sends in `length`.
fn planned_calls(params: &Params, length: Duration) -> u64 {
    (u128::from(params.rate) * length.as_millis() / 1000) as u64
}

/// The open-loop load generator: call `i` is due at `start + i / rate`.
async fn load(a: SocketAddr, params: Params, start: Instant, length: Duration) -> Vec<Sample> {
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let n = planned_calls(&params, length) as u32;
    let every = Duration::from_secs(1) / params.rate;
    let url: Arc<str> = format!("http://{a}/").into();
    let mut calls = JoinSet::new();
    for i in 0..n {
        let due = start + every * i;
        tokio::time::sleep_until(due).await;
        let (client, url) = (client.clone(), url.clone());
        calls.spawn(async move {
            let req = http::Request::get(&*url)
                .header(CALL_HEADER, i)
                .body(Full::default())
                .expect("request");
            let answer = tokio::time::timeout(params.caller_timeout, async {
                let res = client.request(req).await?;
                let status = res.status();
                let body = res.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>((status, body))
            })
            .await;
            let outcome = match answer {
                Ok(Ok((StatusCode::OK, _))) => Outcome::Success,
                Ok(Ok((StatusCode::ACCEPTED, _))) => Outcome::Deferred,
                Ok(Ok((StatusCode::SERVICE_UNAVAILABLE, body))) => Outcome::Rejected(
                    SHED_KINDS
                        .iter()
                        .position(|k| k.as_bytes() == &body[..])
                        .unwrap_or(SHED_KINDS.len() - 1),
                ),
                _ => Outcome::Failed,
            };
            Sample {
                call: u64::from(i),
                due: (due - start).as_secs_f64(),
                latency: due.elapsed(),
                outcome,
            }
        });
    }
    let mut out = Vec::with_capacity(n as usize);
    while let Some(s) = calls.join_next().await {
        out.push(s.expect("load task"));
    }
    out.sort_by(|a, b| a.due.total_cmp(&b.due));
    out
}

/// The rejections of one kind.
#[derive(Clone, Debug, Serialize)]
struct Rejections {
    count: u64,
    /// As A's caller saw them: the HTTP round trip to A included.
    p99_ms: f64,
    /// Inside A: from calling the stack to its error, the stack's own cost.
    in_a_p99_ms: f64,
}

/// What one stack got in one scenario.
#[derive(Clone, Debug, Serialize)]
struct RunResult {
    scenario: &'static str,
    stack: &'static str,
    offered: u64,
    /// Calls the load generator was to send (rate × length).
    planned: u64,
    /// Distinct call numbers among the answers.
    distinct_calls: u64,
    /// Calls A's handler received.
    at_a: u64,
    success: u64,
    rejected: u64,
    /// The rejections by kind (see [`SHED_KINDS`]).
    rejected_by: BTreeMap<&'static str, Rejections>,
    deferred: u64,
    failed: u64,
    /// Calls that arrived at B (attempts and retries), refused connections excluded.
    reached_b: u64,
    /// Successes per second of offered load.
    goodput: f64,
    /// Answers (of any kind) per second while the load ran (the replayer's
    /// drain after it is not counted).
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// p99 of the calls due during the fault window.
    fault_p99_ms: f64,
    /// p99 of the rejected calls, if any.
    rejected_p99_ms: Option<f64>,
    /// Successes among the calls due during the fault window.
    success_during: u64,
    /// Calls due during the fault window.
    offered_during: u64,
    /// Successes among the calls due after the fault window.
    success_after: u64,
    /// Calls due after the fault window.
    offered_after: u64,
    peak_in_flight: usize,
    /// (seconds, A's calls in flight), every 100 ms.
    in_flight: Vec<(f64, usize)>,
    /// (seconds, p99 ms) of the calls due in each 250 ms.
    p99_series: Vec<(f64, f64)>,
    /// For the stack with `defer`: what became of the accepted calls.
    defer: Option<DeferResult>,
    /// For our stacks: the calls that arrived while the breaker was open
    /// and were rejected by it, timed inside A.
    open_rejections: Option<OpenRejections>,
}

#[derive(Clone, Debug, Serialize)]
struct OpenRejections {
    count: usize,
    in_a_p50_ms: f64,
    in_a_p99_ms: f64,
    in_a_max_ms: f64,
}

fn open_rejections(rig: &Rig) -> Option<OpenRejections> {
    let mut us = rig.gauge.open_at_call.lock().expect("lock").clone();
    if us.is_empty() {
        return None;
    }
    us.sort_unstable();
    let at =
        |q: f64| us[((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1] as f64 / 1000.0;
    Some(OpenRejections {
        count: us.len(),
        in_a_p50_ms: at(0.5),
        in_a_p99_ms: at(0.99),
        in_a_max_ms: at(1.0),
    })
}

/// What became of the calls a stack with `defer` accepted, counted at B
/// (which dedups by `Idempotency-Key`) after the replayer drained the queue.
#[derive(Clone, Debug, Serialize)]
struct DeferResult {
    /// Calls answered 202: stored in the queue.
    accepted: u64,
    /// Of those, how many B served (by key), after the drain.
    delivered: u64,
    /// Calls answered 200 or 202 whose key B never served: lost.
    lost: u64,
    /// Keyed POSTs B served more than once (at least once delivery).
    duplicates: u64,
    /// Jobs still in the queue when the run stopped waiting.
    left_in_queue: usize,
    /// When the replayer started (B recovered), seconds after the start.
    replay_from_s: f64,
    /// First and last delivery of an accepted call, seconds after the start.
    first_delivery_s: Option<f64>,
    last_delivery_s: Option<f64>,
    /// When the queue was empty (or the run stopped waiting), seconds after the start.
    drained_at_s: f64,
    /// The most deliveries of accepted calls in any one second.
    max_per_sec: usize,
    /// The replayer's pace: deliveries a second, and burst.
    rate: u32,
    burst: u32,
}

fn defer_result(samples: &[Sample], rig: &Rig, p: &Params) -> Option<DeferResult> {
    rig.defer.as_ref()?;
    let drain = rig.drain.unwrap_or(Drain {
        replay_from: f64::NAN,
        left: usize::MAX,
        done_at: f64::NAN,
    });
    let served = rig.served.by_key.lock().expect("lock");
    let (mut accepted, mut delivered, mut lost) = (0, 0, 0);
    let mut times = Vec::new();
    for s in samples {
        let at_b = served.get(&s.call);
        match s.outcome {
            Outcome::Deferred => {
                accepted += 1;
                if let Some(&(_, t)) = at_b {
                    delivered += 1;
                    times.push(t);
                }
            }
            Outcome::Success => {}
            _ => continue,
        }
        lost += u64::from(at_b.is_none());
    }
    times.sort_by(f64::total_cmp);
    // The most deliveries within any one second: two pointers over the
    // sorted delivery times.
    let (mut max_per_sec, mut lo) = (0, 0);
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= 1.0 {
            lo += 1;
        }
        max_per_sec = max_per_sec.max(hi + 1 - lo);
    }
    Some(DeferResult {
        accepted,
        delivered,
        lost,
        duplicates: served.values().filter(|v| v.0 > 1).count() as u64,
        left_in_queue: drain.left,
        drained_at_s: drain.done_at,
        replay_from_s: drain.replay_from,
        first_delivery_s: times.first().copied(),
        last_delivery_s: times.last().copied(),
        max_per_sec,
        rate: p.replay_rate,
        burst: p.replay_burst,
    })
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn summarize(
    sc: &Scenario,
    stack: &'static str,
    samples: &[Sample],
    rig: &Rig,
    wall: Duration,
    p: &Params,
) -> RunResult {
    let mut all = hist();
    let mut fault = hist();
    let mut rejected = hist();
    let (f0, f1) = (sc.fault.0.as_secs_f64(), sc.fault.1.as_secs_f64());
    let mut counts = [0u64; 4];
    let mut by_kind: BTreeMap<&'static str, Histogram<u64>> = BTreeMap::new();
    let (mut success_after, mut offered_after) = (0, 0);
    let (mut success_during, mut offered_during) = (0, 0);
    for s in samples {
        let us = s.latency.as_micros().clamp(1, 120_000_000) as u64;
        all.saturating_record(us);
        if s.due >= f0 && s.due < f1 {
            fault.saturating_record(us);
            offered_during += 1;
            success_during += u64::from(s.outcome == Outcome::Success);
        }
        if let Outcome::Rejected(kind) = s.outcome {
            rejected.saturating_record(us);
            by_kind
                .entry(SHED_KINDS[kind])
                .or_insert_with(hist)
                .saturating_record(us);
        }
        counts[s.outcome.index()] += 1;
        if s.due >= f1 {
            offered_after += 1;
            success_after += u64::from(s.outcome == Outcome::Success);
        }
    }
    let bucket = 0.25;
    let mut p99_series = Vec::new();
    let mut i = 0;
    while i < samples.len() {
        let b = (samples[i].due / bucket).floor();
        let mut h = hist();
        while i < samples.len() && (samples[i].due / bucket).floor() == b {
            h.saturating_record(samples[i].latency.as_micros().max(1) as u64);
            i += 1;
        }
        p99_series.push((b * bucket + bucket / 2.0, ms(&h, 0.99)));
    }
    let rejected_by = by_kind
        .into_iter()
        .map(|(k, h)| {
            let in_a = rig
                .gauge
                .shed
                .lock()
                .expect("lock")
                .get(k)
                .map(|h| ms(h, 0.99));
            let r = Rejections {
                count: h.len(),
                p99_ms: ms(&h, 0.99),
                in_a_p99_ms: in_a.unwrap_or(0.0),
            };
            (k, r)
        })
        .collect();
    let secs = sc.length.as_secs_f64();
    RunResult {
        scenario: sc.key,
        stack,
        offered: samples.len() as u64,
        planned: planned_calls(p, sc.length),
        distinct_calls: samples
            .iter()
            .map(|s| s.call)
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64,
        at_a: rig.gauge.calls.load(Ordering::SeqCst),
        success: counts[Outcome::Success.index()],
        rejected: counts[Outcome::Rejected(0).index()],
        rejected_by,
        deferred: counts[Outcome::Deferred.index()],
        failed: counts[Outcome::Failed.index()],
        reached_b: rig.reached_b.load(Ordering::Relaxed),
        goodput: counts[Outcome::Success.index()] as f64 / secs,
        throughput: samples.len() as f64 / wall.as_secs_f64(),
        p50_ms: ms(&all, 0.5),
        p99_ms: ms(&all, 0.99),
        p999_ms: ms(&all, 0.999),
        max_ms: all.max() as f64 / 1000.0,
        fault_p99_ms: if fault.is_empty() {
            0.0
        } else {
            ms(&fault, 0.99)
        },
        rejected_p99_ms: (!rejected.is_empty()).then(|| ms(&rejected, 0.99)),
        success_during,
        offered_during,
        success_after,
        offered_after,
        peak_in_flight: rig.gauge.peak.load(Ordering::SeqCst),
        in_flight: rig.in_flight.lock().expect("lock").clone(),
        p99_series,
        defer: defer_result(samples, rig, p),
        open_rejections: open_rejections(rig),
    }
}

/// Runs every stack through one scenario at once.
async fn run_scenario(
    sc: &Scenario,
    stacks: &[Stack],
    params: &Params,
    progress: &ProgressBar,
) -> Vec<RunResult> {
    // A little time to set up before the first call is due.
    let start = Instant::now() + Duration::from_millis(300);
    let mut rigs = Vec::new();
    for (i, stack) in stacks.iter().enumerate() {
        let path = out_dir()
            .join("queues")
            .join(format!("{}-{i}.redb", sc.key));
        rigs.push(rig(stack, params, sc, start, path).await);
    }

    // The replayers start when B recovers (the end of the first fault
    // window) and deliver while the rest of the load runs.
    let mut replayers: Vec<Option<JoinHandle<(ReplayerHandle, f64)>>> = Vec::new();
    for r in &rigs {
        replayers.push(r.defer.clone().map(|d| {
            let (from, p) = (start + sc.fault.1, *params);
            tokio::spawn(async move {
                tokio::time::sleep_until(from).await;
                let handle = Replayer::new(d.queue, d.replay)
                    .rate_per_second(p.replay_rate)
                    .burst(p.replay_burst)
                    .backoff(Duration::from_millis(100), Duration::from_secs(1))
                    .poll_interval(Duration::from_millis(50))
                    .breaker(d.breaker)
                    .spawn();
                (handle, start.elapsed().as_secs_f64())
            })
        }));
    }

    let mut samplers = Vec::new();
    for r in &rigs {
        let (gauge, series) = (r.gauge.clone(), r.in_flight.clone());
        samplers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start, Duration::from_millis(100));
            loop {
                let t = tick.tick().await;
                let n = gauge.now.load(Ordering::SeqCst);
                series
                    .lock()
                    .expect("lock")
                    .push(((t - start).as_secs_f64(), n));
            }
        }));
    }

    let mut loads = Vec::new();
    for r in &rigs {
        loads.push(tokio::spawn(load(r.a_addr, *params, start, sc.length)));
    }

    let ticker = {
        let progress = progress.clone();
        let base = progress.position();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let t = Instant::now().saturating_duration_since(start).as_millis() as u64 / 100;
                progress.set_position(base + t);
            }
        })
    };

    if let Some((down, up)) = sc.outage {
        tokio::time::sleep_until(start + down).await;
        for r in &mut rigs {
            r.b.down();
        }
        tokio::time::sleep_until(start + up).await;
        for r in &mut rigs {
            r.b.up().await;
        }
    }

    let mut results = Vec::new();
    let mut all_samples = Vec::new();
    for l in loads {
        all_samples.push(l.await.expect("load generator"));
    }
    let wall = start.elapsed();

    // Let each replayer empty its queue (bounded by the drain timeout).
    for (r, replayer) in rigs.iter_mut().zip(replayers) {
        let (Some(d), Some(replayer)) = (&r.defer, replayer) else {
            continue;
        };
        let (handle, replay_from) = replayer.await.expect("replayer start");
        let until = Instant::now() + params.drain_timeout;
        let left = loop {
            let left = d.queue.depth().await.unwrap_or(usize::MAX);
            if left == 0 || Instant::now() >= until {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        handle.shutdown().await;
        r.drain = Some(Drain {
            replay_from,
            left,
            done_at: start.elapsed().as_secs_f64(),
        });
    }

    ticker.abort();
    for s in &samplers {
        s.abort();
    }
    for ((stack, rig), samples) in stacks.iter().zip(&rigs).zip(&all_samples) {
        results.push(summarize(sc, stack.name, samples, rig, wall, params));
    }
    for r in rigs {
        drop(r.a);
        drop(r.b);
        drop(r.defer);
        let _ = std::fs::remove_file(&r.queue_path);
    }
    results
}

// ---------------------------------------------------------------------------
// Verdicts

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "why")]
enum Status {
    Pass,
    Fail,
    /// Printed and recorded, not asserted: it depends on timing.
    Measured,
}

#[derive(Clone, Debug, Serialize)]
struct Verdict {
    claim: String,
    status: Status,
    detail: String,
    /// Checked by the exit code (it does not depend on timing).
    asserted: bool,
}

fn check(claim: &str, ok: bool, detail: String) -> Verdict {
    Verdict {
        claim: claim.into(),
        status: if ok { Status::Pass } else { Status::Fail },
        detail,
        asserted: true,
    }
}

fn measured(claim: &str, detail: String) -> Verdict {
    Verdict {
        claim: claim.into(),
        status: Status::Measured,
        detail,
        asserted: false,
    }
}

/// A's in-flight count at the sample nearest to `t` seconds.
fn in_flight_at(r: &RunResult, t: f64) -> usize {
    r.in_flight
        .iter()
        .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
        .map_or(0, |s| s.1)
}

fn verdicts(results: &[RunResult], scs: &[Scenario], p: &Params) -> Vec<Verdict> {
    let get = |sc: &str, st: &str| {
        results
            .iter()
            .find(|r| r.scenario == sc && r.stack == st)
            .unwrap_or_else(|| panic!("no result for {sc} / {st}"))
    };
    let sc = |key: &str| scs.iter().find(|s| s.key == key).expect("scenario");
    let mut v = Vec::new();

    const PRESET: &str = "ours (preset)";
    const DEFER: &str = "ours + defer";

    // --- B hangs
    let hang = sc("hang");
    let (h0, h1) = (hang.fault.0.as_secs_f64(), hang.fault.1.as_secs_f64());
    let hang_len = h1 - h0;
    let none = get("hang", "none");
    let ours = get("hang", PRESET);
    let (mid, late) = (h0 + 0.45 * hang_len, h0 + 0.9 * hang_len);
    let (at_mid, at_late) = (in_flight_at(none, mid), in_flight_at(none, late));
    let expected_late = f64::from(p.rate) * 0.9 * hang_len;
    v.push(check(
        "B hangs, no protection: A's in-flight calls grow for as long as the hang lasts",
        at_late as f64 >= 1.6 * at_mid as f64 && at_late as f64 >= 0.5 * expected_late,
        format!(
            "in flight {at_mid} at {:.1} s into the hang, {at_late} at {:.1} s \
             (offered rate x time = {expected_late:.0}); peak {}",
            mid - h0,
            late - h0,
            none.peak_in_flight
        ),
    ));
    v.push(measured(
        "B hangs, no protection: A's p99 is the hang length",
        format!(
            "p99 {:.2} s, max {:.2} s, hang {hang_len:.0} s",
            none.p99_ms / 1000.0,
            none.max_ms / 1000.0
        ),
    ));
    v.push(check(
        "B hangs: the preset keeps A's in-flight calls bounded (peak under half of none's)",
        ours.peak_in_flight * 2 < none.peak_in_flight,
        format!(
            "peak in flight: preset {} (bulkhead {}), none {}",
            ours.peak_in_flight, p.concurrency, none.peak_in_flight
        ),
    ));
    v.push(check(
        "B hangs: fewer calls reach B with the preset than with no protection",
        ours.reached_b < none.reached_b,
        format!(
            "reached B: preset {}, none {} ({:.2}x)",
            ours.reached_b,
            none.reached_b,
            ours.reached_b as f64 / none.reached_b.max(1) as f64
        ),
    ));
    let limit = p.attempt_timeout.as_secs_f64() * 1.2 * 1000.0;
    v.push(measured(
        "B hangs: the preset keeps A's p99 within the attempt timeout + 20%",
        format!(
            "preset p99 {:.0} ms for the calls due during the hang, {:.0} ms overall, \
             max {:.0} ms; limit {limit:.0} ms ({})",
            ours.fault_p99_ms,
            ours.p99_ms,
            ours.max_ms,
            if ours.fault_p99_ms <= limit {
                "within"
            } else {
                "over"
            }
        ),
    ));
    let open = ours.rejected_by.get("circuit_open");
    v.push(check(
        "B hangs: the preset's breaker opens (calls rejected with circuit_open)",
        open.is_some_and(|o| o.count > 0),
        format!(
            "{} calls rejected by the open breaker, of {} offered",
            open.map_or(0, |o| o.count),
            ours.offered
        ),
    ));
    v.push(measured(
        "B hangs: once the breaker is open, rejected calls answer in under 1 ms p99",
        match (&ours.open_rejections, open) {
            (Some(o), Some(all)) => format!(
                "{} calls arrived while the breaker was open and were rejected by it: \
                 p50 {:.3} ms, p99 {:.3} ms ({}), max {:.3} ms inside A (the stack's own cost); \
                 all {} circuit_open calls, including those rejected on a retry after a \
                 timed-out attempt: p99 {:.1} ms inside A, {:.1} ms at A's caller \
                 (loopback HTTP hop included)",
                o.count,
                o.in_a_p50_ms,
                o.in_a_p99_ms,
                if o.in_a_p99_ms < 1.0 {
                    "under 1 ms"
                } else {
                    "over 1 ms"
                },
                o.in_a_max_ms,
                all.count,
                all.in_a_p99_ms,
                all.p99_ms
            ),
            _ => "no call arrived while the breaker was open".into(),
        },
    ));
    let rejections: Vec<_> = results
        .iter()
        .filter(|r| r.scenario == "hang")
        .filter_map(|r| {
            r.rejected_p99_ms.map(|_| {
                let kinds: Vec<_> = r
                    .rejected_by
                    .iter()
                    .map(|(k, x)| {
                        format!(
                            "{k}: {} calls, p99 {:.2} ms at the caller, {:.3} ms inside A",
                            x.count, x.p99_ms, x.in_a_p99_ms
                        )
                    })
                    .collect();
                format!("{} ({})", r.stack, kinds.join("; "))
            })
        })
        .collect();
    v.push(measured(
        "B hangs: p99 of the calls each stack rejected (bulkhead, load shed or breaker)",
        rejections.join(", "),
    ));

    // --- B returns 503 at 50%
    let errors = sc("errors");
    let offered_fault =
        (f64::from(p.rate) * (errors.fault.1 - errors.fault.0).as_secs_f64()).round();
    let amp = |st: &str| {
        let r = get("errors", st);
        format!(
            "{st}: {} calls reached B for {} offered ({:.2}x)",
            r.reached_b,
            r.offered,
            r.reached_b as f64 / r.offered.max(1) as f64
        )
    };
    // The budget's bound (retry::RetryBudget): in any `ttl` window, retries
    // <= ratio x the calls of that window + min_per_sec x ttl (the floor).
    // Cut the run (calls answered up to a deadline after the last one is
    // due) into back-to-back `ttl` windows and sum: attempts <= calls x
    // (1 + ratio) + the floor once per window. The quick run fits in one
    // window; the full run needs two.
    let budget = RetryBudgetConfig::default();
    let ttl = budget.ttl.as_secs_f64();
    let windows = ((errors.length + p.deadline).as_secs_f64() / ttl).ceil();
    let floor = f64::from(budget.min_per_sec) * ttl * windows;
    let pe = get("errors", PRESET);
    let bound = (1.0 + f64::from(budget.ratio)) * pe.offered as f64 + floor;
    v.push(check(
        "B returns 503 at 50%: the preset's retries stay within the budget \
         (calls reaching B <= 1.2x offered + the floor)",
        pe.reached_b as f64 <= bound,
        format!(
            "preset: {} calls reached B for {} offered ({:.2}x); bound {bound:.0} \
             = {:.1} x {} + floor {floor:.0} ({} retries/s x {} s ttl x {windows} window(s))",
            pe.reached_b,
            pe.offered,
            pe.reached_b as f64 / pe.offered.max(1) as f64,
            1.0 + f64::from(budget.ratio),
            pe.offered,
            budget.min_per_sec,
            budget.ttl.as_secs()
        ),
    ));
    v.push(measured(
        "B returns 503 at 50%: retry amplification for comparison",
        format!(
            "{}; {}; {}; {}; {} offered during the fault",
            amp("tower"),
            amp("tower-resilience"),
            amp(PRESET),
            amp("none"),
            offered_fault
        ),
    ));

    // --- defer
    let mut lines = Vec::new();
    let (mut ok, mut accepted_total) = (true, 0);
    for s in scs {
        let r = get(s.key, DEFER);
        let Some(d) = &r.defer else {
            ok = false;
            lines.push(format!("{}: no defer result", s.key));
            continue;
        };
        accepted_total += d.accepted;
        ok &= d.lost == 0 && d.delivered == d.accepted && d.left_in_queue == 0;
        lines.push(format!(
            "{}: accepted {}, delivered {}, lost {}, left {}",
            s.key,
            d.accepted,
            d.delivered,
            d.lost,
            if d.left_in_queue == usize::MAX {
                "?".into()
            } else {
                d.left_in_queue.to_string()
            }
        ));
    }
    // An outage must defer something, or the check above is empty.
    let deferred_in_outages = ["hang", "down"]
        .iter()
        .all(|k| get(k, DEFER).defer.as_ref().is_some_and(|d| d.accepted > 0));
    v.push(check(
        "With defer: zero requests lost; everything accepted is delivered after recovery",
        ok && deferred_in_outages,
        format!(
            "{}; {accepted_total} accepted in all{}",
            lines.join("; "),
            if deferred_in_outages {
                ""
            } else {
                "; FAIL: nothing was deferred under 'hang' or 'down'"
            }
        ),
    ));
    let paced: Vec<_> = scs
        .iter()
        .filter_map(|s| {
            let d = get(s.key, DEFER).defer.clone()?;
            let (first, last) = (d.first_delivery_s?, d.last_delivery_s?);
            Some(format!(
                "{}: {} delivered from {:.2} s to {:.2} s (B back at {:.1} s), \
                 at most {} in one second, {} duplicates at B",
                s.key, d.delivered, first, last, d.replay_from_s, d.max_per_sec, d.duplicates
            ))
        })
        .collect();
    v.push(measured(
        &format!(
            "With defer: the replayer delivers after recovery, paced ({} a second, burst {})",
            p.replay_rate, p.replay_burst
        ),
        paced.join("; "),
    ));

    // --- ours vs tower-resilience, every scenario
    for s in scs {
        let (o, t) = (get(s.key, PRESET), get(s.key, "tower-resilience"));
        v.push(measured(
            &format!("{}: ours (preset) vs tower-resilience", s.title),
            format!(
                "p99 {:.1} / {:.1} ms = {:.2}x; reached B {} / {} = {:.2}x; success {} / {}",
                o.p99_ms,
                t.p99_ms,
                o.p99_ms / t.p99_ms.max(0.001),
                o.reached_b,
                t.reached_b,
                o.reached_b as f64 / t.reached_b.max(1) as f64,
                o.success,
                t.success
            ),
        ));
    }

    // --- the harness itself
    let down = get("down", "none");
    let d = sc("down");
    v.push(check(
        "harness: while B is down almost no call through 'none' succeeds (<= 2%), and after B is back they do",
        down.success_during * 50 <= down.offered_during && down.success_after > 0,
        format!(
            "none: {} of {} calls due while B was down succeeded; {} of {} due after B came back (at {:.0} s)",
            down.success_during,
            down.offered_during,
            down.success_after,
            down.offered_after,
            d.fault.1.as_secs_f64()
        ),
    ));
    // Every call the generator was to send got exactly one answer, and A's
    // handler saw each of them (a call lost on the way to A, or a generator
    // that stopped early, shows here).
    let bad: Vec<_> = results
        .iter()
        .filter(|r| {
            r.success + r.rejected + r.deferred + r.failed != r.offered
                || r.offered != r.planned
                || r.distinct_calls != r.planned
                || r.at_a != r.planned
        })
        .map(|r| {
            format!(
                "{}/{}: planned {}, answered {} ({} distinct), A saw {}",
                r.scenario, r.stack, r.planned, r.offered, r.distinct_calls, r.at_a
            )
        })
        .collect();
    v.push(check(
        "harness: every planned call was sent, reached A, and was answered once",
        bad.is_empty(),
        if bad.is_empty() {
            format!("{} runs", results.len())
        } else {
            format!("miscounted: {}", bad.join("; "))
        },
    ));
    v
}

// ---------------------------------------------------------------------------
// Output

fn print_table(results: &[RunResult], scs: &[Scenario]) {
    println!(
        "{:<17} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>5} {:>6} {:>7} {:>6} {:>6}",
        "stack",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "ok/s",
        "ok",
        "rej",
        "def",
        "fail",
        "->B",
        "B/off",
        "peak"
    );
    for sc in scs {
        println!("-- {}", sc.title);
        for r in results.iter().filter(|r| r.scenario == sc.key) {
            println!(
                "{:<17} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7.1} {:>6} {:>6} {:>5} {:>6} {:>7} {:>6.2} {:>6}",
                r.stack,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.max_ms,
                r.goodput,
                r.success,
                r.rejected,
                r.deferred,
                r.failed,
                r.reached_b,
                r.reached_b as f64 / r.offered.max(1) as f64,
                r.peak_in_flight
            );
        }
    }
}

fn print_verdicts(v: &[Verdict]) {
    println!("\nVerdicts");
    for x in v {
        let tag = match &x.status {
            Status::Pass => "PASS".to_string(),
            Status::Fail => "FAIL".to_string(),
            Status::Measured => "measured (timing, not asserted)".to_string(),
        };
        println!("  [{tag}] {}", x.claim);
        if !x.detail.is_empty() {
            println!("         {}", x.detail);
        }
    }
}

fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("fault_bench")
}

const COLORS: [plotters::style::RGBColor; 6] = [
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(148, 103, 189),
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(23, 190, 207),
];

fn plot(path: &std::path::Path, results: &[RunResult], scs: &[Scenario]) -> Result<(), BoxError> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1400, 300 * scs.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((scs.len(), 2));
    for (i, sc) in scs.iter().enumerate() {
        let runs: Vec<_> = results.iter().filter(|r| r.scenario == sc.key).collect();
        let horizon = runs
            .iter()
            .flat_map(|r| r.p99_series.last().map(|p| p.0))
            .fold(sc.length.as_secs_f64(), f64::max)
            + 0.5;
        let timeline = sc.schedule.timeline(Duration::from_secs_f64(horizon));

        // Left: p99 latency, log scale.
        let mut chart = ChartBuilder::on(&panels[2 * i])
            .caption(
                format!("{}: A's p99 latency (ms, per 250 ms)", sc.title),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(26)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..horizon, (0.1f64..40_000f64).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .disable_x_mesh()
            .draw()?;
        for &(s, e, kind) in &timeline {
            let shade = match kind {
                PhaseKind::Failing => RGBColor(255, 200, 200).filled(),
                PhaseKind::Recovering => RGBColor(255, 240, 190).filled(),
                PhaseKind::Healthy => continue,
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [(s.as_secs_f64(), 0.1), (e.as_secs_f64(), 40_000.0)],
                shade,
            )))?;
        }
        for (j, r) in runs.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    r.p99_series.iter().map(|&(t, v)| (t, v.max(0.1))),
                    color.stroke_width(2),
                ))?
                .label(r.stack)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;

        // Right: A's calls in flight.
        let top = runs
            .iter()
            .map(|r| r.peak_in_flight)
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.1;
        let mut chart = ChartBuilder::on(&panels[2 * i + 1])
            .caption(
                format!("{}: A's calls in flight", sc.title),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(26)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..horizon, 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .disable_x_mesh()
            .draw()?;
        for &(s, e, kind) in &timeline {
            let shade = match kind {
                PhaseKind::Failing => RGBColor(255, 200, 200).filled(),
                PhaseKind::Recovering => RGBColor(255, 240, 190).filled(),
                PhaseKind::Healthy => continue,
            };
            chart.draw_series(std::iter::once(Rectangle::new(
                [(s.as_secs_f64(), 0.0), (e.as_secs_f64(), top)],
                shade,
            )))?;
        }
        for (j, r) in runs.iter().enumerate() {
            let color = COLORS[j % COLORS.len()];
            chart.draw_series(LineSeries::new(
                r.in_flight.iter().map(|&(t, n)| (t, n as f64)),
                color.stroke_width(2),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

#[derive(Serialize)]
struct Report<'a> {
    mode: &'static str,
    /// Logical CPUs, OS and architecture of the machine that ran it.
    machine: (usize, &'static str, &'static str),
    params: &'a Params,
    stacks: Vec<(&'static str, &'static str)>,
    scenarios: Vec<ScenarioReport>,
    results: &'a [RunResult],
    verdicts: &'a [Verdict],
}

#[derive(Serialize)]
struct ScenarioReport {
    key: &'static str,
    title: String,
    length_s: f64,
    /// (start s, end s, kind)
    phases: Vec<(f64, f64, &'static str)>,
}

// ---------------------------------------------------------------------------

fn main() -> ExitCode {
    let mut quick = false;
    let mut seed = 8;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--seed" => {
                seed = match args.next().and_then(|s| s.parse().ok()) {
                    Some(s) => s,
                    None => {
                        eprintln!("--seed needs a number");
                        return ExitCode::from(2);
                    }
                }
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: fault_bench [--quick] [--seed N]");
                return ExitCode::from(2);
            }
        }
    }
    // A hung B holds two sockets on each hop for every call in flight, and
    // the unprotected stack keeps every call in flight: raise the soft limit
    // on open files to the hard limit (up to 65536).
    match rlimit::increase_nofile_limit(65_536) {
        Ok(n) if n < 8_192 => eprintln!(
            "warning: only {n} open files allowed; the unprotected stacks may run out of sockets"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: cannot raise the open-file limit: {e}"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(quick, seed))
}

async fn run(quick: bool, seed: u64) -> ExitCode {
    let params = Params::new(quick, seed);
    let scs = scenarios(quick);
    let stacks = stacks();
    let mode = if quick { "quick" } else { "full" };

    println!(
        "fault_bench ({mode}): {} scenarios x {} stacks, {} calls/s offered to each stack, seed {}",
        scs.len(),
        stacks.len(),
        params.rate,
        params.seed
    );
    println!(
        "attempt timeout {:?}, deadline {:?} (ours), concurrency {}, attempts {}",
        params.attempt_timeout, params.deadline, params.concurrency, params.attempts
    );
    let budget = RetryBudgetConfig::default();
    println!(
        "preset: bulkhead {}, deadline {:?}, retry {} attempts from {:?} (exponential, jitter) \
         within a budget of {}% + {}/s over {:?}, breaker opening after {} failed attempts \
         in a row for {:?} with {} probes, attempt timeout {:?}",
        params.concurrency,
        params.deadline,
        params.attempts,
        params.retry_base_delay,
        budget.ratio * 100.0,
        budget.min_per_sec,
        budget.ttl,
        params.breaker_consecutive,
        params.breaker_open_for,
        params.breaker_probes,
        params.attempt_timeout
    );
    println!(
        "defer: DiskQueue under {}, replayer {} deliveries/s (burst {}) from the end of the fault, \
         drain wait up to {:?}",
        out_dir().join("queues").display(),
        params.replay_rate,
        params.replay_burst,
        params.drain_timeout
    );
    for s in &stacks {
        println!("  {:<17} {}", s.name, s.about);
    }
    println!();

    let total: u64 = scs.iter().map(|s| s.length.as_millis() as u64 / 100).sum();
    let progress = ProgressBar::new(total);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("progress template"),
    );

    let mut results = Vec::new();
    for sc in &scs {
        progress.set_message(sc.title.clone());
        let base = progress.position();
        results.extend(run_scenario(sc, &stacks, &params, &progress).await);
        progress.set_position(base + sc.length.as_millis() as u64 / 100);
    }
    progress.finish_and_clear();
    let _ = std::fs::remove_dir_all(out_dir().join("queues"));

    print_table(&results, &scs);
    let verdicts = verdicts(&results, &scs, &params);
    print_verdicts(&verdicts);

    let dir = out_dir();
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let report = Report {
        mode,
        machine: (
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::env::consts::OS,
            std::env::consts::ARCH,
        ),
        params: &params,
        stacks: stacks.iter().map(|s| (s.name, s.about)).collect(),
        scenarios: scs
            .iter()
            .map(|s| ScenarioReport {
                key: s.key,
                title: s.title.clone(),
                length_s: s.length.as_secs_f64(),
                phases: s
                    .schedule
                    .timeline(s.length)
                    .into_iter()
                    .map(|(a, b, k)| (a.as_secs_f64(), b.as_secs_f64(), k.as_str()))
                    .collect(),
            })
            .collect(),
        results: &results,
        verdicts: &verdicts,
    };
    let json = dir.join("results.json");
    let svg = dir.join("latency.svg");
    let written = serde_json::to_vec_pretty(&report)
        .map_err(BoxError::from)
        .and_then(|bytes| std::fs::write(&json, bytes).map_err(BoxError::from))
        .and_then(|()| plot(&svg, &results, &scs));
    if let Err(e) = written {
        eprintln!("cannot write the results: {e}");
        return ExitCode::FAILURE;
    }
    println!("\nwrote {} and {}", json.display(), svg.display());

    let failed: Vec<_> = verdicts
        .iter()
        .filter(|v| v.asserted && matches!(v.status, Status::Fail))
        .collect();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("\n{} verdict(s) failed", failed.len());
        ExitCode::FAILURE
    }
}
