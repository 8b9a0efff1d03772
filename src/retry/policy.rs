use super::budget::RetryBudget;
use super::classify::{Action, Classify, DefaultClassifier, HttpClassifier};
use crate::BoxError;
use crate::deadline;
use std::time::Duration;
use tokio::time::Instant;

/// The shape of the delays between attempts, before jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backoff {
    /// `base × 2^(n-1)` before retry `n`.
    Exponential,
    /// AWS's "decorrelated jitter": a random delay in `base..=3 × previous`.
    Decorrelated,
    /// The same delay, `base`, before every retry.
    Fixed,
    /// `base × n` before retry `n`.
    Linear,
}

/// The resolution of tokio's timer wheel.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Durations are kept as whole nanoseconds (u64: 584 years) rather than
/// `Duration` (16 bytes): tower's `Retry` copies the policy into every
/// response future, so its size is paid on every call.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// When, whether and how often to retry. Used by [`RetryLayer`](super::RetryLayer).
///
/// `C` decides which results are retried: [`DefaultClassifier`] (any `Err`
/// except our shed rejections and `DeadlineExceeded`) unless changed with
/// [`http`](Self::http) or [`classify`](Self::classify).
///
/// The delay before retry `n` (the first retry is `n = 1`) is at most
/// [`max_delay`](Self::max_delay):
///
/// | constructor | delay before retry `n`, without jitter |
/// | --- | --- |
/// | [`exponential(base)`](Self::exponential) | `base × 2^(n-1)` |
/// | [`linear(step)`](Self::linear) | `step × n` |
/// | [`fixed(delay)`](Self::fixed) | `delay` |
/// | [`decorrelated_jitter(base)`](Self::decorrelated_jitter) | random in `base..=3 × previous` |
///
/// With full jitter (the default) the delay is drawn uniformly from
/// `0..=` that value (AWS's "full jitter"), so clients that failed together
/// do not retry together.
///
/// ```
/// use std::time::Duration;
/// use tower_firebreak::retry::{RetryBudget, RetryPolicy};
///
/// let policy = RetryPolicy::exponential(Duration::from_millis(100))
///     .max_attempts(4)
///     .max_delay(Duration::from_secs(2))
///     .budget(RetryBudget::new(Duration::from_secs(10), 10, 0.2));
/// // Without jitter: 100 ms, 200 ms, 400 ms.
/// assert_eq!(policy.clone().no_jitter().max_total_delay(), Duration::from_millis(700));
/// ```
#[derive(Clone, Debug)]
pub struct RetryPolicy<C = DefaultClassifier> {
    backoff: Backoff,
    jitter: bool,
    max_attempts: u32,
    base_ns: u64,
    max_delay_ns: u64,
    budget: Option<RetryBudget>,
    classify: C,
    // Per call: the layer's copy keeps these at zero; tower's `Retry` clones
    // the policy into every response future, and only that copy counts.
    attempts: u32,
    prev_ns: u64,
    obs: crate::observe::RetryMetrics,
}

impl RetryPolicy {
    /// The default number of attempts, the first one included.
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    /// The default base delay.
    pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(100);
    /// The default cap on one delay.
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(10);

    fn with_backoff(backoff: Backoff, base: Duration) -> Self {
        RetryPolicy {
            backoff,
            jitter: true,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            base_ns: nanos(base),
            max_delay_ns: nanos(Self::DEFAULT_MAX_DELAY),
            budget: None,
            classify: DefaultClassifier,
            attempts: 0,
            prev_ns: 0,
            obs: crate::observe::RetryMetrics::default(),
        }
    }

    /// Exponential backoff: `base`, `2 × base`, `4 × base`, … with full jitter.
    /// [`DEFAULT_MAX_ATTEMPTS`](Self::DEFAULT_MAX_ATTEMPTS) attempts,
    /// delays capped at [`DEFAULT_MAX_DELAY`](Self::DEFAULT_MAX_DELAY), no budget.
    pub fn exponential(base: Duration) -> Self {
        Self::with_backoff(Backoff::Exponential, base)
    }

