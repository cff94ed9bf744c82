//! Per-shard counters and gauges, rendered as Prometheus text.
//!
//! Each shard owns one [`ShardMetrics`]; only that shard's thread writes it
//! (a relaxed load and store: no lock-prefixed read-modify-write, no cache
//! line shared between writers). A scrape on any shard reads every shard's
//! values and prints them labelled by shard.

use crate::api::Route;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// A counter written by exactly one thread.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A gauge written by exactly one thread.
#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Status codes with their own series; anything else counts as `other`.
const STATUSES: [u16; 21] = [
    100, 200, 201, 202, 204, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 431, 500, 501,
    503, 504,
];
const STATUS_SLOTS: usize = STATUSES.len() + 1;

fn status_slot(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len())
}

pub struct ShardMetrics {
    pub shard: usize,
    pub core: usize,
    requests: Vec<Counter>,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    pub accept_rescues: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub cross_shard_messages: Counter,
    pub handoffs: Counter,
    pub auth_cache_hits: Counter,
    pub auth_cache_misses: Counter,
    pub lease_hits: Counter,
    pub leases_granted: Counter,
    pub auth_verifications: Counter,
    pub auth_refreshes: Counter,
    pub auth_failures: Counter,
    pub auth_throttled: Counter,
    pub rate_limited: Counter,
    pub events_accepted: Counter,
    pub ack_batches: Counter,
    pub acks_batched: Counter,
}

impl ShardMetrics {
    pub fn new(shard: usize, core: usize) -> ShardMetrics {
        ShardMetrics {
            shard,
            core,
            requests: (0..Route::ALL.len() * STATUS_SLOTS)
                .map(|_| Counter::default())
                .collect(),
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            accept_rescues: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            cross_shard_messages: Counter::default(),
            handoffs: Counter::default(),
            auth_cache_hits: Counter::default(),
            auth_cache_misses: Counter::default(),
            lease_hits: Counter::default(),
            leases_granted: Counter::default(),
            auth_verifications: Counter::default(),
            auth_refreshes: Counter::default(),
            auth_failures: Counter::default(),
            auth_throttled: Counter::default(),
            rate_limited: Counter::default(),
            events_accepted: Counter::default(),
            ack_batches: Counter::default(),
            acks_batched: Counter::default(),
        }
    }

    #[inline]
    pub fn request(&self, route: Route, status: u16) {
        self.requests[route as usize * STATUS_SLOTS + status_slot(status)].inc();
    }

    pub fn requests(&self, route: Route, status: u16) -> u64 {
        self.requests[route as usize * STATUS_SLOTS + status_slot(status)].get()
    }
}

