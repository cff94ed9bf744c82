//! `loadgen`: the load-generation harness of the Triggers benchmarks. Wires
//! the options to one run or a sweep of open-loop runs, prints exactly one
//! JSON line on stdout (progress and messages go to stderr), and writes the
//! optional `--out` file and `--chart` PNG.
//!
//! loadgen --addr 127.0.0.1:8080 --connections 64 --duration 10
//!         [--scenario generic|single|batch|mixed|many-keys] [--keys FILE]
//!         [--rate R | --sweep R1,R2,... [--chart FILE.png]] [--out FILE.json]
//!         [--warmup S]
//!
//! See `loadgen --help` for every option.

mod args;
mod chart;
mod hist;
mod http;
mod progress;
mod report;
mod run;
mod scenario;
mod schedule;
mod stats;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use args::Args;

fn main() -> ExitCode {
    let a = Args::parse();
    match main_with(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

fn main_with(a: &Args) -> Result<(), String> {
    a.check()?;
    let keys = match &a.keys {
        Some(path) => args::read_keys(path)?,
        None => Vec::new(),
    };
    if keys.is_empty() && scenario::needs_keys(a.scenario) {
        return Err(format!(
            "--scenario {} needs --keys FILE (one API key per line)",
            a.scenario.as_str()
        ));
    }
    let n_keys = keys.len();
    let keys = Arc::new(keys);
    may::config().set_workers(a.workers);

    let result = if a.sweep.is_empty() {
        let r = measure(a, keys, a.rate, "");
        report::run_json(a, &r, n_keys)
    } else {
        let mut runs = Vec::with_capacity(a.sweep.len());
        for (i, &rate) in a.sweep.iter().enumerate() {
            let label = format!("[{}/{} @{rate} req/s] ", i + 1, a.sweep.len());
            let r = measure(a, keys.clone(), Some(rate), &label);
            let v = report::run_json(a, &r, n_keys);
            eprintln!(
                "loadgen: {rate} req/s offered: {} req/s achieved, p50 {} p99 {} p99.9 {}",
                v["rps"], v["p50_us"], v["p99_us"], v["p999_us"]
            );
            runs.push(v);
        }
        if let Some(path) = &a.chart {
            let points = chart::points(&runs);
            chart::draw(path, &points, chart::load_font(a.font.as_deref()))?;
            eprintln!("loadgen: chart written to {}", path.display());
        }
        report::sweep_json(a, runs, n_keys)
    };

    let line = result.to_string();
    println!("{line}");
    if let Some(path) = &a.out {
        std::fs::write(path, format!("{line}\n"))
            .map_err(|e| format!("--out {}: {e}", path.display()))?;
    }
    Ok(())
}

/// One run of `--duration`, after an unmeasured `--warmup` at the same load.
fn measure(a: &Args, keys: Arc<Vec<String>>, rate: Option<f64>, label: &str) -> run::RunResult {
    if a.warmup > 0.0 {
        run::run(
            a,
            keys.clone(),
            rate,
            a.warmup,
            &format!("{label}(warm-up) "),
        );
    }
    run::run(a, keys, rate, a.duration, label)
}
