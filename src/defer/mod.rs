//! Durable fallback-to-queue: a request that cannot be delivered now is
//! stored, answered `202 Accepted`, and replayed once the dependency is
//! healthy again.
//!
//! [`Defer`] sits in front of a client stack (normally breaker, timeout and
//! the HTTP client). It buffers the request body, calls the inner service
//! with an `http::Request<Full<Bytes>>`, and when that call fails and the
//! request may be deferred, it stores the request as a
//! [`Job`] in a [`Queue`] and answers for it:
//!
//! | what happened | answer |
//! | --- | --- |
//! | the call succeeded, or failed for a request that may not be deferred | the inner response or error, unchanged |
//! | the call failed; the job was stored | `202 Accepted`, `firebreak-job-id`, `Location` (with a [status path](DeferLayer::status_path)), `Retry-After`, JSON body |
//! | the call failed; a job with the same `Idempotency-Key` and the same method, URI and body exists, in the same [key scope](DeferLayer::key_scope) (by default the same `Authorization`) | `200 OK` with that job's id and status |
//! | the call failed; the key is held by a different request | `409 Conflict`, problem details |
//! | the call failed; the queue is full or unavailable | `503 Service Unavailable`, problem details; the request was **not** accepted |
//! | the body is over [`max_body`](DeferLayer::max_body) | `413 Payload Too Large`, problem details; never sent, never queued |
//! | the body ends in an error (the client went away, or sent less than its `Content-Length`) | `400 Bad Request`, problem details (`kind: body_unreadable`); never sent, never queued |
//! | the body has not all arrived within [`body_timeout`](DeferLayer::body_timeout) | `408 Request Timeout`, problem details (`kind: body_timeout`); never sent, never queued |
//! | a request that may be deferred has an `Idempotency-Key` that is empty, sent twice, over [`MAX_IDEMPOTENCY_KEY`] bytes, or not printable ASCII | `400 Bad Request`, problem details (`kind: bad_idempotency_key`); never sent, never queued (a request that may not be deferred passes through, whatever its key) |
//!
//! The idempotency check is the queue's, so it happens only when a call
//! fails: a repeat of a deferred request that arrives once the dependency
//! is healthy again goes through to the dependency, which should dedup by
//! `Idempotency-Key` (see Delivery below). No queue lookup is made on the
//! happy path.
//!
//! A **failure** is an `Err` from the inner service (by default every error:
//! our rejections, [`CircuitOpen`](crate::circuit_breaker::CircuitOpen),
//! [`BulkheadFull`](crate::bulkhead::BulkheadFull),
//! [`DeadlineExceeded`](crate::deadline::DeadlineExceeded),
//! [`Elapsed`](crate::timeout::Elapsed), [`RateLimited`](crate::rate_limit::RateLimited),
//! and the client's own errors; see [`DeferLayer::defer_error`]), or a
//! response that [`DeferLayer::defer_response`] classifies as failed (by
//! default every 5xx, and a gRPC failure status in the response headers). A
//! request **may be deferred** when
//! [`deferrable_by_default`] says so (its method is not `GET` and it carries
//! `Idempotency-Key`), or when your own [`DeferLayer::deferrable`] predicate
//! does.
//!
//! The `202` body:
//!
//! ```json
//! { "job_id": "01938f6e-5a2b-7c3d-8e4f-0123456789ab", "status": "queued",
//!   "links": { "status": "/jobs/01938f6e-5a2b-7c3d-8e4f-0123456789ab" } }
//! ```
//!
//! A [`Replayer`] drains the queue into the dependency later: paced by a
//! governor limit, gated by the circuit breaker (nothing is sent while the
//! breaker rejects with `CircuitOpen`; then one probe at a time until one
//! succeeds), retried with exponential backoff and acked with the delivered
//! response. [`status_router`] (feature `axum`) serves each job's status and,
//! once delivered, the stored response.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_firebreak::{BoxError, defer::{DeferLayer, JOB_ID_HEADER, Replayer},
//!     queue::{JobId, JobStatus, Queue, memory::MemoryQueue}, timeout::TimeoutLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let queue = MemoryQueue::new();
//! // The dependency hangs: every attempt times out.
//! let client = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(1)))
//!     .service(service_fn(|_: http::Request<Full<Bytes>>| async {
//!         std::future::pending::<Result<http::Response<Full<Bytes>>, BoxError>>().await
//!     }));
//! let svc = ServiceBuilder::new()
//!     .layer(DeferLayer::new(queue.clone()).status_path("/jobs"))
//!     .service(client);
//!
//! let req = http::Request::post("http://orders.internal/orders")
//!     .header("idempotency-key", "order-7")
//!     .body(Full::new(Bytes::from("{\"sku\":42}")))?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 202);
//! let id: JobId = res.headers()[JOB_ID_HEADER].to_str()?.parse()?;
//! assert_eq!(res.headers()["location"], format!("/jobs/{id}"));
//!
//! // Later, the dependency is back and a replayer delivers the job.
//! let healthy = service_fn(|_: http::Request<Full<Bytes>>| async {
//!     Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::from("created"))))
//! });
//! let replayer = Replayer::new(queue.clone(), healthy).spawn();
//! while !matches!(queue.status(&id).await?, Some(JobStatus::Delivered { .. })) {
//!     tokio::time::sleep(Duration::from_millis(50)).await;
//! }
//! replayer.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Defaults
//!
//! [`DeferConfig::default()`]: a 1 MiB body limit, `Retry-After: 5` when the
//! failure gave no hint of its own, no status path and no TTL.
//! [`ReplayerConfig::default()`]: 10 deliveries a second with a burst of 1,
//! leases of 16 jobs for 30 s, retries from 1 s doubling up to 5 min.
//!
//! # Stacking, and axum
//!
//! `Defer` goes outermost, before the rate limiter (DESIGN.md's standard
//! pipeline): everything inside it may reject, and every rejection of a
//! deferrable request becomes a job. Its response body is
//! `Either<B, DeferBody>` (the inner body, or ours: [`DeferBody`]) and its error is
//! [`BoxError`]: errors it does not defer pass through. Where an infallible
//! service is needed (`axum::Router::route_service`, `Router::layer`), put
//! [`RejectionResponseLayer`](crate::http::RejectionResponseLayer) outside
//! it, which turns the errors left into their HTTP responses.
//!
//! Because the inner service is a client stack of
//! `http::Request<Full<Bytes>>`, the usual place for `Defer` is in front of
//! the call to the dependency (a proxy route, or the client a handler
//! uses), not around the axum router itself.
//!
//! # Readiness
//!
//! `poll_ready` is the inner service's. `call` moves the ready inner service
//! into the response future (leaving a clone behind), because the inner call
//! starts only once the body is buffered. Nothing is reserved in the queue
//! until a call fails.
//!
//! # gRPC
//!
//! A gRPC unary call is an HTTP/2 POST, so the same layer defers it: the
//! method path, the metadata and the framed message are stored and replayed
//! as they are. A request whose `content-type` is `application/grpc…` is
//! answered in gRPC's terms instead of with a `202`, which a gRPC client
//! would read as a transport error:
//!
//! | what happened | gRPC answer |
//! | --- | --- |
//! | stored, or the same key again | `grpc-status: 0` with one empty message (the default value of any proto3 response type) and the job id in the `firebreak-job-id` response metadata |
//! | the same key again, and that job was dead-lettered | `ABORTED`, with the reason in `grpc-message` and the job id in the metadata |
//! | the key is held by a different request | `ALREADY_EXISTS` |
//! | the queue is full or unavailable | `UNAVAILABLE`, with `grpc-retry-pushback-ms` |
//! | the message is over the body limit | `RESOURCE_EXHAUSTED` |
//! | the message did not all arrive within the body timeout | `DEADLINE_EXCEEDED` |
//!
//! gRPC clients send no `Idempotency-Key` of their own: send it as request
//! metadata named `idempotency-key` (it travels as that header), or widen
//! [`DeferLayer::deferrable`]. `Defer` accepts tonic's request body, so it can
//! sit in a tonic client's stack (`tonic::client::Grpc::new(defer_stack)`),
//! and the caller reads the job id from the response:
//!
//! ```text
//! let mut req = tonic::Request::new(CreateOrder { sku: 42 });
//! req.metadata_mut().insert("idempotency-key", "order-7".parse()?);
//! let res = orders.create(req).await?;
//! if let Some(id) = res.metadata().get("firebreak-job-id") {
//!     // deferred: the empty response is a placeholder; poll the job
//! }
//! ```
//!
//! `tests/defer/grpc.rs` runs this through `tonic::client::Grpc` with the
//! `tonic` feature. The replayer reads a replayed gRPC call's status from its
//! headers or its trailers: a failing code (UNAVAILABLE and the other
//! defaults of [`GrpcClassifier`](crate::classify::GrpcClassifier)) is
//! retried like a 5xx, and any other is stored, trailers included, as the
//! delivered response.
//!
//! # Delivery
//!
//! At least once: the dependency may see a replayed request more than once,
//! and a request that timed out may have reached it before it was deferred.
//! It should dedup by `Idempotency-Key`, which is stored and replayed with
//! the request.

