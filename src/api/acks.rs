//! Acknowledgement batching for single acks (`POST /api/ack/{id}`,
//! `DELETE /api/events/{id}`). Each shard keeps one `AckBatcher`: an ack
//! joins the shard's queue, and while one batch's UPDATE is on a query
//! worker the next batch fills; when it returns, everything queued goes in
//! one statement and one commit. Group commit without a linger: a lone ack
//! goes at once, concurrent acks share a round trip and a WAL flush. The
//! queue is bounded (`ACK_QUEUE`, then 503 `overloaded`) and so is a batch
//! (`ACK_BATCH`).

use super::{answer, ApiError, ShardCtx};
use crate::store::{ts, RowExt, StoreError};
use futures::channel::oneshot;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Acks one shard holds waiting for a batch.
const ACK_QUEUE: usize = 10_000;
/// Acks one statement carries at most.
const ACK_BATCH: usize = 1_000;

/// When the event was acknowledged; `None` when the organization has no
/// such event.
pub type AckOutcome = Result<Option<String>, ApiError>;

struct Waiting {
    organization_id: uuid::Uuid,
    id: uuid::Uuid,
    done: oneshot::Sender<AckOutcome>,
}

#[derive(Default)]
pub struct AckBatcher {
    queue: RefCell<Vec<Waiting>>,
    in_flight: Cell<bool>,
}

/// Queues the ack of `id` for `org`; the receiver gets the outcome.
pub fn ack(
    ctx: &Rc<ShardCtx>,
    org: uuid::Uuid,
    id: uuid::Uuid,
) -> Result<oneshot::Receiver<AckOutcome>, ApiError> {
    let (done, outcome) = oneshot::channel();
    {
        let mut queue = ctx.acks.queue.borrow_mut();
        if queue.len() >= ACK_QUEUE {
            return Err(ApiError::overloaded(1));
        }
        queue.push(Waiting {
            organization_id: org,
            id,
            done,
        });
    }
    if !ctx.acks.in_flight.get() {
        send_batch(ctx);
    }
    Ok(outcome)
}

/// Sends what is queued (up to `ACK_BATCH`) as one UPDATE; when it
/// returns, answers its acks and sends the next batch.
fn send_batch(ctx: &Rc<ShardCtx>) {
    let batch: Vec<Waiting> = {
        let mut queue = ctx.acks.queue.borrow_mut();
        let n = queue.len().min(ACK_BATCH);
        queue.drain(..n).collect()
    };
    if batch.is_empty() {
        ctx.acks.in_flight.set(false);
        return;
    }
    ctx.acks.in_flight.set(true);
    let orgs: Vec<uuid::Uuid> = batch.iter().map(|w| w.organization_id).collect();
    let ids: Vec<uuid::Uuid> = batch.iter().map(|w| w.id).collect();
    let submitted = ctx.shared.queries.submit(move |client| {
        let rows = client.query(
            &format!(
                "UPDATE events e
                    SET status = 'delivered', updated_at = now(),
                        delivered_at = coalesce(e.delivered_at, now()), next_attempt_at = NULL
                   FROM unnest($1::uuid[], $2::uuid[]) AS a(organization_id, id)
                  WHERE e.organization_id = a.organization_id AND e.id = a.id
              RETURNING e.organization_id, e.id, {}",
                ts("e.delivered_at")
            ),
            &[&orgs, &ids],
        )?;
        rows.iter()
            .map(|r| Ok(((r.col(0)?, r.col(1)?), r.col(2)?)))
            .collect::<Result<HashMap<(uuid::Uuid, uuid::Uuid), String>, StoreError>>()
    });
    let reply = match submitted {
        Ok(reply) => reply,
        Err(e) => {
            // Nothing is in flight to send the rest later: they fail too.
            let e = super::store_error(e);
            let rest: Vec<Waiting> = ctx.acks.queue.borrow_mut().drain(..).collect();
            for w in batch.into_iter().chain(rest) {
                let _ = w.done.send(Err(e.clone()));
            }
            ctx.acks.in_flight.set(false);
            return;
        }
    };
    ctx.metrics.ack_batches.inc();
    ctx.metrics.acks_batched.add(batch.len() as u64);
    let c = ctx.clone();
    (ctx.hooks.spawn)(Box::pin(async move {
        let result = answer(reply).await;
        for w in batch {
            let outcome = match &result {
                Ok(acked) => Ok(acked.get(&(w.organization_id, w.id)).cloned()),
                Err(e) => Err(e.clone()),
            };
            let _ = w.done.send(outcome);
        }
        send_batch(&c);
    }));
}
