//! What to inject, and when: [`Latency`], [`Faults`], [`Phase`], [`Schedule`].

use crate::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// How long an injected delay lasts.
///
/// In a config file the variant is named by `distribution`:
///
/// ```toml
/// latency = { distribution = "uniform", min = "50ms", max = "150ms" }
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "distribution", rename_all = "snake_case", deny_unknown_fields)]
pub enum Latency {
    /// Always `delay`.
    Fixed {
        /// The delay.
        #[serde(with = "humantime_serde")]
        delay: Duration,
    },
    /// Uniform between `min` and `max`, both included.
    Uniform {
        /// The shortest delay.
        #[serde(with = "humantime_serde")]
        min: Duration,
        /// The longest delay.
        #[serde(with = "humantime_serde")]
        max: Duration,
    },
    /// Exponential with the given `mean`, cut at `max`: mostly short delays
    /// and a long tail, the shape real latency tends to have.
    Exponential {
        /// The mean of the uncut distribution.
        #[serde(with = "humantime_serde")]
        mean: Duration,
        /// No delay is longer than this.
        #[serde(with = "humantime_serde")]
        max: Duration,
    },
}

impl Latency {
    /// A fixed delay.
    pub const fn fixed(delay: Duration) -> Self {
        Latency::Fixed { delay }
    }

    /// A delay drawn uniformly from `min..=max`.
    pub const fn uniform(min: Duration, max: Duration) -> Self {
        Latency::Uniform { min, max }
    }

    /// A delay drawn from an exponential distribution of mean `mean`, cut at `max`.
    pub const fn exponential(mean: Duration, max: Duration) -> Self {
        Latency::Exponential { mean, max }
    }

    /// The delay for a uniform draw `u` in `[0, 1)`.
    pub(crate) fn sample(&self, u: f64) -> Duration {
        match *self {
            Latency::Fixed { delay } => delay,
            Latency::Uniform { min, max } => min.saturating_add((max - min).mul_f64(u)),
            Latency::Exponential { mean, max } => {
                // Inverse transform: -mean * ln(1 - u), with 1 - u in (0, 1].
                let d = mean.as_secs_f64() * -(1.0 - u).ln();
                Duration::try_from_secs_f64(d).map_or(max, |d| d.min(max))
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match *self {
            Latency::Uniform { min, max } if min > max => Err(ConfigError::conflict(
                "latency.min",
                min,
                "latency.max",
                max,
                "min must not be above max",
            )),
            Latency::Exponential { mean, .. } if mean.is_zero() => {
                Err(ConfigError::new("latency.mean", mean, "must be above zero"))
            }
            _ => Ok(()),
        }
    }
}

/// The faults of one [`Phase`]: each rate is the share of calls, in
/// `0.0..=1.0`, that get the fault.
///
/// `error_rate + hang_rate + abort_rate` must not exceed 1: a call gets at most
/// one of these. Latency is drawn separately and is added before an error, an
/// abort or a normal call (a hang has no use for it).
///
/// ```
/// use std::time::Duration;
/// use tower_firebreak::chaos::{Faults, Latency};
///
/// // 20% of calls take 2 s longer, 5% fail.
/// let f = Faults::none()
///     .latency(Latency::fixed(Duration::from_secs(2)), 0.2)
///     .errors(0.05);
/// assert_eq!(f.error_rate, 0.05);
/// ```
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The extra delay, if any.
    pub latency: Option<Latency>,
    /// The share of calls that get [`latency`](Self::latency).
    pub latency_rate: f64,
    /// The share of calls answered with an injected error, without calling
    /// the inner service.
    pub error_rate: f64,
    /// The share of calls that hang: nothing happens until the phase ends
    /// (then the inner service is called), or forever in an open-ended phase.
    pub hang_rate: f64,
    /// The share of calls that fail with an aborted connection (see
    /// [`FaultKind::Abort`](super::FaultKind::Abort)).
    pub abort_rate: f64,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Faults::default()
    }

    /// Adds `latency` to a share `rate` of the calls.
    pub fn latency(mut self, latency: Latency, rate: f64) -> Self {
        self.latency = Some(latency);
        self.latency_rate = rate;
        self
    }

