//! [`Replayer`]: drains the queue into the dependency.

use super::ReplayerConfig;
use crate::error::{Rejection, RejectionKind};
use crate::queue::{DeliveredResponse, Job, Leased, Queue};
use crate::rate_limit::TokioClock;
use crate::{BoxError, ConfigError};
use bytes::{Buf, BufMut, Bytes};
use governor::clock::Clock;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::num::NonZeroU32;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tower::{Service, ServiceExt};
use tracing::Instrument as _;

type RetryResponse = Arc<dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync>;

/// Leases deferred jobs and sends them through a service, normally the same
/// protected client stack the [`DeferLayer`](super::DeferLayer) wraps.
///
/// What it does with each leased job:
///
/// - **Pace.** It waits for a permit of its own governor limit
///   ([`rate_per_second`](Self::rate_per_second), [`burst`](Self::burst))
///   before each send, so a recovering dependency gets at most that rate.
/// - **Send.** [`Job::to_request`] as an `http::Request<Full<Bytes>>`.
/// - **Ack** a response that is not a failure (by default anything but 5xx,
///   429 and a failing `grpc-status`; see
///   [`retry_response`](Self::retry_response)), storing its status, headers
///   (with its trailers, where gRPC puts its status) and body (up to
///   [`max_response_body`](Self::max_response_body)); the job then reads
///   `Delivered`.
/// - **Nack** a failure (an error or a failed response) with exponential
///   backoff by the job's attempts, `base_backoff × 2^(attempts-1)` up to
///   `max_backoff`. The queue dead-letters the job once it has used its
///   `max_attempts` or outlived its TTL; a job whose TTL has passed by the
///   time its turn comes is dead-lettered without being sent.
/// - **Back off.** After a failure the replayer gives the rest of its batch
///   back, pauses for its own backoff (by the number of failures in a row),
///   and then sends one job at a time until one succeeds.
/// - **Breaker gating.** When a send is rejected with `CircuitOpen`, it
///   sends nothing until that rejection's `retry_after` has passed (a
///   half-open breaker's rejection gives no time: the job is then given
///   back with its own backoff, and the replayer pauses for
///   `base_backoff`). Then it probes with one job at a time until one
///   succeeds.
///
/// Deliveries run one at a time by default; [`concurrency`](Self::concurrency)
/// lets more run at once (each still waits for its permit). A batch ends when
/// all of its deliveries have: the next lease then knows whether to probe.
///
/// Start it with [`spawn`](Self::spawn) and keep the [`ReplayerHandle`]:
/// dropping the handle stops the replayer (its leases are given back), and
/// [`ReplayerHandle::shutdown`] stops it and waits.
///
/// Every lease counts as an attempt in the queue, including a lease whose
/// job is given back unsent (the rest of a batch after a failure, or a send
/// the breaker rejected); keep `max_attempts` comfortably above the number
/// of failures you expect in one outage. Give the replayer the breaker of
/// its client stack ([`breaker`](Self::breaker)) and it leases nothing
/// while that breaker would reject, so that in an outage a job's attempts
/// are spent on the sends that reach the dependency (but for a breaker
/// that opens between the check and the send).
pub struct Replayer<Q, S> {
    queue: Arc<Q>,
    service: S,
    config: ReplayerConfig,
    retry_response: RetryResponse,
    obs: Arc<crate::observe::QueueMetrics>,
    registry: Option<crate::registry::Registry>,
    gate: Option<crate::circuit_breaker::CircuitBreakerHandle>,
}

/// The default replay failure classifier: every 5xx, and 429; and for a
/// gRPC response, a `grpc-status` (in the headers, or in the trailers once
/// they are read) that [`GrpcClassifier`](crate::classify::GrpcClassifier)
/// counts as a failure by default (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,
/// RESOURCE_EXHAUSTED, UNKNOWN).
pub(crate) fn retryable_status(status: StatusCode, headers: &HeaderMap) -> bool {
    // Reads `grpc-status` where trailers carry it, too.
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || super::grpc_failure(headers)
}

impl<Q: Queue, S> Replayer<Q, S> {
    /// A replayer of `queue` into `service`, with the defaults of
    /// [`ReplayerConfig`].
    pub fn new(queue: Q, service: S) -> Self {
        Replayer::with_config(queue, service, ReplayerConfig::default())
    }

