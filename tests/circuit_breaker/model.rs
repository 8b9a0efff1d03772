//! The real breaker against a plain reference model of the state machine.
//!
//! Random sequences of call starts, finishes (success, failure, ignored,
//! cut by the caller's deadline), drops, time advances and handle operations run against both; after every
//! step they must agree on the state and on the window's counts, and on
//! every call on admit or reject (and on the rejection's `retry_after`).

use proptest::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tower::{BoxError, Layer, Service, service_fn};
use tower_firebreak::bulkhead::BulkheadFull;
use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, CircuitOpen, State};
use tower_firebreak::deadline::DeadlineExceeded;
use tower_firebreak::error;

#[derive(Clone, Copy, Debug)]
enum Win {
    Count(usize),
    Time(Duration),
    Consecutive(u32),
}

#[derive(Clone, Debug)]
struct Cfg {
    win: Win,
    minimum: usize,
    failure_rate: f64,
    slow: Option<(f64, Duration)>,
    open_for: Duration,
    max_open_for: Option<Duration>,
    half_open: usize,
    max_wait: Option<Duration>,
}

#[derive(Clone, Copy, Debug)]
enum Finish {
    Success,
    Failure,
    Ignore,
    /// `DeadlineExceeded`: the caller's budget cut the call unanswered.
    Cut,
}

#[derive(Clone, Debug)]
enum Op {
    Start,
    Finish(usize, Finish),
    Drop(usize),
    Advance(Duration),
    ForceOpen,
    Reset,
    Disable,
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn cfg_strategy() -> impl Strategy<Value = Cfg> {
    let win = prop_oneof![
        (1usize..=8).prop_map(Win::Count),
        (1u64..=5).prop_map(|s| Win::Time(secs(s))),
        (1u32..=4).prop_map(Win::Consecutive),
    ];
    let slow = prop_oneof![
        Just(None),
        (prop_oneof![Just(0.5), Just(1.0)], 1u64..=3).prop_map(|(r, d)| Some((r, secs(d)))),
    ];
    (
        win,
        1usize..=6,
        prop_oneof![Just(0.25), Just(0.5), Just(0.75), Just(1.0)],
        slow,
        1u64..=5,
        prop_oneof![Just(None), (1u32..=4).prop_map(Some)],
        1usize..=4,
        prop_oneof![Just(None), (1u64..=5).prop_map(|s| Some(secs(s)))],
    )
        .prop_map(
            |(win, minimum, failure_rate, slow, open, backoff, half_open, max_wait)| Cfg {
                win,
                minimum,
                failure_rate,
                slow,
                open_for: secs(open),
                max_open_for: backoff.map(|k| secs(open * u64::from(k))),
                half_open,
                max_wait,
            },
        )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => Just(Op::Start),
        5 => (0usize..16).prop_map(|i| Op::Finish(i, Finish::Success)),
        5 => (0usize..16).prop_map(|i| Op::Finish(i, Finish::Failure)),
        1 => (0usize..16).prop_map(|i| Op::Finish(i, Finish::Ignore)),
        1 => (0usize..16).prop_map(|i| Op::Finish(i, Finish::Cut)),
        1 => (0usize..16).prop_map(Op::Drop),
        4 => (0u64..=3_000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
        1 => prop_oneof![Just(Op::ForceOpen), Just(Op::Reset), Just(Op::Disable)],
    ]
}

// ---------------------------------------------------------------------------
// The reference model: plain data, no atomics, no cleverness.

#[derive(Clone, Copy, Debug)]
struct MCall {
    epoch: u64,
    probe: bool,
    start: Duration,
}

struct Model {
    cfg: Cfg,
    state: State,
    epoch: u64,
    /// The epoch of the Closed or Disabled state the window belongs to.
    window_epoch: u64,
    until: Duration,
    since: Duration,
    opens: u32,
    /// (finish time, failed, slow), oldest first.
    records: VecDeque<(Duration, bool, bool)>,
    run: u32,
    reserved: usize,
    done: usize,
    bad: usize,
    slw: usize,
}

impl Model {
    fn new(cfg: Cfg) -> Self {
        Model {
            cfg,
            state: State::Closed,
            epoch: 0,
            window_epoch: 0,
            until: Duration::ZERO,
            since: Duration::ZERO,
            opens: 0,
            records: VecDeque::new(),
            run: 0,
            reserved: 0,
            done: 0,
            bad: 0,
            slw: 0,
        }
    }

    fn open_duration(&self) -> Duration {
        match self.cfg.max_open_for {
            None => self.cfg.open_for,
            Some(max) => {
                let f = 2f64.powi(self.opens.saturating_sub(1).min(62) as i32);
                let d = (self.cfg.open_for.as_secs_f64() * f).min(max.as_secs_f64());
                Duration::from_secs_f64(d)
            }
        }
    }

