//! `Resilience`: the standard pipeline, in the right order, as one layer.
//!
//! [`Resilience::builder()`] (or a [`ResilienceConfig`] loaded with serde)
//! builds one [`ResilienceLayer`] that stacks, outermost first:
//!
//! 1. rate limit ([`crate::rate_limit`])
//! 2. bulkhead ([`crate::bulkhead`])
//! 3. deadline, the total timeout ([`crate::deadline`])
//! 4. retry, with its request-body buffering ([`crate::retry`])
//! 5. circuit breaker with the HTTP classifier, which also reads a
//!    `grpc-status` in the response headers ([`crate::circuit_breaker`],
//!    [`HttpClassifier::grpc_status_headers`](crate::classify::HttpClassifier::grpc_status_headers))
//! 6. attempt timeout ([`crate::timeout`]), then the deadline
//!    written onto the outgoing request ([`PropagateDeadline`])
//! 7. the service
//!
//! The preset serves `http::Request<B>`; the service inside it receives
//! `http::Request<`[`ReplayBody`](crate::retry::ReplayBody)`<B>>`, the
//! recorded body retries replay (a hyper client is built with
//! `build_http::<ReplayBody<Full<Bytes>>>()`; an axum `Router` takes any body).
//!
//! Every stage is optional. With the attempt timeout off and the deadline
//! on, an attempt's timeout is the whole budget, so a dependency that hangs
//! through it still counts as failed (see [`crate::timeout`]). `defer` or
//! `fallback` go outside the preset (they
//! carry your queue or your fallback value): `.layer(DeferLayer::new(q)).layer(preset)`.
//!
//! Calls made inside a request whose caller sent a shorter budget (a
//! `grpc-timeout` of 2 s against the 10 s attempt timeout, read by a server
//! stack and carried to this one by [`deadline::current`](crate::deadline::current))
//! are cut by that budget, which is not counted against the dependency: on
//! failures alone a hung dependency would then never open the breaker. Set
//! the attempt timeout below those budgets, or turn on slow-call detection
//! with `slow_call_duration` below them
//! ([`CircuitBreakerConfig`]):
//! a call cut after running that long counts as slow.
//!
//! The settings are checked once, at build time, and contradictions are a
//! [`ConfigError`] that names both fields:
//!
//! - the attempt timeout must be no longer than the deadline;
//! - the retry delays (their nominal sum) must fit inside the deadline;
//! - a breaker's time window must be at least twice the attempt timeout.
//!
//! # Defaults
//!
//! The reference point is Microsoft's standard HTTP resilience handler
//! (`Microsoft.Extensions.Http.Resilience`, `AddStandardResilienceHandler`).
//! Each row is checked against the code by a test.
//!
//! | setting | default | Microsoft's | why ours differs |
//! | --- | --- | --- | --- |
//! | `rate_limit` | off | (none) | a rate is a business decision; there is no sane universal number |
//! | `bulkhead.max_concurrent` | 1000 | 1000 permits | |
//! | `bulkhead.max_wait` | 0s | queue of 0 | |
//! | `deadline.budget` | 30s | total request timeout 30 s | |
//! | `retry.max_attempts` | 3 | 4 (3 retries) | with a budget, two retries catch nearly every transient fault; a third mostly adds load |
//! | `retry.base_delay` | 100ms | 2 s | service-to-service calls recover in milliseconds; 2 s first retries stall callers |
//! | `retry.budget.ratio` | 0.2 | (no budget) | a budget is what keeps retries from becoming a retry storm |
//! | `circuit_breaker.time_window` | 30s | sampling 30 s | |
//! | `circuit_breaker.minimum_calls` | 20 | minimum throughput 100 | low-traffic dependencies should trip too |
//! | `circuit_breaker.failure_rate` | 0.5 | failure ratio 0.1 | 10% trips on routine noise (Resilience4j and Hystrix use 50%) |
//! | `circuit_breaker.open_for` | 5s | break 5 s | |
//! | `timeout.timeout` | 10s | attempt timeout 10 s | |
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_firebreak::preset::Resilience;
//!
//! let layer = Resilience::builder()
//!     .deadline(Duration::from_secs(2))
//!     .attempt_timeout(Duration::from_millis(500))
//!     .max_attempts(3)
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//!
//! // A contradiction is caught at build time, naming both fields.
//! let err = Resilience::builder()
//!     .deadline(Duration::from_secs(1))
//!     .attempt_timeout(Duration::from_secs(5))
//!     .build()
//!     .unwrap_err();
//! assert_eq!(err.field(), "timeout.timeout");
//! assert_eq!(err.other_field(), Some("deadline.budget"));
//! ```
//!
//! Loaded from a file, with named policies (feature `toml`; `yaml` likewise):
//!
//! ```
//! # #[cfg(feature = "toml")] {
//! use tower_firebreak::preset::Policies;
//!
//! let policies = Policies::from_toml(r#"
//!     [policies.payments]
//!     name = "payments"
//!     deadline = { budget = "2s" }
//!     timeout = { timeout = "500ms" }
//!     rate_limit = { per_second = 200 }
//!
//!     [policies.search]
//!     retry = false
//! "#).unwrap();
//! let payments = policies.layer("payments").unwrap();
//! # let _ = payments;
//! # }
//! ```
//!
//! # Names
//!
//! A policy's `name` (or [`ResilienceBuilder::name`]) names its rate
//! limit, bulkhead, retry and breaker stages alike; a stage's own `name`
//! (`bulkhead = { name = "payments-pool" }`) wins over it. Named stages
//! record the `firebreak.*` metrics (feature `metrics`) with that `name`
//! label, the `layer` label telling them apart, the breaker, bulkhead
//! and limiter register themselves in the
//! [registry](crate::registry#self-registration), and each call runs in a
//! `firebreak.call` span of that name ([`span`](crate::span)). A policy's key in
//! `[policies.KEY]` does not name it: build a named policy's layer once and
//! clone it, since two live layers under one name share their series.

