//! Per-organization rate limiting, owned by the organization's owner shard:
//! GCRA (the token bucket's arithmetic twin) holding a minute's quota and
//! refilling continuously at limit ÷ 60 per second. A fresh organization may
//! spend its whole minute at once. One `u64` per organization, no locks.
//!
//! The table is bounded (`auth.cache_capacity`, at least 16). An admitted
//! request is always recorded: when the table is full, the organization
//! with the least state among a random sample makes room (a bucket already
//! full again first, else the one whose theoretical arrival time is
//! nearest now, i.e. the fewest requests charged), so a flood of new
//! organizations neither goes unlimited nor costs a scan of the table.

use crate::bounded::BoundedMap;

const WINDOW_NS: u64 = 60_000_000_000;

/// The outcome of a check, with what the rate-limit headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the full quota is back.
    pub reset_secs: u64,
    /// Seconds to wait before this request would be allowed (0 when allowed).
    pub retry_after_secs: u64,
}

pub struct RateLimiter {
    /// Theoretical arrival time per organization, in ns on the caller's clock.
    tat: BoundedMap<uuid::Uuid, u64>,
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

impl RateLimiter {
    pub fn new(capacity: usize) -> RateLimiter {
        RateLimiter {
            tat: BoundedMap::new(capacity.max(16)),
        }
    }

    /// Charges `cost` requests to `org` at time `now_ns` if the quota allows.
    pub fn check(
        &mut self,
        org: uuid::Uuid,
        limit_per_minute: u64,
        cost: u64,
        now_ns: u64,
    ) -> Decision {
        let limit = limit_per_minute.max(1);
        let interval = (WINDOW_NS / limit).max(1);
        let tat = self.tat.get(&org).copied().unwrap_or(now_ns).max(now_ns);
        let new_tat = tat.saturating_add(interval.saturating_mul(cost));
        if new_tat - now_ns > WINDOW_NS {
            let used = tat - now_ns;
            return Decision {
                allowed: false,
                limit,
                remaining: (WINDOW_NS - used.min(WINDOW_NS)) / interval,
                reset_secs: ceil_secs(used),
                retry_after_secs: ceil_secs(new_tat - now_ns - WINDOW_NS).max(1),
            };
        }
        // The least state is the smallest arrival time (a past one: a full
        // bucket, nothing to lose by forgetting it).
        self.tat.insert(org, new_tat, |&t| t);
        debug_assert!(self.tat.len() <= self.tat.capacity());
        debug_assert_eq!(self.tat.get(&org), Some(&new_tat));
        let used = new_tat - now_ns;
        Decision {
            allowed: true,
            limit,
            remaining: (WINDOW_NS - used) / interval,
            reset_secs: ceil_secs(used),
            retry_after_secs: 0,
        }
    }

    /// Charges as many requests as fit, between `min` and `max`, for a lease
    /// to another shard (see `auth::lease`); the decision and the count
    /// granted, 0 with a denying decision when not even `min` fits.
    pub fn grant(
        &mut self,
        org: uuid::Uuid,
        limit_per_minute: u64,
        min: u64,
        max: u64,
        now_ns: u64,
    ) -> (Decision, u64) {
        let interval = (WINDOW_NS / limit_per_minute.max(1)).max(1);
        let tat = self.tat.get(&org).copied().unwrap_or(now_ns).max(now_ns);
        let fits = (WINDOW_NS - (tat - now_ns).min(WINDOW_NS)) / interval;
        let n = fits.min(max.max(min));
        if n < min.max(1) {
            return (self.check(org, limit_per_minute, min.max(1), now_ns), 0);
        }
        let d = self.check(org, limit_per_minute, n, now_ns);
        debug_assert!(d.allowed);
        (d, if d.allowed { n } else { 0 })
    }

    /// Gives back `n` requests charged to `org` but never used (an expired
    /// lease); never below a full quota.
    pub fn refund(&mut self, org: uuid::Uuid, limit_per_minute: u64, n: u64, now_ns: u64) {
        let interval = (WINDOW_NS / limit_per_minute.max(1)).max(1);
        if let Some(t) = self.tat.get_mut(&org) {
            *t = t.saturating_sub(interval.saturating_mul(n)).max(now_ns);
        }
    }

