//! Micro-benchmark of the shard's cache-hit authentication: key parsing, the
//! keyed digest of the secret, the key-cache lookup and the rate-limit check,
//! over a cache of 1 000 keys. `cargo run --release --example auth_hit_cost`
//! (or under `valgrind --tool=callgrind` for an instruction count).

use std::rc::Rc;
use std::time::{Duration, Instant};
use triggers::auth::key::{self, SecretDigester};
use triggers::auth::{KeyCache, Lookup, Principal, PrincipalFields};
use triggers::limit::RateLimiter;

fn main() {
    let iterations: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let digester = SecretDigester::random();
    let mut cache = KeyCache::new(100_000, 100_000);
    let mut limiter = RateLimiter::new(100_000);
    let now = Instant::now();
    let keys: Vec<String> = (0..1000)
        .map(|i| {
            let org = uuid::Uuid::new_v4();
            let (key_id, secret, full) = key::generate(org);
            let p = Rc::new(Principal::from(PrincipalFields {
                organization_id: org,
                organization_name: format!("org {i}"),
                tier: "enterprise".into(),
                key_id,
                created_at: String::new(),
                updated_at: String::new(),
                webhook_url: None,
            }));
            cache.insert(
                p,
                digester.digest(&secret),
                [0; 32],
                now + Duration::from_secs(3600),
                None,
                now,
            );
            full
        })
        .collect();
    let start = Instant::now();
    let mut hits = 0u64;
    for i in 0..iterations {
        let raw = &keys[(i % 1000) as usize];
        let Some(k) = key::parse(raw) else { continue };
        let digest = digester.digest(k.secret);
        if let Lookup::Hit(p) = cache.lookup(k.key_id, &digest, now) {
            if limiter
                .check(p.organization_id, 1_000_000_000, 1, i)
                .allowed
            {
                hits += 1;
            }
        }
    }
    let per = start.elapsed().as_nanos() as f64 / iterations as f64;
    assert_eq!(hits, iterations);
    println!(
        "cache-hit authentication: {per:.0} ns per request ({iterations} requests over 1000 keys)"
    );
}
