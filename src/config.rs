//! One `Config` for the whole server. Sources, later wins: built-in defaults <
//! the TOML file (`--config`) < `TRIGGERS_<SECTION>_<KEY>` environment
//! variables (`TRIGGERS_<KEY>` for top-level keys) < command-line flags
//! (`--listen`, `--data-dir`, `--set section.key=value`). The merged value is
//! validated once at start; a bad value stops the server naming key and value.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address every shard listens on (`SO_REUSEPORT`).
    pub listen: String,
    /// `auto` | `glommio` | `may`.
    pub engine: String,
    /// Where the embedded PostgreSQL cluster and the lock file live.
    pub data_dir: PathBuf,
    pub cores: CoresConfig,
    pub http: HttpConfig,
    pub ingest: IngestConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub delivery: DeliveryConfig,
    pub ops: OpsConfig,
}

/// `"auto"` or an explicit list of core ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CoreList {
    Named(String),
    Ids(Vec<usize>),
}

/// `"auto"` or one core id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CoreChoice {
    Named(String),
    Id(usize),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoresConfig {
    pub shards: CoreList,
    pub persistence: CoreChoice,
    pub delivery: CoreChoice,
    /// Pin shards and the persistence and delivery threads to their cores.
    pub pin: bool,
    /// How long an idle shard spins before sleeping in the kernel (µs).
    pub spin_before_park_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub max_header_bytes: usize,
    /// A request must be complete this long after its first byte, else 408.
    pub request_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this long.
    pub idle_timeout_ms: u64,
    pub max_connections_per_shard: usize,
    pub listen_backlog: u32,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// After answering, poll the socket this long (µs) before parking the
    /// connection on io_uring, when the shard has at most
    /// `busy_poll_max_connections` connections. 0 turns it off.
    pub busy_poll_us: u64,
    pub busy_poll_max_connections: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// `durable` (202 after commit) | `memory` (202 after enqueue).
    pub ack: String,
    pub max_body_bytes: usize,
    pub max_batch_body_bytes: usize,
    pub max_payload_bytes: usize,
    pub ring_capacity: usize,
    pub max_batch: usize,
    /// Transactions the persistence core keeps in flight: each writer has its
    /// own PostgreSQL connection and takes the next batch while the others
    /// wait for their commits, so fsyncs overlap (PostgreSQL group commit).
    pub writers: usize,
    /// How long the persistence core retries a batch before answering 503
    /// for it. Shards wait for an answer at least a second longer.
    pub commit_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL; empty means the embedded cluster under `data_dir`.
    pub url: String,
    pub query_workers: usize,
    /// Jobs waiting for a query worker before shards answer 503.
    pub query_queue: usize,
    pub migrate_on_start: bool,
    pub connect_timeout_ms: u64,
    /// Directory holding `initdb`/`pg_ctl`; empty means search the usual places.
    pub pg_bin_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A cached key is re-read from the database after this long.
    pub cache_ttl_seconds: u64,
    /// When set, `POST /api/keys/generate` requires `Authorization: Bearer <token>`.
    pub admin_token: String,
    /// Argon2id parameters for new keys (memory in KiB).
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// Threads verifying and hashing keys (Argon2id), and their queue.
    pub verify_workers: usize,
    pub verify_queue: usize,
    /// Keys cached per shard; unknown key ids remembered per shard.
    pub cache_capacity: usize,
    pub negative_capacity: usize,
    pub negative_ttl_ms: u64,
    /// Every 401 is answered this long after the request started (no timing oracle).
    pub failure_delay_ms: u64,
    /// 401s per client address per minute before its requests get 429.
    pub max_failures_per_minute: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub free: u64,
    pub pro: u64,
    pub business: u64,
    pub enterprise: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub timeout_ms: u64,
    pub retry_schedule_seconds: Vec<u64>,
    pub jitter_percent: u64,
    pub allow_private_targets: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// When set, `GET /metrics` requires `Authorization: Bearer <token>`.
    pub metrics_token: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: "127.0.0.1:8080".into(),
            engine: "auto".into(),
            data_dir: PathBuf::from("triggers-data"),
            cores: CoresConfig::default(),
            http: HttpConfig::default(),
            ingest: IngestConfig::default(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            delivery: DeliveryConfig::default(),
            ops: OpsConfig::default(),
        }
    }
}

