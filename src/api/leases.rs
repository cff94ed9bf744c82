//! Leases on the request path (`crate::auth::lease` holds the table and the
//! messages): the borrowing side asks a key's owner shard for a lease and
//! shares the ask among concurrent requests; the owner side answers from its
//! key cache, verifying on a miss, and charges the organization's limit.

use super::auth::{join, limit_for_tier, refresh, verify, Verified};
use super::ShardCtx;
use crate::auth::lease::{lease_size, LeaseAnswer, LeaseRequest, LeaseUse, LEASE_TTL};
use crate::auth::{Lookup, Principal};
use crate::limit::Decision;
use futures::channel::oneshot;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

/// A request for a key another shard owns, needing a lease.
pub(super) struct Ask {
    pub owner: usize,
    pub key_id: String,
    pub secret: String,
    pub digest: [u8; 32],
    pub cost: u64,
    pub refund: u64,
}

/// What asking the owner concluded, for the asker and for the requests
/// that joined its ask.
#[derive(Clone)]
pub enum Borrowed {
    /// The asker's request is admitted with this decision.
    Admitted(Rc<Principal>, Decision),
    /// (To joined requests) a lease is installed: spend from it.
    Granted,
    Limited(Decision),
    Unauthorized,
    Unavailable,
    Overloaded,
    /// The owner's verification failed without an answer (a worker panic).
    Internal,
}

/// The asker's entry in `asking`: removed when the ask is answered, and also
/// when the asking request goes away first (it timed out), so a later
/// request never joins an ask nobody will answer; the joined requests then
/// see their senders dropped and answer 503.
struct AskSlot<'a> {
    ctx: &'a ShardCtx,
    slot: Option<(String, [u8; 32])>,
}

impl AskSlot<'_> {
    /// Takes the entry out; the requests that joined the ask.
    fn release(&mut self) -> Vec<oneshot::Sender<Borrowed>> {
        let slot = self.slot.take();
        let mut asking = self.ctx.auth.asking.borrow_mut();
        slot.and_then(|s| asking.remove(&s)).unwrap_or_default()
    }
}

impl Drop for AskSlot<'_> {
    fn drop(&mut self) {
        if let (Some(slot), Ok(mut asking)) =
            (self.slot.take(), self.ctx.auth.asking.try_borrow_mut())
        {
            asking.remove(&slot);
        }
    }
}

/// Gets `ask.cost` requests of a lease of `ask.key_id` from its owner shard,
/// joining an ask already in flight for the same key and secret.
pub(super) async fn borrow(ctx: &Rc<ShardCtx>, mut ask: Ask) -> Borrowed {
    for _ in 0..4 {
        let slot = (ask.key_id.clone(), ask.digest);
        let joined = {
            let mut asking = ctx.auth.asking.borrow_mut();
            match asking.get_mut(&slot) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    join(waiters, tx);
                    Some(rx)
                }
                None => {
                    asking.insert(slot.clone(), Vec::new());
                    None
                }
            }
        };
        let outcome = match joined {
            Some(rx) => rx.await.unwrap_or(Borrowed::Unavailable),
            None => {
                let mut asked = AskSlot {
                    ctx,
                    slot: Some(slot),
                };
                let outcome = ask_owner(ctx, &ask).await;
                let waiters = asked.release();
                let shared = match &outcome {
                    Borrowed::Admitted(..) => Borrowed::Granted,
                    other => other.clone(),
                };
                for w in waiters {
                    let _ = w.send(shared.clone());
                }
                return outcome;
            }
        };
        if !matches!(outcome, Borrowed::Granted) {
            return outcome;
        }
        let leased =
            ctx.auth
                .leases
                .borrow_mut()
                .spend(&ask.key_id, &ask.digest, ask.cost, Instant::now());
        match leased {
            LeaseUse::Spent(principal, d) => {
                ctx.metrics.lease_hits.inc();
                return Borrowed::Admitted(principal, d);
            }
            LeaseUse::WrongSecret => return Borrowed::Unauthorized,
            LeaseUse::Ask { refund } => ask.refund = refund,
        }
    }
    Borrowed::Overloaded
}

