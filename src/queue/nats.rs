//! [`NatsQueue`]: a [`Queue`] on NATS JetStream, shared by a fleet.
//!
//! # Layout
//!
//! For a queue named `orders`:
//!
//! | JetStream object | holds |
//! | --- | --- |
//! | stream `FB_orders`, subjects `fb.orders.job.<id>` | one message per unfinished job; work-queue retention, file storage, `max_msgs` = capacity with `discard: new` (the server refuses the job past capacity) |
//! | durable pull consumer `fb` | explicit acks; `ack_wait` is the lease backstop; no `max_deliver`: the lease that sees a delivery past `max_attempts` dead-letters the job, and a delivery whose answer is lost comes back to be answered again |
//! | stream `FB_orders_DEAD`, subjects `fb.orders.dead.<id>` | the dead-letter subject: one message per dead job, with its reason |
//! | KV bucket `fb_orders_live` | each unfinished or dead job's record (state, lease token, the message's ack subject, attempts) and the idempotency keys of unfinished jobs |
//! | KV bucket `fb_orders_done`, `max_age` = retention | delivered jobs' responses and their idempotency keys: JetStream expires them after `retention` |
//!
//! A lease is a delivery of the job's message by the pull consumer. The
//! handle that fetches it answers at once with a delayed negative ack
//! (`-NAK {"delay": visibility}`): the server then redelivers it exactly
//! when the lease's visibility timeout passes, unless it is acked or
//! terminated first; the consumer's `ack_wait` (default 30 s) only covers
//! the moment between delivery and that answer. A job's attempts are the
//! message's delivery count. The lease token lives in the job's KV record,
//! and every settle (ack, nack, dead-letter) first replaces that record
//! with a compare-and-set on its revision, so a late holder whose lease was
//! taken over gets [`QueueError::LeaseLost`]. The ack, nack or term then
//! goes to the message's ack subject, which any connection can answer: a
//! job leased by one replica can be settled through another handle.
//!
//! # Durability
//!
//! `submit` returns after the server's publish acknowledgement: with file
//! storage the message is written to the stream's file. NATS syncs those
//! files to disk every `sync_interval` (two minutes by default); for an
//! fsync before the acknowledgement, run the server with
//! `jetstream { sync_interval: always }` (NATS 2.10 and later), or use a
//! three-replica stream, which acknowledges only once a quorum has the
//! message.
//!
//! # Connection loss
//!
//! The client reconnects with backoff (at most
//! [`max_backoff`](NatsQueueBuilder::max_backoff) between tries). While
//! it is disconnected every operation fails at once with
//! [`QueueError::Unavailable`] instead of buffering, and every operation
//! is bounded by [`op_timeout`](NatsQueueBuilder::op_timeout) (default
//! 500 ms). A `submit` that fails (or passes `op_timeout`) after its
//! publish may have been sent is undone: the job's record is set to `void`
//! on the same connection, so a message the server stored anyway (its
//! answer lost, or the server stalled) is dropped by the lease that meets
//! it, never delivered, and the idempotency key is free again. Only when
//! that undo cannot land (the connection is gone) is a failed submit
//! ambiguous: the server may have stored the job, and a retry with the
//! same idempotency key finds it. Until a lease drops it, a voided job's
//! message counts in [`depth`](Queue::depth). A voided job whose message
//! the server never stored has no message for a lease to meet, so its
//! `void` record stays in `fb_<name>_live` for good (a few hundred bytes
//! each; the live bucket has no `max_age`). Only failed submits make them;
//! an outage of the server with many of those leaves as many records.
//!
//! ```no_run
//! use tower_firebreak::queue::{nats::NatsQueue, Job, Queue};
//!
//! # async fn run() -> Result<(), tower_firebreak::queue::QueueError> {
//! let queue = NatsQueue::builder()
//!     .name("orders")
//!     .connect("nats://127.0.0.1:4222")
//!     .await?;
//! let id = queue.enqueue(Job::new(http::Method::POST, "/orders".parse().unwrap())).await?;
//! # let _ = id;
//! # Ok(())
//! # }
//! ```

use super::clock::Clock;
use super::codec::{Format, b64_decode, b64_encode, hex};
use super::job::{duration_ms, ms_system};
use super::{
    DeadLetter, DeliveredResponse, Enqueued, Job, JobId, JobStatus, Lease, Leased, Policy, Queue,
    QueueError,
};
use crate::ConfigError;
use async_nats::connection::State;
use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A job's record in the live bucket.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Rec {
    /// `queued`, `inflight`, `settling`, `dead`, or `void` (a failed
    /// submit's job: a message the server stored anyway is dropped).
    s: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    token: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reply: String,
    #[serde(default)]
    attempts: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reason: String,
    #[serde(default)]
    at: u64,
    #[serde(default)]
    dseq: u64,
}

/// A delivered job's record in the done bucket.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Done {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    attempts: u32,
    at: u64,
}

/// A [`Queue`] on NATS JetStream: see the [module docs](self) for the
/// layout, durability and connection-loss behaviour.
///
/// Clones share one connection. Handles made by separate
/// [`connect`](NatsQueueBuilder::connect) calls with one name share one
/// queue and one durable consumer.
#[derive(Clone)]
pub struct NatsQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    jobs: stream::Stream,
    dead: stream::Stream,
    consumer: consumer::PullConsumer,
    live: kv::Store,
    done: kv::Store,
    subject: String,
    dead_subject: String,
    location: String,
    policy: Policy,
    format: Format,
    op_timeout: Duration,
    clock: Clock,
    /// With `dead_letter_retention`: no dead letter is due to be purged
    /// before this time (client wall-clock ms), so leases skip the sweep
    /// until then.
    next_dead_purge: AtomicU64,
}

/// The longest `-NAK` delay the server parses (nanoseconds in an `i64`,
/// about 292 years); a larger one would be refused and redelivered at once.
const MAX_NAK_DELAY: Duration = Duration::from_nanos(i64::MAX as u64);

impl std::fmt::Debug for NatsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsQueue")
            .field("location", &self.inner.location)
            .field("policy", &self.inner.policy)
            .field("op_timeout", &self.inner.op_timeout)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`NatsQueue`].
