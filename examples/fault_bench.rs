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
//! Output: a table, verdicts, `target/fault_bench/results.json` and
//! `target/fault_bench/latency.svg` (A's p99 latency and in-flight calls over
//! time per stack, fault phases shaded). The verdicts that do not depend on
//! timing are checked, and the run exits non-zero if one fails.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::StatusCode;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
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
use tower_firebreak::bulkhead::BulkheadLayer;
use tower_firebreak::chaos::{ChaosLayer, Faults, Latency, Phase, PhaseKind, Schedule};
use tower_firebreak::deadline::{DeadlineLayer, PropagateDeadlineLayer};
use tower_firebreak::error::Rejection;
use tower_firebreak::timeout::TimeoutLayer;

// ---------------------------------------------------------------------------
// Settings

/// The knobs every stack shares, so the stacks differ only in their layers.
#[derive(Clone, Copy, Debug, Serialize)]
struct Params {
    /// Calls per second offered to each copy of A.
    rate: u32,
    /// One attempt's timeout (every stack that has one).
    attempt_timeout: Duration,
    /// Our whole-call deadline.
    deadline: Duration,
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
            deadline: Duration::from_secs(2),
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
    build: fn(&Params) -> Client,
}

fn stacks() -> Vec<Stack> {
    vec![
        Stack {
            name: "none",
            about: "hyper alone",
            build: stack_none,
        },
        Stack {
            name: "tower",
            about: "tower: load shed + concurrency limit + retry (trivial policy) + timeout",
            build: stack_tower,
        },
        Stack {
            name: "tower-resilience",
            about: "tower-resilience 0.13: bulkhead + circuit breaker + retry + time limiter",
            build: stack_tower_resilience,
        },
        Stack {
            name: "ours",
            about: "firebreak: bulkhead + deadline + timeout (breaker and retry not merged yet)",
            build: stack_ours,
        },
        // TODO(issue 7): the preset, once `Resilience` lands:
        //   Stack { name: "ours (preset)", about: "firebreak: the Resilience preset",
        //           build: |p| /* Resilience::builder()...build() over base_client() */ },
        // TODO(issue 5): with `defer`, the same preset under `DeferLayer::new(DiskQueue::open(..))`
        //   and a `Replayer` spawned next to A; the verdicts then also need the queue's
        //   delivered and lost counts (see notes/faultbench.md).
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

fn stack_ours(p: &Params) -> Client {
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(BulkheadLayer::new(p.concurrency))
            .layer(DeadlineLayer::new(p.deadline).read_headers(false))
            // TODO(issue 4): .layer(RetryLayer::new(RetryPolicy::exponential(50ms)
            //     .max_attempts(p.attempts).budget(RetryBudget::new(10s, 10, 0.2))))
            // TODO(issue 3): .layer(CircuitBreakerLayer::builder().failure_rate(0.5)
            //     .count_window(20).minimum_calls(10).open_for(2s).build()?)
            .layer(TimeoutLayer::new(p.attempt_timeout))
            .layer(PropagateDeadlineLayer::new())
            .service(base_client()),
    )
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
    shed: Mutex<BTreeMap<&'static str, Histogram<u64>>>,
}

struct InFlight<'a>(&'a Gauge);

impl Gauge {
    fn enter(&self) -> InFlight<'_> {
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
}

/// A's only route: call B through the stack and say what happened.
/// 200 = B answered 200; 503 = the stack shed the call (the body names the
/// rejection); 502 = it failed.
async fn a_handler(State(st): State<AState>) -> (StatusCode, &'static str) {
    let _in_flight = st.gauge.enter();
    let req = http::Request::get(&*st.b_url)
        .body(Full::default())
        .expect("request");
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
}

async fn rig(stack: &Stack, params: &Params, sc: &Scenario, start: Instant) -> Rig {
    let reached_b = Arc::new(AtomicU64::new(0));
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
        .service(Router::new().route("/work", get(|| async { "ok" })));
    let b = Server::start(b_svc).await;

    let gauge = Arc::new(Gauge::default());
    let state = AState {
        client: (stack.build)(params),
        b_url: format!("http://{}/work", b.addr).into(),
        gauge: gauge.clone(),
    };
    let a = Server::start(Router::new().route("/", get(a_handler)).with_state(state)).await;
    Rig {
        a_addr: a.addr,
        a,
        b,
        gauge,
        reached_b,
        in_flight: Arc::default(),
    }
}

