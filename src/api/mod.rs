//! The router: a decoded request plus the shard's context in, a response (now,
//! or a future for work done on another thread) out. Engine-agnostic: the
//! glommio shards and any other engine call [`handle`] and write what it
//! returns. Order of checks follows API.md: framing errors are decided by the
//! codec before this point; then routing (404/405), then the route's handler.
//!
//! Where a request goes: [`route`] maps method and path to a [`Route`] and its
//! handler; handlers live in one file per area (`ops.rs`, ...).

mod acks;
mod auth;
mod body;
mod error;
pub mod event_body;
mod events;
mod inbox;
mod keys;
mod leases;
mod ops;

pub use auth::{AuthState, EngineHooks};
pub use leases::serve_lease;

/// The sending end of a shard's lease queue.
pub type LeaseSender = futures::channel::mpsc::Sender<crate::auth::lease::LeaseRequest>;
pub use error::ApiError;

use crate::auth::key::{HashParams, SecretDigester};
use crate::config::Config;
use crate::http::{HttpError, Method, Request, Response};
use crate::metrics::ShardMetrics;
use crate::store::QueryPool;
use crate::topology::CorePlan;
use std::cell::Cell;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Everything shards share, immutable after start (plus thread-safe handles).
pub struct Shared {
    pub config: Config,
    pub plan: CorePlan,
    pub started: Instant,
    pub engine: &'static str,
    pub queries: QueryPool,
    /// Argon2id verification and hashing (key administration) threads.
    pub verifier: QueryPool,
    pub hash_params: HashParams,
    /// Keys the cache digests of secrets (random per process).
    pub digester: SecretDigester,
    /// Each shard's ring into the persistence core, indexed by shard id.
    pub rings: Vec<crate::persist::Ring>,
    pub persist_stats: Arc<crate::persist::PersistStats>,
    /// One entry per shard, indexed by shard id.
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// Every shard's key-invalidation inbox, indexed by shard id.
    pub invalidations:
        Vec<futures::channel::mpsc::UnboundedSender<crate::auth::invalidation::Invalidation>>,
}

/// Long-polling inbox requests one shard holds at most.
const INBOX_WAITERS: usize = 10_000;

/// One shard's context: owned by its thread, never shared.
pub struct ShardCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub metrics: Arc<ShardMetrics>,
    /// Set at shutdown: answers carry `Connection: close`.
    pub draining: Cell<bool>,
    /// Requests being handled right now (shutdown waits for them).
    pub in_flight: Cell<usize>,
    /// Open connections on this shard.
    pub connections: Cell<usize>,
    /// The key cache, rate limiter and failure throttle this shard owns.
    pub auth: AuthState,
    pub hooks: EngineHooks,
    /// Long-polling inbox requests of the organizations this shard owns.
    pub inbox_waiters: inbox::InboxWaiters,
    /// (organization, Idempotency-Key) of requests being handled now.
    pub idempotency_in_flight: std::cell::RefCell<std::collections::HashSet<(uuid::Uuid, String)>>,
    /// Every shard's lease queue, indexed by shard id (see `auth::lease`).
    pub lease_peers: std::cell::RefCell<Vec<LeaseSender>>,
    /// Single acks waiting for (or in) their batch.
    pub acks: acks::AckBatcher,
    /// Mints the ids of events accepted here.
    pub ids: std::cell::RefCell<crate::ids::IdMint>,
    origin: Instant,
    request_prefix: u64,
    request_seq: Cell<u64>,
}

impl ShardCtx {
    pub fn new(
        id: usize,
        shared: Arc<Shared>,
        hooks: EngineHooks,
        lease_peers: Vec<LeaseSender>,
    ) -> ShardCtx {
        let metrics = shared.metrics[id].clone();
        let random = uuid::Uuid::new_v4().as_u64_pair().0;
        let auth = AuthState::new(&shared.config.auth);
        ShardCtx {
            id,
            shared,
            metrics,
            draining: Cell::new(false),
            in_flight: Cell::new(0),
            connections: Cell::new(0),
            auth,
            hooks,
            inbox_waiters: inbox::InboxWaiters::new(INBOX_WAITERS),
            idempotency_in_flight: Default::default(),
            lease_peers: std::cell::RefCell::new(lease_peers),
            acks: Default::default(),
            ids: Default::default(),
            origin: Instant::now(),
            request_prefix: random,
            request_seq: Cell::new(0),
        }
    }

