//! The key cache of one shard. It holds only keys whose routing slot the
//! shard owns, so it is the shard's alone: no locks. An entry maps a key id
//! to the authenticated organization and a keyed digest of the right secret
//! (never the plaintext). Unknown key ids are cached negatively for a short
//! time. Both maps are bounded (`crate::bounded`): a full map makes room by
//! evicting, among a small random sample, the least recently used entry
//! (or, for unknown ids, the one nearest its expiry), never by a scan.
//!
//! The TTL bounds how long an entry is trusted without reading its key's row
//! again, not how long it is kept: an entry past its TTL is re-read before
//! use (a database read, no Argon2), and only a changed stored hash, a
//! revocation or eviction sends a key through Argon2id again.

use crate::bounded::BoundedMap;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

use super::key::KeyId;

use super::Principal;

struct Entry {
    principal: Rc<Principal>,
    digest: [u8; 32],
    /// Digest of the stored Argon2id hash the secret was verified against:
    /// a re-read that finds the same hash needs no new verification.
    hash_fingerprint: [u8; 32],
    /// Re-read the key's row against the database after this (cache TTL).
    fresh_until: Instant,
    /// From here on a hit also asks for a background re-read of the key's
    /// row (no Argon2: the secret was verified), so a key in use never
    /// reaches `fresh_until` and never stalls its requests on a verification.
    refresh_at: Instant,
    refreshing: Cell<bool>,
    /// While a refresh is in flight the entry stays usable up to here
    /// (another fifth of the TTL), so a slow database at refresh time does
    /// not hold requests on a re-read.
    stale_until: Instant,
    /// The key stops working at this instant (rotation grace period).
    key_expires: Option<Instant>,
    last_used: Cell<Instant>,
}

pub enum Lookup {
    Hit(Rc<Principal>),
    /// A hit whose entry is due for a refresh; the caller starts it (once:
    /// later hits are plain until the refresh lands or fails).
    Stale(Rc<Principal>),
    /// The key is known and the presented secret is not its secret.
    WrongSecret,
    /// The key id is known not to exist (negative entry).
    Unknown,
    /// The entry is past its TTL: re-read the key's row before use (no
    /// Argon2 when its hash is unchanged), then look up again.
    Expired,
    Miss,
}

/// Four fifths of the way from `now` to `fresh_until`.
fn refresh_point(now: Instant, fresh_until: Instant) -> Instant {
    now + fresh_until.saturating_duration_since(now) * 4 / 5
}

/// A fifth of the TTL past `fresh_until`.
fn stale_point(now: Instant, fresh_until: Instant) -> Instant {
    fresh_until + fresh_until.saturating_duration_since(now) / 5
}

pub struct KeyCache {
    entries: BoundedMap<KeyId, Entry>,
    /// Unknown key ids, until when they are known unknown.
    negative: BoundedMap<KeyId, Instant>,
}

impl KeyCache {
    pub fn new(capacity: usize, negative_capacity: usize) -> KeyCache {
        KeyCache {
            entries: BoundedMap::new(capacity),
            negative: BoundedMap::new(negative_capacity),
        }
    }

    pub fn lookup(&mut self, key_id: &str, digest: &[u8; 32], now: Instant) -> Lookup {
        let Some(key_id) = KeyId::new(key_id) else {
            return Lookup::Miss;
        };
        if let Some(e) = self.entries.get(&key_id) {
            let expired = e.key_expires.is_some_and(|t| t <= now);
            let fresh = e.fresh_until > now || (e.refreshing.get() && e.stale_until > now);
            if expired {
                self.entries.remove(&key_id);
                return Lookup::Miss;
            }
            if !fresh {
                return Lookup::Expired;
            }
            if !crate::api::constant_time_eq(&e.digest, digest) {
                return Lookup::WrongSecret;
            }
            e.last_used.set(now);
            if e.refresh_at <= now && !e.refreshing.get() {
                e.refreshing.set(true);
                return Lookup::Stale(e.principal.clone());
            }
            return Lookup::Hit(e.principal.clone());
        }
        match self.negative.get(&key_id) {
            Some(&until) if until > now => Lookup::Unknown,
            Some(_) => {
                self.negative.remove(&key_id);
                Lookup::Miss
            }
            None => Lookup::Miss,
        }
    }

    pub fn insert(
        &mut self,
        principal: Rc<Principal>,
        digest: [u8; 32],
        hash_fingerprint: [u8; 32],
        fresh_until: Instant,
        key_expires: Option<Instant>,
        now: Instant,
    ) {
        let Some(key_id) = KeyId::new(principal.key_id()) else {
            return;
        };
        self.negative.remove(&key_id);
        self.entries.insert(
            key_id,
            Entry {
                principal,
                digest,
                hash_fingerprint,
                fresh_until,
                refresh_at: refresh_point(now, fresh_until),
                refreshing: Cell::new(false),
                stale_until: stale_point(now, fresh_until),
                key_expires,
                last_used: Cell::new(now),
            },
            |e| e.last_used.get(),
        );
        debug_assert!(self.entries.len() <= self.entries.capacity());
    }

