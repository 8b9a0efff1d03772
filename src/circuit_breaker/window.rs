//! The sliding windows. Lock-free on the record path, fixed memory.
//!
//! Every window is tagged with a 16-bit generation: the low bits of the epoch
//! of the Closed (or Disabled) state it belongs to. An outcome recorded by a
//! call admitted in an older state carries an older generation and is dropped,
//! so a slow call from before the breaker opened cannot count against the
//! fresh window after it closes again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

/// What one finished call adds to a window.
pub(crate) const REC: u8 = 1;
pub(crate) const FAIL: u8 = 2;
pub(crate) const SLOW: u8 = 4;

/// Counts read back from a window after a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) total: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

// One window per breaker, padded on purpose: boxing the big variant would put
// a pointer chase on every recorded call.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
    Consecutive(Consecutive),
}

impl Window {
    /// Starts an empty window for generation `gen`.
    ///
    /// Called with the breaker's transition lock held, before the state that
    /// owns `gen` is published, so no call of that generation records yet.
    pub(crate) fn reset(&self, generation: u16) {
        match self {
            Window::Count(w) => w.reset(generation),
            Window::Time(w) => w.reset(generation),
            Window::Consecutive(w) => w.reset(generation),
        }
    }

    /// The counts now (`now_nanos` since the breaker's base).
    pub(crate) fn counts(&self, now_nanos: u64) -> Snapshot {
        match self {
            Window::Count(w) => {
                // A lane transiently negative (see CountWindow) settles at
                // once; read again rather than report it.
                for _ in 0..64 {
                    if let Some(s) = decode_count(w.counter.load(Acquire)) {
                        return s;
                    }
                    std::hint::spin_loop();
                }
                Snapshot {
                    total: 0,
                    failures: 0,
                    slow: 0,
                }
            }
            Window::Time(w) => {
                let generation = w.generation.load(Acquire) as u16;
                w.snapshot(generation, now_nanos / w.width_nanos)
            }
            Window::Consecutive(c) => {
                let run = c.word.load(Acquire) & TICK_MASK;
                Snapshot {
                    total: run,
                    failures: run,
                    slow: 0,
                }
            }
        }
    }

    /// Whether recording needs the time of completion.
    pub(crate) fn needs_clock(&self) -> bool {
        matches!(self, Window::Time(_))
    }
}

// ---------------------------------------------------------------------------
// Count window: the last N outcomes.

/// A ring of the last `n` outcomes and one packed counter word.
///
/// Counter word: `gen:16 | total:16 | failures:16 | slow:16`. Each field is
/// updated with wrapping 16-bit arithmetic inside its own lane, so a field
/// that is transiently negative (two writers raced on one slot and the
/// subtraction landed first) never borrows from its neighbour; such a
/// snapshot is skipped, and the next record sees the settled value.
pub(crate) struct CountWindow {
    slots: Box<[AtomicU32]>,
    // Written on every call: kept off the cache line of the state word,
    // which every admission reads.
    cursor: CachePadded<AtomicU64>,
    counter: CachePadded<AtomicU64>,
}

/// Aligns a value to its own cache line (128 bytes covers the adjacent-line
/// prefetcher of x86 and the 128-byte lines of Apple silicon).
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Ring positions a lane reserves at a time.
const BATCH: u64 = 16;

/// The largest count window: a 16-bit lane must hold it as a positive `i16`.
pub(crate) const MAX_COUNT_WINDOW: usize = i16::MAX as usize;

const TOTAL_SHIFT: u32 = 32;
const FAIL_SHIFT: u32 = 16;
const SLOW_SHIFT: u32 = 0;
const GEN_SHIFT: u32 = 48;

fn lane(word: u64, shift: u32) -> u16 {
    (word >> shift) as u16
}

fn with_lane(word: u64, shift: u32, v: u16) -> u64 {
    (word & !(0xFFFF_u64 << shift)) | ((v as u64) << shift)
}

fn bit(bits: u8, b: u8) -> u16 {
    u16::from(bits & b != 0)
}

impl CountWindow {
    pub(crate) fn new(n: usize) -> Self {
        assert!((1..=MAX_COUNT_WINDOW).contains(&n));
        CountWindow {
            slots: (0..n).map(|_| AtomicU32::new(0)).collect(),
            cursor: CachePadded(AtomicU64::new(0)),
            counter: CachePadded(AtomicU64::new(0)),
        }
    }