    /// AWS's decorrelated jitter: each delay is random in
    /// `base..=3 × the previous delay` (the first "previous" is `base`), capped
    /// by `max_delay`. With [`no_jitter`](Self::no_jitter) each delay is its
    /// upper bound, `3 × previous`.
    pub fn decorrelated_jitter(base: Duration) -> Self {
        Self::with_backoff(Backoff::Decorrelated, base)
    }

    /// The same delay before every retry (full jitter unless turned off).
    pub fn fixed(delay: Duration) -> Self {
        Self::with_backoff(Backoff::Fixed, delay)
    }

    /// Linear backoff: `step`, `2 × step`, `3 × step`, … (full jitter unless
    /// turned off).
    pub fn linear(step: Duration) -> Self {
        Self::with_backoff(Backoff::Linear, step)
    }
}

impl<C> RetryPolicy<C> {
    /// Names the policy: the `name` label of `firebreak.retry.attempts` and
    /// `firebreak.retry.gave_up` (feature `metrics`). An unnamed policy
    /// records no metrics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name: String = name.into();
        self.obs = crate::observe::RetryMetrics::new(Some(&name));
        self
    }

    /// How many attempts a call may make, the first one included. `1` turns
    /// retries off; `0` is taken as `1`.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The longest delay before one retry, also the cap on a server's
    /// `Retry-After` or gRPC pushback.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay_ns = nanos(d);
        self
    }

    /// Turns jitter off: every delay is the schedule's nominal value. Meant
    /// for tests; in production, clients that failed together then retry
    /// together.
    pub fn no_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Turns full jitter back on (the default).
    pub fn full_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// Bounds retries by a [`RetryBudget`], shared by every service made from
    /// this policy and by every other policy given a clone of it.
    pub fn budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Uses `classify` to decide which results are retried.
    pub fn classify<C2>(self, classify: C2) -> RetryPolicy<C2> {
        RetryPolicy {
            backoff: self.backoff,
            jitter: self.jitter,
            max_attempts: self.max_attempts,
            base_ns: self.base_ns,
            max_delay_ns: self.max_delay_ns,
            budget: self.budget,
            classify,
            attempts: 0,
            prev_ns: 0,
            obs: self.obs,
        }
    }

    /// Uses [`HttpClassifier`]: HTTP and gRPC retryability, `Retry-After` and
    /// `grpc-retry-pushback-ms`.
    pub fn http(self) -> RetryPolicy<HttpClassifier> {
        self.classify(HttpClassifier)
    }

    /// The configured number of attempts.
    pub fn attempts_limit(&self) -> u32 {
        self.max_attempts
    }

    /// The configured cap on one delay.
    pub fn delay_cap(&self) -> Duration {
        Duration::from_nanos(self.max_delay_ns)
    }

    /// The budget, if any.
    pub fn retry_budget(&self) -> Option<&RetryBudget> {
        self.budget.as_ref()
    }

    /// The classifier.
    pub fn classifier(&self) -> &C {
        &self.classify
    }

    /// The most a call can sleep between its attempts on the policy's own
    /// schedule: the sum of the nominal delays, which jitter only lowers. A
    /// server's `Retry-After` or pushback can ask for more, up to
    /// `max_delay` per retry. A deadline shorter than this cuts retries short.
    pub fn max_total_delay(&self) -> Duration {
        let mut prev = 0;
        let total = (1..self.max_attempts)
            .map(|n| {
                let d = self.upper_delay(n, prev);
                prev = d;
                d
            })
            .fold(0u64, u64::saturating_add);
        Duration::from_nanos(total)
    }

    /// The largest delay before retry `n`, in nanoseconds, given the previous one.
    fn upper_delay(&self, n: u32, prev_ns: u64) -> u64 {
        let base = self.base_ns;
        let d = match self.backoff {
            Backoff::Exponential => {
                base.saturating_mul(1u64.checked_shl(n - 1).unwrap_or(u64::MAX))
            }
            Backoff::Linear => base.saturating_mul(u64::from(n)),
            Backoff::Fixed => base,
            Backoff::Decorrelated => prev_ns.max(base).saturating_mul(3),
        };
        d.min(self.max_delay_ns)
    }

    /// Everything after a result was found retryable. Out of line: the
    /// happy path, inlined into tower's future, stays a few instructions.
    #[cold]
    #[inline(never)]
    fn after_failure(
        &mut self,
        hint: Option<Duration>,
        req_deadline: Option<Instant>,
    ) -> Option<super::future::Backoff> {
        if self.attempts >= self.max_attempts {
            self.obs.gave_up("max_attempts");
            crate::trace::retry_gave_up("max_attempts", self.attempts);
            return None;
        }
        // A server's hint (Retry-After, gRPC pushback) is the least it asks
        // for, never less than the backoff: a "retry now" (0) from a
        // half-open breaker or a sub-millisecond rate limit would otherwise
        // retry at once, again and again.
        let backoff = self.next_delay(self.attempts);
        let delay = match hint {
            Some(d) => d.max(backoff).min(Duration::from_nanos(self.max_delay_ns)),
            None => backoff,
        };
        let now = Instant::now();
        let deadline = crate::earliest(deadline::current(), req_deadline);
        // Waking at or after the deadline would leave no time for the attempt:
        // give the caller the last real error now instead of a timeout later.
        // tokio's timer fires on whole milliseconds, rounding up, so the
        // sleep may end up to one tick after `now + delay`.
        if deadline.is_some_and(|d| crate::later(now, delay.saturating_add(TIMER_TICK)) >= d) {
            self.obs.gave_up("deadline");
            crate::trace::retry_gave_up("deadline", self.attempts);
            return None;
        }
        // Withdrawn last, so a retry that the checks above refuse costs no token.
        if let Some(budget) = &self.budget
            && !budget.withdraw()
        {
            self.obs.gave_up("budget");
            crate::trace::retry_gave_up("budget", self.attempts);
            return None;
        }
        self.obs.retrying();
        crate::trace::retrying(self.attempts, delay);
        Some(super::future::Backoff::until(crate::later(now, delay)))
    }

    /// The delay before retry `n`, jitter applied.
    fn next_delay(&mut self, n: u32) -> Duration {
        let upper = self.upper_delay(n, self.prev_ns);
        let d = if !self.jitter {
            upper
        } else {
            let low = match self.backoff {
                Backoff::Decorrelated => self.base_ns.min(upper),
                _ => 0,
            };
            fastrand::u64(low..=upper)
        };
        self.prev_ns = d;
        Duration::from_nanos(d)
    }
}

