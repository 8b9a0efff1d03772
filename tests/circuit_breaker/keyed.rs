//! One breaker per key.

use crate::support::{Cmd, Counter};
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::{CircuitBreakerConfig, KeyedCircuitBreakerHandle, State};

type KeyOf = fn(&(u32, Cmd)) -> u32;

/// A keyed breaker from `cfg`, one breaker per `u32` key, over a service
/// that obeys each request's `Cmd` and counts the calls that reach it: the
/// breaker's handle, the counter, and the service.
fn keyed(
    cfg: CircuitBreakerConfig,
) -> (
    KeyedCircuitBreakerHandle<u32, KeyOf>,
    Counter,
    impl Service<(u32, Cmd), Response = (), Error = BoxError>,
) {
    let layer = cfg
        .into_keyed_layer((|(k, _): &(u32, Cmd)| *k) as KeyOf)
        .unwrap();
    let c = Counter::default();
    let svc = layer.layer(c.service().map_request(|(_, cmd): (u32, Cmd)| cmd));
    (layer.handle(), c, svc)
}

fn config() -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        consecutive_failures: Some(2),
        max_keys: 3,
        idle_timeout: Duration::from_secs(60),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn keys_have_their_own_breakers() {
    let layer = config()
        .into_keyed_layer(|(k, _): &(&'static str, Cmd)| *k)
        .unwrap();
    let h = layer.handle();
    let c = Counter::default();
    let inner = c.service().map_request(|(_, cmd): (&'static str, Cmd)| cmd);
    let mut svc = layer.layer(inner);
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call(("a", Cmd::Fail)).await;
    }
    svc.ready()
        .await
        .unwrap()
        .call(("b", Cmd::Ok))
        .await
        .unwrap();
    assert!(
        svc.ready()
            .await
            .unwrap()
            .call(("a", Cmd::Ok))
            .await
            .is_err()
    );
    svc.ready()
        .await
        .unwrap()
        .call(("b", Cmd::Ok))
        .await
        .unwrap();
    let mut states = h.states();
    states.sort_by_key(|(k, _)| *k);
    assert_eq!(states, [("a", State::Open), ("b", State::Closed)]);
    assert_eq!(h.get(&"a").unwrap().state(), State::Open);
    assert_eq!(c.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn live_keys_are_bounded_and_open_breakers_outlive_idle_closed_ones() {
    let (h, _, mut svc) = keyed(config());
    // Key 0 opens.
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call((0, Cmd::Fail)).await;
    }
    for k in 1..100 {
        svc.ready().await.unwrap().call((k, Cmd::Ok)).await.unwrap();
        assert!(h.len() <= 3, "{} live keys", h.len());
    }
    // The open breaker was never evicted for a closed one.
    assert_eq!(h.get(&0).map(|b| b.state()), Some(State::Open));
    assert!(svc.ready().await.unwrap().call((0, Cmd::Ok)).await.is_err());

    // Idle closed breakers are dropped first once the table is full.
    tokio::time::advance(Duration::from_secs(61)).await;
    svc.ready()
        .await
        .unwrap()
        .call((500, Cmd::Ok))
        .await
        .unwrap();
    let mut keys: Vec<u32> = h.states().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    // Key 0 turned half-open and, like 98 and 99, was idle.
    assert_eq!(keys, [500]);
}

/// A full table in which no breaker is closed evicts none of them: that
/// would let calls through to a key that is failing. New keys share one
/// breaker meanwhile, which opens if they fail.
#[tokio::test(start_paused = true)]
async fn a_full_table_of_open_breakers_keeps_them_and_new_keys_share_one() {
    let (h, c, mut svc) = keyed(config());
    for k in 0..3 {
        for _ in 0..2 {
            let _ = svc.ready().await.unwrap().call((k, Cmd::Fail)).await;
        }
    }
    assert_eq!(c.calls(), 6);
    assert!(h.overflow().is_none());
    // A new key passes (its shared breaker is closed), and evicts no one.
    svc.ready().await.unwrap().call((3, Cmd::Ok)).await.unwrap();
    assert_eq!(c.calls(), 7);
    assert_eq!(h.len(), 3);
    assert!(h.get(&3).is_none(), "key 3 has no place of its own");
    assert_eq!(h.overflow().map(|b| b.state()), Some(State::Closed));
    for k in 0..3 {
        assert_eq!(h.get(&k).map(|b| b.state()), Some(State::Open), "key {k}");
        assert!(svc.ready().await.unwrap().call((k, Cmd::Ok)).await.is_err());
    }
    assert_eq!(c.calls(), 7, "an open key reached the dependency");
    // New keys that fail open the breaker they share.
    for k in [4, 5] {
        let _ = svc.ready().await.unwrap().call((k, Cmd::Fail)).await;
    }
    assert_eq!(c.calls(), 9);
    assert!(svc.ready().await.unwrap().call((6, Cmd::Ok)).await.is_err());
    assert_eq!(c.calls(), 9);
    assert_eq!(h.overflow().map(|b| b.state()), Some(State::Open));
    // Once the old keys are idle and swept, a new key gets its own again.
    tokio::time::advance(Duration::from_secs(61)).await;
    svc.ready().await.unwrap().call((7, Cmd::Ok)).await.unwrap();
    assert!(h.get(&7).is_some());
}

/// A key that opened and then stopped calling does not keep its place:
/// once idle it is swept like a closed one, so two live keys that fail keep
/// their own breakers (and open) in a table of two.
#[tokio::test(start_paused = true)]
async fn an_abandoned_open_breaker_is_swept_once_idle() {
    let cfg = CircuitBreakerConfig {
        max_keys: 2,
        idle_timeout: Duration::from_secs(10),
        ..config()
    };
    let (h, _, mut svc) = keyed(cfg);
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call((1, Cmd::Fail)).await;
    }
    assert_eq!(h.get(&1).map(|b| b.state()), Some(State::Open));
    tokio::time::advance(Duration::from_secs(3600)).await;
    for _ in 0..2 {
        for k in [2, 3] {
            let _ = svc.ready().await.unwrap().call((k, Cmd::Fail)).await;
        }
    }
    assert_eq!(h.get(&2).map(|b| b.state()), Some(State::Open));
    assert_eq!(h.get(&3).map(|b| b.state()), Some(State::Open));
}

#[test]
fn a_zero_idle_timeout_is_refused() {
    let cfg = CircuitBreakerConfig {
        idle_timeout: Duration::ZERO,
        ..config()
    };
    let err = cfg
        .into_keyed_layer::<u32, _>(|(k, _): &(u32, Cmd)| *k)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.field(), "idle_timeout");
}

#[tokio::test(start_paused = true)]
async fn idle_closed_breakers_are_swept_even_below_the_bound() {
    let (h, _, mut svc) = keyed(config());
    svc.ready().await.unwrap().call((1, Cmd::Ok)).await.unwrap();
    svc.ready().await.unwrap().call((2, Cmd::Ok)).await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    svc.ready().await.unwrap().call((2, Cmd::Ok)).await.unwrap();
    tokio::time::advance(Duration::from_secs(31)).await;
    svc.ready().await.unwrap().call((3, Cmd::Ok)).await.unwrap();
    let mut keys: Vec<u32> = h.states().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    // Key 1 was idle 61 s; key 2 only 31 s.
    assert_eq!(keys, [2, 3]);
}

/// Two worker threads calling many keys through a small table, swept
/// often (an idle timeout of 1 ms): the table never holds more than
/// `max_keys` breakers, never one key twice, and every call is answered.
/// A guard for the sharded table; the single-mutex table before it passed
/// too. It is a weak one for duplicate keys: with the re-check under the
/// table's lock removed it still passed three runs of three (the window is
/// narrow, and duplicates are soon evicted from a table of 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_threads_over_many_keys_keep_the_bound() {
    let layer = CircuitBreakerConfig {
        max_keys: 16,
        idle_timeout: Duration::from_millis(1),
        ..Default::default()
    }
    .into_keyed_layer(|k: &u64| *k)
    .unwrap();
    let h = layer.handle();
    let svc = layer.layer(tower::service_fn(|k: u64| async move {
        Ok::<_, std::io::Error>(k)
    }));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (svc, h) = (svc.clone(), h.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..2_000u64 {
                // Keys 0..200: half the calls in one order for all tasks
                // (so that two tasks meet on a new key), half each in its own.
                let key = if i % 2 == 0 {
                    (i / 2) % 200
                } else {
                    (i * 7 + t * 31) % 200
                };
                assert_eq!(svc.clone().oneshot(key).await.unwrap(), key);
                if i % 50 == 0 {
                    let mut keys: Vec<u64> = h.states().into_iter().map(|(k, _)| k).collect();
                    let n = keys.len();
                    assert!(n <= 16, "the table held {n} breakers");
                    keys.sort_unstable();
                    keys.dedup();
                    assert_eq!(keys.len(), n, "a key twice");
                }
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every call was answered");
    let states = h.states();
    assert!(states.len() <= 16);
    let mut keys: Vec<u64> = states.iter().map(|(k, _)| *k).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), states.len(), "a key twice");
}

/// A full table of 64 or more keys evicts its least recently used closed
/// breakers a batch at a time (`max_keys / 32`), so that a stream of new
/// keys does not scan the table for each one; open breakers stay.
#[tokio::test(start_paused = true)]
async fn a_full_table_evicts_a_batch_of_the_least_recently_used() {
    let (h, _, mut svc) = keyed(CircuitBreakerConfig {
        max_keys: 64,
        ..config()
    });
    // Key 0 opens; keys 1..64 are used in order, 100 ms apart.
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call((0, Cmd::Fail)).await;
    }
    for k in 1..64 {
        tokio::time::advance(Duration::from_millis(100)).await;
        svc.ready().await.unwrap().call((k, Cmd::Ok)).await.unwrap();
    }
    assert_eq!(h.len(), 64);
    // A new key: the two least recently used closed breakers (1 and 2) go,
    // not the open one (0), which is older.
    svc.ready()
        .await
        .unwrap()
        .call((100, Cmd::Ok))
        .await
        .unwrap();
    assert_eq!(h.len(), 63);
    assert!(h.get(&1).is_none() && h.get(&2).is_none());
    assert_eq!(h.get(&0).map(|b| b.state()), Some(State::Open));
    assert!(h.get(&3).is_some() && h.get(&100).is_some());
    // The next new key finds a place without evicting.
    svc.ready()
        .await
        .unwrap()
        .call((101, Cmd::Ok))
        .await
        .unwrap();
    assert_eq!(h.len(), 64);
    assert!(h.get(&3).is_some());
}

