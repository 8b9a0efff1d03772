//! Metric handles for named layer instances, on the `metrics` facade.
//!
//! Each handle struct is built once, when a named layer is built, so the hot
//! path only bumps an atomic through a pre-registered `metrics::Counter`: no
//! label formatting, no map look-up, no allocation per call. Without the
//! `metrics` feature every struct is empty and every method an empty inline
//! function, so the calls compile away. An unnamed instance has no handles
//! either (one predictable branch per call).
//!
//! The series names are listed in the [`registry`](crate::registry) docs.

use crate::circuit_breaker::State;
use std::time::Duration;

/// The series names, OpenTelemetry style. The Prometheus exporter turns the
/// dots into underscores.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) mod names {
    pub(crate) const CALLS: &str = "firebreak.calls";
    pub(crate) const REJECTIONS: &str = "firebreak.rejections";
    pub(crate) const BREAKER_STATE: &str = "firebreak.breaker.state";
    pub(crate) const BREAKER_TRANSITIONS: &str = "firebreak.breaker.transitions";
    pub(crate) const BREAKER_PROBES: &str = "firebreak.breaker.probes";
    pub(crate) const BULKHEAD_IN_FLIGHT: &str = "firebreak.bulkhead.in_flight";
    pub(crate) const BULKHEAD_WAIT: &str = "firebreak.bulkhead.wait";
    pub(crate) const QUEUE_DEPTH: &str = "firebreak.queue.depth";
    pub(crate) const QUEUE_OLDEST_AGE: &str = "firebreak.queue.oldest_age";
    pub(crate) const QUEUE_DEAD_LETTERS: &str = "firebreak.queue.dead_letters";
    pub(crate) const DEFER_ENQUEUE: &str = "firebreak.defer.enqueue.duration";
    pub(crate) const REPLAY_DURATION: &str = "firebreak.replay.duration";
    pub(crate) const REPLAY_JOBS: &str = "firebreak.replay.jobs";
    pub(crate) const RETRY_ATTEMPTS: &str = "firebreak.retry.attempts";
    pub(crate) const RETRY_GAVE_UP: &str = "firebreak.retry.gave_up";
}

#[cfg(feature = "metrics")]
mod imp {
    use super::names::*;
    use crate::circuit_breaker::State;
    use metrics::{Counter, Gauge, Histogram, Label, counter, gauge, histogram};

