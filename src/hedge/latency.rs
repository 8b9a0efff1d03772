use hdrhistogram::Histogram;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// "No hedge yet": too few samples in the last window.
const NONE: u64 = u64::MAX;

/// Latencies of recent calls, in two rotating histograms: one filling, one
/// full, as tower's hedge keeps them. The delay is computed once per
/// rotation and read with one atomic load per call.
#[derive(Debug)]
pub(crate) struct LatencyTracker {
    quantile: f64,
    min_samples: u64,
    window: Duration,
    delay_us: AtomicU64,
    /// When the filling window started, in µs since `base`. Written only
    /// under `filling`'s lock; read without it to tell a stale delay.
    started_us: AtomicU64,
    base: Instant,
    filling: Mutex<Histogram<u64>>,
}

impl LatencyTracker {
    pub(crate) fn new(quantile: f64, min_samples: u64, window: Duration) -> Self {
        LatencyTracker {
            quantile,
            min_samples,
            window,
            delay_us: AtomicU64::new(NONE),
            started_us: AtomicU64::new(0),
            base: Instant::now(),
            // 1 µs to 1 h, two significant digits: about 30 KiB.
            filling: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds"),
            ),
        }
    }

    /// How long the filling window has run at `now`.
    fn window_age(&self, now: Instant) -> Duration {
        let started = Duration::from_micros(self.started_us.load(Ordering::Relaxed));
        now.saturating_duration_since(self.base)
            .saturating_sub(started)
    }

    /// The hedge delay at `now`, or `None` while the last full window had
    /// too few samples, or when no call has succeeded for two windows: a
    /// dependency that stopped answering must not be sent two copies of
    /// every call at a delay learned while it was healthy.
    pub(crate) fn delay(&self, now: Instant) -> Option<Duration> {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us == NONE || self.window_age(now) >= self.window.saturating_mul(2) {
            return None;
        }
        Some(Duration::from_micros(us))
    }

    pub(crate) fn record(&self, latency: Duration) {
        let now = Instant::now();
        let mut filling = self.filling.lock().unwrap_or_else(|e| e.into_inner());
        let age = self.window_age(now);
        if age >= self.window {
            // A window that ran over two lengths holds samples from before
            // a gap (an outage): they say nothing of the dependency now.
            let stale = age >= self.window.saturating_mul(2);
            let delay = if !stale && filling.len() >= self.min_samples {
                filling.value_at_quantile(self.quantile)
            } else {
                NONE
            };
            self.delay_us.store(delay, Ordering::Relaxed);
            self.started_us.store(
                micros(now.saturating_duration_since(self.base)),
                Ordering::Relaxed,
            );
            filling.reset();
        }
        filling.saturating_record(micros(latency).max(1));
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