    pub fn len(&self) -> usize {
        self.tat.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tat.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn whole_quota_at_once_then_continuous_refill() {
        let mut l = RateLimiter::new(100);
        let org = uuid::Uuid::new_v4();
        let t0 = 1_000 * SEC;
        for i in 0..100 {
            let d = l.check(org, 100, 1, t0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 99 - i);
        }
        let d = l.check(org, 100, 1, t0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 1);
        assert_eq!(d.reset_secs, 60);
        // 0.6 s refills one request at 100/min.
        assert!(l.check(org, 100, 1, t0 + 600_000_000).allowed);
        assert!(!l.check(org, 100, 1, t0 + 600_000_000).allowed);
        // After a minute the full quota is back.
        let d = l.check(org, 100, 1, t0 + 61 * SEC);
        assert!(d.allowed);
        assert_eq!(d.remaining, 99);
    }

    #[test]
    fn admitted_over_a_minute_matches_the_limit() {
        let mut l = RateLimiter::new(100);
        let org = uuid::Uuid::new_v4();
        let mut admitted = 0;
        // 10 requests every 10 ms for 60 s against 1000/min: burst 1000 + refill 1000.
        for step in 0..6000u64 {
            for _ in 0..10 {
                if l.check(org, 1000, 1, step * 10_000_000).allowed {
                    admitted += 1;
                }
            }
        }
        assert!((1990..=2000).contains(&admitted), "{admitted}");
    }

    #[test]
    fn batches_cost_per_item_and_organizations_are_separate() {
        let mut l = RateLimiter::new(100);
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        assert!(l.check(a, 100, 60, 0).allowed);
        assert!(!l.check(a, 100, 41, 0).allowed);
        assert!(l.check(a, 100, 40, 0).allowed);
        assert!(l.check(b, 100, 100, 0).allowed);
    }

    #[test]
    fn grants_take_what_fits_and_refunds_give_it_back() {
        let mut l = RateLimiter::new(100);
        let org = uuid::Uuid::new_v4();
        let (d, n) = l.grant(org, 100, 1, 30, 0);
        assert_eq!((d.allowed, n, d.remaining), (true, 30, 70));
        assert!(l.check(org, 100, 60, 0).allowed);
        // 10 left: a grant of up to 30 gets 10; then nothing fits.
        assert_eq!(l.grant(org, 100, 1, 30, 0).1, 10);
        let (d, n) = l.grant(org, 100, 1, 30, 0);
        assert_eq!((d.allowed, n), (false, 0));
        assert_eq!(d.retry_after_secs, 1);
        // A minimum larger than what fits is refused whole.
        l.refund(org, 100, 5, 0);
        assert_eq!(l.grant(org, 100, 6, 30, 0).1, 0);
        assert_eq!(l.grant(org, 100, 5, 30, 0).1, 5);
        // Refunds never leave more than a full quota.
        l.refund(org, 100, 1_000, 0);
        assert_eq!(l.grant(org, 100, 1, 1_000, 0).1, 100);
    }

    #[test]
    fn very_high_limits_do_not_divide_by_zero() {
        let mut l = RateLimiter::new(16);
        assert!(l.check(uuid::Uuid::new_v4(), u64::MAX, 1, 0).allowed);
    }

    #[test]
    fn state_is_bounded() {
        let mut l = RateLimiter::new(16);
        for i in 0..1000u64 {
            l.check(uuid::Uuid::new_v4(), 100, 1, i * 61 * SEC);
        }
        assert_eq!(l.len(), 16);
    }

    #[test]
    fn a_full_table_of_live_organizations_still_limits_the_next_one() {
        let mut l = RateLimiter::new(16);
        let t0 = 1_000 * SEC;
        // 16 organizations, each with requests charged in the last minute.
        for _ in 0..16 {
            assert!(l.check(uuid::Uuid::new_v4(), 100, 10, t0).allowed);
        }
        assert_eq!(l.len(), 16);
        // The 17th is recorded (another one makes room) and so limited.
        let next = uuid::Uuid::new_v4();
        for i in 0..100 {
            assert!(l.check(next, 100, 1, t0).allowed, "request {i}");
        }
        let d = l.check(next, 100, 1, t0);
        assert!(!d.allowed);
        assert_eq!(d.remaining, 0);
        assert_eq!(l.len(), 16);
        // A stream of new organizations: every one is limited after its quota.
        for _ in 0..50 {
            let org = uuid::Uuid::new_v4();
            assert!(l.check(org, 100, 100, t0).allowed);
            assert!(!l.check(org, 100, 1, t0).allowed);
            assert_eq!(l.len(), 16);
        }
    }

    #[test]
    fn a_full_table_evicts_the_organizations_with_the_least_state() {
        let mut l = RateLimiter::new(64);
        let t0 = 1_000 * SEC;
        // 4 organizations at their limit, then 1000 newcomers spending one
        // request each: a sample of 8 holds a lighter entry to evict unless
        // all 8 are the busy ones ((1/16)^8), so the busy ones stay limited.
        let busy: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
        for &org in &busy {
            assert!(l.check(org, 100, 100, t0).allowed);
        }
        for i in 0..1000 {
            assert!(l.check(uuid::Uuid::new_v4(), 100, 1, t0 + i).allowed);
            assert_eq!(l.len(), 64.min(5 + i as usize));
        }
        for &org in &busy {
            assert!(!l.check(org, 100, 1, t0 + 1000).allowed);
        }
    }
}
