//! The per-call span and the trace context of deferred jobs.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
use tower_firebreak::defer::{DeferLayer, Replayer};
use tower_firebreak::queue::Queue;
use tower_firebreak::queue::memory::MemoryQueue;
use tower_firebreak::span::CallSpanLayer;
use tracing_subscriber::fmt::format::FmtSpan;

/// Everything the fmt subscriber writes, span closes included.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let log = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || log.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_span_events(FmtSpan::CLOSE)
            .finish();
        tracing::subscriber::set_default(sub)
    }
}

/// The lines about spans named `name` that were closed.
fn closed(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains(&format!("{name}{{")) && l.contains(": close time.busy"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn each_call_has_a_span_that_records_the_decision() {
    let log = Log::default();
    let _g = log.install();
    let breaker = CircuitBreakerLayer::builder()
        .count_window(2)
        .minimum_calls(2)
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(CallSpanLayer::new("payments"))
        .layer(breaker)
        .service(service_fn(|fail: bool| async move {
            if fail {
                Err::<(), BoxError>("down".into())
            } else {
                Ok(())
            }
        }));
    svc.clone().oneshot(false).await.unwrap();
    // One failure in two: the breaker opens.
    let _ = svc.clone().oneshot(true).await;
    let _ = svc.clone().oneshot(false).await; // rejected
    let _ = svc.clone().oneshot(false).await; // rejected

    let text = log.text();
    let spans = closed(&text, "firebreak.call");
    assert_eq!(spans.len(), 4, "one span per call:\n{text}");
    assert!(
        spans[0].contains("name=\"payments\"") && spans[0].contains("outcome=\"success\""),
        "{}",
        spans[0]
    );
    assert!(spans[1].contains("outcome=\"error\""), "{}", spans[1]);
    assert!(
        spans[2].contains("rejected_by=\"circuit_open\""),
        "{}",
        spans[2]
    );
    assert!(
        spans[3].contains("outcome=\"rejected\"")
            && spans[3].contains("rejected_by=\"circuit_open\"")
            && spans[3].contains("retry_after_ms="),
        "{}",
        spans[3]
    );
    // The breaker's own events are inside the call's span.
    assert!(
        text.lines()
            .any(|l| l.contains("firebreak.call{") && l.contains("circuit breaker state change")),
        "{text}"
    );
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(start_paused = true)]
async fn a_replayed_job_carries_the_deferred_requests_trace() {
    let log = Log::default();
    let _g = log.install();
    let queue = MemoryQueue::new();
    let app =
        DeferLayer::new(queue.clone()).layer(service_fn(|_: http::Request<Full<Bytes>>| async {
            let mut res = http::Response::new(Full::new(Bytes::new()));
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, BoxError>(res)
        }));
    let req = http::Request::post("http://orders.internal/orders")
        .header("idempotency-key", "k1")
        .header("traceparent", TRACEPARENT)
        .body(Full::new(Bytes::from("x")))
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    let seen = Arc::new(Mutex::new(None::<String>));
    let seen2 = seen.clone();
    let upstream = service_fn(move |req: http::Request<Full<Bytes>>| {
        let tp = req
            .headers()
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_owned());
        *seen2.lock().unwrap() = tp;
        async { Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new()))) }
    });
    let replayer = Replayer::new(queue.clone(), upstream)
        .poll_interval(Duration::from_millis(10))
        .spawn();
    for _ in 0..1000 {
        if seen.lock().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    replayer.shutdown().await;
    assert_eq!(
        seen.lock().unwrap().as_deref(),
        Some(TRACEPARENT),
        "re-sent on replay"
    );
    assert_eq!(queue.depth().await.unwrap(), 0);

    let text = log.text();
    assert!(
        text.lines()
            .any(|l| l.contains("request deferred") && l.contains(TRACEPARENT)),
        "the deferral is logged with its traceparent:\n{text}"
    );
    let spans = closed(&text, "firebreak.replay");
    assert_eq!(spans.len(), 1, "{text}");
    assert!(
        spans[0].contains(&format!("traceparent=\"{TRACEPARENT}\"")),
        "{}",
        spans[0]
    );
}

/// A named preset runs each call in a `firebreak.call` span of its name; an
/// unnamed one makes no span.
#[tokio::test(start_paused = true)]
async fn a_named_preset_spans_each_call_and_an_unnamed_one_does_not() {
    use tower_firebreak::preset::Resilience;
    use tower_firebreak::registry::Registry;
    use tower_firebreak::retry::ReplayBody;

    let log = Log::default();
    let _g = log.install();
    let registry = Registry::new(); // keeps the global registry out of it
    let ok = || {
        service_fn(|_: http::Request<ReplayBody<Full<Bytes>>>| async {
            Ok::<_, BoxError>(http::Response::new(Full::new(Bytes::new())))
        })
    };
    let named = Resilience::builder()
        .name("span-preset")
        .registry(&registry)
        .build()
        .unwrap()
        .layer(ok());
    let unnamed = Resilience::builder().build().unwrap().layer(ok());
    let res = named
        .oneshot(http::Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    unnamed
        .oneshot(http::Request::new(Full::new(Bytes::new())))
        .await
        .unwrap();

    let text = log.text();
    let spans = closed(&text, "firebreak.call");
    assert_eq!(spans.len(), 1, "only the named preset's call:\n{text}");
    assert!(
        spans[0].contains("name=\"span-preset\"") && spans[0].contains("outcome=\"success\""),
        "{}",
        spans[0]
    );
}
