//! A tonic server protected on the server side: rate limit, bulkhead and a
//! deadline that honours the caller's `grpc-timeout`, with each rejection
//! answered as its gRPC status (`RESOURCE_EXHAUSTED` with
//! `grpc-retry-pushback-ms`, `DEADLINE_EXCEEDED`).
//!
//! Run: `cargo run --example tonic_server --features tonic -- [--addr 127.0.0.1:50051] [--for 30]`
//!
//! It serves `demo.Greeter` (examples/proto/greeter.proto) for `--for`
//! seconds (10 by default), then prints what it answered and exits. Point
//! `cargo run --example tonic_client --features tonic -- http://127.0.0.1:50051`
//! at it meanwhile.

#[path = "proto/greeter.rs"]
mod greeter;

use std::sync::atomic::Ordering;
use std::time::Duration;
use tower_firebreak::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut addr = "127.0.0.1:50051".to_owned();
    let mut secs = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => addr = args.next().ok_or("--addr needs a value")?,
            "--for" => secs = args.next().ok_or("--for needs a value")?.parse()?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "demo.Greeter on http://{} for {secs} s: rate limit 10/s, bulkhead 4, deadline 5 s",
        listener.local_addr()?
    );
    let greeter = greeter::Greeter::default();
    let tally = greeter::Tally::default();
    greeter::serve(
        listener,
        greeter.clone(),
        tally.clone(),
        tokio::time::sleep(Duration::from_secs(secs)),
    )
    .await?;
    println!(
        "done: {} calls reached the handler",
        greeter.calls.load(Ordering::SeqCst)
    );
    for (kind, n) in tally.rejected.lock().unwrap().iter() {
        println!("  {n} x {kind}");
    }
    Ok(())
}