mod body;
mod config;
mod error;
pub mod future;
mod layer;
mod replay;
mod response;
#[cfg(feature = "axum")]
mod status;

pub use self::body::DeferBody;
pub use self::config::{DeferConfig, ReplayerConfig};
pub use self::error::BodyTooLarge;
pub use self::layer::DeferLayer;
pub use self::replay::{Replayer, ReplayerHandle};
pub use self::response::{JOB_ID_HEADER, status_json};
#[cfg(feature = "axum")]
pub use self::status::status_router;

use crate::BoxError;
use crate::error::Rejection;
use crate::queue::{Enqueued, Job, Queue, QueueError};
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::Service;

/// The default deferrable-request predicate: the method is not `GET` and
/// the request carries an `Idempotency-Key` header.
pub fn deferrable_by_default(parts: &http::request::Parts) -> bool {
    parts.method != Method::GET && parts.headers.contains_key("idempotency-key")
}

/// The default idempotency-key scope: the caller's credentials, that is a
/// digest of the request's `Authorization` header (none without one).
///
/// A key dedups only against requests in the same scope, so two clients
/// that happen to pick the same key (`order-7`) get a job each, and neither
/// is answered with the other's job id and stored response. A client whose
/// `Authorization` changes between a request and its retry (a refreshed
/// token, a per-request signature such as AWS SigV4) then gets a second job
/// instead of the first one's id: give such callers a scope of their own
/// with [`DeferLayer::key_scope`] (a tenant or account id), or none at all
/// for keys that are global by design.
///
/// Callers who authenticate with a cookie and no `Authorization` all share
/// the one scope of "no credentials": one who sends another's key, with
/// the same method, URI and body, is answered with that job's id and
/// stored response. Cookies are left out of the default on purpose (other
/// cookies change between a request and its retry, which would run it
/// twice); scope such callers by their session or user id with
/// [`DeferLayer::key_scope`].
///
/// The stored request keeps every header, credentials included, so that a
/// replay is authorised as the call was: the queue holds them in plain
/// text (protect it as you would the credentials), and a short-lived token
/// may have expired by the time of the replay (its 401 is the delivered
/// answer; give the replayer its own credentials with a layer that sets
/// them if yours expire sooner than a dependency's outage lasts).
pub fn scope_by_authorization(parts: &http::request::Parts) -> Option<String> {
    let auth = parts.headers.get(http::header::AUTHORIZATION)?;
    Some(digest(auth.as_bytes()))
}

