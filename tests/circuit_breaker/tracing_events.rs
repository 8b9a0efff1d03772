//! The `tracing` events of the circuit breaker.
//!
//! A test binary of its own: tracing caches each callsite's interest
//! globally, and a callsite first hit by a parallel test with no subscriber
//! can race the scoped subscriber installed here.

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;
use support::{Cmd, Counter, call};
use tower::Layer;
use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn transitions_are_tracing_events() {
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _g = tracing::subscriber::set_default(subscriber);

    let layer = CircuitBreakerLayer::builder()
        .count_window(10)
        .minimum_calls(4)
        .open_for(secs(10))
        .build()
        .unwrap();
    let h = layer.handle();
    let mut svc = layer.layer(Counter::default().service());
    for _ in 0..4 {
        let _ = call(&mut svc, Cmd::Fail).await;
    }
    assert_eq!(h.state(), State::Open);
    let _ = call(&mut svc, Cmd::Ok).await;
    tokio::time::advance(secs(10)).await;
    assert_eq!(h.state(), State::HalfOpen);

    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("WARN")
            && l.contains("layer=\"circuit_breaker\"")
            && l.contains("from=\"closed\"")
            && l.contains("to=\"open\"")),
        "{out}"
    );
    assert!(
        lines.iter().any(|l| l.contains("INFO")
            && l.contains("from=\"open\"")
            && l.contains("to=\"half_open\"")),
        "{out}"
    );
    assert!(
        lines.iter().any(|l| l.contains("DEBUG")
            && l.contains("kind=\"circuit_open\"")
            && l.contains("retry_after_ms=10000")),
        "{out}"
    );
}
