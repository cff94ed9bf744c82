//! The authenticated part of the request path: failure throttle per client
//! address → key from `X-API-Key` or `Authorization: Bearer` → on the key's
//! owner shard, the shard's key cache (on a miss, one coalesced verification
//! — database read and Argon2id — on the verifier pool; past an entry's TTL,
//! one coalesced re-read of the key's row on a query worker, with Argon2id
//! only if the stored hash changed) and the organization's rate limit; on
//! any other shard, a lease from the owner (`leases.rs`) → the handler.
//! Every response after the rate limit carries the rate-limit headers.
//!
//! No timing oracle: every 401 (missing, malformed, unknown, wrong secret,
//! revoked) is held until `auth.failure_delay_ms` after the request started,
//! on a timer. Unknown key ids never cost an Argon2 run.

use super::leases::{borrow, Ask, Askers, Borrowed};
use super::{ApiError, Handled, ShardCtx};
use crate::auth::lease::{LeaseTable, LeaseUse};
use crate::auth::throttle::FailureThrottle;
use crate::auth::{key, Lookup, Principal, PrincipalFields};
use crate::http::{Request, Response};
use crate::limit::Decision;
use crate::store::{Reply, RowExt, StoreError};
use futures::channel::oneshot;
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A handler that runs after authentication and the rate limit.
pub type AuthedHandler = fn(&Rc<ShardCtx>, Request, Rc<Principal>) -> Handled;

/// What a verification concluded, shared by every coalesced waiter.
#[derive(Clone)]
pub enum Verified {
    Valid(Rc<Principal>),
    Unauthorized,
    Unavailable,
    /// The pool's job ended without an answer (a panic, caught and counted
    /// by the worker): 500 `internal_error`.
    Internal,
}

/// A pool's answer about a key (crosses threads, so no `Rc`): the
/// principal, the time left until the key expires and the digest of its
/// stored hash.
enum VerifyAnswer {
    Valid(Box<Principal>, Option<Duration>, [u8; 32]),
    WrongSecret,
    Unknown,
}

/// The presented key: `X-API-Key`, else `Authorization: Bearer`.
pub fn presented_key(req: &Request) -> Option<&str> {
    req.header_str("x-api-key")
        .map(str::trim)
        .or_else(|| super::bearer(req))
        .filter(|k| !k.is_empty())
}

/// The shard owning the key's routing slot, when the key parses.
pub fn owner_of(req: &Request, shards: usize) -> Option<usize> {
    let k = key::parse(presented_key(req)?)?;
    Some(key::owner_shard(key::key_slot(k.key_id), shards))
}

pub fn limit_for_tier(ctx: &ShardCtx, tier: &str) -> u64 {
    let l = &ctx.shared.config.limits;
    match tier {
        "pro" => l.pro,
        "business" => l.business,
        "enterprise" => l.enterprise,
        _ => l.free,
    }
}