    pub(crate) fn with_config(queue: Q, service: S, config: ReplayerConfig) -> Self {
        Replayer {
            queue: Arc::new(queue),
            service,
            config,
            retry_response: Arc::new(retryable_status),
            obs: Arc::default(),
            registry: None,
            gate: None,
        }
    }
}

impl<Q, S> Replayer<Q, S> {
    /// Names the queue this replayer drains: the `name` label of the
    /// `firebreak.replay.*` series (feature `metrics`), and the queue's
    /// entry in a [`Registry`](crate::registry::Registry): a named
    /// replayer registers its queue in
    /// [`Registry::global()`](crate::registry::Registry::global) (or the
    /// one given to [`registry`](Self::registry)) when it is spawned, until
    /// it stops. Use the name given to its [`DeferLayer`](super::DeferLayer).
    /// Default: none.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name: String = name.into();
        self.obs = Arc::new(crate::observe::QueueMetrics::new(Some(&name)));
        self.config.name = Some(name);
        self
    }

    /// The registry a named replayer registers its queue in, instead of
    /// [`Registry::global()`](crate::registry::Registry::global). See
    /// [self-registration](crate::registry#self-registration).
    pub fn registry(mut self, registry: &crate::registry::Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// The circuit breaker in `service`, read before each lease: while it is
    /// open the replayer leases nothing and waits out the open period (its
    /// [`retry_after`](crate::circuit_breaker::CircuitBreakerHandle::retry_after));
    /// while it is forced open, or half-open with every probe slot taken
    /// (by live callers), it looks again every
    /// [`poll_interval`](Self::poll_interval). Then it probes with one job
    /// at a time until one is delivered.
    ///
    /// Without it the replayer learns that the breaker is open only from a
    /// rejected send, and that send's lease has counted as an attempt of its
    /// job: an outage of many open periods can then dead-letter a job that
    /// reached the dependency only half as many times. With it, a lease is
    /// spent unsent only when the breaker opens (or a live caller takes the
    /// last probe slot) between the check and the send. Default: none.
    ///
    /// ```
    /// # use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
    /// # use tower_firebreak::defer::Replayer;
    /// # use tower_firebreak::queue::memory::MemoryQueue;
    /// # use tower::Layer;
    /// # async fn run() {
    /// # let client = tower::service_fn(|_: http::Request<http_body_util::Full<bytes::Bytes>>| async {
    /// #     Ok::<_, tower_firebreak::BoxError>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    /// # });
    /// let breaker = CircuitBreakerLayer::builder().build().unwrap();
    /// let handle = breaker.handle();
    /// let stack = breaker.layer(client);
    /// let replayer = Replayer::new(MemoryQueue::new(), stack)
    ///     .breaker(handle)
    ///     .spawn();
    /// # drop(replayer);
    /// # }
    /// ```
    pub fn breaker(mut self, handle: crate::circuit_breaker::CircuitBreakerHandle) -> Self {
        self.gate = Some(handle);
        self
    }

    /// The most deliveries a second. Default: 10.
    pub fn rate_per_second(mut self, n: u32) -> Self {
        self.config.rate_per_second = n;
        self
    }

    /// How many deliveries may start at one instant. Default: 1.
    pub fn burst(mut self, n: u32) -> Self {
        self.config.burst = n;
        self
    }

    /// How many jobs one lease takes, at most; fewer when the pace could
    /// not send them all within half the visibility timeout, or when the
    /// dependency was too slow to: what a batch has not sent by half the
    /// visibility timeout goes back to the queue (so that its leases cannot
    /// run out and let another replayer send it too), and the next batches
    /// are as large as what was sent in time. Default: 16.
    pub fn batch(mut self, n: usize) -> Self {
        self.config.batch = n;
        self
    }

    /// The most deliveries in flight at once. Default: 1. See
    /// [`ReplayerConfig::concurrency`].
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// How long a leased job is hidden from other replayers. It must be
    /// more than twice the longest delivery (a send starts no later than
    /// half of it after the lease). Default: 30 s.
    pub fn visibility(mut self, visibility: Duration) -> Self {
        self.config.visibility = visibility;
        self
    }

    /// How long to wait before looking again when the queue is empty.
    /// Default: 100 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// The retry delays: `base`, doubled each attempt, at most `max`.
    /// Default: 1 s to 5 min.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.base_backoff = base;
        self.config.max_backoff = max;
        self
    }

    /// How long [`ReplayerHandle::shutdown`] lets an in-flight delivery run
    /// before giving its lease back. Default: 10 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// Which responses are failures, to be retried later; the others are
    /// acked and stored. Default: every 5xx, 429, and a `grpc-status` of
    /// UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED or UNKNOWN.
    ///
    /// It is asked with the response's headers; when the response has
    /// trailers, it is asked again once the body is read, with the trailers
    /// added to the headers (a gRPC status normally comes there).
    pub fn retry_response<F>(mut self, predicate: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        self.retry_response = Arc::new(predicate);
        self
    }

    /// The most bytes of a response body that are stored with the job; the
    /// rest is not kept, and the stored headers gain
    /// `firebreak-body-truncated: true`. Default: 1 MiB.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config.max_response_body = bytes;
        self
    }

    /// The settings.
    pub fn config(&self) -> &ReplayerConfig {
        &self.config
    }
}

