//! The status route, for axum.

use super::response::{problem, status_json};
use crate::queue::{JobId, Queue};
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use std::sync::Arc;

/// An axum [`Router`] serving `GET /jobs/{id}`: the job's status as JSON
/// ([`status_json`]), with the stored response once delivered.
///
/// | request | answer |
/// | --- | --- |
/// | a known id | `200` and the status JSON |
/// | an id the queue does not know (never stored, or purged after its retention) | `404`, problem details |
/// | not a job id | `400`, problem details |
/// | the queue cannot answer | `503`, problem details |
///
/// The route checks no credentials: whoever holds a job id (a random
/// UUIDv7) reads the job's stored response, headers included. Put your own
/// authentication in front of it (`.route_layer(...)`) when responses are
/// private to a caller.
///
/// Merge it into your app, and give the [`DeferLayer`](super::DeferLayer)
/// the same path with `.status_path("/jobs")` so its answers link here:
///
/// ```
/// use axum::Router;
/// use tower_firebreak::{defer::status_router, queue::memory::MemoryQueue};
///
/// let queue = MemoryQueue::new();
/// let app: Router = Router::new().merge(status_router(queue.clone()));
/// # let _ = app;
/// ```
pub fn status_router<Q: Queue>(queue: Q) -> Router {
    Router::new()
        .route("/jobs/{id}", get(job_status::<Q>))
        .with_state(Arc::new(queue))
}

async fn job_status<Q: Queue>(State(queue): State<Arc<Q>>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<JobId>() else {
        return problem(
            StatusCode::BAD_REQUEST,
            "invalid_job_id",
            "not a job id",
            None,
        )
        .into_response();
    };
    match queue.status(&id).await {
        Ok(Some(status)) => {
            let mut res = Response::new(axum::body::Body::new(Full::new(Bytes::from(
                status_json(&id, &status).to_string(),
            ))));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "unknown_job",
            &format!("no job {id}"),
            None,
        )
        .into_response(),
        Err(e) => {
            tracing::warn!(target: "tower_firebreak", layer = "defer", error = %e, "status lookup failed");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_unavailable",
                "the job queue cannot be read now",
                None,
            )
            .into_response()
        }
    }
}
