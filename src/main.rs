//! The `triggers` command: `serve` (the server), `migrate` (apply the embedded
//! schema migrations). Configuration comes from `Config::load`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use triggers::config::Config;
use triggers::topology::{host_cores, CorePlan};

#[derive(Parser)]
#[command(
    name = "triggers",
    version,
    about = "A thread-per-core event-ingestion server backed by PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded PostgreSQL unless database.url is set).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on (overrides `listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Print the effective configuration (secrets masked) and the core plan, then exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Apply the embedded schema migrations and exit.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory (embedded PostgreSQL, lock file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PostgreSQL URL (overrides `database.url`).
    #[arg(long)]
    database_url: Option<String>,
    /// Any setting, as `section.key=value` (repeatable), e.g. `--set cores.shards=[0,1]`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl Common {
    fn load(&self, listen: Option<&String>) -> Result<(Config, CorePlan), String> {
        let mut overrides = Vec::new();
        for s in &self.set {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set {s}: expected section.key=value"))?;
            overrides.push((k.trim().to_string(), v.trim().to_string()));
        }
        if let Some(l) = listen {
            overrides.push(("listen".into(), l.clone()));
        }
        if let Some(d) = &self.data_dir {
            overrides.push(("data_dir".into(), d.display().to_string()));
        }
        if let Some(u) = &self.database_url {
            overrides.push(("database.url".into(), u.clone()));
        }
        let (config, warnings) = Config::load(self.config.as_deref(), std::env::vars(), &overrides)
            .map_err(|e| e.to_string())?;
        for w in warnings {
            eprintln!("warning: {w}");
        }
        let plan = CorePlan::new(&config.cores, &host_cores()).map_err(|e| e.to_string())?;
        Ok((config, plan))
    }
}

/// `RUST_LOG` sets levels (default `info`). The PostgreSQL client logs
/// statement parameters at debug level (key hashes, payloads): it stays at
/// `info` unless `RUST_LOG` names it explicitly.
fn init_logging() {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .filter_module("tokio_postgres", log::LevelFilter::Info)
        .filter_module("postgres", log::LevelFilter::Info)
        .parse_env(env_logger::Env::default())
        .format_timestamp_micros()
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            common,
            listen,
            print_config,
        } => {
            let (config, plan) = match common.load(listen.as_ref()) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            if print_config {
                print!("{}", config.to_masked_toml());
                println!("\n# core plan: {}", plan.describe());
                return ExitCode::SUCCESS;
            }
            init_logging();
            match triggers::server::serve(config, plan) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate { common } => {
            let (config, _) = match common.load(None) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            init_logging();
            match triggers::server::migrate_only(&config) {
                Ok(applied) => {
                    println!("migrations applied: {applied:?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
