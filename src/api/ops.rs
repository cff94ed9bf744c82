//! Operational routes: liveness, readiness (asks PostgreSQL through a query
//! worker), status and the Prometheus scrape.

use super::{ApiError, Handled, ShardCtx};
use crate::http::{Request, Response};
use serde_json::json;
use std::rc::Rc;

const HEALTHY: &[u8] = br#"{"status":"healthy"}"#;

pub fn health(_ctx: &Rc<ShardCtx>, _req: &Request) -> Handled {
    Handled::Ready(Ok(Response::json(200, HEALTHY.to_vec())))
}

pub fn ready(ctx: &Rc<ShardCtx>, _req: &Request) -> Handled {
    // The write path: the persistence core's last commit failed, or a ring is nearly full.
    if !ctx
        .shared
        .persist_stats
        .healthy
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Handled::Ready(Err(not_ready("the write path cannot commit")));
    }
    if ctx
        .shared
        .rings
        .iter()
        .any(|r| r.len() * 10 > r.capacity() * 9)
    {
        return Handled::Ready(Err(not_ready("the write path is saturated")));
    }
    let reply = match ctx.shared.queries.submit(|client| {
        client.simple_query("SELECT 1")?;
        Ok(())
    }) {
        Ok(reply) => reply,
        Err(_) => return Handled::Ready(Err(not_ready("query workers are saturated"))),
    };
    Handled::Pending(Box::pin(async move {
        match reply.await {
            Ok(Ok(())) => Ok(Response::json(
                200,
                serde_json::to_vec(&json!({"status": "ready", "database": "ok"}))
                    .unwrap_or_default(),
            )),
            Ok(Err(e)) => {
                log::debug!("readiness check failed: {e}");
                Err(not_ready("the database does not answer"))
            }
            Err(_) => Err(not_ready("query worker stopped")),
        }
    }))
}

fn not_ready(reason: &str) -> ApiError {
    ApiError::unavailable(format!("Not ready: {reason}."), 1)
}

pub fn status(ctx: &Rc<ShardCtx>, _req: &Request) -> Handled {
    let s = &ctx.shared;
    let shards: Vec<_> = s
        .plan
        .shards
        .iter()
        .enumerate()
        .map(|(id, core)| json!({"id": id, "core": core}))
        .collect();
    let body = json!({
        "status": if ctx.draining.get() { "draining" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": s.started.elapsed().as_secs(),
        "shards": shards,
        "ack_mode": s.config.ingest.ack,
        "engine": s.engine,
        "persistence_core": s.plan.persistence,
        "delivery_core": s.plan.delivery,
    });
    Handled::Ready(Ok(Response::json(
        200,
        serde_json::to_vec(&body).unwrap_or_default(),
    )))
}

pub fn metrics(ctx: &Rc<ShardCtx>, req: &Request) -> Handled {
    let token = &ctx.shared.config.ops.metrics_token;
    if !token.is_empty() {
        match super::bearer(req) {
            None => {
                return Handled::Ready(Err(ApiError::new(
                    401,
                    "missing_api_key",
                    "This route needs Authorization: Bearer <metrics_token>.",
                )))
            }
            Some(given) if !super::constant_time_eq(given.as_bytes(), token.as_bytes()) => {
                return Handled::Ready(Err(ApiError::new(401, "invalid_api_key", "Invalid token.")))
            }
            Some(_) => {}
        }
    }
    let mut text = crate::metrics::render(&ctx.shared.metrics);
    crate::metrics::render_persistence(&mut text, &ctx.shared.persist_stats, &ctx.shared.rings);
    Handled::Ready(Ok(Response::new(200)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .with_body(text.into_bytes())))
}
