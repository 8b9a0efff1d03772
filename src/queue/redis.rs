//! [`RedisQueue`]: a [`Queue`] on Redis Streams, shared by a fleet.
//!
//! # Layout
//!
//! Every key of a queue named `orders` starts with `fb:{orders}:` (the
//! braces are a cluster hash tag: all of a queue's keys live in one slot).
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `s` | stream, consumer group `fb` | one entry per job ready to lease, in enqueue order |
//! | `j`, `a`, `t` | hashes | the encoded job, its attempts, its TTL deadline, by job id |
//! | `e`, `l` | hashes | the job's current stream entry; its current lease token |
//! | `q` | sorted set | unfinished jobs by enqueue time: depth, oldest age, capacity |
//! | `d` | sorted set | nacked jobs by the time they become visible again |
//! | `i`, `k` | hashes | idempotency key → job id and fingerprint, and back |
//! | `x`, `xe` | stream, hash | the dead-letter stream, and each dead job's entry in it |
//! | `st:<id>` | hash with a TTL | a finished job's status: the delivered response (expires after `retention`) or the dead-letter reason |
//! | `p` | sorted set | delivered jobs by the time their idempotency key is released |
//! | `xt` | sorted set | dead jobs by the time they were dead-lettered, for `dead_letter_retention` |
//! | `xi` | sorted set, every score 0 | dead jobs by id, so that `dead_letters(limit)` reads only the first `limit` |
//! | `c` | string | where the last lease's scan for expired leases stopped |
//!
//! A lease is a stream entry pending in the consumer group. When a job is
//! leased for `visibility`, its entry's idle time is set so that
//! `XAUTOCLAIM` with a fixed minimum idle time of 30 days claims it exactly
//! `visibility` later: that is how an expired lease comes back, and why a
//! visibility timeout can be at most 30 days. Each handle is a consumer of
//! the group; consumers idle for
//! [`idle_consumer_ttl`](RedisQueueBuilder::idle_consumer_ttl) (1 h) with
//! no pending entry are deleted by other handles' leases. Each operation
//! is one Lua script, so it applies whole or not at all, and many handles
//! (a fleet of replicas) can share one queue.
//!
//! # Durability
//!
//! `submit` returns once Redis has run the script and answered. Whether
//! the job then survives a Redis restart is Redis's persistence setting,
//! not this crate's:
//!
//! - `appendonly yes` with `appendfsync always`: Redis fsyncs the AOF
//!   before it answers, so an acknowledged job survives a crash of Redis or
//!   of the machine. This is the setting that matches
//!   [`DiskQueue`](super::disk::DiskQueue).
//! - `appendfsync everysec` (Redis's AOF default): up to about a second of
//!   acknowledged jobs can be lost if the machine crashes.
//! - No AOF (RDB snapshots only, or `--save ""`, Redis's out-of-the-box
//!   state): every job acknowledged since the last snapshot is lost when
//!   Redis restarts.
//!
//! A replica does not help by itself: replication is asynchronous. Use
//! `WAIT` semantics in Redis or the AOF setting above.
//!
//! # Connection loss and stalls
//!
//! The handle keeps one multiplexed connection through the `redis` crate's
//! `ConnectionManager`, which reconnects with exponential backoff. Each
//! operation is bounded by [`op_timeout`](RedisQueueBuilder::op_timeout)
//! (default 500 ms): while Redis is down or stalled, `submit` fails with
//! [`QueueError::Unavailable`] within that bound. It never reports a job
//! stored that Redis did not acknowledge.
//!
//! A Redis that stalls instead of dying (paused, swapping, blocked by a
//! slow command or a slow disk) keeps the commands written to its socket
//! and runs them when it resumes, long after their calls failed. So
//! `submit` passes its script the instant the call gives up, on Redis's
//! clock; the script reads `TIME` first and, once `TIME` is past that
//! instant, stores nothing and answers `late` (normally to nobody: the
//! caller has gone). The instant is the last reading of Redis's clock plus the local
//! monotonic time since it was read: every submit answer carries `TIME`,
//! and a reading older than 10 s is renewed with a `TIME` command first.
//! No client wall clock is involved, so skew between the client's and
//! Redis's clocks does not matter. The reading is a lower bound (Redis read
//! its clock before the answer arrived), so the deadline is at or before
//! the real give-up: earlier by the latency of the answer it was read from
//! (well under a millisecond on a healthy link), give or take the rate
//! drift of the two clocks over at most 10 s (under 10 ms even if both
//! slew at NTP's 500 ppm maximum in opposite directions). If Redis's clock
//! steps forward, the script answers `late` while the call still waits;
//! that answer renews the reading and the script runs once more within the
//! same `op_timeout`. If it steps back by `d` (or a failover reaches a host
//! whose clock is `d` behind), the submits placed with the older reading
//! get deadlines up to `d` late, until the next answer renews it.
//!
//! What no network client can rule out remains: the request in flight.
//! A `submit` reports `Unavailable` for a job that is stored only if Redis
//! ran its script no later than the deadline, so before the call gave up,
//! and its answer then took longer than the time left to arrive: Redis
//! stopped or died, or the connection broke, between running the script
//! and delivering the answer (with `appendfsync always` that gap includes
//! the fsync). That is at most the scripts that had run but were not yet
//! answered at that moment: one for a caller that sends one request at a
//! time. A command Redis reads after the deadline is never stored, however
//! long the stall. So [`Queue::submit`]'s "on `Err`, nothing was stored"
//! holds here for every refusal (`Full`, `Conflict`, `late`) and for every
//! request sent during a stall, but not for that in-flight request; a
//! caller that retries with the same idempotency key then gets
//! [`Enqueued::Existing`].
//!
//! # Clock
//!
//! Enqueue times, TTLs, nack delays and retention are wall-clock
//! milliseconds taken on the client (advancing with `tokio::time`), so the
//! hosts of a fleet need synchronised clocks (NTP); lease expiry is timed
//! by Redis itself, through the stream's idle times.
//!
//! ```no_run
//! use tower_firebreak::queue::{redis::RedisQueue, Job, Queue};
//!
//! # async fn run() -> Result<(), tower_firebreak::queue::QueueError> {
//! let queue = RedisQueue::builder()
//!     .name("orders")
//!     .connect("redis://127.0.0.1:6379")
//!     .await?;
//! let id = queue.enqueue(Job::new(http::Method::POST, "/orders".parse().unwrap())).await?;
//! # let _ = id;
//! # Ok(())
//! # }
//! ```

