//! An axum router for operators: the [`Registry`] as JSON and as a live
//! HTML page, breaker controls, dead-letter redrive, and (feature
//! `prometheus`) `GET /metrics`.
//!
//! | route | what it does |
//! | --- | --- |
//! | `GET /firebreak` | a redirect to `/firebreak/` (the page fetches its data relative to itself) |
//! | `GET /firebreak/` | a status page that refreshes itself every second: breakers coloured by state, with a reset button, bulkheads, rate limits, keyed breakers (keys counted by state, with a reset-all button), keyed bulkheads and keyed rate limits, queue depths, recent transitions |
//! | `GET /firebreak/status` | the [`Snapshot`](crate::registry::Snapshot) as JSON |
//! | `POST /firebreak/breakers/{name}/force-open` | [`force_open`](crate::circuit_breaker::CircuitBreakerHandle::force_open); 204, or 404 for an unknown name; 409 for a keyed breaker (force one key open through [`KeyedCircuitBreakerHandle::get`](crate::circuit_breaker::KeyedCircuitBreakerHandle::get): keys that arrive later would start closed, or share the overflow breaker) |
//! | `POST /firebreak/breakers/{name}/reset` | [`reset`](crate::circuit_breaker::CircuitBreakerHandle::reset); 204 or 404. For a keyed breaker (when no plain breaker has the name), resets every live key and the overflow breaker ([`Registry::reset_keyed_breaker`]); 204 |
//! | `GET /firebreak/jobs/dead` | the dead letters of every registered queue (up to 100 each), as JSON |
//! | `POST /firebreak/jobs/dead/{id}/redrive` | moves a dead-lettered job back to its queue; 200 with the queue's name, or 404 |
//! | `GET /metrics` | with [`Admin::prometheus`]: the Prometheus text format, after a snapshot has refreshed the sampled gauges |
//!
//! A `POST` from a browser (it carries `Origin` or `Sec-Fetch-Site`) gets
//! 403 unless the browser marks it same-origin (`Sec-Fetch-Site:
//! same-origin`, or `none`: typed by the user) or it carries the header [`ADMIN_HEADER`] (any value), as
//! the status page's own requests do. A page on another site can send
//! neither without a CORS preflight, which this router never grants, so it
//! cannot make an operator's browser force a breaker open or redrive a job
//! (cross-site request forgery: a bodiless `POST` needs no preflight). No
//! `Host` comparison is made, so a reverse proxy that rewrites `Host` does
//! not break the page. Clients that are not browsers (curl, scripts) send
//! neither `Origin` nor `Sec-Fetch-Site` and are not affected.
//!
//! Nothing is served until the application merges [`Admin::router`] into
//! its own router, and the router carries no authentication of its own:
//! these routes change production state, so put your own guard in front of
//! them with `route_layer` (tower-http's `ValidateRequestHeaderLayer`, your
//! session middleware, a separate listener bound to an internal address…).
//!
//! ```
//! use axum::Router;
//! use tower_firebreak::admin::Admin;
//! use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
//! use tower_firebreak::registry::Registry;
//!
//! # fn main() -> Result<(), tower_firebreak::BoxError> {
//! let registry = Registry::new();
//! let payments = CircuitBreakerLayer::builder().name("payments").build()?;
//! registry.add_breaker(payments.handle())?;
//!
//! let admin = Admin::new(registry)
//!     .router()
//!     // Your own guard; here, a header check.
//!     .route_layer(axum::middleware::from_fn(guard));
//! let app: Router = Router::new().merge(admin);
//! # let _ = app;
//! # Ok(())
//! # }
//!
//! async fn guard(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
//!     use axum::response::IntoResponse;
//!     if req.headers().get("x-admin-token").is_some_and(|v| v == "secret") {
//!         next.run(req).await
//!     } else {
//!         http::StatusCode::UNAUTHORIZED.into_response()
//!     }
//! }
//! ```

use crate::queue::JobId;
use crate::registry::Registry;
use axum::Router;
use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{StatusCode, header};
use serde::Serialize;
use std::fmt;

