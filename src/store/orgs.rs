//! Organization sign-up, shared by `POST /api/keys/generate` and the first
//! start of `serve` (which prints a ready-to-use key). Runs on a verifier or
//! start-up thread: Argon2id is CPU-heavy.

use super::{ts, RowExt, StoreError};
use crate::auth::key::{self, HashParams};

/// A created organization with its first key (the plaintext key is shown once).
pub struct NewOrganization {
    pub organization_id: uuid::Uuid,
    pub name: String,
    pub tier: String,
    pub key_id: String,
    pub api_key: String,
    pub created_at: String,
}

pub fn create(
    client: &mut postgres::Client,
    name: &str,
    tier: &str,
    params: HashParams,
) -> Result<NewOrganization, StoreError> {
    let org = uuid::Uuid::now_v7();
    let (key_id, secret, full) = key::generate(org);
    let hash = key::hash_secret(&secret, params).map_err(StoreError::Unavailable)?;
    let mut tx = client.transaction()?;
    let row = tx.query_one(
        &format!(
            "INSERT INTO organizations (organization_id, name, tier) VALUES ($1, $2, $3) RETURNING {}",
            ts("created_at")
        ),
        &[&org, &name, &tier],
    )?;
    tx.execute(
        "INSERT INTO api_keys (organization_id, key_id, secret_hash) VALUES ($1, $2, $3)",
        &[&org, &key_id, &hash],
    )?;
    let created_at = row.col(0)?;
    tx.commit()?;
    Ok(NewOrganization {
        organization_id: org,
        name: name.to_string(),
        tier: tier.to_string(),
        key_id,
        api_key: full,
        created_at,
    })
}