    pub fn insert_negative(&mut self, key_id: &str, until: Instant) {
        let Some(key_id) = KeyId::new(key_id) else {
            return;
        };
        // The least worth keeping: expired already, else nearest expiry.
        self.negative.insert(key_id, until, |&t| t);
        debug_assert!(self.negative.len() <= self.negative.capacity());
    }

    /// A re-read of the key's row found it live, with a stored hash whose
    /// digest is `hash_fingerprint`. When that is the hash the entry was
    /// verified against, the entry is fresh again until `fresh_until` and
    /// this returns true; a changed hash drops the entry (the next request
    /// verifies again) and returns false, as does a missing entry.
    pub fn refreshed(
        &mut self,
        principal: Rc<Principal>,
        hash_fingerprint: [u8; 32],
        fresh_until: Instant,
        key_expires: Option<Instant>,
        now: Instant,
    ) -> bool {
        let Some(key_id) = KeyId::new(principal.key_id()) else {
            return false;
        };
        let Some(e) = self.entries.get_mut(&key_id) else {
            return false;
        };
        if e.hash_fingerprint != hash_fingerprint {
            self.entries.remove(&key_id);
            return false;
        }
        e.principal = principal;
        e.fresh_until = fresh_until;
        e.refresh_at = refresh_point(now, fresh_until);
        e.stale_until = stale_point(now, fresh_until);
        e.refreshing.set(false);
        e.key_expires = key_expires;
        true
    }

    /// A refresh could not run (the database did not answer): a later hit
    /// tries again.
    pub fn refresh_failed(&mut self, key_id: &str) {
        if let Some(e) = KeyId::new(key_id).and_then(|k| self.entries.get(&k)) {
            e.refreshing.set(false);
        }
    }

    /// Until when the entry of `key_id` may be relied on (its cache TTL and
    /// its key's expiry, whichever comes first).
    pub fn valid_until(&self, key_id: &str) -> Option<Instant> {
        let e = self.entries.get(&KeyId::new(key_id)?)?;
        Some(
            e.key_expires
                .map_or(e.fresh_until, |k| k.min(e.fresh_until)),
        )
    }

    pub fn invalidate(&mut self, key_id: &str) {
        if let Some(key_id) = KeyId::new(key_id) {
            self.entries.remove(&key_id);
            self.negative.remove(&key_id);
        }
    }

