//! [`MemoryQueue`]: the queue semantics without a disk, for tests.

use super::clock::Clock;
use super::state::{self, IdemRec, LeaseRec, Outcome, Read, Store};
use super::{
    DeadLetter, DeliveredResponse, Enqueued, Job, JobId, JobStatus, Lease, Leased, Policy, Queue,
    QueueError,
};
use crate::ConfigError;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// An in-memory [`Queue`] with the same semantics as
/// [`DiskQueue`](super::disk::DiskQueue) (both run one state machine, and
/// both pass one conformance suite), except that nothing outlives the
/// process. For tests, and for services that can afford to lose deferred
/// jobs on restart.
///
/// Clones share one queue.
///
/// ```
/// use tower_firebreak::queue::{memory::MemoryQueue, DeliveredResponse, Job, JobStatus, Queue};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_firebreak::queue::QueueError> {
/// let queue = MemoryQueue::new();
/// let id = queue.enqueue(Job::new(http::Method::POST, "/orders".parse().unwrap())).await?;
/// let leased = queue.lease(10, Duration::from_secs(30)).await?;
/// assert_eq!(leased.len(), 1);
/// let response = DeliveredResponse { status: 201, ..Default::default() };
/// queue.ack(&leased[0].lease, response).await?;
/// assert!(matches!(queue.status(&id).await?, Some(JobStatus::Delivered { status: 201, .. })));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the tables: they may hold a million jobs.
        f.debug_struct("MemoryQueue")
            .field("policy", &self.inner.policy)
            // try_lock: formatting must not block, nor deadlock inside an operation.
            .field("depth", &self.inner.tables.try_lock().ok().map(|t| t.depth))
            .finish()
    }
}

struct Inner {
    policy: Policy,
    clock: Clock,
    tables: Mutex<Tables>,
}

/// Settings for a [`MemoryQueue`].
#[derive(Clone, Debug, Default)]
pub struct MemoryQueueBuilder {
    policy: Policy,
}

impl MemoryQueueBuilder {
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

    /// How long a delivered job's status and response are kept. Default: 24 h.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.policy.retention = retention;
        self
    }

    /// How long a dead letter is kept before it is purged (with its
    /// idempotency key). Default: until it is redriven.
    pub fn dead_letter_retention(mut self, retention: Duration) -> Self {
        self.policy.dead_letter_retention = Some(retention);
        self
    }

    /// Checks the settings and makes the queue.
    pub fn build(self) -> Result<MemoryQueue, ConfigError> {
        self.policy.validate()?;
        Ok(MemoryQueue {
            inner: Arc::new(Inner {
                policy: self.policy,
                clock: Clock::new(),
                tables: Mutex::new(Tables::default()),
            }),
        })
    }
}

impl MemoryQueue {
    /// A queue with the default settings.
    pub fn new() -> MemoryQueue {
        MemoryQueueBuilder::default()
            .build()
            .expect("the default settings are valid")
    }

    /// Settings for a queue.
    pub fn builder() -> MemoryQueueBuilder {
        MemoryQueueBuilder::default()
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Tables, &Policy, u64) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let now = self.inner.clock.now_ms();
        let mut tables = self.lock();
        f(&mut tables, &self.inner.policy, now)
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // No operation on these maps can panic between two of its writes
        // (every refusal is decided before the first write), so a lock
        // poisoned by a panic elsewhere still guards consistent tables.
        self.inner
            .tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        MemoryQueue::new()
    }
}

impl Queue for MemoryQueue {
    async fn submit(&self, job: Job) -> Result<Enqueued, QueueError> {
        let id = JobId::new();
        let fingerprint = job.fingerprint();
        self.with(|t, p, now| {
            let mut job = job;
            job.enqueued_at_ms = now;
            job.attempts = 0;
            let key = job.idempotency_key.clone();
            state::submit(t, p, id, key.as_deref(), fingerprint, job, now)
        })
    }

    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Leased>, QueueError> {
        self.with(|t, p, now| state::lease(t, p, now, max, visibility))
    }

    async fn ack(&self, lease: &Lease, response: DeliveredResponse) -> Result<(), QueueError> {
        self.with(|t, p, now| state::ack(t, p, now, lease, response))
    }

    async fn nack(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        self.with(|t, p, now| state::nack(t, p, now, lease, delay))
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), QueueError> {
        self.with(|t, p, now| state::dead_letter(t, p, now, lease, reason))
    }

    async fn status(&self, id: &JobId) -> Result<Option<JobStatus>, QueueError> {
        self.with(|t, _, _| state::status(t, id))
    }

    async fn depth(&self) -> Result<usize, QueueError> {
        self.with(|t, _, _| Ok(t.depth as usize))
    }

    async fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        self.with(|t, _, now| state::oldest_age(t, now))
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        self.with(|t, _, _| state::dead_letters(t, limit))
    }

    async fn dead_letter_count(&self) -> Result<usize, QueueError> {
        self.with(|t, _, _| state::dead_count(t))
    }

    async fn redrive(&self, id: &JobId) -> Result<bool, QueueError> {
        self.with(|t, p, now| state::redrive(t, p, now, id))
    }
}