    /// Monotonic nanoseconds since the shard started (rate-limit clock).
    pub fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn new_request_id(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.request_seq.get().wrapping_add(1);
        self.request_seq.set(n);
        let mut id = String::with_capacity(24);
        for shift in (0..64).step_by(4).rev() {
            id.push(HEX[(self.request_prefix >> shift) as usize & 15] as char);
        }
        for shift in (0..32).step_by(4).rev() {
            id.push(HEX[(n >> shift) as usize & 15] as char);
        }
        id
    }

    /// The client's `X-Request-ID` when it is 1–128 chars of `[A-Za-z0-9._:-]`, else a new one.
    pub fn request_id(&self, req: &Request) -> String {
        match req.header("x-request-id") {
            Some(v)
                if !v.is_empty()
                    && v.len() <= 128
                    && v.iter().all(|&b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
                    }) =>
            {
                String::from_utf8_lossy(v).into_owned()
            }
            _ => self.new_request_id(),
        }
    }
}

/// Routes, for dispatch and per-route metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    HealthReady,
    Status,
    Metrics,
    KeysGenerate,
    Keys,
    KeysRotate,
    Events,
    EventsBatch,
    Event,
    EventDelete,
    Inbox,
    Ack,
    AckBulk,
    /// No route matched (404) or the request never reached routing.
    Unmatched,
}

impl Route {
    pub const ALL: [Route; 15] = [
        Route::Health,
        Route::HealthReady,
        Route::Status,
        Route::Metrics,
        Route::KeysGenerate,
        Route::Keys,
        Route::KeysRotate,
        Route::Events,
        Route::EventsBatch,
        Route::Event,
        Route::EventDelete,
        Route::Inbox,
        Route::Ack,
        Route::AckBulk,
        Route::Unmatched,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::HealthReady => "/health/ready",
            Route::Status => "/status",
            Route::Metrics => "/metrics",
            Route::KeysGenerate => "/api/keys/generate",
            Route::Keys => "/api/keys",
            Route::KeysRotate => "/api/keys/rotate",
            Route::Events => "/api/events",
            Route::EventsBatch => "/api/events/batch",
            Route::Event => "/api/events/{id}",
            Route::EventDelete => "DELETE /api/events/{id}",
            Route::Inbox => "/api/inbox",
            Route::Ack => "/api/ack/{id}",
            Route::AckBulk => "/api/ack",
            Route::Unmatched => "unmatched",
        }
    }
}

/// What a handler produced: an answer now, or later from another thread.
pub enum Handled {
    Ready(Result<Response, ApiError>),
    Pending(Pin<Box<dyn Future<Output = Result<Response, ApiError>>>>),
}

type Handler = fn(&Rc<ShardCtx>, &Request) -> Handled;

/// A route's handler: open, or behind an API key and the rate limit.
#[derive(Clone, Copy)]
enum Target {
    Open(Handler),
    Authed(auth::AuthedHandler),
}

/// What the engine does with a request.
pub enum Reply {
    Ready(Response),
    /// The request belongs to another shard (its key's owner): hand the
    /// connection over with this request (see `shard::handoff`).
    Handoff {
        shard: usize,
        request: Request,
    },
    /// Await `future`; if it takes longer than the request timeout, send
    /// `timeout` instead (see [`Pending::timed_out`]).
    Pending(Pending),
}

pub struct Pending {
    pub future: Pin<Box<dyn Future<Output = Response>>>,
    route: Route,
    request_id: String,
    ctx: Rc<ShardCtx>,
}

impl Pending {
    /// The answer when the work did not finish within the request timeout.
    pub fn timed_out(self) -> Response {
        let r = ApiError::unavailable("The request could not be completed in time.", 1)
            .into_response(&self.request_id);
        finish(&self.ctx, self.route, self.request_id, r)
    }
}

