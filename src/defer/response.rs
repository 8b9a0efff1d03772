//! The answers the defer layer gives instead of the inner service's.

use super::{DeferBody, Settings};
use crate::http::{PROBLEM_JSON, retry_after_value};
use crate::queue::{JobId, JobStatus};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use serde_json::{Map, Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The response header that carries a deferred request's [`JobId`].
pub const JOB_ID_HEADER: HeaderName = HeaderName::from_static("firebreak-job-id");

/// The JSON view of a job's status, as the status route and a repeated
/// deferred request show it.
///
/// ```json
/// { "job_id": "01938f6e-5a2b-7c3d-8e4f-0123456789ab", "status": "delivered",
///   "attempts": 2, "delivered_at_ms": 1732600000000,
///   "response": { "status": 201, "headers": { "content-type": "text/plain" },
///                 "body": "created", "body_encoding": "utf-8" } }
/// ```
///
/// `status` is one of `queued`, `in_flight`, `delivered`, `dead_lettered`.
/// `attempts` is present once the queue reports it (delivered or dead
/// letter). A stored body that is not UTF-8 is written in standard base64
/// with `"body_encoding": "base64"`. A dead letter carries `reason`.
pub fn status_json(id: &JobId, status: &JobStatus) -> Value {
    let mut v = json!({ "job_id": id.to_string() });
    match status {
        JobStatus::Queued => v["status"] = json!("queued"),
        JobStatus::InFlight => v["status"] = json!("in_flight"),
        JobStatus::Delivered {
            status,
            headers,
            body,
            attempts,
            delivered_at,
            ..
        } => {
            v["status"] = json!("delivered");
            v["attempts"] = json!(attempts);
            v["delivered_at_ms"] = json!(unix_ms(*delivered_at));
            let (body, encoding) = match std::str::from_utf8(body) {
                Ok(s) => (s.to_owned(), "utf-8"),
                Err(_) => (
                    base64::engine::general_purpose::STANDARD.encode(body),
                    "base64",
                ),
            };
            v["response"] = json!({
                "status": status,
                "headers": headers_json(headers),
                "body": body,
                "body_encoding": encoding,
            });
        }
        JobStatus::DeadLettered {
            reason,
            attempts,
            at,
            ..
        } => {
            v["status"] = json!("dead_lettered");
            v["attempts"] = json!(attempts);
            v["reason"] = json!(reason);
            v["dead_lettered_at_ms"] = json!(unix_ms(*at));
        }
    }
    v
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Header name to value; a repeated header becomes an array of its values.
/// A value that is not visible ASCII is written lossily.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = match <[Value; 1]>::try_from(values) {
            Ok([one]) => one,
            Err(many) => Value::Array(many),
        };
        out.insert(name.as_str().to_owned(), value);
    }
    Value::Object(out)
}

pub(super) fn status_link(settings: &Settings, id: &JobId) -> Option<String> {
    settings
        .status_path
        .as_deref()
        .map(|path| format!("{}/{id}", path.trim_end_matches('/')))
}

