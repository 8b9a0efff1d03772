//! The admin router and its live status page, over a breaker that a flaky
//! route keeps tripping.
//!
//! ```sh
//! cargo run --example admin --features axum,prometheus
//! # then open http://127.0.0.1:3000/firebreak/ and, in another terminal:
//! for i in $(seq 20); do curl -s -o /dev/null -w '%{http_code} ' localhost:3000/pay?fail=1; done
//! curl -s localhost:3000/metrics | grep firebreak_
//! ```
//!
//! The admin routes sit behind a demo guard: reads pass, and so do the
//! page's own buttons (a same-origin browser request); any other write needs
//! `x-admin-token: secret`. Bring your real authentication in a service.

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Router, routing::get};
use http::{Method, StatusCode};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::admin::Admin;
use tower_firebreak::circuit_breaker::CircuitBreakerLayer;

/// A demo guard, not authentication.
async fn guard(req: Request, next: Next) -> Response {
    let h = req.headers();
    let token_ok = h.get("x-admin-token").is_some_and(|v| v == "secret");
    let same_origin = h.get("sec-fetch-site").is_some_and(|v| v == "same-origin");
    if req.method() == Method::GET || token_ok || same_origin {
        next.run(req).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let breaker = CircuitBreakerLayer::builder()
        .name("payments")
        .count_window(10)
        .minimum_calls(5)
        .open_for(Duration::from_secs(15))
        .build()?; // named, so it registers itself in Registry::global()
    // Boxed: one concrete type to clone into the handler.
    let payments = BoxCloneSyncService::new(breaker.layer(service_fn(|fail: bool| async move {
        if fail {
            Err::<&'static str, BoxError>(BoxError::from("payment provider down"))
        } else {
            Ok("paid")
        }
    })));

    let app = Router::new()
        .route(
            "/pay",
            get(move |uri: http::Uri| {
                let svc = payments.clone();
                let fail = uri.query().is_some_and(|q| q.contains("fail"));
                async move {
                    match svc.oneshot(fail).await {
                        Ok(body) => (StatusCode::OK, body.to_owned()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                    }
                }
            }),
        )
        .merge(
            Admin::global() // serves Registry::global()
                .prometheus(prometheus)
                .router()
                .route_layer(middleware::from_fn(guard)),
        );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("status page: http://127.0.0.1:3000/firebreak/");
    axum::serve(listener, app).await?;
    Ok(())
}
