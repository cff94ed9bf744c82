//! Latency histograms (HdrHistogram, microseconds, 3 significant digits):
//! recording, merging the per-connection ones, and their JSON summary.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// The percentiles listed in the `percentiles` array.
pub const PERCENTILES: [f64; 8] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0];

/// A latency histogram in microseconds; grows to fit any value.
#[derive(Clone, Debug)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new(3).expect("3 significant digits is a valid precision"))
    }
}

impl Latency {
    pub fn record(&mut self, us: u64) {
        // The histogram grows to fit; should that ever fail, clamp instead.
        if self.0.record(us.max(1)).is_err() {
            self.0.saturating_record(us.max(1));
        }
    }

    /// Adds another histogram's counts into this one.
    pub fn merge(&mut self, other: &Latency) {
        // Both auto-resize, so adding cannot fail for lack of range.
        if let Err(e) = self.0.add(&other.0) {
            eprintln!("loadgen: merging histograms: {e:?}");
        }
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The value at percentile `p` (0–100); 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_percentile(p)
        }
    }

    pub fn max(&self) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.max()
        }
    }

    pub fn mean(&self) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.mean()
        }
    }

    /// `p50_us … max_us, mean_us` keys of the JSON result.
    pub fn summary(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for (key, p) in [
            ("p50_us", 50.0),
            ("p75_us", 75.0),
            ("p90_us", 90.0),
            ("p95_us", 95.0),
            ("p99_us", 99.0),
            ("p999_us", 99.9),
            ("p9999_us", 99.99),
        ] {
            m.insert(key.into(), self.percentile(p).into());
        }
        m.insert("max_us".into(), self.max().into());
        m.insert(
            "mean_us".into(),
            ((self.mean() * 10.0).round() / 10.0).into(),
        );
        m
    }

    /// `[{"percentile": 50.0, "us": …}, …]` for [`PERCENTILES`].
    pub fn percentiles(&self) -> Value {
        PERCENTILES
            .iter()
            .map(|&p| json!({"percentile": p, "us": self.percentile(p)}))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_counts_and_keeps_the_tails() {
        let mut a = Latency::default();
        let mut b = Latency::default();
        for _ in 0..990 {
            a.record(100);
        }
        for _ in 0..10 {
            b.record(50_000);
        }
        assert_eq!(a.percentile(99.9), 100);
        let mut total = Latency::default();
        total.merge(&a);
        total.merge(&b);
        assert_eq!(total.count(), 1000);
        assert_eq!(total.percentile(50.0), 100);
        // 1% of the samples are slow: p99 is fast, p99.9 slow.
        assert_eq!(total.percentile(99.0), 100);
        let p999 = total.percentile(99.9);
        assert!((49_950..=50_050).contains(&p999), "p99.9 = {p999}");
        assert!((49_950..=50_050).contains(&total.max()));
        assert!((total.mean() - (990.0 * 100.0 + 10.0 * 50_000.0) / 1000.0).abs() < 10.0);
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        let h = Latency::default();
        let s = h.summary();
        assert_eq!(s["p50_us"], 0);
        assert_eq!(s["max_us"], 0);
        assert_eq!(
            h.percentiles().as_array().map(Vec::len),
            Some(PERCENTILES.len())
        );
    }

    #[test]
    fn zero_is_recorded_as_one_microsecond() {
        let mut h = Latency::default();
        h.record(0);
        assert_eq!((h.count(), h.max()), (1, 1));
    }
}
