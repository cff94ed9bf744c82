//! Open-loop pacing (the wrk2 approach): each connection owns a fixed
//! schedule of intended send times, and latency is counted from the
//! intended time, so requests queued behind a stalled response are charged
//! for the wait (coordinated-omission correction). Times here are offsets
//! from the start of the run, which keeps the logic pure and testable.

use std::time::Duration;

/// The send times of one connection: `offset + i * interval`.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    offset: Duration,
    interval: Duration,
}

impl Schedule {
    /// Connection `index` of `connections` sharing `rate` requests/s in
    /// total: each sends every `connections / rate` s, the connections
    /// staggered evenly within one interval.
    pub fn for_connection(rate: f64, connections: usize, index: usize) -> Schedule {
        let interval = Duration::from_secs_f64(connections as f64 / rate);
        let offset = interval.mul_f64(index as f64 / connections as f64);
        Schedule { offset, interval }
    }

    /// When request `i` (0-based) of this connection is meant to be sent.
    pub fn intended(&self, i: u64) -> Duration {
        self.offset + self.interval.mul_f64(i as f64)
    }
}

/// The three instants of one request, as offsets from the run's start.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// When the schedule wanted it sent (closed loop: when it was sent).
    pub intended: Duration,
    /// When it was written.
    pub sent: Duration,
    /// When its response was complete.
    pub done: Duration,
}

impl Timing {
    /// A closed-loop request: intended = sent.
    pub fn unscheduled(sent: Duration, done: Duration) -> Timing {
        Timing {
            intended: sent,
            sent,
            done,
        }
    }

    /// Latency from the intended send time (what a user on the schedule saw).
    pub fn corrected_us(&self) -> u64 {
        micros(self.done.saturating_sub(self.intended))
    }

    /// Latency from the actual send time (what the server's queue saw).
    pub fn uncorrected_us(&self) -> u64 {
        micros(self.done.saturating_sub(self.sent))
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Kind;
    use crate::stats::Stats;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn connections_share_the_rate_evenly() {
        // 1000 req/s over 4 connections: each every 4 ms, staggered by 1 ms.
        let s: Vec<Schedule> = (0..4)
            .map(|i| Schedule::for_connection(1000.0, 4, i))
            .collect();
        assert_eq!(s[0].intended(0), Duration::ZERO);
        assert_eq!(s[0].intended(1), 4 * MS);
        assert_eq!(s[1].intended(0), MS);
        assert_eq!(s[3].intended(2), 11 * MS);
        let mut all: Vec<Duration> = s
            .iter()
            .flat_map(|s| (0..250).map(|i| s.intended(i)))
            .collect();
        all.sort();
        assert_eq!(all.len(), 1000);
        assert!(all.windows(2).all(|w| w[1] - w[0] == MS));
    }

    /// Runs one connection's schedule against a server whose service time
    /// for request i is `service(i)`: a request is sent at its intended time,
    /// or when the previous response arrives if that is later (one request
    /// in flight per connection, as the real loop does).
    fn simulate(schedule: Schedule, n: u64, service: impl Fn(u64) -> Duration) -> Stats {
        let mut stats = Stats::default();
        let mut free_at = Duration::ZERO;
        for i in 0..n {
            let intended = schedule.intended(i);
            let sent = intended.max(free_at);
            let done = sent + service(i);
            free_at = done;
            stats.record(
                Kind::Ingest,
                202,
                Timing {
                    intended,
                    sent,
                    done,
                },
                1,
            );
        }
        stats
    }

    #[test]
    fn a_stall_is_charged_to_the_requests_queued_behind_it() {
        // 1 connection at 1000 req/s for 1 s; each answer takes 100 us except
        // request 100, which stalls for 100 ms. The ~100 requests meant to be
        // sent during the stall wait for it.
        let schedule = Schedule::for_connection(1000.0, 1, 0);
        let stats = simulate(schedule, 1000, |i| {
            if i == 100 {
                100 * MS
            } else {
                Duration::from_micros(100)
            }
        });
        let k = &stats.kinds[&Kind::Ingest];
        assert_eq!(k.corrected.count(), 1000);
        assert_eq!(k.uncorrected.count(), 1000);
        // Uncorrected: only the stalled request itself is slow.
        assert_eq!(k.uncorrected.percentile(50.0), 100);
        assert_eq!(k.uncorrected.percentile(99.0), 100);
        assert!(k.uncorrected.max() >= 99_000);
        // Corrected: the queued requests (about 10% of the run) are slow too,
        // their latency falling from ~100 ms down as the backlog drains.
        assert_eq!(k.corrected.percentile(50.0), 100);
        let p90 = k.corrected.percentile(90.0);
        let p95 = k.corrected.percentile(95.0);
        let p99 = k.corrected.percentile(99.0);
        assert!((1_000..30_000).contains(&p90), "corrected p90 = {p90}");
        assert!((30_000..80_000).contains(&p95), "corrected p95 = {p95}");
        assert!(p99 >= 80_000, "corrected p99 = {p99}");
        assert!(k.corrected.max() >= 99_000);
        assert!(k.corrected.mean() > 10.0 * k.uncorrected.mean());
    }

    #[test]
    fn without_a_stall_corrected_equals_uncorrected() {
        let schedule = Schedule::for_connection(100.0, 1, 0);
        let stats = simulate(schedule, 200, |_| Duration::from_micros(250));
        let k = &stats.kinds[&Kind::Ingest];
        for p in [50.0, 99.0, 100.0] {
            assert_eq!(k.corrected.percentile(p), k.uncorrected.percentile(p));
        }
        assert_eq!(k.corrected.percentile(100.0), 250);
    }

    #[test]
    fn closed_loop_timing_has_no_correction() {
        let t = Timing::unscheduled(5 * MS, 7 * MS);
        assert_eq!((t.corrected_us(), t.uncorrected_us()), (2000, 2000));
    }
}
