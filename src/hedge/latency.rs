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
    state: Mutex<Windows>,
}

#[derive(Debug)]
struct Windows {
    filling: Histogram<u64>,
    started: Instant,
}

impl LatencyTracker {
    pub(crate) fn new(quantile: f64, min_samples: u64, window: Duration) -> Self {
        LatencyTracker {
            quantile,
            min_samples,
            window,
            delay_us: AtomicU64::new(NONE),
            state: Mutex::new(Windows {
                // 1 µs to 1 h, two significant digits: about 30 KiB.
                filling: Histogram::new_with_bounds(1, 3_600_000_000, 2)
                    .expect("valid histogram bounds"),
                started: Instant::now(),
            }),
        }
    }

    /// The hedge delay, or `None` while the last full window had too few
    /// samples.
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.delay_us.load(Ordering::Relaxed) {
            NONE => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub(crate) fn record(&self, latency: Duration) {
        let now = Instant::now();
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(w.started) >= self.window {
            let delay = if w.filling.len() >= self.min_samples {
                w.filling.value_at_quantile(self.quantile)
            } else {
                NONE
            };
            self.delay_us.store(delay, Ordering::Relaxed);
            w.filling.reset();
            w.started = now;
        }
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        w.filling.saturating_record(us);
    }
}
