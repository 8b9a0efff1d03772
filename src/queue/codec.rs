//! The stored form of a [`Job`]: a versioned envelope.
//!
//! The default, [`Format::Json`], is readable where operators look
//! (redis-cli, the RabbitMQ UI, a dump of the disk queue):
//!
//! ```json
//! {"v":1,"method":"POST","uri":"/orders","headers":[["content-type","application/json"]],
//!  "body":"eyJza3UiOjQyfQ==","idempotency_key":"order-7","enqueued_at_ms":1764133200000,
//!  "attempts":0,"ttl_ms":3600000,"trace":[["traceparent","00-…-01"]]}
//! ```
//!
//! The body is base64. A header value that is not visible ASCII is written
//! as `{"b64": "…"}` instead of a string.
//!
//! With the `prost` feature, [`Format::Protobuf`] writes the same fields as
//! a compact protobuf message (field numbers in the source of this module),
//! for high volume.
//!
//! # Versions
//!
//! `v` is the envelope's major version, now 1. Readers ignore fields they
//! do not know, so adding an optional field keeps `v` at 1; `v` changes only
//! for a change an old reader must not ignore, and a reader refuses a
//! version it does not know.
//!
//! ```
//! use tower_firebreak::queue::{codec::Format, Job};
//!
//! let job = Job::new(http::Method::POST, "/orders".parse().unwrap()).with_body("hi");
//! let bytes = Format::Json.encode(&job);
//! assert_eq!(Format::Json.decode(&bytes).unwrap(), job);
//! ```

use super::Job;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The envelope version this crate writes and reads.
pub const VERSION: u32 = 1;

/// An envelope format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// Versioned JSON (the default).
    #[default]
    Json,
    /// Compact protobuf, via `prost`.
    #[cfg(feature = "prost")]
    Protobuf,
}

impl Format {
    /// Encodes `job`.
    pub fn encode(&self, job: &Job) -> Vec<u8> {
        match self {
            Format::Json => encode_json(job),
            #[cfg(feature = "prost")]
            Format::Protobuf => proto::encode(job),
        }
    }

    /// Decodes a job.
    ///
    /// # Errors
    ///
    /// When `bytes` is not an envelope in this format, or its version is not
    /// [`VERSION`].
    pub fn decode(&self, bytes: &[u8]) -> Result<Job, CodecError> {
        match self {
            Format::Json => decode_json(bytes),
            #[cfg(feature = "prost")]
            Format::Protobuf => proto::decode(bytes),
        }
    }
}

/// A record that is not a job envelope this crate can read.
#[derive(Debug)]
pub struct CodecError {
    reason: String,
}

impl CodecError {
    pub(crate) fn new(reason: impl fmt::Display) -> CodecError {
        CodecError {
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed job envelope: {}", self.reason)
    }
}

impl std::error::Error for CodecError {}

/// A header value in JSON: text when it is visible ASCII, else base64.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum JsonHeaderValue {
    Text(String),
    Binary { b64: String },
}

pub(crate) fn headers_to_json(headers: &HeaderMap) -> Vec<(String, JsonHeaderValue)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = match value.to_str() {
                Ok(s) => JsonHeaderValue::Text(s.to_owned()),
                Err(_) => JsonHeaderValue::Binary {
                    b64: B64.encode(value.as_bytes()),
                },
            };
            (name.as_str().to_owned(), value)
        })
        .collect()
}

pub(crate) fn headers_from_json(
    headers: Vec<(String, JsonHeaderValue)>,
) -> Result<HeaderMap, CodecError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let bytes = match value {
            JsonHeaderValue::Text(s) => s.into_bytes(),
            JsonHeaderValue::Binary { b64 } => B64.decode(b64).map_err(CodecError::new)?,
        };
        append_header(&mut map, name.as_bytes(), &bytes)?;
    }
    Ok(map)
}

fn append_header(map: &mut HeaderMap, name: &[u8], value: &[u8]) -> Result<(), CodecError> {
    let name = HeaderName::from_bytes(name).map_err(CodecError::new)?;
    let value = HeaderValue::from_bytes(value).map_err(CodecError::new)?;
    map.append(name, value);
    Ok(())
}

