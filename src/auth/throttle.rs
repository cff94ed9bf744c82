//! The failure throttle of one shard: 401s per client address in the
//! current minute, and the 429 once an address is over its limit. Bounded
//! (`auth.negative_capacity`, at least 16): a failure is always recorded;
//! when the table is full, an address from a random sample makes room (one
//! whose minute is over first, else the one with the fewest failures), so
//! addresses rotated to fill the table neither unthrottle the next one nor
//! cost a scan of the table.

use crate::bounded::BoundedMap;
use std::net::IpAddr;

pub const MINUTE_NS: u64 = 60_000_000_000;

pub struct FailureThrottle {
    /// (start of the address's minute in ns, failures in it).
    counts: BoundedMap<IpAddr, (u64, u32)>,
}

impl FailureThrottle {
    pub fn new(capacity: usize) -> FailureThrottle {
        FailureThrottle {
            counts: BoundedMap::new(capacity.max(16)),
        }
    }

    /// Seconds to wait when `ip` is over `limit` failures this minute.
    pub fn blocked(&self, ip: IpAddr, limit: u32, now_ns: u64) -> Option<u64> {
        let &(start, n) = self.counts.get(&ip)?;
        let elapsed = now_ns.saturating_sub(start);
        (elapsed < MINUTE_NS && n >= limit).then(|| (MINUTE_NS - elapsed).div_ceil(1_000_000_000))
    }

    /// Counts one failure of `ip` at `now_ns`.
    pub fn record(&mut self, ip: IpAddr, now_ns: u64) {
        let over = |start: u64| now_ns.saturating_sub(start) >= MINUTE_NS;
        let e = self.counts.get_or_insert_with(
            ip,
            || (now_ns, 0),
            |&(start, n)| if over(start) { 0 } else { n },
        );
        if over(e.0) {
            *e = (now_ns, 0);
        }
        e.1 = e.1.saturating_add(1);
        debug_assert!(self.counts.len() <= self.counts.capacity());
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn blocks_after_the_limit_for_the_minute() {
        let mut t = FailureThrottle::new(100);
        let ip = v4(1);
        for _ in 0..3 {
            assert_eq!(t.blocked(ip, 3, 0), None);
            t.record(ip, 0);
        }
        assert_eq!(t.blocked(ip, 3, 1_000_000_000), Some(59));
        assert_eq!(t.blocked(ip, 3, MINUTE_NS), None);
        t.record(ip, MINUTE_NS);
        assert_eq!(t.blocked(ip, 3, MINUTE_NS), None);
    }

    #[test]
    fn a_full_table_of_live_addresses_still_throttles_the_next_one() {
        let mut t = FailureThrottle::new(16);
        // 16 addresses, each with a failure this minute.
        for i in 0..16 {
            t.record(v4(i), 0);
        }
        assert_eq!(t.len(), 16);
        let next = v4(1000);
        for _ in 0..5 {
            assert_eq!(t.blocked(next, 5, 0), None);
            t.record(next, 0);
        }
        assert_eq!(t.blocked(next, 5, 0), Some(60));
        assert_eq!(t.len(), 16);
    }

    #[test]
    fn rotating_addresses_evict_each_other_not_the_throttled_one() {
        let mut t = FailureThrottle::new(64);
        let abuser = v4(7);
        for _ in 0..5 {
            t.record(abuser, 0);
        }
        // 10 000 one-failure addresses: the abuser (5 failures) goes only
        // if all 8 sampled indexes are its own, (1/64)^8 per eviction.
        for i in 0..10_000 {
            t.record(v4(100_000 + i), u64::from(i));
            assert!(t.len() <= 64);
        }
        assert_eq!(t.blocked(abuser, 5, 10_000), Some(60));
    }
}
