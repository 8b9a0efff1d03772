//! Circuit breaker integration tests.

#[path = "../support/mod.rs"]
mod support;

mod config;
mod e2e;
mod grpc;
mod keyed;
mod model;
mod threads;
mod transitions;