    fn reset(&self, generation: u16) {
        let empty = u32::from(generation) << 8;
        for s in self.slots.iter() {
            s.store(empty, Relaxed);
        }
        self.cursor.store(0, Relaxed);
        self.counter
            .store(u64::from(generation) << GEN_SHIFT, Release);
    }

    /// Records one outcome. Returns the counts after it, or `None` when
    /// they did not change or the outcome belongs to an older window.
    pub(crate) fn record(
        &self,
        generation: u16,
        bits: u8,
        lane_cursor: &AtomicU64,
    ) -> Option<Snapshot> {
        let mut c = self.counter.load(Acquire);
        if lane(c, GEN_SHIFT) != generation {
            return None;
        }
        let i = self.next_index(generation, lane_cursor);
        let new_slot = (u32::from(generation) << 8) | u32::from(bits);
        // The steady state of a healthy service: a success replaces a
        // success, and no count changes. A load instead of a swap and no
        // counter update keeps this path to the one `fetch_add` above. Should
        // a writer one lap ahead race us on this slot, the result is as if
        // our (identical) write had landed first.
        if self.slots[i].load(Acquire) == new_slot {
            return None;
        }
        let old = self.slots[i].swap(new_slot, AcqRel);
        // A slot of another generation is empty for this window.
        let old_bits = if (old >> 8) as u16 == generation {
            old as u8
        } else {
            0
        };
        loop {
            if lane(c, GEN_SHIFT) != generation {
                // Reset under our feet: the slot we wrote carries a stale
                // generation and counts as empty from now on.
                return None;
            }
            let mut next = c;
            for (shift, b) in [(TOTAL_SHIFT, REC), (FAIL_SHIFT, FAIL), (SLOW_SHIFT, SLOW)] {
                let v = lane(c, shift)
                    .wrapping_add(bit(bits, b))
                    .wrapping_sub(bit(old_bits, b));
                next = with_lane(next, shift, v);
            }
            match self.counter.compare_exchange_weak(c, next, AcqRel, Acquire) {
                Ok(_) => return decode_count(next),
                Err(actual) => c = actual,
            }
        }
    }

    /// The slot for the next outcome.
    ///
    /// Each service (a *lane*; clones share one) reserves positions of the
    /// ring from the shared cursor a batch at a time and hands them out in
    /// order, so that services on different cores do not write the shared
    /// cursor's cache line on every call. A lane's first batch is one
    /// position, and each next one twice the last, up to `BATCH`: a service
    /// that lives for a few calls (a stack layered per connection) leaves
    /// at most as many positions unwritten as it wrote, instead of a whole
    /// batch each, which would keep a window from ever filling. One lane
    /// alone fills the ring in exactly the order a single shared cursor
    /// would; with several lanes writing at once the ring holds the last N
    /// calls give or take one batch per lane.
    ///
    /// The lane word is advanced with a plain load and store, not a
    /// read-modify-write: a lane is normally driven from one core at a time.
    /// Should two clones of one service record at the same instant on two
    /// cores, they may take the same position; both outcomes are still
    /// accounted exactly (the slot is swapped), and the window holds one
    /// call fewer until that slot's next lap.
    #[inline]
    fn next_index(&self, generation: u16, lane: &AtomicU64) -> usize {
        let n = self.slots.len() as u64;
        let advance = |pos: u64| if pos + 1 == n { 0 } else { pos + 1 };
        // Lane word: gen:16 | pos:16 | left:16 | last batch:16.
        let w = lane.load(Relaxed);
        let left = (w >> 16) & 0xFFFF;
        if (w >> 48) as u16 == generation && left > 0 {
            let pos = (w >> 32) & 0xFFFF;
            let next = (w & !(0xFFFF_FFFF_u64 << 16)) | (advance(pos) << 32) | ((left - 1) << 16);
            lane.store(next, Relaxed);
            return pos as usize;
        }
        let last = if (w >> 48) as u16 == generation {
            w & 0xFFFF
        } else {
            0
        };
        let batch = if last == 0 { 1 } else { (last * 2).min(BATCH) };
        let start = self.cursor.fetch_add(batch, Relaxed) % n;
        let next =
            (u64::from(generation) << 48) | (advance(start) << 32) | ((batch - 1) << 16) | batch;
        lane.store(next, Relaxed);
        start as usize
    }