use crate::bulkhead::{Bulkhead, BulkheadConfig, BulkheadLayer};
use crate::circuit_breaker::{CircuitBreaker, CircuitBreakerConfig, CircuitBreakerLayer};
use crate::classify;
use crate::deadline::{Deadline, DeadlineConfig, DeadlineLayer, PropagateDeadline};
use crate::http::RejectionResponseLayer;
use crate::rate_limit::{RateLimit, RateLimitConfig, RateLimitLayer};
use crate::registry::Registry;
use crate::retry::{self, BufferRequestBody, Retry, RetryConfig, RetryLayer, RetryPolicy};
use crate::timeout::{Timeout, TimeoutConfig, TimeoutLayer};
use crate::{BoxError, ConfigError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::layer::util::Stack;
use tower::{Layer, Service};

/// A stage of the preset in a config file: `false` turns it off, `true` keeps
/// its defaults, a table sets it.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage<T> {
    /// The stage is off.
    Off,
    /// The stage is on, with these settings.
    On(T),
}

impl<T> Stage<T> {
    fn into_option(self) -> Option<T> {
        match self {
            Stage::Off => None,
            Stage::On(t) => Some(t),
        }
    }
}

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for Stage<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            Switch(bool),
            Settings(T),
        }
        Ok(match Raw::<T>::deserialize(d)? {
            Raw::Switch(false) => Stage::Off,
            Raw::Switch(true) => Stage::On(T::default()),
            Raw::Settings(t) => Stage::On(t),
        })
    }
}

/// The preset's settings, loadable with serde. See the [module docs](self)
/// for the defaults and why they are what they are.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ResilienceConfig {
    /// Names every stage that has no `name` of its own: the `name` label of
    /// the rate limit, bulkhead, retry and breaker metrics (feature
    /// `metrics`; the `layer` label tells the stages apart), and their
    /// entries in [`Registry::global()`](crate::registry::Registry::global)
    /// (or the builder's [`registry`](ResilienceBuilder::registry)); and
    /// each call runs in a `firebreak.call` span with this `name` (see
    /// [`span`](crate::span)). Default: none (no metrics, not registered,
    /// no span).
    pub name: Option<String>,
    /// Default: off.
    pub rate_limit: Stage<RateLimitConfig>,
    /// Default: on, [`BulkheadConfig::default()`].
    pub bulkhead: Stage<BulkheadConfig>,
    /// Default: on, 30 s.
    pub deadline: Stage<DeadlineConfig>,
    /// Default: on, [`RetryConfig::default()`] with HTTP retryability.
    pub retry: Stage<RetryConfig>,
    /// Default: on, [`ResilienceConfig::default_breaker()`], with the HTTP classifier.
    pub circuit_breaker: Stage<CircuitBreakerConfig>,
    /// Default: on, 10 s.
    pub timeout: Stage<TimeoutConfig>,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            name: None,
            rate_limit: Stage::Off,
            bulkhead: Stage::On(BulkheadConfig::default()),
            deadline: Stage::On(DeadlineConfig::default()),
            retry: Stage::On(RetryConfig::default()),
            circuit_breaker: Stage::On(Self::default_breaker()),
            timeout: Stage::On(TimeoutConfig::default()),
        }
    }
}