/// Lower-case hex of `bytes` (fingerprints, key digests).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn b64_encode(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub(crate) fn b64_decode(s: &str) -> Result<Bytes, CodecError> {
    B64.decode(s).map(Bytes::from).map_err(CodecError::new)
}

#[derive(Debug, Serialize, Deserialize)]
struct JsonEnvelope {
    v: u32,
    method: String,
    uri: String,
    #[serde(default)]
    headers: Vec<(String, JsonHeaderValue)>,
    #[serde(default)]
    body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<String>,
    enqueued_at_ms: u64,
    #[serde(default)]
    attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    trace: Vec<(String, String)>,
}

fn encode_json(job: &Job) -> Vec<u8> {
    let env = JsonEnvelope {
        v: VERSION,
        method: job.method.as_str().to_owned(),
        uri: job.uri.to_string(),
        headers: headers_to_json(&job.headers),
        body: b64_encode(&job.body),
        idempotency_key: job.idempotency_key.clone(),
        enqueued_at_ms: job.enqueued_at_ms,
        attempts: job.attempts,
        ttl_ms: job.ttl_ms,
        trace: job.trace_context.clone(),
    };
    serde_json::to_vec(&env).expect("a job envelope always serializes")
}

fn check_version(v: u32) -> Result<(), CodecError> {
    if v == VERSION {
        Ok(())
    } else {
        Err(CodecError::new(format_args!(
            "envelope version {v} (this reader knows {VERSION})"
        )))
    }
}

fn method_uri(method: &str, uri: &str) -> Result<(Method, Uri), CodecError> {
    let method = Method::from_bytes(method.as_bytes()).map_err(CodecError::new)?;
    let uri = uri.parse::<Uri>().map_err(CodecError::new)?;
    Ok((method, uri))
}

fn decode_json(bytes: &[u8]) -> Result<Job, CodecError> {
    let env: JsonEnvelope = serde_json::from_slice(bytes).map_err(CodecError::new)?;
    check_version(env.v)?;
    let (method, uri) = method_uri(&env.method, &env.uri)?;
    Ok(Job {
        method,
        uri,
        headers: headers_from_json(env.headers)?,
        body: b64_decode(&env.body)?,
        idempotency_key: env.idempotency_key,
        enqueued_at_ms: env.enqueued_at_ms,
        attempts: env.attempts,
        ttl_ms: env.ttl_ms,
        trace_context: env.trace,
    })
}

#[cfg(feature = "prost")]
mod proto {
    //! The protobuf envelope. As a `.proto` file:
    //!
    //! ```text
    //! message Job {
    //!   uint32 v = 1;
    //!   string method = 2;
    //!   string uri = 3;
    //!   repeated Header headers = 4;
    //!   bytes body = 5;
    //!   optional string idempotency_key = 6;
    //!   uint64 enqueued_at_ms = 7;
    //!   uint32 attempts = 8;
    //!   optional uint64 ttl_ms = 9;
    //!   repeated Field trace = 10;
    //! }
    //! message Header { string name = 1; bytes value = 2; }
    //! message Field { string key = 1; string value = 2; }
    //! ```