/// One lease request to the owner shard; installs what it grants, less
/// the asker's own cost.
async fn ask_owner(ctx: &Rc<ShardCtx>, ask: &Ask) -> Borrowed {
    let (tx, rx) = oneshot::channel();
    let request = LeaseRequest {
        key_id: ask.key_id.clone(),
        secret: ask.secret.clone(),
        digest: ask.digest,
        cost: ask.cost,
        refund: ask.refund,
        reply: tx,
    };
    let sent = match ctx.lease_peers.borrow_mut().get_mut(ask.owner) {
        Some(peer) => peer.try_send(request).is_ok(),
        None => false,
    };
    if !sent {
        return Borrowed::Overloaded;
    }
    ctx.metrics.cross_shard_messages.inc();
    match rx.await {
        Ok(LeaseAnswer::Granted {
            principal,
            tokens,
            decision,
            expires,
        }) => {
            let principal = Rc::new(principal);
            let left = tokens.saturating_sub(ask.cost);
            ctx.auth.leases.borrow_mut().install(
                principal.clone(),
                ask.digest,
                left,
                decision,
                expires,
                Instant::now(),
            );
            let mut d = decision;
            d.remaining = d.remaining.saturating_add(left);
            Borrowed::Admitted(principal, d)
        }
        Ok(LeaseAnswer::Limited(d)) => Borrowed::Limited(d),
        Ok(LeaseAnswer::Unauthorized) => Borrowed::Unauthorized,
        Ok(LeaseAnswer::Overloaded) => Borrowed::Overloaded,
        Ok(LeaseAnswer::Internal) => Borrowed::Internal,
        Ok(LeaseAnswer::Unavailable) | Err(_) => Borrowed::Unavailable,
    }
}

/// On the owner shard: answers another shard's lease request from the key
/// cache (verifying the key first on a miss) and the organization's limit.
pub fn serve_lease(ctx: &Rc<ShardCtx>, r: LeaseRequest) {
    let now = Instant::now();
    let lookup = ctx
        .auth
        .cache
        .borrow_mut()
        .lookup(&r.key_id, &r.digest, now);
    let stale = matches!(lookup, Lookup::Stale(_));
    match lookup {
        Lookup::Hit(principal) | Lookup::Stale(principal) => {
            ctx.metrics.auth_cache_hits.inc();
            if stale {
                refresh(ctx, &r.key_id);
            }
            let answer = grant(ctx, &principal, &r, now);
            let _ = r.reply.send(answer);
        }
        Lookup::WrongSecret | Lookup::Unknown => {
            ctx.metrics.auth_cache_hits.inc();
            let _ = r.reply.send(LeaseAnswer::Unauthorized);
        }
        Lookup::Miss | Lookup::Expired => {
            ctx.metrics.auth_cache_misses.inc();
            let reread = matches!(lookup, Lookup::Expired);
            let waiter = match verify(ctx, &r.key_id, &r.secret, r.digest, reread) {
                Ok(w) => w,
                Err(_) => {
                    let _ = r.reply.send(LeaseAnswer::Overloaded);
                    return;
                }
            };
            let c = ctx.clone();
            (ctx.hooks.spawn)(Box::pin(async move {
                let answer = match waiter.await.unwrap_or(Verified::Unavailable) {
                    Verified::Valid(principal) => grant(&c, &principal, &r, Instant::now()),
                    Verified::Unauthorized => LeaseAnswer::Unauthorized,
                    Verified::Unavailable => LeaseAnswer::Unavailable,
                    Verified::Internal => LeaseAnswer::Internal,
                };
                let _ = r.reply.send(answer);
            }));
        }
    }
}

/// Charges a lease's worth of `principal`'s quota (after taking back the
/// asker's unused tokens) and describes it.
fn grant(
    ctx: &Rc<ShardCtx>,
    principal: &Rc<Principal>,
    r: &LeaseRequest,
    now: Instant,
) -> LeaseAnswer {
    let limit = limit_for_tier(ctx, principal.tier());
    let org = principal.organization_id;
    let now_ns = ctx.now_ns();
    let (d, tokens) = {
        let mut limiter = ctx.auth.limiter.borrow_mut();
        if r.refund > 0 {
            limiter.refund(org, limit, r.refund, now_ns);
        }
        limiter.grant(org, limit, r.cost, lease_size(limit).max(r.cost), now_ns)
    };
    if tokens == 0 {
        return LeaseAnswer::Limited(d);
    }
    ctx.metrics.leases_granted.inc();
    let valid = ctx.auth.cache.borrow().valid_until(&r.key_id);
    let expires = valid.map_or(now + LEASE_TTL, |v| v.min(now + LEASE_TTL));
    LeaseAnswer::Granted {
        principal: (**principal).clone(),
        tokens,
        decision: d,
        expires,
    }
}

/// Requests waiting on one lease ask, by (key id, digest of the presented
/// secret). Bounded by the connections, as a channel bound would be
/// redundant: an entry is one request in flight (a connection has one at a
/// time, `http.max_connections_per_shard` per shard) that asked the owner
/// over its bounded lease queue; the requests that join it are in flight
/// too, and gone ones are pruned by `join`. The entry goes when the ask is
/// answered, and the owner answers every ask it takes (a full queue is
/// refused at once).
pub type Askers = HashMap<(String, [u8; 32]), Vec<oneshot::Sender<Borrowed>>, ahash::RandomState>;