#[derive(Debug, Default)]
struct Tables {
    jobs: BTreeMap<u128, Job>,
    ready: BTreeSet<(u64, u128)>,
    leases: HashMap<u128, LeaseRec>,
    lease_expiry: BTreeSet<(u64, u128)>,
    outcomes: HashMap<u128, Outcome>,
    purge: BTreeSet<(u64, u128)>,
    dead: BTreeMap<u128, Job>,
    idem: HashMap<String, IdemRec>,
    depth: u64,
}

fn due(set: &BTreeSet<(u64, u128)>, now: u64, max: usize) -> Vec<(u64, u128)> {
    set.range(..=(now, u128::MAX)).take(max).copied().collect()
}

impl Store for Tables {
    type New = Job;

    fn put_new(&mut self, id: u128, job: Job) -> Result<(), QueueError> {
        self.jobs.insert(id, job);
        Ok(())
    }
    fn job(&mut self, id: u128) -> Result<Option<Job>, QueueError> {
        Ok(self.jobs.get(&id).cloned())
    }
    fn put_job(&mut self, id: u128, job: &Job) -> Result<(), QueueError> {
        self.jobs.insert(id, job.clone());
        Ok(())
    }
    fn remove_job(&mut self, id: u128) -> Result<(), QueueError> {
        self.jobs.remove(&id);
        Ok(())
    }
    fn ready_insert(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.ready.insert((at, id));
        Ok(())
    }
    fn ready_remove(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.ready.remove(&(at, id));
        Ok(())
    }
    fn ready_due(&mut self, now: u64, max: usize) -> Result<Vec<(u64, u128)>, QueueError> {
        Ok(due(&self.ready, now, max))
    }
    fn lease_insert(&mut self, id: u128, rec: LeaseRec) -> Result<(), QueueError> {
        self.leases.insert(id, rec);
        self.lease_expiry.insert((rec.expires, id));
        Ok(())
    }
    fn lease_remove(&mut self, id: u128, rec: LeaseRec) -> Result<(), QueueError> {
        self.leases.remove(&id);
        self.lease_expiry.remove(&(rec.expires, id));
        Ok(())
    }
    fn leases_expired(&mut self, now: u64, max: usize) -> Result<Vec<(u64, u128)>, QueueError> {
        Ok(due(&self.lease_expiry, now, max))
    }
    fn outcome_insert(&mut self, id: u128, outcome: &Outcome) -> Result<(), QueueError> {
        self.outcomes.insert(id, outcome.clone());
        Ok(())
    }
    fn outcome_remove(&mut self, id: u128) -> Result<(), QueueError> {
        self.outcomes.remove(&id);
        Ok(())
    }
    fn purge_insert(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.purge.insert((at, id));
        Ok(())
    }
    fn purge_remove(&mut self, at: u64, id: u128) -> Result<(), QueueError> {
        self.purge.remove(&(at, id));
        Ok(())
    }
    fn purge_due(&mut self, now: u64, max: usize) -> Result<Vec<(u64, u128)>, QueueError> {
        Ok(due(&self.purge, now, max))
    }
    fn dead_insert(&mut self, id: u128, job: &Job) -> Result<(), QueueError> {
        self.dead.insert(id, job.clone());
        Ok(())
    }
    fn dead_job(&mut self, id: u128) -> Result<Option<Job>, QueueError> {
        Ok(self.dead.get(&id).cloned())
    }
    fn dead_remove(&mut self, id: u128) -> Result<(), QueueError> {
        self.dead.remove(&id);
        Ok(())
    }
    fn idem(&mut self, key: &str) -> Result<Option<IdemRec>, QueueError> {
        Ok(self.idem.get(key).copied())
    }
    fn idem_insert(&mut self, key: &str, rec: IdemRec) -> Result<(), QueueError> {
        self.idem.insert(key.to_owned(), rec);
        Ok(())
    }
    fn idem_remove(&mut self, key: &str) -> Result<(), QueueError> {
        self.idem.remove(key);
        Ok(())
    }
    fn depth(&mut self) -> Result<u64, QueueError> {
        Ok(self.depth)
    }
    fn set_depth(&mut self, depth: u64) -> Result<(), QueueError> {
        self.depth = depth;
        Ok(())
    }
}

impl Read for Tables {
    fn has_job(&mut self, id: u128) -> Result<bool, QueueError> {
        Ok(self.jobs.contains_key(&id))
    }
    fn lease(&mut self, id: u128) -> Result<Option<LeaseRec>, QueueError> {
        Ok(self.leases.get(&id).copied())
    }
    fn outcome(&mut self, id: u128) -> Result<Option<Outcome>, QueueError> {
        Ok(self.outcomes.get(&id).cloned())
    }
    fn oldest_job(&mut self) -> Result<Option<u64>, QueueError> {
        Ok(self.jobs.values().next().map(|j| j.enqueued_at_ms))
    }
    fn dead_count(&mut self) -> Result<usize, QueueError> {
        Ok(self.dead.len())
    }
    fn dead_list(&mut self, limit: usize) -> Result<Vec<(u128, Job)>, QueueError> {
        Ok(self
            .dead
            .iter()
            .take(limit)
            .map(|(id, job)| (*id, job.clone()))
            .collect())
    }
}