    #[cfg(test)]
    fn snapshot(&self) -> Option<Snapshot> {
        decode_count(self.counter.load(Acquire))
    }
}

fn decode_count(word: u64) -> Option<Snapshot> {
    let t = lane(word, TOTAL_SHIFT) as i16;
    let f = lane(word, FAIL_SHIFT) as i16;
    let s = lane(word, SLOW_SHIFT) as i16;
    if t < 0 || f < 0 || s < 0 {
        return None;
    }
    Some(Snapshot {
        total: t as u64,
        failures: f as u64,
        slow: s as u64,
    })
}

// ---------------------------------------------------------------------------
// Time window: the outcomes of the last D, in fixed buckets.

/// How many buckets a time window is cut into.
pub(crate) const TIME_BUCKETS: usize = 10;

const T_TOTAL: u32 = 32;
const T_FAIL: u32 = 0;
const T_MASK: u64 = (1 << 32) - 1;
/// Calls one bucket can count before its lanes would overflow: over four
/// billion, so a bucket of a minute-wide window still counts every call at
/// tens of millions of calls a second. (Lanes of 21 bits, when slow calls
/// shared the word, filled at 2 million, and later outcomes went unseen.)
pub(crate) const MAX_PER_BUCKET: u64 = T_MASK;

struct Bucket {
    /// `gen:16 | tick:48`; a bucket with another stamp is empty.
    stamp: AtomicU64,
    /// `total:32 | failures:32`.
    counts: AtomicU64,
    /// Slow calls, counted apart: only a breaker with slow-call detection
    /// adds to it or reads it, so the others keep one atomic per call.
    slow: AtomicU64,
}

/// `TIME_BUCKETS` buckets of `width` each. Recording is one `fetch_add` on the
/// current bucket; only the first record in a new bucket takes `roll` to
/// clear it, so the lock is taken once per bucket width, not once per call.
pub(crate) struct TimeWindow {
    width_nanos: u64,
    /// Whether slow calls are counted (the breaker has a slow-call rate).
    track_slow: bool,
    buckets: Box<[Bucket]>,
    generation: AtomicU32,
    roll: Mutex<()>,
}

const TICK_MASK: u64 = (1 << 48) - 1;

fn stamp(generation: u16, tick: u64) -> u64 {
    (u64::from(generation) << 48) | (tick & TICK_MASK)
}

impl TimeWindow {
    pub(crate) fn new(width_nanos: u64, track_slow: bool) -> Self {
        assert!(width_nanos > 0);
        TimeWindow {
            width_nanos,
            track_slow,
            buckets: (0..TIME_BUCKETS)
                .map(|_| Bucket {
                    stamp: AtomicU64::new(u64::MAX),
                    counts: AtomicU64::new(0),
                    slow: AtomicU64::new(0),
                })
                .collect(),
            generation: AtomicU32::new(0),
            roll: Mutex::new(()),
        }
    }

    fn reset(&self, generation: u16) {
        let _g = self.roll.lock().unwrap_or_else(|e| e.into_inner());
        for b in self.buckets.iter() {
            b.stamp.store(u64::MAX, Relaxed);
            b.counts.store(0, Relaxed);
            b.slow.store(0, Relaxed);
        }
        self.generation.store(u32::from(generation), Release);
    }

    /// Records an outcome at `now_nanos` (nanoseconds since the breaker's base).
    pub(crate) fn record(&self, generation: u16, bits: u8, now_nanos: u64) -> Option<Snapshot> {
        if self.generation.load(Acquire) != u32::from(generation) {
            return None;
        }
        let tick = now_nanos / self.width_nanos;
        let want = stamp(generation, tick);
        let b = &self.buckets[(tick % TIME_BUCKETS as u64) as usize];
        if b.stamp.load(Acquire) != want {
            let _g = self.roll.lock().unwrap_or_else(|e| e.into_inner());
            if self.generation.load(Acquire) != u32::from(generation) {
                return None;
            }
            let cur = b.stamp.load(Acquire);
            if cur != want {
                if cur != u64::MAX && (cur >> 48) as u16 == generation && (cur & TICK_MASK) > tick {
                    // This call finished a whole window ago and is only now
                    // being recorded; its bucket is gone.
                    return None;
                }
                b.counts.store(0, Relaxed);
                b.slow.store(0, Relaxed);
                b.stamp.store(want, Release);
            }
        }
        let delta = (u64::from(bit(bits, REC)) << T_TOTAL) | (u64::from(bit(bits, FAIL)) << T_FAIL);
        let prev = b.counts.fetch_add(delta, AcqRel);
        if (prev >> T_TOTAL) & T_MASK >= MAX_PER_BUCKET {
            // Saturated bucket: undo rather than carry into the next lane.
            b.counts.fetch_sub(delta, AcqRel);
        } else if self.track_slow && bits & SLOW != 0 {
            b.slow.fetch_add(1, AcqRel);
        }
        Some(self.snapshot(generation, tick))
    }

