//! Events: `POST /api/events` (validate on the shard, mint the UUIDv7 id,
//! hand the event to the persistence core through this shard's ring, answer
//! 202 after the commit) and `GET /api/events/{id}`.

use super::body::{parse_object, require_json, FieldErrors};
use super::{answer, json_response, store_error, ApiError, Handled, ShardCtx};
use crate::auth::Principal;
use crate::http::{Request, Response};
use crate::persist::{Enqueue, EventRow, IdempotencyRecord, IngestItem};
use crate::store::ts;
use futures::channel::oneshot;
use serde_json::{json, Value};
use std::rc::Rc;
use std::time::Instant;

const FIELDS: [&str; 5] = ["type", "payload", "dedup_id", "source", "metadata"];

fn valid_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 255
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

/// An optional string field of at most 255 characters.
fn optional_text(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    errors: &mut FieldErrors,
) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= 255 => Some(s.clone()),
        Some(Value::String(_)) => {
            errors.add(field, "must be at most 255 characters");
            None
        }
        Some(_) => {
            errors.add(field, "must be a string");
            None
        }
    }
}

/// A validated event, ready for the ring.
pub struct NewEvent {
    pub event_type: String,
    pub payload: String,
    pub source: Option<String>,
    pub metadata: Option<String>,
    pub dedup_id: Option<String>,
}

/// Validates one event object (shared with the batch route).
pub fn validate(
    obj: &serde_json::Map<String, Value>,
    max_payload: usize,
) -> Result<NewEvent, ApiError> {
    let mut errors = FieldErrors::default();
    errors.unknown_fields(obj, &FIELDS);
    let event_type = match obj.get("type") {
        Some(Value::String(t)) if valid_type(t) => t.clone(),
        Some(Value::String(_)) => {
            errors.add("type", "must be 1-255 characters of A-Z a-z 0-9 . _ : / -");
            String::new()
        }
        Some(_) => {
            errors.add("type", "must be a string");
            String::new()
        }
        None => {
            errors.add("type", "is required");
            String::new()
        }
    };
    let payload = match obj.get("payload") {
        None => {
            errors.add("payload", "is required");
            String::new()
        }
        Some(Value::Null) => {
            errors.add("payload", "must not be null");
            String::new()
        }
        Some(v) => serde_json::to_string(v).unwrap_or_default(),
    };
    let source = optional_text(obj, "source", &mut errors);
    let dedup_id = optional_text(obj, "dedup_id", &mut errors);
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(serde_json::to_string(v).unwrap_or_default()),
        Some(_) => {
            errors.add("metadata", "must be an object");
            None
        }
    };
    errors.finish()?;
    if payload.len() > max_payload {
        return Err(ApiError::new(
            413,
            "payload_too_large",
            format!("The payload exceeds {max_payload} bytes once serialized."),
        )
        .details(json!({"limit_bytes": max_payload})));
    }
    Ok(NewEvent {
        event_type,
        payload,
        source,
        metadata,
        dedup_id,
    })
}

/// The `Idempotency-Key` header: bare, or a quoted structured-field string; 1–255 chars.
pub fn idempotency_key(req: &Request) -> Result<Option<String>, ApiError> {
    let Some(raw) = req.header("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            400,
            "validation_error",
            "Idempotency-Key must be 1-255 characters.",
        )
        .details(json!({"Idempotency-Key": "must be 1-255 characters, bare or a quoted string"}))
    };
    let raw = std::str::from_utf8(raw).map_err(|_| bad())?.trim();
    let key = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => raw.to_string(),
    };
    if key.is_empty() || key.chars().count() > 255 {
        return Err(bad());
    }
    Ok(Some(key))
}

/// Holds (organization, key) in the shard's in-flight set until dropped.
struct InFlightKey {
    ctx: Rc<ShardCtx>,
    slot: (uuid::Uuid, String),
}