    /// Drops every entry of an organization (all its keys): a scan, for
    /// invalidations only.
    pub fn invalidate_organization(&mut self, org: uuid::Uuid) {
        self.entries
            .retain(|_, e| e.principal.organization_id != org);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.negative.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A principal for unit tests (here and in `lease.rs`).
#[cfg(test)]
pub(crate) mod tests_support {
    use super::super::{Principal, PrincipalFields};
    use std::rc::Rc;

    pub fn principal(key_id: &str) -> Rc<Principal> {
        Rc::new(Principal::from(PrincipalFields {
            organization_id: uuid::Uuid::new_v4(),
            organization_name: "o".into(),
            tier: "free".into(),
            key_id: key_id.into(),
            created_at: String::new(),
            updated_at: String::new(),
            webhook_url: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use super::tests_support::principal;

    const HASH: [u8; 32] = [7; 32];

    #[test]
    fn hit_wrong_secret_expiry_and_negative() {
        let mut c = KeyCache::new(10, 10);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        c.insert(principal("k1"), [1; 32], HASH, later, None, now);
        assert!(matches!(c.lookup("k1", &[1; 32], now), Lookup::Hit(_)));
        assert!(matches!(c.lookup("k1", &[2; 32], now), Lookup::WrongSecret));
        // Past the TTL the entry is kept, to be re-read before use.
        assert!(matches!(c.lookup("k1", &[1; 32], later), Lookup::Expired));
        assert!(matches!(c.lookup("k1", &[2; 32], later), Lookup::Expired));
        // A key past its own expiry (rotation grace) is gone for good.
        c.insert(
            principal("k2"),
            [1; 32],
            HASH,
            later,
            Some(now + Duration::from_secs(1)),
            now,
        );
        assert!(matches!(
            c.lookup("k2", &[1; 32], now + Duration::from_secs(2)),
            Lookup::Miss
        ));
        c.insert_negative("k3", now + Duration::from_secs(5));
        assert!(matches!(c.lookup("k3", &[0; 32], now), Lookup::Unknown));
        assert!(matches!(
            c.lookup("k3", &[0; 32], now + Duration::from_secs(6)),
            Lookup::Miss
        ));
        c.invalidate("k1");
        c.insert(principal("k1"), [1; 32], HASH, later, None, now);
        c.invalidate("k1");
        assert!(matches!(c.lookup("k1", &[1; 32], now), Lookup::Miss));
    }

    #[test]
    fn hits_late_in_the_ttl_ask_for_one_refresh() {
        let mut c = KeyCache::new(10, 10);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        c.insert(principal("k1"), [1; 32], HASH, now + ttl, None, now);
        assert!(matches!(
            c.lookup("k1", &[1; 32], now + Duration::from_secs(47)),
            Lookup::Hit(_)
        ));
        let late = now + Duration::from_secs(49);
        assert!(matches!(c.lookup("k1", &[1; 32], late), Lookup::Stale(_)));
        assert!(matches!(c.lookup("k1", &[1; 32], late), Lookup::Hit(_)));
        c.refresh_failed("k1");
        assert!(matches!(c.lookup("k1", &[1; 32], late), Lookup::Stale(_)));
        // The refresh is slow: the entry holds a fifth of the TTL longer.
        let overdue = now + Duration::from_secs(70);
        assert!(matches!(c.lookup("k1", &[1; 32], overdue), Lookup::Hit(_)));
        assert!(c.refreshed(principal("k1"), HASH, late + ttl, None, late));
        assert!(matches!(
            c.lookup("k1", &[1; 32], now + ttl),
            Lookup::Hit(_)
        ));
        assert!(matches!(
            c.lookup("k1", &[2; 32], now + ttl),
            Lookup::WrongSecret
        ));
        assert!(matches!(
            c.lookup("k1", &[1; 32], late + ttl),
            Lookup::Expired
        ));
    }

    #[test]
    fn a_reread_renews_an_expired_entry_only_for_the_same_stored_hash() {
        let mut c = KeyCache::new(10, 10);
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        c.insert(principal("k1"), [1; 32], HASH, now + ttl, None, now);
        let after = now + ttl * 3;
        assert!(matches!(c.lookup("k1", &[1; 32], after), Lookup::Expired));
        // Same stored hash: fresh again, and the verified secret still decides.
        assert!(c.refreshed(principal("k1"), HASH, after + ttl, None, after));
        assert!(matches!(c.lookup("k1", &[1; 32], after), Lookup::Hit(_)));
        assert!(matches!(
            c.lookup("k1", &[2; 32], after),
            Lookup::WrongSecret
        ));
        // Another stored hash: the entry is dropped, the next lookup misses
        // (a full verification).
        let later = after + ttl * 3;
        assert!(matches!(c.lookup("k1", &[1; 32], later), Lookup::Expired));
        assert!(!c.refreshed(principal("k1"), [8; 32], later + ttl, None, later));
        assert!(matches!(c.lookup("k1", &[1; 32], later), Lookup::Miss));
        // No entry: nothing to renew.
        assert!(!c.refreshed(principal("k9"), HASH, later + ttl, None, later));
        assert!(c.is_empty());
    }

    #[test]
    fn bounded_with_eviction() {
        let mut c = KeyCache::new(50, 20);
        let now = Instant::now();
        for i in 0..500 {
            c.insert(
                principal(&format!("k{i}")),
                [0; 32],
                HASH,
                now + Duration::from_secs(60),
                None,
                now,
            );
            c.insert_negative(&format!("n{i}"), now + Duration::from_secs(60));
        }
        assert_eq!(c.len(), 50);
        assert_eq!(c.negative.len(), 20);
    }

    #[test]
    fn a_full_table_records_the_next_entry_and_keeps_the_busy_ones() {
        let mut c = KeyCache::new(64, 64);
        let now = Instant::now();
        let ttl = now + Duration::from_secs(600);
        for i in 0..4 {
            c.insert(principal(&format!("hot{i}")), [1; 32], HASH, ttl, None, now);
        }
        // 10 000 keys each used once, later than the hot keys' last use
        // but older than their next: the hot keys, used after every
        // insert, are never the least recently used of a sample unless
        // all 8 sampled are hot, (1/16)^8 per eviction.
        for i in 0..10_000u64 {
            let t = now + Duration::from_millis(i * 2);
            c.insert(principal(&format!("k{i}")), [1; 32], HASH, ttl, None, t);
            assert!(matches!(
                c.lookup(&format!("k{i}"), &[1; 32], t),
                Lookup::Hit(_)
            ));
            for h in 0..4 {
                let used = t + Duration::from_millis(1);
                let hit = c.lookup(&format!("hot{h}"), &[1; 32], used);
                assert!(matches!(hit, Lookup::Hit(_)), "hot key {h} kept at {i}");
            }
            assert_eq!(c.len(), 64.min(5 + i as usize));
        }
        // Unknown ids: a full table still records the next one, evicting
        // an expired one (or the nearest to expiry) rather than refusing.
        for i in 0..64u64 {
            c.insert_negative(&format!("gone{i}"), now + Duration::from_millis(i));
        }
        let later = now + Duration::from_secs(1);
        for i in 0..200 {
            c.insert_negative(&format!("n{i}"), later + Duration::from_secs(60));
            assert!(matches!(
                c.lookup(&format!("n{i}"), &[0; 32], later),
                Lookup::Unknown
            ));
            assert_eq!(c.negative.len(), 64);
        }
    }
}
