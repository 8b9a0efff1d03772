use super::job::system_ms;
use std::time::SystemTime;
use tokio::time::Instant;

/// Wall-clock milliseconds that advance with `tokio::time`.
///
/// Deadlines must be wall-clock to survive a restart, but tests drive time
/// with `tokio::time::pause`. So the system clock is read once, and
/// `tokio::time::Instant` elapsed time is added to it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    base_ms: u64,
    base: Instant,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            base_ms: system_ms(SystemTime::now()),
            base: Instant::now(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        let elapsed = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.base_ms.saturating_add(elapsed)
    }
}
