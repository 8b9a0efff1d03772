//! The shared breaker: one packed state word, a sliding window, and the
//! transitions between states.
//!
//! The hot paths never lock. Admission in Closed is one atomic load; in
//! HalfOpen it is one compare-and-swap that reserves a probe slot; in Open it
//! is a load and a clock read. Recording an outcome touches the window only.
//! Transitions, which are rare, take `transition` (a plain `std` mutex, never
//! held across an await) so that preparing the next state's window and
//! publishing the state are one step for every other thread.

use super::window::{
    CachePadded, Consecutive, CountWindow, FAIL, REC, SLOW, Snapshot, TimeWindow, Window,
};
use super::{Event, State, Transition};
use crate::classify::Outcome;
use crate::error::RejectionKind;
use crate::observe::BreakerMetrics;
use crate::wake::WakerSet;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Waker;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// The kind of sliding window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum WindowKind {
    Count(usize),
    Time(Duration),
    Consecutive(u32),
}

/// Backoff for repeated opens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Backoff {
    pub(crate) max: Duration,
    pub(crate) jitter: f64,
}

/// Checked settings.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Settings {
    pub(crate) window: WindowKind,
    pub(crate) minimum_calls: usize,
    pub(crate) failure_rate: f64,
    pub(crate) slow: Option<(f64, Duration)>,
    pub(crate) open_for: Duration,
    pub(crate) backoff: Option<Backoff>,
    pub(crate) half_open_calls: usize,
    pub(crate) max_wait_in_half_open: Option<Duration>,
    pub(crate) backpressure: bool,
    /// The label of the breaker's metrics and its registry entry.
    pub(crate) name: Option<Arc<str>>,
}

// State word: kind:3 | reserved:16 | epoch:45.
const KIND_MASK: u64 = 0b111;
const RESERVED_SHIFT: u32 = 3;
const RESERVED_ONE: u64 = 1 << RESERVED_SHIFT;
const RESERVED_MASK: u64 = 0xFFFF << RESERVED_SHIFT;
const EPOCH_SHIFT: u32 = 19;

const K_CLOSED: u64 = 0;
const K_OPEN: u64 = 1;
const K_HALF_OPEN: u64 = 2;
const K_FORCED_OPEN: u64 = 3;
const K_DISABLED: u64 = 4;

/// The most probes one half-open state can admit.
pub(crate) const MAX_HALF_OPEN_CALLS: usize = 0xFFFF;

fn kind_of(word: u64) -> State {
    match word & KIND_MASK {
        K_CLOSED => State::Closed,
        K_OPEN => State::Open,
        K_HALF_OPEN => State::HalfOpen,
        K_FORCED_OPEN => State::ForcedOpen,
        _ => State::Disabled,
    }
}

fn kind_bits(s: State) -> u64 {
    match s {
        State::Closed => K_CLOSED,
        State::Open => K_OPEN,
        State::HalfOpen => K_HALF_OPEN,
        State::ForcedOpen => K_FORCED_OPEN,
        State::Disabled => K_DISABLED,
    }
}

fn epoch_of(word: u64) -> u64 {
    word >> EPOCH_SHIFT
}

fn reserved_of(word: u64) -> usize {
    ((word & RESERVED_MASK) >> RESERVED_SHIFT) as usize
}

fn generation(epoch: u64) -> u16 {
    epoch as u16
}

/// An admitted call: which state admitted it, and when it started (only when
/// slow-call detection needs to know).
#[derive(Debug)]
pub(crate) struct Ticket {
    /// `probe:1 | epoch:63`. Two plain words keep the ticket cheap to move
    /// through the response future.
    tag: u64,
    /// Nanoseconds since the breaker's base, or `NO_START`.
    start: u64,
}

const PROBE_BIT: u64 = 1 << 63;
const NO_START: u64 = u64::MAX;

impl Ticket {
    #[inline]
    fn new(epoch: u64, probe: bool, start: u64) -> Self {
        Ticket {
            tag: epoch | if probe { PROBE_BIT } else { 0 },
            start,
        }
    }

    #[inline]
    fn epoch(&self) -> u64 {
        self.tag & !PROBE_BIT
    }

    /// Whether this call holds a half-open probe slot.
    #[inline]
    pub(crate) fn is_probe(&self) -> bool {
        self.tag & PROBE_BIT != 0
    }

    /// The probe slot has been accounted for: dropping the call must not
    /// give it back.
    #[inline]
    pub(crate) fn spend(&mut self) {
        self.tag &= !PROBE_BIT;
    }
}