use super::clock::Clock;
use super::codec::{Format, b64_decode, b64_encode, hex};
use super::job::{duration_ms, ms_system};
use super::redis_clock::{Answer, RedisClock};
use super::{
    DeadLetter, DeliveredResponse, Enqueued, Job, JobId, JobStatus, Lease, Leased, Policy, Queue,
    QueueError,
};
use crate::ConfigError;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{RedisError, Script};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::time::Instant;

/// The fixed minimum idle time of `XAUTOCLAIM`, and so the longest
/// visibility timeout.
const MAX_VISIBILITY_MS: u64 = 30 * 24 * 3600 * 1000;

/// The longest retention passed to Redis (a hundred years): `PEXPIRE` with
/// a larger one (`Duration::MAX` for "keep for ever") is an error after
/// the ack script has already changed the job.
const MAX_RETENTION_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Helpers shared by the scripts. `P` is the queue's key prefix.
const PRELUDE: &str = r#"
local P = ARGV[1]
local function k(s) return P .. s end
local G = 'fb'

local function spent(id, now, max_att)
  local dl = redis.call('HGET', k('t'), id)
  if dl and tonumber(dl) <= now then return 'ttl expired' end
  local att = tonumber(redis.call('HGET', k('a'), id) or '0')
  if att >= max_att then return 'max attempts (' .. max_att .. ') reached' end
  return nil
end

local function drop_entry(id)
  local e = redis.call('HGET', k('e'), id)
  if e then
    redis.call('XACK', k('s'), G, e)
    redis.call('XDEL', k('s'), e)
    redis.call('HDEL', k('e'), id)
  end
end

local function forget(id)
  redis.call('HDEL', k('j'), id)
  redis.call('HDEL', k('a'), id)
  redis.call('HDEL', k('l'), id)
  redis.call('HDEL', k('t'), id)
  redis.call('ZREM', k('q'), id)
  redis.call('ZREM', k('d'), id)
end

local function to_dead(id, reason, now)
  drop_entry(id)
  local job = redis.call('HGET', k('j'), id)
  if not job then return end
  local att = redis.call('HGET', k('a'), id) or '0'
  local dl = redis.call('HGET', k('t'), id) or ''
  local enq = redis.call('ZSCORE', k('q'), id) or '0'
  local xe = redis.call('XADD', k('x'), '*', 'id', id, 'reason', reason, 'at', now,
    'attempts', att, 'deadline', dl, 'enq', enq, 'job', job)
  redis.call('HSET', k('xe'), id, xe)
  local st = k('st:' .. id)
  redis.call('DEL', st)
  redis.call('HSET', st, 'state', 'dead', 'reason', reason, 'attempts', att, 'at', now)
  redis.call('ZADD', k('xt'), now, id)
  redis.call('ZADD', k('xi'), 0, id)
  forget(id)
end

local function held(id, token)
  return redis.call('HGET', k('l'), id) == token
end

-- Releases the job's idempotency key, if it still points at this job.
local function release_key(id)
  local key = redis.call('HGET', k('k'), id)
  if key then
    local cur = redis.call('HGET', k('i'), key)
    if cur and string.sub(cur, 1, 36) == id then redis.call('HDEL', k('i'), key) end
    redis.call('HDEL', k('k'), id)
  end
end
"#;