    fn snapshot(&self, generation: u16, tick: u64) -> Snapshot {
        let mut s = Snapshot {
            total: 0,
            failures: 0,
            slow: 0,
        };
        for b in self.buckets.iter() {
            let st = b.stamp.load(Acquire);
            if st == u64::MAX || (st >> 48) as u16 != generation {
                continue;
            }
            let t = st & TICK_MASK;
            if t <= tick && t + TIME_BUCKETS as u64 > tick {
                let c = b.counts.load(Acquire);
                s.total += (c >> T_TOTAL) & T_MASK;
                s.failures += (c >> T_FAIL) & T_MASK;
                if self.track_slow {
                    s.slow += b.slow.load(Acquire);
                }
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------
// Consecutive failures.

/// `gen:16 | run:48`: the current run of failures.
pub(crate) struct Consecutive {
    word: AtomicU64,
}

impl Consecutive {
    pub(crate) fn new() -> Self {
        Consecutive {
            word: AtomicU64::new(0),
        }
    }

    fn reset(&self, generation: u16) {
        self.word.store(u64::from(generation) << 48, Release);
    }

    /// Returns the run of failures after this outcome.
    pub(crate) fn record(&self, generation: u16, failed: bool) -> Option<u64> {
        let mut c = self.word.load(Acquire);
        loop {
            if (c >> 48) as u16 != generation {
                return None;
            }
            let next = if failed {
                c + 1
            } else {
                u64::from(generation) << 48
            };
            if next == c {
                return Some(0);
            }
            match self.word.compare_exchange_weak(c, next, AcqRel, Acquire) {
                Ok(_) => return Some(next & TICK_MASK),
                Err(actual) => c = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_slides() {
        let w = CountWindow::new(3);
        let l = AtomicU64::new(0);
        w.reset(7);
        assert_eq!(w.record(7, REC | FAIL, &l).unwrap().failures, 1);
        w.record(7, REC, &l);
        let s = w.record(7, REC | SLOW, &l).unwrap();
        assert_eq!((s.total, s.failures, s.slow), (3, 1, 1));
        // The failure falls out of the window.
        let s = w.record(7, REC, &l).unwrap();
        assert_eq!((s.total, s.failures, s.slow), (3, 0, 1));
        // A stale generation is dropped.
        assert_eq!(w.record(6, REC | FAIL, &l), None);
        w.reset(8);
        assert_eq!(w.snapshot().unwrap().total, 0);
        let s = w.record(8, REC | FAIL, &l).unwrap();
        assert_eq!((s.total, s.failures), (1, 1));
    }

    #[test]
    fn count_window_lanes_do_not_borrow() {
        // A subtraction landing before its matching addition leaves the lane
        // negative; the snapshot is skipped and the neighbours are untouched.
        let w = with_lane(0, FAIL_SHIFT, 0u16.wrapping_sub(1));
        let w = with_lane(w, TOTAL_SHIFT, 2);
        assert_eq!(decode_count(w), None);
        assert_eq!(lane(w, TOTAL_SHIFT), 2);
        assert_eq!(lane(w, GEN_SHIFT), 0);
    }

    #[test]
    fn one_lane_fills_the_ring_in_order_and_lanes_share_it() {
        let w = CountWindow::new(5);
        w.reset(1);
        let a = AtomicU64::new(0);
        let order: Vec<usize> = (0..40).map(|_| w.next_index(1, &a)).collect();
        let want: Vec<usize> = (0..40).map(|i| i % 5).collect();
        assert_eq!(order, want);
        // A reset starts every lane over at position 0.
        w.reset(2);
        assert_eq!(w.next_index(2, &a), 0);
        // A second lane takes the next batch (its first: one position); a
        // lane's batches double, so `a` goes on with two positions after it.
        let b = AtomicU64::new(0);
        assert_eq!(w.next_index(2, &b), 1);
        assert_eq!(w.next_index(2, &a), 2);
        assert_eq!(w.next_index(2, &a), 3);
        assert_eq!(w.next_index(2, &b), 4);
        // Batches stop growing at `BATCH`: after 1 + 2 + 4 + 8, each lap of
        // a lone lane's 16 positions starts at the cursor.
        let c = CountWindow::new(1000);
        c.reset(1);
        let l = AtomicU64::new(0);
        let d = AtomicU64::new(0);
        for _ in 0..(1 + 2 + 4 + 8 + 16) {
            c.next_index(1, &l);
        }
        assert_eq!(c.next_index(1, &d), 31);
        assert_eq!(c.next_index(1, &l), 32);
    }

    /// Two threads record at once, through their own lanes and through one
    /// shared lane (the racy case): afterwards the packed counter must equal
    /// a recount of the slots, lane by lane.
    #[test]
    fn concurrent_records_keep_the_counter_equal_to_the_slots() {
        for n in [1usize, 3, 16, 100] {
            let w = std::sync::Arc::new(CountWindow::new(n));
            w.reset(5);
            let shared = std::sync::Arc::new(AtomicU64::new(0));
            let threads: Vec<_> = (0..2u64)
                .map(|t| {
                    let w = w.clone();
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        let own = AtomicU64::new(0);
                        let mut x = 0x2545_F491_4F6C_DD1D_u64 ^ t;
                        for i in 0..50_000 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let bits = REC | (x as u8 & (FAIL | SLOW));
                            let lane = if i % 3 == 0 { &*shared } else { &own };
                            w.record(5, bits, lane);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let (mut total, mut fail, mut slow) = (0, 0, 0);
            for s in w.slots.iter() {
                let v = s.load(Acquire);
                assert_eq!(v >> 8, 5);
                let b = v as u8;
                total += u64::from(b & REC != 0);
                fail += u64::from(b & FAIL != 0);
                slow += u64::from(b & SLOW != 0);
            }
            let snap = w.snapshot().expect("settled");
            assert_eq!(
                (snap.total, snap.failures, snap.slow),
                (total, fail, slow),
                "n = {n}"
            );
            assert_eq!(total, n as u64);
        }
    }

    #[test]
    fn time_window_expires_buckets() {
        let w = TimeWindow::new(100, false);
        w.reset(1);
        w.record(1, REC | FAIL, 0);
        w.record(1, REC, 150);
        let s = w.record(1, REC, 999).unwrap();
        assert_eq!((s.total, s.failures), (3, 1));
        // Tick 10 reuses bucket 0: the failure at tick 0 is gone.
        let s = w.record(1, REC, 1000).unwrap();
        assert_eq!((s.total, s.failures), (3, 0));
        assert_eq!(w.record(2, REC, 1000), None);
    }

    /// A bucket counts past two million calls (its lanes were 21 bits wide,
    /// and every outcome past 2^21 - 1 went unseen), slow calls included.
    #[test]
    fn a_busy_bucket_keeps_counting() {
        let w = TimeWindow::new(1_000_000_000, true);
        w.reset(1);
        for _ in 0..2_500_000 {
            w.record(1, REC, 5);
        }
        for _ in 0..100_000 {
            w.record(1, REC | FAIL | SLOW, 5);
        }
        let s = w.record(1, REC | FAIL, 5).unwrap();
        assert_eq!((s.total, s.failures, s.slow), (2_600_001, 100_001, 100_000));
        // Without slow-call detection slow calls are not counted.
        let w = TimeWindow::new(1_000_000_000, false);
        w.reset(1);
        let s = w.record(1, REC | SLOW, 5).unwrap();
        assert_eq!((s.total, s.slow), (1, 0));
    }

    #[test]
    fn consecutive_run() {
        let c = Consecutive::new();
        c.reset(3);
        assert_eq!(c.record(3, true), Some(1));
        assert_eq!(c.record(3, true), Some(2));
        assert_eq!(c.record(3, false), Some(0));
        assert_eq!(c.record(3, true), Some(1));
        assert_eq!(c.record(2, true), None);
    }
}