    /// Answers a share `rate` of the calls with an injected error.
    pub fn errors(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    /// Makes a share `rate` of the calls hang.
    pub fn hangs(mut self, rate: f64) -> Self {
        self.hang_rate = rate;
        self
    }

    /// Aborts a share `rate` of the calls.
    pub fn aborts(mut self, rate: f64) -> Self {
        self.abort_rate = rate;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let rates = [
            ("latency_rate", self.latency_rate),
            ("error_rate", self.error_rate),
            ("hang_rate", self.hang_rate),
            ("abort_rate", self.abort_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::new(name, rate, "must be in 0.0..=1.0"));
            }
        }
        let sum = self.error_rate + self.hang_rate + self.abort_rate;
        if sum > 1.0 + 1e-9 {
            return Err(ConfigError::new(
                "error_rate + hang_rate + abort_rate",
                sum,
                "must not exceed 1.0: a call gets at most one of these faults",
            ));
        }
        if let Some(l) = &self.latency {
            l.validate()?;
        } else if self.latency_rate > 0.0 {
            return Err(ConfigError::new(
                "latency_rate",
                self.latency_rate,
                "needs a latency distribution",
            ));
        }
        Ok(())
    }
}

/// What a [`Phase`] stands for. It labels plots and reports, and it decides
/// how the phase's [`Faults`] apply.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PhaseKind {
    /// No faults, whatever the phase's `faults` say.
    Healthy,
    /// The phase's faults at their full rates.
    Failing,
    /// The phase's faults, with every rate falling linearly from its full
    /// value at the start of the phase to zero at its end.
    Recovering,
}

impl PhaseKind {
    /// A short lowercase name: `healthy`, `failing` or `recovering`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PhaseKind::Healthy => "healthy",
            PhaseKind::Failing => "failing",
            PhaseKind::Recovering => "recovering",
        }
    }
}

/// One stretch of a [`Schedule`].
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// What the phase stands for.
    pub kind: PhaseKind,
    /// How long it lasts; `None` (left out in a config file) for ever. Only
    /// the last phase of a schedule that does not repeat may be open-ended.
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// The faults injected while it lasts.
    #[serde(default)]
    pub faults: Faults,
}

impl Phase {
    /// A phase with no faults.
    pub fn healthy(duration: Duration) -> Self {
        Phase {
            kind: PhaseKind::Healthy,
            duration: Some(duration),
            faults: Faults::none(),
        }
    }

    /// A phase with `faults` at their full rates.
    pub fn failing(duration: Duration, faults: Faults) -> Self {
        Phase {
            kind: PhaseKind::Failing,
            duration: Some(duration),
            faults,
        }
    }

    /// A phase whose `faults` fade out linearly over `duration`.
    pub fn recovering(duration: Duration, faults: Faults) -> Self {
        Phase {
            kind: PhaseKind::Recovering,
            duration: Some(duration),
            faults,
        }
    }

    /// Makes the phase last for ever.
    pub fn forever(mut self) -> Self {
        self.duration = None;
        self
    }
}

/// A sequence of [`Phase`]s, timed from the layer's start instant.
///
/// After the last phase the service is healthy, unless the schedule
/// [repeats](Schedule::repeat).
///
/// ```
/// use std::time::Duration;
/// use tower_firebreak::chaos::{Faults, Phase, Schedule};
///
/// // Healthy for 2 s, then every call fails for 2 s, over and over.
/// let flapping = Schedule::new(vec![
///     Phase::healthy(Duration::from_secs(2)),
///     Phase::failing(Duration::from_secs(2), Faults::none().errors(1.0)),
/// ])
/// .repeat();
/// # let _ = flapping;
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Schedule {
    phases: Vec<Phase>,
    repeat: bool,
}

/// Where a point in time falls in a [`Schedule`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Position<'a> {
    pub(crate) kind: PhaseKind,
    pub(crate) faults: Option<&'a Faults>,
    /// The factor on every rate: 1 in a failing phase, falling to 0 in a
    /// recovering one.
    pub(crate) scale: f64,
    /// Time since the start at which the phase ends, if it ends.
    pub(crate) ends_at: Option<Duration>,
}

impl Schedule {
    /// The phases, in order, once.
    pub fn new(phases: Vec<Phase>) -> Self {
        Schedule {
            phases,
            repeat: false,
        }
    }