fn rate_headers(d: &Decision) -> [(&'static str, String); 5] {
    [
        ("x-ratelimit-limit", d.limit.to_string()),
        ("x-ratelimit-remaining", d.remaining.to_string()),
        ("x-ratelimit-reset", d.reset_secs.to_string()),
        ("ratelimit-policy", format!("\"tier\";q={};w=60", d.limit)),
        (
            "ratelimit",
            format!("\"tier\";r={};t={}", d.remaining, d.reset_secs),
        ),
    ]
}

fn with_rate(result: Result<Response, ApiError>, d: &Decision) -> Result<Response, ApiError> {
    match result {
        Ok(mut r) => {
            r.headers
                .extend(rate_headers(d).map(|(n, v)| (n, v.into())));
            Ok(r)
        }
        Err(mut e) => {
            e.headers
                .extend(rate_headers(d).map(|(n, v)| (n, v.into())));
            Err(e)
        }
    }
}

fn unauthorized(missing: bool) -> ApiError {
    if missing {
        ApiError::new(
            401,
            "missing_api_key",
            "An API key is required (X-API-Key or Authorization: Bearer).",
        )
    } else {
        ApiError::new(
            401,
            "invalid_api_key",
            "The API key is invalid, unknown or revoked.",
        )
    }
}

/// Authenticates, rate-limits by `cost`, then runs `handler`.
pub fn authenticated(
    ctx: &Rc<ShardCtx>,
    req: Request,
    peer: Option<IpAddr>,
    cost: u64,
    handler: AuthedHandler,
) -> Handled {
    let started = Instant::now();
    let auth_cfg = &ctx.shared.config.auth;
    if let Some(ip) = peer {
        let blocked =
            ctx.auth
                .failures
                .borrow()
                .blocked(ip, auth_cfg.max_failures_per_minute, ctx.now_ns());
        if let Some(wait) = blocked {
            ctx.metrics.auth_throttled.inc();
            let limit = auth_cfg.max_failures_per_minute;
            return Handled::Ready(Err(ApiError::new(
                429,
                "rate_limited",
                "Too many failed authentication attempts from this address.",
            )
            .details(json!({"limit": limit, "window": 60, "retry_after": wait}))
            .header("retry-after", wait.to_string())));
        }
    }
    let Some(raw) = presented_key(&req) else {
        return fail(ctx, peer, started, true);
    };
    let Some(presented) = key::parse(raw) else {
        return fail(ctx, peer, started, false);
    };
    let digest = ctx.shared.digester.digest(presented.secret);
    let owner = key::owner_shard(
        key::key_slot(presented.key_id),
        ctx.shared.plan.shards.len(),
    );
    if owner != ctx.id {
        let leased = ctx
            .auth
            .leases
            .borrow_mut()
            .spend(presented.key_id, &digest, cost, started);
        let refund = match leased {
            LeaseUse::Spent(principal, d) => {
                ctx.metrics.lease_hits.inc();
                return run(ctx, req, principal, d, handler);
            }
            LeaseUse::WrongSecret => return fail(ctx, peer, started, false),
            LeaseUse::Ask { refund } => refund,
        };
        let ask = Ask {
            owner,
            key_id: presented.key_id.to_string(),
            secret: presented.secret.to_string(),
            digest,
            cost,
            refund,
        };
        let ctx = ctx.clone();
        return Handled::Pending(Box::pin(async move {
            let handled = match borrow(&ctx, ask).await {
                Borrowed::Admitted(principal, d) => run(&ctx, req, principal, d, handler),
                Borrowed::Limited(d) => return limited(&ctx, &d),
                Borrowed::Unauthorized => fail(&ctx, peer, started, false),
                Borrowed::Granted | Borrowed::Unavailable => {
                    return Err(ApiError::unavailable(
                        "Authentication is unavailable: the database does not answer.",
                        1,
                    ))
                }
                Borrowed::Overloaded => return Err(ApiError::overloaded(1)),
                Borrowed::Internal => return Err(ApiError::internal()),
            };
            match handled {
                Handled::Ready(r) => r,
                Handled::Pending(f) => f.await,
            }
        }));
    }
    let lookup = ctx
        .auth
        .cache
        .borrow_mut()
        .lookup(presented.key_id, &digest, started);
    match lookup {
        Lookup::Hit(principal) => {
            ctx.metrics.auth_cache_hits.inc();
            admit(ctx, req, principal, cost, handler)
        }
        Lookup::Stale(principal) => {
            ctx.metrics.auth_cache_hits.inc();
            refresh(ctx, presented.key_id);
            admit(ctx, req, principal, cost, handler)
        }
        Lookup::WrongSecret | Lookup::Unknown => {
            ctx.metrics.auth_cache_hits.inc();
            fail(ctx, peer, started, false)
        }
        Lookup::Miss | Lookup::Expired => {
            ctx.metrics.auth_cache_misses.inc();
            let reread = matches!(lookup, Lookup::Expired);
            let waiter = verify(ctx, presented.key_id, presented.secret, digest, reread);
            let ctx = ctx.clone();
            Handled::Pending(Box::pin(async move {
                let verified = match waiter {
                    Ok(rx) => rx.await.unwrap_or(Verified::Unavailable),
                    Err(e) => return Err(e),
                };
                match verified {
                    Verified::Valid(principal) => {
                        match admit(&ctx, req, principal, cost, handler) {
                            Handled::Ready(r) => r,
                            Handled::Pending(f) => f.await,
                        }
                    }
                    Verified::Unauthorized => match fail(&ctx, peer, started, false) {
                        Handled::Ready(r) => r,
                        Handled::Pending(f) => f.await,
                    },
                    Verified::Unavailable => Err(ApiError::unavailable(
                        "Authentication is unavailable: the database does not answer.",
                        1,
                    )),
                    Verified::Internal => Err(ApiError::internal()),
                }
            }))
        }
    }
}

/// A 401, held until `failure_delay_ms` after the request started.
fn fail(ctx: &Rc<ShardCtx>, peer: Option<IpAddr>, started: Instant, missing: bool) -> Handled {
    if let Some(ip) = peer {
        ctx.auth.failures.borrow_mut().record(ip, ctx.now_ns());
    }
    ctx.metrics.auth_failures.inc();
    let hold = Duration::from_millis(ctx.shared.config.auth.failure_delay_ms);
    let wait = hold.saturating_sub(started.elapsed());
    let sleep = (ctx.hooks.sleep)(wait);
    Handled::Pending(Box::pin(async move {
        sleep.await;
        Err(unauthorized(missing))
    }))
}

fn admit(
    ctx: &Rc<ShardCtx>,
    req: Request,
    principal: Rc<Principal>,
    cost: u64,
    handler: AuthedHandler,
) -> Handled {
    let limit = limit_for_tier(ctx, principal.tier());
    let d =
        ctx.auth
            .limiter
            .borrow_mut()
            .check(principal.organization_id, limit, cost, ctx.now_ns());
    run(ctx, req, principal, d, handler)
}

/// Runs `handler` when the rate-limit decision `d` allows it, else a 429.
fn run(
    ctx: &Rc<ShardCtx>,
    req: Request,
    principal: Rc<Principal>,
    d: Decision,
    handler: AuthedHandler,
) -> Handled {
    if !d.allowed {
        return Handled::Ready(limited(ctx, &d));
    }
    match handler(ctx, req, principal) {
        Handled::Ready(r) => Handled::Ready(with_rate(r, &d)),
        Handled::Pending(f) => Handled::Pending(Box::pin(async move { with_rate(f.await, &d) })),
    }
}

/// The 429 for a request its organization's limit refused.
fn limited(ctx: &ShardCtx, d: &Decision) -> Result<Response, ApiError> {
    ctx.metrics.rate_limited.inc();
    let e = ApiError::new(
        429,
        "rate_limited",
        "Rate limit exceeded for this organization.",
    )
    .details(json!({"limit": d.limit, "window": 60, "retry_after": d.retry_after_secs}))
    .header("retry-after", d.retry_after_secs.to_string());
    with_rate(Err(e), d)
}

/// Joins (or starts) the verification of (key id, secret digest). With
/// `reread`, the key's cached entry is past its TTL: its row is read again
/// on a query worker, and Argon2id runs only if the stored hash changed.
pub(super) fn verify(
    ctx: &Rc<ShardCtx>,
    key_id: &str,
    secret: &str,
    digest: [u8; 32],
    reread: bool,
) -> Result<oneshot::Receiver<Verified>, ApiError> {
    let (tx, rx) = oneshot::channel();
    let slot = (key_id.to_string(), digest);
    {
        let mut pending = ctx.auth.pending.borrow_mut();
        if let Some(waiters) = pending.get_mut(&slot) {
            join(waiters, tx);
            return Ok(rx);
        }
        if pending.len() >= ctx.shared.config.auth.verify_queue {
            return Err(ApiError::overloaded(1));
        }
        pending.insert(slot.clone(), vec![tx]);
    }
    let submitted = if reread {
        submit_reread(ctx, key_id)
    } else {
        submit_verify(ctx, key_id, secret)
    };
    let first = match submitted {
        Ok(reply) => reply,
        Err(_) => {
            ctx.auth.pending.borrow_mut().remove(&slot);
            return Err(ApiError::overloaded(1));
        }
    };
    let c = ctx.clone();
    let secret = secret.to_string();
    (ctx.hooks.spawn)(Box::pin(async move {
        let verified = settle(&c, &slot, &secret, first, reread).await;
        let waiters = c
            .auth
            .pending
            .borrow_mut()
            .remove(&slot)
            .unwrap_or_default();
        for w in waiters {
            let _ = w.send(verified.clone());
        }
    }));
    Ok(rx)
}

/// Adds a waiter to a coalesced verification or lease ask. Before the list
/// would grow its allocation, waiters whose requests went away (timed out,
/// connection closed) are dropped: amortized O(1), and gone requests never
/// make a list grow (it stays within twice the most requests that ever
/// waited on it at once).
pub(super) fn join<T>(waiters: &mut Vec<oneshot::Sender<T>>, tx: oneshot::Sender<T>) {
    if waiters.len() == waiters.capacity() {
        waiters.retain(|w| !w.is_canceled());
    }
    waiters.push(tx);
}

/// Argon2id on the verifier pool (bounded: its queue refuses when full).
fn submit_verify(
    ctx: &Rc<ShardCtx>,
    key_id: &str,
    secret: &str,
) -> Result<Reply<VerifyAnswer>, StoreError> {
    let (id, secret) = (key_id.to_string(), secret.to_string());
    let reply = ctx
        .shared
        .verifier
        .submit(move |client| load_and_verify(client, &id, &secret))?;
    ctx.metrics.auth_verifications.inc();
    Ok(reply)
}

/// The key's row on a query worker, no Argon2.
fn submit_reread(ctx: &Rc<ShardCtx>, key_id: &str) -> Result<Reply<VerifyAnswer>, StoreError> {
    let id = key_id.to_string();
    let reply = ctx.shared.queries.submit(move |client| {
        Ok(match load_key(client, &id)? {
            Some((hash, principal, expires_in)) => {
                VerifyAnswer::Valid(principal.into(), expires_in, key::hash_fingerprint(&hash))
            }
            None => VerifyAnswer::Unknown,
        })
    })?;
    ctx.metrics.auth_refreshes.inc();
    Ok(reply)
}

/// How long a verified or re-read entry is trusted: the configured TTL less
/// up to a fifth at random, so keys cached together (a warm-up, a restart)
/// do not all come due for a re-read at once.
fn entry_ttl(c: &ShardCtx) -> Duration {
    let ttl = Duration::from_secs(c.shared.config.auth.cache_ttl_seconds);
    ttl.saturating_sub(ttl.mul_f64(rand::random::<f64>() / 5.0))
}

/// Turns a pool's answer into the cache's new state and the waiters'
/// verdict. A re-read that finds the hash the entry was verified against
/// renews the entry and settles from it; one that finds another hash (or
/// finds the entry gone) falls back to a full verification.
async fn settle(
    c: &Rc<ShardCtx>,
    slot: &(String, [u8; 32]),
    secret: &str,
    first: Reply<VerifyAnswer>,
    reread: bool,
) -> Verified {
    let mut answer = first.await;
    if reread {
        if let Ok(Ok(VerifyAnswer::Valid(p, expires_in, fingerprint))) = answer {
            let now = Instant::now();
            let ttl = entry_ttl(c);
            {
                let mut cache = c.auth.cache.borrow_mut();
                let renewed = cache.refreshed(
                    Rc::new(*p),
                    fingerprint,
                    now + ttl,
                    expires_in.map(|d| now + d),
                    now,
                );
                if renewed {
                    match cache.lookup(&slot.0, &slot.1, now) {
                        Lookup::Hit(p) | Lookup::Stale(p) => return Verified::Valid(p),
                        Lookup::WrongSecret => return Verified::Unauthorized,
                        _ => {}
                    }
                }
            }
            answer = match submit_verify(c, &slot.0, secret) {
                Ok(reply) => reply.await,
                Err(_) => return Verified::Unavailable,
            };
        }
    }
    let now = Instant::now();
    match answer {
        Ok(Ok(VerifyAnswer::Valid(p, expires_in, fingerprint))) => {
            let p = Rc::new(*p);
            let ttl = entry_ttl(c);
            c.auth.cache.borrow_mut().insert(
                p.clone(),
                slot.1,
                fingerprint,
                now + ttl,
                expires_in.map(|d| now + d),
                now,
            );
            Verified::Valid(p)
        }
        Ok(Ok(VerifyAnswer::Unknown)) => {
            let ttl = Duration::from_millis(c.shared.config.auth.negative_ttl_ms);
            let mut cache = c.auth.cache.borrow_mut();
            cache.invalidate(&slot.0);
            cache.insert_negative(&slot.0, now + ttl);
            Verified::Unauthorized
        }
        Ok(Ok(VerifyAnswer::WrongSecret)) => Verified::Unauthorized,
        Ok(Err(StoreError::Row(e))) => {
            log::error!("key verification read an unexpected row: {e}");
            Verified::Internal
        }
        Ok(Err(e)) => {
            log::warn!("key verification failed: {e}");
            Verified::Unavailable
        }
        // The job was dropped unanswered: its worker panicked (counted in
        // `triggers_worker_panics_total`).
        Err(_) => Verified::Internal,
    }
}

/// On the verifier pool: the key's row, then Argon2id. A known id with a
/// wrong secret costs one verification; an unknown id costs none.
fn load_and_verify(
    client: &mut postgres::Client,
    key_id: &str,
    secret: &str,
) -> Result<VerifyAnswer, StoreError> {
    let Some((hash, principal, expires_in)) = load_key(client, key_id)? else {
        return Ok(VerifyAnswer::Unknown);
    };
    if !key::verify_secret(secret, &hash) {
        return Ok(VerifyAnswer::WrongSecret);
    }
    Ok(VerifyAnswer::Valid(
        principal.into(),
        expires_in,
        key::hash_fingerprint(&hash),
    ))
}

/// The row of a live (not revoked, not expired) key: its Argon2id hash, its
/// organization and the time left until it expires.
fn load_key(
    client: &mut postgres::Client,
    key_id: &str,
) -> Result<Option<(String, Principal, Option<Duration>)>, StoreError> {
    // One round trip (parse, bind and execute together), not a prepare and
    // then an execute.
    let row = client.query_typed_opt(
        &format!(
            "SELECT k.secret_hash, o.organization_id, o.name, o.tier,
                    extract(epoch FROM k.expires_at - now())::float8,
                    {}, {}, w.url
               FROM api_keys k JOIN organizations o USING (organization_id)
               LEFT JOIN webhooks w USING (organization_id)
              WHERE k.key_id = $1 AND k.revoked_at IS NULL
                AND (k.expires_at IS NULL OR k.expires_at > now())",
            crate::store::ts("o.created_at"),
            crate::store::ts("o.updated_at")
        ),
        &[(&key_id, postgres::types::Type::TEXT)],
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    let expires_in: Option<f64> = row.col(4)?;
    let principal = Principal::from(PrincipalFields {
        organization_id: row.col(1)?,
        organization_name: row.col(2)?,
        tier: row.col(3)?,
        key_id: key_id.to_string(),
        created_at: row.col(5)?,
        updated_at: row.col(6)?,
        webhook_url: row.col(7)?,
    });
    // A NaN or infinite interval (never stored, but not trusted) counts as
    // expired now rather than panicking in `from_secs_f64`.
    let expires_in =
        expires_in.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default());
    Ok(Some((row.col(0)?, principal, expires_in)))
}

/// Re-reads a cached key's row in the background (a query worker, no
/// Argon2: the entry's secret was verified); the entry stays usable
/// meanwhile. A revoked or expired key leaves the cache.
pub(super) fn refresh(ctx: &Rc<ShardCtx>, key_id: &str) {
    ctx.metrics.auth_refreshes.inc();
    let id = key_id.to_string();
    let job = ctx.shared.queries.submit(move |client| {
        Ok(load_key(client, &id)?.map(|(hash, principal, expires_in)| {
            (principal, expires_in, key::hash_fingerprint(&hash))
        }))
    });
    let Ok(reply) = job else {
        ctx.auth.cache.borrow_mut().refresh_failed(key_id);
        return;
    };
    let c = ctx.clone();
    let id = key_id.to_string();
    (ctx.hooks.spawn)(Box::pin(async move {
        let answer = reply.await;
        let now = Instant::now();
        let ttl = entry_ttl(&c);
        let mut cache = c.auth.cache.borrow_mut();
        match answer {
            Ok(Ok(Some((principal, expires_in, fingerprint)))) => {
                // A changed hash drops the entry: the next request verifies.
                cache.refreshed(
                    Rc::new(principal),
                    fingerprint,
                    now + ttl,
                    expires_in.map(|d| now + d),
                    now,
                );
            }
            Ok(Ok(None)) => cache.invalidate(&id),
            _ => cache.refresh_failed(&id),
        }
    }));
}

/// Requests waiting on one verification, by (key id, digest of the presented
/// secret). Bounded: at most `auth.verify_queue` verifications at once (then
/// 503 `overloaded`), and each list holds the requests waiting on it, which
/// are bounded by the connections (one request at a time per connection,
/// `http.max_connections_per_shard` per shard; lease requests from other
/// shards stand for their requests), with gone requests pruned by `join`.
pub type Waiters = HashMap<(String, [u8; 32]), Vec<oneshot::Sender<Verified>>, ahash::RandomState>;

/// Shard-owned authentication state.
pub struct AuthState {
    /// Keys whose routing slot this shard owns.
    pub cache: std::cell::RefCell<crate::auth::KeyCache>,
    pub pending: std::cell::RefCell<Waiters>,
    /// Leases on keys other shards own.
    pub leases: std::cell::RefCell<LeaseTable>,
    pub asking: std::cell::RefCell<Askers>,
    pub limiter: std::cell::RefCell<crate::limit::RateLimiter>,
    pub failures: std::cell::RefCell<FailureThrottle>,
}

impl AuthState {
    pub fn new(config: &crate::config::AuthConfig) -> AuthState {
        AuthState {
            cache: std::cell::RefCell::new(crate::auth::KeyCache::new(
                config.cache_capacity,
                config.negative_capacity,
            )),
            pending: std::cell::RefCell::new(HashMap::with_hasher(ahash::RandomState::new())),
            leases: std::cell::RefCell::new(LeaseTable::new(config.cache_capacity)),
            asking: std::cell::RefCell::new(HashMap::with_hasher(ahash::RandomState::new())),
            limiter: std::cell::RefCell::new(crate::limit::RateLimiter::new(config.cache_capacity)),
            failures: std::cell::RefCell::new(FailureThrottle::new(config.negative_capacity)),
        }
    }
}

/// Engine-provided primitives the handlers need (timers, local tasks).
pub struct EngineHooks {
    pub sleep: fn(Duration) -> Pin<Box<dyn Future<Output = ()>>>,
    pub spawn: fn(Pin<Box<dyn Future<Output = ()>>>),
}