#[derive(Clone, Debug)]
pub struct NatsQueueBuilder {
    name: String,
    policy: Policy,
    format: Format,
    connect_timeout: Duration,
    op_timeout: Duration,
    max_backoff: Duration,
    ack_wait: Duration,
}

impl Default for NatsQueueBuilder {
    fn default() -> Self {
        NatsQueueBuilder {
            name: "default".to_owned(),
            policy: Policy::default(),
            format: Format::default(),
            connect_timeout: Duration::from_millis(250),
            op_timeout: Duration::from_millis(500),
            max_backoff: Duration::from_secs(2),
            ack_wait: Duration::from_secs(30),
        }
    }
}

impl NatsQueueBuilder {
    /// The queue's name (letters, digits, `-` and `_`): handles with one
    /// name share one queue. Default: `default`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The most unfinished jobs the queue holds. Default: 1,000,000.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.policy.capacity = capacity;
        self
    }

    /// How many leases a job gets before it is dead-lettered. Default: 10.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts;
        self
    }

    /// How long a delivered job's status and response are kept. Default:
    /// 24 h. It is the done bucket's `max_age`, fixed when the bucket is
    /// first made.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.policy.retention = retention;
        self
    }

    /// How long a dead letter is kept before it is purged, with its
    /// record and its idempotency key. Default: until it is redriven.
    ///
    /// As with the disk queue, the purge is done by the sweep that runs
    /// with each `lease`, and time is the client's wall clock (the dead
    /// letter's `fb-at` header): a lease purges the dead letters that have
    /// been dead for longer than *its handle's* setting (a handle without
    /// the setting purges none), so the handles of a fleet should agree on
    /// it. Unlike `retention`, it is not a stream setting: the dead-letter
    /// stream's `max_age` would drop the message but leave the job's
    /// record and its idempotency key (the job would still read
    /// `DeadLettered`, and could not be redriven), it would time from the
    /// server's clock, and it would be fixed when the stream is first
    /// made. So it can differ between handles and can be changed at any
    /// time. The sweep reads the dead-letter stream from its oldest
    /// message only when one can be due, so it costs a lease nothing the
    /// rest of the time.
    pub fn dead_letter_retention(mut self, retention: Duration) -> Self {
        self.policy.dead_letter_retention = Some(retention);
        self
    }

    /// The envelope format of stored jobs. Default: JSON.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// How long one attempt to (re)connect may take. Default: 250 ms.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The bound on every operation (all its requests to the server
    /// together): past it the operation fails with
    /// [`QueueError::Unavailable`]. Default: 500 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// The longest pause between two reconnect attempts. Default: 2 s.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// The consumer's `ack_wait`: how long a delivered message may go
    /// unanswered before the server redelivers it. Leases set their own
    /// visibility; this only bounds a handle that dies between the delivery
    /// and its answer. Default: 30 s.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Checks the settings, connects to NATS at `url` and creates the
    /// streams, the consumer and the buckets if they are not there.
    ///
    /// # Errors
    ///
    /// [`QueueError::Config`] for bad settings, [`QueueError::Unavailable`]
    /// when the server cannot be reached or has no JetStream.
    pub async fn connect(self, url: &str) -> Result<NatsQueue, QueueError> {
        self.policy.validate()?;
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(
                ConfigError::new("name", &self.name, "must be letters, digits, - or _").into(),
            );
        }
        if self.op_timeout.is_zero() {
            return Err(ConfigError::new(
                "op_timeout",
                format!("{:?}", self.op_timeout),
                "must be above zero",
            )
            .into());
        }
        let max_backoff = self.max_backoff;
        let options = async_nats::ConnectOptions::new()
            .connection_timeout(self.connect_timeout)
            .request_timeout(Some(self.op_timeout))
            .max_reconnects(None)
            .reconnect_delay_callback(move |n| {
                let exp = 10u64.saturating_mul(1u64 << n.min(16));
                Duration::from_millis(exp).min(max_backoff)
            });
        let client = tokio::time::timeout(
            self.connect_timeout.max(self.op_timeout),
            options.connect(url),
        )
        .await
        .map_err(|_| QueueError::unavailable(format!("connecting to {url} timed out")))?
        .map_err(QueueError::unavailable)?;
        let mut js = jetstream::new(client.clone());
        // Every operation is bounded by `op_timeout` (see `run`). The
        // client's own JetStream timeout (5 s) must not end one first: a
        // submit whose publish answer it gave up on would be undone while
        // its `run` could still see it through.
        js.set_timeout(self.op_timeout.max(Duration::from_secs(5)) + Duration::from_secs(1));
        let name = &self.name;
        let subject = format!("fb.{name}.job");
        let dead_subject = format!("fb.{name}.dead");
        let setup = async {
            let jobs = js
                .get_or_create_stream(stream::Config {
                    name: format!("FB_{name}"),
                    subjects: vec![format!("{subject}.*")],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    max_messages: i64::try_from(self.policy.capacity).unwrap_or(i64::MAX),
                    discard: stream::DiscardPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| QueueError::unavailable(format!("creating the jobs stream: {e}")))?;
            let dead = js
                .get_or_create_stream(stream::Config {
                    name: format!("FB_{name}_DEAD"),
                    subjects: vec![format!("{dead_subject}.*")],
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    QueueError::unavailable(format!("creating the dead-letter stream: {e}"))
                })?;
            let consumer = jobs
                .get_or_create_consumer(
                    "fb",
                    consumer::pull::Config {
                        durable_name: Some("fb".to_owned()),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: self.ack_wait,
                        // Unlimited: with `max_attempts + 1`, a last
                        // delivery whose dead-lettering failed (a timeout,
                        // a crash) was never delivered again, and the job
                        // stayed in flight for good.
                        max_deliver: -1,
                        max_ack_pending: -1,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| QueueError::unavailable(format!("creating the consumer: {e}")))?;
            // The bucket's stream is made here rather than with
            // `create_key_value`, whose account query does not parse a
            // NATS 2.9 answer; the settings are the ones it would use.
            let bucket = |suffix: &'static str, max_age: Duration| {
                let js = js.clone();
                let bucket = format!("fb_{name}_{suffix}");
                async move {
                    js.get_or_create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: 1,
                        max_age,
                        storage: stream::StorageType::File,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: stream::DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        QueueError::unavailable(format!("creating the {suffix} bucket: {e}"))
                    })?;
                    js.get_key_value(bucket).await.map_err(|e| {
                        QueueError::unavailable(format!("opening the {suffix} bucket: {e}"))
                    })
                }
            };
            let live = bucket("live", Duration::ZERO).await?;
            let done = bucket(
                "done",
                self.policy.retention.max(Duration::from_millis(100)),
            )
            .await?;
            Ok::<_, QueueError>((jobs, dead, consumer, live, done))
        };
        let (jobs, dead, consumer, live, done) = tokio::time::timeout(self.op_timeout * 20, setup)
            .await
            .map_err(|_| QueueError::unavailable("setting up the JetStream objects timed out"))??;
        Ok(NatsQueue {
            inner: Arc::new(Inner {
                client,
                js,
                jobs,
                dead,
                consumer,
                live,
                done,
                location: format!("{url}#FB_{name}"),
                subject,
                dead_subject,
                policy: self.policy,
                format: self.format,
                op_timeout: self.op_timeout,
                clock: Clock::new(),
                next_dead_purge: AtomicU64::new(0),
            }),
        })
    }
}

