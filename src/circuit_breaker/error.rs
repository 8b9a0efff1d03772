use std::fmt;
use std::time::Duration;

use crate::BoxError;

/// The circuit breaker is open: the call was not made.
///
/// [`retry_after`](Self::retry_after) comes from the breaker's real state:
///
/// | state | `retry_after` |
/// | --- | --- |
/// | Open | the time left until it turns half-open |
/// | HalfOpen, every probe slot taken | zero: a slot comes free when a probe finishes |
/// | ForcedOpen | `open_for`, as a hint: only a reset ends it |
///
/// Map it to `503 Service Unavailable` with a `Retry-After` header, or gRPC
/// `UNAVAILABLE`.
///
/// # A rejection that does not allocate
///
/// An open breaker answers every call with this error, so making it must cost
/// nothing: every service's error is a [`BoxError`], and boxing a value that
/// has any size allocates. `CircuitOpen` is therefore zero-sized, and its
/// `retry_after` travels in the box's pointer itself (the trick `std::io::Error`
/// uses for its OS codes); a `Box` of a zero-sized type never touches the
/// allocator. You only ever see it behind a reference or a box, the way an
/// error is read, and it works there: [`find`](crate::error::find),
/// `downcast_ref`, `downcast` to `Box<CircuitOpen>`, `Display`, `Debug`, and
/// through `tower::buffer`'s `Arc`.
///
/// Hold on to the box, not the value: `*boxed` (moving it out of its box)
/// keeps the type but not the `retry_after`. That is why it has no public
/// constructor of its own and is not `Clone`; make one with
/// [`CircuitOpen::new`], which hands back the boxed error.
///
/// ```
/// use std::time::Duration;
/// use tower_firebreak::{BoxError, circuit_breaker::CircuitOpen, error};
///
/// let err: BoxError = CircuitOpen::new(Duration::from_millis(1500));
/// let open = error::find::<CircuitOpen>(&*err).expect("a CircuitOpen");
/// assert_eq!(open.retry_after(), Duration::from_millis(1500));
/// assert_eq!(err.to_string(), "circuit open; retry after 1.5s");
/// ```
pub struct CircuitOpen {
    // Zero-sized with alignment 1, and nobody outside can make one by value.
    _private: (),
}

const _: () = assert!(size_of::<CircuitOpen>() == 0 && align_of::<CircuitOpen>() == 1);

/// What one step of the pointer is worth: a nanosecond where a pointer has 64
/// bits (585 years fit), a microsecond where it has 32 (71 minutes fit; longer
/// is capped there).
const UNIT_NANOS: u128 = if usize::BITS >= 64 { 1 } else { 1_000 };

impl CircuitOpen {
    /// A rejection by an open breaker that will let a probe through after
    /// `retry_after`, as the boxed error a service returns. It does not
    /// allocate.
    #[allow(clippy::new_ret_no_self)] // the box is the value: see the type's docs
    pub fn new(retry_after: Duration) -> BoxError {
        let units = retry_after.as_nanos() / UNIT_NANOS;
        // `+ 1` keeps the pointer non-null, so cap one short of the top.
        let units = usize::try_from(units).map_or(usize::MAX - 1, |u| u.min(usize::MAX - 1));
        let ptr = std::ptr::without_provenance_mut::<CircuitOpen>(units + 1);
        // SAFETY: `CircuitOpen` is zero-sized with alignment 1 (asserted at
        // compile time above), and `ptr` is non-null. For a zero-sized type,
        // `Box`'s documented memory layout requires only a non-null, aligned
        // pointer ("casting any aligned non-zero integer literal to a raw
        // pointer produces a valid pointer"); reads and writes of zero bytes
        // need no provenance, and dropping the box frees nothing. Checked
        // under Miri with strict provenance.
        #[allow(unsafe_code)]
        let boxed = unsafe { Box::from_raw(ptr) };
        boxed
    }

    /// The time left until the breaker lets a probe through.
    ///
    /// Read it where the error lives (by reference or in its box); a value
    /// moved out of its box has lost it.
    pub fn retry_after(&self) -> Duration {
        let units = (self as *const Self).addr().saturating_sub(1) as u128 * UNIT_NANOS;
        let secs = u64::try_from(units / 1_000_000_000).unwrap_or(u64::MAX);
        Duration::new(secs, (units % 1_000_000_000) as u32)
    }
}

impl PartialEq for CircuitOpen {
    fn eq(&self, other: &Self) -> bool {
        self.retry_after() == other.retry_after()
    }
}

impl Eq for CircuitOpen {}

impl fmt::Debug for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitOpen")
            .field("retry_after", &self.retry_after())
            .finish()
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "circuit open; retry after {:?}", self.retry_after())
    }
}

impl std::error::Error for CircuitOpen {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn retry_after_survives_every_way_an_error_is_read() {
        let cases = [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(1500),
            Duration::new(3600, 999_999_999),
            Duration::from_secs(60 * 60 * 24 * 365 * 500),
        ];
        for d in cases {
            let err = CircuitOpen::new(d);
            let open = err.downcast_ref::<CircuitOpen>().expect("top level");
            assert_eq!(open.retry_after(), d);
            assert_eq!(err.to_string(), format!("circuit open; retry after {d:?}"));
            assert_eq!(
                format!("{open:?}"),
                format!("CircuitOpen {{ retry_after: {d:?} }}")
            );
            // tower::buffer shares errors behind an Arc.
            let shared: Arc<BoxError> = Arc::new(err);
            let open = shared.downcast_ref::<CircuitOpen>().expect("in the Arc");
            assert_eq!(open.retry_after(), d);
            let err = Arc::into_inner(shared).expect("sole owner");
            let boxed: Box<CircuitOpen> = err.downcast().expect("downcast");
            assert_eq!(boxed.retry_after(), d);
            assert_eq!(
                *boxed,
                *CircuitOpen::new(d).downcast::<CircuitOpen>().unwrap()
            );
        }
    }

    #[test]
    fn too_long_a_wait_is_capped_not_wrapped() {
        let err = CircuitOpen::new(Duration::MAX);
        let open = err.downcast_ref::<CircuitOpen>().expect("top level");
        assert!(
            open.retry_after() >= Duration::from_secs(60 * 60),
            "{open:?}"
        );
        assert!(open.retry_after() <= Duration::MAX);
    }
}
