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
        retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
        "call rejected"
    );
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