/// Maps method and path to a route and its handler.
fn route(method: Method, path: &str) -> Result<(Route, Target), ApiError> {
    use Target::{Authed, Open};
    let (route, target): (Route, Target) = match (path, method) {
        ("/health" | "/health/live", Method::Get) => (Route::Health, Open(ops::health)),
        ("/health/ready", Method::Get) => (Route::HealthReady, Open(ops::ready)),
        ("/status", Method::Get) => (Route::Status, Open(ops::status)),
        ("/metrics", Method::Get) => (Route::Metrics, Open(ops::metrics)),
        ("/api/keys/generate", Method::Post) => (Route::KeysGenerate, Open(keys::generate)),
        ("/api/keys", Method::Get) => (Route::Keys, Authed(keys::show)),
        ("/api/keys/rotate", Method::Post) => (Route::KeysRotate, Authed(keys::rotate)),
        ("/api/events", Method::Post) => (Route::Events, Authed(events::create)),
        ("/api/events", _) => return Err(ApiError::method_not_allowed("POST")),
        ("/api/events/batch", Method::Post) => (Route::EventsBatch, Authed(events::create_batch)),
        ("/api/events/batch", _) => return Err(ApiError::method_not_allowed("POST")),
        (p, Method::Get) if is_event_path(p) => (Route::Event, Authed(events::get)),
        (p, Method::Delete) if is_event_path(p) => (Route::EventDelete, Authed(inbox::delete)),
        (p, _) if is_event_path(p) => return Err(ApiError::method_not_allowed("GET, DELETE")),
        ("/api/inbox", Method::Get) => (Route::Inbox, Authed(inbox::list)),
        ("/api/inbox", _) => return Err(ApiError::method_not_allowed("GET")),
        ("/api/ack", Method::Post) => (Route::AckBulk, Authed(inbox::ack_bulk)),
        ("/api/ack", _) => return Err(ApiError::method_not_allowed("POST")),
        (p, Method::Post) if is_ack_path(p) => (Route::Ack, Authed(inbox::ack)),
        (p, _) if is_ack_path(p) => return Err(ApiError::method_not_allowed("POST")),
        (
            "/health" | "/health/live" | "/health/ready" | "/status" | "/metrics" | "/api/keys",
            _,
        ) => return Err(ApiError::method_not_allowed("GET")),
        ("/api/keys/generate" | "/api/keys/rotate", _) => {
            return Err(ApiError::method_not_allowed("POST"))
        }
        _ => return Err(ApiError::not_found()),
    };
    Ok((route, target))
}

/// `/api/events/{id}` (one segment after the prefix).
fn is_event_path(path: &str) -> bool {
    path.strip_prefix("/api/events/")
        .is_some_and(|id| !id.is_empty() && !id.contains('/') && id != "batch")
}

