//! Durable job queues for deferred requests.
//!
//! `defer` stores a request it cannot deliver now as a [`Job`] in a
//! [`Queue`], answers the caller `202 Accepted` with the [`JobId`], and a
//! replayer later leases the job, sends it, and acks it with the response.
//!
//! | backend | feature | use |
//! | --- | --- | --- |
//! | [`disk::DiskQueue`] | `disk` (default) | embedded, on disk (redb), durable, one process |
//! | [`memory::MemoryQueue`] | always | tests; same semantics, nothing survives the process |
//! | [`amqp::AmqpQueue`] | `amqp` | RabbitMQ, shared by a fleet, with its job status in a [`amqp::StatusStore`] (Redis) |
//! | [`nats::NatsQueue`] | `nats` | NATS JetStream, shared by a fleet; file-backed streams and KV |
//! | [`redis::RedisQueue`] | `redis` | Redis Streams, shared by a fleet; durable as Redis's AOF setting |
//!
//! # Guarantees
//!
//! Delivery is **at least once**. A job leaves the queue only when a
//! replayer acks it, dead-letters it, or it runs out of attempts or time;
//! a replayer that dies mid-delivery loses only its lease, and the job is
//! leased again once the lease's visibility timeout has passed. So the
//! target service may see a job more than once, and it should dedup by
//! the `Idempotency-Key` header, which is replayed with the job.
//!
//! The lifecycle of a job:
//!
//! ```text
//! submit ──▶ Queued ──lease──▶ InFlight ──ack──▶ Delivered (kept for `retention`)
//!              ▲                  │ │
//!              └── nack / lease ──┘ └── dead_letter, max attempts, TTL ──▶ DeadLettered
//!                  expiry                                                     │
//!              ▲                                                              │
//!              └─────────────────────────── redrive ◀─────────────────────────┘
//! ```
//!
//! - **Attempts.** Each lease counts one attempt. When a job that has
//!   already had `max_attempts` leases comes back (nack or lease expiry), it
//!   is dead-lettered with the reason `max attempts (N) reached` instead of
//!   being queued again.
//! - **TTL.** A job whose [`Job::deadline`] has passed is dead-lettered with
//!   the reason `ttl expired` when a lease would hand it out, or when it
//!   comes back. It is not leased after its deadline.
//! - **Idempotency.** A job whose idempotency key is already held by a job
//!   with the same [`Fingerprint`] (method, URI, body) is not stored again:
//!   [`Queue::submit`] returns [`Enqueued::Existing`] with the first job's
//!   id. A different fingerprint is a [`QueueError::Conflict`]. A key is
//!   held until its job's delivered response is purged after `retention`,
//!   and for as long as the job is dead-lettered.
//! - **Retention.** A delivered job's status and response are kept for
//!   `retention` (default 24 h); dead letters until they are redriven, or
//!   for `dead_letter_retention` when that is set (every backend has the
//!   setting). Both are purged by the sweep that runs with each `lease`
//!   call.
//! - **Capacity.** At most `capacity` unfinished (queued or in-flight) jobs.
//!   One more is refused with [`QueueError::Full`], never dropped.
//!
//! # Clock
//!
//! Visibility timeouts, nack delays, TTLs and retention are stored as
//! wall-clock milliseconds (they must survive a restart), but they advance
//! with `tokio::time`: a queue reads the system clock once when it is made
//! and adds `tokio::time::Instant` elapsed time since. Tests can therefore
//! drive every timeout with paused time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "amqp")]
pub mod amqp;
mod clock;
pub mod codec;
#[cfg(feature = "disk")]
pub mod disk;
mod error;
mod job;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
mod redis_clock;
mod state;

pub use self::error::QueueError;
pub use self::job::{
    DeadLetter, DeliveredResponse, Enqueued, Fingerprint, Job, JobId, JobStatus, Lease, Leased,
    ParseJobIdError,
};

/// The dead-letter reason for job `id`, whose stored form does not decode
/// (`why`), logged as it is given: every backend dead-letters such a job
/// with this reason instead of failing the lease it came in.
pub(crate) fn corrupt_record(id: &JobId, why: &dyn std::fmt::Display) -> String {
    tracing::error!(target: "tower_firebreak", layer = "queue", job_id = %id, error = %why, "job record does not decode; dead-lettered as it is");
    format!("corrupt job record: {why}")
}

