//! The `tracing` events every layer emits, in one place so their fields agree.

use crate::error::RejectionKind;
use std::time::Duration;

/// A call was rejected by one of our layers.
///
/// Debug level: under overload there is one per shed call, and the counters
/// (or metrics) are the place to watch rates.
#[inline]
pub(crate) fn rejected(layer: &'static str, kind: RejectionKind, retry_after: Option<Duration>) {
    tracing::debug!(
        target: "tower_firebreak",
        layer,
        kind = kind.as_str(),
        retry_after_ms = retry_after.map(crate::duration_ms),
        "call rejected"
    );
}

/// A retry layer will try the call again after `delay`.
#[inline]
pub(crate) fn retrying(attempt: u32, delay: Duration) {
    tracing::debug!(
        target: "tower_firebreak",
        layer = "retry",
        attempt,
        delay_ms = crate::duration_ms(delay),
        "retrying"
    );
}

/// A retryable failure is returned to the caller unchanged because of
/// `reason`: "max_attempts", "deadline" or "budget".
#[inline]
pub(crate) fn retry_gave_up(reason: &'static str, attempts: u32) {
    tracing::debug!(
        target: "tower_firebreak",
        layer = "retry",
        reason,
        attempts,
        "not retrying; returning the last result"
    );
}

/// A request body was too large to buffer for replay, so the request goes
/// once, unretried.
#[inline]
pub(crate) fn not_replayable(layer: &'static str, limit: usize) {
    tracing::debug!(
        target: "tower_firebreak",
        layer,
        limit,
        "request body over the replay limit; sent once, not retried"
    );
}

/// A hedge layer sent a second copy of a request.
#[inline]
pub(crate) fn hedge_sent() {
    tracing::debug!(target: "tower_firebreak", layer = "hedge", "hedged request sent");
}

/// A hedge layer did not send the second copy: "budget" or "not_ready".
#[inline]
pub(crate) fn hedge_skipped(reason: &'static str) {
    tracing::debug!(target: "tower_firebreak", layer = "hedge", reason, "hedge not sent");
}

/// The chaos layer injected a fault.
///
/// Debug level, like rejections: one per faulty call.
#[inline]
pub(crate) fn injected(fault: &'static str, delay: Duration) {
    tracing::debug!(
        target: "tower_firebreak",
        layer = "chaos",
        fault,
        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        "fault injected"
    );
}
