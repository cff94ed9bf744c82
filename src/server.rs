//! Start-up and shutdown of `triggers serve`: lock the data directory, bring
//! up PostgreSQL (the embedded cluster when no URL is configured), migrate,
//! start the query workers and the shards, wait for SIGINT/SIGTERM, then stop
//! everything in reverse order and exit 0.

use crate::api::Shared;
use crate::auth::key::{HashParams, SecretDigester};
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::shard;
use crate::store::local_cluster::{self, LocalCluster};
use crate::store::{migrations, DbSettings, QueryPool, StoreError};
use crate::topology::CorePlan;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("data directory {path} is in use by another triggers process{pid}")]
    DataDirInUse { path: String, pid: String },
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cluster(#[from] local_cluster::ClusterError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Shard(#[from] shard::ShardError),
    #[error("{0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("a shard stopped unexpectedly (see the log above)")]
    ShardFailed,
    #[error("signals: {0}")]
    Signals(std::io::Error),
}

/// An exclusive `flock` on `<data_dir>/triggers.lock`, released when dropped
/// (and by the kernel if the process dies).
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(dir: &Path) -> Result<DataDirLock, ServeError> {
        let io = |source| ServeError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("triggers.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let pid = pid.trim();
            return Err(ServeError::DataDirInUse {
                path: dir.display().to_string(),
                pid: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        file.set_len(0).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}

/// Brings up the database: the embedded cluster when `database.url` is empty.
pub fn open_database(config: &Config) -> Result<(DbSettings, Option<LocalCluster>), ServeError> {
    let connect_timeout = Duration::from_millis(config.database.connect_timeout_ms);
    if !config.database.url.is_empty() {
        let settings = DbSettings {
            url: config.database.url.clone(),
            connect_timeout,
        };
        return Ok((settings, None));
    }
    let t = Instant::now();
    let mut cluster = LocalCluster::open(&config.data_dir, &config.database.pg_bin_dir)?;
    cluster.start()?;
    log::info!(
        "embedded PostgreSQL started in {:.1} s on 127.0.0.1:{} (data in {})",
        t.elapsed().as_secs_f64(),
        cluster.port(),
        cluster.pgdata().display()
    );
    let settings = DbSettings {
        url: cluster.url(local_cluster::DATABASE),
        connect_timeout,
    };
    Ok((settings, Some(cluster)))
}

/// Runs the server until SIGINT or SIGTERM.
pub fn serve(config: Config, plan: CorePlan) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let addr = config.listen_addr()?;
    let engine = crate::engine::choose(&config.engine)?;
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    // Fail at once if another process (without SO_REUSEPORT sharing) holds the port.
    std::net::TcpListener::bind(addr).map_err(|source| ServeError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(ServeError::Signals)?;
    if config.auth.admin_token.is_empty() {
        log::warn!(
            "auth.admin_token is not set: anyone who reaches this server can create organizations"
        );
    }
    let (settings, mut cluster) = open_database(&config)?;
    let hash_params = HashParams {
        memory_kib: config.auth.argon2_memory_kib,
        iterations: config.auth.argon2_iterations,
        parallelism: config.auth.argon2_parallelism,
    };
    let mut first_key = None;
    {
        let mut client = settings.connect()?;
        if config.database.migrate_on_start {
            let applied = migrations::migrate(&mut client)?;
            if !applied.is_empty() {
                log::info!("applied migrations {applied:?}");
            }
        }
        // A fresh embedded database gets one organization, so the printed
        // curl line works at once.
        if cluster.is_some() {
            let orgs: i64 = client
                .query_one("SELECT count(*) FROM organizations", &[])
                .map_err(StoreError::from)?
                .get(0);
            if orgs == 0 {
                first_key = Some(crate::store::orgs::create(
                    &mut client,
                    "default",
                    "pro",
                    hash_params,
                )?);
            }
        }
    }
    let (queries, mut workers) = QueryPool::start(
        "query",
        settings.clone(),
        config.database.query_workers,
        config.database.query_queue,
        plan.worker_core(),
    );
    let (verifier, verify_workers) = QueryPool::start(
        "verify",
        settings.clone(),
        config.auth.verify_workers,
        config.auth.verify_queue,
        plan.worker_core(),
    );
    workers.extend(verify_workers);
    let (invalidation_tx, invalidation_rx): (Vec<_>, Vec<_>) = plan
        .shards
        .iter()
        .map(|_| futures::channel::mpsc::unbounded())
        .unzip();
    let listener_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let invalidations = invalidation_tx.clone();
    let listener =
        crate::auth::invalidation::start(settings.clone(), invalidation_tx, listener_stop.clone());
    let mut persistence = crate::persist::PersistenceCore::start(crate::persist::Settings {
        db: settings.clone(),
        shards: plan.shards.len(),
        ring_capacity: config.ingest.ring_capacity,
        max_batch: config.ingest.max_batch,
        writers: config.ingest.writers,
        commit_timeout: Duration::from_millis(config.ingest.commit_timeout_ms),
        core: plan.pin.then_some(plan.persistence),
        memory_ack: config.ingest.ack == "memory",
    });
    log::info!("core plan: {}", plan.describe());
    let metrics = plan
        .shards
        .iter()
        .enumerate()
        .map(|(id, &core)| Arc::new(ShardMetrics::new(id, core)))
        .collect();
    let shared = Arc::new(Shared {
        config,
        plan,
        started: Instant::now(),
        engine,
        queries,
        verifier,
        hash_params,
        digester: SecretDigester::random(),
        rings: persistence.rings.clone(),
        persist_stats: persistence.stats.clone(),
        metrics,
        invalidations,
    });
    let completions = persistence
        .completions
        .iter_mut()
        .map(|c| c.take().expect("each shard's completions are taken once"))
        .collect();
    let shards = shard::start(shared.clone(), addr, invalidation_rx, completions)?;
    log::info!(
        "ready: listening on http://{addr} with {} shard(s)",
        shared.plan.shards.len()
    );
    println!("Triggers is listening on http://{addr}");
    match &first_key {
        Some(o) => {
            println!(
                "A first organization was created (tier {}). Its API key, shown only this once:",
                o.tier
            );
            println!("  {}", o.api_key);
            println!("Try it:");
            println!(
                "  curl -H 'X-API-Key: {}' http://{addr}/api/keys",
                o.api_key
            );
        }
        None => {
            println!("Create an organization and its API key:");
            println!(
                "  curl -X POST http://{addr}/api/keys/generate -H 'Content-Type: application/json' -d '{{\"organization_name\": \"Acme\"}}'"
            );
        }
    }
    println!("  curl http://{addr}/health");
    let signal = signals.forever().next();
    log::info!("signal {signal:?}: shutting down");
    shards.shutdown();
    drop(shared);
    // Every event queued before the shards stopped is committed (or answered) first.
    persistence.stop();
    for w in workers {
        let _ = w.join();
    }
    listener_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = listener.join();
    if let Some(c) = cluster.as_mut() {
        c.stop()?;
        log::info!("embedded PostgreSQL stopped");
    }
    if shard::SHARD_FAILED.load(std::sync::atomic::Ordering::Acquire) {
        return Err(ServeError::ShardFailed);
    }
    log::info!("stopped");
    Ok(())
}

/// `triggers migrate`: applies migrations and exits.
pub fn migrate_only(config: &Config) -> Result<Vec<i32>, ServeError> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let (settings, _cluster) = open_database(config)?;
    let mut client = settings.connect()?;
    Ok(migrations::migrate(&mut client)?)
}
