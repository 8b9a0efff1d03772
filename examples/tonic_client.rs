//! A tonic client protected on the channel: a deadline carried to the server
//! as `grpc-timeout`, retries with backoff, and a circuit breaker, with
//! `StatusLayer` turning each rejection into the `tonic::Status` a generated
//! client returns.
//!
//! Run: `cargo run --example tonic_client --features tonic -- [http://127.0.0.1:50051]`
//!
//! Without an address it starts the `tonic_server` example's server in
//! process on 127.0.0.1:0, so it runs alone. It makes a few ordinary calls
//! (the server's hiccups are retried away), one slow call (cut at the 1 s
//! deadline, on both sides), calls to a method that keeps failing, until
//! the breaker opens and answers `UNAVAILABLE` with `grpc-retry-pushback-ms`
//! without calling the server, and, once the breaker has closed again, a
//! burst of 20 concurrent calls (the server's rate limit and bulkhead answer
//! `RESOURCE_EXHAUSTED`).

#[path = "proto/greeter.rs"]
mod greeter;

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::ServiceBuilder;
use tower_firebreak::BoxError;
use tower_firebreak::circuit_breaker::CircuitBreakerLayer;
use tower_firebreak::classify::{GrpcClassifier, GrpcCode};
use tower_firebreak::deadline::{DeadlineLayer, PropagateDeadlineLayer};
use tower_firebreak::grpc::{PUSHBACK_HEADER, StatusLayer};
use tower_firebreak::retry::{BufferRequestBodyLayer, ReplayBody, RetryLayer, RetryPolicy};

fn show(result: &Result<String, tonic::Status>) -> String {
    match result {
        Ok(reply) => format!("OK {reply:?}"),
        Err(s) => {
            let pushback = s
                .metadata()
                .get(PUSHBACK_HEADER)
                .map(|v| format!(", pushback {} ms", v.to_str().unwrap_or("?")))
                .unwrap_or_default();
            format!("{:?} {:?}{pushback}", s.code(), s.message())
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (addr, local) = match std::env::args().nth(1) {
        Some(addr) => (addr, None),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = format!("http://{}", listener.local_addr()?);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let tally = greeter::Tally::default();
            let server = tokio::spawn(greeter::serve(
                listener,
                greeter::Greeter::default(),
                tally.clone(),
                async move {
                    let _ = stopped.await;
                },
            ));
            println!("started demo.Greeter in process on {addr}");
            (addr, Some((stop, server, tally)))
        }
    };
    let channel = Channel::from_shared(addr.clone())?.connect().await?;

    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(3)
        .open_for(Duration::from_secs(2))
        .half_open_calls(1)
        // A server shedding load is busy, not broken: its
        // RESOURCE_EXHAUSTED is retried after the pushback, not held against it.
        .classifier(GrpcClassifier::new().success(GrpcCode::ResourceExhausted))
        .build()?;
    let breaker_state = breaker.handle();
    // Outermost first: statuses, the whole call's deadline, retries (on
    // a replayable body), the breaker, and the deadline written as
    // grpc-timeout on each attempt.
    let client = ServiceBuilder::new()
        .layer(StatusLayer::new())
        .layer(DeadlineLayer::new(Duration::from_secs(1)))
        .layer(BufferRequestBodyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::exponential(Duration::from_millis(20))
                .max_attempts(3)
                .http(),
        ))
        .layer(breaker)
        .map_request(|r: http::Request<ReplayBody<Body>>| r.map(Body::new))
        .layer(PropagateDeadlineLayer::new())
        .service(channel);
    println!("client: deadline 1 s, 3 attempts, breaker opens after 3 failures in a row");

    println!("-- ordinary calls (every fifth fails once on the server, and is retried):");
    for i in 0..6 {
        let r = greeter::say_hello(client.clone(), &format!("ada-{i}")).await;
        println!("  ada-{i}: {}", show(&r));
    }

    println!("-- a call the server takes 3 s to answer:");
    let t0 = Instant::now();
    let r = greeter::say_hello(client.clone(), "slow").await;
    println!("  slow: {} after {:?}", show(&r), t0.elapsed());

    println!("-- calls to a method that keeps failing:");
    for i in 0..4 {
        let r = greeter::say_hello(client.clone(), "down").await;
        println!(
            "  down #{i}: {} (breaker {:?})",
            show(&r),
            breaker_state.state()
        );
    }

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = greeter::say_hello(client.clone(), "probe").await;
    println!(
        "  2 s later, a probe: {} (breaker {:?})",
        show(&r),
        breaker_state.state()
    );
    println!("-- a burst of 20 concurrent calls:");
    let burst: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { greeter::say_hello(client, &format!("burst-{i}")).await })
        })
        .collect();
    let mut tally: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for call in burst {
        let r = call.await?;
        let key = match &r {
            Ok(_) => "Ok".to_owned(),
            Err(s) => format!(
                "{:?} {}",
                s.code(),
                s.message().split(':').next().unwrap_or("")
            ),
        };
        tally.entry(key).or_insert((0, show(&r))).0 += 1;
    }
    for (n, example) in tally.values() {
        println!("  {n:2} x {example}");
    }

    if let Some((stop, server, tally)) = local {
        let _ = stop.send(());
        server.await??;
        println!("-- the server's own rejections:");
        for (kind, n) in tally.rejected.lock().unwrap().iter() {
            println!("  {n} x {kind}");
        }
    }
    Ok(())
}
