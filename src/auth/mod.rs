//! Authentication: the key format and Argon2id (`key.rs`), the per-shard key
//! cache (`cache.rs`), leases of other shards' keys (`lease.rs`), the failure
//! throttle (`throttle.rs`), and the organization-wide invalidation listener
//! (`invalidation.rs`). The request-side flow lives in `api/auth.rs`.

pub mod cache;
pub mod invalidation;
pub mod key;
pub mod lease;
pub mod principal;
pub mod throttle;

pub use cache::{KeyCache, Lookup};
pub use principal::{Principal, PrincipalFields};