/// 16 hex digits of SHA-256: a scope of fixed length, so that no scope and
/// key can be read as another scope and key.
fn digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    crate::queue::codec::hex(&Sha256::digest(bytes)[..8])
}

/// The default failed-response classifier: every 5xx, and a gRPC failure
/// whose `grpc-status` comes in the response headers (a "Trailers-Only"
/// answer, as a server that sheds load or a proxy with no healthy upstream
/// gives) with one of the codes [`GrpcClassifier`](crate::classify::GrpcClassifier)
/// counts as a failure by default (UNAVAILABLE, DEADLINE_EXCEEDED,
/// INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN). A status that comes in trailers,
/// after the response has begun, cannot be deferred: the caller has it.
pub fn server_error(status: StatusCode, headers: &HeaderMap) -> bool {
    status.is_server_error() || grpc_failure(headers)
}

/// Whether `headers` carry a `grpc-status` that counts as a failure.
pub(crate) fn grpc_failure(headers: &HeaderMap) -> bool {
    static GRPC: std::sync::LazyLock<crate::classify::GrpcClassifier> =
        std::sync::LazyLock::new(crate::classify::GrpcClassifier::new);
    headers.contains_key(crate::classify::GRPC_STATUS)
        && GRPC.classify_trailers(Some(headers)) == crate::classify::Outcome::Failure
}

