use super::{Defer, Settings};
use crate::queue::Queue;
use crate::registry::{QueueEntry, Registry};
use http::{HeaderMap, StatusCode};
use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower::Layer;

/// Applies [`Defer`]: requests that fail, and may be deferred, are stored in
/// the queue and answered `202 Accepted`.
///
/// See the [module docs](super).
pub struct DeferLayer<Q> {
    queue: Arc<Q>,
    settings: Settings,
    registry: Option<Registry>,
}

impl<Q: Queue> DeferLayer<Q> {
    /// Defers into `queue`, with the defaults of
    /// [`DeferConfig`](super::DeferConfig).
    pub fn new(queue: Q) -> Self {
        DeferLayer {
            queue: Arc::new(queue),
            settings: Settings::default(),
            registry: None,
        }
    }

    /// Names the queue this layer defers into: the `name` label of the
    /// `firebreak.calls{layer="defer"}` and enqueue-latency series (feature
    /// `metrics`), and the queue's entry in a [`Registry`]: a named layer
    /// registers its queue in [`Registry::global()`] (or the one given to
    /// [`registry`](Self::registry)) when it makes its first service; the
    /// entry leaves when the layer and its services are dropped (unless its
    /// [`Replayer`](super::Replayer), named the same, still runs). Give
    /// the replayer the same name. Default: none.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name: String = name.into();
        self.settings.obs = Arc::new(crate::observe::QueueMetrics::new(Some(&name)));
        let entry = QueueEntry::shared(&name, self.queue.clone());
        self.settings.registered = Some((name.into(), entry));
        self
    }
}

impl<Q> DeferLayer<Q> {
    /// The registry a named layer registers its queue in, instead of
    /// [`Registry::global()`]. See [self-registration](crate::registry#self-registration).
    pub fn registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// The largest request body buffered, in bytes; a larger one gets
    /// `413 Payload Too Large` and is neither sent nor queued. Default: 1 MiB.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.settings.max_body = bytes;
        self
    }

    /// How long the whole request body may take to arrive. A body that is
    /// still coming after that gets `408 Request Timeout` and is neither
    /// sent nor queued, so a slow client cannot hold a buffer of up to
    /// [`max_body`](Self::max_body) for as long as it likes. The clock
    /// starts at the first poll of the response future, before any deadline
    /// inside this layer starts. Default: 30 s.
    ///
    /// # Panics
    ///
    /// If `timeout` is zero ([`DeferConfig`](super::DeferConfig) reports
    /// that as a [`ConfigError`](crate::ConfigError) instead).
    pub fn body_timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "body_timeout must be above zero");
        self.settings.body_timeout = timeout;
        self
    }

    /// Where [`status_router`](super::status_router) (or your own status
    /// route) is mounted, e.g. `"/jobs"`. A deferred answer then carries
    /// `Location: /jobs/{id}` and a `links.status` field. Default: none.
    pub fn status_path(mut self, path: impl Into<String>) -> Self {
        self.settings.status_path = Some(path.into().into());
        self
    }

    /// The `Retry-After` of a `202 Accepted` (and of the `503` when the
    /// queue fails) when the failure gave no better
    /// hint (an open breaker's or a limiter's `retry_after`, or the failed
    /// response's own `Retry-After` in seconds, is used when there is one).
    /// Default: 5 s.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.settings.retry_after = after;
        self
    }

    /// How long a deferred job may wait for delivery before the queue
    /// dead-letters it. Default: none.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings.ttl = Some(ttl);
        self
    }

    /// Which requests may be deferred, replacing the default
    /// ([`deferrable_by_default`](super::deferrable_by_default): not `GET`,
    /// and with an `Idempotency-Key`). Combine with the default to widen it:
    ///
    /// ```
    /// # use tower_firebreak::defer::{DeferLayer, deferrable_by_default};
    /// # use tower_firebreak::queue::memory::MemoryQueue;
    /// let layer = DeferLayer::new(MemoryQueue::new()).deferrable(|parts| {
    ///     deferrable_by_default(parts) || parts.uri.path().starts_with("/webhooks/")
    /// });
    /// # let _ = layer;
    /// ```
    pub fn deferrable<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    {
        self.settings.deferrable = Arc::new(predicate);
        self
    }

    /// The scope an `Idempotency-Key` dedups in: requests whose scopes
    /// differ never share a job, however equal their keys. Default:
    /// [`scope_by_authorization`](super::scope_by_authorization), the
    /// caller's credentials. `None` from `scope` is the global scope.
    ///
    /// ```
    /// # use tower_firebreak::defer::DeferLayer;
    /// # use tower_firebreak::queue::memory::MemoryQueue;
    /// // Keys are per tenant, whatever credentials the tenant's calls carry.
    /// let layer = DeferLayer::new(MemoryQueue::new()).key_scope(|parts| {
    ///     let tenant = parts.headers.get("x-tenant-id")?;
    ///     Some(tenant.to_str().ok()?.to_owned())
    /// });
    /// // Or keys shared by every caller, as the queue stores them.
    /// let global = DeferLayer::new(MemoryQueue::new()).key_scope(|_| None);
    /// # let _ = (layer, global);
    /// ```
    pub fn key_scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.settings.key_scope = Arc::new(scope);
        self
    }

    /// Which responses of the inner service count as failures to defer.
    /// Default: [`server_error`](super::server_error), every 5xx and a gRPC failure status in the headers.
    pub fn defer_response<F>(mut self, predicate: F) -> Self
    where
        F: Fn(StatusCode, &HeaderMap) -> bool + Send + Sync + 'static,
    {
        self.settings.failed_response = Arc::new(predicate);
        self
    }

    /// Which errors of the inner service are deferred; the others pass
    /// through. Default: every error, our rejections (breaker, bulkhead,
    /// deadline, timeout, rate limit) and the dependency's failures alike.
    /// Only our rejections:
    ///
    /// ```
    /// # use tower_firebreak::{defer::DeferLayer, error::Rejection};
    /// # use tower_firebreak::queue::memory::MemoryQueue;
    /// let layer = DeferLayer::new(MemoryQueue::new()).defer_error(|e| Rejection::of(e).is_some());
    /// # let _ = layer;
    /// ```
    pub fn defer_error<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&(dyn Error + 'static)) -> bool + Send + Sync + 'static,
    {
        self.settings.failed_error = Arc::new(predicate);
        self
    }

    /// The queue.
    pub fn queue(&self) -> &Q {
        &self.queue
    }
}

impl<Q> Clone for DeferLayer<Q> {
    fn clone(&self) -> Self {
        DeferLayer {
            queue: self.queue.clone(),
            settings: self.settings.clone(),
            registry: self.registry.clone(),
        }
    }
}

impl<Q: fmt::Debug> fmt::Debug for DeferLayer<Q> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferLayer")
            .field("queue", &self.queue)
            .field("settings", &self.settings)
            .finish()
    }
}

impl<S, Q> Layer<S> for DeferLayer<Q> {
    type Service = Defer<S, Q>;

    fn layer(&self, inner: S) -> Self::Service {
        if let Some((name, entry)) = &self.settings.registered {
            crate::registry::target(self.registry.as_ref()).register_queue(name, entry);
        }
        Defer::from_parts(inner, self.queue.clone(), Arc::new(self.settings.clone()))
    }
}
