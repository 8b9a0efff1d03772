//! Real threads hammering one half-open breaker.

use crate::support::{Cmd, Counter};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Duration;
use tower::{Layer, Service};
use tower_firebreak::circuit_breaker::{CircuitBreakerLayer, State};

const PROBES: usize = 3;

/// Two OS threads race for probe slots, each holding what it wins for a
/// moment and then dropping it (which gives the slot back). At no instant may
/// more than `PROBES` inner calls be alive, and every round all `PROBES`
/// slots must be won (so the bound is actually reached).
#[test]
fn two_threads_never_get_more_than_n_probes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let layer = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_for(Duration::from_millis(1))
        .half_open_calls(PROBES)
        .build()
        .unwrap();
    let h = layer.handle();
    let c = Counter::default();
    let svc = layer.layer(c.service());

    for round in 0..100 {
        h.reset();
        let mut s = svc.clone();
        let fut = s.call(Cmd::Fail);
        rt.block_on(fut).unwrap_err();
        assert_eq!(h.state(), State::Open);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(h.state(), State::HalfOpen);

        c.max_live.store(0, Ordering::SeqCst);
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let mut s = svc.clone();
                let barrier = barrier.clone();
                let rt = rt.handle().clone();
                std::thread::spawn(move || {
                    let _g = rt.enter();
                    barrier.wait();
                    let mut held = Vec::new();

                    for i in 0..2_000 {
                        let f = s.call(Cmd::Hang);
                        held.push(f);
                        // Drop the oldest every few calls: slots come back
                        // while the other thread is taking them.
                        if i % 7 == 0 && !held.is_empty() {
                            held.remove(0);
                        }
                    }
                    drop(held);
                })
            })
            .collect();
        for t in handles {
            t.join().unwrap();
        }
        let max = c.max_live.load(Ordering::SeqCst);
        assert!(max <= PROBES, "round {round}: {max} probes alive at once");
        assert_eq!(max, PROBES, "round {round}: the slots were never all taken");
        assert_eq!(c.live.load(Ordering::SeqCst), 0);
    }
}