type Deferrable = Arc<dyn Fn(&http::request::Parts) -> bool + Send + Sync>;
type KeyScope = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;
type FailedResponse = Arc<dyn Fn(StatusCode, &HeaderMap) -> bool + Send + Sync>;
type FailedError = Arc<dyn Fn(&(dyn Error + 'static)) -> bool + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) max_body: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) status_path: Option<Arc<str>>,
    pub(crate) retry_after: Duration,
    pub(crate) ttl: Option<Duration>,
    pub(crate) deferrable: Deferrable,
    pub(crate) key_scope: KeyScope,
    pub(crate) failed_response: FailedResponse,
    pub(crate) failed_error: FailedError,
    pub(crate) obs: Arc<crate::observe::QueueMetrics>,
    /// A named layer's registry entry: the registry holds it weakly, so it
    /// lives as long as the layer or one of its services.
    pub(crate) registered: Option<(Arc<str>, Arc<dyn crate::registry::DynQueue>)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_body: DeferConfig::DEFAULT_MAX_BODY,
            body_timeout: DeferConfig::DEFAULT_BODY_TIMEOUT,
            status_path: None,
            retry_after: DeferConfig::DEFAULT_RETRY_AFTER,
            ttl: None,
            deferrable: Arc::new(deferrable_by_default),
            key_scope: Arc::new(scope_by_authorization),
            failed_response: Arc::new(server_error),
            failed_error: Arc::new(|_| true),
            obs: Arc::default(),
            registered: None,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("max_body", &self.max_body)
            .field("body_timeout", &self.body_timeout)
            .field("status_path", &self.status_path)
            .field("retry_after", &self.retry_after)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Defers failed requests into a [`Queue`]. See the [module docs](self).
pub struct Defer<S, Q> {
    inner: S,
    queue: Arc<Q>,
    settings: Arc<Settings>,
}

impl<S, Q: Queue> Defer<S, Q> {
    /// Wraps `inner`, deferring into `queue` with the default settings.
    pub fn new(inner: S, queue: Q) -> Self {
        Defer::from_parts(inner, Arc::new(queue), Arc::new(Settings::default()))
    }

    /// A [`DeferLayer`] over `queue`.
    pub fn layer(queue: Q) -> DeferLayer<Q> {
        DeferLayer::new(queue)
    }
}

impl<S, Q> Defer<S, Q> {
    pub(crate) fn from_parts(inner: S, queue: Arc<Q>, settings: Arc<Settings>) -> Self {
        Defer {
            inner,
            queue,
            settings,
        }
    }

    /// The queue.
    pub fn queue(&self) -> &Q {
        &self.queue
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, Q> Clone for Defer<S, Q> {
    fn clone(&self) -> Self {
        Defer {
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<S: fmt::Debug, Q: fmt::Debug> fmt::Debug for Defer<S, Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Defer")
            .field("inner", &self.inner)
            .field("queue", &self.queue)
            .field("settings", &self.settings)
            .finish()
    }
}

impl<S, Q, B, RB> Service<http::Request<B>> for Defer<S, Q>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    Q: Queue,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<http_body_util::Either<RB, DeferBody>>;
    type Error = BoxError;
    type Future = future::ResponseFuture<S, B, Q>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let max = self.settings.max_body;
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return future::ResponseFuture::ready(too_large(max, &parts.headers));
        }
        // A request that may not be deferred passes through as it is,
        // whatever its key.
        let deferrable = (self.settings.deferrable)(&parts);
        if deferrable && let Some(why) = bad_idempotency_key(&parts.headers) {
            let res = response::problem(StatusCode::BAD_REQUEST, "bad_idempotency_key", why, None);
            return future::ResponseFuture::ready(for_caller(res, &parts.headers));
        }
        // The ready service goes into the future; the clone stays for the
        // next poll_ready.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        future::ResponseFuture::buffering(
            parts,
            deferrable,
            Limited::new(body, max).collect(),
            svc,
            self.queue.clone(),
            self.settings.clone(),
        )
    }
}

pub(crate) fn too_large(max: usize, headers: &HeaderMap) -> http::Response<DeferBody> {
    let res = response::problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        &BodyTooLarge::new(max).to_string(),
        None,
    );
    for_caller(res, headers)
}

