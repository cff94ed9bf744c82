//! Organizations and their API keys: sign-up (`POST /api/keys/generate`), the
//! caller's organization (`GET /api/keys`) and rotation
//! (`POST /api/keys/rotate`). Argon2id hashing and the database writes run on
//! the verifier pool; shards only validate and wait.

use super::auth::limit_for_tier;
use super::body::{parse_object, require_json, FieldErrors};
use super::{
    answer, bearer, constant_time_eq, json_response, store_error, ApiError, Handled, ShardCtx,
};
use crate::auth::invalidation::{Invalidation, CHANNEL};
use crate::auth::{key, Principal};
use crate::http::Request;
use crate::store::{ts, StoreError};
use serde_json::{json, Value};
use std::rc::Rc;

const TIERS: [&str; 4] = ["free", "pro", "business", "enterprise"];

fn check_admin(ctx: &ShardCtx, req: &Request) -> Result<(), ApiError> {
    let token = &ctx.shared.config.auth.admin_token;
    if token.is_empty() {
        return Ok(());
    }
    match bearer(req) {
        None => Err(ApiError::new(
            401,
            "missing_api_key",
            "This route needs Authorization: Bearer <admin token>.",
        )),
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            401,
            "invalid_api_key",
            "The admin token is invalid.",
        )),
    }
}

/// The organization's name: `organization_name`, or its alias `org_name`
/// (the earlier implementations' clients send it); 1–255 characters after
/// trimming, no NUL (PostgreSQL's text cannot hold it).
fn organization_name(obj: &serde_json::Map<String, Value>, errors: &mut FieldErrors) -> String {
    let field = match (obj.get("organization_name"), obj.get("org_name")) {
        (Some(_), Some(_)) => {
            errors.add(
                "org_name",
                "is an alias of organization_name: give one of them",
            );
            return String::new();
        }
        (Some(v), None) => ("organization_name", v),
        (None, Some(v)) => ("org_name", v),
        (None, None) => {
            errors.add("organization_name", "is required");
            return String::new();
        }
    };
    let Value::String(s) = field.1 else {
        errors.add(field.0, "must be a string");
        return String::new();
    };
    let t = s.trim();
    let n = t.chars().count();
    if n == 0 || n > 255 {
        errors.add(field.0, "must be 1-255 characters after trimming");
    } else if t.contains('\0') {
        errors.add(field.0, "must not contain NUL (\\u0000)");
    }
    t.to_string()
}

/// `POST /api/keys/generate`.
pub fn generate(ctx: &Rc<ShardCtx>, req: &Request) -> Handled {
    let parsed = check_admin(ctx, req)
        .and_then(|()| require_json(req))
        .and_then(|()| parse_object(&req.body))
        .and_then(|obj| {
            let mut errors = FieldErrors::default();
            errors.unknown_fields(&obj, &["organization_name", "org_name", "tier"]);
            let name = organization_name(&obj, &mut errors);
            let tier = match obj.get("tier") {
                None | Some(Value::Null) => "free".to_string(),
                Some(Value::String(t)) if TIERS.contains(&t.as_str()) => t.clone(),
                Some(_) => {
                    errors.add("tier", "must be one of free, pro, business, enterprise");
                    String::new()
                }
            };
            errors.finish().map(|()| (name, tier))
        });
    let (name, tier) = match parsed {
        Ok(v) => v,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let params = ctx.shared.hash_params;
    let job = ctx
        .shared
        .verifier
        .submit(move |client| crate::store::orgs::create(client, &name, &tier, params));
    let reply = match job {
        Ok(r) => r,
        Err(e) => return Handled::Ready(Err(store_error(e))),
    };
    let ctx = ctx.clone();
    Handled::Pending(Box::pin(async move {
        let o = answer(reply).await?;
        let limit = limit_for_tier(&ctx, &o.tier);
        Ok(json_response(
            201,
            &json!({
                "organization_id": o.organization_id,
                "organization_name": o.name,
                "key_id": o.key_id,
                "api_key": o.api_key,
                "tier": o.tier,
                "rate_limit_per_minute": limit,
                "created_at": o.created_at,
                "warning": "Store this API key now: it is shown only once and cannot be recovered.",
            }),
        ))
    }))
}

/// The body of `GET /api/keys`, borrowed from the principal (fields in the
/// order the other JSON bodies use: sorted).
#[derive(serde::Serialize)]
struct KeyInfo<'a> {
    created_at: &'a str,
    key_id: &'a str,
    organization_id: uuid::Uuid,
    organization_name: &'a str,
    rate_limit_per_minute: u64,
    tier: &'a str,
    updated_at: &'a str,
    webhook_url: Option<&'a str>,
}