/// Undoes a submit that did not finish: armed once the submit may write
/// the job's record. A submit that returns an error undoes itself; one
/// dropped (its [`op_timeout`](NatsQueueBuilder::op_timeout) passed while
/// the server was slow or stalled) leaves the undo to a task spawned here,
/// which a stalled server then reads after the job's publish, so the job is
/// voided even if it is stored when the server resumes.
struct Undo {
    /// `None` once the submit has finished.
    queue: Option<NatsQueue>,
    id: JobId,
    rev: Option<u64>,
    claimed: Option<String>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let (id, rev, claimed) = (self.id, self.rev, self.claimed.take());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = queue.run(queue.undo(id, rev, claimed)).await;
            });
        }
    }
}

/// How long a claim on an idempotency key whose job is not (yet) in the
/// stream is taken for a submit under way rather than a failed one.
const CLAIM_GRACE_MS: u64 = 10_000;

const H_ENQ: &str = "fb-enqueued-at";
const H_DEADLINE: &str = "fb-deadline";
const H_REASON: &str = "fb-reason";
const H_ATTEMPTS: &str = "fb-attempts";
const H_AT: &str = "fb-at";

fn idem_key(key: &str) -> String {
    format!("idem.{}", hex(&Sha256::digest(key.as_bytes())))
}

fn job_key(id: &JobId) -> String {
    format!("job.{id}")
}

fn header_u64(h: Option<&async_nats::HeaderMap>, name: &str) -> Option<u64> {
    h?.get(name)?.as_str().parse().ok()
}

impl NatsQueue {
    /// Settings for a new queue handle.
    pub fn builder() -> NatsQueueBuilder {
        NatsQueueBuilder::default()
    }

    fn corrupt(&self, what: impl Into<String>) -> QueueError {
        QueueError::corrupt(PathBuf::from(&self.inner.location), what.into())
    }

    /// Fails at once while the client is disconnected, so that nothing is
    /// buffered for a server that may never see it; bounds `f` by the
    /// operation timeout.
    async fn run<T, Fut>(&self, f: Fut) -> Result<T, QueueError>
    where
        Fut: Future<Output = Result<T, QueueError>>,
    {
        self.run_within(self.inner.op_timeout, f).await
    }

    async fn run_within<T, Fut>(&self, limit: Duration, f: Fut) -> Result<T, QueueError>
    where
        Fut: Future<Output = Result<T, QueueError>>,
    {
        if self.inner.client.connection_state() != State::Connected {
            return Err(QueueError::unavailable("not connected to NATS"));
        }
        tokio::time::timeout(limit, f)
            .await
            .map_err(|_| QueueError::unavailable(format!("NATS did not answer within {limit:?}")))?
    }

    async fn rec(&self, id: &JobId) -> Result<Option<(Rec, u64)>, QueueError> {
        let Some(e) = self
            .inner
            .live
            .entry(job_key(id))
            .await
            .map_err(QueueError::unavailable)?
        else {
            return Ok(None);
        };
        if e.operation != kv::Operation::Put {
            return Ok(None);
        }
        let rec: Rec = serde_json::from_slice(&e.value)
            .map_err(|err| self.corrupt(format!("record of job {id}: {err}")))?;
        Ok(Some((rec, e.revision)))
    }

    /// Writes `rec` if the record is still at `revision` (`None`: absent).
    async fn cas(&self, id: &JobId, rec: &Rec, revision: Option<u64>) -> Result<bool, QueueError> {
        Ok(self.cas_rev(id, rec, revision).await?.is_some())
    }

    /// As `cas`, with the new revision when the write landed.
    async fn cas_rev(
        &self,
        id: &JobId,
        rec: &Rec,
        revision: Option<u64>,
    ) -> Result<Option<u64>, QueueError> {
        let value = Bytes::from(serde_json::to_vec(rec).expect("a record serialises"));
        let live = &self.inner.live;
        let r = match revision {
            Some(rev) => live.update(job_key(id), value, rev).await.map_err(|e| {
                (
                    e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                    e.to_string(),
                )
            }),
            None => live.create(job_key(id), value).await.map_err(|e| {
                (
                    e.kind() == kv::CreateErrorKind::AlreadyExists,
                    e.to_string(),
                )
            }),
        };
        match r {
            Ok(rev) => Ok(Some(rev)),
            Err((true, _)) => Ok(None),
            Err((false, e)) => Err(QueueError::unavailable(e)),
        }
    }