    pub(crate) const STATES: [State; 5] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::ForcedOpen,
        State::Disabled,
    ];

    pub(crate) fn state_index(s: State) -> usize {
        match s {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::Disabled => 4,
        }
    }

    #[derive(Debug)]
    pub(crate) struct Breaker {
        /// `name`, and `key` for an opted-in keyed breaker.
        pub(crate) labels: Vec<Label>,
        pub(crate) success: Counter,
        pub(crate) failure: Counter,
        pub(crate) rejected: Counter,
        pub(crate) rejections: Counter,
        pub(crate) probe_success: Counter,
        pub(crate) probe_failure: Counter,
        /// Calls that ended unanswered (cut by the caller's deadline, or
        /// dropped) after `slow_call_duration`: counted as slow.
        pub(crate) unanswered: Counter,
        pub(crate) probe_unanswered: Counter,
        pub(crate) state: [Gauge; 5],
    }

    pub(crate) fn with(base: &[Label], extra: &[(&'static str, &'static str)]) -> Vec<Label> {
        let mut v = base.to_vec();
        v.extend(extra.iter().map(|(k, val)| Label::new(*k, *val)));
        v
    }

    impl Breaker {
        pub(crate) fn new(name: &str, key: Option<&str>) -> Self {
            let mut labels = vec![Label::new("name", name.to_owned())];
            if let Some(k) = key {
                labels.push(Label::new("key", k.to_owned()));
            }
            let b = &labels;
            let calls = |outcome: &'static str| {
                counter!(
                    CALLS,
                    with(b, &[("layer", "circuit_breaker"), ("outcome", outcome)])
                )
            };
            let probes =
                |outcome: &'static str| counter!(BREAKER_PROBES, with(b, &[("outcome", outcome)]));
            let state = STATES.map(|s| gauge!(BREAKER_STATE, with(b, &[("state", s.as_str())])));
            state[0].set(1.0);
            for g in &state[1..] {
                g.set(0.0);
            }
            Breaker {
                success: calls("success"),
                failure: calls("failure"),
                rejected: calls("rejected"),
                rejections: counter!(
                    REJECTIONS,
                    with(b, &[("layer", "circuit_breaker"), ("kind", "circuit_open")])
                ),
                probe_success: probes("success"),
                probe_failure: probes("failure"),
                unanswered: calls("unanswered_slow"),
                probe_unanswered: probes("unanswered_slow"),
                state,
                labels,
            }
        }
    }

    #[derive(Clone, Debug)]
    pub(crate) struct Bulkhead {
        pub(crate) admitted: Counter,
        pub(crate) rejected: Counter,
        pub(crate) rejections: Counter,
        pub(crate) wait: Histogram,
        pub(crate) in_flight: Gauge,
    }

    /// `name`, and `key` for an opted-in keyed layer.
    fn base(name: &str, key: Option<&str>) -> Vec<Label> {
        let mut labels = vec![Label::new("name", name.to_owned())];
        if let Some(k) = key {
            labels.push(Label::new("key", k.to_owned()));
        }
        labels
    }

    impl Bulkhead {
        pub(crate) fn new(name: &str, key: Option<&str>) -> Self {
            let b = &base(name, key);
            let calls = |outcome: &'static str| {
                counter!(
                    CALLS,
                    with(b, &[("layer", "bulkhead"), ("outcome", outcome)])
                )
            };
            Bulkhead {
                admitted: calls("admitted"),
                rejected: calls("rejected"),
                rejections: counter!(
                    REJECTIONS,
                    with(b, &[("layer", "bulkhead"), ("kind", "bulkhead_full")])
                ),
                wait: histogram!(BULKHEAD_WAIT, b.clone()),
                in_flight: gauge!(BULKHEAD_IN_FLIGHT, b.clone()),
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct Limiter {
        pub(crate) admitted: Counter,
        pub(crate) rejected: Counter,
        pub(crate) rejections: Counter,
    }

    impl Limiter {
        pub(crate) fn new(name: &str, key: Option<&str>) -> Self {
            let b = &base(name, key);
            let calls = |outcome: &'static str| {
                counter!(
                    CALLS,
                    with(b, &[("layer", "rate_limit"), ("outcome", outcome)])
                )
            };
            Limiter {
                admitted: calls("admitted"),
                rejected: calls("rejected"),
                rejections: counter!(
                    REJECTIONS,
                    with(b, &[("layer", "rate_limit"), ("kind", "rate_limited")])
                ),
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct Retry {
        pub(crate) attempts: Counter,
        pub(crate) max_attempts: Counter,
        pub(crate) deadline: Counter,
        pub(crate) budget: Counter,
    }

    impl Retry {
        pub(crate) fn new(name: &str) -> Self {
            let n = name.to_string();
            let gave_up = |reason: &'static str| counter!(RETRY_GAVE_UP, "name" => n.clone(), "reason" => reason);
            Retry {
                max_attempts: gave_up("max_attempts"),
                deadline: gave_up("deadline"),
                budget: gave_up("budget"),
                attempts: counter!(RETRY_ATTEMPTS, "name" => n),
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct Queue {
        pub(crate) deferred: Counter,
        pub(crate) enqueue: Histogram,
        pub(crate) replay: Histogram,
        pub(crate) delivered: Counter,
        pub(crate) failed: Counter,
        pub(crate) paused: Counter,
        pub(crate) expired: Counter,
        pub(crate) dead: Gauge,
        pub(crate) depth: Gauge,
        pub(crate) oldest_age: Gauge,
    }

    impl Queue {
        pub(crate) fn new(name: &str) -> Self {
            let n = name.to_string();
            let jobs = |outcome: &'static str| counter!(REPLAY_JOBS, "name" => n.clone(), "outcome" => outcome);
            Queue {
                deferred: counter!(CALLS, "layer" => "defer", "name" => n.clone(), "outcome" => "deferred"),
                enqueue: histogram!(DEFER_ENQUEUE, "name" => n.clone()),
                replay: histogram!(REPLAY_DURATION, "name" => n.clone()),
                delivered: jobs("delivered"),
                failed: jobs("failed"),
                paused: jobs("breaker_open"),
                expired: jobs("expired"),
                dead: gauge!(QUEUE_DEAD_LETTERS, "name" => n.clone()),
                depth: gauge!(QUEUE_DEPTH, "name" => n.clone()),
                oldest_age: gauge!(QUEUE_OLDEST_AGE, "name" => n),
            }
        }
    }
}

/// A named breaker's series.
#[derive(Debug, Default)]
pub(crate) struct BreakerMetrics {
    #[cfg(feature = "metrics")]
    inner: Option<imp::Breaker>,
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
impl BreakerMetrics {
    pub(crate) fn new(name: Option<&str>, key: Option<&str>) -> Self {
        BreakerMetrics {
            #[cfg(feature = "metrics")]
            inner: name.map(|n| imp::Breaker::new(n, key)),
        }
    }

    /// A call's outcome; a probe's counts as a probe's too.
    #[inline]
    pub(crate) fn call(&self, failed: bool, probe: bool) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            if failed {
                m.failure.increment(1);
            } else {
                m.success.increment(1);
            }
            match (probe, failed) {
                (false, _) => {}
                (true, true) => m.probe_failure.increment(1),
                (true, false) => m.probe_success.increment(1),
            }
        }
    }

    /// A call that ended unanswered after `slow_call_duration`, counted as
    /// slow (outcome `unanswered_slow`).
    pub(crate) fn unanswered_slow(&self, probe: bool) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.unanswered.increment(1);
            if probe {
                m.probe_unanswered.increment(1);
            }
        }
    }

    #[inline]
    pub(crate) fn rejected(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.rejected.increment(1);
            m.rejections.increment(1);
        }
    }

    /// A state change: cold, so the transition counter is looked up here.
    pub(crate) fn transition(&self, from: State, to: State) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            // Every state's gauge, not just `from` and `to`: two transitions
            // racing (an operator's reset against a trip) could leave two
            // states at 1.
            let now = imp::state_index(to);
            for (i, g) in m.state.iter().enumerate() {
                g.set(if i == now { 1.0 } else { 0.0 });
            }
            metrics::counter!(
                names::BREAKER_TRANSITIONS,
                imp::with(&m.labels, &[("from", from.as_str()), ("to", to.as_str())])
            )
            .increment(1);
        }
    }
}