impl ResilienceConfig {
    /// The preset's breaker: a 30 s time window, 20 calls at least, opening
    /// at 50% failures, for 5 s.
    pub fn default_breaker() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            count_window: None,
            time_window: Some(Duration::from_secs(30)),
            minimum_calls: 20,
            failure_rate: 0.5,
            open_for: Duration::from_secs(5),
            ..CircuitBreakerConfig::default()
        }
    }

    /// Checks every stage and the contradictions between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Built without names: a check must not register anything.
        let mut unnamed = self.clone();
        unnamed.name = None;
        if let Stage::On(c) = &mut unnamed.rate_limit {
            c.name = None;
        }
        if let Stage::On(c) = &mut unnamed.bulkhead {
            c.name = None;
        }
        if let Stage::On(c) = &mut unnamed.retry {
            c.name = None;
        }
        if let Stage::On(c) = &mut unnamed.circuit_breaker {
            c.name = None;
        }
        unnamed.into_layer().map(|_| ())
    }

    /// Checks the settings and builds the layer.
    pub fn into_layer(self) -> Result<ResilienceLayer, ConfigError> {
        self.into_layer_in(None)
    }

    fn into_layer_in(self, registry: Option<&Registry>) -> Result<ResilienceLayer, ConfigError> {
        let name = self.name;
        // A stage's own name wins over the preset's.
        let named = |own: &mut Option<String>| {
            if own.is_none() {
                own.clone_from(&name);
            }
        };
        let mut rate_limit = self.rate_limit.into_option();
        let mut bulkhead = self.bulkhead.into_option();
        let deadline = self.deadline.into_option();
        let mut retry = self.retry.into_option();
        let mut breaker = self.circuit_breaker.into_option();
        let timeout = self.timeout.into_option();
        rate_limit.iter_mut().for_each(|c| named(&mut c.name));
        bulkhead.iter_mut().for_each(|c| named(&mut c.name));
        retry.iter_mut().for_each(|c| named(&mut c.name));
        breaker.iter_mut().for_each(|c| named(&mut c.name));

        let budget = deadline.as_ref().map(|d| d.budget);
        let attempt = timeout.as_ref().map(|t| t.timeout);
        if let (Some(budget), Some(attempt)) = (budget, attempt)
            && attempt > budget
        {
            return Err(ConfigError::conflict(
                "timeout.timeout",
                attempt,
                "deadline.budget",
                budget,
                "an attempt cannot be allowed longer than the whole call",
            ));
        }
        let retry_policy = match &retry {
            Some(r) => r.policy().map_err(|e| e.in_section("retry"))?.http(),
            None => RetryPolicy::exponential(RetryPolicy::DEFAULT_BASE_DELAY)
                .max_attempts(1)
                .http(),
        };
        if let (Some(budget), Some(r)) = (budget, &retry) {
            let total = retry_policy.max_total_delay();
            if total >= budget {
                return Err(ConfigError::conflict(
                    "retry.base_delay",
                    r.base_delay,
                    "deadline.budget",
                    budget,
                    format!(
                        "{} attempts sleep up to {total:?} between them, which does not fit inside the deadline",
                        r.max_attempts
                    ),
                ));
            }
        }
        if let (Some(b), Some(attempt)) = (&breaker, attempt)
            && let Some(window) = b.time_window
            && window < attempt.saturating_mul(2)
        {
            return Err(ConfigError::conflict(
                "circuit_breaker.time_window",
                window,
                "timeout.timeout",
                attempt,
                "the window must hold at least two attempts, or a hang is never seen as a failure in time",
            ));
        }

        let breaker_layer = match breaker {
            Some(b) => b
                .into_layer_in(
                    classify::HttpClassifier::new().grpc_status_headers(true),
                    registry,
                )
                .map_err(|e| e.in_section("circuit_breaker"))?,
            None => {
                let l = CircuitBreakerConfig::default()
                    .into_layer_with(classify::HttpClassifier::new().grpc_status_headers(true))?;
                l.handle().disable();
                l
            }
        };
        // A wait before the deadline stage must not re-base the caller's
        // budget on the time after it.
        let stamp_arrival = deadline.as_ref().is_some_and(|d| d.read_headers)
            && (bulkhead.as_ref().is_some_and(|b| !b.max_wait.is_zero())
                || rate_limit
                    .as_ref()
                    .is_some_and(|r| r.mode == crate::rate_limit::RateLimitMode::Wait));
        let in_registry = |l: BulkheadLayer| match registry {
            Some(r) => l.registry(r),
            None => l,
        };
        Ok(ResilienceLayer {
            span: name.map(Into::into),
            rate_limit: rate_limit
                .map(|c| {
                    c.into_layer()
                        .map(|l| match registry {
                            Some(r) => l.registry(r),
                            None => l,
                        })
                        .map_err(|e| e.in_section("rate_limit"))
                })
                .transpose()?,
            bulkhead: bulkhead
                .map(|c| {
                    c.into_layer()
                        .map(in_registry)
                        .map_err(|e| e.in_section("bulkhead"))
                })
                .transpose()?,
            deadline: deadline
                .map(|c| c.into_layer().map_err(|e| e.in_section("deadline")))
                .transpose()?,
            body_limit: if retry.is_some() {
                BufferRequestBody::<()>::DEFAULT_LIMIT
            } else {
                0
            },
            retry: RetryLayer::new(retry_policy),
            breaker: breaker_layer,
            timeout: timeout
                .map(|c| c.into_layer().map_err(|e| e.in_section("timeout")))
                .transpose()?,
            stamp_arrival,
        })
    }
}

