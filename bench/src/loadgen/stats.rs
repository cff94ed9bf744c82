//! What a run counted, per kind of request: responses by status, errors,
//! unfinished requests, events moved, and corrected/uncorrected latency.
//! Each connection keeps its own `Stats`; they are merged at the end.

use std::collections::BTreeMap;

use crate::hist::Latency;
use crate::scenario::Kind;
use crate::schedule::Timing;

/// The counts of one kind of request.
#[derive(Clone, Debug, Default)]
pub struct KindStats {
    /// Latency from the intended send time (= uncorrected in closed loop).
    pub corrected: Latency,
    /// Latency from the actual send time.
    pub uncorrected: Latency,
    pub statuses: BTreeMap<u16, u64>,
    /// Connect/write/read failures and malformed responses.
    pub errors: u64,
    /// Requests still unanswered when the run's grace time ran out.
    pub unfinished: u64,
    /// Events accepted (ingest, batch) or acknowledged (ack).
    pub events: u64,
}

impl KindStats {
    /// Responses received (each counted under its status).
    pub fn requests(&self) -> u64 {
        self.statuses.values().sum()
    }

    pub fn merge(&mut self, o: &KindStats) {
        self.corrected.merge(&o.corrected);
        self.uncorrected.merge(&o.uncorrected);
        for (status, n) in &o.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        self.errors += o.errors;
        self.unfinished += o.unfinished;
        self.events += o.events;
    }
}

/// All kinds of one connection, or of a whole run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub kinds: BTreeMap<Kind, KindStats>,
}

impl Stats {
    fn kind(&mut self, kind: Kind) -> &mut KindStats {
        self.kinds.entry(kind).or_default()
    }

    /// A response with `status`, its timing, and the events it moved.
    pub fn record(&mut self, kind: Kind, status: u16, t: Timing, events: u64) {
        let k = self.kind(kind);
        k.corrected.record(t.corrected_us());
        k.uncorrected.record(t.uncorrected_us());
        *k.statuses.entry(status).or_default() += 1;
        k.events += events;
    }

    pub fn error(&mut self, kind: Kind) {
        self.kind(kind).errors += 1;
    }

    pub fn unfinished(&mut self, kind: Kind) {
        self.kind(kind).unfinished += 1;
    }

    pub fn merge(&mut self, o: &Stats) {
        for (kind, k) in &o.kinds {
            self.kind(*kind).merge(k);
        }
    }

    /// Every kind added together.
    pub fn total(&self) -> KindStats {
        let mut t = KindStats::default();
        for k in self.kinds.values() {
            t.merge(k);
        }
        t
    }

    /// Events of one kind (0 when that kind never ran).
    pub fn events(&self, kind: Kind) -> u64 {
        self.kinds.get(&kind).map_or(0, |k| k.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_connection_stats_merge_by_kind() {
        let t = |us| Timing::unscheduled(Duration::ZERO, Duration::from_micros(us));
        let mut a = Stats::default();
        a.record(Kind::Ingest, 202, t(100), 1);
        a.record(Kind::Ingest, 503, t(300), 0);
        a.error(Kind::Ingest);
        let mut b = Stats::default();
        b.record(Kind::Ingest, 202, t(200), 1);
        b.record(Kind::Ack, 200, t(1000), 57);
        b.unfinished(Kind::Ack);
        let mut run = Stats::default();
        run.merge(&a);
        run.merge(&b);
        let ingest = &run.kinds[&Kind::Ingest];
        assert_eq!(ingest.requests(), 3);
        assert_eq!(ingest.statuses[&202], 2);
        assert_eq!((ingest.errors, ingest.events), (1, 2));
        assert_eq!(ingest.corrected.max(), 300);
        assert_eq!(run.events(Kind::Ack), 57);
        let total = run.total();
        assert_eq!(
            (total.requests(), total.errors, total.unfinished),
            (4, 1, 1)
        );
        assert_eq!(total.corrected.count(), 4);
        assert_eq!(total.corrected.max(), 1000);
    }
}