/// One service's (and its clones') access to a shared breaker. Calls hold an
/// `Arc<Lane>`, so the reference counting of the hot path stays on the
/// lane's cache line, written by the core that runs that service, instead of
/// the breaker's, which every core would bounce.
pub(crate) struct Lane {
    pub(crate) breaker: Arc<Breaker>,
    /// This lane's reserved positions in a count window.
    cursor: AtomicU64,
}

impl Lane {
    pub(crate) fn new(breaker: Arc<Breaker>) -> Arc<Lane> {
        Arc::new(Lane {
            breaker,
            cursor: AtomicU64::new(0),
        })
    }

    #[inline]
    pub(crate) fn record(&self, ticket: &Ticket, verdict: Outcome, now: Option<Instant>) {
        self.breaker.record(ticket, verdict, now, &self.cursor);
    }

    #[cold]
    pub(crate) fn record_unanswered(&self, ticket: &Ticket) {
        self.breaker.record_unanswered(ticket, &self.cursor);
    }
}

/// What `poll_ready` should wait for in readiness mode.
pub(crate) enum Readiness {
    Ready,
    WaitUntil(Instant),
}

pub(crate) struct Breaker {
    /// Read by every admission: on a cache line of its own, away from the
    /// Arc's reference count and the window's counters.
    state: CachePadded<AtomicU64>,
    pub(crate) settings: Settings,
    window: Window,
    /// Half-open results: `gen:16 | done:16 | failed:16 | slow:16`.
    probes: AtomicU64,
    /// Nanoseconds since `base` at which Open turns HalfOpen.
    open_until: AtomicU64,
    /// Nanoseconds since `base` at which HalfOpen began.
    half_open_since: AtomicU64,
    /// Opens since the breaker last closed, for the backoff.
    opens: AtomicU32,
    rng: AtomicU64,
    base: Instant,
    transition: Mutex<()>,
    /// Made by the first `subscribe`: a keyed breaker makes one breaker per
    /// key, and each ring is some kilobytes that almost no one reads.
    events: OnceLock<broadcast::Sender<Event>>,
    /// State changes alone, so that a flood of rejections cannot push them
    /// out of a receiver's window. Made by the first `subscribe_transitions`.
    transitions: OnceLock<broadcast::Sender<Event>>,
    obs: BreakerMetrics,
    /// The last few transitions, for the status page. Written only under
    /// `transition`.
    recent: Mutex<VecDeque<Transition>>,
    /// Readiness mode: the tasks whose `poll_ready` waits for the open
    /// period to end, woken by every transition too (an operator's `reset`
    /// must not wait out the timer).
    ready_waiters: WakerSet,
    /// Every transition: for a service waiting, while closed, for an inner
    /// service that is not ready, so that a trip lets it fail fast. Each
    /// service holds its own registration (an `OwnedNotified`), dropped
    /// with it.
    pub(crate) trips: Arc<tokio::sync::Notify>,
}