/// Entry point of the preset: `Resilience::builder()`.
#[derive(Clone, Copy, Debug)]
pub struct Resilience {
    _priv: (),
}

impl Resilience {
    /// A builder for protecting calls to a dependency, with the
    /// [defaults](self#defaults): every stage but the rate limit.
    pub fn builder() -> ResilienceBuilder {
        ResilienceBuilder {
            config: ResilienceConfig::default(),
            registry: None,
        }
    }

    /// A builder for protecting your own server: bulkhead and deadline on
    /// (add `.rate_limit(n)`), and no retry, breaker or attempt timeout, which
    /// belong on the calls your server makes, not on the requests it serves.
    pub fn server() -> ResilienceBuilder {
        ResilienceBuilder {
            config: ResilienceConfig {
                retry: Stage::Off,
                circuit_breaker: Stage::Off,
                timeout: Stage::Off,
                ..ResilienceConfig::default()
            },
            registry: None,
        }
    }
}

/// Builds a [`ResilienceLayer`]. Every setting is checked in [`build`](Self::build).
#[derive(Clone, Debug)]
pub struct ResilienceBuilder {
    config: ResilienceConfig,
    registry: Option<Registry>,
}

impl ResilienceBuilder {
    /// Starts from `config` instead of the defaults.
    pub fn from_config(config: ResilienceConfig) -> Self {
        ResilienceBuilder {
            config,
            registry: None,
        }
    }

    /// Names every stage (see [`ResilienceConfig::name`]): its breaker,
    /// bulkhead and rate limiter join [`Registry::global()`] (or
    /// [`registry`](Self::registry)) under this name, and record metrics
    /// under it (feature `metrics`); and each call runs in a
    /// `firebreak.call` span with this `name`, as with
    /// [`CallSpanLayer`](crate::span::CallSpanLayer) outermost. Default: none.
    ///
    /// ```
    /// use tower::{Layer, service_fn};
    /// use tower_firebreak::{BoxError, preset::Resilience, registry::Registry};
    ///
    /// let registry = Registry::new();
    /// let layer = Resilience::builder()
    ///     .name("payments")
    ///     .registry(&registry)
    ///     .build()
    ///     .unwrap();
    /// let svc = layer.layer(service_fn(|_: http::Request<String>| async {
    ///     Ok::<_, BoxError>(http::Response::new(String::new()))
    /// }));
    /// assert!(registry.breaker("payments").is_some());
    /// assert!(registry.bulkhead("payments").is_some());
    /// # let _ = svc;
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// The registry the named stages register in, instead of
    /// [`Registry::global()`]. See [self-registration](crate::registry#self-registration).
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Turns the rate limit on, at `per_second` calls a second.
    pub fn rate_limit(mut self, per_second: u32) -> Self {
        self.config.rate_limit = Stage::On(RateLimitConfig {
            per_second,
            ..RateLimitConfig::default()
        });
        self
    }