/// The open-loop load generator: call `i` is due at `start + i / rate`.
async fn load(a: SocketAddr, params: Params, start: Instant, length: Duration) -> Vec<Sample> {
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let n = (u128::from(params.rate) * length.as_millis() / 1000) as u32;
    let every = Duration::from_secs(1) / params.rate;
    let url: Arc<str> = format!("http://{a}/").into();
    let mut calls = JoinSet::new();
    for i in 0..n {
        let due = start + every * i;
        tokio::time::sleep_until(due).await;
        let (client, url) = (client.clone(), url.clone());
        calls.spawn(async move {
            let req = http::Request::get(&*url)
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
    /// Answers (of any kind) per second over the whole run, drain included.
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
    for stack in stacks {
        rigs.push(rig(stack, params, sc, start).await);
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
    ticker.abort();
    for s in &samplers {
        s.abort();
    }
    for ((stack, rig), samples) in stacks.iter().zip(&rigs).zip(&all_samples) {
        results.push(summarize(sc, stack.name, samples, rig, wall));
    }
    for r in rigs {
        drop(r.a);
        drop(r.b);
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
    /// Needs a layer that is not on this branch yet.
    Pending(String),
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

fn pending(claim: &str, needs: &str) -> Verdict {
    Verdict {
        claim: claim.into(),
        status: Status::Pending(needs.into()),
        detail: String::new(),
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

    // --- B hangs
    let hang = sc("hang");
    let (h0, h1) = (hang.fault.0.as_secs_f64(), hang.fault.1.as_secs_f64());
    let hang_len = h1 - h0;
    let none = get("hang", "none");
    // TODO(issue 7): measure these on "ours (preset)" once it is in `stacks()`.
    let ours = get("hang", "ours");
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
        "B hangs: ours keeps A's in-flight calls bounded (peak under half of none's)",
        ours.peak_in_flight * 2 < none.peak_in_flight,
        format!(
            "peak in flight: ours {} (bulkhead {}), none {}",
            ours.peak_in_flight, p.concurrency, none.peak_in_flight
        ),
    ));
    v.push(check(
        "B hangs: fewer calls reach B with ours than with no protection",
        ours.reached_b < none.reached_b,
        format!(
            "reached B: ours {}, none {} ({:.2}x); measured on 'ours' as it stands \
             (bulkhead + deadline + timeout) until the preset lands (issue 7)",
            ours.reached_b,
            none.reached_b,
            ours.reached_b as f64 / none.reached_b.max(1) as f64
        ),
    ));
    let limit = p.attempt_timeout.as_secs_f64() * 1.2 * 1000.0;
    v.push(measured(
        "B hangs: A's p99 stays within the attempt timeout + 20% (preset pending; 'ours' shown)",
        format!(
            "ours p99 {:.0} ms during the hang, {:.0} ms overall; limit {limit:.0} ms \
             ({})",
            ours.fault_p99_ms,
            ours.p99_ms,
            if ours.fault_p99_ms <= limit {
                "within"
            } else {
                "over"
            }
        ),
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
    // TODO(issue 3): assert that the breaker opened
    // (`ours.rejected_by["circuit_open"].count > 0`) and measure
    // `ours.rejected_by["circuit_open"].in_a_p99_ms` against 1 ms (inside A;
    // `p99_ms` adds the caller's HTTP round trip to A).
    v.push(pending(
        "B hangs: the breaker opens, and rejected calls answer in under 1 ms p99",
        "circuit_breaker (issue 3) in the 'ours' stack",
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
    // TODO(issue 4): assert reached_b <= 1.2 * offered + min_per_sec * length
    // for the preset in the "errors" scenario.
    v.push(pending(
        "B returns 503 at 50%: the preset's retries stay within the budget \
         (calls reaching B <= 1.2x offered + the floor)",
        "retry with RetryBudget (issue 4) and the preset (issue 7)",
    ));
    v.push(measured(
        "B returns 503 at 50%: retry amplification for comparison",
        format!(
            "{}; {}; {}; {} offered during the fault",
            amp("tower"),
            amp("tower-resilience"),
            amp("none"),
            offered_fault
        ),
    ));

    // --- defer
    // TODO(issue 5): assert lost == 0 and delivered == deferred after the drain.
    v.push(pending(
        "With defer: zero requests lost; everything accepted during the outage is delivered after recovery, paced",
        "defer + DiskQueue + Replayer (issue 5)",
    ));

    // --- ours vs tower-resilience, every scenario
    for s in scs {
        let (o, t) = (get(s.key, "ours"), get(s.key, "tower-resilience"));
        v.push(measured(
            &format!(
                "{}: ours vs tower-resilience (ours has no breaker or retry yet; \
                 read success with p99)",
                s.title
            ),
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
    let bad: Vec<_> = results
        .iter()
        .filter(|r| r.success + r.rejected + r.deferred + r.failed != r.offered)
        .map(|r| format!("{}/{}", r.scenario, r.stack))
        .collect();
    v.push(check(
        "harness: every offered call is accounted for",
        bad.is_empty(),
        if bad.is_empty() {
            format!("{} runs", results.len())
        } else {
            format!("miscounted: {}", bad.join(", "))
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
            Status::Pending(needs) => format!("pending: needs {needs}"),
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
        "attempt timeout {:?}, deadline {:?}, concurrency {}, attempts {}",
        params.attempt_timeout, params.deadline, params.concurrency, params.attempts
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
