//! PostgreSQL: connection settings, embedded migrations, the query workers
//! that serve shards, and the embedded local cluster used when no
//! `database.url` is configured.

pub mod events;
pub mod local_cluster;
pub mod migrations;
pub mod orgs;
pub mod workers;

pub use workers::{QueryPool, Reply};

use std::time::Duration;

/// SQL rendering a timestamptz column as RFC 3339 UTC with microseconds.
pub fn ts(column: &str) -> String {
    format!("to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or the connection broke.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The query workers' queue is full.
    #[error("query queue full")]
    Overloaded,
    #[error("database error: {0}")]
    Query(#[from] postgres::Error),
    /// A stored row this server cannot show (it never wrote such a row).
    #[error("unreadable row: {0}")]
    BadRow(String),
}

impl StoreError {
    /// Whether the error means the connection is unusable (reconnect next time).
    pub fn is_connection_error(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Overloaded | StoreError::BadRow(_) => false,
            StoreError::Query(e) => e.is_closed() || e.as_db_error().is_none(),
        }
    }
}

/// How to reach PostgreSQL.
#[derive(Clone)]
pub struct DbSettings {
    pub url: String,
    pub connect_timeout: Duration,
}

impl DbSettings {
    pub fn connect(&self) -> Result<postgres::Client, StoreError> {
        let mut cfg: postgres::Config = self
            .url
            .parse()
            .map_err(|e: postgres::Error| StoreError::Unavailable(e.to_string()))?;
        cfg.connect_timeout(self.connect_timeout);
        cfg.keepalives(true);
        cfg.keepalives_idle(Duration::from_secs(30));
        cfg.application_name("triggers");
        cfg.connect(postgres::NoTls)
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}
