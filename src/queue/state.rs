//! The queue's state machine, written once over a [`Store`] of tables.
//!
//! [`MemoryQueue`](super::memory::MemoryQueue) keeps the tables in maps
//! under a lock; [`DiskQueue`](super::disk::DiskQueue) keeps them in redb
//! and runs each operation inside a (group-committed) write transaction. A
//! logical refusal (full, conflict, lost lease) is decided before anything
//! is written, so an operation either applies whole or not at all; a
//! storage error fails the whole transaction.

use super::job::{duration_ms, ms_system};
use super::{
    DeadLetter, DeliveredResponse, Enqueued, Fingerprint, Job, JobId, JobStatus, Lease, Leased,
    Policy, QueueError,
};
use bytes::Bytes;
use http::HeaderMap;
use std::time::Duration;

/// The current lease on an in-flight job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeaseRec {
    pub(crate) expires: u64,
    pub(crate) token: u128,
}

/// The job that holds an idempotency key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IdemRec {
    pub(crate) id: u128,
    pub(crate) fingerprint: Fingerprint,
}

/// How a job finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Delivered {
        status: u16,
        headers: HeaderMap,
        body: Bytes,
        attempts: u32,
        at: u64,
        key: Option<String>,
    },
    Dead {
        reason: String,
        attempts: u32,
        at: u64,
        /// When the dead letter is purged, if dead letters expire.
        purge_at: Option<u64>,
    },
}

impl Outcome {
    fn to_status(&self) -> JobStatus {
        match self {
            Outcome::Delivered {
                status,
                headers,
                body,
                attempts,
                at,
                ..
            } => JobStatus::Delivered {
                status: *status,
                headers: headers.clone(),
                body: body.clone(),
                attempts: *attempts,
                delivered_at: ms_system(*at),
            },
            Outcome::Dead {
                reason,
                attempts,
                at,
                ..
            } => JobStatus::DeadLettered {
                reason: reason.clone(),
                attempts: *attempts,
                at: ms_system(*at),
            },
        }
    }
}

type R<T> = Result<T, QueueError>;

/// What status and listing reads need; a read-only transaction has it.
pub(crate) trait Read {
    fn has_job(&mut self, id: u128) -> R<bool>;
    fn lease(&mut self, id: u128) -> R<Option<LeaseRec>>;
    fn outcome(&mut self, id: u128) -> R<Option<Outcome>>;
    /// The enqueue time of the unfinished job with the lowest id.
    fn oldest_job(&mut self) -> R<Option<u64>>;
    fn dead_list(&mut self, limit: usize) -> R<Vec<(u128, Job)>>;
    /// How many jobs are dead-lettered.
    fn dead_count(&mut self) -> R<usize>;
}

/// The tables. Keys are `u128` job ids and `(millis, id)` time indexes.
pub(crate) trait Store: Read {
    /// A new job as the backend stores it, prepared by the caller (the disk
    /// queue encodes it before it reaches the writer thread).
    type New;

    fn put_new(&mut self, id: u128, job: Self::New) -> R<()>;
    /// Unfinished (queued or in-flight) jobs, by id: ids are time-ordered.
    fn job(&mut self, id: u128) -> R<Option<Job>>;
    /// As `job`, but a record that does not decode is `Some(Err(why))`
    /// rather than an error that fails the whole batch.
    fn job_checked(&mut self, id: u128) -> R<Option<Result<Job, String>>> {
        Ok(self.job(id)?.map(Ok))
    }
    /// As `dead_job`, but a record that does not decode (one quarantined
    /// for that reason) is `Some(Err(why))`, not an error.
    fn dead_job_checked(&mut self, id: u128) -> R<Option<Result<Job, String>>> {
        Ok(self.dead_job(id)?.map(Ok))
    }
    /// Moves job `id`'s record, as it is, from the jobs to the dead letters.
    fn quarantine(&mut self, id: u128) -> R<()> {
        self.remove_job(id)
    }
    fn put_job(&mut self, id: u128, job: &Job) -> R<()>;
    fn remove_job(&mut self, id: u128) -> R<()>;

    /// Ready jobs by the time they become visible.
    fn ready_insert(&mut self, at: u64, id: u128) -> R<()>;
    fn ready_remove(&mut self, at: u64, id: u128) -> R<()>;
    fn ready_due(&mut self, now: u64, max: usize) -> R<Vec<(u64, u128)>>;