/// A fixed-bucket histogram one thread writes and scrapes read (relaxed
/// atomics: a scrape may see a sample in `count` a moment before `sum`).
pub struct Histogram {
    /// Upper bounds of the buckets, ascending; one more bucket holds the rest.
    bounds: &'static [u64],
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    /// Prometheus text; values are divided by `scale` (1e6 for microseconds → seconds).
    pub fn render(&self, out: &mut String, name: &str, help: &str, scale: f64) {
        family(out, name, "histogram", help);
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Relaxed);
            match self.bounds.get(i) {
                Some(&b) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"{}\"}} {cumulative}",
                        b as f64 / scale
                    );
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Relaxed) as f64 / scale);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every shard's metrics as Prometheus text.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>]) -> String {
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "triggers_http_requests_total",
        "counter",
        "Requests answered, by shard, route and status.",
    );
    for m in shards {
        for route in Route::ALL {
            for (slot, status) in STATUSES
                .iter()
                .map(|s| s.to_string())
                .chain(["other".to_string()])
                .enumerate()
            {
                let n = m.requests[route as usize * STATUS_SLOTS + slot].get();
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "triggers_http_requests_total{{shard=\"{}\",route=\"{}\",status=\"{}\"}} {}",
                        m.shard,
                        route.as_str(),
                        status,
                        n
                    );
                }
            }
        }
    }
    type Read = fn(&ShardMetrics) -> i64;
    let simple: [(&str, &str, &str, Read); 8] = [
        (
            "triggers_connections_open",
            "gauge",
            "Open client connections.",
            |m| m.connections_open.get(),
        ),
        (
            "triggers_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            |m| m.connections_accepted.get() as i64,
        ),
        (
            "triggers_connections_refused_total",
            "counter",
            "Connections closed at once because the shard was at its connection limit.",
            |m| m.connections_refused.get() as i64,
        ),
        (
            "triggers_accept_rescues_total",
            "counter",
            "Connections taken straight from the listen queue after glommio's accept had not delivered them for 200 ms.",
            |m| m.accept_rescues.get() as i64,
        ),
        (
            "triggers_bytes_in_total",
            "counter",
            "Bytes read from clients.",
            |m| m.bytes_in.get() as i64,
        ),
        (
            "triggers_bytes_out_total",
            "counter",
            "Bytes written to clients.",
            |m| m.bytes_out.get() as i64,
        ),
        (
            "triggers_cross_shard_messages_total",
            "counter",
            "Messages a shard sent to another shard to settle a request.",
            |m| m.cross_shard_messages.get() as i64,
        ),
        (
            "triggers_connection_handoffs_total",
            "counter",
            "Connections this shard handed to a key's owner shard (rotation, Idempotency-Key).",
            |m| m.handoffs.get() as i64,
        ),
    ];
    let auth: [(&str, &str, &str, Read); 12] = [
        (
            "triggers_events_accepted_total",
            "counter",
            "Events handed to the persistence core.",
            |m| m.events_accepted.get() as i64,
        ),
        (
            "triggers_ack_batches_total",
            "counter",
            "UPDATE statements that acknowledged a batch of single acks.",
            |m| m.ack_batches.get() as i64,
        ),
        (
            "triggers_acks_batched_total",
            "counter",
            "Single acks sent in those batches.",
            |m| m.acks_batched.get() as i64,
        ),
        (
            "triggers_auth_cache_hits_total",
            "counter",
            "Key lookups answered by the shard's key cache.",
            |m| m.auth_cache_hits.get() as i64,
        ),
        (
            "triggers_auth_cache_misses_total",
            "counter",
            "Key lookups the cache could not answer.",
            |m| m.auth_cache_misses.get() as i64,
        ),
        (
            "triggers_auth_lease_hits_total",
            "counter",
            "Requests for a key another shard owns, served from this shard's lease of it.",
            |m| m.lease_hits.get() as i64,
        ),
        (
            "triggers_auth_leases_granted_total",
            "counter",
            "Leases this shard, as a key's owner, granted to other shards.",
            |m| m.leases_granted.get() as i64,
        ),
        (
            "triggers_auth_verifications_total",
            "counter",
            "Key verifications run on the verifier pool, after coalescing.",
            |m| m.auth_verifications.get() as i64,
        ),
        (
            "triggers_auth_refreshes_total",
            "counter",
            "Re-reads of cached keys' rows, no Argon2: in the background late in the TTL, or before use past it.",
            |m| m.auth_refreshes.get() as i64,
        ),
        (
            "triggers_auth_failures_total",
            "counter",
            "Requests answered 401.",
            |m| m.auth_failures.get() as i64,
        ),
        (
            "triggers_auth_throttled_total",
            "counter",
            "Requests refused for too many failed authentications from their address.",
            |m| m.auth_throttled.get() as i64,
        ),
        (
            "triggers_rate_limited_total",
            "counter",
            "Requests refused by their organization's rate limit.",
            |m| m.rate_limited.get() as i64,
        ),
    ];
    for (name, kind, help, get) in simple.into_iter().chain(auth) {
        family(&mut out, name, kind, help);
        for m in shards {
            let _ = writeln!(
                out,
                "{name}{{shard=\"{}\",core=\"{}\"}} {}",
                m.shard,
                m.core,
                get(m)
            );
        }
    }
    out
}