/// `/api/ack/{id}`.
fn is_ack_path(path: &str) -> bool {
    path.strip_prefix("/api/ack/")
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// The largest body accepted for a method and path (the codec enforces it).
pub fn body_limit(config: &Config, _method: Method, path: &str) -> usize {
    if path == "/api/events/batch" {
        config.ingest.max_batch_body_bytes
    } else {
        config.ingest.max_body_bytes
    }
}

/// Whether a request must be served on its key's owner shard, which then
/// takes its connection (`shard::handoff`): rotation, so the old key's cache
/// entry goes before the answer, and ingests with an `Idempotency-Key`,
/// whose in-flight set lives there. Every other authenticated request is
/// served where it landed, on a lease from the owner (`auth::lease`).
fn needs_owner(route: Route, req: &Request) -> bool {
    match route {
        Route::KeysRotate => true,
        Route::Events | Route::EventsBatch => req.header_str("idempotency-key").is_some(),
        _ => false,
    }
}

/// Handles one request from `peer`.
pub fn handle(ctx: &Rc<ShardCtx>, req: Request, peer: Option<IpAddr>) -> Reply {
    let (route, target) = match route(req.method, req.path()) {
        Ok(found) => found,
        Err(e) => {
            let request_id = ctx.request_id(&req);
            let r = e.into_response(&request_id);
            return Reply::Ready(finish(ctx, Route::Unmatched, request_id, r));
        }
    };
    if needs_owner(route, &req) {
        let shards = ctx.shared.plan.shards.len();
        if shards > 1 {
            if let Some(owner) = auth::owner_of(&req, shards) {
                if owner != ctx.id {
                    ctx.metrics.cross_shard_messages.inc();
                    ctx.metrics.handoffs.inc();
                    return Reply::Handoff {
                        shard: owner,
                        request: req,
                    };
                }
            }
        }
    }
    let request_id = ctx.request_id(&req);
    let handled = match target {
        Target::Open(h) => h(ctx, &req),
        Target::Authed(h) => {
            let cost = if route == Route::EventsBatch {
                events::batch_cost(&req)
            } else {
                1
            };
            auth::authenticated(ctx, req, peer, cost, h)
        }
    };
    match handled {
        Handled::Ready(result) => {
            let r = result.unwrap_or_else(|e| e.into_response(&request_id));
            Reply::Ready(finish(ctx, route, request_id, r))
        }
        Handled::Pending(future) => {
            let c = ctx.clone();
            let id = request_id.clone();
            Reply::Pending(Pending {
                future: Box::pin(async move {
                    let r = future.await.unwrap_or_else(|e| e.into_response(&id));
                    finish(&c, route, id, r)
                }),
                route,
                request_id,
                ctx: ctx.clone(),
            })
        }
    }
}

/// The answer when a connection could not be handed to its owner shard.
pub fn handoff_failed(ctx: &ShardCtx) -> Response {
    let id = ctx.new_request_id();
    let r = ApiError::overloaded(1).into_response(&id);
    finish(ctx, Route::Unmatched, id, r)
}

/// The answer to a request the codec could not frame (400, 413, 431).
pub fn framing_error(ctx: &ShardCtx, e: &HttpError) -> Response {
    let id = ctx.new_request_id();
    let r = ApiError::from_framing(e).into_response(&id);
    finish(ctx, Route::Unmatched, id, r)
}

/// The answer to a request not received within the request timeout.
pub fn request_timeout(ctx: &ShardCtx) -> Response {
    let id = ctx.new_request_id();
    let r = ApiError::request_timeout().into_response(&id);
    finish(ctx, Route::Unmatched, id, r)
}

/// The answer when the shard is at its connection limit.
pub fn too_many_connections(ctx: &ShardCtx) -> Response {
    let id = ctx.new_request_id();
    let mut r = ApiError::overloaded(1).into_response(&id);
    r.close = true;
    finish(ctx, Route::Unmatched, id, r)
}

fn finish(ctx: &ShardCtx, route: Route, request_id: String, mut r: Response) -> Response {
    r.headers.push(("x-request-id", request_id.into()));
    if ctx.draining.get() {
        r.close = true;
    }
    ctx.metrics.request(route, r.status);
    r
}

/// A JSON response with `status`.
fn json_response<T: serde::Serialize + ?Sized>(status: u16, v: &T) -> Response {
    Response::json(status, serde_json::to_vec(v).unwrap_or_default())
}

/// Maps a query-worker failure to the API: a full queue is 503 `overloaded`,
/// anything else 503 `unavailable` (logged, not shown).
fn store_error(e: crate::store::StoreError) -> ApiError {
    match e {
        crate::store::StoreError::Overloaded => ApiError::overloaded(1),
        crate::store::StoreError::BadRow(why) => {
            log::error!("database work failed: {why}");
            ApiError::internal()
        }
        other => {
            log::warn!("database work failed: {other}");
            ApiError::unavailable("The database does not answer; retry later.", 1)
        }
    }
}

/// Awaits a worker's answer: a vanished worker is 500, a database failure
/// goes through `store_error`.
async fn answer<T>(reply: crate::store::Reply<T>) -> Result<T, ApiError> {
    reply
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(store_error)
}

/// The event id at the end of `path` after `prefix`, or 400.
fn path_id(path: &str, prefix: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(path.trim_start_matches(prefix)).map_err(|_| {
        ApiError::new(400, "validation_error", "The event id must be a UUID.")
            .details(serde_json::json!({"id": "must be a UUID"}))
    })
}

/// The token of `Authorization: Bearer <token>`, if present.
pub fn bearer(req: &Request) -> Option<&str> {
    let v = req.header_str("authorization")?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares secrets without an early exit on the first differing byte.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