/// ARGV: prefix, id, job, enqueued_at, deadline or '', key or '',
/// fingerprint, capacity, give-up time (Redis clock, µs). Returns
/// `{what, id, TIME seconds, TIME µs}`; `what` is `late` (nothing stored)
/// when Redis runs the script after the give-up time: the caller has
/// already been told `Unavailable`.
const SUBMIT: &str = r#"
local id, job, enq, dl, key, fp, cap = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local t = redis.call('TIME')
local function answer(what, jid) return {what, jid, t[1], t[2]} end
if tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[9]) then return answer('late', '') end
if key ~= '' then
  local cur = redis.call('HGET', k('i'), key)
  if cur then
    local cid = string.sub(cur, 1, 36)
    local live = redis.call('HEXISTS', k('j'), cid) == 1
      or redis.call('HEXISTS', k('xe'), cid) == 1
      or redis.call('EXISTS', k('st:' .. cid)) == 1
    if live then
      if string.sub(cur, 38) == fp then return answer('existing', cid) end
      return answer('conflict', cid)
    end
  end
end
if redis.call('ZCARD', k('q')) >= cap then return answer('full', '') end
redis.call('HSET', k('j'), id, job)
redis.call('HSET', k('a'), id, 0)
if dl ~= '' then redis.call('HSET', k('t'), id, dl) end
redis.call('ZADD', k('q'), enq, id)
if key ~= '' then
  redis.call('HSET', k('i'), key, id .. ' ' .. fp)
  redis.call('HSET', k('k'), id, key)
end
local e = redis.call('XADD', k('s'), '*', 'id', id)
redis.call('HSET', k('e'), id, e)
return answer('created', id)
"#;

/// ARGV: prefix, now, max, visibility, max_attempts, nonce, consumer,
/// min idle, the time before which a dead letter is purged ('' to keep
/// dead letters), and how long another consumer must have been idle, with
/// nothing pending, to be deleted ('' not to look this time). Returns
/// `{id, token, job, attempts}` for each leased job.
const LEASE: &str = r#"
local now, max, vis, max_att = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local nonce, consumer, M, dead_before, idle_gc = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9], ARGV[10]

-- Delete the group's consumers (other handles, mostly gone) that have been
-- idle that long and hold no pending entry: checked and deleted in this one
-- script, so no lease is lost with them, and a handle that comes back is
-- made a consumer again by its next read.
if idle_gc ~= '' then
  local limit = tonumber(idle_gc)
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', k('s'), G)) do
    local f = {}
    for n = 1, #c, 2 do f[c[n]] = c[n + 1] end
    if f['name'] ~= consumer and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= limit then
      redis.call('XGROUP', 'DELCONSUMER', k('s'), G, f['name'])
    end
  end
end

-- Release the idempotency keys of jobs delivered longer than `retention` ago.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', k('p'), '-inf', now, 'LIMIT', 0, 1024)) do
  redis.call('ZREM', k('p'), id)
  release_key(id)
  redis.call('DEL', k('st:' .. id))
end

-- Forget the dead letters dead since before `dead_before` (now minus this
-- handle's `dead_letter_retention`), and release their idempotency keys.
if dead_before ~= '' then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k('xt'), '-inf', dead_before, 'LIMIT', 0, 1024)) do
    redis.call('ZREM', k('xt'), id)
    redis.call('ZREM', k('xi'), id)
    local xe = redis.call('HGET', k('xe'), id)
    if xe then
      redis.call('XDEL', k('x'), xe)
      redis.call('HDEL', k('xe'), id)
      redis.call('DEL', k('st:' .. id))
      release_key(id)
    end
  end
end

-- Nacked jobs whose delay has passed go back to the stream.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', k('d'), '-inf', now, 'LIMIT', 0, 1024)) do
  redis.call('ZREM', k('d'), id)
  if redis.call('HEXISTS', k('j'), id) == 1 then
    local e = redis.call('XADD', k('s'), '*', 'id', id)
    redis.call('HSET', k('e'), id, e)
  end
end

