//! Fleet and outage tests of the broker backends, against real brokers.
//!
//! The fleet tests use the shared broker on this machine (a unique queue
//! name per run). The outage tests start their own broker process on a
//! spare loopback port, so stopping it never disturbs the shared one. Every
//! test panics with a clear message when its broker cannot be reached.
//!
//! Both go through `defer`: requests are deferred by `DeferLayer`s and
//! delivered by `Replayer`s, each on its own queue handle.
//!
//! Each broker's module also tests what only that backend has, beyond the
//! conformance suite: RabbitMQ's consumer with prefetch and its operator
//! copies of dead letters, Redis's cleanup of idle group consumers.

#![cfg(any(feature = "redis", feature = "nats", feature = "amqp"))]

mod support;

#[cfg(feature = "redis")]
mod redis;

#[cfg(feature = "nats")]
mod nats;

#[cfg(feature = "amqp")]
mod amqp;
