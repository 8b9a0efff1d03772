use super::{AsError, Chaos, HttpStatus, Schedule, Shared};
use crate::ConfigError;
use std::sync::Arc;
use tokio::time::Instant;
use tower::Layer;

/// Applies [`Chaos`]. Every service made from one layer shares one schedule,
/// one start instant, one call counter and one set of [`ChaosStats`](super::ChaosStats).
///
/// `R` decides how an injected error reaches the caller: [`AsError`] (the
/// default) as an `Err`, [`HttpStatus`] as an HTTP response.
///
/// See the [module docs](super).
#[derive(Debug)]
pub struct ChaosLayer<R = AsError> {
    pub(super) shared: Arc<Shared>,
    pub(super) reply: R,
}

impl<R: Clone> Clone for ChaosLayer<R> {
    fn clone(&self) -> Self {
        ChaosLayer {
            shared: self.shared.clone(),
            reply: self.reply.clone(),
        }
    }
}

impl ChaosLayer {
    /// Starts a builder for a layer that follows `schedule`.
    pub fn builder(schedule: Schedule) -> ChaosBuilder {
        ChaosBuilder {
            schedule,
            seed: 0,
            start: None,
            reply: AsError,
        }
    }
}

impl<R> ChaosLayer<R> {
    /// What has been injected so far, across every service made from this layer.
    pub fn stats(&self) -> super::ChaosStats {
        self.shared.stats.snapshot()
    }

    /// The instant the schedule is timed from.
    pub fn start(&self) -> Instant {
        self.shared.start
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.shared.schedule
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// The kind of phase in force at `at`.
    pub fn phase_at(&self, at: Instant) -> super::PhaseKind {
        self.shared
            .schedule
            .at(at.saturating_duration_since(self.shared.start))
            .kind
    }
}

impl<S, R: Clone> Layer<S> for ChaosLayer<R> {
    type Service = Chaos<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Chaos {
            inner,
            shared: self.shared.clone(),
            reply: self.reply.clone(),
        }
    }
}

/// Builds a [`ChaosLayer`]; see [`ChaosLayer::builder`].
#[derive(Debug, Clone)]
pub struct ChaosBuilder<R = AsError> {
    schedule: Schedule,
    seed: u64,
    start: Option<Instant>,
    reply: R,
}

impl<R> ChaosBuilder<R> {
    /// The seed of the fault draws. Default: 0. The same seed, schedule and
    /// order of calls give the same faults on every run.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The instant the schedule is timed from. Default: when
    /// [`build`](Self::build) runs. Give several layers the same start to
    /// keep their phases in step.
    pub fn start_at(mut self, start: Instant) -> Self {
        self.start = Some(start);
        self
    }

    /// Answers injected errors with an HTTP response of this status instead
    /// of an `Err` (aborts stay errors).
    pub fn http_status(self, status: http::StatusCode) -> ChaosBuilder<HttpStatus> {
        ChaosBuilder {
            schedule: self.schedule,
            seed: self.seed,
            start: self.start,
            reply: HttpStatus::new(status),
        }
    }

    /// Checks the schedule and builds the layer.
    pub fn build(self) -> Result<ChaosLayer<R>, ConfigError> {
        self.schedule.validate()?;
        Ok(ChaosLayer {
            shared: Arc::new(Shared::new(
                self.schedule,
                self.seed,
                self.start.unwrap_or_else(Instant::now),
            )),
            reply: self.reply,
        })
    }
}
