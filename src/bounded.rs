//! The bounded map behind the shards' tables (rate limiter, failure
//! throttle, key cache, leases): O(1) lookups, inserts and removals, and at
//! capacity a new entry makes room by evicting the entry the caller ranks
//! lowest among a few sampled at random. Never a scan of the whole table,
//! and a new entry is always recorded: a full table never admits what it
//! does not hold. Shard-owned (no locks); the sampling generator is a
//! xorshift, nothing secret depends on it.

use indexmap::IndexMap;
use std::hash::Hash;

/// Entries compared to choose the one a full map evicts.
pub const SAMPLE: usize = 8;

pub struct BoundedMap<K, V> {
    map: IndexMap<K, V, ahash::RandomState>,
    capacity: usize,
    rng: u64,
}

impl<K: Hash + Eq, V> BoundedMap<K, V> {
    /// A map of at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> BoundedMap<K, V> {
        BoundedMap {
            map: IndexMap::with_hasher(ahash::RandomState::new()),
            capacity: capacity.max(1),
            rng: rand::random::<u64>() | 1,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.map.get_mut(k)
    }

    pub fn contains_key(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.map.swap_remove(k)
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Keeps the entries `keep` accepts. A scan of the whole map: for
    /// invalidations, never for the request path.
    pub fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep);
    }

    /// Sets `k` to `v`. A new key in a full map first evicts the sampled
    /// entry of least `rank`.
    pub fn insert<R: Ord>(&mut self, k: K, v: V, rank: impl Fn(&V) -> R) {
        match self.map.get_index_of(&k) {
            Some(i) => self.map[i] = v,
            None => {
                self.make_room(rank);
                self.map.insert(k, v);
            }
        }
        debug_assert!(self.map.len() <= self.capacity);
    }

    /// The value of `k`, inserting `make()` first when absent (evicting as
    /// [`BoundedMap::insert`] does).
    pub fn get_or_insert_with<R: Ord>(
        &mut self,
        k: K,
        make: impl FnOnce() -> V,
        rank: impl Fn(&V) -> R,
    ) -> &mut V {
        let i = match self.map.get_index_of(&k) {
            Some(i) => i,
            None => {
                self.make_room(rank);
                self.map.insert_full(k, make()).0
            }
        };
        debug_assert!(self.map.len() <= self.capacity);
        &mut self.map[i]
    }

    /// At capacity, evicts the lowest-ranked of `SAMPLE` random entries.
    fn make_room<R: Ord>(&mut self, rank: impl Fn(&V) -> R) {
        let n = self.map.len();
        if n < self.capacity {
            return;
        }
        let mut sample = [0usize; SAMPLE];
        for slot in &mut sample {
            *slot = self.next_index(n);
        }
        let victim = sample.into_iter().min_by_key(|&i| rank(&self.map[i]));
        if let Some(i) = victim {
            self.map.swap_remove_index(i);
        }
    }

    /// A random index below `n` (xorshift64, then a multiply-shift).
    fn next_index(&mut self, n: usize) -> usize {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        ((u128::from(x) * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_its_capacity_and_always_records_the_new_entry() {
        let mut m = BoundedMap::new(16);
        for i in 0..1000u32 {
            m.insert(i, i, |&v| v);
            assert!(m.len() <= 16);
            assert_eq!(m.get(&i), Some(&i), "entry {i} recorded");
        }
        assert_eq!(m.len(), 16);
        *m.get_or_insert_with(5000, || 0, |&v| v) += 7;
        assert_eq!(m.get(&5000), Some(&7));
        assert_eq!(m.len(), 16);
        // An existing key is updated in place, nothing evicted.
        let before: Vec<u32> = (0..6000).filter(|k| m.contains_key(k)).collect();
        m.insert(5000, 1, |&v| v);
        let after: Vec<u32> = (0..6000).filter(|k| m.contains_key(k)).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn evicts_low_ranked_entries_and_keeps_the_heavy_ones() {
        // 4 heavy entries among 64: a sample of 8 is all heavy with
        // probability (1/16)^8, so in 10 000 evictions none goes.
        let mut m = BoundedMap::new(64);
        for k in 0..4u32 {
            m.insert(k, u64::MAX, |&v| v);
        }
        for k in 4..10_004u32 {
            m.insert(k, u64::from(k), |&v| v);
        }
        assert_eq!(m.len(), 64);
        for k in 0..4 {
            assert_eq!(m.get(&k), Some(&u64::MAX), "heavy entry {k} kept");
        }
        assert!(m.remove(&0).is_some());
        assert_eq!(m.len(), 63);
        m.retain(|&k, _| k > 5000);
        assert!(m.len() < 63);
    }
}