    /// In-flight leases, and an index of them by expiry.
    fn lease_insert(&mut self, id: u128, rec: LeaseRec) -> R<()>;
    fn lease_remove(&mut self, id: u128, rec: LeaseRec) -> R<()>;
    /// Leases that expire at or before `now` (`u64::MAX`: all of them).
    fn leases_expired(&mut self, now: u64, max: usize) -> R<Vec<(u64, u128)>>;

    /// Finished jobs, and an index of delivered ones by purge time.
    fn outcome_insert(&mut self, id: u128, outcome: &Outcome) -> R<()>;
    fn outcome_remove(&mut self, id: u128) -> R<()>;
    fn purge_insert(&mut self, at: u64, id: u128) -> R<()>;
    fn purge_remove(&mut self, at: u64, id: u128) -> R<()>;
    fn purge_due(&mut self, now: u64, max: usize) -> R<Vec<(u64, u128)>>;

    /// Dead-lettered jobs.
    fn dead_insert(&mut self, id: u128, job: &Job) -> R<()>;
    fn dead_job(&mut self, id: u128) -> R<Option<Job>>;
    fn dead_remove(&mut self, id: u128) -> R<()>;

    fn idem(&mut self, key: &str) -> R<Option<IdemRec>>;
    fn idem_insert(&mut self, key: &str, rec: IdemRec) -> R<()>;
    fn idem_remove(&mut self, key: &str) -> R<()>;

    /// The number of unfinished jobs.
    fn depth(&mut self) -> R<u64>;
    fn set_depth(&mut self, depth: u64) -> R<()>;
}

/// How many expired leases or purgeable results one operation cleans up, so
/// that no single call does unbounded work.
const SWEEP: usize = 1024;

fn new_token() -> u128 {
    // The random bits of a v7 uuid; a stale lease can only collide with the
    // current one by guessing them.
    uuid::Uuid::now_v7().as_u128()
}

fn lease_of(id: JobId, token: u128) -> Lease {
    Lease::new(id, format!("{token:032x}"))
}

/// The stored lease that `lease` names, or `LeaseLost`.
fn held<S: Store>(s: &mut S, lease: &Lease) -> R<(u128, LeaseRec)> {
    let id = lease.id().as_u128();
    let lost = || QueueError::LeaseLost { id: *lease.id() };
    let token = u128::from_str_radix(lease.token(), 16).map_err(|_| lost())?;
    match s.lease(id)? {
        Some(rec) if rec.token == token => Ok((id, rec)),
        _ => Err(lost()),
    }
}

/// Stores a new job: `job` is already stamped with `now` and zero attempts,
/// and `fingerprint` and `key` are its own, all prepared by the caller
/// outside any lock or writer thread.
pub(crate) fn submit<S: Store>(
    s: &mut S,
    p: &Policy,
    new_id: JobId,
    key: Option<&str>,
    fingerprint: Fingerprint,
    job: S::New,
    now: u64,
) -> R<Enqueued> {
    if let Some(key) = key
        && let Some(rec) = s.idem(key)?
    {
        let existing = JobId::from_u128(rec.id);
        if rec.fingerprint == fingerprint {
            return Ok(Enqueued::Existing(existing));
        }
        return Err(QueueError::Conflict {
            key: key.to_owned(),
            existing,
        });
    }
    let depth = s.depth()?;
    if depth >= p.capacity as u64 {
        return Err(QueueError::Full {
            capacity: p.capacity,
        });
    }
    let id = new_id.as_u128();
    s.put_new(id, job)?;
    s.ready_insert(now, id)?;
    if let Some(key) = key {
        s.idem_insert(key, IdemRec { id, fingerprint })?;
    }
    s.set_depth(depth + 1)?;
    Ok(Enqueued::Created(new_id))
}

/// Why a job must not be leased (again), if it must not.
fn spent(job: &Job, p: &Policy, now: u64) -> Option<String> {
    if job.deadline_ms().is_some_and(|d| d <= now) {
        return Some("ttl expired".to_owned());
    }
    if job.attempts >= p.max_attempts {
        return Some(format!("max attempts ({}) reached", p.max_attempts));
    }
    None
}

fn finish_dead<S: Store>(
    s: &mut S,
    p: &Policy,
    id: u128,
    job: &Job,
    reason: String,
    now: u64,
) -> R<()> {
    s.remove_job(id)?;
    s.dead_insert(id, job)?;
    dead_outcome(s, p, id, job.attempts, reason, now)
}

