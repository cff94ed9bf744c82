//! The consumer side: `GET /api/inbox` (oldest first, keyset cursor on the
//! time-ordered event id), `POST /api/ack/{id}`, bulk `POST /api/ack` and
//! `DELETE /api/events/{id}`. Every query is scoped by the caller's
//! organization: another organization's event is simply not found.

use super::body::{parse_object, require_json, FieldErrors};
use super::{answer, json_response, store_error, ApiError, Handled, ShardCtx};
use crate::auth::Principal;
use crate::http::{Request, Response};
use crate::store::events::{Page, PageFilter};
use crate::store::ts;
use base64::Engine as _;
use serde_json::{json, Value};
use std::rc::Rc;

const STATUSES: [&str; 5] = ["pending", "delivered", "failed", "dead_letter", "all"];

/// Parsed inbox query parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxQuery {
    pub status: String,
    pub event_type: Option<String>,
    pub limit: i64,
    pub after: Option<uuid::Uuid>,
    pub wait: u64,
}

fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn encode_cursor(id: uuid::Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
}

fn decode_cursor(c: &str) -> Option<uuid::Uuid> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    uuid::Uuid::from_slice(&bytes).ok()
}

/// Parses and validates the query string; 400 naming each bad parameter.
pub fn parse_query(query: Option<&str>) -> Result<InboxQuery, ApiError> {
    let mut q = InboxQuery {
        status: "pending".into(),
        event_type: None,
        limit: 100,
        after: None,
        wait: 0,
    };
    let mut errors = FieldErrors::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode_component(v);
        match k {
            "status" if STATUSES.contains(&v.as_str()) => q.status = v,
            "status" => errors.add(
                "status",
                "must be pending, delivered, failed, dead_letter or all",
            ),
            "type" if !v.is_empty() && v.len() <= 255 && !v.contains('\0') => {
                q.event_type = Some(v)
            }
            "type" => errors.add("type", "must be 1-255 characters, without NUL"),
            "limit" => match v.parse::<i64>() {
                Ok(n) if (1..=1000).contains(&n) => q.limit = n,
                _ => errors.add("limit", "must be an integer from 1 to 1000"),
            },
            "cursor" => match decode_cursor(&v) {
                Some(id) => q.after = Some(id),
                None => errors.add("cursor", "is not a cursor this server issued"),
            },
            "wait" => match v.parse::<u64>() {
                Ok(n) if n <= 30 => q.wait = n,
                _ => errors.add("wait", "must be whole seconds from 0 to 30"),
            },
            other => errors.add(other, "unknown parameter"),
        }
    }
    errors.finish().map(|()| q)
}

/// Submits the read of one inbox page. Its events are encoded to JSON on
/// the query worker (`store::events`), so the shard only frames the body:
/// building and dropping a `Value` tree per event cost the shard about
/// 26 000 instructions per event (`perf/instructions`).
fn submit_page(
    ctx: &ShardCtx,
    org: uuid::Uuid,
    q: &InboxQuery,
) -> Result<crate::store::Reply<Page>, ApiError> {
    let filter = PageFilter {
        status: (q.status != "all").then(|| q.status.clone()),
        event_type: q.event_type.clone(),
        after: q.after,
        limit: q.limit,
    };
    ctx.shared
        .queries
        .submit(move |client| crate::store::events::inbox_page(client, org, &filter))
        .map_err(store_error)
}

fn page_response(page: Page, limit: i64) -> Response {
    let next = if page.has_more {
        page.last_id.map(encode_cursor)
    } else {
        None
    };
    let pagination = json!({
        "next_cursor": next,
        "has_more": page.has_more,
        "limit": limit,
        "total_undelivered": page.total_undelivered,
    });
    let mut body = Vec::with_capacity(page.events_json.len() + 160);
    body.extend_from_slice(b"{\"events\":");
    body.extend_from_slice(&page.events_json);
    body.extend_from_slice(b",\"pagination\":");
    if serde_json::to_writer(&mut body, &pagination).is_err() {
        body.extend_from_slice(b"null");
    }
    body.push(b'}');
    Response::json(200, body)
}