/// A named bulkhead's series. A clone shares the series (the handles are
/// `Arc`s): no recorder look-up.
#[derive(Clone, Debug, Default)]
pub(crate) struct BulkheadMetrics {
    #[cfg(feature = "metrics")]
    inner: Option<imp::Bulkhead>,
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
impl BulkheadMetrics {
    /// `key`: the `key` label of an opted-in keyed bulkhead's pool.
    pub(crate) fn new(name: Option<&str>, key: Option<&str>) -> Self {
        BulkheadMetrics {
            #[cfg(feature = "metrics")]
            inner: name.map(|n| imp::Bulkhead::new(n, key)),
        }
    }

    #[inline]
    pub(crate) fn admitted(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.admitted.increment(1);
        }
    }

    #[inline]
    pub(crate) fn rejected(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.rejected.increment(1);
            m.rejections.increment(1);
        }
    }

    /// A call that waited for its slot got one after `waited`.
    pub(crate) fn waited(&self, waited: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.admitted.increment(1);
            m.wait.record(waited.as_secs_f64());
        }
    }

    /// Sets the in-flight gauge (sampled by the registry, not per call).
    pub(crate) fn in_flight(&self, n: usize) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.in_flight.set(n as f64);
        }
    }
}

/// A named rate limiter's series.
#[derive(Debug, Default)]
pub(crate) struct LimiterMetrics {
    #[cfg(feature = "metrics")]
    inner: Option<imp::Limiter>,
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
impl LimiterMetrics {
    /// `key`: the `key` label of an opted-in keyed limiter's key.
    pub(crate) fn new(name: Option<&str>, key: Option<&str>) -> Self {
        LimiterMetrics {
            #[cfg(feature = "metrics")]
            inner: name.map(|n| imp::Limiter::new(n, key)),
        }
    }