    /// One failing phase that never ends.
    pub fn always(faults: Faults) -> Self {
        Schedule::new(vec![Phase::failing(Duration::ZERO, faults).forever()])
    }

    /// Starts over after the last phase, for ever.
    pub fn repeat(mut self) -> Self {
        self.repeat = true;
        self
    }

    /// The phases.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// Whether the schedule starts over after its last phase.
    pub fn repeats(&self) -> bool {
        self.repeat
    }

    /// The phases as `(start, end, kind)`, measured from the start instant,
    /// up to `horizon`: what a plot shades. An open-ended phase ends at
    /// `horizon`.
    pub fn timeline(&self, horizon: Duration) -> Vec<(Duration, Duration, PhaseKind)> {
        let mut out = Vec::new();
        let mut t = Duration::ZERO;
        while t < horizon && !self.phases.is_empty() {
            let pass_start = t;
            for p in &self.phases {
                let end = p
                    .duration
                    .map_or(horizon, |d| t.saturating_add(d).min(horizon));
                if end > t {
                    out.push((t, end, p.kind));
                }
                t = end;
                if t >= horizon {
                    return out;
                }
            }
            // A repeating schedule of zero-length phases would never get there.
            if !self.repeat || t == pass_start {
                break;
            }
        }
        out
    }

    /// Checks every phase, and that the schedule can be followed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let last = self.phases.len().saturating_sub(1);
        for (i, p) in self.phases.iter().enumerate() {
            p.faults
                .validate()
                .map_err(|e| e.in_section(&format!("phases[{i}].faults")))?;
            if p.duration.is_none() && (i != last || self.repeat) {
                return Err(ConfigError::new(
                    format!("phases[{i}].duration"),
                    p.duration,
                    "only the last phase of a schedule that does not repeat may last for ever",
                ));
            }
        }
        if self.repeat && self.cycle().is_zero() {
            return Err(ConfigError::new(
                "repeat",
                true,
                "a repeating schedule needs phases whose durations add up to more than zero",
            ));
        }
        Ok(())
    }

    fn cycle(&self) -> Duration {
        // Saturating: a sum of `Duration::MAX` phases must not panic.
        self.phases
            .iter()
            .filter_map(|p| p.duration)
            .fold(Duration::ZERO, Duration::saturating_add)
    }

    /// The phase in force `elapsed` after the start.
    pub(crate) fn at(&self, elapsed: Duration) -> Position<'_> {
        const HEALTHY: Position<'static> = Position {
            kind: PhaseKind::Healthy,
            faults: None,
            scale: 0.0,
            ends_at: None,
        };
        let (offset, t) = if self.repeat {
            let cycle = self.cycle();
            if cycle.is_zero() {
                return HEALTHY;
            }
            let t = Duration::from_nanos((elapsed.as_nanos() % cycle.as_nanos()) as u64);
            (elapsed - t, t)
        } else {
            (Duration::ZERO, elapsed)
        };
        let mut start = Duration::ZERO;
        for p in &self.phases {
            let end = p.duration.map(|d| start.saturating_add(d));
            if end.is_none_or(|end| t < end) {
                let scale = match (p.kind, p.duration) {
                    (PhaseKind::Healthy, _) => 0.0,
                    (PhaseKind::Failing, _) | (PhaseKind::Recovering, None) => 1.0,
                    (PhaseKind::Recovering, Some(d)) => {
                        1.0 - (t - start).as_secs_f64() / d.as_secs_f64()
                    }
                };
                return Position {
                    kind: p.kind,
                    faults: (p.kind != PhaseKind::Healthy).then_some(&p.faults),
                    scale,
                    ends_at: end.map(|e| offset.saturating_add(e)),
                };
            }
            start = end.unwrap_or(start);
        }
        HEALTHY
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a tiny, fast, well-mixed
/// generator. Each call gets its own generator, seeded from the layer's seed
/// and the call's sequence number, so a call's faults do not depend on how
/// calls on other tasks interleave, and no lock is shared.
#[derive(Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn for_call(seed: u64, n: u64) -> Self {
        SplitMix64(mix(seed ^ mix(n.wrapping_add(0x9E37_79B9_7F4A_7C15))))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A uniform draw in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