    /// Removes key `key` of the live bucket, only as of `revision` when one
    /// is given (a write since then stays): `true` when something went.
    ///
    /// A purge of the key's subject rather than a KV delete, which would
    /// leave a delete marker behind for good, one or two per delivered job
    /// (the bucket keeps the last message of every subject, and the
    /// server indexes every subject it holds).
    async fn forget(&self, key: &str, revision: Option<u64>) -> Result<bool, QueueError> {
        let live = &self.inner.live;
        let purge = live.stream.purge().filter(format!("{}{key}", live.prefix));
        let purged = match revision {
            // Everything on the subject before `revision + 1`: the record
            // at `revision`, if it is still the last.
            Some(rev) => purge.sequence(rev.saturating_add(1)).await,
            None => purge.await,
        }
        .map_err(QueueError::unavailable)?;
        Ok(purged.purged > 0)
    }

    async fn done(&self, id: &JobId) -> Result<Option<Done>, QueueError> {
        let Some(e) = self
            .inner
            .done
            .entry(job_key(id))
            .await
            .map_err(QueueError::unavailable)?
        else {
            return Ok(None);
        };
        if e.operation != kv::Operation::Put {
            return Ok(None);
        }
        serde_json::from_slice(&e.value)
            .map(Some)
            .map_err(|err| self.corrupt(format!("response of job {id}: {err}")))
    }

