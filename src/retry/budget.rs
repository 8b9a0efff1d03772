use crate::ConfigError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower::retry::budget::{Budget, TpsBudget};

/// A cap on retries as a share of live traffic, shared by every clone of a
/// layer.
///
/// It is tower's [`TpsBudget`] behind an `Arc`: each call (not each attempt)
/// deposits one token, each retry withdraws `n` tokens, and deposits
/// expire after `ttl`. TpsBudget can only grant 1/n of the calls, so `n` is
/// `1 / ratio` rounded *up*: a ratio of 0.2 grants exactly a fifth, one of
/// 0.6 a half, one of 0.3 a quarter (never more than asked). Over 1 the
/// steps are 1000/n: 2.5 grants 2.5 retries a call. On top of that, `min_per_sec` retries a second are
/// always allowed (over a `ttl` window), so a client with little traffic can
/// still retry.
///
/// Under sustained failure the number of attempts is therefore bounded by
/// `calls × (1 + ratio) + min_per_sec × ttl`, whatever `max_attempts` says:
/// a dependency that is down sees at most `ratio` more traffic, never a
/// retry storm.
///
/// When the budget is empty the call's last result is returned unchanged and a
/// `tracing` event (`debug`, target `tower_firebreak`) says so.
///
/// ```
/// use std::time::Duration;
/// use tower_firebreak::retry::{RetryBudget, RetryPolicy};
///
/// let budget = RetryBudget::new(Duration::from_secs(10), 10, 0.2);
/// let policy = RetryPolicy::exponential(Duration::from_millis(50)).budget(budget);
/// # let _ = policy;
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    // One pointer: the retry policy, and so every retry future, carries it.
    inner: Arc<Inner>,
}

struct Inner {
    tps: TpsBudget,
    ttl: Duration,
    min_per_sec: u32,
    ratio: f32,
}

impl RetryBudget {
    /// The default deposit lifetime.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
    /// The default floor of retries a second.
    pub const DEFAULT_MIN_PER_SEC: u32 = 10;
    /// The default share of calls that may be retried (Finagle's and tower's).
    pub const DEFAULT_RATIO: f32 = 0.2;

    /// A budget that lets `ratio` of the calls of the last `ttl` be retried,
    /// plus `min_per_sec` retries a second.
    ///
    /// # Panics
    ///
    /// When a setting is out of range (see [`try_new`](Self::try_new), which
    /// returns the error instead). Settings are checked here, once, never
    /// during a call.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Self {
        match Self::try_new(ttl, min_per_sec, ratio) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`new`](Self::new), returning a [`ConfigError`] for a `ttl`
    /// outside 1 s..=60 s, a `ratio` outside 0.0..=1000.0, or a `min_per_sec`
    /// of `i32::MAX` or more (tower's limits).
    pub fn try_new(ttl: Duration, min_per_sec: u32, ratio: f32) -> Result<Self, ConfigError> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(ConfigError::new("ttl", ttl, "must be within 1s..=60s"));
        }
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(ConfigError::new(
                "ratio",
                ratio,
                "must be within 0.0..=1000.0",
            ));
        }
        if min_per_sec >= i32::MAX as u32 {
            return Err(ConfigError::new(
                "min_per_sec",
                min_per_sec,
                "must be below i32::MAX",
            ));
        }
        let tps_ratio = tps_ratio(ratio);
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                tps: TpsBudget::new(ttl, min_per_sec, tps_ratio),
                ttl,
                min_per_sec,
                ratio,
            }),
        })
    }

    /// How long a deposit counts.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The floor of retries a second.
    pub fn min_per_sec(&self) -> u32 {
        self.inner.min_per_sec
    }

    /// The share of calls that may be retried.
    pub fn ratio(&self) -> f32 {
        self.inner.ratio
    }

    /// Records one call. The retry policy does this once per call.
    pub fn deposit(&self) {
        self.inner.tps.deposit();
    }

    /// Takes the tokens for one retry, `false` when there are not enough.
    pub fn withdraw(&self) -> bool {
        self.inner.tps.withdraw()
    }
}

/// The ratio to give tower's [`TpsBudget`] so that it grants at most
/// `ratio`, as close to it as it can.
///
/// TpsBudget deposits one token a call and withdraws `(1.0 / ratio) as
/// isize` a retry (for a ratio over 1: deposits 1000 and withdraws
/// `(1000.0 / ratio) as isize`). Both truncate, so it can only grant
/// 1/n of the calls (or 1000/n), and truncation rounds n *down*: a ratio of
/// 0.6 withdrew one token and so granted every call a retry, 0.3 granted a
/// third; and when 1/ratio lands a hair below a whole number in f32 (0.001
/// gives 999, 1/7 gives 6), n dropped by one. So n is rounded *up* here
/// (0.6 grants half the calls, 0.3 a quarter), except that a ratio whose
/// inverse is whole to within float error keeps that inverse, and the
/// ratio passed is nudged a hair down so that tower's truncation lands on
/// n exactly.
fn tps_ratio(ratio: f32) -> f32 {
    let (scale, limit) = if ratio <= 1.0 {
        (1.0, 1.0)
    } else {
        (1000.0, 1000.0)
    };
    if ratio <= 0.0 {
        return ratio;
    }
    let inv = scale / f64::from(ratio);
    let n = if (inv - inv.round()).abs() < 1e-4 {
        inv.round()
    } else {
        inv.ceil()
    }
    .max(1.0);
    let r = ((scale / n) as f32 * (1.0 - 4.0 * f32::EPSILON)).min(limit);
    // Over 1 the nudge must not cross into tower's other branch.
    if ratio > 1.0 && r <= 1.0 { 1.0 } else { r }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(
            Self::DEFAULT_TTL,
            Self::DEFAULT_MIN_PER_SEC,
            Self::DEFAULT_RATIO,
        )
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.inner.ttl)
            .field("min_per_sec", &self.inner.min_per_sec)
            .field("ratio", &self.inner.ratio)
            .field("tokens", &self.inner.tps)
            .finish()
    }
}