    fn go(&mut self, to: State, now: Duration) {
        self.epoch += 1;
        self.state = to;
        match to {
            State::Closed | State::Disabled => {
                self.records.clear();
                self.run = 0;
                self.opens = 0;
                self.window_epoch = self.epoch;
            }
            State::Open => {
                self.opens += 1;
                self.until = now + self.open_duration();
            }
            State::HalfOpen => {
                self.reserved = 0;
                self.done = 0;
                self.bad = 0;
                self.slw = 0;
                self.since = now;
            }
            State::ForcedOpen => {}
        }
    }

    fn state(&mut self, now: Duration) -> State {
        if self.state == State::Open && now >= self.until {
            self.go(State::HalfOpen, now);
        }
        self.state
    }

    fn admit(&mut self, now: Duration) -> Result<MCall, Duration> {
        loop {
            match self.state {
                State::Closed | State::Disabled => {
                    return Ok(MCall {
                        epoch: self.epoch,
                        probe: false,
                        start: now,
                    });
                }
                State::Open => {
                    if now < self.until {
                        return Err(self.until - now);
                    }
                    self.go(State::HalfOpen, now);
                }
                State::HalfOpen => {
                    if self.reserved < self.cfg.half_open {
                        // The stall wait runs from the first probe.
                        if self.reserved == 0 {
                            self.since = now;
                        }
                        self.reserved += 1;
                        return Ok(MCall {
                            epoch: self.epoch,
                            probe: true,
                            start: now,
                        });
                    }
                    match self.cfg.max_wait {
                        Some(w) if now >= self.since + w => self.go(State::Open, now),
                        _ => return Err(Duration::ZERO),
                    }
                }
                State::ForcedOpen => return Err(self.cfg.open_for),
            }
        }
    }

    fn minimum(&self) -> usize {
        match self.cfg.win {
            Win::Count(n) => self.cfg.minimum.min(n),
            _ => self.cfg.minimum,
        }
    }

    fn trips(&self, total: usize, bad: usize, slow: usize, minimum: usize) -> bool {
        if total == 0 || total < minimum {
            return false;
        }
        let t = total as f64;
        bad as f64 / t >= self.cfg.failure_rate
            || self.cfg.slow.is_some_and(|(r, _)| slow as f64 / t >= r)
    }

    fn release(&mut self, c: MCall) {
        if c.probe && self.state == State::HalfOpen && self.epoch == c.epoch && self.reserved > 0 {
            self.reserved -= 1;
        }
    }

    /// A call that ended unanswered (dropped, or cut by the caller's
    /// deadline): slow if it ran `slow_call_duration` (not in the
    /// consecutive mode), else nothing.
    fn unanswered(&mut self, c: MCall, now: Duration) {
        match self.cfg.slow {
            Some((_, d)) if !matches!(self.cfg.win, Win::Consecutive(_)) && now - c.start >= d => {
                self.finish(c, Finish::Success, now)
            }
            _ => self.release(c),
        }
    }

    fn finish(&mut self, c: MCall, how: Finish, now: Duration) {
        let failed = match how {
            Finish::Ignore => return self.release(c),
            Finish::Cut => return self.unanswered(c, now),
            Finish::Failure => true,
            Finish::Success => false,
        };
        let slow = self.cfg.slow.is_some_and(|(_, d)| now - c.start >= d);
        if c.probe {
            if self.state != State::HalfOpen || c.epoch != self.epoch {
                return;
            }
            self.done += 1;
            self.bad += usize::from(failed);
            self.slw += usize::from(slow);
            if self.done == self.cfg.half_open {
                let to = if self.trips(self.done, self.bad, self.slw, 0) {
                    State::Open
                } else {
                    State::Closed
                };
                self.go(to, now);
            }
            return;
        }
        // A call records into the window of the state that admitted it,
        // even if the breaker has opened since (that window is only emptied
        // when the breaker closes); only the state that admitted it can trip.
        if c.epoch != self.window_epoch {
            return;
        }
        let trip = match self.cfg.win {
            Win::Consecutive(k) => {
                self.run = if failed { self.run + 1 } else { 0 };
                self.run >= k
            }
            Win::Count(n) => {
                self.records.push_back((now, failed, slow));
                if self.records.len() > n {
                    self.records.pop_front();
                }
                let (b, s) = self.counts(|_| true);
                self.trips(self.records.len(), b, s, self.minimum())
            }
            Win::Time(d) => {
                self.records.push_back((now, failed, slow));
                let width = d.as_nanos() / 10;
                let tick = now.as_nanos() / width;
                let in_window = |t: Duration| {
                    let k = t.as_nanos() / width;
                    k <= tick && k + 10 > tick
                };
                let total = self.records.iter().filter(|r| in_window(r.0)).count();
                let (b, s) = self.counts(in_window);
                self.trips(total, b, s, self.minimum())
            }
        };
        if trip && self.state == State::Closed && self.epoch == c.epoch {
            self.go(State::Open, now);
        }
    }

