//! [`AmqpQueue`]: a [`Queue`] on RabbitMQ, with its job status in a
//! [`StatusStore`].
//!
//! RabbitMQ delivers messages; it cannot answer "where is job X", hold an
//! idempotency key, or give a delivered message back after a visibility
//! timeout. So an `AmqpQueue` is two parts:
//!
//! - **RabbitMQ** carries the jobs and does the timing. A durable queue
//!   `fb.<name>` holds persistent messages, each a copy of a job's envelope
//!   with a *ticket* header; every publish waits for the broker's publisher
//!   confirm. Delays go through TTL'd retry queues `fb.<name>.retry.<ms>`
//!   (one per delay, so no message waits behind a longer one; each
//!   dead-letters its expired messages back into `fb.<name>`, and is
//!   deleted after a minute unused). A delay (a nack's, or a lease's
//!   visibility) is rounded up to two significant digits (4321 ms waits
//!   4400 ms; at most 10 % longer; values of two significant digits, such
//!   as 100 ms, 1.6 s or 30 s, are kept), so
//!   that delays that vary by the millisecond, such as an open breaker's
//!   `retry_after`, share a few hundred queues at most instead of each
//!   declaring its own. A dead job is also published to the
//!   dead-letter exchange `fb.<name>.dlx`, bound to the queue
//!   `fb.<name>.dead`, for operators.
//! - **A [`StatusStore`]** holds each job's record: its state, attempts,
//!   the ticket of its one live copy, the delivered response, the dead-letter
//!   reason, and the idempotency keys, depth and oldest age.
//!   [`RedisStatusStore`] is the implementation here; every change to a
//!   record is one atomic step.
//!
//! A lease takes a message from `fb.<name>` (through a consumer with
//! prefetch, below). If its ticket is the record's current one, the job
//! is leased: a fresh copy
//! with a new ticket is first parked in the retry queue of the visibility
//! timeout (the lease's timer), then the record switches to that ticket,
//! then the message is acked. When the timer copy comes back and the record
//! still holds its ticket, the lease has expired and the job is leased
//! again (or dead-lettered, out of attempts or time). Ack, nack and
//! dead-letter change the record first, so every copy still in flight then
//! carries a stale ticket and is dropped when it arrives. A nack parks a
//! copy in the retry queue of its delay. Each copy is published *before*
//! the record points at it, so a crash between the two leaves a stray copy
//! (dropped later), never a record without a copy. A copy that arrives
//! before its record exists (its submit has published but not yet claimed)
//! is put back five times, 200 ms apart, before it is dropped; a claim
//! that is refused (existing key, conflict, full) or that the store ran
//! after its submit gave up (`late`) leaves a tombstone for ten minutes so
//! that its copy is dropped at once.
//!
//! A settled lease's timer copy stays in its retry queue until its
//! visibility timeout ends, and is then dropped.
//!
//! # Consumer and prefetch
//!
//! A handle's first `lease` starts a consumer on `fb.<name>` on a channel
//! of its own, with `basic.qos(prefetch)` ([`prefetch`], default 32) and
//! manual acks, so RabbitMQ pushes copies ahead and a lease usually finds
//! its batch already here instead of paying a `basic.get` round trip per
//! message. When it holds none, a lease makes two round trips on that
//! channel (passive `queue.declare`) as a barrier, after which every copy
//! that was ready for it has arrived; a lease on an empty queue costs those
//! two round trips. The copies of a batch are taken concurrently. Leases on
//! one handle run one at a time.
//!
//! A lease is not an unacked delivery: a copy is acked as soon as the
//! lease's timer copy is parked and the record points at it, so the
//! visibility timeout is the timer's, as before, and RabbitMQ's
//! `consumer_timeout` never sees a lease. What the consumer holds unacked
//! is only copies pushed ahead and not yet taken: the job's record is
//! unchanged (it reads `Queued`), but no other handle can lease it while
//! it is held. A held copy goes back to the queue when the handle has not
//! leased for [`prefetch_hold`] (default 2 s: the consumer's channel is
//! closed, and the next lease starts a new one), when an operation fails
//! and the link is dropped, when the connection is lost, or when the handle
//! is dropped. A copy that comes back this way is delivered again; if it
//! is stale by then (its job was leased through another copy), it is
//! dropped. This is the at-least-once path the design already had for a
//! pulled copy whose ack was lost.
//!
//! [`prefetch`]: AmqpQueueBuilder::prefetch
//! [`prefetch_hold`]: AmqpQueueBuilder::prefetch_hold
//!
//! # Durability
//!
//! `submit` returns after the broker's publisher confirm for a persistent
//! message on a durable queue (RabbitMQ confirms a persistent message once
//! it is persisted to disk) and after the status store has the record.
//! The job is lost if either loses it: the store's durability is the
//! store's, and for Redis that is its AOF setting (see
//! [`RedisQueue`](super::redis::RedisQueue): `appendfsync always` for an
//! fsync before the answer).
//!
//! # Connection loss
//!
//! The handle keeps one connection and channel. When an operation fails on
//! them, they are dropped and the next operation reconnects, no sooner than
//! a backoff that doubles up to [`max_backoff`](AmqpQueueBuilder::max_backoff);
//! until then operations fail at once with [`QueueError::Unavailable`].
//! Every operation is bounded by [`op_timeout`](AmqpQueueBuilder::op_timeout).
//! A submit that fails never leaves a job behind it reported as stored.
//! A claim that ran but whose answer was lost or came after the submit
//! gave up (or a submit dropped after its publish) is undone
//! ([`StatusStore::void_claim`], from a spawned task when the submit was
//! dropped): the job is voided and its key given back, unless a lease took
//! it first or a retry with its key was told it exists. Only then, and when
//! the undo cannot reach the store, is a failed submit ambiguous: the job
//! is stored, and a retry with the same idempotency key gets
//! [`Enqueued::Existing`].
//!
//! A broker or store that stalls instead of dying (paused, swapping) runs
//! what was written to its socket when it resumes, after the submits that
//! wrote it gave up. A copy that RabbitMQ takes late has no claim behind it
//! (the submit publishes first and claims only once the publish is
//! confirmed) and is dropped as an orphan. A claim that a stalled Redis
//! runs late creates nothing: [`RedisStatusStore`] passes the instant the
//! submit gives up, on Redis's clock, as [`RedisQueue`](super::redis::RedisQueue)
//! does for its submits (see its "Connection loss and stalls"), and the
//! script then leaves a void record, so the copy is dropped as stale at
//! once. So the exception above stays that one request in flight, however
//! long the stall.
//!
//! ```no_run
//! use tower_firebreak::queue::amqp::{AmqpQueue, RedisStatusStore};
//! use tower_firebreak::queue::{Job, Queue};
//!
//! # async fn run() -> Result<(), tower_firebreak::queue::QueueError> {
//! let store = RedisStatusStore::connect("redis://127.0.0.1:6379", "orders").await?;
//! let queue = AmqpQueue::builder()
//!     .name("orders")
//!     .connect("amqp://guest:guest@127.0.0.1:5672/%2f", store)
//!     .await?;
//! queue.enqueue(Job::new(http::Method::POST, "/orders".parse().unwrap())).await?;
//! # Ok(())
//! # }
//! ```

use super::clock::Clock;
use super::codec::{Format, b64_decode, b64_encode, hex};
use super::job::{duration_ms, ms_system};
use super::redis_clock::RedisClock;
use super::{
    DeadLetter, DeliveredResponse, Enqueued, Job, JobId, JobStatus, Lease, Leased, Policy, Queue,
    QueueError,
};
use crate::ConfigError;
use ::redis::Script;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// What a copy's arrival did, as the [`StatusStore`] decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Take {
    /// The copy is not the job's live one: drop it.
    Stale,
    /// There is no record of the job: its submit has not claimed it yet
    /// (the copy is published first), or the claim was refused.
    Missing,
    /// The job is leased under the new ticket, for this attempt.
    Leased {
        /// The attempt this lease is (1 for the first).
        attempts: u32,
    },
    /// The job was dead-lettered instead, with this reason.
    Dead {
        /// `ttl expired` or `max attempts (N) reached`.
        reason: String,
    },
}

/// What [`StatusStore::claim`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// A new record under the given ticket.
    Created,
    /// The key is held by this job with the same fingerprint.
    Existing(JobId),
    /// The key is held by this job for a different request.
    Conflict(JobId),
    /// The queue holds `capacity` unfinished jobs.
    Full,
}

/// What [`StatusStore::nack`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Nacked {
    /// The token is not the current lease.
    Lost,
    /// The job is queued again; its live copy is the new ticket.
    Queued,
    /// The job was out of attempts or time, and is dead-lettered with this
    /// reason.
    Dead(String),
}

/// A dead job as a [`StatusStore`] keeps it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadRecord {
    /// The job.
    pub id: JobId,
    /// Its stored envelope.
    pub envelope: Vec<u8>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// How many leases it had.
    pub attempts: u32,
    /// When, in wall-clock milliseconds.
    pub at_ms: u64,
}

