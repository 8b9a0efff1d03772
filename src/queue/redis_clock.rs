//! Deadlines on Redis's clock, for the scripts that create a job.
//!
//! A Redis that stalls instead of dying (paused, swapping, blocked by a slow
//! command or a slow disk) keeps the commands written to its socket and runs
//! them when it resumes, long after their calls gave up. A script that
//! creates a job must then create nothing, or a caller told `Unavailable`
//! (so `defer` answered 503) would have its job stored and delivered. So
//! such a script gets, as its last argument, the instant its call gives up
//! on Redis's clock (µs); it reads `TIME` first, stores nothing once `TIME`
//! is past that instant, and answers `late`. Every answer of such a script
//! is `{what, id, TIME seconds, TIME µs}`.
//!
//! The instant is the last reading of Redis's clock (an [`Anchor`]) plus the
//! local monotonic time since. No client wall clock is involved, so skew
//! between the two clocks does not matter. The reading is a lower bound
//! (Redis read its clock before its answer arrived), so the deadline is at
//! or before the real give-up. See [`RedisQueue`](super::redis::RedisQueue)'s
//! "Connection loss and stalls" for the whole argument.

use ::redis::aio::ConnectionManager;
use ::redis::{RedisError, Script};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How long a reading of Redis's clock is used to place deadlines on it. An
/// older one is read again (`TIME`) first, so that the two clocks (Redis's
/// wall clock, the local monotonic one) drift apart by under 10 ms (1,000
/// ppm: each slewed by NTP at its 500 ppm maximum, in opposite directions)
/// before it is renewed.
const ANCHOR_MAX_AGE: Duration = Duration::from_secs(10);

/// Redis's clock (`TIME`, µs) as read by a script or command, and the local
/// instant its answer arrived. Redis read its clock before that instant, so
/// `redis_us + (t - at)` is never later than Redis's clock at `t` (up to the
/// rate drift of the two clocks, bounded by [`ANCHOR_MAX_AGE`]).
#[derive(Clone, Copy, Debug)]
struct Anchor {
    redis_us: u64,
    at: Instant,
}

impl Anchor {
    fn read(secs: u64, micros: u64) -> Anchor {
        Anchor {
            redis_us: secs.saturating_mul(1_000_000).saturating_add(micros),
            at: Instant::now(),
        }
    }

    /// A lower bound on Redis's clock at `t`, in µs.
    fn redis_us_at(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.at).as_micros();
        self.redis_us
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }
}

/// The last reading of one Redis's clock, shared by a handle's calls.
#[derive(Debug, Default)]
pub(crate) struct RedisClock {
    last: Mutex<Option<Anchor>>,
}

/// What a deadline-guarded script answered: `what` (`late` when Redis ran
/// it after the deadline, twice) and its id field.
pub(crate) type Answer = (String, String);

impl RedisClock {
    fn anchored(&self, anchor: Anchor) -> Anchor {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(anchor);
        anchor
    }

    /// Runs `script` with `prefix`, `args` and then the instant `give_up`
    /// on Redis's clock, so that Redis stores nothing if it runs the script
    /// after the caller gave up. `None` when no answer came by `give_up`.
    ///
    /// A reading older than [`ANCHOR_MAX_AGE`] is renewed with `TIME`
    /// first. If Redis's clock jumped ahead (or a failover reached a host
    /// whose clock is ahead), or the reading was early by more than the
    /// time the call had left, the script answers `late` while the call
    /// still waits: that answer renews the reading and, with `retry_late`,
    /// the script runs once more, all by `give_up`. (A script whose `late`
    /// leaves something behind, such as the RabbitMQ claim's void record,
    /// must not run twice.)
    pub(crate) async fn run_before(
        &self,
        conn: &ConnectionManager,
        script: &Script,
        prefix: &str,
        args: &[Vec<u8>],
        give_up: Instant,
        retry_late: bool,
    ) -> Option<Result<Answer, RedisError>> {
        let attempt = async {
            let mut c = conn.clone();
            let runs = if retry_late { 2 } else { 1 };
            for _ in 0..runs {
                let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
                let anchor = match last {
                    Some(a) if a.at.elapsed() < ANCHOR_MAX_AGE => a,
                    _ => {
                        let (secs, micros): (u64, u64) =
                            ::redis::cmd("TIME").query_async(&mut c).await?;
                        self.anchored(Anchor::read(secs, micros))
                    }
                };
                let mut inv = script.prepare_invoke();
                inv.arg(prefix);
                for a in args {
                    inv.arg(a.as_slice());
                }
                inv.arg(anchor.redis_us_at(give_up));
                let (what, other, secs, micros): (String, String, u64, u64) =
                    inv.invoke_async(&mut c).await?;
                self.anchored(Anchor::read(secs, micros));
                if what != "late" {
                    return Ok((what, other));
                }
            }
            Ok(("late".to_owned(), String::new()))
        };
        tokio::time::timeout_at(give_up, attempt).await.ok()
    }
}
