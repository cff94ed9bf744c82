//! Leases: how a shard serves a key another shard owns without moving the
//! connection. The owner shard (the key's routing slot) keeps the verified
//! key and the organization's rate limit; a request for that key on another
//! shard asks the owner, by one message on the owner's bounded lease queue,
//! for a lease: the verified principal, the keyed digest of the right secret
//! and a few requests' worth of the organization's quota, charged on the
//! owner's limiter when granted. The borrowing shard then serves the key's
//! next requests from its `LeaseTable` until the tokens run out or the lease
//! expires, and returns the unused tokens with its next lease request.
//!
//! So one key's traffic uses every shard; the cost is one cross-shard
//! message per lease (`triggers_cross_shard_messages_total`). Accuracy: a
//! lease holds at most 1/6000 of a minute's quota (one hundredth of a
//! second's worth), so what sits unused in leases is far inside ±2 %.
//! Invalidations reach every shard and drop its leases of the key.

use super::key::KeyId;
use super::Principal;
use crate::bounded::BoundedMap;
use crate::limit::Decision;
use futures::channel::oneshot;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The longest a lease lives; a key revoked in another process stops within
/// this on top of the invalidation notice (which drops leases at once).
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// Requests one lease may hold for an organization allowed `limit` per minute.
pub fn lease_size(limit_per_minute: u64) -> u64 {
    (limit_per_minute / 6000).clamp(1, 1024)
}

/// A borrowing shard's request to the key's owner shard.
pub struct LeaseRequest {
    pub key_id: String,
    /// Needed when the owner has to verify the key (a cache miss).
    pub secret: String,
    pub digest: [u8; 32],
    /// The requests the borrower needs now (a batch costs its event count).
    pub cost: u64,
    /// Unused requests of the borrower's expired lease of this key.
    pub refund: u64,
    pub reply: oneshot::Sender<LeaseAnswer>,
}

/// The owner's answer (crosses threads, so no `Rc`).
#[derive(Clone)]
pub enum LeaseAnswer {
    Granted {
        principal: Principal,
        /// Requests granted, at least the request's cost.
        tokens: u64,
        /// The owner's decision for the whole grant (remaining after it).
        decision: Decision,
        expires: Instant,
    },
    /// The organization is over its limit: the owner's denying decision.
    Limited(Decision),
    Unauthorized,
    Unavailable,
    /// The owner's verification queue is full.
    Overloaded,
    /// The owner's verification job ended without an answer (a worker
    /// panic): 500 `internal_error`.
    Internal,
}

struct Lease {
    principal: Rc<Principal>,
    digest: [u8; 32],
    tokens: u64,
    /// What the owner reported as remaining after the grant.
    decision: Decision,
    expires: Instant,
}

/// What a borrowing shard found for a request.
pub enum LeaseUse {
    /// Served from the lease: the principal and the decision to report.
    Spent(Rc<Principal>, Decision),
    /// The lease is live and the presented secret is not the key's secret.
    WrongSecret,
    /// Ask the owner; `refund` tokens of an old lease go back with the ask.
    Ask { refund: u64 },
}

/// The leases one shard holds on keys other shards own. Bounded
/// (`auth.cache_capacity`, at least 16): a full table makes room by
/// evicting, among a random sample, a dead lease (expired or spent) first,
/// else the one expiring soonest. An evicted live lease's tokens stay
/// charged at the owner: eviction can only cost its organization quota,
/// never grant it more.
pub struct LeaseTable {
    leases: BoundedMap<KeyId, Lease>,
}

impl LeaseTable {
    pub fn new(capacity: usize) -> LeaseTable {
        LeaseTable {
            leases: BoundedMap::new(capacity.max(16)),
        }
    }

    /// Spends `cost` requests of `key_id`'s lease if it is live and has them.
    pub fn spend(&mut self, key_id: &str, digest: &[u8; 32], cost: u64, now: Instant) -> LeaseUse {
        let Some(key_id) = KeyId::new(key_id) else {
            return LeaseUse::Ask { refund: 0 };
        };
        let Some(l) = self.leases.get_mut(&key_id) else {
            return LeaseUse::Ask { refund: 0 };
        };
        if l.expires <= now {
            let refund = l.tokens;
            self.leases.remove(&key_id);
            return LeaseUse::Ask { refund };
        }
        if !crate::api::constant_time_eq(&l.digest, digest) {
            return LeaseUse::WrongSecret;
        }
        if l.tokens < cost {
            let refund = l.tokens;
            self.leases.remove(&key_id);
            return LeaseUse::Ask { refund };
        }
        l.tokens -= cost;
        let mut d = l.decision;
        d.remaining = d.remaining.saturating_add(l.tokens);
        LeaseUse::Spent(l.principal.clone(), d)
    }