local out = {}
local function give_out(id, e)
  local att = redis.call('HINCRBY', k('a'), id, 1)
  local token = nonce .. ':' .. (#out + 1)
  redis.call('HSET', k('l'), id, token)
  -- Idle M - vis now: XAUTOCLAIM (min idle M) takes it back in `vis` ms.
  redis.call('XCLAIM', k('s'), G, consumer, 0, e, 'IDLE', M - vis, 'JUSTID')
  out[#out + 1] = {id, token, redis.call('HGET', k('j'), id), att}
end

local function offer(e, fields)
  if not fields then return end
  local id = fields[2]
  if redis.call('HEXISTS', k('j'), id) == 0 or redis.call('HGET', k('e'), id) ~= e then
    redis.call('XACK', k('s'), G, e)
    redis.call('XDEL', k('s'), e)
    return
  end
  local reason = spent(id, now, max_att)
  if reason then to_dead(id, reason, now) else give_out(id, e) end
end

-- Expired leases first: their entries have been idle for M. XAUTOCLAIM
-- looks at no more than COUNT * 10 entries a call, so the scan goes on
-- where the last lease left it (wrapping once past the end), or an expired
-- entry behind many live ones would wait for them to settle.
local cursor = redis.call('GET', k('c')) or '0-0'
local wrapped = cursor == '0-0'
for _ = 1, 16 do
  if #out >= max then break end
  local r = redis.call('XAUTOCLAIM', k('s'), G, consumer, M, cursor, 'COUNT', max - #out)
  cursor = r[1]
  for _, ent in ipairs(r[2]) do
    local fields = ent[2]
    if fields then redis.call('HDEL', k('l'), fields[2]) end
    offer(ent[1], fields)
  end
  if cursor == '0-0' then
    if wrapped then break end
    wrapped = true
  end
end
redis.call('SET', k('c'), cursor)

-- Then new entries.
while #out < max do
  local r = redis.call('XREADGROUP', 'GROUP', G, consumer, 'COUNT', max - #out, 'STREAMS', k('s'), '>')
  if not r or #r[1][2] == 0 then break end
  for _, ent in ipairs(r[1][2]) do offer(ent[1], ent[2]) end
end
return out
"#;

/// ARGV: prefix, id, token, now, retention, status, headers, body.
const ACK: &str = r#"
local id, token, now, ret = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if not held(id, token) then return 0 end
drop_entry(id)
local att = redis.call('HGET', k('a'), id) or '0'
forget(id)
local st = k('st:' .. id)
redis.call('DEL', st)
redis.call('HSET', st, 'state', 'delivered', 'status', ARGV[6], 'headers', ARGV[7],
  'body', ARGV[8], 'attempts', att, 'at', now)
redis.call('PEXPIRE', st, math.max(ret, 1))
redis.call('ZADD', k('p'), now + ret, id)
return 1
"#;

/// ARGV: prefix, id, token, now, delay, max_attempts.
const NACK: &str = r#"
local id, token, now, delay, max_att = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if not held(id, token) then return 0 end
redis.call('HDEL', k('l'), id)
drop_entry(id)
local reason = spent(id, now, max_att)
if reason then to_dead(id, reason, now) else redis.call('ZADD', k('d'), now + delay, id) end
return 1
"#;

/// ARGV: prefix, id, token, now, reason.
const DEAD: &str = r#"
local id, token, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
if not held(id, token) then return 0 end
redis.call('HDEL', k('l'), id)
to_dead(id, ARGV[5], now)
return 1
"#;

/// ARGV: prefix, id, capacity. Returns 1, 0 (not dead) or -1 (full).
const REDRIVE: &str = r#"
local id, cap = ARGV[2], tonumber(ARGV[3])
local xe = redis.call('HGET', k('xe'), id)
if not xe then return 0 end
if redis.call('ZCARD', k('q')) >= cap then return -1 end
local r = redis.call('XRANGE', k('x'), xe, xe)
redis.call('HDEL', k('xe'), id)
redis.call('ZREM', k('xt'), id)
redis.call('ZREM', k('xi'), id)
if #r == 0 then return 0 end
local f = {}
local raw = r[1][2]
for n = 1, #raw, 2 do f[raw[n]] = raw[n + 1] end
redis.call('XDEL', k('x'), xe)
redis.call('DEL', k('st:' .. id))
redis.call('HSET', k('j'), id, f['job'])
redis.call('HSET', k('a'), id, 0)
if f['deadline'] ~= '' then redis.call('HSET', k('t'), id, f['deadline']) end
redis.call('ZADD', k('q'), f['enq'], id)
local e = redis.call('XADD', k('s'), '*', 'id', id)
redis.call('HSET', k('e'), id, e)
return 1
"#;

/// ARGV: prefix, limit. The first `limit` dead letters by id, as `XRANGE`
/// entries. The id index `xi` is rebuilt from `xt` first when the two
/// disagree (dead letters from before it existed).
const DEAD_PAGE: &str = r#"
local lim = tonumber(ARGV[2])
if redis.call('ZCARD', k('xi')) ~= redis.call('ZCARD', k('xt')) then
  redis.call('DEL', k('xi'))
  local ids = redis.call('ZRANGE', k('xt'), 0, -1)
  for i = 1, #ids, 500 do
    local args = {}
    for j = i, math.min(i + 499, #ids) do
      args[#args + 1] = 0
      args[#args + 1] = ids[j]
    end
    redis.call('ZADD', k('xi'), unpack(args))
  end
end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', k('xi'), 0, lim - 1)) do
  local xe = redis.call('HGET', k('xe'), id)
  if xe then
    local r = redis.call('XRANGE', k('x'), xe, xe)
    if #r > 0 then out[#out + 1] = r[1] end
  end
end
return out
"#;

/// ARGV: prefix, id.
const STATUS: &str = r#"
local id = ARGV[2]
if redis.call('HEXISTS', k('l'), id) == 1 then return {'inflight'} end
if redis.call('HEXISTS', k('j'), id) == 1 then return {'queued'} end
local st = redis.call('HGETALL', k('st:' .. id))
if #st == 0 then return {'none'} end
table.insert(st, 1, 'done')
return st
"#;

struct Scripts {
    submit: Script,
    lease: Script,
    ack: Script,
    nack: Script,
    dead: Script,
    redrive: Script,
    dead_page: Script,
    status: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let s = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
    Scripts {
        submit: s(SUBMIT),
        lease: s(LEASE),
        ack: s(ACK),
        nack: s(NACK),
        dead: s(DEAD),
        redrive: s(REDRIVE),
        dead_page: s(DEAD_PAGE),
        status: s(STATUS),
    }
});

/// A [`Queue`] on Redis Streams: see the [module docs](self) for the
/// layout, durability and connection-loss behaviour.
///
/// Clones share one connection. Two handles made by two
/// [`connect`](RedisQueueBuilder::connect) calls with one name (in one
/// process or in many) share one queue; each is its own consumer in the
/// stream's consumer group.
#[derive(Clone)]
pub struct RedisQueue {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    prefix: String,
    stream: String,
    dead: String,
    queue_key: String,
    consumer: String,
    location: String,
    policy: Policy,
    format: Format,
    op_timeout: Duration,
    /// The last reading of Redis's clock: see [`RedisQueue::submit_script`].
    anchor: RedisClock,
    clock: Clock,
    idle_consumer_ttl: Duration,
    /// When this handle's next lease looks for idle consumers (clock ms).
    next_consumer_sweep: AtomicU64,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("location", &self.inner.location)
            .field("consumer", &self.inner.consumer)
            .field("policy", &self.inner.policy)
            .field("op_timeout", &self.inner.op_timeout)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`RedisQueue`].
#[derive(Clone, Debug)]
pub struct RedisQueueBuilder {
    name: String,
    policy: Policy,
    format: Format,
    connect_timeout: Duration,
    op_timeout: Duration,
    max_backoff: Duration,
    idle_consumer_ttl: Duration,
}

impl Default for RedisQueueBuilder {
    fn default() -> Self {
        RedisQueueBuilder {
            name: "default".to_owned(),
            policy: Policy::default(),
            format: Format::default(),
            connect_timeout: Duration::from_millis(250),
            op_timeout: Duration::from_millis(500),
            max_backoff: Duration::from_secs(2),
            idle_consumer_ttl: RedisQueueBuilder::DEFAULT_IDLE_CONSUMER_TTL,
        }
    }
}

impl RedisQueueBuilder {
    /// The default [`idle_consumer_ttl`](Self::idle_consumer_ttl): 1 h.
    pub const DEFAULT_IDLE_CONSUMER_TTL: Duration = Duration::from_secs(3600);

    /// How long a consumer of the stream's group may go without reading,
    /// with no entry pending, before a lease on another handle deletes it
    /// (`XGROUP DELCONSUMER`). Default: [1 h](Self::DEFAULT_IDLE_CONSUMER_TTL).
    ///
    /// Each handle is a consumer of the group, so a fleet that restarts
    /// its replicas leaves one consumer per old handle behind; this
    /// removes them. A consumer that holds a lease is never deleted (its
    /// pending entry keeps it), and a handle whose consumer was deleted
    /// while idle becomes a consumer again at its next lease, so a short
    /// value costs nothing but the check: each handle looks at most every
    /// half of this, and at most every minute, inside a lease. Must be
    /// above zero.
    pub fn idle_consumer_ttl(mut self, ttl: Duration) -> Self {
        self.idle_consumer_ttl = ttl;
        self
    }

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
    /// status and its idempotency key. Default: until it is redriven.
    ///
    /// As with the disk queue, the purge is done by the sweep that runs
    /// with each `lease`, and time is the client's wall clock: a lease
    /// purges the dead letters that have been dead for longer than *its
    /// handle's* setting (a handle without the setting purges none), so
    /// the handles of a fleet should agree on it. A redriven job is no
    /// longer a dead letter and is not purged.
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

    /// The bound on every operation, reconnecting included: past it the
    /// operation fails with [`QueueError::Unavailable`]. Default: 500 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// The longest pause between two reconnect attempts. Default: 2 s.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// Checks the settings, connects to Redis at `url` (for example
    /// `redis://127.0.0.1:6379/0`) and creates the stream and its consumer
    /// group if they are not there.
    ///
    /// # Errors
    ///
    /// [`QueueError::Config`] for bad settings or a bad URL,
    /// [`QueueError::Unavailable`] when Redis cannot be reached within the
    /// operation timeout.
    pub async fn connect(self, url: &str) -> Result<RedisQueue, QueueError> {
        self.policy.validate()?;
        if self.name.is_empty() || self.name.contains(['{', '}']) {
            return Err(
                ConfigError::new("name", &self.name, "must be non-empty, without braces").into(),
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
        if self.idle_consumer_ttl.is_zero() {
            return Err(ConfigError::new(
                "idle_consumer_ttl",
                self.idle_consumer_ttl,
                "must be above zero",
            )
            .into());
        }
        let client = ::redis::Client::open(url)
            .map_err(|e| QueueError::from(ConfigError::new("url", url, e.to_string())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.op_timeout))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(self.max_backoff);
        let conn = tokio::time::timeout(
            self.op_timeout.max(self.connect_timeout),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| QueueError::unavailable(format!("connecting to {url} timed out")))?
        .map_err(QueueError::unavailable)?;
        let prefix = format!("fb:{{{}}}:", self.name);
        let queue = RedisQueue {
            inner: Arc::new(Inner {
                conn,
                stream: format!("{prefix}s"),
                dead: format!("{prefix}x"),
                queue_key: format!("{prefix}q"),
                consumer: format!("c-{}", uuid::Uuid::now_v7().simple()),
                location: format!("{url}#{prefix}"),
                prefix,
                policy: self.policy,
                format: self.format,
                op_timeout: self.op_timeout,
                anchor: RedisClock::default(),
                clock: Clock::new(),
                idle_consumer_ttl: self.idle_consumer_ttl,
                next_consumer_sweep: AtomicU64::new(0),
            }),
        };
        queue.create_group().await?;
        Ok(queue)
    }
}

fn unavailable(e: RedisError) -> QueueError {
    QueueError::unavailable(e)
}

fn encode_headers(headers: &HeaderMap) -> String {
    let list: Vec<(&str, String)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), b64_encode(v.as_bytes())))
        .collect();
    serde_json::to_string(&list).unwrap_or_else(|_| "[]".to_owned())
}

fn decode_headers(raw: &[u8]) -> Result<HeaderMap, String> {
    let list: Vec<(String, String)> = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let mut map = HeaderMap::new();
    for (name, value) in list {
        let value = b64_decode(&value).map_err(|e| e.to_string())?;
        map.append(
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?,
            HeaderValue::from_bytes(&value).map_err(|e| e.to_string())?,
        );
    }
    Ok(map)
}

fn parse<T: std::str::FromStr>(raw: &[u8]) -> Result<T, String> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad number {:?}", String::from_utf8_lossy(raw)))
}

impl RedisQueue {
    /// Settings for a new queue handle.
    pub fn builder() -> RedisQueueBuilder {
        RedisQueueBuilder::default()
    }

    /// This handle's consumer name in the stream's consumer group.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    fn corrupt(&self, what: impl Into<String>) -> QueueError {
        QueueError::corrupt(PathBuf::from(&self.inner.location), what.into())
    }

    /// Runs `f` on the connection within the operation timeout.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, QueueError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        match tokio::time::timeout(self.inner.op_timeout, f(self.inner.conn.clone())).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(QueueError::unavailable(format!(
                "redis did not answer within {:?}",
                self.inner.op_timeout
            ))),
        }
    }

    async fn create_group(&self) -> Result<(), QueueError> {
        let stream = self.inner.stream.clone();
        let r = self
            .run(|mut c| async move {
                ::redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&stream)
                    .arg("fb")
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        match r {
            Err(QueueError::Unavailable { source }) if source.to_string().contains("BUSYGROUP") => {
                Ok(())
            }
            other => other,
        }
    }

    async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        script: &'static Script,
        args: Vec<Vec<u8>>,
    ) -> Result<T, QueueError> {
        let prefix = self.inner.prefix.clone();
        self.run(|mut c| async move {
            let mut inv = script.prepare_invoke();
            inv.arg(prefix);
            for a in &args {
                inv.arg(a.as_slice());
            }
            inv.invoke_async(&mut c).await
        })
        .await
    }

    fn settle_result(&self, lease: &Lease, r: i64) -> Result<(), QueueError> {
        if r == 1 {
            Ok(())
        } else {
            Err(QueueError::LeaseLost { id: *lease.id() })
        }
    }
}