impl<Q, S> fmt::Debug for Replayer<Q, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<Q, S, B2> Replayer<Q, S>
where
    Q: Queue,
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<B2>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B2: http_body::Body + Send + 'static,
    B2::Data: Send,
    B2::Error: Into<BoxError>,
{
    /// Starts the replayer on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// When the settings are invalid (see [`ReplayerConfig::validate`]), or
    /// outside a tokio runtime. [`try_spawn`](Self::try_spawn) returns the
    /// settings error instead.
    pub fn spawn(self) -> ReplayerHandle {
        match self.try_spawn() {
            Ok(handle) => handle,
            Err(e) => panic!("invalid replayer settings: {e}"),
        }
    }

    /// Checks the settings and starts the replayer.
    pub fn try_spawn(self) -> Result<ReplayerHandle, ConfigError> {
        self.config.validate()?;
        let (stop, stopped) = watch::channel(false);
        // Held by the task until the replayer stops: the registry's
        // reference is weak.
        let registered = self.config.name.as_deref().map(|name| {
            let entry = crate::registry::QueueEntry::shared(name, self.queue.clone());
            crate::registry::target(self.registry.as_ref()).register_queue(name, &entry);
            entry
        });
        let task = tokio::spawn(self.run(stopped, registered));
        Ok(ReplayerHandle {
            stop,
            task: Some(task),
        })
    }

    async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        _registered: Option<Arc<dyn crate::registry::DynQueue>>,
    ) {
        // Taken apart so that no `&self` is held across an await, which
        // would require `S: Sync`.
        let Replayer {
            queue,
            mut service,
            config: cfg,
            retry_response,
            obs,
            registry: _,
            gate,
        } = self;
        let shared = Arc::new(Shared {
            queue,
            retry_response,
            cfg,
            obs,
        });
        let queue = &*shared.queue;
        let cfg = &shared.cfg;
        let obs = &*shared.obs;
        let rate = NonZeroU32::new(cfg.rate_per_second).expect("validated");
        let burst = NonZeroU32::new(cfg.burst).expect("validated");
        let limiter = RateLimiter::direct_with_clock(
            Quota::per_second(rate).allow_burst(burst),
            TokioClock::new(),
        );
        let concurrency = cfg.concurrency.max(1);
        let mut flight = Flight::default();
        // One job at a time until a send succeeds: after a failure, and
        // after waiting out an open breaker (half-open probes).
        let mut probing = false;
        let mut failures: u32 = 0;
        // The batch that the dependency's pace lets this replayer send
        // within half the visibility timeout, as last seen.
        let mut fits = batch_size(cfg);
        // Set when the service stayed not ready for half a visibility
        // timeout with a batch leased: the next lease waits for it first,
        // so that no lease (which counts as an attempt) is spent while it
        // stays not ready.
        let mut await_ready = false;
        loop {
            if is_stopped(&stop) {
                return;
            }
            if std::mem::take(&mut await_ready) {
                let ready = async { service.ready().await.map(|_| ()) };
                if race(ready, stopped(&mut stop)).await.is_err() {
                    return;
                }
            }
            if let Some(wait) = gate.as_ref().and_then(|g| gate_wait(g, cfg)) {
                tracing::debug!(target: "tower_firebreak", layer = "replayer", retry_after_ms = crate::duration_ms(wait), "breaker open; nothing leased");
                if sleep_or_stop(wait, &mut stop).await {
                    return;
                }
                // Then one job at a time: the breaker's half-open probes.
                probing = true;
                continue;
            }
            let max = if probing { 1 } else { fits };
            // Before the lease: its visibility runs from no earlier.
            let leased_at = Instant::now();
            let leased = match queue.lease(max, cfg.visibility).await {
                Ok(leased) => leased,
                Err(e) => {
                    tracing::warn!(target: "tower_firebreak", layer = "replayer", error = %e, "lease failed");
                    if sleep_or_stop(cfg.poll_interval.max(cfg.base_backoff), &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            if leased.is_empty() {
                if sleep_or_stop(cfg.poll_interval, &mut stop).await {
                    return;
                }
                continue;
            }
            // How long to pause after this batch: set by a failed send or an
            // open breaker, after which nothing more of the batch is sent.
            let mut pause: Option<Duration> = None;
            let mut note = |done: Done, pause: &mut Option<Duration>| match done {
                Done::Delivered | Done::Stopped => failures = 0,
                Done::Open(retry_after) => {
                    *pause = Some(pause.unwrap_or_default().max(retry_after))
                }
                Done::Failed => {
                    failures = failures.saturating_add(1);
                    let delay = backoff(cfg, failures);
                    *pause = Some(pause.unwrap_or_default().max(delay));
                }
                // The batch stops; the replayer re-raises the panic once the
                // other deliveries have settled.
                Done::Panicked => *pause = Some(pause.unwrap_or_default()),
            };
            let mut batch = leased.into_iter();
            let mut sent = 0;
            let mut outran = false;
            while let Some(item) = batch.next() {
                // A free slot first; deliveries that finish meanwhile report.
                while flight.len() >= concurrency && pause.is_none() {
                    match race(flight.next(), stopped(&mut stop)).await {
                        Ok(done) => note(done, &mut pause),
                        Err(()) => {
                            give_back(queue, std::iter::once(item).chain(batch), Duration::ZERO)
                                .await;
                            flight.finish(queue).await;
                            return;
                        }
                    }
                }
                if is_stopped(&stop) || !wait_permit(&limiter, &mut stop).await {
                    give_back(queue, std::iter::once(item).chain(batch), Duration::ZERO).await;
                    flight.finish(queue).await;
                    return;
                }
                // A send may have failed while this one waited for a slot or
                // its permit.
                while let Some(done) = flight.try_next() {
                    note(done, &mut pause);
                }
                if pause.is_some() {
                    give_back(queue, std::iter::once(item).chain(batch), Duration::ZERO).await;
                    break;
                }
                // A slow dependency makes the batch's tail wait for a slot:
                // past half the visibility timeout its leases may run out
                // before it is sent, and another replayer would lease and
                // send it too. So it goes back now, and the next batches
                // are as large as what was sent in time.
                if leased_at.elapsed() >= cfg.visibility / 2 {
                    tracing::debug!(target: "tower_firebreak", layer = "replayer", sent, "the rest of the batch goes back before its leases run out");
                    give_back(queue, std::iter::once(item).chain(batch), Duration::ZERO).await;
                    fits = sent.max(1);
                    outran = true;
                    break;
                }
                sent += 1;
                if item.job.deadline().is_some_and(|d| d <= SystemTime::now()) {
                    obs.expired();
                    settle_dead(queue, &item, "ttl expired").await;
                    continue;
                }
                // Joins the deferred request's trace: the stored
                // `traceparent` is a field here and is sent again as a
                // header by `replay_request`.
                let span = tracing::info_span!(
                    target: "tower_firebreak",
                    "firebreak.replay",
                    job_id = %item.lease.id(),
                    attempts = item.job.attempts(),
                    traceparent = tracing::field::Empty,
                );
                if let Some((_, tp)) = item
                    .job
                    .trace_context()
                    .iter()
                    .find(|(k, _)| k == "traceparent")
                {
                    span.record("traceparent", tp.as_str());
                }
                let started = Instant::now();
                // Readiness has the same bound as the wait for a slot: a
                // service that stays not ready (a breaker in readiness mode,
                // open for a minute) must not hold the job until its lease
                // runs out and another replayer sends it too.
                let ready = race(
                    tokio::time::timeout_at(
                        crate::later(leased_at, cfg.visibility / 2),
                        async { service.ready().await.map_err(Into::<BoxError>::into) }
                            .instrument(span.clone()),
                    ),
                    stopped(&mut stop),
                )
                .await;
                let call = match ready {
                    Ok(Ok(Ok(svc))) => Ok(span.in_scope(|| svc.call(replay_request(&item.job)))),
                    Ok(Ok(Err(e))) => Err(e),
                    Ok(Err(_)) => {
                        tracing::debug!(target: "tower_firebreak", layer = "replayer", sent, "the service was not ready before half the visibility timeout; the rest of the batch goes back");
                        give_back(queue, std::iter::once(item).chain(batch), Duration::ZERO).await;
                        sent -= 1;
                        fits = sent.max(1);
                        outran = true;
                        await_ready = true;
                        break;
                    }
                    Err(()) => {
                        // Shut down while the service was not ready: nothing
                        // was sent, and the job goes back for another replayer.
                        give_back(queue, std::iter::once(item).chain(batch), Duration::ZERO).await;
                        flight.finish(queue).await;
                        return;
                    }
                };
                let item = Arc::new(item);
                let send = settle(shared.clone(), item.clone(), call, started, stop.clone())
                    .instrument(span);
                flight.spawn(item, send);
            }
            // The batch ends when all of it has been delivered: the next
            // lease then knows whether to probe.
            while !flight.is_empty() {
                match race(flight.next(), stopped(&mut stop)).await {
                    Ok(done) => note(done, &mut pause),
                    Err(()) => {
                        flight.finish(queue).await;
                        return;
                    }
                }
            }
            flight.settle_panic(queue).await;
            if !outran {
                fits = fits.saturating_mul(2).min(batch_size(cfg));
            }
            probing = pause.is_some();
            if let Some(pause) = pause
                && sleep_or_stop(pause, &mut stop).await
            {
                return;
            }
        }
    }
}

/// How one delivery ended, for the replay loop's pacing; the delivery has
/// already settled its job with the queue.
enum Done {
    Delivered,
    Open(Duration),
    Failed,
    /// Shut down mid-send, past the grace: the job was given back.
    Stopped,
    /// The delivery's task panicked (a panic in the service).
    Panicked,
}

/// How long a replayer gated on `breaker` waits before it leases, or `None`
/// when a call would be let through (closed, disabled, half-open with a
/// probe slot free).
fn gate_wait(
    breaker: &crate::circuit_breaker::CircuitBreakerHandle,
    cfg: &ReplayerConfig,
) -> Option<Duration> {
    use crate::circuit_breaker::State;
    // First: it reopens the breaker on stalled probes, as a call would.
    if breaker.breaker().half_open_full() {
        return Some(cfg.poll_interval);
    }
    match breaker.state() {
        State::Open => breaker.retry_after().filter(|d| !d.is_zero()),
        State::ForcedOpen => Some(cfg.poll_interval),
        State::Closed | State::HalfOpen | State::Disabled => None,
    }
}

/// What the replay loop and each of its delivery tasks share.
struct Shared<Q> {
    queue: Arc<Q>,
    retry_response: RetryResponse,
    cfg: ReplayerConfig,
    obs: Arc<crate::observe::QueueMetrics>,
}

/// Sends one job (its call already made) and settles it with the queue:
/// ack with the response, or give it back to be retried later. Once a stop
/// is asked for, the send gets the shutdown grace; the ack or nack that
/// follows always runs to its end.
async fn settle<Q, F, R, B2>(
    shared: Arc<Shared<Q>>,
    item: Arc<Leased>,
    call: Result<F, BoxError>,
    started: Instant,
    mut stop: watch::Receiver<bool>,
) -> Done
where
    Q: Queue,
    F: Future<Output = Result<http::Response<B2>, R>>,
    R: Into<BoxError>,
    B2: http_body::Body,
    B2::Error: Into<BoxError>,
{
    let Shared {
        queue,
        retry_response,
        cfg,
        obs,
    } = &*shared;
    let queue = &**queue;
    let sent = match call {
        Ok(call) => {
            let send = pin!(deliver(call, &**retry_response, cfg.max_response_body));
            match with_grace(send, &mut stop, cfg.shutdown_grace).await {
                Some(sent) => sent,
                None => {
                    // Shut down mid-delivery, past the grace: the send is
                    // dropped and the job goes back for another replayer.
                    nack(queue, &item, Duration::ZERO).await;
                    return Done::Stopped;
                }
            }
        }
        Err(e) => sent_error(e),
    };
    obs.replayed(started.elapsed());
    match sent {
        Sent::Delivered(response) => {
            obs.delivered();
            settle_ack(queue, &item, response).await;
            Done::Delivered
        }
        Sent::Open(retry_after) => {
            // A half-open breaker whose probe slots are all taken says
            // "zero": its probes have not finished, so there is no time to
            // give. Every lease is an attempt, so "at once" would use the
            // job's attempts up at the replayer's pace without one send: the
            // job backs off by its attempts, as after a failed delivery, and
            // the replayer pauses for its base backoff (not the job's, which
            // can be minutes, while a probe may close the breaker at once).
            let (job_delay, pause) = if retry_after.is_zero() {
                let pause = cfg.base_backoff.max(cfg.poll_interval);
                (backoff(cfg, item.job.attempts()), pause)
            } else {
                (retry_after, retry_after)
            };
            tracing::debug!(target: "tower_firebreak", layer = "replayer", retry_after_ms = crate::duration_ms(pause), "breaker open; replay paused");
            obs.paused();
            nack(queue, &item, job_delay).await;
            Done::Open(pause)
        }
        Sent::Failed(why) => {
            obs.failed();
            let delay = backoff(cfg, item.job.attempts());
            tracing::debug!(target: "tower_firebreak", layer = "replayer", job_id = %item.lease.id(), attempts = item.job.attempts(), error = %why, "replay failed");
            nack(queue, &item, delay).await;
            Done::Failed
        }
    }
}

/// The deliveries in flight, each a task of its own so that it makes
/// progress (and its ack commits, together with the others') while the
/// loop waits for the pace or for a slot.
#[derive(Default)]
struct Flight {
    tasks: JoinSet<Done>,
    items: HashMap<tokio::task::Id, Arc<Leased>>,
    /// Jobs whose task panicked: given back once the others have settled.
    orphans: Vec<Arc<Leased>>,
    /// The first panic, re-raised once the others have settled.
    panic: Option<Box<dyn std::any::Any + Send>>,
}

impl Flight {
    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn spawn<F>(&mut self, item: Arc<Leased>, send: F)
    where
        F: Future<Output = Done> + Send + 'static,
    {
        let id = self.tasks.spawn(send).id();
        self.items.insert(id, item);
    }

    /// The next delivery to finish. Never resolves while none is in flight.
    async fn next(&mut self) -> Done {
        match self.tasks.join_next_with_id().await {
            Some(done) => self.reap(done),
            None => std::future::pending().await,
        }
    }

    /// A delivery that has already finished, if any.
    fn try_next(&mut self) -> Option<Done> {
        self.tasks
            .try_join_next_with_id()
            .map(|done| self.reap(done))
    }

    fn reap(&mut self, done: Result<(tokio::task::Id, Done), tokio::task::JoinError>) -> Done {
        match done {
            Ok((id, done)) => {
                self.items.remove(&id);
                done
            }
            Err(e) => {
                // The task never settled its job (nothing aborts these
                // tasks, so this is a panic in the service).
                if let Some(item) = self.items.remove(&e.id()) {
                    self.orphans.push(item);
                }
                if let Ok(panic) = e.try_into_panic() {
                    self.panic.get_or_insert(panic);
                }
                Done::Panicked
            }
        }
    }

    /// After a panic in one delivery: once the others have settled (the
    /// caller drained them), gives the panicked job back and re-raises the
    /// panic, which stops the replayer as a panic in an inline send did.
    async fn settle_panic<Q: Queue>(&mut self, queue: &Q) {
        for item in std::mem::take(&mut self.orphans) {
            nack(queue, &item, Duration::ZERO).await;
        }
        if let Some(panic) = self.panic.take() {
            std::panic::resume_unwind(panic);
        }
    }

    /// On shutdown: waits for the deliveries in flight (each gives its send
    /// the shutdown grace, then acks, nacks or gives its job back), then
    /// settles a panic as [`settle_panic`](Self::settle_panic) does.
    async fn finish<Q: Queue>(&mut self, queue: &Q) {
        while !self.is_empty() {
            self.next().await;
        }
        self.settle_panic(queue).await;
    }
}

async fn deliver<F, R, B2>(
    call: F,
    retry_response: &(dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync),
    max_body: usize,
) -> Sent
where
    F: Future<Output = Result<http::Response<B2>, R>>,
    R: Into<BoxError>,
    B2: http_body::Body,
    B2::Error: Into<BoxError>,
{
    let res = match call.await {
        Ok(res) => res,
        Err(e) => return sent_error(e.into()),
    };
    let (parts, body) = res.into_parts();
    if retry_response(parts.status, &parts.headers) {
        return Sent::Failed(failed_response(parts.status, &parts.headers));
    }
    let mut headers = parts.headers;
    let grpc = crate::defer::response::is_grpc(&headers);
    let (body, truncated, trailers) = match read_capped(body, max_body, grpc).await {
        Ok(read) => read,
        Err(e) => return Sent::Failed(e),
    };
    // gRPC sends its status in the trailers: they join the stored headers
    // (replacing a header of the same name), and the predicate looks again
    // with them in.
    if let Some(trailers) = trailers.filter(|t| !t.is_empty()) {
        for name in trailers.keys() {
            headers.remove(name);
        }
        let mut last = None;
        for (name, value) in trailers {
            let name = name.or(last).expect("the first entry carries its name");
            headers.append(name.clone(), value);
            last = Some(name);
        }
        if retry_response(parts.status, &headers) {
            return Sent::Failed(failed_response(parts.status, &headers));
        }
    }
    if truncated {
        headers.insert(TRUNCATED_HEADER, http::HeaderValue::from_static("true"));
    }
    Sent::Delivered(DeliveredResponse {
        status: parts.status.as_u16(),
        headers,
        body,
    })
}

/// Why a response counts as a failed delivery, for the log.
fn failed_response(status: StatusCode, headers: &HeaderMap) -> BoxError {
    match headers
        .get(crate::classify::GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
    {
        Some(code) => format!("status {}, grpc-status {code}", status.as_u16()).into(),
        None => format!("status {}", status.as_u16()).into(),
    }
}

/// The header added to a stored response whose body was cut at
/// [`ReplayerConfig::max_response_body`].
pub(crate) const TRUNCATED_HEADER: &str = "firebreak-body-truncated";

/// Reads `body`, keeping at most `max` bytes of its data (`true` when there
/// was more: the request was delivered either way, only what is stored is
/// cut), and its trailers.
///
/// A body over `max` is not read further, except for gRPC (`grpc`), whose
/// status comes in the trailers after the messages: that is read on, the
/// data dropped, for at most `max` bytes more. A body that ends in an error
/// after the cut still counts as delivered, cut, without trailers.
async fn read_capped<B>(
    body: B,
    max: usize,
    grpc: bool,
) -> Result<(Bytes, bool, Option<HeaderMap>), BoxError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    let mut out = bytes::BytesMut::new();
    let mut truncated = false;
    let mut dropped: usize = 0;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) if truncated => return Ok((out.freeze(), true, None)),
            Err(e) => return Err(e.into()),
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                let keep = data.remaining().min(max - out.len());
                out.put((&mut data).take(keep));
                if data.has_remaining() {
                    truncated = true;
                    dropped = dropped.saturating_add(data.remaining());
                    if !grpc || dropped > max {
                        return Ok((out.freeze(), true, None));
                    }
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(t) = frame.into_trailers() {
            match &mut trailers {
                Some(all) => all.extend(t),
                None => trailers = Some(t),
            }
        }
    }
    Ok((out.freeze(), truncated, trailers))
}

async fn settle_ack<Q: Queue>(queue: &Q, item: &Leased, response: DeliveredResponse) {
    if let Err(e) = queue.ack(&item.lease, response).await {
        // The job will be leased and sent again: at least once.
        tracing::warn!(target: "tower_firebreak", layer = "replayer", job_id = %item.lease.id(), error = %e, "ack failed");
    }
}

async fn settle_dead<Q: Queue>(queue: &Q, item: &Leased, reason: &str) {
    if let Err(e) = queue.dead_letter(&item.lease, reason).await {
        tracing::warn!(target: "tower_firebreak", layer = "replayer", job_id = %item.lease.id(), error = %e, "dead-letter failed");
    }
}

async fn give_back<Q: Queue>(queue: &Q, items: impl IntoIterator<Item = Leased>, delay: Duration) {
    for item in items {
        nack(queue, &item, delay).await;
    }
}

async fn nack<Q: Queue>(queue: &Q, item: &Leased, delay: Duration) {
    if let Err(e) = queue.nack(&item.lease, delay).await {
        // Not fatal: the lease expires and the job is queued again.
        tracing::warn!(target: "tower_firebreak", layer = "replayer", job_id = %item.lease.id(), error = %e, "nack failed");
    }
}

/// A send that failed before any response: an open breaker pauses replay,
/// anything else is a failed delivery.
fn sent_error(e: BoxError) -> Sent {
    match Rejection::of(&*e) {
        Some(r) if r.kind() == RejectionKind::CircuitOpen => {
            Sent::Open(r.retry_after().unwrap_or(Duration::from_secs(1)))
        }
        _ => Sent::Failed(e),
    }
}

/// The request to send for `job`: [`Job::to_request`], plus the
/// idempotency key and trace context as headers when the stored headers
/// lack them (a job built with `Job::new(..).with_idempotency_key(..)` has
/// the key only in the envelope), so the dependency can dedup. The original
/// caller's time budget (`grpc-timeout`, [`TIMEOUT_HEADER`]) is dropped: it
/// ran out long ago, and a replay has its own (a stale one would cap every
/// attempt at what the caller had left then).
///
/// [`TIMEOUT_HEADER`]: crate::deadline::TIMEOUT_HEADER
fn replay_request(job: &Job) -> http::Request<Full<Bytes>> {
    let mut req = job.to_request().map(Full::new);
    let headers = req.headers_mut();
    headers.remove(crate::deadline::GRPC_TIMEOUT_HEADER);
    headers.remove(crate::deadline::TIMEOUT_HEADER);
    if let Some(key) = job.idempotency_key()
        && !headers.contains_key("idempotency-key")
        && let Ok(v) = http::HeaderValue::from_str(key)
    {
        headers.insert("idempotency-key", v);
    }
    for (name, value) in job.trace_context() {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) && !headers.contains_key(&name)
        {
            headers.insert(name, value);
        }
    }
    req
}