/// `GET /api/keys`: answered from the key cache (the principal carries the
/// organization as of its verification; changes through this server
/// invalidate it, other servers notify).
pub fn show(ctx: &Rc<ShardCtx>, _req: Request, p: Rc<Principal>) -> Handled {
    Handled::Ready(Ok(json_response(
        200,
        &KeyInfo {
            created_at: p.created_at(),
            key_id: p.key_id(),
            organization_id: p.organization_id,
            organization_name: p.organization_name(),
            rate_limit_per_minute: limit_for_tier(ctx, p.tier()),
            tier: p.tier(),
            updated_at: p.updated_at(),
            webhook_url: p.webhook_url(),
        },
    )))
}

/// `POST /api/keys/rotate`.
pub fn rotate(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let grace = if req.body.iter().all(u8::is_ascii_whitespace) {
        Ok(0i64)
    } else {
        require_json(&req)
            .and_then(|()| parse_object(&req.body))
            .and_then(|obj| {
                let mut errors = FieldErrors::default();
                errors.unknown_fields(&obj, &["grace_seconds"]);
                let grace = match obj.get("grace_seconds") {
                    None | Some(Value::Null) => 0,
                    Some(v) => match v.as_i64() {
                        Some(g) if (0..=86_400).contains(&g) => g,
                        _ => {
                            errors.add("grace_seconds", "must be an integer from 0 to 86400");
                            0
                        }
                    },
                };
                errors.finish().map(|()| grace)
            })
    };
    let grace = match grace {
        Ok(g) => g,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let params = ctx.shared.hash_params;
    let (org, old_key) = (p.organization_id, p.key_id().to_string());
    let job = ctx.shared.verifier.submit(move |client| {
        let (key_id, secret, full) = key::generate(org);
        let hash = key::hash_secret(&secret, params).map_err(StoreError::Unavailable)?;
        let mut tx = client.transaction()?;
        tx.execute(
            "INSERT INTO api_keys (organization_id, key_id, secret_hash) VALUES ($1, $2, $3)",
            &[&org, &key_id, &hash],
        )?;
        let row = tx.query_one(
            &format!(
                "UPDATE api_keys
                    SET revoked_at = CASE WHEN $3::float8 = 0 THEN now() ELSE revoked_at END,
                        expires_at = CASE WHEN $3::float8 = 0 THEN expires_at ELSE now() + make_interval(secs => $3::float8) END
                  WHERE organization_id = $1 AND key_id = $2
              RETURNING {}, {}",
                ts("now()"),
                ts("coalesce(expires_at, revoked_at)")
            ),
            &[&org, &old_key, &(grace as f64)],
        )?;
        tx.execute("UPDATE organizations SET updated_at = now() WHERE organization_id = $1", &[&org])?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("key:{old_key}")])?;
        tx.commit()?;
        let (rotated, old_expires): (String, String) = (row.get(0), row.get(1));
        Ok((key_id, full, rotated, old_expires))
    });
    let reply = match job {
        Ok(r) => r,
        Err(e) => return Handled::Ready(Err(store_error(e))),
    };
    let ctx = ctx.clone();
    Handled::Pending(Box::pin(async move {
        let (key_id, full, rotated, old_expires) = answer(reply).await?;
        // This shard owns the old key (rotation is handed to the owner): its
        // entry goes now, before the answer. The other shards' leases of it
        // go by message now too; other processes hear the NOTIFY.
        ctx.auth.cache.borrow_mut().invalidate(p.key_id());
        for (shard, inbox) in ctx.shared.invalidations.iter().enumerate() {
            if shard != ctx.id {
                let _ = inbox.unbounded_send(Invalidation::Key(p.key_id().to_string()));
            }
        }
        Ok(json_response(
            200,
            &json!({
                "organization_id": p.organization_id,
                "key_id": key_id,
                "api_key": full,
                "rotated_at": rotated,
                "old_key_expires_at": old_expires,
            }),
        ))
    }))
}