    /// At most `max_concurrent` calls in flight; the rest are shed at once.
    pub fn bulkhead(mut self, max_concurrent: usize) -> Self {
        self.config.bulkhead = Stage::On(BulkheadConfig {
            max_concurrent,
            ..BulkheadConfig::default()
        });
        self
    }

    /// The budget of the whole call, retries included.
    pub fn deadline(mut self, budget: Duration) -> Self {
        self.config.deadline = Stage::On(DeadlineConfig {
            budget,
            ..DeadlineConfig::default()
        });
        self
    }

    /// The timeout of one attempt.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Stage::On(TimeoutConfig { timeout });
        self
    }

    /// Attempts in all, the first included (1 turns retries off).
    pub fn max_attempts(mut self, n: u32) -> Self {
        let mut r = match self.config.retry {
            Stage::On(r) => r,
            Stage::Off => RetryConfig::default(),
        };
        r.max_attempts = n;
        self.config.retry = Stage::On(r);
        self
    }

    /// The retry settings.
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.config.retry = Stage::On(retry);
        self
    }

    /// The breaker settings.
    pub fn circuit_breaker(mut self, breaker: CircuitBreakerConfig) -> Self {
        self.config.circuit_breaker = Stage::On(breaker);
        self
    }

    /// Turns off the stages named: `"rate_limit"`, `"bulkhead"`,
    /// `"deadline"`, `"retry"`, `"circuit_breaker"`, `"timeout"`.
    ///
    /// # Panics
    ///
    /// On any other name.
    pub fn without(mut self, stage: &str) -> Self {
        match stage {
            "rate_limit" => self.config.rate_limit = Stage::Off,
            "bulkhead" => self.config.bulkhead = Stage::Off,
            "deadline" => self.config.deadline = Stage::Off,
            "retry" => self.config.retry = Stage::Off,
            "circuit_breaker" => self.config.circuit_breaker = Stage::Off,
            "timeout" => self.config.timeout = Stage::Off,
            other => panic!("no preset stage named {other:?}"),
        }
        self
    }

    /// The settings so far.
    pub fn config(&self) -> &ResilienceConfig {
        &self.config
    }

    /// Checks the settings and builds the layer.
    pub fn build(self) -> Result<ResilienceLayer, ConfigError> {
        self.config.into_layer_in(self.registry.as_ref())
    }
}

/// The preset as one named layer. See the [module docs](self).
#[derive(Clone)]
pub struct ResilienceLayer {
    /// The preset's name: each call runs in a `firebreak.call` span of it.
    span: Option<Arc<str>>,
    rate_limit: Option<RateLimitLayer>,
    bulkhead: Option<BulkheadLayer>,
    deadline: Option<DeadlineLayer>,
    body_limit: usize,
    retry: RetryLayer<retry::HttpClassifier>,
    breaker: CircuitBreakerLayer<classify::HttpClassifier>,
    timeout: Option<TimeoutLayer>,
    /// The rate limiter or the bulkhead may hold a call before the deadline
    /// stage, which reads the caller's budget from the headers: that budget
    /// is then read on arrival instead (see `ResilienceService::call`).
    stamp_arrival: bool,
}

impl fmt::Debug for ResilienceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilienceLayer")
            .field("span", &self.span)
            .field("rate_limit", &self.rate_limit)
            .field("bulkhead", &self.bulkhead)
            .field("deadline", &self.deadline)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl ResilienceLayer {
    /// The breaker's handle: its state, `force_open`, `reset`, events.
    pub fn breaker(&self) -> crate::circuit_breaker::CircuitBreakerHandle {
        self.breaker.handle()
    }

    /// The preset with our rejections turned into HTTP responses (504, 503 +
    /// Retry-After, 429 + Retry-After, problem details), so the service is
    /// infallible and an axum `Router` takes it with `.layer(...)`.
    pub fn infallible(self) -> Stack<ResilienceLayer, RejectionResponseLayer> {
        Stack::new(self, RejectionResponseLayer::new())
    }
}

/// The stack the preset builds around `S`, innermost last.
pub type Stages<S> = RateLimit<
    Bulkhead<
        Deadline<
            BufferRequestBody<
                Retry<
                    CircuitBreaker<Timeout<PropagateDeadline<S>>, classify::HttpClassifier>,
                    retry::HttpClassifier,
                >,
            >,
        >,
    >,