    /// (calls, failures, slow calls) in the window at `now`.
    fn metrics(&self, now: Duration) -> (u64, u64, u64) {
        let (t, b, s) = match self.cfg.win {
            Win::Consecutive(_) => (self.run as usize, self.run as usize, 0),
            Win::Count(_) => {
                let (b, s) = self.counts(|_| true);
                (self.records.len(), b, s)
            }
            Win::Time(d) => {
                let width = d.as_nanos() / 10;
                let tick = now.as_nanos() / width;
                let in_window = |t: Duration| {
                    let k = t.as_nanos() / width;
                    k <= tick && k + 10 > tick
                };
                let total = self.records.iter().filter(|r| in_window(r.0)).count();
                let (b, s) = self.counts(in_window);
                (total, b, s)
            }
        };
        (t as u64, b as u64, s as u64)
    }

    fn counts(&self, keep: impl Fn(Duration) -> bool) -> (usize, usize) {
        let b = self.records.iter().filter(|r| keep(r.0) && r.1).count();
        let s = self.records.iter().filter(|r| keep(r.0) && r.2).count();
        (b, s)
    }
}

// ---------------------------------------------------------------------------

fn layer(cfg: &Cfg) -> CircuitBreakerLayer {
    let mut b = CircuitBreakerLayer::builder()
        .minimum_calls(cfg.minimum)
        .failure_rate(cfg.failure_rate)
        .open_for(cfg.open_for)
        .half_open_calls(cfg.half_open);
    b = match cfg.win {
        Win::Count(n) => b.count_window(n),
        Win::Time(d) => b.time_window(d),
        Win::Consecutive(k) => b.consecutive_failures(k),
    };
    if let Some((r, d)) = cfg.slow {
        b = b.slow_call_rate(r).slow_call_duration(d);
    }
    if let Some(m) = cfg.max_open_for {
        b = b.max_open_for(m).open_jitter(0.0);
    }
    if let Some(w) = cfg.max_wait {
        b = b.max_wait_in_half_open(w);
    }
    b.build().unwrap()
}

type Reply = Result<(), BoxError>;

fn run(cfg: Cfg, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let layer = layer(&cfg);
        let h = layer.handle();
        let start = tokio::time::Instant::now();
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = {
            let calls = calls.clone();
            service_fn(move |rx: oneshot::Receiver<Reply>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { rx.await.unwrap_or_else(|_| Err("sender dropped".into())) }
            })
        };
        let mut svc = layer.layer(inner);
        let mut model = Model::new(cfg);
        let mut inflight: Vec<(MCall, oneshot::Sender<Reply>, _)> = Vec::new();

        for (step, op) in ops.into_iter().enumerate() {
            let now = start.elapsed();
            match op {
                Op::Start => {
                    let (tx, rx) = oneshot::channel();
                    let before = calls.load(Ordering::SeqCst);
                    let fut = svc.call(rx);
                    let admitted = calls.load(Ordering::SeqCst) > before;
                    let want = model.admit(now);
                    match want {
                        Ok(mc) => {
                            prop_assert!(admitted, "step {step}: model admits, breaker rejects");
                            inflight.push((mc, tx, fut));
                        }
                        Err(retry) => {
                            prop_assert!(!admitted, "step {step}: model rejects, breaker admits");
                            let err = fut.await.unwrap_err();
                            let open = error::find::<CircuitOpen>(&*err).expect("CircuitOpen");
                            prop_assert_eq!(open.retry_after(), retry, "step {}", step);
                        }
                    }
                }
                Op::Finish(i, how) if !inflight.is_empty() => {
                    let (mc, tx, fut) = inflight.remove(i % inflight.len());
                    let reply: Reply = match how {
                        Finish::Success => Ok(()),
                        Finish::Failure => Err("dependency failed".into()),
                        Finish::Ignore => Err(BulkheadFull::new(1).into()),
                        Finish::Cut => Err(DeadlineExceeded::new().into()),
                    };
                    let _ = tx.send(reply);
                    let _ = fut.await;
                    model.finish(mc, how, now);
                }
                Op::Drop(i) if !inflight.is_empty() => {
                    let (mc, _tx, fut) = inflight.remove(i % inflight.len());
                    drop(fut);
                    model.unanswered(mc, now);
                }
                Op::Finish(..) | Op::Drop(_) => {}
                Op::Advance(d) => tokio::time::advance(d).await,
                Op::ForceOpen => {
                    h.force_open();
                    model.go(State::ForcedOpen, now);
                }
                Op::Reset => {
                    h.reset();
                    model.go(State::Closed, now);
                }
                Op::Disable => {
                    h.disable();
                    model.go(State::Disabled, now);
                }
            }
            let now = start.elapsed();
            prop_assert_eq!(h.state(), model.state(now), "after step {}", step);
            let m = h.metrics();
            prop_assert_eq!(
                (m.calls, m.failures, m.slow_calls),
                model.metrics(now),
                "metrics after step {}",
                step
            );
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn breaker_agrees_with_the_model(cfg in cfg_strategy(), ops in prop::collection::vec(op_strategy(), 1..120)) {
        run(cfg, ops)?;
    }
}