impl RedisQueue {
    /// Runs the submit script so that Redis stores the job only if it runs
    /// the script before this call gives up (`op_timeout` from now): see
    /// the module docs, "Connection loss and stalls", and
    /// [`RedisClock::run_before`].
    async fn submit_script(&self, args: Vec<Vec<u8>>) -> Result<Answer, QueueError> {
        let give_up = crate::later(Instant::now(), self.inner.op_timeout);
        let run = self.inner.anchor.run_before(
            &self.inner.conn,
            &SCRIPTS.submit,
            &self.inner.prefix,
            &args,
            give_up,
            true,
        );
        match run.await {
            Some(r) => r.map_err(unavailable),
            None => Err(QueueError::unavailable(format!(
                "redis did not answer within {:?}",
                self.inner.op_timeout
            ))),
        }
    }
}

fn arg(v: impl ToString) -> Vec<u8> {
    v.to_string().into_bytes()
}

impl Queue for RedisQueue {
    async fn submit(&self, mut job: Job) -> Result<Enqueued, QueueError> {
        let now = self.inner.clock.now_ms();
        job.enqueued_at_ms = now;
        job.attempts = 0;
        let id = JobId::new();
        let fingerprint = hex(&job.fingerprint());
        let args = vec![
            arg(id),
            self.inner.format.encode(&job),
            arg(now),
            job.deadline_ms().map(arg).unwrap_or_default(),
            job.idempotency_key()
                .unwrap_or_default()
                .as_bytes()
                .to_vec(),
            fingerprint.into_bytes(),
            arg(self.inner.policy.capacity),
        ];
        let (what, other) = self.submit_script(args).await?;
        let other_id = || {
            other
                .parse::<JobId>()
                .map_err(|_| self.corrupt(format!("bad job id {other:?}")))
        };
        match what.as_str() {
            "created" => Ok(Enqueued::Created(id)),
            "existing" => Ok(Enqueued::Existing(other_id()?)),
            "conflict" => Err(QueueError::Conflict {
                key: job.idempotency_key.unwrap_or_default(),
                existing: other_id()?,
            }),
            "full" => Err(QueueError::Full {
                capacity: self.inner.policy.capacity,
            }),
            "late" => Err(QueueError::unavailable(
                "redis ran the submit after its deadline (clock jump?); nothing was stored",
            )),
            _ => Err(self.corrupt(format!("unexpected submit answer {what:?}"))),
        }
    }

