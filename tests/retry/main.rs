//! Retry, retry budget, body buffering and hedging.

mod axum_e2e;
mod budget;
mod config;
mod deadline;
mod grpc;
mod hedge;
mod http;
mod policy;
mod prop;
mod support;