/// A durable queue of deferred jobs.
///
/// Every method takes `&self`; a queue is shared by cloning its handle or
/// through an [`Arc`] (which implements `Queue` too). All futures are
/// `Send`.
pub trait Queue: Send + Sync + 'static {
    /// Stores `job`, or finds the job that already holds its idempotency key.
    ///
    /// **Guarantee:** when this returns `Ok(Enqueued::Created(id))` the job is
    /// durable as far as the backend can make it (the disk queue has
    /// fsynced it) and will be leased at least once, unless it is
    /// dead-lettered. On `Err`, nothing was stored, but for a broker
    /// backend's request in flight when its connection broke or its broker
    /// stopped (see [`QueueError::Unavailable`]).
    ///
    /// The queue sets the job's enqueue time and resets its attempts.
    ///
    /// # Errors
    ///
    /// [`QueueError::Conflict`] when the key is held by a different request,
    /// [`QueueError::Full`] at capacity, [`QueueError::Unavailable`] when the
    /// backend cannot store it.
    fn submit(&self, job: Job) -> impl Future<Output = Result<Enqueued, QueueError>> + Send;

    /// Stores `job` and returns its id: [`submit`](Self::submit) without
    /// telling a new job from an existing one.
    fn enqueue(&self, job: Job) -> impl Future<Output = Result<JobId, QueueError>> + Send {
        async move { self.submit(job).await.map(|e| e.id()) }
    }

    /// Leases up to `max` jobs that are due, oldest due first, each for
    /// `visibility`.
    ///
    /// **Guarantee:** no other `lease` call returns these jobs until their
    /// visibility timeout has passed. A job whose lease expires without an
    /// ack, nack or dead-letter is queued again (at least once). Jobs past
    /// their TTL or out of attempts are dead-lettered here instead of being
    /// returned, and so is a job whose stored form does not decode (written
    /// by a newer version, or in another format), with a reason that starts
    /// `corrupt job record`: it holds up no other job. The result may be
    /// empty.
    fn lease(
        &self,
        max: usize,
        visibility: Duration,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send;

    /// Marks the leased job delivered and stores `response` for the
    /// queue's retention time.
    ///
    /// **Guarantee:** on `Ok`, the job will not be leased again and its
    /// status reads `Delivered` until the retention time passes.
    ///
    /// # Errors
    ///
    /// [`QueueError::LeaseLost`] when `lease` is no longer the job's current
    /// lease (it expired and the job was leased again, or it was already
    /// settled); the job is then left as it is.
    fn ack(
        &self,
        lease: &Lease,
        response: DeliveredResponse,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Gives the job back, to be leased again no sooner than `delay` from now.
    ///
    /// **Guarantee:** on `Ok` the job is queued again, or dead-lettered if it
    /// has used its attempts or passed its TTL. Errors as for
    /// [`ack`](Self::ack).
    fn nack(
        &self,
        lease: &Lease,
        delay: Duration,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Moves the leased job to the dead-letter store with `reason`.
    ///
    /// **Guarantee:** on `Ok` the job is not leased again unless it is
    /// [redriven](Self::redrive). Errors as for [`ack`](Self::ack).
    fn dead_letter(
        &self,
        lease: &Lease,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Where the job is, or `None` for an id the queue does not know (never
    /// stored, or delivered and purged after retention).
    fn status(
        &self,
        id: &JobId,
    ) -> impl Future<Output = Result<Option<JobStatus>, QueueError>> + Send;

    /// How many jobs are unfinished: queued or in flight.
    fn depth(&self) -> impl Future<Output = Result<usize, QueueError>> + Send;

    /// How long ago the oldest unfinished job was enqueued; `None` when there
    /// is none.
    fn oldest_age(&self) -> impl Future<Output = Result<Option<Duration>, QueueError>> + Send;

    /// Up to `limit` dead-lettered jobs, oldest id first.
    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send;

    /// How many jobs are dead-lettered, without reading them (the status
    /// page asks every second). The default reads up to 10,000 of them and
    /// counts; every backend of this crate counts without reading.
    fn dead_letter_count(&self) -> impl Future<Output = Result<usize, QueueError>> + Send {
        async { Ok(self.dead_letters(10_000).await?.len()) }
    }

    /// Moves a dead-lettered job back to the queue with its attempts reset.
    /// Returns `false` when `id` is not dead-lettered.
    ///
    /// # Errors
    ///
    /// [`QueueError::Full`] when the queue is at capacity.
    fn redrive(&self, id: &JobId) -> impl Future<Output = Result<bool, QueueError>> + Send;
}

impl<Q: Queue> Queue for Arc<Q> {
    fn submit(&self, job: Job) -> impl Future<Output = Result<Enqueued, QueueError>> + Send {
        (**self).submit(job)
    }

    fn lease(
        &self,
        max: usize,
        visibility: Duration,
    ) -> impl Future<Output = Result<Vec<Leased>, QueueError>> + Send {
        (**self).lease(max, visibility)
    }

    fn ack(
        &self,
        lease: &Lease,
        response: DeliveredResponse,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        (**self).ack(lease, response)
    }

    fn nack(
        &self,
        lease: &Lease,
        delay: Duration,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        (**self).nack(lease, delay)
    }

    fn dead_letter(
        &self,
        lease: &Lease,
        reason: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        (**self).dead_letter(lease, reason)
    }

    fn status(
        &self,
        id: &JobId,
    ) -> impl Future<Output = Result<Option<JobStatus>, QueueError>> + Send {
        (**self).status(id)
    }

    fn depth(&self) -> impl Future<Output = Result<usize, QueueError>> + Send {
        (**self).depth()
    }

    fn oldest_age(&self) -> impl Future<Output = Result<Option<Duration>, QueueError>> + Send {
        (**self).oldest_age()
    }

    fn dead_letters(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, QueueError>> + Send {
        (**self).dead_letters(limit)
    }

    fn dead_letter_count(&self) -> impl Future<Output = Result<usize, QueueError>> + Send {
        (**self).dead_letter_count()
    }

    fn redrive(&self, id: &JobId) -> impl Future<Output = Result<bool, QueueError>> + Send {
        (**self).redrive(id)
    }
}

/// Settings shared by the embedded backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Policy {
    pub(crate) capacity: usize,
    pub(crate) max_attempts: u32,
    pub(crate) retention: Duration,
    pub(crate) dead_letter_retention: Option<Duration>,
}

impl Policy {
    pub(crate) const DEFAULT_CAPACITY: usize = 1_000_000;
    pub(crate) const DEFAULT_MAX_ATTEMPTS: u32 = 10;
    pub(crate) const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

    pub(crate) fn validate(&self) -> Result<(), crate::ConfigError> {
        use crate::ConfigError;
        if self.capacity == 0 {
            return Err(ConfigError::new(
                "capacity",
                self.capacity,
                "must be above zero",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "max_attempts",
                self.max_attempts,
                "must be above zero",
            ));
        }
        Ok(())
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            capacity: Self::DEFAULT_CAPACITY,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            retention: Self::DEFAULT_RETENTION,
            dead_letter_retention: None,
        }
    }
}