>;

/// The preset's service. See [`ResilienceLayer`].
#[derive(Clone, Debug)]
pub struct ResilienceService<S> {
    inner: Stages<S>,
    span: Option<Arc<str>>,
    stamp_arrival: bool,
}

impl<S> ResilienceService<S> {
    /// The whole stack, for inspection.
    pub fn get_ref(&self) -> &Stages<S> {
        &self.inner
    }

    /// The whole stack, mutably.
    pub fn get_mut(&mut self) -> &mut Stages<S> {
        &mut self.inner
    }

    /// Consumes `self`, returning the stack.
    pub fn into_inner(self) -> Stages<S> {
        self.inner
    }
}

impl<S> Layer<S> for ResilienceLayer {
    type Service = ResilienceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let s = PropagateDeadline::new(inner)
            .attempt_timeout(self.timeout.as_ref().map(TimeoutLayer::timeout));
        let s = match (&self.timeout, &self.deadline) {
            (Some(l), _) => l.layer(s),
            // No attempt timeout: the attempt may take the whole budget, so
            // the budget is its timeout. An attempt that had it and hung is
            // then the dependency's failure (see `crate::timeout`), and a
            // hung dependency can still open the breaker.
            (None, Some(d)) => Timeout::new(s, d.budget()),
            (None, None) => Timeout::off(s),
        };
        let s = self.breaker.layer(s);
        let s = self.retry.layer(s);
        let s = BufferRequestBody::new(s, self.body_limit);
        let s = match &self.deadline {
            Some(l) => l.layer(s),
            None => Deadline::off(s),
        };
        let s = match &self.bulkhead {
            Some(l) => l.layer(s),
            None => Bulkhead::from_pool(s, None),
        };
        let s = match &self.rate_limit {
            Some(l) => l.layer(s),
            None => RateLimit::off(s),
        };
        ResilienceService {
            inner: s,
            span: self.span.clone(),
            stamp_arrival: self.stamp_arrival,
        }
    }
}

impl<S, B> Service<http::Request<B>> for ResilienceService<S>
where
    Stages<S>: Service<http::Request<B>, Error = BoxError>,
{
    type Response = <Stages<S> as Service<http::Request<B>>>::Response;
    type Error = BoxError;
    type Future =
        crate::span::future::ResponseFuture<<Stages<S> as Service<http::Request<B>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if self.stamp_arrival {
            // Before the rate limiter's and the bulkhead's waits: the
            // caller's budget runs from now.
            crate::deadline::stamp_arrival(&mut req);
        }
        let span = match &self.span {
            Some(name) => crate::span::call_span(name),
            // Unnamed: no span, and no callsite check.
            None => tracing::Span::none(),
        };
        crate::span::call_in_span(&mut self.inner, req, span)
    }
}

/// Named policies, as operators write them: `[policies.payments]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    /// The policies by name.
    #[serde(default)]
    pub policies: BTreeMap<String, ResilienceConfig>,
}

impl Policies {
    /// Parses TOML, and checks every policy (errors name `policies.NAME.field`).
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Policies, ConfigError> {
        let p: Policies = toml::from_str(text)
            .map_err(|e| ConfigError::new("policies", "(TOML)", e.message().to_owned()))?;
        p.validate()?;
        Ok(p)
    }

    /// Parses YAML, and checks every policy (errors name `policies.NAME.field`).
    #[cfg(feature = "yaml")]
    pub fn from_yaml(text: &str) -> Result<Policies, ConfigError> {
        let p: Policies = serde_norway::from_str(text)
            .map_err(|e| ConfigError::new("policies", "(YAML)", e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// Checks every policy.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, p) in &self.policies {
            p.validate()
                .map_err(|e| e.in_section(&format!("policies.{name}")))?;
        }
        Ok(())
    }

    /// The policy `name`.
    pub fn get(&self, name: &str) -> Option<&ResilienceConfig> {
        self.policies.get(name)
    }

    /// Builds the layer of policy `name`.
    pub fn layer(&self, name: &str) -> Result<ResilienceLayer, ConfigError> {
        let p = self
            .policies
            .get(name)
            .ok_or_else(|| ConfigError::new("policies", name, "no policy of that name"))?;
        p.clone()
            .into_layer()
            .map_err(|e| e.in_section(&format!("policies.{name}")))
    }
}