/// The persistence core's counters and each shard's ring occupancy.
pub fn render_persistence(
    out: &mut String,
    stats: &crate::persist::PersistStats,
    rings: &[crate::persist::Ring],
) {
    use std::sync::atomic::Ordering::Relaxed as R;
    let counters: [(&str, &str, u64); 7] = [
        (
            "triggers_events_committed_total",
            "Events committed to PostgreSQL.",
            stats.events_committed.load(R),
        ),
        (
            "triggers_commit_batches_total",
            "Batches committed (one transaction each).",
            stats.batches_committed.load(R),
        ),
        (
            "triggers_events_failed_total",
            "Events answered 503 because their batch could not be committed in time.",
            stats.events_failed.load(R),
        ),
        (
            "triggers_events_refused_total",
            "Events PostgreSQL refused for their data (their requests got the refusal; the rest of the batch committed).",
            stats.events_refused.load(R),
        ),
        (
            "triggers_events_dropped_total",
            "Events lost after a 202 with ack = \"memory\": refused or not committed in time.",
            stats.events_dropped.load(R),
        ),
        (
            "triggers_commit_errors_total",
            "Failed write attempts: connection or server failures (retried until the commit deadline).",
            stats.commit_errors.load(R),
        ),
        (
            "triggers_last_batch_events",
            "Events in the last committed batch.",
            stats.last_batch_size.load(R),
        ),
    ];
    family(
        out,
        "triggers_commit_seconds_total",
        "counter",
        "Time spent writing and committing batches.",
    );
    let _ = writeln!(
        out,
        "triggers_commit_seconds_total {:.6}",
        stats.commit_micros_total.load(R) as f64 / 1e6
    );
    for (name, help, v) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    }
    stats.commit_latency.render(
        out,
        "triggers_commit_duration_seconds",
        "Time to write and commit one batch.",
        1e6,
    );
    stats.batch_events.render(
        out,
        "triggers_commit_batch_events",
        "Events per committed batch.",
        1.0,
    );
    family(
        out,
        "triggers_ring_events",
        "gauge",
        "Events waiting in each shard's ring to the persistence core.",
    );
    family(
        out,
        "triggers_ring_capacity",
        "gauge",
        "Capacity of each shard's ring.",
    );
    for (shard, ring) in rings.iter().enumerate() {
        let _ = writeln!(
            out,
            "triggers_ring_events{{shard=\"{shard}\"}} {}",
            ring.len()
        );
        let _ = writeln!(
            out,
            "triggers_ring_capacity{{shard=\"{shard}\"}} {}",
            ring.capacity()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn histogram_buckets_are_cumulative() {
        static BOUNDS: &[u64] = &[10, 100];
        let h = Histogram::new(BOUNDS);
        for v in [1, 10, 11, 100, 1000] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help", 1.0);
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"100\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_sum 1122\n"), "{out}");
        assert!(out.contains("x_count 5\n"), "{out}");
    }

    #[test]
    fn renders_labelled_series() {
        let a = Arc::new(ShardMetrics::new(0, 0));
        let b = Arc::new(ShardMetrics::new(1, 1));
        a.request(Route::Health, 200);
        a.request(Route::Health, 200);
        b.request(Route::Unmatched, 404);
        b.request(Route::Unmatched, 599);
        b.connections_open.add(3);
        let text = render(&[a, b]);
        assert!(text.contains(
            "triggers_http_requests_total{shard=\"0\",route=\"/health\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "triggers_http_requests_total{shard=\"1\",route=\"unmatched\",status=\"404\"} 1"
        ));
        assert!(text.contains("status=\"other\"} 1"));
        assert!(text.contains("triggers_connections_open{shard=\"1\",core=\"1\"} 3"));
    }
}
