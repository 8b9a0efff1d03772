//! A scripted inner service that records when each attempt started.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower_firebreak::BoxError;

/// The script for one attempt: how long it takes, then what it returns.
#[derive(Clone, Debug)]
pub(crate) enum Step<T> {
    Ok(T),
    Err(&'static str),
    ErrBox(fn() -> BoxError),
}

type Planned<T> = (Duration, Step<T>);

#[derive(Clone, Debug)]
pub(crate) struct Script<T> {
    steps: Arc<Mutex<VecDeque<Planned<T>>>>,
    /// What to do once the script runs out.
    fallback: Option<(Duration, Step<T>)>,
    pub(crate) starts: Arc<Mutex<Vec<Instant>>>,
    pub(crate) ends: Arc<Mutex<Vec<Instant>>>,
}

impl<T: Clone + Send + 'static> Script<T> {
    pub(crate) fn new(steps: impl IntoIterator<Item = (Duration, Step<T>)>) -> Self {
        Script {
            steps: Arc::new(Mutex::new(steps.into_iter().collect())),
            fallback: None,
            starts: Arc::default(),
            ends: Arc::default(),
        }
    }

    /// Every attempt fails at once with `msg`.
    pub(crate) fn always_err(msg: &'static str) -> Self {
        let mut s = Self::new([]);
        s.fallback = Some((Duration::ZERO, Step::Err(msg)));
        s
    }

    pub(crate) fn then_always(mut self, latency: Duration, step: Step<T>) -> Self {
        self.fallback = Some((latency, step));
        self
    }

    pub(crate) fn attempts(&self) -> usize {
        self.starts.lock().unwrap().len()
    }

    /// The gaps between the end of one attempt and the start of the next.
    pub(crate) fn gaps(&self) -> Vec<Duration> {
        let starts = self.starts.lock().unwrap();
        let ends = self.ends.lock().unwrap();
        starts
            .iter()
            .skip(1)
            .zip(ends.iter())
            .map(|(s, e)| *s - *e)
            .collect()
    }

    /// One attempt, as the body of a `service_fn`.
    pub(crate) fn attempt(&self) -> impl Future<Output = Result<T, BoxError>> + Send + use<T> {
        self.starts.lock().unwrap().push(Instant::now());
        let step = self
            .steps
            .lock()
            .unwrap()
            .pop_front()
            .or_else(|| self.fallback.clone())
            .expect("the script ran out");
        let ends = self.ends.clone();
        async move {
            tokio::time::sleep(step.0).await;
            ends.lock().unwrap().push(Instant::now());
            match step.1 {
                Step::Ok(v) => Ok(v),
                Step::Err(m) => Err(m.into()),
                Step::ErrBox(f) => Err(f()),
            }
        }
    }

    /// A service of any `Req` that follows the script.
    pub(crate) fn service<Req>(
        &self,
    ) -> impl tower::Service<
        Req,
        Response = T,
        Error = BoxError,
        Future = impl Future<Output = Result<T, BoxError>> + Send + 'static,
    > + Clone
    + Send
    + 'static {
        let me = self.clone();
        tower::service_fn(move |_req: Req| me.attempt())
    }
}

/// A current-thread runtime with the time driver, its clock paused.
pub(crate) fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

pub(crate) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
