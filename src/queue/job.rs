use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// The id of a deferred job.
///
/// A time-ordered 128-bit id (UUID version 7), written in the usual hyphenated
/// form, e.g. `01938f6e-5a2b-7c3d-8e4f-0123456789ab`. It is what `defer` sends
/// in the `firebreak-job-id` header, and it parses back with [`FromStr`].
///
/// ```
/// use tower_firebreak::queue::JobId;
///
/// let id = JobId::new();
/// let back: JobId = id.to_string().parse().unwrap();
/// assert_eq!(id, back);
/// assert!("not-an-id".parse::<JobId>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(Uuid);

impl JobId {
    /// A fresh id. Ids made later sort after ids made earlier (to the
    /// millisecond).
    pub fn new() -> JobId {
        JobId(Uuid::now_v7())
    }

    /// The id as a 128-bit integer, for storage keys.
    pub const fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }

    /// The id with the given 128-bit value.
    pub const fn from_u128(v: u128) -> JobId {
        JobId(Uuid::from_u128(v))
    }
}

impl Default for JobId {
    fn default() -> Self {
        JobId::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for JobId {
    type Err = ParseJobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::try_parse(s.trim())
            .map(JobId)
            .map_err(|_| ParseJobIdError(()))
    }
}

/// A string that is not a [`JobId`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseJobIdError(());

impl fmt::Display for ParseJobIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid job id")
    }
}

impl std::error::Error for ParseJobIdError {}

/// A SHA-256 over a request's method, URI and body, each preceded by its
/// length in bytes as a little-endian `u64`.
///
/// Two requests with one idempotency key are the same request when their
/// fingerprints match; otherwise the second is a conflict (409). It is
/// stored with the key, so it never changes between versions.
pub type Fingerprint = [u8; 32];

/// A deferred request: the versioned envelope that a [`Queue`](super::Queue)
/// stores.
///
/// It holds the request (method, URI, headers, body), its idempotency key,
/// the time the queue accepted it, how many times it has been leased, its
/// time to live, and the trace context to continue when it is replayed.
/// Times are kept to the millisecond, the precision of the stored envelope.
///
/// ```
/// use tower_firebreak::queue::Job;
/// use std::time::Duration;
///
/// let job = Job::new(http::Method::POST, "/orders".parse().unwrap())
///     .with_body("{\"sku\":42}")
///     .with_idempotency_key("order-7")
///     .with_ttl(Duration::from_secs(3600));
/// assert_eq!(job.idempotency_key(), Some("order-7"));
/// assert_eq!(job.attempts(), 0);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) enqueued_at_ms: u64,
    pub(crate) attempts: u32,
    pub(crate) ttl_ms: Option<u64>,
    pub(crate) trace_context: Vec<(String, String)>,
}

impl Job {
    /// A job for a request with no headers and an empty body.
    pub fn new(method: Method, uri: Uri) -> Job {
        Job {
            method,
            uri,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            idempotency_key: None,
            enqueued_at_ms: system_ms(SystemTime::now()),
            attempts: 0,
            ttl_ms: None,
            trace_context: Vec::new(),
        }
    }

    /// A job for `req`. Its idempotency key is taken from the
    /// `Idempotency-Key` header when that is valid UTF-8.
    pub fn from_request(req: http::Request<Bytes>) -> Job {
        let (parts, body) = req.into_parts();
        let key = parts
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Job {
            headers: parts.headers,
            body,
            idempotency_key: key,
            ..Job::new(parts.method, parts.uri)
        }
    }

    /// The request to replay: method, URI, headers and body.
    pub fn to_request(&self) -> http::Request<Bytes> {
        let mut req = http::Request::new(self.body.clone());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// Sets the headers.
    pub fn with_headers(mut self, headers: HeaderMap) -> Job {
        self.headers = headers;
        self
    }

    /// Sets the body.
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Job {
        self.body = body.into();
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Job {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets how long after it is enqueued the job may still be delivered.
    /// Past that, it is dead-lettered with the reason `ttl expired`.
    pub fn with_ttl(mut self, ttl: Duration) -> Job {
        self.ttl_ms = Some(duration_ms(ttl));
        self
    }

    /// Sets the trace context (for example W3C `traceparent` and
    /// `tracestate`) to continue when the job is replayed.
    pub fn with_trace_context(mut self, fields: Vec<(String, String)>) -> Job {
        self.trace_context = fields;
        self
    }

    /// The request method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The request body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The idempotency key, if any.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// When the queue accepted the job (before that: when it was made).
    pub fn enqueued_at(&self) -> SystemTime {
        ms_system(self.enqueued_at_ms)
    }

    /// How many times the job has been leased, this lease included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The time to live, if any.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl_ms.map(Duration::from_millis)
    }

    /// When the job expires: [`enqueued_at`](Self::enqueued_at) plus the TTL.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline_ms().map(ms_system)
    }

    pub(crate) fn deadline_ms(&self) -> Option<u64> {
        self.ttl_ms.map(|t| self.enqueued_at_ms.saturating_add(t))
    }

    /// The trace context to continue on replay.
    pub fn trace_context(&self) -> &[(String, String)] {
        &self.trace_context
    }

    /// The request's [`Fingerprint`]: SHA-256 over method, URI and body.
    /// Headers are left out: tracing and auth headers differ between two
    /// sends of the same request.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        for part in [
            self.method.as_str().as_bytes(),
            self.uri.to_string().as_bytes(),
            &self.body,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

/// A held lease on a job: which job, and the token that proves this lease is
/// still the current one.
///
/// The token is opaque; each backend puts there what it needs to recognise
/// its own lease.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    id: JobId,
    token: String,
}

impl Lease {
    /// A lease on job `id` with a backend-specific `token`.
    pub fn new(id: JobId, token: impl Into<String>) -> Lease {
        Lease {
            id,
            token: token.into(),
        }
    }