impl InFlightKey {
    fn claim(ctx: &Rc<ShardCtx>, org: uuid::Uuid, key: &str) -> Option<InFlightKey> {
        let slot = (org, key.to_string());
        ctx.idempotency_in_flight
            .borrow_mut()
            .insert(slot.clone())
            .then(|| InFlightKey {
                ctx: ctx.clone(),
                slot,
            })
    }
}

impl Drop for InFlightKey {
    fn drop(&mut self) {
        self.ctx
            .idempotency_in_flight
            .borrow_mut()
            .remove(&self.slot);
    }
}

/// `POST /api/events`.
pub fn create(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let cfg = &ctx.shared.config.ingest;
    let event = match require_json(&req)
        .and_then(|()| parse_object(&req.body))
        .and_then(|obj| validate(&obj, cfg.max_payload_bytes))
    {
        Ok(e) => e,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let key = match idempotency_key(&req) {
        Ok(Some(k)) => k,
        Ok(None) => return enqueue(ctx, p.organization_id, event, None),
        Err(e) => return Handled::Ready(Err(e)),
    };
    // Idempotency-Key: checked before dedup_id. The organization's requests
    // all reach this (owner) shard, so the in-flight set sees every retry.
    let org = p.organization_id;
    let digest: Vec<u8> = <sha2::Sha256 as sha2::Digest>::digest(&req.body).to_vec();
    let Some(guard) = InFlightKey::claim(ctx, org, &key) else {
        return Handled::Ready(Err(ApiError::new(
            409,
            "request_in_progress",
            "A request with this Idempotency-Key is still in progress.",
        )));
    };
    let k = key.clone();
    let lookup = ctx.shared.queries.submit(move |client| {
        let row = client.query_opt(
            "SELECT request_digest, status_code, response_body FROM idempotency_keys
              WHERE organization_id = $1 AND idempotency_key = $2 AND expires_at > now()",
            &[&org, &k],
        )?;
        Ok(row.map(|r| {
            let (d, status, body): (Vec<u8>, Option<i32>, Option<Vec<u8>>) =
                (r.get(0), r.get(1), r.get(2));
            (d, status, body)
        }))
    });
    let lookup = match lookup {
        Ok(l) => l,
        Err(e) => return Handled::Ready(Err(store_error(e))),
    };
    let ctx = ctx.clone();
    Handled::Pending(Box::pin(async move {
        let _guard = guard;
        let found = answer(lookup).await?;
        match found {
            Some((stored, status, body)) if stored == digest => {
                let status = status.and_then(|s| u16::try_from(s).ok()).unwrap_or(202);
                Ok(Response::json(status, body.unwrap_or_default())
                    .header("idempotent-replayed", "true"))
            }
            Some(_) => Err(ApiError::new(
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request body.",
            )),
            None => match enqueue(&ctx, org, event, Some((key, digest))) {
                Handled::Ready(r) => r,
                Handled::Pending(f) => f.await,
            },
        }
    }))
}

/// Mints the id, hands the event to the persistence core, answers after the commit.
fn enqueue(
    ctx: &Rc<ShardCtx>,
    org: uuid::Uuid,
    event: NewEvent,
    idempotency: Option<(String, Vec<u8>)>,
) -> Handled {
    let cfg = &ctx.shared.config.ingest;
    let created_at = crate::time::now_micros();
    let id = ctx.ids.borrow_mut().next(created_at.max(0) as u64 / 1000);
    let (done, committed) = oneshot::channel();
    let answer = json!({
        "id": id,
        "type": event.event_type,
        "status": "accepted",
        "created_at": crate::time::rfc3339_micros(created_at),
        "dedup_id": event.dedup_id,
    });
    let idempotency = idempotency.map(|(key, request_digest)| IdempotencyRecord {
        organization_id: org,
        key,
        request_digest,
        status: 202,
        body: serde_json::to_vec(&answer).unwrap_or_default(),
    });
    let item = IngestItem {
        idempotency,
        rows: vec![EventRow {
            organization_id: org,
            id,
            event_type: event.event_type,
            source: event.source,
            payload: event.payload,
            metadata: event.metadata,
            dedup_id: event.dedup_id,
            created_at,
        }],
        queued: Instant::now(),
        shard: ctx.id,
        done: Some(done),
    };
    match ctx.shared.rings[ctx.id].try_push(item) {
        Enqueue::Queued => {}
        Enqueue::Full(_) => return Handled::Ready(Err(ApiError::overloaded(1))),
        Enqueue::Stopped(_) => {
            return Handled::Ready(Err(ApiError::unavailable("The write path is stopping.", 1)))
        }
    }
    ctx.metrics.events_accepted.inc();
    if cfg.ack == "memory" {
        let mut a = answer;
        a["durability"] = json!("memory");
        // Long-polling readers are woken by the commit (the persistence core
        // tells every shard), not the enqueue. A duplicate dedup_id is
        // dropped silently here: the 202 went out already.
        drop(committed);
        return Handled::Ready(Ok(json_response(202, &a)));
    }
    Handled::Pending(Box::pin(async move {
        match committed.await {
            Ok(Ok(dups)) => {
                if let Some(Some(original)) = dups.first() {
                    return Err(duplicate(&answer["dedup_id"], *original));
                }
                Ok(json_response(202, &answer))
            }
            _ => Err(ApiError::unavailable(
                "The event could not be stored: the database does not answer. It was not accepted.",
                1,
            )),
        }
    }))
}

/// 409 for an event whose `dedup_id` the organization used within 24 h.
fn duplicate(dedup_id: &Value, original: uuid::Uuid) -> ApiError {
    ApiError::new(
        409,
        "duplicate_event",
        "An event with this dedup_id was accepted within the last 24 hours.",
    )
    .details(json!({"dedup_id": dedup_id, "event_id": original}))
}

/// What a batch costs against the rate limit: one per item (counted without
/// building the items; a body that does not parse costs one and fails later).
pub fn batch_cost(req: &Request) -> u64 {
    #[derive(serde::Deserialize)]
    struct Count {
        events: Vec<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Count>(&req.body).map_or(1, |c| (c.events.len() as u64).clamp(1, 1000))
}

/// `POST /api/events/batch`: each item validated on its own; every accepted
/// item is committed in one transaction before the answer.
pub fn create_batch(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let cfg = &ctx.shared.config.ingest;
    let items = require_json(&req)
        .and_then(|()| parse_object(&req.body))
        .and_then(|obj| {
            let mut errors = FieldErrors::default();
            errors.unknown_fields(&obj, &["events"]);
            let items = match obj.get("events") {
                Some(Value::Array(list)) if !list.is_empty() && list.len() <= 1000 => list.clone(),
                Some(Value::Array(_)) => {
                    errors.add("events", "must hold 1 to 1000 events");
                    Vec::new()
                }
                Some(_) => {
                    errors.add("events", "must be a list of events");
                    Vec::new()
                }
                None => {
                    errors.add("events", "is required");
                    Vec::new()
                }
            };
            errors.finish().map(|()| items)
        });
    let items = match items {
        Ok(i) => i,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let created_at = crate::time::now_micros();
    let mut rows = Vec::new();
    let mut results = Vec::with_capacity(items.len());
    // For each row: its position in `results` and its dedup_id.
    let mut slots: Vec<(usize, Option<String>)> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let checked = match item {
            Value::Object(obj) => validate(obj, cfg.max_payload_bytes),
            _ => Err(ApiError::new(
                400,
                "validation_error",
                "Each event must be a JSON object.",
            )),
        };
        match checked {
            Ok(e) => {
                let id = ctx.ids.borrow_mut().next(created_at.max(0) as u64 / 1000);
                results.push(json!({"index": index, "id": id, "status": "accepted"}));
                slots.push((results.len() - 1, e.dedup_id.clone()));
                rows.push(EventRow {
                    organization_id: p.organization_id,
                    id,
                    event_type: e.event_type,
                    source: e.source,
                    payload: e.payload,
                    metadata: e.metadata,
                    dedup_id: e.dedup_id,
                    created_at,
                });
            }
            Err(e) => {
                let mut r = json!({"index": index, "code": e.code, "error": e.message});
                if let Some(d) = e.details {
                    r["details"] = d;
                }
                results.push(r);
            }
        }
    }
    let accepted = rows.len();
    let rejected = results.len() - accepted;
    if accepted == 0 {
        return Handled::Ready(Err(ApiError::new(
            400,
            "validation_error",
            "No event of the batch is valid.",
        )
        .details(json!({"results": results}))));
    }
    let (done, committed) = oneshot::channel();
    let item = IngestItem {
        rows,
        idempotency: None,
        queued: Instant::now(),
        shard: ctx.id,
        done: Some(done),
    };
    match ctx.shared.rings[ctx.id].try_push(item) {
        Enqueue::Queued => {}
        Enqueue::Full(_) => return Handled::Ready(Err(ApiError::overloaded(1))),
        Enqueue::Stopped(_) => {
            return Handled::Ready(Err(ApiError::unavailable("The write path is stopping.", 1)))
        }
    }
    ctx.metrics.events_accepted.add(accepted as u64);
    if cfg.ack == "memory" {
        let answer = json!({"accepted": accepted, "rejected": rejected, "results": results, "durability": "memory"});
        drop(committed);
        return Handled::Ready(Ok(json_response(202, &answer)));
    }
    Handled::Pending(Box::pin(async move {
        match committed.await {
            Ok(Ok(dups)) => {
                let mut duplicates = 0;
                for ((slot, dedup_id), dup) in slots.iter().zip(&dups) {
                    if let Some(original) = dup {
                        duplicates += 1;
                        let e = duplicate(&json!(dedup_id), *original);
                        results[*slot] = json!({
                            "index": results[*slot]["index"],
                            "code": e.code,
                            "error": e.message,
                            "details": e.details,
                        });
                    }
                }
                let answer = json!({
                    "accepted": accepted - duplicates,
                    "rejected": rejected + duplicates,
                    "results": results,
                });
                Ok(json_response(202, &answer))
            }
            _ => Err(ApiError::unavailable(
                "The events could not be stored: the database does not answer. None was accepted.",
                1,
            )),
        }
    }))
}

/// The columns `event_json` reads, in its order.
pub fn event_columns() -> String {
    format!(
        "id, type, source, payload, metadata, dedup_id, status, attempts, last_error, {}, {}, {}",
        ts("created_at"),
        ts("updated_at"),
        ts("delivered_at")
    )
}

/// An event row (selected with `event_columns`) as the API shows it.
pub fn event_json(r: &postgres::Row) -> Value {
    json!({
        "id": r.get::<_, uuid::Uuid>(0),
        "type": r.get::<_, String>(1),
        "source": r.get::<_, Option<String>>(2),
        "payload": r.get::<_, Value>(3),
        "metadata": r.get::<_, Option<Value>>(4),
        "dedup_id": r.get::<_, Option<String>>(5),
        "status": r.get::<_, String>(6),
        "attempts": r.get::<_, i32>(7),
        "last_error": r.get::<_, Option<String>>(8),
        "created_at": r.get::<_, String>(9),
        "updated_at": r.get::<_, String>(10),
        "delivered_at": r.get::<_, Option<String>>(11),
    })
}

/// `GET /api/events/{id}`.
pub fn get(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let id = match super::path_id(req.path(), "/api/events/") {
        Ok(id) => id,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let org = p.organization_id;
    let job = ctx.shared.queries.submit(move |client| {
        let row = client.query_opt(
            &format!(
                "SELECT {} FROM events WHERE organization_id = $1 AND id = $2",
                event_columns()
            ),
            &[&org, &id],
        )?;
        Ok(row.map(|r| {
            let mut v = event_json(&r);
            v["deliveries"] = json!([]);
            v
        }))
    });
    let reply = match job {
        Ok(r) => r,
        Err(e) => return Handled::Ready(Err(store_error(e))),
    };
    Handled::Pending(Box::pin(async move {
        match answer(reply).await? {
            Some(v) => Ok(json_response(200, &v)),
            None => Err(ApiError::not_found()),
        }
    }))
}