    async fn lease(&self, max: usize, visibility: Duration) -> Result<Vec<Leased>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let vis = duration_ms(visibility).min(MAX_VISIBILITY_MS);
        let args = || {
            let now = self.inner.clock.now_ms();
            let dead_before = match self.inner.policy.dead_letter_retention {
                Some(r) => arg(now.saturating_sub(duration_ms(r))),
                None => Vec::new(),
            };
            let ttl = self.inner.idle_consumer_ttl;
            let next = &self.inner.next_consumer_sweep;
            let idle_gc = if now >= next.load(Ordering::Relaxed) {
                let every = (ttl / 2).min(Duration::from_secs(60));
                next.store(now.saturating_add(duration_ms(every)), Ordering::Relaxed);
                arg(duration_ms(ttl))
            } else {
                Vec::new()
            };
            vec![
                arg(now),
                arg(max),
                arg(vis),
                arg(self.inner.policy.max_attempts),
                arg(uuid::Uuid::now_v7().simple()),
                arg(&self.inner.consumer),
                arg(MAX_VISIBILITY_MS),
                dead_before,
                idle_gc,
            ]
        };
        type Row = (String, String, Vec<u8>, u32);
        let rows: Vec<Row> = match self.invoke(&SCRIPTS.lease, args()).await {
            // A Redis that lost its data (no persistence) lost the group too.
            Err(QueueError::Unavailable { source }) if source.to_string().contains("NOGROUP") => {
                self.create_group().await?;
                self.invoke(&SCRIPTS.lease, args()).await?
            }
            other => other?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for (id, token, bytes, attempts) in rows {
            let jid: JobId = id
                .parse()
                .map_err(|_| self.corrupt(format!("bad job id {id:?}")))?;
            let lease = Lease::new(jid, token);
            let mut job = match self.inner.format.decode(&bytes) {
                Ok(job) => job,
                // Written by a newer version, say: dead-lettered as it is,
                // so that it neither fails this batch (whose other jobs
                // are leased already) nor comes back to fail the next.
                Err(e) => {
                    let why = super::corrupt_record(&jid, &e);
                    // Should that fail, the job comes back after its
                    // visibility timeout; the batch's other jobs are held.
                    if let Err(e) = self.dead_letter(&lease, &why).await {
                        tracing::warn!(target: "tower_firebreak", layer = "queue", job_id = %jid, error = %e, "dead-lettering an undecodable job failed");
                    }
                    continue;
                }
            };
            job.attempts = attempts;
            out.push(Leased::new(lease, job));
        }
        Ok(out)
    }