/// Refuses a state-changing request that a browser sent from another site
/// (see the [module docs](self)).
async fn refuse_cross_site(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !matches!(*req.method(), http::Method::GET | http::Method::HEAD) && cross_site(req.headers())
    {
        tracing::warn!(target: "tower_firebreak", layer = "admin", path = %req.uri().path(), "cross-site request to the admin router refused");
        return json(
            StatusCode::FORBIDDEN,
            &serde_json::json!({ "error": "cross-site request refused" }),
        );
    }
    next.run(req).await
}

/// The header that marks a browser's `POST` to the admin router as sent
/// by a page allowed to (see the [module docs](self)).
pub const ADMIN_HEADER: &str = "x-firebreak-admin";

fn cross_site(headers: &http::HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site");
    let from_browser = site.is_some() || headers.contains_key(header::ORIGIN);
    let same_origin = site.is_some_and(|s| matches!(s.as_bytes(), b"same-origin" | b"none"));
    from_browser && !same_origin && !headers.contains_key(ADMIN_HEADER)
}

/// The status page: one HTML file, its script inline, no build step.
const PAGE: &str = include_str!("page.html");

/// Dead letters listed per queue.
const DEAD_LETTER_LIST_LIMIT: usize = 100;

/// Builds the admin router over a [`Registry`]. See the [module docs](self).
#[derive(Clone)]
pub struct Admin {
    registry: Registry,
    #[cfg(feature = "prometheus")]
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Default for Admin {
    /// [`Admin::global`].
    fn default() -> Self {
        Admin::global()
    }
}

impl Admin {
    /// Routes over [`Registry::global()`], where every named component
    /// registers itself by default.
    ///
    /// ```
    /// use tower_firebreak::admin::Admin;
    /// use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
    ///
    /// // Registered in the global registry as it is built; no `add_breaker`.
    /// let payments = CircuitBreakerLayer::builder().name("payments").build().unwrap();
    /// let app: axum::Router = Admin::global().router();
    /// # let _ = (app, payments);
    /// ```
    pub fn global() -> Self {
        Admin::new(Registry::global().clone())
    }

    /// Routes over `registry`.
    pub fn new(registry: Registry) -> Self {
        Admin {
            registry,
            #[cfg(feature = "prometheus")]
            prometheus: None,
        }
    }

