//! Schema migrations, embedded in the binary and applied in order under an
//! advisory lock, so concurrent servers starting on one database agree.

use super::StoreError;

/// (version, name, SQL). Append only; never edit an applied migration.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (
        2,
        "exact_payloads",
        include_str!("migrations/0002_exact_payloads.sql"),
    ),
];

/// Arbitrary constant naming the migration lock.
const LOCK_ID: i64 = 0x7472_6967_6765_7273; // "triggers"

/// Applies every migration not yet applied; returns the versions it applied.
pub fn migrate(client: &mut postgres::Client) -> Result<Vec<i32>, StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_ID])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS triggers_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM triggers_migrations", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO triggers_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )?;
        applied.push(version);
    }
    tx.commit()?;
    Ok(applied)
}

/// The newest version this binary knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}