    /// The leased job.
    pub fn id(&self) -> &JobId {
        &self.id
    }

    /// The lease token.
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// A job handed out by [`Queue::lease`](super::Queue::lease), with its lease.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Leased {
    /// Pass this to `ack`, `nack` or `dead_letter`.
    pub lease: Lease,
    /// The job; [`Job::attempts`] counts this lease.
    pub job: Job,
}

impl Leased {
    /// A leased job.
    pub fn new(lease: Lease, job: Job) -> Leased {
        Leased { lease, job }
    }
}

/// The response the replayed request got, stored with the job when it is
/// acked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveredResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The response body.
    pub body: Bytes,
}

/// Where a job is.
///
/// ```
/// use tower_firebreak::queue::JobStatus;
///
/// fn describe(s: &JobStatus) -> String {
///     match s {
///         JobStatus::Queued => "waiting".into(),
///         JobStatus::InFlight => "being delivered".into(),
///         JobStatus::Delivered { status, .. } => format!("delivered: {status}"),
///         JobStatus::DeadLettered { reason, .. } => format!("gave up: {reason}"),
///     }
/// }
/// # let _ = describe;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Waiting to be leased (perhaps after a nack's delay).
    Queued,
    /// Leased by a replayer that has not yet acked it.
    InFlight,
    /// Delivered; the stored response is kept for the queue's retention.
    #[non_exhaustive]
    Delivered {
        /// The HTTP status of the stored response.
        status: u16,
        /// The stored response headers.
        headers: HeaderMap,
        /// The stored response body.
        body: Bytes,
        /// How many leases it took.
        attempts: u32,
        /// When it was acked.
        delivered_at: SystemTime,
    },
    /// Moved to the dead-letter store.
    #[non_exhaustive]
    DeadLettered {
        /// Why: `max attempts (N) reached`, `ttl expired`, or the reason
        /// given to `dead_letter`.
        reason: String,
        /// How many leases it had.
        attempts: u32,
        /// When it was dead-lettered.
        at: SystemTime,
    },
}

/// What [`Queue::submit`](super::Queue::submit) did with a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// The job was stored under this new id.
    Created(JobId),
    /// A job with the same idempotency key and the same request was already
    /// there; nothing new was stored. `defer` answers 200 with its status.
    Existing(JobId),
}

impl Enqueued {
    /// The job's id, new or existing.
    pub fn id(&self) -> JobId {
        match self {
            Enqueued::Created(id) | Enqueued::Existing(id) => *id,
        }
    }
}

/// A job in the dead-letter store.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The job's id.
    pub id: JobId,
    /// The job as it was last leased.
    pub job: Job,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When.
    pub at: SystemTime,
}

impl DeadLetter {
    /// A dead letter.
    pub fn new(id: JobId, job: Job, reason: String, at: SystemTime) -> DeadLetter {
        DeadLetter {
            id,
            job,
            reason,
            at,
        }
    }
}

pub(crate) fn system_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, duration_ms)
}

pub(crate) fn ms_system(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) use crate::duration_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_stable_and_ignores_headers() {
        // Stored on disk in the idempotency index: it must never change
        // between versions, or a retried request would read as a conflict.
        let job = Job::new(Method::POST, "/orders?id=7".parse().unwrap()).with_body("{\"sku\":42}");
        assert_eq!(super::super::codec::hex(&job.fingerprint()), FINGERPRINT_V1);
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", "00-abc-def-01".parse().unwrap());
        assert_eq!(
            job.clone().with_headers(headers).fingerprint(),
            job.fingerprint()
        );
        assert_ne!(
            job.clone().with_body("other").fingerprint(),
            job.fingerprint()
        );
        // Length-prefixed parts: moving bytes between URI and body differs.
        let a = Job::new(Method::POST, "/ab".parse().unwrap()).with_body("c");
        let b = Job::new(Method::POST, "/a".parse().unwrap()).with_body("bc");
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    // SHA-256 over (u64 LE length, bytes) of "POST", "/orders?id=7", the body;
    // checked independently with Python's hashlib.
    const FINGERPRINT_V1: &str = "800bb4dfda3454824e72371bbb5f9bb3e1110bcc671fa50e66a12bbb793d406a";

    #[test]
    fn request_round_trip_and_key() {
        let req = http::Request::builder()
            .method(Method::PUT)
            .uri("http://svc/items/1")
            .header("idempotency-key", "abc")
            .header("x-a", "1")
            .body(Bytes::from_static(b"payload"))
            .unwrap();
        let job = Job::from_request(req);
        assert_eq!(job.idempotency_key(), Some("abc"));
        let back = job.to_request();
        assert_eq!(back.method(), Method::PUT);
        assert_eq!(back.uri(), "http://svc/items/1");
        assert_eq!(back.headers()["x-a"], "1");
        assert_eq!(back.headers()["idempotency-key"], "abc");
        assert_eq!(back.body().as_ref(), b"payload");
    }

    #[test]
    fn job_ids_parse_and_order() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b, "ids are time-ordered");
        assert_eq!(a.to_string().len(), 36);
        assert_eq!(a.to_string().to_uppercase().parse::<JobId>().unwrap(), a);
        assert_eq!(JobId::from_u128(a.as_u128()), a);
        assert!("".parse::<JobId>().is_err());
    }
}