fn json_response(status: StatusCode, body: &Value) -> http::Response<DeferBody> {
    let mut res = http::Response::new(DeferBody::new(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn with_job_headers(res: &mut http::Response<DeferBody>, id: &JobId, link: Option<&str>) {
    let headers = res.headers_mut();
    headers.insert(
        JOB_ID_HEADER,
        HeaderValue::from_str(&id.to_string()).expect("a job id is a valid header value"),
    );
    if let Some(link) = link
        && let Ok(v) = HeaderValue::from_str(link)
    {
        headers.insert(header::LOCATION, v);
    }
}

fn links(body: &mut Value, link: Option<&str>) {
    if let Some(link) = link {
        body["links"] = json!({ "status": link });
    }
}

/// `202 Accepted` for a job just stored.
pub(super) fn accepted(
    settings: &Settings,
    id: &JobId,
    retry_after: Duration,
) -> http::Response<DeferBody> {
    let link = status_link(settings, id);
    let mut body = status_json(id, &JobStatus::Queued);
    links(&mut body, link.as_deref());
    let mut res = json_response(StatusCode::ACCEPTED, &body);
    with_job_headers(&mut res, id, link.as_deref());
    res.headers_mut()
        .insert(header::RETRY_AFTER, retry_after_value(retry_after));
    res
}

/// `200 OK` with the status of the job that already holds the request's
/// idempotency key (`None`: it was purged between the two reads).
pub(super) fn existing(
    settings: &Settings,
    id: &JobId,
    status: Option<&JobStatus>,
) -> http::Response<DeferBody> {
    let link = status_link(settings, id);
    let mut body = match status {
        Some(status) => status_json(id, status),
        None => json!({ "job_id": id.to_string(), "status": "unknown" }),
    };
    links(&mut body, link.as_deref());
    let mut res = json_response(StatusCode::OK, &body);
    with_job_headers(&mut res, id, link.as_deref());
    res
}

/// A problem-details (RFC 9457) response.
pub(super) fn problem(
    status: StatusCode,
    kind: &str,
    detail: &str,
    retry_after: Option<Duration>,
) -> http::Response<DeferBody> {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or(""),
        "status": status.as_u16(),
        "kind": kind,
        "detail": detail,
    });
    let mut res = json_response(status, &body);
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(after) = retry_after {
        res.headers_mut()
            .insert(header::RETRY_AFTER, retry_after_value(after));
    }
    res
}

/// Whether the request is a gRPC call, to be answered in gRPC's terms.
pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// gRPC status codes used for deferred answers (fixed by the gRPC spec).
const GRPC_OK: i32 = 0;
const GRPC_ALREADY_EXISTS: i32 = 6;
const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_ABORTED: i32 = 10;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_INTERNAL: i32 = 13;
const GRPC_UNAVAILABLE: i32 = 14;

/// The same answer for a gRPC caller.
///
/// Accepted (202) and existing (200) jobs become `grpc-status: 0` with one
/// empty message (the default value of any proto3 message type) and the
/// job id in the `firebreak-job-id` response metadata, except an existing
/// job that was dead-lettered: `ABORTED`, with the reason, since the call
/// will never be made (an OK would read as success to a caller that cannot
/// see the JSON). Refusals become Trailers-Only responses: 409
/// `ALREADY_EXISTS`, 413 `RESOURCE_EXHAUSTED`, 503 `UNAVAILABLE` (with
/// `grpc-retry-pushback-ms`).
pub(super) fn into_grpc(res: http::Response<DeferBody>) -> http::Response<DeferBody> {
    let (parts, body) = res.into_parts();
    let json = body
        .data()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok());
    let dead = parts.status == StatusCode::OK
        && json
            .as_ref()
            .is_some_and(|v| v["status"] == "dead_lettered");
    let mut out = http::Response::new(DeferBody::default());
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if let Some(id) = parts.headers.get(&JOB_ID_HEADER) {
        h.insert(JOB_ID_HEADER, id.clone());
    }
    let code = match parts.status {
        StatusCode::OK if dead => GRPC_ABORTED,
        StatusCode::ACCEPTED | StatusCode::OK => {
            let mut trailers = HeaderMap::new();
            trailers.insert(crate::classify::GRPC_STATUS, HeaderValue::from(GRPC_OK));
            // A message frame: not compressed, length 0.
            *out.body_mut() =
                DeferBody::new(Bytes::from_static(&[0, 0, 0, 0, 0])).with_trailers(trailers);
            return out;
        }
        StatusCode::CONFLICT => GRPC_ALREADY_EXISTS,
        StatusCode::BAD_REQUEST => GRPC_INVALID_ARGUMENT,
        StatusCode::PAYLOAD_TOO_LARGE => GRPC_RESOURCE_EXHAUSTED,
        StatusCode::REQUEST_TIMEOUT => GRPC_DEADLINE_EXCEEDED,
        StatusCode::SERVICE_UNAVAILABLE => GRPC_UNAVAILABLE,
        _ => GRPC_INTERNAL,
    };
    h.insert(crate::classify::GRPC_STATUS, HeaderValue::from(code));
    let detail = json.and_then(|v| match v["reason"].as_str() {
        Some(reason) if dead => Some(format!(
            "the job holding this idempotency key was dead-lettered: {reason}"
        )),
        _ => v["detail"].as_str().map(str::to_owned),
    });
    if let Some(detail) = detail
        && let Ok(v) = HeaderValue::from_str(&crate::grpc::percent_encode(&detail))
    {
        h.insert("grpc-message", v);
    }
    if let Some(secs) = parts
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        h.insert(
            crate::grpc::PUSHBACK_HEADER,
            HeaderValue::from(secs.saturating_mul(1000)),
        );
    }
    out
}