    use super::{CodecError, Job, VERSION, append_header, check_version, method_uri};
    use bytes::Bytes;
    use http::HeaderMap;
    use prost::Message as _;

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct JobProto {
        #[prost(uint32, tag = "1")]
        pub(super) v: u32,
        #[prost(string, tag = "2")]
        pub(super) method: String,
        #[prost(string, tag = "3")]
        pub(super) uri: String,
        #[prost(message, repeated, tag = "4")]
        pub(super) headers: Vec<HeaderProto>,
        #[prost(bytes = "bytes", tag = "5")]
        pub(super) body: Bytes,
        #[prost(string, optional, tag = "6")]
        pub(super) idempotency_key: Option<String>,
        #[prost(uint64, tag = "7")]
        pub(super) enqueued_at_ms: u64,
        #[prost(uint32, tag = "8")]
        pub(super) attempts: u32,
        #[prost(uint64, optional, tag = "9")]
        pub(super) ttl_ms: Option<u64>,
        #[prost(message, repeated, tag = "10")]
        pub(super) trace: Vec<FieldProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct HeaderProto {
        #[prost(string, tag = "1")]
        pub(super) name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub(super) value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct FieldProto {
        #[prost(string, tag = "1")]
        pub(super) key: String,
        #[prost(string, tag = "2")]
        pub(super) value: String,
    }

    pub(super) fn encode(job: &Job) -> Vec<u8> {
        JobProto {
            v: VERSION,
            method: job.method.as_str().to_owned(),
            uri: job.uri.to_string(),
            headers: job
                .headers
                .iter()
                .map(|(n, v)| HeaderProto {
                    name: n.as_str().to_owned(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
            body: job.body.clone(),
            idempotency_key: job.idempotency_key.clone(),
            enqueued_at_ms: job.enqueued_at_ms,
            attempts: job.attempts,
            ttl_ms: job.ttl_ms,
            trace: job
                .trace_context
                .iter()
                .map(|(k, v)| FieldProto {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Job, CodecError> {
        let p = JobProto::decode(bytes).map_err(CodecError::new)?;
        check_version(p.v)?;
        let (method, uri) = method_uri(&p.method, &p.uri)?;
        let mut headers = HeaderMap::with_capacity(p.headers.len());
        for h in &p.headers {
            append_header(&mut headers, h.name.as_bytes(), &h.value)?;
        }
        Ok(Job {
            method,
            uri,
            headers,
            body: p.body,
            idempotency_key: p.idempotency_key,
            enqueued_at_ms: p.enqueued_at_ms,
            attempts: p.attempts,
            ttl_ms: p.ttl_ms,
            trace_context: p.trace.into_iter().map(|f| (f.key, f.value)).collect(),
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A later writer's message: every v1 field plus two new ones.
        #[derive(Clone, PartialEq, prost::Message)]
        struct JobProtoNext {
            #[prost(uint32, tag = "1")]
            v: u32,
            #[prost(string, tag = "2")]
            method: String,
            #[prost(string, tag = "3")]
            uri: String,
            #[prost(bytes = "bytes", tag = "5")]
            body: Bytes,
            #[prost(uint64, tag = "7")]
            enqueued_at_ms: u64,
            #[prost(string, tag = "20")]
            tenant: String,
            #[prost(message, repeated, tag = "21")]
            extra: Vec<FieldProto>,
        }

        #[test]
        fn v1_reader_ignores_unknown_fields() {
            let bytes = JobProtoNext {
                v: 1,
                method: "PUT".into(),
                uri: "/a?b=c".into(),
                body: Bytes::from_static(b"payload"),
                enqueued_at_ms: 42,
                tenant: "acme".into(),
                extra: vec![FieldProto {
                    key: "k".into(),
                    value: "v".into(),
                }],
            }
            .encode_to_vec();
            let job = decode(&bytes).expect("v1 reader accepts extra fields");
            assert_eq!(job.method(), http::Method::PUT);
            assert_eq!(job.uri(), "/a?b=c");
            assert_eq!(job.body().as_ref(), b"payload");
            assert_eq!(job.enqueued_at_ms, 42);
        }

        #[test]
        fn refuses_unknown_version() {
            let mut p = JobProto::decode(
                &encode(&Job::new(http::Method::GET, "/".parse().unwrap())) as &[u8],
            )
            .unwrap();
            p.v = 2;
            let err = decode(&p.encode_to_vec()).unwrap_err();
            assert!(err.to_string().contains("version 2"), "{err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        // Any byte a HeaderValue allows: visible ASCII, space, tab, obs-text.
        proptest::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..24)
    }

    fn job() -> impl Strategy<Value = Job> {
        (
            prop_oneof![
                Just(Method::GET),
                Just(Method::POST),
                Just(Method::DELETE),
                "[A-Z]{1,8}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
            ],
            "(/[a-z0-9_.~-]{0,8}){1,4}(\\?[a-z0-9=&]{0,12})?",
            proptest::collection::vec(("[a-z][a-z0-9-]{0,12}", header_value()), 0..6),
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::option::of(".{0,24}"),
            (
                any::<u64>(),
                any::<u32>(),
                proptest::option::of(any::<u64>()),
            ),
            proptest::collection::vec((".{0,12}", ".{0,24}"), 0..3),
        )
            .prop_map(
                |(method, uri, headers, body, key, (at, attempts, ttl), trace)| {
                    let mut map = HeaderMap::new();
                    for (n, v) in headers {
                        append_header(&mut map, n.as_bytes(), &v).unwrap();
                    }
                    Job {
                        method,
                        uri: uri.parse().unwrap(),
                        headers: map,
                        body: body.into(),
                        idempotency_key: key,
                        enqueued_at_ms: at,
                        attempts,
                        ttl_ms: ttl,
                        trace_context: trace,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn json_round_trips(job in job()) {
            let bytes = Format::Json.encode(&job);
            prop_assert_eq!(Format::Json.decode(&bytes).unwrap(), job);
        }

        #[cfg(feature = "prost")]
        #[test]
        fn protobuf_round_trips(job in job()) {
            let bytes = Format::Protobuf.encode(&job);
            prop_assert_eq!(Format::Protobuf.decode(&bytes).unwrap(), job);
        }
    }

    #[test]
    fn v1_reader_ignores_unknown_fields() {
        let record = br#"{"v":1,"method":"POST","uri":"/orders","body":"aGk=",
            "enqueued_at_ms":7,"priority":"high","routing":{"region":"eu","shards":[1,2]},
            "headers":[["x-a","1"],["x-b",{"b64":"/w=="}]]}"#;
        let job = Format::Json
            .decode(record)
            .expect("extra fields are ignored");
        assert_eq!(job.method(), Method::POST);
        assert_eq!(job.body().as_ref(), b"hi");
        assert_eq!(job.headers()["x-a"], "1");
        assert_eq!(job.headers()["x-b"].as_bytes(), &[0xff]);
        assert_eq!(job.enqueued_at_ms, 7);
        assert_eq!(job.attempts(), 0);
    }

    #[test]
    fn refuses_unknown_version_and_garbage() {
        let err = Format::Json
            .decode(br#"{"v":2,"method":"GET","uri":"/","enqueued_at_ms":0}"#)
            .unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
        assert!(Format::Json.decode(b"\x00\x01garbage").is_err());
        assert!(
            Format::Json
                .decode(br#"{"v":1,"method":"GET","uri":"/","body":"!!","enqueued_at_ms":0}"#)
                .is_err()
        );
    }

    #[test]
    fn json_v1_layout_is_stable() {
        // Records outlive the process that wrote them: this is the layout
        // every v1 reader (and redis-cli user) expects.
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        let mut job = Job::new(Method::POST, "/orders".parse().unwrap())
            .with_headers(headers)
            .with_body("hi")
            .with_idempotency_key("k")
            .with_ttl(std::time::Duration::from_secs(5))
            .with_trace_context(vec![("traceparent".into(), "t".into())]);
        job.enqueued_at_ms = 1000;
        job.attempts = 2;
        assert_eq!(
            String::from_utf8(Format::Json.encode(&job)).unwrap(),
            r#"{"v":1,"method":"POST","uri":"/orders","headers":[["content-type","text/plain"]],"body":"aGk=","idempotency_key":"k","enqueued_at_ms":1000,"attempts":2,"ttl_ms":5000,"trace":[["traceparent","t"]]}"#
        );
    }

    #[test]
    fn non_ascii_header_values_are_base64() {
        let mut headers = HeaderMap::new();
        headers.insert("x-bin", HeaderValue::from_bytes(&[0xe9, b'a']).unwrap());
        let job = Job::new(Method::POST, "/".parse().unwrap()).with_headers(headers);
        let text = String::from_utf8(Format::Json.encode(&job)).unwrap();
        assert!(text.contains(r#"["x-bin",{"b64":"6WE="}]"#), "{text}");
    }
}
