//! Empty: this package only holds the production-config build of
//! `benches/overhead.rs` (see its `Cargo.toml`).
