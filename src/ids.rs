//! Event ids: UUIDv7 minted on the shard that accepts the event, without a
//! system call per id. Each shard owns one `IdMint`: 48 bits of Unix
//! milliseconds, then a 12-bit counter that keeps ids from one shard strictly
//! increasing within a millisecond, then 62 random bits from a userspace
//! generator seeded once from the operating system.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

pub struct IdMint {
    last_ms: u64,
    counter: u16,
    rng: StdRng,
}

impl Default for IdMint {
    fn default() -> Self {
        IdMint {
            last_ms: 0,
            counter: 0,
            rng: StdRng::from_entropy(),
        }
    }
}

impl IdMint {
    /// The next id for an event created at `unix_ms`.
    pub fn next(&mut self, unix_ms: u64) -> Uuid {
        if unix_ms > self.last_ms {
            self.last_ms = unix_ms;
            // Start low in the counter space so a burst rarely spills over.
            self.counter = self.rng.gen::<u16>() & 0x3ff;
        } else if self.counter >= 0xfff {
            // 4 096 ids in one millisecond: borrow the next millisecond.
            self.last_ms += 1;
            self.counter = 0;
        } else {
            self.counter += 1;
        }
        debug_assert!(self.counter <= 0xfff);
        let hi = (self.last_ms & 0xffff_ffff_ffff) << 16 | 0x7000 | u64::from(self.counter);
        let lo = (self.rng.gen::<u64>() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        Uuid::from_u64_pair(hi, lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_increasing_and_carry_the_time() {
        let mut m = IdMint::default();
        let mut last = Uuid::nil();
        for i in 0..10_000u64 {
            let ms = 1_700_000_000_000 + i / 5000;
            let id = m.next(ms);
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            assert!(id > last, "{id} after {last}");
            let (secs, nanos) = id.get_timestamp().expect("v7 timestamp").to_unix();
            assert!(secs * 1000 + u64::from(nanos / 1_000_000) >= ms);
            last = id;
        }
    }

    #[test]
    fn a_full_millisecond_spills_into_the_next() {
        let mut m = IdMint::default();
        let ids: Vec<Uuid> = (0..10_000).map(|_| m.next(5)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }
}