enum Sent {
    Delivered(DeliveredResponse),
    Open(Duration),
    Failed(BoxError),
}

/// The configured batch, cut to what the pace can send within half the
/// visibility timeout, so that no lease expires while its job waits for a
/// permit (which would let another replayer send it too).
fn batch_size(cfg: &ReplayerConfig) -> usize {
    let sendable = f64::from(cfg.rate_per_second) * cfg.visibility.as_secs_f64() / 2.0;
    cfg.batch.min((sendable as usize).max(1))
}

fn backoff(cfg: &ReplayerConfig, n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(31);
    cfg.base_backoff
        .saturating_mul(1u32 << exp)
        .min(cfg.max_backoff)
}

fn is_stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Resolves when the handle asks the replayer to stop, or is dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs `a` and `b` together; the first to finish wins.
async fn race<A: Future, B: Future>(a: A, b: B) -> Result<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        b.as_mut().poll(cx).map(Err)
    })
    .await
}

/// Sleeps for `d`; `true` when asked to stop meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    race(tokio::time::sleep(d), stopped(stop)).await.is_err()
}

/// Waits for the pace limiter's next permit; `false` when asked to stop.
async fn wait_permit<C>(
    limiter: &RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        C,
        governor::middleware::NoOpMiddleware<C::Instant>,
    >,
    stop: &mut watch::Receiver<bool>,
) -> bool
where
    C: Clock,
{
    loop {
        match limiter.check() {
            Ok(()) => return true,
            Err(not_until) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                if sleep_or_stop(wait, stop).await {
                    return false;
                }
            }
        }
    }
}

/// Drives `send`; once a stop is asked for, gives it `grace` more.
async fn with_grace<F: Future + Unpin>(
    mut send: F,
    stop: &mut watch::Receiver<bool>,
    grace: Duration,
) -> Option<F::Output> {
    match race(&mut send, stopped(stop)).await {
        Ok(out) => Some(out),
        Err(()) => tokio::time::timeout_at(crate::later(Instant::now(), grace), send)
            .await
            .ok(),
    }
}

/// Keep it alive while the replayer should run: dropping it stops the
/// replayer, which gives back the leases it holds.
#[derive(Debug)]
pub struct ReplayerHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl ReplayerHandle {
    /// Stops the replayer and waits for it: the deliveries in flight may
    /// finish within the shutdown grace (then they are acked or nacked), and
    /// every other lease it holds is given back to the queue.
    ///
    /// # Panics
    ///
    /// Resumes the replayer task's panic, if it panicked (a panic in the
    /// service it sends through).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    /// Whether the replayer task has ended (after a shutdown, or a panic
    /// in the service).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for ReplayerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