    /// The job's message in the jobs stream, if it is there.
    async fn message(
        &self,
        id: &JobId,
    ) -> Result<Option<jetstream::message::StreamMessage>, QueueError> {
        match self
            .inner
            .jobs
            .get_last_raw_message_by_subject(&format!("{}.{id}", self.inner.subject))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(QueueError::unavailable(e)),
        }
    }

    /// Whether job `id` still holds its idempotency key: it is unfinished
    /// (its message is in the stream), dead, or delivered within retention.
    ///
    /// The order of the reads matters: an ack writes the done record before
    /// it deletes the live one, so reading the live side first and the done
    /// side last sees a job that is being acked meanwhile.
    async fn holds_key(&self, id: &JobId) -> Result<bool, QueueError> {
        match self.rec(id).await? {
            Some((rec, _)) if rec.s == "dead" => return Ok(true),
            Some((rec, _)) if rec.s == "void" => return Ok(false),
            Some(_) if self.message(id).await?.is_some() => return Ok(true),
            _ => {}
        }
        Ok(self.done(id).await?.is_some())
    }

    /// Makes sure job `id`, about to be named to a caller as the holder of
    /// its key, can no longer be voided by the undo of a submit still under
    /// way (its publish answered late): that undo voids the record only at
    /// the revision the submit wrote, so rewriting a `queued` record moves
    /// the revision on. `false` when the job was voided first.
    async fn pin(&self, id: &JobId) -> Result<bool, QueueError> {
        match self.rec(id).await? {
            Some((rec, rev)) if rec.s == "queued" => {
                if self.cas(id, &rec, Some(rev)).await? {
                    return Ok(true);
                }
                // Moved on meanwhile: leased, or voided.
                Ok(!matches!(self.rec(id).await?, Some((rec, _)) if rec.s == "void"))
            }
            Some((rec, _)) => Ok(rec.s != "void"),
            None => Ok(true),
        }
    }

    /// The job that holds key `ik` in the done bucket, if one does.
    async fn done_claim(&self, ik: &str) -> Result<Option<(JobId, String)>, QueueError> {
        if let Some(e) = self
            .inner
            .done
            .entry(ik.to_owned())
            .await
            .map_err(QueueError::unavailable)?
            && e.operation == kv::Operation::Put
        {
            let (cid, cfp) = self.parse_claim(&e.value)?;
            if self.holds_key(&cid).await? {
                return Ok(Some((cid, cfp)));
            }
        }
        Ok(None)
    }

    /// Sends `body` to a message's ack subject and waits for the server's
    /// confirmation.
    async fn answer(&self, reply: &str, body: &'static str) -> Result<(), QueueError> {
        self.inner
            .client
            .request(reply.to_owned(), Bytes::from_static(body.as_bytes()))
            .await
            .map(|_| ())
            .map_err(QueueError::unavailable)
    }

    /// Publishes the job to the dead-letter subject, marks it dead and
    /// terminates its message.
    async fn bury(
        &self,
        id: &JobId,
        payload: Bytes,
        attempts: u32,
        reason: &str,
        reply: &str,
        revision: Option<u64>,
    ) -> Result<bool, QueueError> {
        let now = self.inner.clock.now_ms();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(H_REASON, reason);
        headers.insert(H_ATTEMPTS, attempts.to_string().as_str());
        headers.insert(H_AT, now.to_string().as_str());
        let ack = self
            .inner
            .js
            .publish_with_headers(
                format!("{}.{id}", self.inner.dead_subject),
                headers,
                payload,
            )
            .await
            .map_err(QueueError::unavailable)?
            .await
            .map_err(QueueError::unavailable)?;
        let rec = Rec {
            s: "dead".to_owned(),
            attempts,
            reason: reason.to_owned(),
            at: now,
            dseq: ack.sequence,
            ..Rec::default()
        };
        if !self.cas(id, &rec, revision).await? {
            // Someone settled it meanwhile; take our copy back out.
            let _ = self.inner.dead.delete_message(ack.sequence).await;
            return Ok(false);
        }
        if !reply.is_empty() {
            self.answer(reply, "+TERM").await?;
        }
        Ok(true)
    }

    /// The current record if `lease` still holds the job.
    async fn held(&self, lease: &Lease) -> Result<(Rec, u64), QueueError> {
        match self.rec(lease.id()).await? {
            Some((rec, rev)) if rec.s == "inflight" && rec.token == lease.token() => Ok((rec, rev)),
            _ => Err(QueueError::LeaseLost { id: *lease.id() }),
        }
    }

    async fn submit_inner(&self, mut job: Job) -> Result<Enqueued, QueueError> {
        let now = self.inner.clock.now_ms();
        job.enqueued_at_ms = now;
        job.attempts = 0;
        let id = JobId::new();
        let fp = hex(&job.fingerprint());
        let claim = format!("{id} {fp}");
        let mut claimed = None;
        if let Some(key) = job.idempotency_key() {
            let ik = idem_key(key);
            for _ in 0..3 {
                // A delivered job keeps its key in the done bucket; an ack
                // moves it there before it deletes it here.
                if let Some((cid, cfp)) = self.done_claim(&ik).await? {
                    return self.existing(key, cid, cfp == fp);
                }
                match self
                    .inner
                    .live
                    .create(&ik, Bytes::from(claim.clone()))
                    .await
                {
                    Ok(rev) => {
                        // An ack may have moved the key between the look
                        // above and the create: look again, and give the
                        // claim back if so.
                        if let Some((cid, cfp)) = self.done_claim(&ik).await? {
                            let _ = self.forget(&ik, Some(rev)).await;
                            return self.existing(key, cid, cfp == fp);
                        }
                        claimed = Some(ik.clone());
                        break;
                    }
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(QueueError::unavailable(e)),
                }
                let Some(e) = self
                    .inner
                    .live
                    .entry(ik.clone())
                    .await
                    .map_err(QueueError::unavailable)?
                else {
                    continue;
                };
                if e.operation != kv::Operation::Put {
                    // Deleted since: moved to the done bucket, or a failed
                    // submit let it go. Look again.
                    continue;
                }
                let (cid, cfp) = self.parse_claim(&e.value)?;
                if self.holds_key(&cid).await? && self.pin(&cid).await? {
                    return self.existing(key, cid, cfp == fp);
                }
                // A claim whose job is not stored: a submit still under way,
                // or one that failed. Taking a young one could store the
                // request twice, so the caller is asked to try again.
                let created_ms =
                    u64::try_from(e.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                if now.saturating_sub(created_ms) < CLAIM_GRACE_MS {
                    return Err(QueueError::unavailable(format!(
                        "idempotency key {key:?} is being claimed by another submit; try again"
                    )));
                }
                if self
                    .inner
                    .live
                    .update(&ik, Bytes::from(claim.clone()), e.revision)
                    .await
                    .is_ok()
                {
                    claimed = Some(ik.clone());
                    break;
                }
            }
            if claimed.is_none() {
                return Err(QueueError::unavailable(format!(
                    "could not claim idempotency key {key:?}"
                )));
            }
        }
        // From here a failed or dropped submit (its `op_timeout` passed)
        // is undone: see `Undo`.
        let mut undo = Undo {
            queue: Some(self.clone()),
            id,
            rev: None,
            claimed,
        };
        match self.store(&id, &job, now, &mut undo.rev).await {
            Ok(()) => {
                undo.queue = None;
                Ok(Enqueued::Created(id))
            }
            Err(e) => {
                undo.queue = None;
                // Best effort: what is not undone is a delay, not a loss
                // (see `Undo`). A refusal for a full stream stored nothing
                // for sure, so the record goes (a void one would stay, with
                // no message to take it away).
                let rev = if matches!(e, QueueError::Full { .. }) {
                    None
                } else {
                    undo.rev
                };
                let _ = self.undo(id, rev, undo.claimed.take()).await;
                Err(e)
            }
        }
    }

    /// Undoes a submit that failed: voids job `id`, so that a message the
    /// server stored anyway (its answer was lost, or came too late) is
    /// dropped by the lease that meets it rather than delivered after the
    /// caller got an error, and gives the idempotency key claim back only
    /// once the job can no longer be delivered. When that cannot be made
    /// sure (the void did not land, or a lease took the job first), the
    /// claim stays, so a retry with the key finds the job if it was stored.
    async fn undo(
        &self,
        id: JobId,
        rev: Option<u64>,
        claimed: Option<String>,
    ) -> Result<(), QueueError> {
        let gone = match rev {
            // The record's write never answered, so the message was never
            // sent (a record that lands late is a leftover: see `status`),
            // or the server refused the message.
            None => {
                let _ = self.forget(&job_key(&id), None).await;
                true
            }
            Some(rev) => {
                let void = Rec {
                    s: "void".to_owned(),
                    ..Rec::default()
                };
                self.cas(&id, &void, Some(rev)).await?
            }
        };
        if gone && let Some(ik) = claimed {
            let _ = self.forget(&ik, None).await;
        }
        Ok(())
    }

    /// Writes the job's record (its revision into `rev`), then publishes
    /// its message.
    async fn store(
        &self,
        id: &JobId,
        job: &Job,
        now: u64,
        rev: &mut Option<u64>,
    ) -> Result<(), QueueError> {
        let queued = Rec {
            s: "queued".to_owned(),
            ..Rec::default()
        };
        *rev = Some(
            self.inner
                .live
                .put(
                    job_key(id),
                    Bytes::from(serde_json::to_vec(&queued).expect("serialises")),
                )
                .await
                .map_err(QueueError::unavailable)?,
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(H_ENQ, now.to_string().as_str());
        if let Some(d) = job.deadline_ms() {
            headers.insert(H_DEADLINE, d.to_string().as_str());
        }
        let payload = Bytes::from(self.inner.format.encode(job));
        let ack = self
            .inner
            .js
            .publish_with_headers(format!("{}.{id}", self.inner.subject), headers, payload)
            .await
            .map_err(QueueError::unavailable)?
            .await;
        match ack {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("maximum messages") => Err(QueueError::Full {
                capacity: self.inner.policy.capacity,
            }),
            Err(e) => Err(QueueError::unavailable(e)),
        }
    }

    fn parse_claim(&self, raw: &[u8]) -> Result<(JobId, String), QueueError> {
        let s = std::str::from_utf8(raw).map_err(|_| self.corrupt("bad idempotency claim"))?;
        let (id, fp) = s
            .split_once(' ')
            .ok_or_else(|| self.corrupt("bad idempotency claim"))?;
        let id = id
            .parse()
            .map_err(|_| self.corrupt("bad idempotency claim"))?;
        Ok((id, fp.to_owned()))
    }

    fn existing(&self, key: &str, id: JobId, same: bool) -> Result<Enqueued, QueueError> {
        if same {
            Ok(Enqueued::Existing(id))
        } else {
            Err(QueueError::Conflict {
                key: key.to_owned(),
                existing: id,
            })
        }
    }

    /// Purges the dead letters that have been dead for longer than
    /// `retention`, oldest first, a bounded number per call: the dead
    /// message, the job's record (if it is still this dead letter's) and
    /// its idempotency key (if it still names this job).
    async fn purge_dead(&self, retention: Duration) -> Result<(), QueueError> {
        const SWEEP: usize = 256;
        let now = self.inner.clock.now_ms();
        let next = &self.inner.next_dead_purge;
        if now < next.load(Ordering::Relaxed) {
            return Ok(());
        }
        let retention = duration_ms(retention);
        let mut dead = self.inner.dead.clone();
        let state = dead
            .info()
            .await
            .map_err(QueueError::unavailable)?
            .state
            .clone();
        // Anything dead-lettered from now on is due no sooner than this.
        let mut due_next = now.saturating_add(retention);
        let mut purged = 0;
        let mut seq = state.first_sequence;
        while state.messages > 0 && seq <= state.last_sequence {
            if purged == SWEEP {
                // More may be due: look again at the next lease.
                due_next = 0;
                break;
            }
            let m = match self.inner.dead.get_raw_message(seq).await {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    seq += 1;
                    continue;
                }
                Err(e) => return Err(QueueError::unavailable(e)),
            };
            let at = m
                .headers
                .get(H_AT)
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .unwrap_or(0);
            if at.saturating_add(retention) > now {
                // The stream is in dead-letter order.
                due_next = at.saturating_add(retention);
                break;
            }
            if let Some(id) = m
                .subject
                .rsplit('.')
                .next()
                .and_then(|s| s.parse::<JobId>().ok())
            {
                let ours = match self.rec(&id).await? {
                    Some((rec, rev)) if rec.s == "dead" && rec.dseq == seq => {
                        self.forget(&job_key(&id), Some(rev)).await.unwrap_or(false)
                    }
                    // Redriven (and maybe dead again, under another
                    // message): the record and the key are not this
                    // message's any more.
                    Some(_) => false,
                    None => true,
                };
                let key = self
                    .inner
                    .format
                    .decode(&m.payload)
                    .ok()
                    .and_then(|j| j.idempotency_key);
                if ours && let Some(key) = key {
                    let ik = idem_key(&key);
                    if let Some(e) = self
                        .inner
                        .live
                        .entry(ik.clone())
                        .await
                        .map_err(QueueError::unavailable)?
                        && e.operation == kv::Operation::Put
                        && self.parse_claim(&e.value).is_ok_and(|(cid, _)| cid == id)
                    {
                        let _ = self.forget(&ik, Some(e.revision)).await;
                    }
                }
            }
            let _ = self.inner.dead.delete_message(seq).await;
            purged += 1;
            seq += 1;
        }
        next.store(due_next, Ordering::Relaxed);
        Ok(())
    }

    async fn lease_inner(
        &self,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Leased>, QueueError> {
        if let Some(retention) = self.inner.policy.dead_letter_retention {
            self.purge_dead(retention).await?;
        }
        let mut out = Vec::new();
        let max_attempts = self.inner.policy.max_attempts;
        // Each fetched message takes a few round trips, one after another;
        // no new batch is fetched after `op_timeout`, and a fetched one is
        // always handled to its end (see `lease`).
        let stop_fetching = tokio::time::Instant::now() + self.inner.op_timeout;
        // Dead-lettered messages count against a batch; fetch until full or dry.
        while out.len() < max && (out.is_empty() || tokio::time::Instant::now() < stop_fetching) {
            let mut batch = self
                .inner
                .consumer
                .fetch()
                .max_messages(max - out.len())
                .messages()
                .await
                .map_err(QueueError::unavailable)?;
            let mut seen = 0;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(QueueError::unavailable)?;
                seen += 1;
                let now = self.inner.clock.now_ms();
                let info = msg.info().map_err(|e| self.corrupt(e.to_string()))?;
                let attempts = u32::try_from(info.delivered).unwrap_or(u32::MAX);
                let reply = msg
                    .reply
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_default();
                let Some(id) = msg
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|s| s.parse::<JobId>().ok())
                else {
                    self.answer(&reply, "+TERM").await?;
                    continue;
                };
                // A redelivery (the only kind a redrive can overtake) of a
                // message that is no longer the job's own: the job was
                // dead-lettered, and redriven as a new message, before this
                // one's `+TERM` landed. Leasing it would run the job twice.
                if attempts > 1
                    && let Some(last) = self.message(&id).await?
                    && last.sequence != info.stream_sequence
                {
                    self.answer(&reply, "+TERM").await?;
                    continue;
                }
                let current = self.rec(&id).await?;
                let revision = match &current {
                    Some((rec, _)) if rec.s == "dead" => {
                        self.answer(&reply, "+TERM").await?;
                        continue;
                    }
                    // A failed submit's job that the server stored anyway.
                    Some((rec, _)) if rec.s == "void" => {
                        self.answer(&reply, "+TERM").await?;
                        let _ = self.forget(&job_key(&id), None).await;
                        continue;
                    }
                    Some((rec, _)) if rec.s == "settling" && self.done(&id).await?.is_some() => {
                        self.answer(&reply, "+ACK").await?;
                        continue;
                    }
                    Some((_, rev)) => Some(*rev),
                    // Delivered already (its ack removed the record): a
                    // copy left behind, such as an old message whose `+TERM`
                    // was lost before a redrive that has since been acked.
                    None if self.done(&id).await?.is_some() => {
                        self.answer(&reply, "+TERM").await?;
                        continue;
                    }
                    None => None,
                };
                let deadline = header_u64(msg.headers.as_ref(), H_DEADLINE);
                let reason = if deadline.is_some_and(|d| d <= now) {
                    Some("ttl expired".to_owned())
                } else if attempts > max_attempts {
                    Some(format!("max attempts ({max_attempts}) reached"))
                } else {
                    None
                };
                // The attempts a buried message had: this delivery is not one.
                let had = attempts.saturating_sub(1).min(max_attempts);
                if let Some(reason) = reason {
                    self.bury(&id, msg.payload.clone(), had, &reason, &reply, revision)
                        .await?;
                    continue;
                }
                let mut job = match self.inner.format.decode(&msg.payload) {
                    Ok(job) => job,
                    // Written by a newer version, say: dead-lettered as it
                    // is, rather than failing this batch and every next one.
                    Err(e) => {
                        let why = super::corrupt_record(&id, &e);
                        // Should that fail, the message comes back; the
                        // batch's other jobs are held by now.
                        if let Err(e) = self
                            .bury(&id, msg.payload.clone(), had, &why, &reply, revision)
                            .await
                        {
                            tracing::warn!(target: "tower_firebreak", layer = "queue", job_id = %id, error = %e, "dead-lettering an undecodable job failed");
                        }
                        continue;
                    }
                };
                job.attempts = attempts;
                let token = format!("{:032x}", uuid::Uuid::now_v7().as_u128());
                let rec = Rec {
                    s: "inflight".to_owned(),
                    token: token.clone(),
                    reply: reply.clone(),
                    attempts,
                    ..Rec::default()
                };
                if !self.cas(&id, &rec, revision).await? {
                    // Settled or taken meanwhile; the server redelivers it
                    // after ack_wait if it still needs a lease.
                    continue;
                }
                // The lease's visibility timeout: the server redelivers
                // the message then, unless it is settled first.
                msg.ack_with(jetstream::AckKind::Nak(Some(visibility.min(MAX_NAK_DELAY))))
                    .await
                    .map_err(QueueError::unavailable)?;
                out.push(Leased::new(Lease::new(id, token), job));
            }
            if seen == 0 {
                break;
            }
        }
        Ok(out)
    }

    async fn ack_inner(
        &self,
        lease: &Lease,
        response: DeliveredResponse,
    ) -> Result<(), QueueError> {
        let (rec, rev) = self.held(lease).await?;
        let id = lease.id();
        let settling = Rec {
            s: "settling".to_owned(),
            ..rec.clone()
        };
        let Some(settled) = self.cas_rev(id, &settling, Some(rev)).await? else {
            return Err(QueueError::LeaseLost { id: *id });
        };
        let done = Done {
            status: response.status,
            headers: response
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), b64_encode(v.as_bytes())))
                .collect(),
            body: b64_encode(&response.body),
            attempts: rec.attempts,
            at: self.inner.clock.now_ms(),
        };
        let done_kv = &self.inner.done;
        done_kv
            .put(
                job_key(id),
                Bytes::from(serde_json::to_vec(&done).expect("serialises")),
            )
            .await
            .map_err(QueueError::unavailable)?;
        // The idempotency key moves to the done bucket, to expire with it.
        let key = self
            .message(id)
            .await?
            .and_then(|m| self.inner.format.decode(&m.payload).ok())
            .and_then(|j| j.idempotency_key);
        if let Some(key) = key {
            let ik = idem_key(&key);
            if let Some(e) = self
                .inner
                .live
                .entry(ik.clone())
                .await
                .map_err(QueueError::unavailable)?
                && e.operation == kv::Operation::Put
            {
                done_kv
                    .put(&ik, e.value.clone())
                    .await
                    .map_err(QueueError::unavailable)?;
                let _ = self.forget(&ik, Some(e.revision)).await;
            }
        }
        self.answer(&rec.reply, "+ACK").await?;
        // Only the settling record: should the lease have run out meanwhile,
        // the record of the lease that took the job over stays.
        self.forget(&job_key(id), Some(settled)).await.map(|_| ())
    }

    async fn nack_inner(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        let (rec, rev) = self.held(lease).await?;
        let id = lease.id();
        let now = self.inner.clock.now_ms();
        let max = self.inner.policy.max_attempts;
        let msg = self.message(id).await?;
        let deadline = msg.as_ref().and_then(|m| {
            m.headers
                .get(H_DEADLINE)
                .and_then(|v| v.as_str().parse::<u64>().ok())
        });
        let reason = if deadline.is_some_and(|d| d <= now) {
            Some("ttl expired".to_owned())
        } else if rec.attempts >= max {
            Some(format!("max attempts ({max}) reached"))
        } else {
            None
        };
        if let Some(reason) = reason {
            let payload = msg.map(|m| m.payload).unwrap_or_default();
            return if self
                .bury(id, payload, rec.attempts, &reason, &rec.reply, Some(rev))
                .await?
            {
                Ok(())
            } else {
                Err(QueueError::LeaseLost { id: *id })
            };
        }
        let queued = Rec {
            s: "queued".to_owned(),
            attempts: rec.attempts,
            ..Rec::default()
        };
        if !self.cas(id, &queued, Some(rev)).await? {
            return Err(QueueError::LeaseLost { id: *id });
        }
        let nak = if delay.is_zero() {
            "-NAK".to_owned()
        } else {
            format!("-NAK {{\"delay\":{}}}", delay.min(MAX_NAK_DELAY).as_nanos())
        };
        self.inner
            .client
            .request(rec.reply.clone(), Bytes::from(nak))
            .await
            .map(|_| ())
            .map_err(QueueError::unavailable)
    }

    async fn dead_inner(&self, lease: &Lease, reason: &str) -> Result<(), QueueError> {
        let (rec, rev) = self.held(lease).await?;
        let id = lease.id();
        let payload = self
            .message(id)
            .await?
            .map(|m| m.payload)
            .unwrap_or_default();
        if self
            .bury(id, payload, rec.attempts, reason, &rec.reply, Some(rev))
            .await?
        {
            Ok(())
        } else {
            Err(QueueError::LeaseLost { id: *id })
        }
    }

    async fn status_inner(&self, id: &JobId) -> Result<Option<JobStatus>, QueueError> {
        if let Some(d) = self.done(id).await? {
            let mut headers = HeaderMap::new();
            for (n, v) in d.headers {
                let v = b64_decode(&v).map_err(|e| self.corrupt(e.to_string()))?;
                headers.append(
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|e| self.corrupt(e.to_string()))?,
                    HeaderValue::from_bytes(&v).map_err(|e| self.corrupt(e.to_string()))?,
                );
            }
            return Ok(Some(JobStatus::Delivered {
                status: d.status,
                headers,
                body: b64_decode(&d.body).map_err(|e| self.corrupt(e.to_string()))?,
                attempts: d.attempts,
                delivered_at: ms_system(d.at),
            }));
        }
        let Some((rec, _)) = self.rec(id).await? else {
            return Ok(None);
        };
        match rec.s.as_str() {
            "dead" => Ok(Some(JobStatus::DeadLettered {
                reason: rec.reason,
                attempts: rec.attempts,
                at: ms_system(rec.at),
            })),
            // A failed submit's job, or its leftover record, whose message
            // never reached the stream.
            "void" => Ok(None),
            _ if self.message(id).await?.is_none() => Ok(None),
            "inflight" => Ok(Some(JobStatus::InFlight)),
            _ => Ok(Some(JobStatus::Queued)),
        }
    }

    async fn depth_inner(&self) -> Result<usize, QueueError> {
        let mut jobs = self.inner.jobs.clone();
        let info = jobs.info().await.map_err(QueueError::unavailable)?;
        Ok(usize::try_from(info.state.messages).unwrap_or(usize::MAX))
    }

    async fn oldest_inner(&self) -> Result<Option<Duration>, QueueError> {
        let mut jobs = self.inner.jobs.clone();
        let state = jobs
            .info()
            .await
            .map_err(QueueError::unavailable)?
            .state
            .clone();
        if state.messages == 0 {
            return Ok(None);
        }
        let first = match self.inner.jobs.get_raw_message(state.first_sequence).await {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None);
            }
            Err(e) => return Err(QueueError::unavailable(e)),
        };
        let at = first
            .headers
            .get(H_ENQ)
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .ok_or_else(|| self.corrupt("job message without an enqueue time"))?;
        Ok(Some(Duration::from_millis(
            self.inner.clock.now_ms().saturating_sub(at),
        )))
    }

    async fn dead_letters_inner(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // The stream is in dead-letter order; the trait wants id order. The
        // subjects (one per dead job, its id last) are listed without their
        // messages, sorted, and only the first `limit` messages are read.
        let prefix = format!("{}.", self.inner.dead_subject);
        let mut subjects = self
            .inner
            .dead
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(QueueError::unavailable)?;
        let mut ids = Vec::new();
        while let Some(next) = subjects.next().await {
            let (subject, _) = next.map_err(QueueError::unavailable)?;
            if let Some(id) = subject
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<JobId>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        for id in ids {
            if out.len() >= limit {
                break;
            }
            let m = match self
                .inner
                .dead
                .get_last_raw_message_by_subject(&format!("{prefix}{id}"))
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => continue,
                Err(e) => return Err(QueueError::unavailable(e)),
            };
            // One dead-lettered because it does not decode is left out (its
            // status says why).
            let Ok(mut job) = self.inner.format.decode(&m.payload) else {
                continue;
            };
            job.attempts = m
                .headers
                .get(H_ATTEMPTS)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            let reason = m
                .headers
                .get(H_REASON)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            let at = m
                .headers
                .get(H_AT)
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            out.push(DeadLetter::new(id, job, reason, ms_system(at)));
        }
        Ok(out)
    }

    async fn redrive_inner(&self, id: &JobId) -> Result<bool, QueueError> {
        let Some((rec, rev)) = self.rec(id).await? else {
            return Ok(false);
        };
        if rec.s != "dead" {
            return Ok(false);
        }
        let m = match self.inner.dead.get_raw_message(rec.dseq).await {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(false);
            }
            Err(e) => return Err(QueueError::unavailable(e)),
        };
        let mut job = self
            .inner
            .format
            .decode(&m.payload)
            .map_err(|e| self.corrupt(format!("dead job {id}: {e}")))?;
        job.attempts = 0;
        let queued = Rec {
            s: "queued".to_owned(),
            ..Rec::default()
        };
        if !self.cas(id, &queued, Some(rev)).await? {
            return Ok(false);
        }
        let enq = job.enqueued_at_ms;
        if let Err(e) = self.store(id, &job, enq, &mut None).await {
            // Put the dead record back: the job is still dead.
            let _ = self
                .inner
                .live
                .put(
                    job_key(id),
                    Bytes::from(serde_json::to_vec(&rec).expect("serialises")),
                )
                .await;
            return Err(e);
        }
        let _ = self.inner.dead.delete_message(rec.dseq).await;
        Ok(true)
    }
}