/// Between the sweeps of a full table (at most one per sixteenth of
/// `idle_timeout`), a breaker left half-open by a key that stopped calling
/// is evicted before a closed one in use, as the sweep would have dropped it.
#[tokio::test(start_paused = true)]
async fn between_sweeps_an_idle_half_open_breaker_goes_first() {
    let (h, _, mut svc) = keyed(CircuitBreakerConfig {
        max_keys: 2,
        idle_timeout: Duration::from_secs(16),
        open_for: Duration::from_secs(1),
        ..config()
    });
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call((1, Cmd::Fail)).await;
    }
    svc.ready().await.unwrap().call((2, Cmd::Ok)).await.unwrap();
    // 15.5 s: key 3 comes; a sweep (nothing idle yet), then key 2 goes.
    tokio::time::advance(Duration::from_millis(15_500)).await;
    svc.ready().await.unwrap().call((3, Cmd::Ok)).await.unwrap();
    assert!(h.get(&2).is_none());
    // 16.2 s: key 4 comes, under a second after that sweep, so no sweep.
    // Key 1 is half-open and idle 16.2 s: it goes, not key 3.
    tokio::time::advance(Duration::from_millis(700)).await;
    svc.ready().await.unwrap().call((4, Cmd::Ok)).await.unwrap();
    assert!(
        h.get(&1).is_none(),
        "the abandoned half-open breaker stayed"
    );
    assert!(h.get(&3).is_some(), "a closed breaker in use went first");
}
