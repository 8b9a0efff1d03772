//! Retry, retry budget, body buffering and hedging.

mod budget;
mod deadline;
mod grpc;
mod hedge;
mod http;
mod policy;
mod prop;
mod support;