    #[inline]
    pub(crate) fn admitted(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.admitted.increment(1);
        }
    }

    #[inline]
    pub(crate) fn rejected(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.rejected.increment(1);
            m.rejections.increment(1);
        }
    }
}

/// A named queue's series, shared by its `DeferLayer` and `Replayer`.
#[derive(Debug, Default)]
pub(crate) struct QueueMetrics {
    #[cfg(feature = "metrics")]
    inner: Option<imp::Queue>,
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
impl QueueMetrics {
    pub(crate) fn new(name: Option<&str>) -> Self {
        QueueMetrics {
            #[cfg(feature = "metrics")]
            inner: name.map(imp::Queue::new),
        }
    }

    /// A request was stored; storing it took `took`.
    pub(crate) fn deferred(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.deferred.increment(1);
            m.enqueue.record(took.as_secs_f64());
        }
    }

    /// A replayed job was sent; the send took `took`.
    pub(crate) fn replayed(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.replay.record(took.as_secs_f64());
        }
    }

    pub(crate) fn delivered(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.delivered.increment(1);
        }
    }

    /// A send failed; the job goes back with a backoff.
    pub(crate) fn failed(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.failed.increment(1);
        }
    }

    /// The breaker rejected the send; the job goes back unsent.
    pub(crate) fn paused(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.paused.increment(1);
        }
    }

    /// The job's TTL passed before its turn: dead-lettered unsent.
    pub(crate) fn expired(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.expired.increment(1);
        }
    }

    /// Sets the depth, oldest-age and dead-letter gauges (sampled by the
    /// registry).
    pub(crate) fn sampled(&self, depth: usize, oldest: Option<Duration>, dead: usize) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.depth.set(depth as f64);
            m.oldest_age.set(oldest.map_or(0.0, |d| d.as_secs_f64()));
            m.dead.set(dead as f64);
        }
    }
}

/// A named retry policy's series. The policy is cloned into every call's
/// future, so this is one `Option<Arc>`: a copy of `None` when unnamed.
#[derive(Clone, Debug, Default)]
pub(crate) struct RetryMetrics {
    #[cfg(feature = "metrics")]
    inner: Option<std::sync::Arc<imp::Retry>>,
}

#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
impl RetryMetrics {
    pub(crate) fn new(name: Option<&str>) -> Self {
        RetryMetrics {
            #[cfg(feature = "metrics")]
            inner: name.map(|n| std::sync::Arc::new(imp::Retry::new(n))),
        }
    }

    /// A retry was scheduled.
    pub(crate) fn retrying(&self) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            m.attempts.increment(1);
        }
    }

    /// A retryable failure went back to the caller: "max_attempts",
    /// "deadline" or "budget".
    pub(crate) fn gave_up(&self, reason: &'static str) {
        #[cfg(feature = "metrics")]
        if let Some(m) = &self.inner {
            match reason {
                "max_attempts" => m.max_attempts.increment(1),
                "deadline" => m.deadline.increment(1),
                _ => m.budget.increment(1),
            }
        }
    }
}