    async fn ack(&self, lease: &Lease, response: DeliveredResponse) -> Result<(), QueueError> {
        let args = vec![
            arg(lease.id()),
            arg(lease.token()),
            arg(self.inner.clock.now_ms()),
            arg(duration_ms(self.inner.policy.retention).min(MAX_RETENTION_MS)),
            arg(response.status),
            encode_headers(&response.headers).into_bytes(),
            response.body.to_vec(),
        ];
        let r: i64 = self.invoke(&SCRIPTS.ack, args).await?;
        self.settle_result(lease, r)
    }

    async fn nack(&self, lease: &Lease, delay: Duration) -> Result<(), QueueError> {
        let args = vec![
            arg(lease.id()),
            arg(lease.token()),
            arg(self.inner.clock.now_ms()),
            arg(duration_ms(delay)),
            arg(self.inner.policy.max_attempts),
        ];
        let r: i64 = self.invoke(&SCRIPTS.nack, args).await?;
        self.settle_result(lease, r)
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), QueueError> {
        let args = vec![
            arg(lease.id()),
            arg(lease.token()),
            arg(self.inner.clock.now_ms()),
            reason.as_bytes().to_vec(),
        ];
        let r: i64 = self.invoke(&SCRIPTS.dead, args).await?;
        self.settle_result(lease, r)
    }