    /// Serves `GET /metrics` from this Prometheus recorder's handle
    /// (`PrometheusBuilder::new().install_recorder()` returns one).
    #[cfg(feature = "prometheus")]
    pub fn prometheus(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// The routes, ready to [`merge`](Router::merge) into the application's
    /// router, behind the application's own guard.
    pub fn router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let reg = self.registry;
        let r1 = reg.clone();
        let r2 = reg.clone();
        let r3 = reg.clone();
        let r4 = reg.clone();
        let r5 = reg.clone();
        let router = Router::new()
            .route("/firebreak/", get(|| async { html(PAGE) }))
            // Relative, so that a router nested under a prefix still works.
            .route(
                "/firebreak",
                get(|| async { axum::response::Redirect::permanent("firebreak/") }),
            )
            .route(
                "/firebreak/status",
                get(move || {
                    let r = r1.clone();
                    async move { json(StatusCode::OK, &r.snapshot().await) }
                }),
            )
            .route(
                "/firebreak/breakers/{name}/force-open",
                post(move |Path(name): Path<String>| {
                    let r = r2.clone();
                    async move {
                        if r.breaker(&name).is_none() && r.has_keyed_breaker(&name) {
                            return json(
                                StatusCode::CONFLICT,
                                &serde_json::json!({ "error": format!(
                                    "{name:?} is a keyed breaker: force a key open through its KeyedCircuitBreakerHandle; keys that arrive later would start closed"
                                ) }),
                            );
                        }
                        breaker_action(&r, &name, |h| h.force_open())
                    }
                }),
            )
            .route(
                "/firebreak/breakers/{name}/reset",
                post(move |Path(name): Path<String>| {
                    let r = r3.clone();
                    async move {
                        if r.breaker(&name).is_none()
                            && let Some(n) = r.reset_keyed_breaker(&name)
                        {
                            tracing::info!(target: "tower_firebreak", layer = "admin", breaker = name, keys = n, "keyed breaker reset by the admin router");
                            return StatusCode::NO_CONTENT.into_response();
                        }
                        breaker_action(&r, &name, |h| h.reset())
                    }
                }),
            )
            .route(
                "/firebreak/jobs/dead",
                get(move || {
                    let r = r4.clone();
                    async move { dead_letters(&r).await }
                }),
            )
            .route(
                "/firebreak/jobs/dead/{id}/redrive",
                post(move |Path(id): Path<String>| {
                    let r = r5.clone();
                    async move { redrive(&r, &id).await }
                }),
            );
        let router = router.route_layer(axum::middleware::from_fn(refuse_cross_site));
        #[cfg(feature = "prometheus")]
        let mut router = router;
        #[cfg(feature = "prometheus")]
        if let Some(handle) = self.prometheus {
            router = router.route(
                "/metrics",
                get(move || {
                    let reg = reg.clone();
                    let handle = handle.clone();
                    async move {
                        // Refreshes the sampled gauges (queue depth, in-flight).
                        let _ = reg.snapshot().await;
                        (
                            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            handle.render(),
                        )
                            .into_response()
                    }
                }),
            );
        }
        router
    }
}

fn html(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn not_found(what: &str) -> Response {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({ "error": format!("no {what}") }),
    )
}

fn breaker_action(
    reg: &Registry,
    name: &str,
    act: impl FnOnce(&crate::circuit_breaker::CircuitBreakerHandle),
) -> Response {
    match reg.breaker(name) {
        Some(h) => {
            act(&h);
            tracing::info!(target: "tower_firebreak", layer = "admin", breaker = name, state = h.state().as_str(), "breaker changed by the admin router");
            StatusCode::NO_CONTENT.into_response()
        }
        None => not_found(&format!("breaker named {name:?}")),
    }
}

#[derive(Serialize)]
struct DeadLetterView {
    queue: String,
    id: String,
    reason: String,
    at_unix_ms: u64,
    method: String,
    uri: String,
    attempts: u32,
}

async fn dead_letters(reg: &Registry) -> Response {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (name, q) in reg.queues() {
        match q.dead_letters(DEAD_LETTER_LIST_LIMIT).await {
            Ok(list) => out.extend(list.into_iter().map(|d| {
                DeadLetterView {
                    queue: name.clone(),
                    id: d.id.to_string(),
                    reason: d.reason,
                    at_unix_ms: d
                        .at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, crate::duration_ms),
                    method: d.job.method().to_string(),
                    uri: d.job.uri().to_string(),
                    attempts: d.job.attempts(),
                }
            })),
            Err(e) => errors.push(serde_json::json!({ "queue": name, "error": e.to_string() })),
        }
    }
    json(
        StatusCode::OK,
        &serde_json::json!({ "dead_letters": out, "errors": errors }),
    )
}

async fn redrive(reg: &Registry, id: &str) -> Response {
    let Ok(id) = id.parse::<JobId>() else {
        return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": "not a job id" }),
        );
    };
    match reg.redrive(&id).await {
        Ok(Some(name)) => {
            tracing::info!(target: "tower_firebreak", layer = "admin", queue = %name, job_id = %id, "dead letter redriven by the admin router");
            json(
                StatusCode::OK,
                &serde_json::json!({ "queue": name, "id": id.to_string() }),
            )
        }
        Ok(None) => not_found("dead-lettered job with that id"),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "error": e.to_string() }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_fetches_the_status_relative_to_itself() {
        // Served at /firebreak/, so "status" is /firebreak/status.
        assert!(PAGE.contains("fetch('status'"));
        assert!(PAGE.contains("'breakers/' + encodeURIComponent(name) + '/reset'"));
    }
}
