//! Triggers: a thread-per-core event-ingestion server backed by PostgreSQL.
//!
//! Start reading at `server.rs` (start-up and shutdown), then `shard/` (the
//! glommio executors and the connection loop) and `api/mod.rs` (the router).

pub mod api;
pub mod auth;
pub mod bounded;
pub mod config;
pub mod engine;
pub mod http;
pub mod ids;
pub mod limit;
pub mod metrics;
pub mod persist;
pub mod server;
pub mod shard;
pub mod store;
pub mod supervise;
pub mod time;
pub mod topology;