    async fn status(&self, id: &JobId) -> Result<Option<JobStatus>, QueueError> {
        let raw: Vec<Vec<u8>> = self.invoke(&SCRIPTS.status, vec![arg(id)]).await?;
        let Some((first, fields)) = raw.split_first() else {
            return Err(self.corrupt("empty status answer"));
        };
        match first.as_slice() {
            b"inflight" => return Ok(Some(JobStatus::InFlight)),
            b"queued" => return Ok(Some(JobStatus::Queued)),
            b"none" => return Ok(None),
            _ => {}
        }
        let get = |name: &[u8]| -> Result<&[u8], QueueError> {
            fields
                .chunks(2)
                .find(|p| p[0] == name)
                .and_then(|p| p.get(1))
                .map(Vec::as_slice)
                .ok_or_else(|| {
                    self.corrupt(format!(
                        "status of {id} lacks {}",
                        String::from_utf8_lossy(name)
                    ))
                })
        };
        let bad = |e: String| self.corrupt(format!("status of {id}: {e}"));
        let attempts = parse::<u32>(get(b"attempts")?).map_err(bad)?;
        let at = ms_system(parse::<u64>(get(b"at")?).map_err(bad)?);
        match get(b"state")? {
            b"delivered" => Ok(Some(JobStatus::Delivered {
                status: parse::<u16>(get(b"status")?).map_err(bad)?,
                headers: decode_headers(get(b"headers")?).map_err(bad)?,
                body: Bytes::copy_from_slice(get(b"body")?),
                attempts,
                delivered_at: at,
            })),
            b"dead" => Ok(Some(JobStatus::DeadLettered {
                reason: String::from_utf8_lossy(get(b"reason")?).into_owned(),
                attempts,
                at,
            })),
            other => Err(bad(format!(
                "unknown state {:?}",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    async fn depth(&self) -> Result<usize, QueueError> {
        let key = self.inner.queue_key.clone();
        self.run(|mut c| async move {
            ::redis::cmd("ZCARD")
                .arg(&key)
                .query_async::<usize>(&mut c)
                .await
        })
        .await
    }

    async fn oldest_age(&self) -> Result<Option<Duration>, QueueError> {
        let key = self.inner.queue_key.clone();
        let oldest: Vec<(String, f64)> = self
            .run(|mut c| async move {
                ::redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(0)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let now = self.inner.clock.now_ms();
        Ok(oldest
            .first()
            .map(|(_, at)| Duration::from_millis(now.saturating_sub(*at as u64))))
    }

    async fn dead_letter_count(&self) -> Result<usize, QueueError> {
        let key = self.inner.dead.clone();
        self.run(|mut c| async move {
            ::redis::cmd("XLEN")
                .arg(&key)
                .query_async::<usize>(&mut c)
                .await
        })
        .await
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The stream is in dead-letter order; the trait wants id order,
        // which the index `xi` keeps, so only `limit` entries are read.
        type Entry = (String, Vec<(String, Vec<u8>)>);
        // Lua counts in doubles: a limit past 2^40 means all of them.
        let page = limit.min(1 << 40);
        let entries: Vec<Entry> = self.invoke(&SCRIPTS.dead_page, vec![arg(page)]).await?;
        let mut out = Vec::with_capacity(entries.len());
        for (_, fields) in entries {
            let get = |name: &str| -> Result<&[u8], QueueError> {
                fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_slice())
                    .ok_or_else(|| self.corrupt(format!("dead letter lacks {name}")))
            };
            let bad = |e: String| self.corrupt(format!("dead letter: {e}"));
            let id: JobId = std::str::from_utf8(get("id")?)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("bad id".into()))?;
            // One dead-lettered because it does not decode is left out (its
            // status says why).
            let Ok(mut job) = self.inner.format.decode(get("job")?) else {
                continue;
            };
            job.attempts = parse(get("attempts")?).map_err(bad)?;
            let reason = String::from_utf8_lossy(get("reason")?).into_owned();
            let at = ms_system(parse(get("at")?).map_err(bad)?);
            out.push(DeadLetter::new(id, job, reason, at));
        }
        // Already in id order (the index sorts the hyphenated ids, whose
        // text order is their order) and at most `limit` long.
        Ok(out)
    }

    async fn redrive(&self, id: &JobId) -> Result<bool, QueueError> {
        let r: i64 = self
            .invoke(
                &SCRIPTS.redrive,
                vec![arg(id), arg(self.inner.policy.capacity)],
            )
            .await?;
        match r {
            1 => Ok(true),
            -1 => Err(QueueError::Full {
                capacity: self.inner.policy.capacity,
            }),
            _ => Ok(false),
        }
    }
}