/// `GET /api/inbox`. With `wait` and an empty first page, the request waits
/// (on this shard, which owns the organization and so sees every commit of
/// its events) until a matching event is committed or the time passes, then
/// reads the page again.
pub fn list(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let q = match parse_query(req.query()) {
        Ok(q) => q,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let org = p.organization_id;
    let reply = match submit_page(ctx, org, &q) {
        Ok(r) => r,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let ctx = ctx.clone();
    Handled::Pending(Box::pin(async move {
        let page = answer(reply).await?;
        if page.count > 0 || q.wait == 0 {
            return Ok(page_response(page, q.limit));
        }
        let Some(woken) = ctx.inbox_waiters.wait(org, q.event_type.clone()) else {
            return Ok(page_response(page, q.limit));
        };
        let timer = (ctx.hooks.sleep)(std::time::Duration::from_secs(q.wait));
        futures::future::select(woken, timer).await;
        let again = submit_page(&ctx, org, &q)?;
        let page = answer(again).await?;
        Ok(page_response(page, q.limit))
    }))
}

/// One waiting request: its type filter and how to wake it.
type Waiter = (Option<String>, futures::channel::oneshot::Sender<()>);

/// Inbox requests waiting for a commit, per organization, on one shard.
pub struct InboxWaiters {
    waiters:
        std::cell::RefCell<std::collections::HashMap<uuid::Uuid, Vec<Waiter>, ahash::RandomState>>,
    capacity: usize,
    count: std::cell::Cell<usize>,
}

impl InboxWaiters {
    pub fn new(capacity: usize) -> InboxWaiters {
        InboxWaiters {
            waiters: std::cell::RefCell::new(std::collections::HashMap::with_hasher(
                ahash::RandomState::new(),
            )),
            capacity,
            count: std::cell::Cell::new(0),
        }
    }

    /// A future that completes at the next commit for `org` (of `event_type`,
    /// when given); `None` when the shard already holds its limit of waiters.
    pub fn wait(
        &self,
        org: uuid::Uuid,
        event_type: Option<String>,
    ) -> Option<futures::channel::oneshot::Receiver<()>> {
        let mut map = self.waiters.borrow_mut();
        if self.count.get() >= self.capacity {
            // Drop the waiters whose requests have gone away.
            map.retain(|_, list| {
                list.retain(|(_, tx)| !tx.is_canceled());
                !list.is_empty()
            });
            self.count.set(map.values().map(Vec::len).sum());
            if self.count.get() >= self.capacity {
                return None;
            }
        }
        let (tx, rx) = futures::channel::oneshot::channel();
        map.entry(org).or_default().push((event_type, tx));
        self.count.set(self.count.get() + 1);
        Some(rx)
    }

    /// An event of `org` with `event_type` was committed.
    pub fn wake(&self, org: uuid::Uuid, event_type: &str) {
        let mut map = self.waiters.borrow_mut();
        let Some(list) = map.get_mut(&org) else {
            return;
        };
        let before = list.len();
        let mut kept = Vec::new();
        for (filter, tx) in list.drain(..) {
            if filter.as_deref().is_none_or(|f| f == event_type) {
                let _ = tx.send(());
            } else if !tx.is_canceled() {
                kept.push((filter, tx));
            }
        }
        let removed = before - kept.len();
        if kept.is_empty() {
            map.remove(&org);
        } else {
            *list = kept;
        }
        self.count.set(self.count.get().saturating_sub(removed));
    }
}

fn ack_ids(
    ctx: &Rc<ShardCtx>,
    org: uuid::Uuid,
    ids: Vec<uuid::Uuid>,
) -> Result<crate::store::Reply<Vec<(uuid::Uuid, String)>>, ApiError> {
    ctx.shared
        .queries
        .submit(move |client| {
            let rows = client.query(
                &format!(
                    "UPDATE events
                        SET status = 'delivered', updated_at = now(),
                            delivered_at = coalesce(delivered_at, now()), next_attempt_at = NULL
                      WHERE organization_id = $1 AND id = ANY($2)
                  RETURNING id, {}",
                    ts("delivered_at")
                ),
                &[&org, &ids],
            )?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .map_err(store_error)
}

/// `POST /api/ack/{id}` (and, with `no_content`, `DELETE /api/events/{id}`),
/// batched with the shard's other single acks (`acks.rs`).
fn ack_one(
    ctx: &Rc<ShardCtx>,
    req: &Request,
    p: &Principal,
    prefix: &str,
    no_content: bool,
) -> Handled {
    let id = match super::path_id(req.path(), prefix) {
        Ok(id) => id,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let outcome = match super::acks::ack(ctx, p.organization_id, id) {
        Ok(r) => r,
        Err(e) => return Handled::Ready(Err(e)),
    };
    Handled::Pending(Box::pin(async move {
        let acked = outcome.await.map_err(|_| ApiError::internal())??;
        let Some(at) = acked else {
            return Err(ApiError::not_found());
        };
        if no_content {
            return Ok(Response::new(204));
        }
        Ok(json_response(
            200,
            &json!({"id": id, "status": "delivered", "acknowledged_at": at, "success": true}),
        ))
    }))
}

pub fn ack(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    ack_one(ctx, &req, &p, "/api/ack/", false)
}

pub fn delete(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    ack_one(ctx, &req, &p, "/api/events/", true)
}

/// `POST /api/ack` with `{"ids": [...]}` (at most 1000).
pub fn ack_bulk(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let ids = require_json(&req)
        .and_then(|()| parse_object(&req.body))
        .and_then(|obj| {
            let mut errors = FieldErrors::default();
            errors.unknown_fields(&obj, &["ids"]);
            let mut ids = Vec::new();
            match obj.get("ids") {
                Some(Value::Array(list)) if !list.is_empty() && list.len() <= 1000 => {
                    for v in list {
                        match v.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()) {
                            Some(id) => ids.push(id),
                            None => {
                                errors.add("ids", "must all be UUIDs");
                                break;
                            }
                        }
                    }
                }
                Some(Value::Array(_)) => errors.add("ids", "must hold 1 to 1000 ids"),
                Some(_) => errors.add("ids", "must be a list of UUIDs"),
                None => errors.add("ids", "is required"),
            }
            errors.finish().map(|()| ids)
        });
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let reply = match ack_ids(ctx, p.organization_id, ids.clone()) {
        Ok(r) => r,
        Err(e) => return Handled::Ready(Err(e)),
    };
    Handled::Pending(Box::pin(async move {
        let rows = answer(reply).await?;
        let found: std::collections::HashSet<uuid::Uuid> = rows.iter().map(|(id, _)| *id).collect();
        let mut not_found: Vec<String> = Vec::new();
        for id in &ids {
            if !found.contains(id) && !not_found.contains(&id.to_string()) {
                not_found.push(id.to_string());
            }
        }
        Ok(json_response(
            200,
            &json!({"acknowledged": found.len(), "not_found": not_found, "success": true}),
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters() {
        let q = parse_query(None).expect("defaults");
        assert_eq!((q.status.as_str(), q.limit, q.wait), ("pending", 100, 0));
        let id = uuid::Uuid::now_v7();
        let q = parse_query(Some(&format!(
            "status=all&type=user.created&limit=5&wait=3&cursor={}",
            encode_cursor(id)
        )))
        .expect("parses");
        assert_eq!(q.event_type.as_deref(), Some("user.created"));
        assert_eq!(q.after, Some(id));
        assert_eq!(decode_component("a%2Fb+c"), "a/b c");
        for bad in [
            "status=done",
            "limit=0",
            "limit=1001",
            "limit=x",
            "wait=31",
            "cursor=%%%",
            "nope=1",
            "type=",
            "type=a%00b",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }
}