impl Default for CoresConfig {
    fn default() -> CoresConfig {
        CoresConfig {
            shards: CoreList::Named("auto".into()),
            persistence: CoreChoice::Named("auto".into()),
            delivery: CoreChoice::Named("auto".into()),
            pin: true,
            spin_before_park_us: 0,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            max_header_bytes: 16 * 1024,
            request_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections_per_shard: 10_000,
            listen_backlog: 1024,
            shutdown_grace_ms: 5_000,
            busy_poll_us: 50,
            busy_poll_max_connections: 4,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> IngestConfig {
        IngestConfig {
            ack: "durable".into(),
            max_body_bytes: 512 * 1024,
            max_batch_body_bytes: 8 * 1024 * 1024,
            max_payload_bytes: 256 * 1024,
            ring_capacity: 16 * 1024,
            max_batch: 1024,
            writers: 1,
            commit_timeout_ms: 5_000,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> DatabaseConfig {
        DatabaseConfig {
            url: String::new(),
            query_workers: 4,
            query_queue: 4096,
            migrate_on_start: true,
            connect_timeout_ms: 2_000,
            pg_bin_dir: String::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            cache_ttl_seconds: 60,
            admin_token: String::new(),
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            verify_workers: 2,
            verify_queue: 1024,
            cache_capacity: 100_000,
            negative_capacity: 100_000,
            negative_ttl_ms: 5_000,
            failure_delay_ms: 100,
            max_failures_per_minute: 60,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            free: 100,
            pro: 1_000,
            business: 10_000,
            enterprise: 100_000,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> DeliveryConfig {
        DeliveryConfig {
            timeout_ms: 10_000,
            retry_schedule_seconds: vec![5, 300, 1_800, 7_200, 18_000, 36_000, 36_000],
            jitter_percent: 20,
            allow_private_targets: false,
        }
    }
}

/// A configuration problem, naming the key and the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {} = {}: {}",
            self.key, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, value: impl fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Keys whose values are masked when the configuration is printed.
const SECRET_KEYS: [&str; 3] = ["auth.admin_token", "ops.metrics_token", "database.url"];

impl Config {
    /// Loads defaults < file < environment < `overrides` (`section.key=value`).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[(String, String)],
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut value = toml::Value::try_from(Config::default())
            .map_err(|e| err("(defaults)", "", e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err("--config", path.display(), e.to_string()))?;
            let file_value: toml::Value = toml::from_str(&text)
                .map_err(|e| err("--config", path.display(), e.to_string()))?;
            merge(&mut value, file_value);
        }
        let mut warnings = Vec::new();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TRIGGERS_"))
            .collect();
        env.sort();
        for (name, raw) in env {
            match env_key(&value, &name["TRIGGERS_".len()..]) {
                Some(key) => set_key(&mut value, &key, &raw, &name)?,
                None => warnings.push(format!("ignoring unknown environment variable {name}")),
            }
        }
        for (key, raw) in overrides {
            set_key(&mut value, key, raw, key)?;
        }
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| err("(configuration)", "", e.message().to_string()))?;
        config.validate()?;
        Ok((config, warnings))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if !matches!(self.engine.as_str(), "auto" | "glommio" | "may") {
            return Err(err("engine", &self.engine, "expected auto, glommio or may"));
        }
        if !matches!(self.ingest.ack.as_str(), "durable" | "memory") {
            return Err(err(
                "ingest.ack",
                &self.ingest.ack,
                "expected durable or memory",
            ));
        }
        let positive: [(&str, u64); 23] = [
            ("http.max_header_bytes", self.http.max_header_bytes as u64),
            ("http.request_timeout_ms", self.http.request_timeout_ms),
            ("http.idle_timeout_ms", self.http.idle_timeout_ms),
            (
                "http.max_connections_per_shard",
                self.http.max_connections_per_shard as u64,
            ),
            ("http.listen_backlog", self.http.listen_backlog as u64),
            ("ingest.max_body_bytes", self.ingest.max_body_bytes as u64),
            (
                "ingest.max_batch_body_bytes",
                self.ingest.max_batch_body_bytes as u64,
            ),
            (
                "ingest.max_payload_bytes",
                self.ingest.max_payload_bytes as u64,
            ),
            ("ingest.ring_capacity", self.ingest.ring_capacity as u64),
            ("ingest.max_batch", self.ingest.max_batch as u64),
            ("ingest.writers", self.ingest.writers as u64),
            ("database.query_workers", self.database.query_workers as u64),
            ("database.query_queue", self.database.query_queue as u64),
            (
                "database.connect_timeout_ms",
                self.database.connect_timeout_ms,
            ),
            ("delivery.timeout_ms", self.delivery.timeout_ms),
            ("auth.argon2_memory_kib", self.auth.argon2_memory_kib as u64),
            ("auth.argon2_iterations", self.auth.argon2_iterations as u64),
            (
                "auth.argon2_parallelism",
                self.auth.argon2_parallelism as u64,
            ),
            ("auth.verify_workers", self.auth.verify_workers as u64),
            ("auth.verify_queue", self.auth.verify_queue as u64),
            ("auth.cache_capacity", self.auth.cache_capacity as u64),
            ("auth.negative_capacity", self.auth.negative_capacity as u64),
            (
                "auth.max_failures_per_minute",
                self.auth.max_failures_per_minute as u64,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(err(key, v, "must be greater than 0"));
            }
        }
        if self.http.max_header_bytes < 1024 {
            return Err(err(
                "http.max_header_bytes",
                self.http.max_header_bytes,
                "must be at least 1024",
            ));
        }
        for (key, v) in [
            ("limits.free", self.limits.free),
            ("limits.pro", self.limits.pro),
            ("limits.business", self.limits.business),
            ("limits.enterprise", self.limits.enterprise),
        ] {
            if v == 0 || v > 1_000_000_000 {
                return Err(err(
                    key,
                    v,
                    "must be from 1 to 1000000000 requests per minute",
                ));
            }
        }
        if self.ingest.commit_timeout_ms == 0 {
            return Err(err("ingest.commit_timeout_ms", 0, "must be greater than 0"));
        }
        if self.delivery.jitter_percent > 100 {
            return Err(err(
                "delivery.jitter_percent",
                self.delivery.jitter_percent,
                "must be at most 100",
            ));
        }
        if let CoreList::Named(name) = &self.cores.shards {
            if name != "auto" {
                return Err(err(
                    "cores.shards",
                    name,
                    "expected \"auto\" or a list of core ids",
                ));
            }
        }
        if let CoreList::Ids(ids) = &self.cores.shards {
            if ids.is_empty() {
                return Err(err("cores.shards", "[]", "needs at least one core"));
            }
        }
        for (key, choice) in [
            ("cores.persistence", &self.cores.persistence),
            ("cores.delivery", &self.cores.delivery),
        ] {
            if let CoreChoice::Named(name) = choice {
                if name != "auto" {
                    return Err(err(key, name, "expected \"auto\" or a core id"));
                }
            }
        }
        if !self.database.url.is_empty() {
            self.database
                .url
                .parse::<postgres::Config>()
                .map_err(|e| err("database.url", "(masked)", e.to_string()))?;
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            err(
                "listen",
                &self.listen,
                "expected an address like 127.0.0.1:8080",
            )
        })
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut value =
            toml::Value::try_from(self).unwrap_or(toml::Value::Table(Default::default()));
        for key in SECRET_KEYS {
            let (section, name) = key.split_once('.').unwrap_or(("", key));
            if let Some(toml::Value::String(s)) =
                value.get_mut(section).and_then(|t| t.get_mut(name))
            {
                if !s.is_empty() {
                    *s = "********".into();
                }
            }
        }
        toml::to_string_pretty(&value).unwrap_or_default()
    }
}

/// Deep-merges `over` into `base` (tables merge, everything else replaces).
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Maps the part after `TRIGGERS_` to `section.key` or `key`, by the known layout.
fn env_key(layout: &toml::Value, rest: &str) -> Option<String> {
    let rest = rest.to_ascii_lowercase();
    let table = layout.as_table()?;
    for (section, inner) in table {
        if let Some(key) = rest.strip_prefix(&format!("{section}_")) {
            if inner.as_table().is_some_and(|t| t.contains_key(key)) {
                return Some(format!("{section}.{key}"));
            }
        }
    }
    (table.get(&rest).is_some_and(|v| !v.is_table())).then_some(rest)
}

/// Sets `section.key` (or `key`) from a raw string, typed like the value it replaces.
fn set_key(value: &mut toml::Value, key: &str, raw: &str, source: &str) -> Result<(), ConfigError> {
    let unknown = || err(source, raw, format!("unknown setting {key}"));
    let slot = match key.split_once('.') {
        Some((section, name)) => value
            .get_mut(section)
            .and_then(|t| t.get_mut(name))
            .ok_or_else(unknown)?,
        None => value
            .get_mut(key)
            .filter(|v| !v.is_table())
            .ok_or_else(unknown)?,
    };
    let parsed_inline = || -> Option<toml::Value> {
        let doc: toml::Table = toml::from_str(&format!("v = {raw}")).ok()?;
        doc.get("v").cloned()
    };
    let new = match slot {
        toml::Value::String(_) => match parsed_inline() {
            // "auto"-or-list settings accept a list where the default is "auto".
            Some(v @ toml::Value::Array(_)) => v,
            Some(v @ toml::Value::Integer(_)) if key.starts_with("cores.") => v,
            _ => toml::Value::String(raw.to_string()),
        },
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| err(source, raw, "expected an integer"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(err(source, raw, "expected true or false")),
        }),
        toml::Value::Array(_) => match parsed_inline() {
            Some(v @ toml::Value::Array(_)) => v,
            _ => {
                let items: Result<Vec<toml::Value>, _> = raw
                    .split(',')
                    .map(|s| s.trim().parse::<i64>().map(toml::Value::Integer))
                    .collect();
                toml::Value::Array(items.map_err(|_| err(source, raw, "expected a list"))?)
            }
        },
        _ => parsed_inline().ok_or_else(|| err(source, raw, "unparsable value"))?,
    };
    *slot = new;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let (c, w) = Config::load(None, Vec::new(), &[]).expect("defaults load");
        assert!(w.is_empty());
        assert_eq!(c.ingest.ack, "durable");
        assert_eq!(c.cores.shards, CoreList::Named("auto".into()));
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\n[cores]\nshards = [0]\n[limits]\npro = 5\n",
        )
        .expect("write");
        let (c, _) = Config::load(
            Some(&path),
            env(&[
                ("TRIGGERS_LIMITS_ENTERPRISE", "7"),
                ("TRIGGERS_LISTEN", "127.0.0.1:9001"),
                ("TRIGGERS_CORES_SPIN_BEFORE_PARK_US", "10"),
                ("TRIGGERS_DATA_DIR", "/tmp/x"),
                ("OTHER", "1"),
            ]),
            &[("listen".into(), "127.0.0.1:9002".into())],
        )
        .expect("load");
        assert_eq!(c.listen, "127.0.0.1:9002");
        assert_eq!(c.cores.shards, CoreList::Ids(vec![0]));
        assert_eq!(c.limits.pro, 5);
        assert_eq!(c.limits.enterprise, 7);
        assert_eq!(c.cores.spin_before_park_us, 10);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn env_lists_and_core_ids() {
        let (c, _) = Config::load(
            None,
            env(&[
                ("TRIGGERS_CORES_SHARDS", "[0, 1]"),
                ("TRIGGERS_CORES_PERSISTENCE", "1"),
                ("TRIGGERS_DELIVERY_RETRY_SCHEDULE_SECONDS", "1,2,3"),
            ]),
            &[],
        )
        .expect("load");
        assert_eq!(c.cores.shards, CoreList::Ids(vec![0, 1]));
        assert_eq!(c.cores.persistence, CoreChoice::Id(1));
        assert_eq!(c.delivery.retry_schedule_seconds, vec![1, 2, 3]);
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let cases: [(&str, &str, &str); 6] = [
            ("TRIGGERS_LISTEN", "nonsense", "listen"),
            ("TRIGGERS_INGEST_RING_CAPACITY", "0", "ingest.ring_capacity"),
            ("TRIGGERS_INGEST_ACK", "sometimes", "ingest.ack"),
            ("TRIGGERS_ENGINE", "tokio", "engine"),
            (
                "TRIGGERS_HTTP_IDLE_TIMEOUT_MS",
                "soon",
                "TRIGGERS_HTTP_IDLE_TIMEOUT_MS",
            ),
            ("TRIGGERS_CORES_SHARDS", "some", "cores.shards"),
        ];
        for (var, val, key) in cases {
            let e = Config::load(None, env(&[(var, val)]), &[]).expect_err(var);
            assert_eq!(e.key, key, "{e}");
            assert!(e.to_string().contains(val), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_or_reported() {
        let (_, warnings) = Config::load(None, env(&[("TRIGGERS_NOPE", "1")]), &[]).expect("load");
        assert_eq!(warnings.len(), 1);
        assert!(Config::load(None, Vec::new(), &[("http.nope".into(), "1".into())]).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "[http]\nmax_header = 3\n").expect("write");
        assert!(Config::load(Some(&path), Vec::new(), &[]).is_err());
    }

    #[test]
    fn printed_config_masks_secrets() {
        let mut c = Config::default();
        c.auth.admin_token = "sekrit-token".into();
        c.database.url = "postgresql://u:pw@localhost/db".into();
        let text = c.to_masked_toml();
        assert!(!text.contains("sekrit-token"));
        assert!(!text.contains("pw@"));
        assert!(text.contains("********"));
    }
}
