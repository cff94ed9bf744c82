//! Events: `POST /api/events` (validate on the shard, mint the UUIDv7 id,
//! hand the event to the persistence core through this shard's ring, answer
//! 202 after the commit) and `GET /api/events/{id}`.

use super::body::require_json;
use super::event_body::{parse_batch, parse_event, NewEvent};
use super::{answer, json_response, store_error, ApiError, Handled, ShardCtx};
use crate::auth::Principal;
use crate::http::{Request, Response};
use crate::persist::{Enqueue, EventRow, IdempotencyRecord, IngestItem, Outcome, RowOutcome};
use futures::channel::oneshot;
use serde_json::{json, Value};
use std::rc::Rc;
use std::time::Instant;

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
        .details(json!({"Idempotency-Key": "must be 1-255 characters without NUL, bare or a quoted string"}))
    };
    let raw = std::str::from_utf8(raw).map_err(|_| bad())?.trim();
    let key = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => raw.to_string(),
    };
    if key.is_empty() || key.chars().count() > 255 || key.contains('\0') {
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
    let event =
        match require_json(&req).and_then(|()| parse_event(&req.body, cfg.max_payload_bytes)) {
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
    let row = EventRow {
        organization_id: org,
        id,
        event_type: event.event_type,
        source: event.source,
        payload: event.payload,
        metadata: event.metadata,
        dedup_id: event.dedup_id,
        created_at,
    };
    if let Err(e) = push(ctx, vec![row], idempotency, done) {
        return Handled::Ready(Err(e));
    }
    ctx.metrics.events_accepted.inc();
    if ctx.shared.config.ingest.ack == "memory" {
        let mut a = answer;
        a["durability"] = json!("memory");
        // Long-polling readers are woken by the commit (the persistence core
        // tells every shard), not the enqueue. A duplicate dedup_id is
        // dropped silently here: the 202 went out already.
        drop(committed);
        return Handled::Ready(Ok(json_response(202, &a)));
    }
    Handled::Pending(Box::pin(async move {
        let outcome = committed.await.map_err(|_| ApiError::internal())?;
        match outcome.first() {
            Some(RowOutcome::Stored) => Ok(json_response(202, &answer)),
            Some(other) => Err(row_error(other, &answer["dedup_id"])),
            None => Err(ApiError::internal()),
        }
    }))
}

/// Hands one request's rows to the persistence core through this shard's ring.
fn push(
    ctx: &ShardCtx,
    rows: Vec<EventRow>,
    idempotency: Option<IdempotencyRecord>,
    done: oneshot::Sender<Outcome>,
) -> Result<(), ApiError> {
    let item = IngestItem {
        rows,
        idempotency,
        queued: Instant::now(),
        shard: ctx.id,
        done: Some(done),
    };
    match ctx.shared.rings[ctx.id].try_push(item) {
        Enqueue::Queued => Ok(()),
        Enqueue::Full(_) => Err(ApiError::overloaded(1)),
        Enqueue::Stopped(_) => Err(ApiError::unavailable("The write path is stopping.", 1)),
    }
}

/// The error for a row the persistence core did not store.
fn row_error(outcome: &RowOutcome, dedup_id: &Value) -> ApiError {
    match outcome {
        RowOutcome::Duplicate(original) => duplicate(dedup_id, *original),
        RowOutcome::Refused(r) => ApiError::refused(r),
        RowOutcome::Stored | RowOutcome::Unavailable => ApiError::unavailable(
            "The event could not be stored: the database does not answer. It was not accepted.",
            1,
        ),
    }
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

/// One item's entry in a batch answer: accepted, or its error.
fn item_result(index: usize, outcome: Result<uuid::Uuid, &ApiError>) -> Value {
    match outcome {
        Ok(id) => json!({"index": index, "id": id, "status": "accepted"}),
        Err(e) => {
            let mut r = json!({"index": index, "code": e.code, "error": e.message});
            if let Some(d) = &e.details {
                r["details"] = d.clone();
            }
            r
        }
    }
}

/// `POST /api/events/batch`: each item validated on its own; every accepted
/// item is committed in one transaction before the answer.
pub fn create_batch(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let cfg = &ctx.shared.config.ingest;
    let items =
        match require_json(&req).and_then(|()| parse_batch(&req.body, cfg.max_payload_bytes)) {
            Ok(i) => i,
            Err(e) => return Handled::Ready(Err(e)),
        };
    let created_at = crate::time::now_micros();
    let mut rows = Vec::new();
    let mut results = Vec::with_capacity(items.len());
    // For each row: its position in `results` and its dedup_id.
    let mut slots: Vec<(usize, Option<String>)> = Vec::new();
    for (index, checked) in items.into_iter().enumerate() {
        match checked {
            Ok(e) => {
                let id = ctx.ids.borrow_mut().next(created_at.max(0) as u64 / 1000);
                results.push(item_result(index, Ok(id)));
                slots.push((index, e.dedup_id.clone()));
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
            Err(e) => results.push(item_result(index, Err(&e))),
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
    if let Err(e) = push(ctx, rows, None, done) {
        return Handled::Ready(Err(e));
    }
    ctx.metrics.events_accepted.add(accepted as u64);
    if cfg.ack == "memory" {
        let answer = json!({"accepted": accepted, "rejected": rejected, "results": results, "durability": "memory"});
        drop(committed);
        return Handled::Ready(Ok(json_response(202, &answer)));
    }
    Handled::Pending(Box::pin(async move {
        let outcome = committed.await.map_err(|_| ApiError::internal())?;
        batch_answer(results, &slots, &outcome)
    }))
}

/// The batch's answer once the persistence core has decided every row:
/// rows it did not store become errors in their item's entry.
fn batch_answer(
    mut results: Vec<Value>,
    slots: &[(usize, Option<String>)],
    outcome: &[RowOutcome],
) -> Result<Response, ApiError> {
    debug_assert_eq!(slots.len(), outcome.len());
    let mut failed = Vec::new();
    for ((index, dedup_id), o) in slots.iter().zip(outcome) {
        if !matches!(o, RowOutcome::Stored) {
            let e = row_error(o, &json!(dedup_id));
            results[*index] = item_result(*index, Err(&e));
            failed.push(e);
        }
    }
    let stored = slots.len() - failed.len();
    if stored == 0 {
        // Nothing of the batch is stored: the first row's error is the answer.
        if let Some(e) = failed.into_iter().next() {
            return Err(e.details(json!({"results": results})));
        }
    }
    let answer = json!({
        "accepted": stored,
        "rejected": results.len() - stored,
        "results": results,
    });
    Ok(json_response(202, &answer))
}

/// `GET /api/events/{id}`.
pub fn get(ctx: &Rc<ShardCtx>, req: Request, p: Rc<Principal>) -> Handled {
    let id = match super::path_id(req.path(), "/api/events/") {
        Ok(id) => id,
        Err(e) => return Handled::Ready(Err(e)),
    };
    let org = p.organization_id;
    let job = ctx
        .shared
        .queries
        .submit(move |client| crate::store::events::event(client, org, id));
    let reply = match job {
        Ok(r) => r,
        Err(e) => return Handled::Ready(Err(store_error(e))),
    };
    Handled::Pending(Box::pin(async move {
        match answer(reply).await? {
            Some(body) => Ok(Response::json(200, body)),
            None => Err(ApiError::not_found()),
        }
    }))
}
