//! Command-line options of `loadgen` (clap derive) and their checks: which
//! scenario, closed or open loop, sweep, and where the results go.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// What the connections send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    /// The request given by --method, --path and --body (X-API-Key from --keys).
    Generic,
    /// `POST /api/events` with one small event.
    Single,
    /// `POST /api/events/batch` with --batch-size events.
    Batch,
    /// Producers (single ingest) plus --consumers connections that read the
    /// inbox and bulk-ack what they got.
    Mixed,
    /// Like single, each connection moving to the next key on a new
    /// connection after --per-connection requests (default 100).
    ManyKeys,
}

impl ScenarioName {
    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioName::Generic => "generic",
            ScenarioName::Single => "single",
            ScenarioName::Batch => "batch",
            ScenarioName::Mixed => "mixed",
            ScenarioName::ManyKeys => "many-keys",
        }
    }
}

/// An HTTP/1.1 load generator for the Triggers server: closed loop by
/// default, open loop (fixed schedule, coordinated-omission corrected) with
/// --rate, rate sweeps with --sweep. Prints one JSON line on stdout.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", version)]
pub struct Args {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Request path (generic scenario).
    #[arg(long, default_value = "/health")]
    pub path: String,
    /// Request method (generic scenario).
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Request body, sent as application/json when not empty (generic scenario).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub body: String,
    /// File with one API key per line; each (re)connection takes the next one.
    #[arg(long, value_name = "FILE")]
    pub keys: Option<PathBuf>,
    /// Number of keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Requests per TCP connection before reconnecting with the next key
    /// (0 = never; default 100 for many-keys, 0 otherwise).
    #[arg(long, value_name = "R")]
    pub per_connection: Option<usize>,
    /// Seconds to run (each sweep step runs this long).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of unmeasured load before each measured run (and sweep step).
    #[arg(long, default_value_t = 0.0, value_name = "S")]
    pub warmup: f64,
    /// Worker threads running the connection coroutines.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Open loop: requests per second in total, spread evenly over the
    /// (producer) connections; latency counted from the intended send time.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// What to send.
    #[arg(long, value_enum, default_value_t = ScenarioName::Generic)]
    pub scenario: ScenarioName,
    /// Events per batch request (batch scenario).
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Connections that consume (inbox + ack) in the mixed scenario
    /// (default: a quarter of --connections, at least 1).
    #[arg(long, value_name = "C")]
    pub consumers: Option<usize>,
    /// Open-loop runs at each of these rates in turn, e.g. 500,1000,2000;
    /// prints one JSON line with a `runs` array.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "R1,R2,...",
        conflicts_with = "rate"
    )]
    pub sweep: Vec<f64>,
    /// Also write the JSON result to this file.
    #[arg(long, value_name = "FILE.json")]
    pub out: Option<PathBuf>,
    /// With --sweep: draw latency percentiles against offered load as a PNG.
    #[arg(long, value_name = "FILE.png", requires = "sweep")]
    pub chart: Option<PathBuf>,
    /// TTF/OTF font for the chart's text (default: DejaVu Sans or Liberation
    /// Sans at their usual system paths; no text when none is found).
    #[arg(long, value_name = "FILE")]
    pub font: Option<PathBuf>,
    /// No live progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl Args {
    /// Requests per TCP connection before moving to the next key (0: never).
    pub fn per_connection(&self) -> usize {
        match (self.per_connection, self.scenario) {
            (Some(r), _) => r,
            (None, ScenarioName::ManyKeys) => 100,
            (None, _) => 0,
        }
    }

    /// Consumer connections (mixed scenario only; 0 otherwise).
    pub fn consumers(&self) -> usize {
        match self.scenario {
            ScenarioName::Mixed => self.consumers.unwrap_or((self.connections / 4).max(1)),
            _ => 0,
        }
    }

    /// Rejects combinations that cannot run; the message names the option.
    pub fn check(&self) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if !(self.duration > 0.0 && self.duration.is_finite()) {
            return Err("--duration must be a positive number of seconds".into());
        }
        if !(self.warmup >= 0.0 && self.warmup.is_finite()) {
            return Err("--warmup must be zero or a positive number of seconds".into());
        }
        if self.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        let bad_rate = |r: f64| !(r > 0.0 && r.is_finite());
        if self.rate.is_some_and(bad_rate) || self.sweep.iter().copied().any(bad_rate) {
            return Err("--rate and --sweep rates must be positive".into());
        }
        if self.scenario == ScenarioName::Batch && self.batch_size == 0 {
            return Err("--batch-size must be at least 1".into());
        }
        if self.scenario == ScenarioName::Mixed {
            let c = self.consumers();
            if c == 0 || c >= self.connections {
                return Err(format!(
                    "--consumers must be between 1 and --connections - 1 ({})",
                    self.connections - 1
                ));
            }
        }
        Ok(())
    }
}

/// Reads a keys file: one key per line, blank lines skipped.
pub fn read_keys(path: &std::path::Path) -> Result<Vec<String>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--keys {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}