/// A request body that did not all arrive within the body timeout: never
/// sent, never queued.
pub(crate) fn body_too_slow(timeout: Duration, headers: &HeaderMap) -> http::Response<DeferBody> {
    tracing::debug!(target: "tower_firebreak", layer = "defer", timeout_ms = crate::duration_ms(timeout), "request body too slow");
    let res = response::problem(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        &format!("the request body did not arrive within {timeout:?}"),
        None,
    );
    for_caller(res, headers)
}

/// A request body that could not be read (the client went away, or sent
/// fewer bytes than it declared): a client error, never sent, never queued.
pub(crate) fn unreadable_body(
    e: &(dyn std::error::Error + 'static),
    headers: &HeaderMap,
) -> http::Response<DeferBody> {
    tracing::debug!(target: "tower_firebreak", layer = "defer", error = %e, "request body unreadable");
    let res = response::problem(
        StatusCode::BAD_REQUEST,
        "body_unreadable",
        "the request body could not be read",
        None,
    );
    for_caller(res, headers)
}

/// `res` in gRPC's terms for a gRPC call.
fn for_caller(res: http::Response<DeferBody>, headers: &HeaderMap) -> http::Response<DeferBody> {
    if response::is_grpc(headers) {
        response::into_grpc(res)
    } else {
        res
    }
}

/// The longest `Idempotency-Key` accepted, in bytes (Stripe's bound).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Why the request's `Idempotency-Key` cannot be used, if it cannot: sent
/// twice, empty, longer than [`MAX_IDEMPOTENCY_KEY`], or with bytes other
/// than printable ASCII. Such a key would otherwise be dropped or taken
/// as some other key, and a retry would store the request again.
fn bad_idempotency_key(headers: &HeaderMap) -> Option<&'static str> {
    let mut keys = headers.get_all("idempotency-key").iter();
    let key = keys.next()?;
    if keys.next().is_some() {
        return Some("the request carries more than one Idempotency-Key header");
    }
    let bytes = key.as_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        Some("the Idempotency-Key header is empty")
    } else if bytes.len() > MAX_IDEMPOTENCY_KEY {
        Some("the Idempotency-Key header is longer than 255 bytes")
    } else if !bytes.iter().all(|b| (0x20..0x7f).contains(b)) {
        Some("the Idempotency-Key header has bytes other than printable ASCII")
    } else {
        None
    }
}

/// Why a request is being deferred, for the `Retry-After` hint and the log.
pub(crate) struct Cause {
    pub(crate) retry_after: Option<Duration>,
    pub(crate) what: String,
}