impl DeadRecord {
    /// A dead record.
    pub fn new(id: JobId, envelope: Vec<u8>, reason: String, attempts: u32, at_ms: u64) -> Self {
        DeadRecord {
            id,
            envelope,
            reason,
            attempts,
            at_ms,
        }
    }
}

/// Where an [`AmqpQueue`] keeps what RabbitMQ cannot: each job's record,
/// its idempotency key, and the counts.
///
/// Every method is one atomic step on the store. A *ticket* names the one
/// copy of a job that is live in RabbitMQ; the lease token is the ticket
/// of the lease's timer copy.
pub trait StatusStore: Send + Sync + 'static {
    /// Creates the record of a new, queued job whose copy carries `ticket`,
    /// unless its key is held or the queue is full.
    fn claim(
        &self,
        id: &JobId,
        ticket: &str,
        job: &Job,
        envelope: &[u8],
        capacity: usize,
    ) -> impl Future<Output = Result<Claim, QueueError>> + Send;

    /// [`claim`](Self::claim), for a submit that gives up at `give_up`.
    ///
    /// A store that can should create nothing when it carries the claim
    /// out only after `give_up` (it was stalled, and its caller has already
    /// been told `Unavailable`), and fail with [`QueueError::Unavailable`]
    /// instead, leaving the record void so the copy is dropped as stale.
    /// [`RedisStatusStore`] does, on Redis's clock. The default calls
    /// `claim`, which cannot tell.
    fn claim_before(
        &self,
        id: &JobId,
        ticket: &str,
        job: &Job,
        envelope: &[u8],
        capacity: usize,
        give_up: Instant,
    ) -> impl Future<Output = Result<Claim, QueueError>> + Send {
        let _ = give_up;
        self.claim(id, ticket, job, envelope, capacity)
    }

    /// Undoes the claim of a submit that failed after its copy was
    /// published (the claim's answer lost or late, the submit cancelled):
    /// `Ok(true)` when the job can no longer be delivered (not claimed, or
    /// still queued under `ticket` and named to no caller: then voided and
    /// its key given back), `Ok(false)` when it may be (leased already, or
    /// found by a retry with its key). Default: `Ok(false)`, nothing undone.
    fn void_claim(
        &self,
        id: &JobId,
        ticket: &str,
    ) -> impl Future<Output = Result<bool, QueueError>> + Send {
        let _ = (id, ticket);
        async { Ok(false) }
    }

    /// A copy carrying `ticket` arrived: leases the job under `new_ticket`
    /// (already parked as the lease's timer), dead-letters it, or says the
    /// copy is stale.
    fn take(
        &self,
        id: &JobId,
        ticket: &str,
        new_ticket: &str,
        now_ms: u64,
        max_attempts: u32,
    ) -> impl Future<Output = Result<Take, QueueError>> + Send;

    /// Marks the job leased under `token` delivered, keeping `response`
    /// for `retention`. `false` when `token` is not the current lease.
    fn ack(
        &self,
        id: &JobId,
        token: &str,
        response: &DeliveredResponse,
        now_ms: u64,
        retention: Duration,
    ) -> impl Future<Output = Result<bool, QueueError>> + Send;

    /// Queues the job leased under `token` again, its live copy now
    /// `new_ticket`; or dead-letters it when it is out of attempts or time.
    fn nack(
        &self,
        id: &JobId,
        token: &str,
        new_ticket: &str,
        now_ms: u64,
        max_attempts: u32,
    ) -> impl Future<Output = Result<Nacked, QueueError>> + Send;

    /// Dead-letters the job leased under `token`. `false` when `token` is
    /// not the current lease.
    fn dead_letter(
        &self,
        id: &JobId,
        token: &str,
        reason: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, QueueError>> + Send;

    /// Queues a dead job again, attempts reset, its live copy `new_ticket`.
    /// Returns the envelope to publish, `None` when the job is not dead.
    fn redrive(
        &self,
        id: &JobId,
        new_ticket: &str,
        capacity: usize,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, QueueError>> + Send;

    /// The stored envelope of an unfinished or dead job.
    fn envelope(
        &self,
        id: &JobId,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, QueueError>> + Send;

    /// The job's status.
    fn status(
        &self,
        id: &JobId,
    ) -> impl Future<Output = Result<Option<JobStatus>, QueueError>> + Send;

    /// The number of unfinished jobs.
    fn depth(&self) -> impl Future<Output = Result<usize, QueueError>> + Send;

    /// The enqueue time (wall-clock ms) of the oldest unfinished job.
    fn oldest(&self) -> impl Future<Output = Result<Option<u64>, QueueError>> + Send;

    /// Up to `limit` dead jobs, oldest id first, with their envelopes.
    fn dead(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadRecord>, QueueError>> + Send;

    /// How many jobs are dead. The default reads up to 10,000 and counts.
    fn dead_count(&self) -> impl Future<Output = Result<usize, QueueError>> + Send {
        async { Ok(self.dead(10_000).await?.len()) }
    }

    /// Forgets up to `limit` jobs dead-lettered before `before_ms`
    /// (wall-clock ms): their records, their places in the dead list, and
    /// the idempotency keys they hold, as if they had never been stored.
    /// Returns how many it forgot. A redriven job is not dead and is not
    /// purged. The queue calls this with each `lease` when
    /// [`dead_letter_retention`](AmqpQueueBuilder::dead_letter_retention)
    /// is set.
    fn purge_dead(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<usize, QueueError>> + Send;
}

const PRELUDE: &str = r#"
local P = ARGV[1]
local function k(s) return P .. s end
local function to_dead(id, r, reason, now)
  redis.call('HSET', r, 'state', 'dead', 'reason', reason, 'at', now, 'ticket', '')
  redis.call('ZREM', k('q'), id)
  redis.call('ZADD', k('x'), 0, id)
  redis.call('ZADD', k('xt'), now, id)
end
"#;

/// ARGV: prefix, id, ticket, envelope, enq, deadline or '', key or '', fp,
/// cap, and the instant the submit gives up (µs on Redis's clock). Answers
/// `{what, id, TIME seconds, TIME µs}`; `what` is `late` (nothing created)
/// once `TIME` is past that instant (see `redis_clock`).
const CLAIM: &str = r#"
local id, ticket, env, enq, dl, key, fp, cap = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local t = redis.call('TIME')
local function answer(what, jid) return {what, jid, t[1], t[2]} end
-- A refused job's copy is already published: a short-lived tombstone
-- tells the lease that finds it to drop it.
local function void()
  redis.call('HSET', k('r:' .. id), 'state', 'void')
  redis.call('PEXPIRE', k('r:' .. id), 600000)
end
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[10]) then void() return answer('late', '') end
if key ~= '' then
  local cur = redis.call('HGET', k('i'), key)
  if cur then
    local cid = string.sub(cur, 1, 36)
    local st = redis.call('HGET', k('r:' .. cid), 'state')
    if st and st ~= 'void' then
      void()
      -- Named to a caller now: the undo of its own submit, if that failed,
      -- must leave it be.
      redis.call('HSET', k('r:' .. cid), 'pinned', 1)
      if string.sub(cur, 38) == fp then return answer('existing', cid) end
      return answer('conflict', cid)
    end
  end
end
if redis.call('ZCARD', k('q')) >= cap then void() return answer('full', '') end
redis.call('HSET', k('r:' .. id), 'state', 'queued', 'ticket', ticket, 'attempts', 0,
  'enq', enq, 'deadline', dl, 'job', env, 'key', key)
redis.call('ZADD', k('q'), enq, id)
if key ~= '' then redis.call('HSET', k('i'), key, id .. ' ' .. fp) end
return answer('created', id)
"#;

/// ARGV: prefix, id, ticket. Undoes a claim whose submit failed (see
/// `StatusStore::void_claim`): only while the job is still queued under
/// that ticket and no caller was told it exists. Returns 1 when the job can
/// no longer be delivered.
const VOID: &str = r#"
local id, ticket = ARGV[2], ARGV[3]
local r = k('r:' .. id)
local f = redis.call('HMGET', r, 'state', 'ticket', 'key', 'pinned')
if not f[1] or f[1] == 'void' then
  -- Not claimed (or refused): a tombstone, so the copy is dropped.
  redis.call('HSET', r, 'state', 'void')
  redis.call('PEXPIRE', r, 600000)
  return 1
end
if f[1] ~= 'queued' or f[2] ~= ticket or f[4] then return 0 end
redis.call('ZREM', k('q'), id)
if f[3] and f[3] ~= '' then
  local cur = redis.call('HGET', k('i'), f[3])
  if cur and string.sub(cur, 1, 36) == id then redis.call('HDEL', k('i'), f[3]) end
end
redis.call('DEL', r)
redis.call('HSET', r, 'state', 'void')
redis.call('PEXPIRE', r, 600000)
return 1
"#;

/// ARGV: prefix, id, ticket, new_ticket, now, max_attempts.
const TAKE: &str = r#"
local id, ticket, nt, now, max_att = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local r = k('r:' .. id)
local f = redis.call('HMGET', r, 'state', 'ticket', 'attempts', 'deadline')
if not f[1] then return {'missing', ''} end
if f[2] ~= ticket or (f[1] ~= 'queued' and f[1] ~= 'inflight') then return {'stale', ''} end
if f[4] ~= '' and tonumber(f[4]) <= now then
  to_dead(id, r, 'ttl expired', now)
  return {'dead', 'ttl expired'}
end
local att = tonumber(f[3])
if att >= max_att then
  local reason = 'max attempts (' .. max_att .. ') reached'
  to_dead(id, r, reason, now)
  return {'dead', reason}
end
redis.call('HSET', r, 'state', 'inflight', 'ticket', nt, 'attempts', att + 1)
return {'leased', tostring(att + 1)}
"#;

/// ARGV: prefix, id, token, now, retention, status, headers, body.
const ACK: &str = r#"
local id, token, now, ret = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local r = k('r:' .. id)
local f = redis.call('HMGET', r, 'state', 'ticket')
if f[1] ~= 'inflight' or f[2] ~= token then return 0 end
redis.call('HSET', r, 'state', 'delivered', 'ticket', '', 'status', ARGV[6], 'headers', ARGV[7],
  'body', ARGV[8], 'at', now)
redis.call('HDEL', r, 'job')
redis.call('PEXPIRE', r, math.max(ret, 1))
redis.call('ZREM', k('q'), id)
-- The key is released with the record, after retention: `ik` remembers
-- when, and each ack forgets a few keys whose record has gone (the index
-- grew by one entry per key ever used).
local key = redis.call('HGET', r, 'key')
if key and key ~= '' then redis.call('ZADD', k('ik'), now + math.max(ret, 1), key) end
for _, old in ipairs(redis.call('ZRANGEBYSCORE', k('ik'), '-inf', now, 'LIMIT', 0, 16)) do
  redis.call('ZREM', k('ik'), old)
  local cur = redis.call('HGET', k('i'), old)
  if cur then
    if redis.call('EXISTS', k('r:' .. string.sub(cur, 1, 36))) == 0 then
      redis.call('HDEL', k('i'), old)
    else
      -- Still held (claimed again, or the record's clock is behind ours):
      -- look again in a minute.
      redis.call('ZADD', k('ik'), now + 60000, old)
    end
  end
end
return 1
"#;

/// ARGV: prefix, id, token, new_ticket, now, max_attempts.
/// Returns {'lost'}, {'queued'} or {'dead', reason}.
const NACK: &str = r#"
local id, token, nt, now, max_att = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local r = k('r:' .. id)
local f = redis.call('HMGET', r, 'state', 'ticket', 'attempts', 'deadline')
if f[1] ~= 'inflight' or f[2] ~= token then return {'lost', ''} end
if f[4] ~= '' and tonumber(f[4]) <= now then
  to_dead(id, r, 'ttl expired', now)
  return {'dead', 'ttl expired'}
end
if tonumber(f[3]) >= max_att then
  local reason = 'max attempts (' .. max_att .. ') reached'
  to_dead(id, r, reason, now)
  return {'dead', reason}
end
redis.call('HSET', r, 'state', 'queued', 'ticket', nt)
return {'queued', ''}
"#;

/// ARGV: prefix, id, token, reason, now.
const DEAD: &str = r#"
local id, token = ARGV[2], ARGV[3]
local r = k('r:' .. id)
local f = redis.call('HMGET', r, 'state', 'ticket')
if f[1] ~= 'inflight' or f[2] ~= token then return 0 end
to_dead(id, r, ARGV[4], tonumber(ARGV[5]))
return 1
"#;

/// ARGV: prefix, id, new_ticket, cap. Returns {'ok', envelope}, {'no'} or {'full'}.
const REDRIVE: &str = r#"
local id, nt, cap = ARGV[2], ARGV[3], tonumber(ARGV[4])
local r = k('r:' .. id)
if redis.call('HGET', r, 'state') ~= 'dead' then return {'no', ''} end
if redis.call('ZCARD', k('q')) >= cap then return {'full', ''} end
redis.call('HSET', r, 'state', 'queued', 'ticket', nt, 'attempts', 0, 'reason', '')
redis.call('ZREM', k('x'), id)
redis.call('ZREM', k('xt'), id)
redis.call('ZADD', k('q'), redis.call('HGET', r, 'enq'), id)
return {'ok', redis.call('HGET', r, 'job')}
"#;

/// ARGV: prefix, before, limit. Returns how many dead jobs it forgot.
const PURGE: &str = r#"
local before, limit = ARGV[2], tonumber(ARGV[3])
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', k('xt'), '-inf', before, 'LIMIT', 0, limit)) do
  redis.call('ZREM', k('xt'), id)
  local r = k('r:' .. id)
  if redis.call('HGET', r, 'state') == 'dead' then
    local key = redis.call('HGET', r, 'key')
    redis.call('DEL', r)
    redis.call('ZREM', k('x'), id)
    if key and key ~= '' then
      local cur = redis.call('HGET', k('i'), key)
      if cur and string.sub(cur, 1, 36) == id then redis.call('HDEL', k('i'), key) end
    end
    n = n + 1
  end
end
return n
"#;

struct Scripts {
    purge: Script,
    claim: Script,
    void: Script,
    take: Script,
    ack: Script,
    nack: Script,
    dead: Script,
    redrive: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
    Scripts {
        purge: s(PURGE),
        claim: s(CLAIM),
        void: s(VOID),
        take: s(TAKE),
        ack: s(ACK),
        nack: s(NACK),
        dead: s(DEAD),
        redrive: s(REDRIVE),
    }
});

/// A [`StatusStore`] in Redis: a hash per job (`fba:{name}:r:<id>`, expiring
/// after retention once delivered), and per queue a sorted set of
/// unfinished jobs, a sorted set of dead ones and a hash of idempotency
/// keys (a delivered job's key is forgotten after retention, with its
/// record; a dead one's when it is purged). Each change is one Lua script.
#[derive(Clone)]
pub struct RedisStatusStore {
    conn: ConnectionManager,
    prefix: String,
    location: String,
    op_timeout: Duration,
    /// The last reading of Redis's clock, for claims' deadlines.
    clock: Arc<RedisClock>,
}

impl std::fmt::Debug for RedisStatusStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStatusStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl RedisStatusStore {
    /// Connects to Redis at `url` for the queue `name`, with a 500 ms
    /// bound on every operation.
    ///
    /// # Errors
    ///
    /// [`QueueError::Config`] for a bad URL or name,
    /// [`QueueError::Unavailable`] when Redis cannot be reached.
    pub async fn connect(url: &str, name: &str) -> Result<RedisStatusStore, QueueError> {
        Self::connect_with_timeout(url, name, Duration::from_millis(500)).await
    }

    /// [`connect`](Self::connect) with another bound on every operation.
    ///
    /// # Errors
    ///
    /// As for [`connect`](Self::connect).
    pub async fn connect_with_timeout(
        url: &str,
        name: &str,
        op_timeout: Duration,
    ) -> Result<RedisStatusStore, QueueError> {
        if name.is_empty() || name.contains(['{', '}']) {
            return Err(ConfigError::new("name", name, "must be non-empty, without braces").into());
        }
        let client = ::redis::Client::open(url)
            .map_err(|e| QueueError::from(ConfigError::new("url", url, e.to_string())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op_timeout))
            .set_response_timeout(Some(op_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        let conn = tokio::time::timeout(
            op_timeout,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| QueueError::unavailable(format!("connecting to {url} timed out")))?
        .map_err(QueueError::unavailable)?;
        let prefix = format!("fba:{{{name}}}:");
        Ok(RedisStatusStore {
            conn,
            location: format!("{url}#{prefix}"),
            prefix,
            op_timeout,
            clock: Arc::default(),
        })
    }

    fn corrupt(&self, what: impl Into<String>) -> QueueError {
        QueueError::corrupt(PathBuf::from(&self.location), what.into())
    }

    async fn run<T, Fut>(&self, f: Fut) -> Result<T, QueueError>
    where
        Fut: Future<Output = Result<T, ::redis::RedisError>>,
    {
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(r) => r.map_err(QueueError::unavailable),
            Err(_) => Err(QueueError::unavailable(format!(
                "redis did not answer within {:?}",
                self.op_timeout
            ))),
        }
    }

    async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        script: &'static Script,
        args: Vec<Vec<u8>>,
    ) -> Result<T, QueueError> {
        let mut c = self.conn.clone();
        let prefix = self.prefix.clone();
        self.run(async move {
            let mut inv = script.prepare_invoke();
            inv.arg(prefix);
            for a in &args {
                inv.arg(a.as_slice());
            }
            inv.invoke_async(&mut c).await
        })
        .await
    }

    fn parse_id(&self, s: &str) -> Result<JobId, QueueError> {
        s.parse()
            .map_err(|_| self.corrupt(format!("bad job id {s:?}")))
    }
}

fn arg(v: impl ToString) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

fn num<T: std::str::FromStr>(raw: Option<&[u8]>) -> Option<T> {
    std::str::from_utf8(raw?).ok()?.parse().ok()
}

impl StatusStore for RedisStatusStore {
    async fn claim(
        &self,
        id: &JobId,
        ticket: &str,
        job: &Job,
        envelope: &[u8],
        capacity: usize,
    ) -> Result<Claim, QueueError> {
        let give_up = crate::later(Instant::now(), self.op_timeout);
        self.claim_before(id, ticket, job, envelope, capacity, give_up)
            .await
    }

    /// Creates nothing if Redis runs the claim only after `give_up` (or
    /// after this store's own `op_timeout`, if sooner), on Redis's clock:
    /// see [`RedisQueue`](super::redis::RedisQueue)'s "Connection loss and
    /// stalls", which submits the same way.
    async fn claim_before(
        &self,
        id: &JobId,
        ticket: &str,
        job: &Job,
        envelope: &[u8],
        capacity: usize,
        give_up: Instant,
    ) -> Result<Claim, QueueError> {
        let fp = hex(&job.fingerprint());
        let args = [
            arg(id),
            arg(ticket),
            envelope.to_vec(),
            arg(job.enqueued_at_ms),
            job.deadline_ms().map(arg).unwrap_or_default(),
            job.idempotency_key()
                .unwrap_or_default()
                .as_bytes()
                .to_vec(),
            fp.into_bytes(),
            arg(capacity),
        ];
        let give_up = give_up.min(crate::later(Instant::now(), self.op_timeout));
        let (what, other) = self
            .clock
            // Once: a `late` claim leaves a void record for its id.
            .run_before(
                &self.conn,
                &SCRIPTS.claim,
                &self.prefix,
                &args,
                give_up,
                false,
            )
            .await
            .ok_or_else(|| {
                QueueError::unavailable("redis did not answer the claim before the submit gave up")
            })?
            .map_err(QueueError::unavailable)?;
        match what.as_str() {
            "created" => Ok(Claim::Created),
            "existing" => Ok(Claim::Existing(self.parse_id(&other)?)),
            "conflict" => Ok(Claim::Conflict(self.parse_id(&other)?)),
            "full" => Ok(Claim::Full),
            "late" => Err(QueueError::unavailable(
                "redis ran the claim after its deadline (a stall or a clock jump); nothing was \
                 stored",
            )),
            _ => Err(self.corrupt(format!("unexpected claim answer {what:?}"))),
        }
    }

    async fn void_claim(&self, id: &JobId, ticket: &str) -> Result<bool, QueueError> {
        let r: i64 = self
            .invoke(&SCRIPTS.void, vec![arg(id), arg(ticket)])
            .await?;
        Ok(r == 1)
    }

    async fn take(
        &self,
        id: &JobId,
        ticket: &str,
        new_ticket: &str,
        now_ms: u64,
        max_attempts: u32,
    ) -> Result<Take, QueueError> {
        let args = vec![
            arg(id),
            arg(ticket),
            arg(new_ticket),
            arg(now_ms),
            arg(max_attempts),
        ];
        let (what, other): (String, String) = self.invoke(&SCRIPTS.take, args).await?;
        match what.as_str() {
            "stale" => Ok(Take::Stale),
            "missing" => Ok(Take::Missing),
            "dead" => Ok(Take::Dead { reason: other }),
            "leased" => Ok(Take::Leased {
                attempts: other.parse().map_err(|_| self.corrupt("bad attempts"))?,
            }),
            _ => Err(self.corrupt(format!("unexpected take answer {what:?}"))),
        }
    }

    async fn ack(
        &self,
        id: &JobId,
        token: &str,
        response: &DeliveredResponse,
        now_ms: u64,
        retention: Duration,
    ) -> Result<bool, QueueError> {
        let headers: Vec<(&str, String)> = response
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), b64_encode(v.as_bytes())))
            .collect();
        let args = vec![
            arg(id),
            arg(token),
            arg(now_ms),
            arg(duration_ms(retention)),
            arg(response.status),
            serde_json::to_vec(&headers).expect("headers serialise"),
            response.body.to_vec(),
        ];
        let r: i64 = self.invoke(&SCRIPTS.ack, args).await?;
        Ok(r == 1)
    }

    async fn nack(
        &self,
        id: &JobId,
        token: &str,
        new_ticket: &str,
        now_ms: u64,
        max_attempts: u32,
    ) -> Result<Nacked, QueueError> {
        let args = vec![
            arg(id),
            arg(token),
            arg(new_ticket),
            arg(now_ms),
            arg(max_attempts),
        ];
        let (what, reason): (String, String) = self.invoke(&SCRIPTS.nack, args).await?;
        Ok(match what.as_str() {
            "queued" => Nacked::Queued,
            "dead" => Nacked::Dead(reason),
            _ => Nacked::Lost,
        })
    }

    async fn dead_letter(
        &self,
        id: &JobId,
        token: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<bool, QueueError> {
        let args = vec![arg(id), arg(token), arg(reason), arg(now_ms)];
        let r: i64 = self.invoke(&SCRIPTS.dead, args).await?;
        Ok(r == 1)
    }

    async fn redrive(
        &self,
        id: &JobId,
        new_ticket: &str,
        capacity: usize,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let args = vec![arg(id), arg(new_ticket), arg(capacity)];
        let (what, env): (String, Vec<u8>) = self.invoke(&SCRIPTS.redrive, args).await?;
        match what.as_str() {
            "ok" => Ok(Some(env)),
            "full" => Err(QueueError::Full { capacity }),
            _ => Ok(None),
        }
    }

    async fn envelope(&self, id: &JobId) -> Result<Option<Vec<u8>>, QueueError> {
        let key = format!("{}r:{id}", self.prefix);
        let mut c = self.conn.clone();
        self.run(async move {
            ::redis::cmd("HGET")
                .arg(&key)
                .arg("job")
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn status(&self, id: &JobId) -> Result<Option<JobStatus>, QueueError> {
        let key = format!("{}r:{id}", self.prefix);
        let mut c = self.conn.clone();
        let fields: Vec<(String, Vec<u8>)> = self
            .run(async move { ::redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await?;
        let Some(state) = field(&fields, "state").filter(|s| *s != b"void") else {
            return Ok(None);
        };
        let bad = |what: &str| self.corrupt(format!("record of job {id}: {what}"));
        let attempts = num(field(&fields, "attempts")).unwrap_or(0);
        let at = || {
            num::<u64>(field(&fields, "at"))
                .map(ms_system)
                .ok_or_else(|| bad("at"))
        };
        match state {
            b"queued" => Ok(Some(JobStatus::Queued)),
            b"inflight" => Ok(Some(JobStatus::InFlight)),
            b"dead" => Ok(Some(JobStatus::DeadLettered {
                reason: String::from_utf8_lossy(field(&fields, "reason").unwrap_or_default())
                    .into_owned(),
                attempts,
                at: at()?,
            })),
            b"delivered" => {
                let list: Vec<(String, String)> =
                    serde_json::from_slice(field(&fields, "headers").unwrap_or(b"[]"))
                        .map_err(|_| bad("headers"))?;
                let mut headers = HeaderMap::new();
                for (n, v) in list {
                    let v = b64_decode(&v).map_err(|_| bad("header value"))?;
                    headers.append(
                        HeaderName::from_bytes(n.as_bytes()).map_err(|_| bad("header name"))?,
                        HeaderValue::from_bytes(&v).map_err(|_| bad("header value"))?,
                    );
                }
                Ok(Some(JobStatus::Delivered {
                    status: num(field(&fields, "status")).ok_or_else(|| bad("status"))?,
                    headers,
                    body: Bytes::copy_from_slice(field(&fields, "body").unwrap_or_default()),
                    attempts,
                    delivered_at: at()?,
                }))
            }
            _ => Err(bad("unknown state")),
        }
    }

    async fn depth(&self) -> Result<usize, QueueError> {
        let key = format!("{}q", self.prefix);
        let mut c = self.conn.clone();
        self.run(async move { ::redis::cmd("ZCARD").arg(&key).query_async(&mut c).await })
            .await
    }

    async fn oldest(&self) -> Result<Option<u64>, QueueError> {
        let key = format!("{}q", self.prefix);
        let mut c = self.conn.clone();
        let v: Vec<(String, f64)> = self
            .run(async move {
                ::redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(v.first().map(|(_, at)| *at as u64))
    }

    async fn purge_dead(&self, before_ms: u64, limit: usize) -> Result<usize, QueueError> {
        self.invoke(&SCRIPTS.purge, vec![arg(before_ms), arg(limit)])
            .await
    }

    async fn dead_count(&self) -> Result<usize, QueueError> {
        let key = format!("{}x", self.prefix);
        let mut c = self.conn.clone();
        self.run(async move {
            ::redis::cmd("ZCARD")
                .arg(&key)
                .query_async::<usize>(&mut c)
                .await
        })
        .await
    }

    async fn dead(&self, limit: usize) -> Result<Vec<DeadRecord>, QueueError> {
        let key = format!("{}x", self.prefix);
        let mut c = self.conn.clone();
        let ids: Vec<String> = self
            .run(async move {
                ::redis::cmd("ZRANGEBYLEX")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let key = format!("{}r:{id}", self.prefix);
            let mut c = self.conn.clone();
            let fields: Vec<(String, Vec<u8>)> = self
                .run(async move { ::redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
                .await?;
            let id = self.parse_id(&id)?;
            out.push(DeadRecord::new(
                id,
                field(&fields, "job").unwrap_or_default().to_vec(),
                String::from_utf8_lossy(field(&fields, "reason").unwrap_or_default()).into_owned(),
                num(field(&fields, "attempts")).unwrap_or(0),
                num(field(&fields, "at")).unwrap_or(0),
            ));
        }
        Ok(out)
    }
}

/// A [`Queue`] on RabbitMQ with a [`StatusStore`]: see the
/// [module docs](self).
///
/// Clones share one connection. Handles made by separate
/// [`connect`](AmqpQueueBuilder::connect) calls with one name and one store
/// share one queue.
pub struct AmqpQueue<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for AmqpQueue<S> {
    fn clone(&self) -> Self {
        AmqpQueue {
            inner: self.inner.clone(),
        }
    }
}

impl<S> std::fmt::Debug for AmqpQueue<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpQueue")
            .field("queue", &self.inner.queue)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

/// The retry queue a delay of `ms` goes to: `ms` rounded up to two
/// significant digits. Never sooner than asked, at most 10 % later, and at
/// most 90 queues per decade of delay.
fn retry_bucket_ms(ms: u64) -> u64 {
    let mut scale = 1u64;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ms.div_ceil(scale).saturating_mul(scale)
}

struct Link {
    conn: Connection,
    channel: Channel,
    /// The retry queues declared on this link, by delay, and when.
    retry_queues: HashMap<u64, Instant>,
    /// Which connection this is, so that a feed knows when its own is gone.
    serial: u64,
}

struct LinkState {
    link: Option<Link>,
    retry_at: Option<Instant>,
    backoff: Duration,
    serial: u64,
}

/// The consumer that leases read from: its own channel on the link's
/// connection, with `basic.qos(prefetch)` and manual acks.
///
/// A copy the broker pushed ahead is *held*, not leased: it is unacked
/// here and invisible to other handles, and the job's record does not
/// change until a lease takes it. If the channel or connection goes, held
/// copies go back to the queue (at least once; stale ones are dropped when
/// they arrive again).
struct Feed {
    channel: Channel,
    consumer: Consumer,
    held: VecDeque<Delivery>,
    /// The link this feed's channel is on.
    link: u64,
    /// This feed, for its release task.
    serial: u64,
    /// When a lease last used it.
    used: Instant,
}

impl Feed {
    /// Moves every delivery the consumer has received into `held`. `false`
    /// when the consumer has ended or failed: the feed must be replaced.
    fn drain(&mut self) -> bool {
        while let Some(next) = self.consumer.next().now_or_never() {
            match next {
                Some(Ok(d)) => self.held.push_back(d),
                _ => return false,
            }
        }
        true
    }

    fn alive(&self, link: u64) -> bool {
        self.link == link && self.channel.status().connected()
    }
}

struct Inner<S> {
    url: String,
    queue: String,
    dlx: String,
    store: S,
    state: Mutex<LinkState>,
    feed: Arc<Mutex<Option<Feed>>>,
    feeds: AtomicU64,
    prefetch: u16,
    prefetch_hold: Duration,
    policy: Policy,
    format: Format,
    op_timeout: Duration,
    max_backoff: Duration,
    clock: Clock,
}

/// Settings for an [`AmqpQueue`].
#[derive(Clone, Debug)]
pub struct AmqpQueueBuilder {
    name: String,
    policy: Policy,
    format: Format,
    connect_timeout: Duration,
    op_timeout: Duration,
    max_backoff: Duration,
    prefetch: u16,
    prefetch_hold: Duration,
}

impl Default for AmqpQueueBuilder {
    fn default() -> Self {
        AmqpQueueBuilder {
            name: "default".to_owned(),
            policy: Policy::default(),
            format: Format::default(),
            connect_timeout: Duration::from_secs(2),
            op_timeout: Duration::from_millis(500),
            max_backoff: Duration::from_secs(2),
            prefetch: AmqpQueueBuilder::DEFAULT_PREFETCH,
            prefetch_hold: AmqpQueueBuilder::DEFAULT_PREFETCH_HOLD,
        }
    }
}

impl AmqpQueueBuilder {
    /// The default [`prefetch`](Self::prefetch): 32 copies.
    pub const DEFAULT_PREFETCH: u16 = 32;
    /// The default [`prefetch_hold`](Self::prefetch_hold): 2 s.
    pub const DEFAULT_PREFETCH_HOLD: Duration = Duration::from_secs(2);

    /// The queue's name: handles with one name share one queue. Default:
    /// `default`.
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

    /// How long a delivered job's status and response are kept. Default: 24 h.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.policy.retention = retention;
        self
    }

    /// How long a dead letter is kept before it is purged, with its
    /// record and its idempotency key. Default: until it is redriven.
    ///
    /// As with the disk queue, the purge is done by the sweep that runs
    /// with each `lease` ([`StatusStore::purge_dead`]), and time is the
    /// client's wall clock: a lease purges the dead letters that have been
    /// dead for longer than *its handle's* setting (a handle without the
    /// setting purges none), so the handles of a fleet should agree on it.
    ///
    /// The copy published to the dead-letter exchange for operators
    /// carries this as its per-message TTL (the `expiration` property), so
    /// RabbitMQ drops it from `fb.<name>.dead` about when the record goes
    /// (it expires messages at the head of the queue, so a copy can wait
    /// behind an older one with a longer TTL). It is not a queue argument
    /// (`x-message-ttl`): RabbitMQ cannot change a queue's arguments after
    /// it is declared, and declaring it again with others fails, so a
    /// queue argument would fix the setting forever at the first
    /// declaration. A redriven job's copy in `fb.<name>.dead` stays until
    /// it expires, as it stays forever without this setting.
    pub fn dead_letter_retention(mut self, retention: Duration) -> Self {
        self.policy.dead_letter_retention = Some(retention);
        self
    }

    /// The envelope format of stored jobs. Default: JSON.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// How long the first connection (made by
    /// [`connect`](Self::connect), with the declarations) may take.
    /// Default: 2 s. Reconnecting later happens inside an operation, within
    /// its [`op_timeout`](Self::op_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The bound on every operation, reconnecting included. Default: 500 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// The longest pause between two reconnect attempts. Default: 2 s.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// How many copies RabbitMQ may push ahead to this handle's consumer
    /// (`basic.qos` prefetch count) before a lease takes them. Default:
    /// [32](Self::DEFAULT_PREFETCH), twice the replayer's default batch,
    /// so that one lease call usually finds its batch already here and
    /// costs no round trip to fetch it.
    ///
    /// Copies pushed ahead are held unacked by this handle and no other
    /// handle sees them until they are leased here, the handle stops
    /// leasing for [`prefetch_hold`](Self::prefetch_hold), or its
    /// connection goes. A larger value saves round trips for large
    /// batches; a smaller one spreads a short queue more evenly over a
    /// fleet. Must be above zero.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// How long copies pushed ahead to this handle wait for a lease call
    /// before they are given back to the queue for other handles (the
    /// consumer is cancelled; the next lease starts a new one). Default:
    /// [2 s](Self::DEFAULT_PREFETCH_HOLD). This bounds how long a replayer
    /// that pauses (an open breaker) keeps jobs from the rest of the
    /// fleet, and keeps held copies far below RabbitMQ's
    /// `consumer_timeout` (30 min by default). Must be above zero.
    pub fn prefetch_hold(mut self, hold: Duration) -> Self {
        self.prefetch_hold = hold;
        self
    }

    /// Checks the settings, connects to RabbitMQ at `url` (for example
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`) and declares the queues
    /// and the dead-letter exchange.
    ///
    /// # Errors
    ///
    /// [`QueueError::Config`] for bad settings, [`QueueError::Unavailable`]
    /// when RabbitMQ cannot be reached.
    pub async fn connect<S: StatusStore>(
        self,
        url: &str,
        store: S,
    ) -> Result<AmqpQueue<S>, QueueError> {
        self.policy.validate()?;
        if self.name.is_empty() {
            return Err(ConfigError::new("name", &self.name, "must be non-empty").into());
        }
        if self.prefetch == 0 {
            return Err(ConfigError::new("prefetch", self.prefetch, "must be above zero").into());
        }
        if self.prefetch_hold.is_zero() {
            return Err(ConfigError::new(
                "prefetch_hold",
                self.prefetch_hold,
                "must be above zero",
            )
            .into());
        }
        let queue = AmqpQueue {
            inner: Arc::new(Inner {
                url: url.to_owned(),
                queue: format!("fb.{}", self.name),
                dlx: format!("fb.{}.dlx", self.name),
                store,
                state: Mutex::new(LinkState {
                    link: None,
                    retry_at: None,
                    backoff: Duration::from_millis(10),
                    serial: 0,
                }),
                feed: Arc::new(Mutex::new(None)),
                feeds: AtomicU64::new(0),
                prefetch: self.prefetch,
                prefetch_hold: self.prefetch_hold,
                policy: self.policy,
                format: self.format,
                op_timeout: self.op_timeout,
                max_backoff: self.max_backoff,
                clock: Clock::new(),
            }),
        };
        queue.channel_within(self.connect_timeout).await?;
        Ok(queue)
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<String> {
    let headers: &'a FieldTable = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Undoes a submit whose copy is published but whose claim did not answer:
/// a submit that gets an error undoes itself; one dropped (its
/// `op_timeout` passed while Redis was slow or its answer was lost) leaves
/// the undo to a task spawned here. The undo voids the job unless a lease
/// took it or a retry with its key was told it exists
/// ([`StatusStore::void_claim`]), so a 503 is not followed by a delivery.
struct Undo<S: StatusStore> {
    /// `None` once the submit has its answer.
    queue: Option<AmqpQueue<S>>,
    id: JobId,
    ticket: String,
}

impl<S: StatusStore> Drop for Undo<S> {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let (id, ticket) = (self.id, std::mem::take(&mut self.ticket));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = queue.inner.store.void_claim(&id, &ticket).await;
            });
        }
    }
}

/// A header a copy may carry besides its id and ticket.
#[derive(Clone, Copy)]
enum Extra<'a> {
    /// Why the job is dead (copies sent to the dead-letter exchange).
    Reason(&'a str),
    /// How many times a copy without a record has been put back, and the
    /// claim window it carries (see `Window`).
    Orphan(u32, u64),
    /// A submit's copy: how long (ms) its claim may still land after the
    /// copy is published (the submitter's `op_timeout`), so that a handle
    /// that finds the copy before its record keeps putting it back for at
    /// least that long, whatever its own settings.
    Window(u64),
}

/// How often a link declares a retry queue again while it uses it (see
/// `retry_queue`): well within the 60 s its `x-expires` adds to the delay.
const REDECLARE_RETRY_QUEUE: Duration = Duration::from_secs(30);

/// How many times, and how far apart, a copy that arrives before its
/// job's record is put back before it is dropped (at least: see
/// `orphan_retries`).
const ORPHAN_RETRIES: u32 = 5;
const ORPHAN_DELAY_MS: u64 = 200;

/// How many times an orphan copy is put back: enough looks, ORPHAN_DELAY_MS
/// apart at least, to outlast a claim `window_ms` long, and never fewer
/// than ORPHAN_RETRIES.
fn orphan_retries(window_ms: u64) -> u32 {
    let needed = window_ms.div_ceil(ORPHAN_DELAY_MS).saturating_add(1);
    u32::try_from(needed)
        .unwrap_or(u32::MAX)
        .max(ORPHAN_RETRIES)
}

/// Gives the copies a feed holds back to the queue once no lease has used
/// it for `hold`, by closing its channel (the consumer goes with it); ends
/// when the feed is replaced or the queue handle is dropped.
async fn release_when_idle(feed: Weak<Mutex<Option<Feed>>>, serial: u64, hold: Duration) {
    loop {
        tokio::time::sleep(hold / 2).await;
        let Some(feed) = feed.upgrade() else {
            return;
        };
        let mut slot = feed.lock().await;
        let Some(f) = slot.as_mut().filter(|f| f.serial == serial) else {
            return;
        };
        let alive = f.drain();
        // An idle consumer that holds nothing costs nothing; keep it.
        if alive && (f.held.is_empty() || f.used.elapsed() < hold) {
            continue;
        }
        if let Some(f) = slot.take() {
            drop(slot);
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                f.channel
                    .close(200, "idle: prefetched copies given back".into()),
            )
            .await;
        }
        return;
    }
}

fn new_ticket() -> String {
    format!("{:032x}", uuid::Uuid::now_v7().as_u128())
}

impl AmqpQueue<RedisStatusStore> {
    /// Settings for a new queue handle. The status store, of any
    /// [`StatusStore`] type, is given to
    /// [`connect`](AmqpQueueBuilder::connect).
    pub fn builder() -> AmqpQueueBuilder {
        AmqpQueueBuilder::default()
    }
}

impl<S: StatusStore> AmqpQueue<S> {
    /// The status store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    async fn open(&self) -> Result<Link, lapin::Error> {
        let conn = Connection::connect(&self.inner.url, ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .queue_declare(
                self.inner.queue.as_str().into(),
                durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.inner.dlx.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let dead = format!("{}.dead", self.inner.queue);
        channel
            .queue_declare(dead.as_str().into(), durable(), FieldTable::default())
            .await?;
        channel
            .queue_bind(
                dead.as_str().into(),
                self.inner.dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Link {
            conn,
            channel,
            retry_queues: HashMap::new(),
            serial: 0,
        })
    }

    /// The channel, reconnecting when there is none and the backoff has
    /// passed.
    async fn channel(&self) -> Result<Channel, QueueError> {
        self.channel_within(self.inner.op_timeout).await
    }

    async fn channel_within(&self, timeout: Duration) -> Result<Channel, QueueError> {
        let mut st = self.inner.state.lock().await;
        if let Some(link) = &st.link
            && link.channel.status().connected()
        {
            return Ok(link.channel.clone());
        }
        st.link = None;
        if let Some(at) = st.retry_at
            && Instant::now() < at
        {
            return Err(QueueError::unavailable(
                "RabbitMQ is unreachable; waiting to reconnect",
            ));
        }
        match tokio::time::timeout(timeout, self.open()).await {
            Ok(Ok(mut link)) => {
                let ch = link.channel.clone();
                st.serial += 1;
                link.serial = st.serial;
                st.link = Some(link);
                st.retry_at = None;
                st.backoff = Duration::from_millis(10);
                Ok(ch)
            }
            failed => {
                st.retry_at = Some(crate::later(Instant::now(), st.backoff));
                st.backoff = (st.backoff * 2).min(self.inner.max_backoff);
                Err(match failed {
                    Ok(Err(e)) => QueueError::unavailable(e),
                    _ => QueueError::unavailable("connecting to RabbitMQ timed out"),
                })
            }
        }
    }

    /// Drops the link after a failure on it, and the feed with it: copies
    /// it held, and any a failed lease had taken but not acked, go back to
    /// the queue when its channel closes.
    async fn broken(&self) {
        let mut st = self.inner.state.lock().await;
        st.link = None;
        drop(st);
        // A failing submit must not wait for a lease that holds the feed:
        // that lease fails too and comes here itself, or finishes, and the
        // next lease finds the feed on a link that is gone and replaces it.
        if let Ok(mut feed) = self.inner.feed.try_lock() {
            feed.take();
        }
    }

    /// The feed that leases read from, started on this link if there is
    /// none (the first lease, or after a failure or a release).
    async fn feed<'a>(&self, slot: &'a mut Option<Feed>) -> Result<&'a mut Feed, QueueError> {
        let link = {
            let st = self.inner.state.lock().await;
            st.link.as_ref().map(|l| l.serial)
        };
        if let (Some(f), Some(link)) = (slot.as_ref(), link)
            && f.alive(link)
        {
            return Ok(slot.as_mut().expect("checked"));
        }
        *slot = None;
        let (channel, link) = {
            let st = self.inner.state.lock().await;
            let Some(l) = st.link.as_ref() else {
                return Err(QueueError::unavailable("the RabbitMQ link was lost"));
            };
            (
                l.conn
                    .create_channel()
                    .await
                    .map_err(QueueError::unavailable)?,
                l.serial,
            )
        };
        channel
            .basic_qos(self.inner.prefetch, BasicQosOptions::default())
            .await
            .map_err(QueueError::unavailable)?;
        let consumer = channel
            .basic_consume(
                self.inner.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(QueueError::unavailable)?;
        let serial = self.inner.feeds.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(release_when_idle(
            Arc::downgrade(&self.inner.feed),
            serial,
            self.inner.prefetch_hold,
        ));
        Ok(slot.insert(Feed {
            channel,
            consumer,
            held: VecDeque::new(),
            link,
            serial,
            used: Instant::now(),
        }))
    }

    /// The retry queue for `delay_ms`, declared (again) when this link has
    /// not declared it within [`REDECLARE_RETRY_QUEUE`].
    ///
    /// A retry queue has no consumer, so RabbitMQ counts it as unused and
    /// deletes it, messages and all, `x-expires` after its last declare:
    /// publishing does not count as use. Declaring it again at least every
    /// 30 s keeps it for the delay of anything parked in it (`x-expires` is
    /// the delay + 60 s).
    async fn retry_queue(&self, channel: &Channel, delay_ms: u64) -> Result<String, QueueError> {
        let name = format!("{}.retry.{delay_ms}", self.inner.queue);
        {
            let st = self.inner.state.lock().await;
            if st.link.as_ref().is_some_and(|l| {
                l.retry_queues
                    .get(&delay_ms)
                    .is_some_and(|at| at.elapsed() < REDECLARE_RETRY_QUEUE)
            }) {
                return Ok(name);
            }
        }
        let declared_at = Instant::now();
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay_ms as i64),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.inner.queue.as_str().into()),
        );
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(delay_ms as i64 + 60_000),
        );
        channel
            .queue_declare(name.as_str().into(), durable(), args)
            .await
            .map_err(QueueError::unavailable)?;
        let mut st = self.inner.state.lock().await;
        if let Some(l) = st.link.as_mut() {
            l.retry_queues.insert(delay_ms, declared_at);
        }
        Ok(name)
    }

    /// Parks a copy in the retry queue of `delay_ms`. The publish is
    /// mandatory: a retry queue that is gone (expired, deleted by an
    /// operator) returns the message instead of dropping it, and is then
    /// declared again for one more try.
    #[allow(clippy::too_many_arguments)]
    async fn park(
        &self,
        channel: &Channel,
        delay_ms: u64,
        id: &JobId,
        ticket: &str,
        envelope: &[u8],
        extra: Option<Extra<'_>>,
    ) -> Result<(), QueueError> {
        for _ in 0..2 {
            let queue = self.retry_queue(channel, delay_ms).await?;
            if self
                .publish_to(channel, "", &queue, id, ticket, envelope, extra, true)
                .await?
            {
                return Ok(());
            }
            let mut st = self.inner.state.lock().await;
            if let Some(l) = st.link.as_mut() {
                l.retry_queues.remove(&delay_ms);
            }
        }
        Err(QueueError::unavailable(format!(
            "RabbitMQ returned the copy of job {id} parked for {delay_ms} ms: its retry queue is missing"
        )))
    }

    /// Publishes a persistent copy of a job, waiting for the broker's
    /// confirm: to the main queue, or parked in the retry queue of `delay`.
    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        channel: &Channel,
        id: &JobId,
        ticket: &str,
        envelope: &[u8],
        delay: Duration,
        extra: Option<Extra<'_>>,
    ) -> Result<(), QueueError> {
        let delay_ms = retry_bucket_ms(duration_ms(delay));
        if delay_ms > 0 {
            return self
                .park(channel, delay_ms, id, ticket, envelope, extra)
                .await;
        }
        let queue = self.inner.queue.clone();
        if self
            .publish_to(channel, "", &queue, id, ticket, envelope, extra, true)
            .await?
        {
            Ok(())
        } else {
            Err(QueueError::unavailable(format!(
                "RabbitMQ returned the copy of job {id}: the queue {queue} is missing"
            )))
        }
    }

    /// Publishes a copy and waits for the broker's confirm: `Ok(false)` when
    /// a `mandatory` copy came back unroutable (its queue is missing).
    #[allow(clippy::too_many_arguments)]
    async fn publish_to(
        &self,
        channel: &Channel,
        exchange: &str,
        key: &str,
        id: &JobId,
        ticket: &str,
        envelope: &[u8],
        extra: Option<Extra<'_>>,
        mandatory: bool,
    ) -> Result<bool, QueueError> {
        let mut headers = FieldTable::default();
        headers.insert("fb-id".into(), AMQPValue::LongString(id.to_string().into()));
        headers.insert("fb-ticket".into(), AMQPValue::LongString(ticket.into()));
        let is_dead = matches!(extra, Some(Extra::Reason(_)));
        match extra {
            Some(Extra::Reason(reason)) => {
                headers.insert("fb-reason".into(), AMQPValue::LongString(reason.into()));
            }
            Some(Extra::Orphan(n, _)) => {
                headers.insert(
                    "fb-orphan".into(),
                    AMQPValue::LongString(n.to_string().into()),
                );
            }
            Some(Extra::Window(_)) | None => {}
        }
        if let Some(Extra::Orphan(_, window) | Extra::Window(window)) = extra {
            headers.insert(
                "fb-window".into(),
                AMQPValue::LongString(window.to_string().into()),
            );
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        if is_dead && let Some(r) = self.inner.policy.dead_letter_retention {
            props = props.with_expiration(duration_ms(r).to_string().as_str().into());
        }
        let confirm = channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(key),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                envelope,
                props,
            )
            .await
            .map_err(QueueError::unavailable)?
            .await
            .map_err(QueueError::unavailable)?;
        if confirm.is_ack() {
            Ok(confirm.take_message().is_none())
        } else {
            Err(QueueError::unavailable(
                "RabbitMQ refused the message (nack)",
            ))
        }
    }

    /// Publishes a dead job to the dead-letter exchange, for operators.
    /// The status store stays the record of dead letters.
    async fn to_dlx(&self, channel: &Channel, id: &JobId, envelope: &[u8], reason: &str) {
        let _ = self
            .publish_to(
                channel,
                &self.inner.dlx.clone(),
                "",
                id,
                "",
                envelope,
                Some(Extra::Reason(reason)),
                false,
            )
            .await;
    }

    async fn bounded<T>(
        &self,
        f: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        let r = match tokio::time::timeout(self.inner.op_timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(QueueError::unavailable(format!(
                "RabbitMQ did not answer within {:?}",
                self.inner.op_timeout
            ))),
        };
        if matches!(r, Err(QueueError::Unavailable { .. })) {
            self.broken().await;
        }
        r
    }

    /// `give_up` is when [`bounded`](Self::bounded) gives up on this call:
    /// the claim must create nothing after it.
    async fn submit_inner(&self, mut job: Job, give_up: Instant) -> Result<Enqueued, QueueError> {
        let channel = self.channel().await?;
        job.enqueued_at_ms = self.inner.clock.now_ms();
        job.attempts = 0;
        let id = JobId::new();
        let ticket = new_ticket();
        let envelope = self.inner.format.encode(&job);
        // The copy first: if the claim then fails, the copy is stale. It
        // carries how long the claim may still land.
        let window = Extra::Window(duration_ms(self.inner.op_timeout));
        self.publish(
            &channel,
            &id,
            &ticket,
            &envelope,
            Duration::ZERO,
            Some(window),
        )
        .await?;
        // From here a submit that fails, or is dropped (its `op_timeout`
        // passed), is undone: see `Undo`.
        let mut undo = Undo {
            queue: Some(self.clone()),
            id,
            ticket: ticket.clone(),
        };
        let claimed = self
            .inner
            .store
            .claim_before(
                &id,
                &ticket,
                &job,
                &envelope,
                self.inner.policy.capacity,
                give_up,
            )
            .await;
        undo.queue = None;
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                // The claim may have run with its answer lost: best
                // effort, as a claim that did not run is refused by its
                // own deadline.
                let _ = self.inner.store.void_claim(&id, &ticket).await;
                return Err(e);
            }
        };
        match claimed {
            Claim::Created => Ok(Enqueued::Created(id)),
            Claim::Existing(e) => Ok(Enqueued::Existing(e)),
            Claim::Conflict(existing) => Err(QueueError::Conflict {
                key: job.idempotency_key.unwrap_or_default(),
                existing,
            }),
            Claim::Full => Err(QueueError::Full {
                capacity: self.inner.policy.capacity,
            }),
        }
    }

    async fn lease_inner(
        &self,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Leased>, QueueError> {
        let channel = self.channel().await?;
        // One lease at a time per handle: the feed's held copies and its
        // acks must not be shared between two calls.
        let mut slot = self.inner.feed.lock().await;
        let feed = self.feed(&mut slot).await?;
        feed.used = Instant::now();
        let mut out = Vec::new();
        // Stale copies do not count; bound the work of one call. Each job
        // costs a few round trips, so a large batch stops at half the
        // operation's time budget and returns what it has: leases taken
        // and then lost to the timeout would only come back after their
        // visibility timeout.
        let started = Instant::now();
        let mut budget = max.saturating_mul(4).saturating_add(64);
        // Whether copies were acked (so the broker may have pushed more)
        // since the last sync; the first pass always syncs if it must.
        let mut moved = true;
        while out.len() < max && budget > 0 && started.elapsed() <= self.inner.op_timeout / 2 {
            if !feed.drain() {
                return Err(QueueError::unavailable(
                    "the RabbitMQ consumer was cancelled",
                ));
            }
            if feed.held.is_empty() {
                if !moved {
                    break;
                }
                // Two round trips on the consumer's channel. RabbitMQ's
                // queue sends the channel every copy it pushes to this
                // consumer (after an ack frees room, or as soon as a job
                // is ready) before it answers the first; the channel may
                // write that answer out before those copies, but writes
                // them before it answers the second. lapin hands each copy
                // to the consumer before it resolves the answer after it,
                // so afterwards `held` has every copy that was ready for
                // this consumer when we asked. (With one round trip, a
                // batch larger than the prefetch stopped at the window.)
                for _ in 0..2 {
                    feed.channel
                        .queue_declare(
                            self.inner.queue.as_str().into(),
                            QueueDeclareOptions {
                                passive: true,
                                ..QueueDeclareOptions::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                        .map_err(QueueError::unavailable)?;
                }
                moved = false;
                continue;
            }
            let n = feed.held.len().min(max - out.len()).min(budget);
            budget -= n;
            let batch: Vec<Delivery> = feed.held.drain(..n).collect();
            // The copies of one batch are taken concurrently: their
            // publishes share the channel's confirms, their store calls
            // the store's connection.
            let taken = join_all(
                batch
                    .into_iter()
                    .map(|d| self.take_copy(&channel, d, visibility)),
            )
            .await;
            moved = true;
            for t in taken {
                if let Some(leased) = t? {
                    out.push(leased);
                }
            }
        }
        feed.used = Instant::now();
        Ok(out)
    }

    /// Takes one copy from the feed: leases its job, dead-letters it, puts
    /// an orphan back, or drops a stale copy; then acks it.
    async fn take_copy(
        &self,
        channel: &Channel,
        d: Delivery,
        visibility: Duration,
    ) -> Result<Option<Leased>, QueueError> {
        let id = header(&d.properties, "fb-id").and_then(|s| s.parse::<JobId>().ok());
        let ticket = header(&d.properties, "fb-ticket").unwrap_or_default();
        let Some(id) = id else {
            d.acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(QueueError::unavailable)?;
            return Ok(None);
        };
        let next = new_ticket();
        // The lease's timer goes out before the record points at it.
        self.publish(channel, &id, &next, &d.data, visibility, None)
            .await?;
        let taken = self
            .inner
            .store
            .take(
                &id,
                &ticket,
                &next,
                self.inner.clock.now_ms(),
                self.inner.policy.max_attempts,
            )
            .await?;
        let mut out = None;
        match taken {
            Take::Stale => {}
            Take::Missing => {
                // Published by a submit that has not written its record
                // yet, or whose claim was refused: look again a little
                // later, for as long as the claim may still land (the
                // window the copy carries; each look is at least
                // ORPHAN_DELAY_MS later), then drop it.
                let orphan: u32 = header(&d.properties, "fb-orphan")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let window: u64 = header(&d.properties, "fb-window")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if orphan < orphan_retries(window) {
                    self.park(
                        channel,
                        ORPHAN_DELAY_MS,
                        &id,
                        &ticket,
                        &d.data,
                        Some(Extra::Orphan(orphan + 1, window)),
                    )
                    .await?;
                }
            }
            Take::Dead { reason } => self.to_dlx(channel, &id, &d.data, &reason).await,
            Take::Leased { attempts } => match self.inner.format.decode(&d.data) {
                Ok(mut job) => {
                    job.attempts = attempts;
                    out = Some(Leased::new(Lease::new(id, next), job));
                }
                // Written by a newer version, say: dead-lettered as it is,
                // rather than failing this lease and every next one.
                Err(e) => {
                    let why = super::corrupt_record(&id, &e);
                    let now = self.inner.clock.now_ms();
                    match self.inner.store.dead_letter(&id, &next, &why, now).await {
                        Ok(true) => self.to_dlx(channel, &id, &d.data, &why).await,
                        Ok(false) => {}
                        // Its lease timer brings it back; the batch's other
                        // jobs are held by now.
                        Err(e) => {
                            tracing::warn!(target: "tower_firebreak", layer = "queue", job_id = %id, error = %e, "dead-lettering an undecodable job failed");
                        }
                    }
                }
            },
        }
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(QueueError::unavailable)?;
        Ok(out)
    }

    async fn nack_inner(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        let channel = self.channel().await?;
        let id = lease.id();
        let envelope = self.envelope(id).await?;
        let next = new_ticket();
        self.publish(&channel, id, &next, &envelope, delay, None)
            .await?;
        match self
            .inner
            .store
            .nack(
                id,
                lease.token(),
                &next,
                self.inner.clock.now_ms(),
                self.inner.policy.max_attempts,
            )
            .await?
        {
            Nacked::Lost => Err(QueueError::LeaseLost { id: *id }),
            Nacked::Queued => Ok(()),
            Nacked::Dead(reason) => {
                self.to_dlx(&channel, id, &envelope, &reason).await;
                Ok(())
            }
        }
    }

    async fn envelope(&self, id: &JobId) -> Result<Vec<u8>, QueueError> {
        self.inner
            .store
            .envelope(id)
            .await?
            .ok_or(QueueError::LeaseLost { id: *id })
    }
}

impl<S: StatusStore> Queue for AmqpQueue<S> {
    async fn submit(&self, job: Job) -> Result<Enqueued, QueueError> {
        // `bounded` gives up `op_timeout` after its first poll: now.
        let give_up = crate::later(Instant::now(), self.inner.op_timeout);
        self.bounded(self.submit_inner(job, give_up)).await
    }

    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Leased>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        if let Some(r) = self.inner.policy.dead_letter_retention {
            let before = self.inner.clock.now_ms().saturating_sub(duration_ms(r));
            self.bounded(self.inner.store.purge_dead(before, 1024))
                .await?;
        }
        self.bounded(self.lease_inner(max, visibility)).await
    }

    async fn ack(&self, lease: &Lease, response: DeliveredResponse) -> Result<(), QueueError> {
        let ok = self
            .bounded(self.inner.store.ack(
                lease.id(),
                lease.token(),
                &response,
                self.inner.clock.now_ms(),
                self.inner.policy.retention,
            ))
            .await?;
        if ok {
            Ok(())
        } else {
            Err(QueueError::LeaseLost { id: *lease.id() })
        }
    }

    async fn nack(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        self.bounded(self.nack_inner(lease, delay)).await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), QueueError> {
        self.bounded(async {
            let id = lease.id();
            let now = self.inner.clock.now_ms();
            if !self
                .inner
                .store
                .dead_letter(id, lease.token(), reason, now)
                .await?
            {
                return Err(QueueError::LeaseLost { id: *id });
            }
            if let (Ok(channel), Ok(Some(envelope))) =
                (self.channel().await, self.inner.store.envelope(id).await)
            {
                self.to_dlx(&channel, id, &envelope, reason).await;
            }
            Ok(())
        })
        .await
    }

    async fn status(&self, id: &JobId) -> Result<Option<JobStatus>, QueueError> {
        self.bounded(self.inner.store.status(id)).await
    }

    async fn depth(&self) -> Result<usize, QueueError> {
        self.bounded(self.inner.store.depth()).await
    }

    async fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        let oldest = self.bounded(self.inner.store.oldest()).await?;
        let now = self.inner.clock.now_ms();
        Ok(oldest.map(|at| Duration::from_millis(now.saturating_sub(at))))
    }

    async fn dead_letter_count(&self) -> Result<usize, QueueError> {
        self.bounded(self.inner.store.dead_count()).await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        let rows = self.bounded(self.inner.store.dead(limit)).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            // One dead-lettered because it does not decode is left out (its
            // status says why).
            let Ok(mut job) = self.inner.format.decode(&r.envelope) else {
                continue;
            };
            job.attempts = r.attempts;
            out.push(DeadLetter::new(r.id, job, r.reason, ms_system(r.at_ms)));
        }
        Ok(out)
    }

    async fn redrive(&self, id: &JobId) -> Result<bool, QueueError> {
        self.bounded(async {
            let channel = self.channel().await?;
            let Some(envelope) = self.inner.store.envelope(id).await? else {
                return Ok(false);
            };
            let next = new_ticket();
            // The copy first; if the job turns out not to be dead, it is stale.
            self.publish(&channel, id, &next, &envelope, Duration::ZERO, None)
                .await?;
            Ok(self
                .inner
                .store
                .redrive(id, &next, self.inner.policy.capacity)
                .await?
                .is_some())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::retry_bucket_ms;

    #[test]
    fn delays_round_up_to_two_significant_digits() {
        for (ms, bucket) in [
            (0, 0),
            (1, 1),
            (99, 99),
            (100, 100),
            (101, 110),
            (1201, 1300),
            (1234, 1300),
            (4321, 4400),
            (9999, 10_000),
            (30_000, 30_000),
            (128_000, 130_000),
            (u64::MAX, u64::MAX),
        ] {
            assert_eq!(retry_bucket_ms(ms), bucket, "{ms} ms");
        }
        // Never sooner, at most 10 % later.
        for ms in (1..200_000).step_by(7) {
            let b = retry_bucket_ms(ms);
            assert!(b >= ms && b * 10 <= ms * 11, "{ms} ms -> {b} ms");
        }
    }
}
