//! Circuit breaker (placeholder: being built).

mod error;
pub use self::error::CircuitOpen;