impl Cause {
    pub(crate) fn error(err: &(dyn Error + 'static)) -> Cause {
        let rejection = Rejection::of(err);
        Cause {
            retry_after: rejection.and_then(|r| r.retry_after()),
            what: match rejection {
                Some(r) => r.kind().as_str().to_owned(),
                None => "error".to_owned(),
            },
        }
    }

    /// A failed response; its own `Retry-After` (in seconds) is the hint.
    pub(crate) fn response(status: StatusCode, headers: &HeaderMap) -> Cause {
        Cause {
            retry_after: headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
            what: format!("status {}", status.as_u16()),
        }
    }
}

/// Stores `req` and answers for it.
pub(crate) async fn defer_request<Q: Queue>(
    queue: Arc<Q>,
    settings: Arc<Settings>,
    req: http::Request<Bytes>,
    cause: Cause,
) -> http::Response<DeferBody> {
    let grpc = response::is_grpc(req.headers());
    let res = answer(queue, settings, req, cause).await;
    if grpc { response::into_grpc(res) } else { res }
}

async fn answer<Q: Queue>(
    queue: Arc<Q>,
    settings: Arc<Settings>,
    req: http::Request<Bytes>,
    cause: Cause,
) -> http::Response<DeferBody> {
    let trace: Vec<(String, String)> = ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| {
            let v = req.headers().get(name)?.to_str().ok()?;
            Some((name.to_owned(), v.to_owned()))
        })
        .collect();
    let traceparent = trace
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone());
    let (parts, body) = req.into_parts();
    let scope = (settings.key_scope)(&parts);
    let mut job =
        Job::from_request(http::Request::from_parts(parts, body)).with_trace_context(trace);
    // The key the queue dedups by is the scope's; the stored request keeps
    // the caller's own header, which the replay sends to the dependency.
    let key = job.idempotency_key().map(str::to_owned);
    if let (Some(scope), Some(key)) = (scope, &key) {
        job = job.with_idempotency_key(format!("{}/{key}", digest(scope.as_bytes())));
    }
    if let Some(ttl) = settings.ttl {
        job = job.with_ttl(ttl);
    }
    let retry_after = cause.retry_after.unwrap_or(settings.retry_after);
    let started = tokio::time::Instant::now();
    match queue.submit(job).await {
        Ok(Enqueued::Created(id)) => {
            settings.obs.deferred(started.elapsed());
            tracing::debug!(target: "tower_firebreak", layer = "defer", job_id = %id, cause = %cause.what, traceparent = traceparent.as_deref(), "request deferred");
            response::accepted(&settings, &id, retry_after)
        }
        // The key already holds a job, which will be delivered: a status
        // that cannot be read is "unknown", never a 503 that would tell the
        // caller the request was not taken (a retry with a new key would
        // run it twice).
        Ok(Enqueued::Existing(id)) => match queue.status(&id).await {
            Ok(status) => response::existing(&settings, &id, status.as_ref()),
            Err(e) => {
                tracing::warn!(target: "tower_firebreak", layer = "defer", job_id = %id, error = %e, "the existing job's status could not be read");
                response::existing(&settings, &id, None)
            }
        },
        Err(QueueError::Conflict { .. }) => response::problem(
            StatusCode::CONFLICT,
            "idempotency_key_conflict",
            &format!(
                "idempotency key {:?} was already used for a different request",
                key.unwrap_or_default()
            ),
            None,
        ),
        // "Now" (a half-open breaker's) would send callers straight back to
        // a failing queue.
        Err(e) if retry_after.is_zero() => not_deferred(e, settings.retry_after),
        Err(e) => not_deferred(e, retry_after),
    }
}

fn not_deferred(e: QueueError, retry_after: Duration) -> http::Response<DeferBody> {
    let (kind, detail) = match &e {
        QueueError::Full { .. } => (
            "queue_full",
            "the request failed and the queue for later delivery is full; it was not accepted, try again later",
        ),
        _ => (
            "queue_unavailable",
            "the request failed and the queue for later delivery is unavailable; it was not accepted, try again later",
        ),
    };
    tracing::warn!(target: "tower_firebreak", layer = "defer", error = %e, kind, "request not deferred");
    response::problem(
        StatusCode::SERVICE_UNAVAILABLE,
        kind,
        detail,
        Some(retry_after),
    )
}