/// A job record that does not decode (written by a newer or differently
/// built version, or damaged) goes to the dead letters as it is, with the
/// reason: the jobs behind it are not held up, every other operation in
/// its batch still commits, and the record is kept to look at.
fn bury_corrupt<S: Store>(s: &mut S, p: &Policy, id: u128, why: &str, now: u64) -> R<()> {
    let reason = super::corrupt_record(&JobId::from_u128(id), &why);
    s.quarantine(id)?;
    dead_outcome(s, p, id, 0, reason, now)
}

fn dead_outcome<S: Store>(
    s: &mut S,
    p: &Policy,
    id: u128,
    attempts: u32,
    reason: String,
    now: u64,
) -> R<()> {
    let purge_at = p
        .dead_letter_retention
        .map(|r| now.saturating_add(duration_ms(r)));
    s.outcome_insert(
        id,
        &Outcome::Dead {
            reason,
            attempts,
            at: now,
            purge_at,
        },
    )?;
    if let Some(at) = purge_at {
        s.purge_insert(at, id)?;
    }
    let depth = s.depth()?;
    s.set_depth(depth.saturating_sub(1))
}

/// Puts a job that came back (nack, expired lease) into the ready queue, or
/// into the dead letters when it has no attempts or time left.
fn requeue<S: Store>(s: &mut S, p: &Policy, now: u64, id: u128, visible_at: u64) -> R<()> {
    let job = match s.job_checked(id)? {
        None => return Ok(()),
        Some(Ok(job)) => job,
        Some(Err(why)) => return bury_corrupt(s, p, id, &why, now),
    };
    match spent(&job, p, now) {
        Some(reason) => finish_dead(s, p, id, &job, reason, now),
        None => s.ready_insert(visible_at, id),
    }
}

/// Returns expired leases to the queue; with `now == u64::MAX`, every lease.
pub(crate) fn recover<S: Store>(s: &mut S, p: &Policy, now: u64, until: u64) -> R<usize> {
    let mut n = 0;
    loop {
        let expired = s.leases_expired(until, SWEEP)?;
        if expired.is_empty() {
            return Ok(n);
        }
        for (expires, id) in expired {
            let rec = s.lease(id)?;
            // Always drop the index entry found, so the sweep ends even if
            // the index ever disagreed with the lease.
            s.lease_remove(id, LeaseRec { expires, token: 0 })?;
            match rec {
                Some(rec) if rec.expires == expires => {
                    requeue(s, p, now, id, now)?;
                    n += 1;
                }
                Some(current) => s.lease_insert(id, current)?,
                None => {}
            }
        }
        if until != u64::MAX {
            // Bounded work per call; the rest is picked up next time.
            return Ok(n);
        }
    }
}

/// Forgets delivered jobs past their retention, and dead letters past
/// theirs, with the idempotency keys they hold.
fn purge<S: Store>(s: &mut S, now: u64) -> R<()> {
    for (at, id) in s.purge_due(now, SWEEP)? {
        s.purge_remove(at, id)?;
        let key = match s.outcome(id)? {
            Some(Outcome::Delivered { key, .. }) => key,
            Some(Outcome::Dead { .. }) => {
                // A quarantined record's key cannot be read: its entry in
                // the key index stays (and answers with an unknown job).
                let key = s
                    .dead_job_checked(id)?
                    .and_then(Result::ok)
                    .and_then(|j| j.idempotency_key);
                s.dead_remove(id)?;
                key
            }
            None => None,
        };
        if let Some(key) = key
            && s.idem(&key)?.is_some_and(|r| r.id == id)
        {
            s.idem_remove(&key)?;
        }
        s.outcome_remove(id)?;
    }
    Ok(())
}

pub(crate) fn lease<S: Store>(
    s: &mut S,
    p: &Policy,
    now: u64,
    max: usize,
    visibility: Duration,
) -> R<Vec<Leased>> {
    recover(s, p, now, now)?;
    purge(s, now)?;
    let expires = now.saturating_add(duration_ms(visibility));
    let mut out = Vec::new();
    while out.len() < max {
        let due = s.ready_due(now, max - out.len())?;
        if due.is_empty() {
            break;
        }
        for (at, id) in due {
            s.ready_remove(at, id)?;
            let mut job = match s.job_checked(id)? {
                None => continue,
                Some(Ok(job)) => job,
                Some(Err(why)) => {
                    bury_corrupt(s, p, id, &why, now)?;
                    continue;
                }
            };
            if let Some(reason) = spent(&job, p, now) {
                finish_dead(s, p, id, &job, reason, now)?;
                continue;
            }
            job.attempts += 1;
            s.put_job(id, &job)?;
            let token = new_token();
            s.lease_insert(id, LeaseRec { expires, token })?;
            out.push(Leased::new(lease_of(JobId::from_u128(id), token), job));
        }
    }
    Ok(out)
}