/// How many transitions [`Breaker::recent`] keeps.
const RECENT: usize = 16;

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &kind_of(self.state.load(Relaxed)))
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    pub(crate) fn new(settings: Settings) -> Self {
        Breaker::with_key(settings, None)
    }

    /// A breaker whose metrics carry a `key` label too (keyed breakers).
    pub(crate) fn with_key(settings: Settings, key: Option<&str>) -> Self {
        let window = match settings.window {
            WindowKind::Count(n) => Window::Count(CountWindow::new(n)),
            WindowKind::Time(d) => {
                let width = (d.as_nanos() / super::window::TIME_BUCKETS as u128).max(1);
                Window::Time(TimeWindow::new(
                    width.min(u64::MAX as u128) as u64,
                    settings.slow.is_some(),
                ))
            }
            WindowKind::Consecutive(_) => Window::Consecutive(Consecutive::new()),
        };
        window.reset(generation(0));
        let obs = BreakerMetrics::new(settings.name.as_deref(), key);
        Breaker {
            state: CachePadded(AtomicU64::new(K_CLOSED)),
            settings,
            window,
            probes: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            half_open_since: AtomicU64::new(0),
            opens: AtomicU32::new(0),
            rng: AtomicU64::new(random_seed()),
            base: Instant::now(),
            transition: Mutex::new(()),
            events: OnceLock::new(),
            transitions: OnceLock::new(),
            obs,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            ready_waiters: WakerSet::default(),
            trips: Arc::default(),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64
    }

    /// A call's start, read only when slow-call detection needs it.
    #[inline]
    fn start(&self) -> u64 {
        if self.settings.slow.is_some() {
            self.nanos(Instant::now())
        } else {
            NO_START
        }
    }

    /// Whether the breaker is open, forced open or half-open: a call now
    /// would be rejected or be a probe. One load, no clock.
    #[inline]
    pub(crate) fn not_closed(&self) -> bool {
        matches!(
            self.state.load(Acquire) & KIND_MASK,
            K_OPEN | K_FORCED_OPEN | K_HALF_OPEN
        )
    }

    /// Rejects a call whose inner service was not ready while the breaker
    /// was not closed (see `CircuitBreaker::poll_ready`), without admitting
    /// it: counted, traced and sent as a rejection like any other. It makes
    /// the moves a call would: an open period that has ended turns
    /// half-open, and half-open probes stalled past
    /// `max_wait_in_half_open` reopen it (a stalled probe is often what
    /// keeps the inner service not ready). The time given is what a
    /// rejection in that state gives.
    #[cold]
    pub(crate) fn reject_unready(&self) -> Duration {
        let mut state = self.state();
        if state == State::HalfOpen {
            let word = self.state.load(Acquire);
            if word & KIND_MASK == K_HALF_OPEN
                && reserved_of(word) > 0
                && self.reopen_if_stalled(word)
            {
                state = self.state();
            }
        }
        let retry_after = match state {
            State::Open => self.open_remaining().unwrap_or(Duration::ZERO),
            State::ForcedOpen => self.settings.open_for,
            _ => Duration::ZERO,
        };
        self.reject(state, retry_after)
    }

    /// Half-open (`word`) with probes out: if they have run past
    /// `max_wait_in_half_open` since the first, they have stalled, and the
    /// breaker goes back to Open. Whether it did.
    fn reopen_if_stalled(&self, word: u64) -> bool {
        let Some(max_wait) = self.settings.max_wait_in_half_open else {
            return false;
        };
        let n = self.nanos(Instant::now());
        let since = self.half_open_since.load(Acquire);
        if n < since.saturating_add(duration_nanos(max_wait)) {
            return false;
        }
        self.transition_from(word, State::Open, n, "half-open probes stalled");
        true
    }

    /// Decides whether a call may go through.
    ///
    /// `Err` carries the time until a probe may pass.
    #[inline]
    pub(crate) fn admit(&self) -> Result<Ticket, Duration> {
        let mut word = self.state.load(Acquire);
        loop {
            match word & KIND_MASK {
                K_CLOSED | K_DISABLED => {
                    return Ok(Ticket::new(epoch_of(word), false, self.start()));
                }
                K_OPEN => {
                    let now = Instant::now();
                    let n = self.nanos(now);
                    let until = self.open_until.load(Acquire);
                    if n < until {
                        return Err(self.reject(State::Open, Duration::from_nanos(until - n)));
                    }
                    self.open_to_half_open(word, n);
                    word = self.state.load(Acquire);
                }
                K_HALF_OPEN => {
                    if reserved_of(word) < self.settings.half_open_calls {
                        if reserved_of(word) == 0 && self.settings.max_wait_in_half_open.is_some() {
                            // The wait for stalled probes runs from the
                            // first probe, not from the turn to HalfOpen,
                            // which reading the state may make long before
                            // any call comes. Stored before the slot is
                            // taken, so that no caller who finds every slot
                            // taken sees an older start.
                            self.half_open_since
                                .store(self.nanos(Instant::now()), Release);
                        }
                        match self.state.compare_exchange_weak(
                            word,
                            word + RESERVED_ONE,
                            AcqRel,
                            Acquire,
                        ) {
                            Ok(_) => {
                                return Ok(Ticket::new(epoch_of(word), true, self.start()));
                            }
                            Err(actual) => {
                                word = actual;
                                continue;
                            }
                        }
                    }
                    if self.reopen_if_stalled(word) {
                        word = self.state.load(Acquire);
                        continue;
                    }
                    return Err(self.reject(State::HalfOpen, Duration::ZERO));
                }
                _ => return Err(self.reject(State::ForcedOpen, self.settings.open_for)),
            }
        }
    }

    #[cold]
    fn reject(&self, state: State, retry_after: Duration) -> Duration {
        self.obs.rejected();
        crate::trace::rejected(
            "circuit_breaker",
            RejectionKind::CircuitOpen,
            Some(retry_after),
        );
        if let Some(events) = self.events.get() {
            let _ = events.send(Event::Rejected { state, retry_after });
        }
        retry_after
    }

    /// Whether a call admitted with `ticket` needs the clock when it finishes.
    #[inline]
    pub(crate) fn needs_clock(&self, ticket: &Ticket) -> bool {
        ticket.start != NO_START || (!ticket.is_probe() && self.window.needs_clock())
    }

    /// Records the outcome of an admitted call.
    fn record(&self, ticket: &Ticket, verdict: Outcome, now: Option<Instant>, lane: &AtomicU64) {
        let failed = match verdict {
            Outcome::Ignore => {
                if ticket.is_probe() {
                    self.release_probe(ticket.epoch());
                }
                return;
            }
            Outcome::Failure => true,
            Outcome::Success => false,
        };
        self.obs.call(failed, ticket.is_probe());
        let slow = match (self.settings.slow, now) {
            (Some((_, d)), Some(now)) if ticket.start != NO_START => {
                self.nanos(now).saturating_sub(ticket.start) >= duration_nanos(d)
            }
            _ => false,
        };
        self.count(ticket, failed, slow, now, lane);
    }

    /// An admitted call that ended without an answer from the dependency,
    /// and that nothing else counts: cut by the caller's deadline
    /// (`DeadlineExceeded` not caused by an attempt timeout), or dropped
    /// before the response came. If slow-call detection is on and it had
    /// run for `slow_call_duration`, the dependency was slow by definition:
    /// it counts as a slow call (not as a failure). Otherwise it counts as
    /// nothing, and a probe gives its slot back.
    ///
    /// Not in the consecutive-failures mode, where a call that is not a
    /// failure would end the run of failures.
    #[cold]
    pub(crate) fn record_unanswered(&self, ticket: &Ticket, lane: &AtomicU64) {
        if let Some((_, d)) = self.settings.slow
            && ticket.start != NO_START
            && !matches!(self.window, Window::Consecutive(_))
        {
            let now = Instant::now();
            if self.nanos(now).saturating_sub(ticket.start) >= duration_nanos(d) {
                self.obs.unanswered_slow(ticket.is_probe());
                self.count(ticket, false, true, Some(now), lane);
                return;
            }
        }
        self.record(ticket, Outcome::Ignore, None, lane);
    }

    /// Counts a call in the window, or as a probe.
    fn count(
        &self,
        ticket: &Ticket,
        failed: bool,
        slow: bool,
        now: Option<Instant>,
        lane: &AtomicU64,
    ) {
        if ticket.is_probe() {
            self.record_probe(ticket.epoch(), failed, slow);
            return;
        }
        let g = generation(ticket.epoch());
        let bits = REC | if failed { FAIL } else { 0 } | if slow { SLOW } else { 0 };
        let trip = match &self.window {
            Window::Count(w) => w
                .record(g, bits, lane)
                .is_some_and(|s| self.trips(s, self.settings.minimum_calls)),
            Window::Time(w) => {
                let n = self.nanos(now.unwrap_or_else(Instant::now));
                w.record(g, bits, n)
                    .is_some_and(|s| self.trips(s, self.settings.minimum_calls))
            }
            Window::Consecutive(w) => {
                let WindowKind::Consecutive(k) = self.settings.window else {
                    unreachable!()
                };
                w.record(g, failed).is_some_and(|run| run >= u64::from(k))
            }
        };
        if trip {
            self.trip(ticket.epoch());
        }
    }

    fn trips(&self, s: Snapshot, minimum: usize) -> bool {
        if s.total == 0 || s.total < minimum as u64 {
            return false;
        }
        // `rate * total` can round up past a whole count (0.55 * 100 is
        // 55.00000000000001), so 55 failures of 100 would not reach 0.55. A
        // slack far below one call absorbs that, and keeps the hot path to
        // multiplications.
        let total = s.total as f64;
        let slack = total * 1e-9;
        if s.failures as f64 + slack >= self.settings.failure_rate * total {
            return true;
        }
        match self.settings.slow {
            Some((rate, _)) => s.slow as f64 + slack >= rate * total,
            None => false,
        }
    }

    #[cold]
    fn trip(&self, epoch: u64) {
        let word = self.state.load(Acquire);
        if word & KIND_MASK != K_CLOSED || epoch_of(word) != epoch {
            return;
        }
        let n = self.nanos(Instant::now());
        self.transition_from(
            word,
            State::Open,
            n,
            "failure or slow-call threshold reached",
        );
    }

    fn release_probe(&self, epoch: u64) {
        let mut word = self.state.load(Acquire);
        loop {
            if word & KIND_MASK != K_HALF_OPEN || epoch_of(word) != epoch || reserved_of(word) == 0
            {
                return;
            }
            match self
                .state
                .compare_exchange_weak(word, word - RESERVED_ONE, AcqRel, Acquire)
            {
                Ok(_) => return,
                Err(actual) => word = actual,
            }
        }
    }

    fn record_probe(&self, epoch: u64, failed: bool, slow: bool) {
        let g = u64::from(generation(epoch));
        let n = self.settings.half_open_calls as u64;
        let mut c = self.probes.load(Acquire);
        let decided = loop {
            if c >> 48 != g {
                return;
            }
            let done = ((c >> 32) & 0xFFFF) + 1;
            let bad = ((c >> 16) & 0xFFFF) + u64::from(failed);
            let slw = (c & 0xFFFF) + u64::from(slow);
            if done > n {
                return;
            }
            let next = (g << 48) | (done << 32) | (bad << 16) | slw;
            match self.probes.compare_exchange_weak(c, next, AcqRel, Acquire) {
                Ok(_) if done == n => break (bad, slw),
                Ok(_) => return,
                Err(actual) => c = actual,
            }
        };
        // This thread finished the last probe: it decides.
        let s = Snapshot {
            total: n,
            failures: decided.0,
            slow: decided.1,
        };
        let word = self.state.load(Acquire);
        if word & KIND_MASK != K_HALF_OPEN || epoch_of(word) != epoch {
            return;
        }
        let now = self.nanos(Instant::now());
        if self.trips(s, 0) {
            self.transition_from(word, State::Open, now, "half-open probes failed");
        } else {
            self.transition_from(word, State::Closed, now, "half-open probes succeeded");
        }
    }

    #[cold]
    fn open_to_half_open(&self, word: u64, now_nanos: u64) {
        self.transition_from(word, State::HalfOpen, now_nanos, "open_for elapsed");
    }

    /// Moves from the state in `word` (kind and epoch) to `to`, unless another
    /// thread moved first. Returns whether this call made the move.
    fn transition_from(&self, word: u64, to: State, now_nanos: u64, why: &'static str) -> bool {
        let _g = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.state.load(Acquire);
        if cur & KIND_MASK != word & KIND_MASK || epoch_of(cur) != epoch_of(word) {
            return false;
        }
        self.publish(cur, to, now_nanos, why);
        true
    }

    /// Moves to `to` whatever the current state. Used by the handle.
    fn transition_any(&self, to: State, why: &'static str) {
        let _g = self.transition.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.state.load(Acquire);
        let now = self.nanos(Instant::now());
        self.publish(cur, to, now, why);
    }

    /// Prepares `to`'s data, then publishes it. Caller holds `transition`.
    fn publish(&self, cur: u64, to: State, now_nanos: u64, why: &'static str) {
        let from = kind_of(cur);
        let epoch = (epoch_of(cur) + 1) & ((1 << (64 - EPOCH_SHIFT)) - 1);
        let g = generation(epoch);
        match to {
            State::Closed | State::Disabled => {
                self.window.reset(g);
                self.opens.store(0, Relaxed);
            }
            State::Open => {
                let opens = self.opens.load(Relaxed).saturating_add(1);
                self.opens.store(opens, Relaxed);
                let d = self.open_duration(opens);
                self.open_until
                    .store(now_nanos.saturating_add(duration_nanos(d)), Release);
            }
            State::HalfOpen => {
                self.probes.store(u64::from(g) << 48, Release);
                self.half_open_since.store(now_nanos, Release);
            }
            State::ForcedOpen => {}
        }
        self.state
            .store((epoch << EPOCH_SHIFT) | kind_bits(to), Release);
        if matches!(to, State::Open | State::ForcedOpen) {
            tracing::warn!(
                target: "tower_firebreak",
                layer = "circuit_breaker",
                from = from.as_str(),
                to = to.as_str(),
                reason = why,
                "circuit breaker state change"
            );
        } else {
            tracing::info!(
                target: "tower_firebreak",
                layer = "circuit_breaker",
                from = from.as_str(),
                to = to.as_str(),
                reason = why,
                "circuit breaker state change"
            );
        }
        self.obs.transition(from, to);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(Transition::new(from, to, why));
        }
        if let Some(events) = self.events.get() {
            let _ = events.send(Event::Transition { from, to });
        }
        if let Some(transitions) = self.transitions.get() {
            let _ = transitions.send(Event::Transition { from, to });
        }
        self.ready_waiters.wake_all();
        self.trips.notify_waiters();
    }

    /// Readiness mode: wakes `waker` at the next transition.
    pub(crate) fn wake_on_transition(&self, waker: &Waker) {
        self.ready_waiters.add(waker);
    }

    /// How long the `opens`-th consecutive open lasts.
    fn open_duration(&self, opens: u32) -> Duration {
        let base = self.settings.open_for;
        let Some(b) = self.settings.backoff else {
            return base;
        };
        let factor = 2f64.powi(opens.saturating_sub(1).min(62) as i32);
        let d = base.as_secs_f64() * factor;
        let d = d.min(b.max.as_secs_f64());
        let d = if b.jitter > 0.0 {
            // Jitter downwards, so the cap still holds.
            d * (1.0 - b.jitter * self.random_unit())
        } else {
            d
        };
        Duration::try_from_secs_f64(d.max(0.0)).unwrap_or(Duration::MAX)
    }

    /// A number in [0, 1) from a splitmix64 sequence (no dependency needed for
    /// a few draws per open).
    fn random_unit(&self) -> f64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    // -- handle --------------------------------------------------------------

    /// The state a call would see now (an elapsed Open turns HalfOpen).
    pub(crate) fn state(&self) -> State {
        let word = self.state.load(Acquire);
        if word & KIND_MASK == K_OPEN {
            let n = self.nanos(Instant::now());
            if n >= self.open_until.load(Acquire) {
                self.open_to_half_open(word, n);
                return kind_of(self.state.load(Acquire));
            }
        }
        kind_of(word)
    }

    pub(crate) fn force_open(&self) {
        self.transition_any(State::ForcedOpen, "forced open by handle");
    }

    pub(crate) fn reset(&self) {
        self.transition_any(State::Closed, "reset by handle");
    }

    pub(crate) fn disable(&self) {
        self.transition_any(State::Disabled, "disabled by handle");
    }

    /// The last transitions, oldest first.
    pub(crate) fn recent(&self) -> Vec<Transition> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub(crate) fn subscribe_transitions(&self) -> broadcast::Receiver<Event> {
        self.transitions
            .get_or_init(|| broadcast::channel(64).0)
            .subscribe()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events
            .get_or_init(|| broadcast::channel(256).0)
            .subscribe()
    }

    /// The window's counts now.
    pub(crate) fn counts(&self) -> Snapshot {
        self.window.counts(self.nanos(Instant::now()))
    }

    /// Whether a call now would find the breaker half-open with every probe
    /// slot taken. Probes stalled past `max_wait_in_half_open` reopen it
    /// first, as a call would (then `false`: it is open).
    pub(crate) fn half_open_full(&self) -> bool {
        let word = self.state.load(Acquire);
        word & KIND_MASK == K_HALF_OPEN
            && reserved_of(word) >= self.settings.half_open_calls
            && !self.reopen_if_stalled(word)
    }

    /// Time left until Open turns HalfOpen, if Open.
    pub(crate) fn open_remaining(&self) -> Option<Duration> {
        let word = self.state.load(Acquire);
        if word & KIND_MASK != K_OPEN {
            return None;
        }
        let n = self.nanos(Instant::now());
        let until = self.open_until.load(Acquire);
        Some(Duration::from_nanos(until.saturating_sub(n)))
    }

    /// For readiness mode: whether `poll_ready` may pass now.
    pub(crate) fn readiness(&self) -> Readiness {
        let word = self.state.load(Acquire);
        match word & KIND_MASK {
            K_OPEN => {
                let now = Instant::now();
                let n = self.nanos(now);
                let until = self.open_until.load(Acquire);
                if n < until {
                    Readiness::WaitUntil(later(now, Duration::from_nanos(until - n)))
                } else {
                    self.open_to_half_open(word, n);
                    Readiness::Ready
                }
            }
            K_FORCED_OPEN => Readiness::WaitUntil(later(Instant::now(), self.settings.open_for)),
            _ => Readiness::Ready,
        }
    }
}

/// A per-breaker seed, so that the breakers of one process (keyed breakers
/// above all) do not jitter in step. std's `RandomState` is randomly keyed.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

use crate::later;

fn duration_nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}