    /// Installs a granted lease (what is left after its first request).
    pub fn install(
        &mut self,
        principal: Rc<Principal>,
        digest: [u8; 32],
        tokens: u64,
        decision: Decision,
        expires: Instant,
        now: Instant,
    ) {
        let Some(key_id) = KeyId::new(principal.key_id()) else {
            return;
        };
        self.leases.insert(
            key_id,
            Lease {
                principal,
                digest,
                tokens,
                decision,
                expires,
            },
            |l| (l.expires > now && l.tokens > 0, l.expires),
        );
        debug_assert!(self.leases.len() <= self.leases.capacity());
    }

    pub fn invalidate(&mut self, key_id: &str) {
        if let Some(key_id) = KeyId::new(key_id) {
            self.leases.remove(&key_id);
        }
    }

    pub fn clear(&mut self) {
        self.leases.clear();
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::auth::cache::tests_support::principal;

    fn decision(remaining: u64) -> Decision {
        Decision {
            allowed: true,
            limit: 100,
            remaining,
            reset_secs: 1,
            retry_after_secs: 0,
        }
    }

    #[test]
    fn spend_until_empty_then_ask_with_the_refund() {
        let mut t = LeaseTable::new(16);
        let now = Instant::now();
        let later = now + LEASE_TTL;
        assert!(matches!(
            t.spend("k", &[1; 32], 1, now),
            LeaseUse::Ask { refund: 0 }
        ));
        t.install(principal("k"), [1; 32], 3, decision(50), later, now);
        match t.spend("k", &[1; 32], 1, now) {
            LeaseUse::Spent(p, d) => {
                assert_eq!(p.key_id(), "k");
                assert_eq!(d.remaining, 52);
            }
            _ => panic!("expected a spend"),
        }
        assert!(matches!(
            t.spend("k", &[2; 32], 1, now),
            LeaseUse::WrongSecret
        ));
        // 2 left, a batch of 5 asks again and gives the 2 back.
        assert!(matches!(
            t.spend("k", &[1; 32], 5, now),
            LeaseUse::Ask { refund: 2 }
        ));
        assert!(t.is_empty());
        t.install(principal("k"), [1; 32], 4, decision(50), later, now);
        assert!(matches!(
            t.spend("k", &[1; 32], 1, later),
            LeaseUse::Ask { refund: 4 }
        ));
        t.install(principal("k"), [1; 32], 4, decision(50), later, now);
        t.invalidate("k");
        assert!(matches!(
            t.spend("k", &[1; 32], 1, now),
            LeaseUse::Ask { refund: 0 }
        ));
    }

    #[test]
    fn bounded() {
        let mut t = LeaseTable::new(16);
        let now = Instant::now();
        for i in 0..100 {
            t.install(
                principal(&format!("k{i}")),
                [0; 32],
                1,
                decision(1),
                now + LEASE_TTL,
                now,
            );
        }
        assert_eq!(t.len(), 16);
    }

    #[test]
    fn a_full_table_installs_the_next_lease_and_evicts_dead_ones_first() {
        let mut t = LeaseTable::new(64);
        let now = Instant::now();
        // 60 dead leases (spent) and 4 live ones expiring late.
        for i in 0..60 {
            let p = principal(&format!("dead{i}"));
            t.install(p, [0; 32], 0, decision(1), now + LEASE_TTL, now);
        }
        for i in 0..4 {
            let p = principal(&format!("live{i}"));
            t.install(p, [0; 32], 100, decision(1), now + LEASE_TTL * 2, now);
        }
        assert_eq!(t.len(), 64);
        // Newcomers with a nearer expiry: each is installed, and the live
        // leases go only if all 8 sampled are live ones ((1/16)^8).
        for i in 0..1000 {
            let p = principal(&format!("new{i}"));
            t.install(p, [0; 32], 5, decision(1), now + LEASE_TTL, now);
            assert!(matches!(
                t.spend(&format!("new{i}"), &[0; 32], 1, now),
                LeaseUse::Spent(..)
            ));
            assert_eq!(t.len(), 64);
        }
        for i in 0..4 {
            assert!(matches!(
                t.spend(&format!("live{i}"), &[0; 32], 1, now),
                LeaseUse::Spent(..)
            ));
        }
    }

    #[test]
    fn lease_sizes() {
        assert_eq!(lease_size(40), 1);
        assert_eq!(lease_size(60_000), 10);
        assert_eq!(lease_size(u64::MAX), 1024);
    }
}