pub(crate) fn ack<S: Store>(
    s: &mut S,
    p: &Policy,
    now: u64,
    lease: &Lease,
    response: DeliveredResponse,
) -> R<()> {
    let (id, rec) = held(s, lease)?;
    s.lease_remove(id, rec)?;
    let job = s.job(id)?;
    s.remove_job(id)?;
    let (attempts, key) = match job {
        Some(job) => (job.attempts, job.idempotency_key),
        None => (0, None),
    };
    s.outcome_insert(
        id,
        &Outcome::Delivered {
            status: response.status,
            headers: response.headers,
            body: response.body,
            attempts,
            at: now,
            key,
        },
    )?;
    s.purge_insert(now.saturating_add(duration_ms(p.retention)), id)?;
    let depth = s.depth()?;
    s.set_depth(depth.saturating_sub(1))
}

pub(crate) fn nack<S: Store>(
    s: &mut S,
    p: &Policy,
    now: u64,
    lease: &Lease,
    delay: Duration,
) -> R<()> {
    let (id, rec) = held(s, lease)?;
    s.lease_remove(id, rec)?;
    requeue(s, p, now, id, now.saturating_add(duration_ms(delay)))
}

pub(crate) fn dead_letter<S: Store>(
    s: &mut S,
    p: &Policy,
    now: u64,
    lease: &Lease,
    reason: &str,
) -> R<()> {
    let (id, rec) = held(s, lease)?;
    s.lease_remove(id, rec)?;
    match s.job(id)? {
        Some(job) => finish_dead(s, p, id, &job, reason.to_owned(), now),
        None => Ok(()),
    }
}

pub(crate) fn status<S: Read>(s: &mut S, id: &JobId) -> R<Option<JobStatus>> {
    let id = id.as_u128();
    if let Some(outcome) = s.outcome(id)? {
        return Ok(Some(outcome.to_status()));
    }
    if s.lease(id)?.is_some() {
        return Ok(Some(JobStatus::InFlight));
    }
    if s.has_job(id)? {
        return Ok(Some(JobStatus::Queued));
    }
    Ok(None)
}

pub(crate) fn oldest_age<S: Read>(s: &mut S, now: u64) -> R<Option<Duration>> {
    Ok(s.oldest_job()?
        .map(|at| Duration::from_millis(now.saturating_sub(at))))
}

pub(crate) fn dead_letters<S: Read>(s: &mut S, limit: usize) -> R<Vec<DeadLetter>> {
    let mut out = Vec::new();
    for (id, job) in s.dead_list(limit)? {
        let Some(Outcome::Dead { reason, at, .. }) = s.outcome(id)? else {
            continue;
        };
        out.push(DeadLetter::new(
            JobId::from_u128(id),
            job,
            reason,
            ms_system(at),
        ));
    }
    Ok(out)
}

pub(crate) fn dead_count<S: Read>(s: &mut S) -> R<usize> {
    s.dead_count()
}

pub(crate) fn redrive<S: Store>(s: &mut S, p: &Policy, now: u64, id: &JobId) -> R<bool> {
    let id = id.as_u128();
    let Some(Outcome::Dead { purge_at, .. }) = s.outcome(id)? else {
        return Ok(false);
    };
    let mut job = match s.dead_job_checked(id)? {
        None => return Ok(false),
        Some(Ok(job)) => job,
        // Dead-lettered because it does not decode: there is nothing to
        // send again.
        Some(Err(why)) => {
            tracing::warn!(target: "tower_firebreak", layer = "queue", job_id = %JobId::from_u128(id), error = why, "a dead letter that does not decode cannot be redriven");
            return Ok(false);
        }
    };
    let depth = s.depth()?;
    if depth >= p.capacity as u64 {
        return Err(QueueError::Full {
            capacity: p.capacity,
        });
    }
    s.dead_remove(id)?;
    s.outcome_remove(id)?;
    if let Some(at) = purge_at {
        // Or a later delivery of this job would be purged at the dead
        // letter's time.
        s.purge_remove(at, id)?;
    }
    job.attempts = 0;
    s.put_job(id, &job)?;
    s.ready_insert(now, id)?;
    s.set_depth(depth + 1)?;
    Ok(true)
}
