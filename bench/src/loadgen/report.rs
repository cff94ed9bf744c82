//! The JSON result of a run (and of a sweep): the keys the bench scripts
//! read (`requests, errors, statuses, rps, p50_us, p99_us, p999_us, max_us,
//! connections, keys`) plus the HDR percentiles, the uncorrected latency,
//! per-kind figures and event throughput.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::args::Args;
use crate::run::RunResult;
use crate::scenario::{self, Kind};
use crate::stats::KindStats;

fn statuses(s: &BTreeMap<u16, u64>) -> Value {
    s.iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect::<Map<_, _>>()
        .into()
}

fn per_s(n: u64, elapsed: f64) -> f64 {
    if elapsed > 0.0 {
        (n as f64 / elapsed * 10.0).round() / 10.0
    } else {
        0.0
    }
}

/// Counts and corrected latency of one kind (or of the total).
fn kind_json(k: &KindStats, elapsed: f64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("requests".into(), k.requests().into());
    m.insert("errors".into(), k.errors.into());
    m.insert("unfinished".into(), k.unfinished.into());
    m.insert("statuses".into(), statuses(&k.statuses));
    m.insert("rps".into(), per_s(k.requests(), elapsed).into());
    m.extend(k.corrected.summary());
    m
}

/// One run's result object.
pub fn run_json(a: &Args, r: &RunResult, keys: usize) -> Value {
    let total = r.stats.total();
    let mut m = kind_json(&total, r.elapsed);
    m.insert("scenario".into(), a.scenario.as_str().into());
    m.insert(
        "mode".into(),
        if r.rate.is_some() { "open" } else { "closed" }.into(),
    );
    m.insert(
        "offered_rps".into(),
        r.rate.map_or(Value::Null, Value::from),
    );
    m.insert(
        "duration_s".into(),
        ((r.elapsed * 1000.0).round() / 1000.0).into(),
    );
    m.insert("percentiles".into(), total.corrected.percentiles());
    let mut unc = total.uncorrected.summary();
    unc.insert("percentiles".into(), total.uncorrected.percentiles());
    m.insert("uncorrected".into(), unc.into());
    let kinds: Map<String, Value> = r
        .stats
        .kinds
        .iter()
        .map(|(kind, k)| (kind.as_str().to_string(), kind_json(k, r.elapsed).into()))
        .collect();
    m.insert("kinds".into(), kinds.into());
    if scenario::ingests(a.scenario) {
        let events = r.stats.events(Kind::Ingest) + r.stats.events(Kind::Batch);
        m.insert("events".into(), events.into());
        m.insert("events_per_s".into(), per_s(events, r.elapsed).into());
    }
    if a.consumers() > 0 {
        let acked = r.stats.events(Kind::Ack);
        m.insert("acked".into(), acked.into());
        m.insert("acked_per_s".into(), per_s(acked, r.elapsed).into());
        m.insert("consumers".into(), a.consumers().into());
    }
    if a.scenario == crate::args::ScenarioName::Batch {
        m.insert("batch_size".into(), a.batch_size.into());
    }
    m.insert("connections".into(), a.connections.into());
    m.insert("per_connection".into(), a.per_connection().into());
    m.insert("keys".into(), keys.into());
    m.into()
}

/// A sweep's result: the runs, one per rate.
pub fn sweep_json(a: &Args, runs: Vec<Value>, keys: usize) -> Value {
    json!({
        "mode": "sweep",
        "scenario": a.scenario.as_str(),
        "rates": a.sweep,
        "duration_s": a.duration,
        "connections": a.connections,
        "keys": keys,
        "runs": runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunResult;
    use crate::schedule::Timing;
    use crate::stats::Stats;
    use clap::Parser;
    use std::time::Duration;

    #[test]
    fn run_json_keeps_the_keys_the_scripts_read() {
        let a = Args::parse_from(["loadgen", "--scenario", "batch", "--connections", "2"]);
        let mut stats = Stats::default();
        let t = Timing {
            intended: Duration::ZERO,
            sent: Duration::from_millis(1),
            done: Duration::from_micros(1500),
        };
        stats.record(Kind::Batch, 202, t, 100);
        stats.record(Kind::Batch, 202, t, 99);
        stats.error(Kind::Batch);
        let r = RunResult {
            stats,
            elapsed: 2.0,
            rate: Some(10.0),
        };
        let v = run_json(&a, &r, 1);
        for key in [
            "requests",
            "errors",
            "statuses",
            "rps",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "p9999_us",
            "max_us",
            "mean_us",
            "percentiles",
            "uncorrected",
            "kinds",
            "connections",
            "keys",
            "mode",
            "offered_rps",
            "events",
            "events_per_s",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["requests"], 2);
        assert_eq!(v["errors"], 1);
        assert_eq!(v["statuses"]["202"], 2);
        assert_eq!(v["rps"], 1.0);
        assert_eq!(v["mode"], "open");
        assert_eq!(v["events"], 199);
        assert_eq!(v["events_per_s"], 99.5);
        assert_eq!(v["p99_us"], 1500);
        assert_eq!(v["uncorrected"]["p99_us"], 500);
        assert_eq!(v["kinds"]["batch"]["requests"], 2);
        assert_eq!(v["percentiles"][7]["percentile"], 100.0);
    }
}