impl Default for RetryPolicy {
    /// Exponential from [`DEFAULT_BASE_DELAY`](Self::DEFAULT_BASE_DELAY),
    /// with the other defaults and a default [`RetryBudget`].
    fn default() -> Self {
        RetryPolicy::exponential(Self::DEFAULT_BASE_DELAY).budget(RetryBudget::default())
    }
}

impl<C, Req, Res> tower::retry::Policy<Req, Res, BoxError> for RetryPolicy<C>
where
    C: Classify<Req, Res>,
{
    type Future = super::future::Backoff;

    #[inline]
    fn retry(
        &mut self,
        req: &mut Req,
        result: &mut Result<Res, BoxError>,
    ) -> Option<super::future::Backoff> {
        self.attempts = self.attempts.saturating_add(1);
        let hint = match self.classify.classify(req, result) {
            Action::Done => return None,
            Action::Retry => None,
            Action::RetryAfter(d) => Some(d),
        };
        let req_deadline = self.classify.deadline(req);
        self.after_failure(hint, req_deadline)
    }

    #[inline]
    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        if self.attempts == 0 {
            // Called once per call on the layer's copy, then after each retry
            // on the future's copy (attempts ≥ 1): one deposit per call.
            if let Some(budget) = &self.budget {
                budget.deposit();
            }
            if self.max_attempts <= 1 {
                return None;
            }
        }
        self.classify.clone_request(req)
    }
}