impl Queue for NatsQueue {
    async fn submit(&self, job: Job) -> Result<Enqueued, QueueError> {
        self.run(self.submit_inner(job)).await
    }

    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Leased>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // A message takes a few round trips (record, compare-and-set, the
        // visibility NAK), each bounded by `op_timeout` as a request: one
        // `op_timeout` for the whole batch would cut it off part way on a
        // slow link, leaving jobs marked in flight that no caller holds and
        // burning an attempt of each, until they were dead-lettered unsent.
        let per_message = u32::try_from(max).unwrap_or(u32::MAX).saturating_add(1);
        let limit = self.inner.op_timeout.saturating_mul(per_message);
        self.run_within(limit, self.lease_inner(max, visibility))
            .await
    }

    async fn ack(&self, lease: &Lease, response: DeliveredResponse) -> Result<(), QueueError> {
        self.run(self.ack_inner(lease, response)).await
    }

    async fn nack(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        self.run(self.nack_inner(lease, delay)).await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), QueueError> {
        self.run(self.dead_inner(lease, reason)).await
    }

    async fn status(&self, id: &JobId) -> Result<Option<JobStatus>, QueueError> {
        self.run(self.status_inner(id)).await
    }

    async fn depth(&self) -> Result<usize, QueueError> {
        self.run(self.depth_inner()).await
    }

    async fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        self.run(self.oldest_inner()).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.run(self.dead_letters_inner(limit)).await
    }

    async fn dead_letter_count(&self) -> Result<usize, QueueError> {
        self.run(async {
            let mut dead = self.inner.dead.clone();
            let info = dead.info().await.map_err(QueueError::unavailable)?;
            Ok(usize::try_from(info.state.messages).unwrap_or(usize::MAX))
        })
        .await
    }

    async fn redrive(&self, id: &JobId) -> Result<bool, QueueError> {
        self.run(self.redrive_inner(id)).await
    }
}
