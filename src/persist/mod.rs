//! The persistence core: `ingest.writers` OS threads on the persistence core,
//! each with its own PostgreSQL connection. Each shard hands events through
//! its own bounded ring (a full ring is a 503 at the shard, never a wait).
//! A free writer drains every ring into one batch, writes the batch with
//! `COPY` in one transaction, commits, and only then completes every waiting
//! request of the batch: natural group commit, no linger. While one writer
//! waits for its commit's fsync, another takes the next batch, so commits
//! overlap and PostgreSQL flushes their WAL together.
//!
//! Batches of different writers commit in any order. Event ids are minted on
//! the shards, so ids and commit order were never the same thing; the
//! inbox's "undelivered" view does not depend on it.
//!
//! When PostgreSQL fails the batch is retried until `ingest.commit_timeout_ms`
//! has passed since its oldest event was queued; then every request of the
//! batch is answered `Unavailable` and the batch is dropped. The shard waits
//! longer than that, so it never answers before the core has decided: an
//! event that got a 202 is committed, one that got an error is not stored.

use crate::store::DbSettings;
use crossbeam_channel::{Receiver, Select, Sender, TrySendError};
use futures::channel::{mpsc, oneshot};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The events of one request on their way to PostgreSQL, committed together.
pub struct IngestItem {
    pub rows: Vec<EventRow>,
    /// Stored in the same transaction when the rows are (not for duplicates).
    pub idempotency: Option<IdempotencyRecord>,
    pub queued: Instant,
    /// The shard whose ring carried the item (set by [`Ring::try_push`]).
    pub shard: usize,
    /// Completed after the commit (or the decision not to commit): for each
    /// row, `None` when stored, or the id of the event it duplicates
    /// (`dedup_id` seen in the organization within 24 h; not stored).
    pub done: Option<oneshot::Sender<Outcome>>,
}

/// The `Idempotency-Key` record of a request and the 2xx answer to replay.
pub struct IdempotencyRecord {
    pub organization_id: uuid::Uuid,
    pub key: String,
    pub request_digest: Vec<u8>,
    pub status: i32,
    pub body: Vec<u8>,
}

/// One event row.
pub struct EventRow {
    pub organization_id: uuid::Uuid,
    pub id: uuid::Uuid,
    pub event_type: String,
    pub source: Option<String>,
    /// Compact JSON text.
    pub payload: String,
    pub metadata: Option<String>,
    pub dedup_id: Option<String>,
    /// Microseconds since the epoch.
    pub created_at: i64,
}

/// The batch holding an event could not be committed in time; it is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// Commit latency buckets, microseconds.
const COMMIT_MICROS: &[u64] = &[
    250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];
/// Batch size buckets, events.
const BATCH_EVENTS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Counters the persistence writers write and scrapes read.
pub struct PersistStats {
    pub commit_latency: crate::metrics::Histogram,
    pub batch_events: crate::metrics::Histogram,
    pub events_committed: AtomicU64,
    pub batches_committed: AtomicU64,
    pub commit_micros_total: AtomicU64,
    pub last_batch_size: AtomicU64,
    pub events_failed: AtomicU64,
    pub commit_errors: AtomicU64,
    /// False while the database refuses writes.
    pub healthy: AtomicBool,
}

impl Default for PersistStats {
    fn default() -> Self {
        PersistStats {
            commit_latency: crate::metrics::Histogram::new(COMMIT_MICROS),
            batch_events: crate::metrics::Histogram::new(BATCH_EVENTS),
            events_committed: AtomicU64::default(),
            batches_committed: AtomicU64::default(),
            commit_micros_total: AtomicU64::default(),
            last_batch_size: AtomicU64::default(),
            events_failed: AtomicU64::default(),
            commit_errors: AtomicU64::default(),
            healthy: AtomicBool::default(),
        }
    }
}

/// What a request waiting for its commit receives.
pub type Outcome = Result<Vec<Option<uuid::Uuid>>, Unavailable>;

/// What one batch means for one shard, sent as one message: the shard is
/// woken once per batch, not once per request.
pub struct Completions {
    /// The shard's requests in the batch and their outcomes.
    pub answers: Vec<(oneshot::Sender<Outcome>, Outcome)>,
    /// (organization, event type) of every event the batch stored, once
    /// each: long-polling inbox requests on any shard wake on these.
    pub stored: Arc<[(uuid::Uuid, String)]>,
}

/// A shard's end of its ring.
#[derive(Clone)]
pub struct Ring {
    tx: Sender<IngestItem>,
    shard: usize,
}

pub enum Enqueue {
    Queued,
    Full(IngestItem),
    Stopped(IngestItem),
}

impl Ring {
    pub fn try_push(&self, mut item: IngestItem) -> Enqueue {
        item.shard = self.shard;
        match self.tx.try_send(item) {
            Ok(()) => Enqueue::Queued,
            Err(TrySendError::Full(i)) => Enqueue::Full(i),
            Err(TrySendError::Disconnected(i)) => Enqueue::Stopped(i),
        }
    }

    pub fn len(&self) -> usize {
        self.tx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(0)
    }
}

pub struct PersistenceCore {
    pub rings: Vec<Ring>,
    /// Each shard's stream of completed requests; the shard takes its own.
    pub completions: Vec<Option<mpsc::UnboundedReceiver<Completions>>>,
    pub stats: Arc<PersistStats>,
    writers: Vec<JoinHandle<()>>,
    /// Set by `stop`: writers exit once the rings are empty, even if a ring
    /// sender outlives the shards (a task the executor never dropped).
    stopping: Arc<AtomicBool>,
}

pub struct Settings {
    pub db: DbSettings,
    pub shards: usize,
    pub ring_capacity: usize,
    pub max_batch: usize,
    pub writers: usize,
    pub commit_timeout: Duration,
    pub core: Option<usize>,
}

impl PersistenceCore {
    pub fn start(s: Settings) -> PersistenceCore {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..s.shards)
            .map(|_| crossbeam_channel::bounded::<IngestItem>(s.ring_capacity))
            .unzip();
        let (done_txs, done_rxs): (Vec<_>, Vec<_>) = (0..s.shards)
            .map(|_| mpsc::unbounded::<Completions>())
            .unzip();
        let stats = Arc::new(PersistStats::default());
        stats.healthy.store(true, Ordering::Relaxed);
        let stopping = Arc::new(AtomicBool::new(false));
        debug_assert!(s.writers >= 1);
        let writers = (0..s.writers.max(1))
            .map(|i| {
                let st = stats.clone();
                let stop = stopping.clone();
                let rxs = rxs.clone();
                let done_txs = done_txs.clone();
                let db = s.db.clone();
                let (max_batch, commit_timeout, core) = (s.max_batch, s.commit_timeout, s.core);
                std::thread::Builder::new()
                    .name(format!("persist-{i}"))
                    .spawn(move || {
                        if let Some(core) = core {
                            crate::topology::pin_current_thread(core, true);
                        }
                        let limits = (max_batch, commit_timeout);
                        run(rxs, &done_txs, db, limits, &st, &stop);
                    })
                    .expect("spawn a persistence writer thread")
            })
            .collect();
        PersistenceCore {
            rings: txs
                .into_iter()
                .enumerate()
                .map(|(shard, tx)| Ring { tx, shard })
                .collect(),
            completions: done_rxs.into_iter().map(Some).collect(),
            stats,
            writers,
            stopping,
        }
    }

    /// Stops after the rings drain (every queued event is committed or
    /// answered). Call it after the shards have stopped.
    pub fn stop(mut self) {
        self.rings.clear();
        self.stopping.store(true, Ordering::Release);
        for h in self.writers.drain(..) {
            let _ = h.join();
        }
    }
}

/// How often an idle writer checks whether it is asked to stop.
const STOP_CHECK: Duration = Duration::from_millis(50);

fn run(
    rxs: Vec<Receiver<IngestItem>>,
    done: &[mpsc::UnboundedSender<Completions>],
    db: DbSettings,
    (max_batch, commit_timeout): (usize, Duration),
    stats: &PersistStats,
    stopping: &AtomicBool,
) {
    let mut client: Option<Conn> = None;
    let mut batch: Vec<IngestItem> = Vec::with_capacity(max_batch);
    let mut copy = Vec::with_capacity(max_batch * 256);
    let mut open = rxs.len();
    let mut closed = vec![false; rxs.len()];
    while open > 0 {
        // Wait for the first event of the next batch.
        let mut sel = Select::new();
        for (i, rx) in rxs.iter().enumerate() {
            if !closed[i] {
                sel.recv(rx);
            }
        }
        let op = match sel.select_timeout(STOP_CHECK) {
            Ok(op) => op,
            Err(_) => {
                // Idle: stop once asked and every ring is empty.
                if stopping.load(Ordering::Acquire) && rxs.iter().all(|rx| rx.is_empty()) {
                    return;
                }
                continue;
            }
        };
        let live: Vec<usize> = (0..rxs.len()).filter(|&i| !closed[i]).collect();
        let idx = live[op.index()];
        let mut rows = 0usize;
        match op.recv(&rxs[idx]) {
            Ok(item) => {
                rows += item.rows.len();
                batch.push(item);
            }
            Err(_) => {
                closed[idx] = true;
                open -= 1;
                continue;
            }
        }
        // Everything already queued joins it, up to the batch limit.
        'fill: loop {
            let mut took = false;
            for rx in &rxs {
                while rows < max_batch {
                    match rx.try_recv() {
                        Ok(item) => {
                            rows += item.rows.len();
                            batch.push(item);
                            took = true;
                        }
                        Err(_) => break,
                    }
                }
                if rows >= max_batch {
                    break 'fill;
                }
            }
            if !took {
                break;
            }
        }
        commit(
            &mut client,
            &db,
            &mut batch,
            &mut copy,
            commit_timeout,
            stats,
            done,
        );
    }
}

fn commit(
    client: &mut Option<Conn>,
    db: &DbSettings,
    batch: &mut Vec<IngestItem>,
    copy: &mut Vec<u8>,
    commit_timeout: Duration,
    stats: &PersistStats,
    done: &[mpsc::UnboundedSender<Completions>],
) {
    let rows: u64 = batch.iter().map(|i| i.rows.len() as u64).sum();
    let oldest = batch
        .iter()
        .map(|i| i.queued)
        .min()
        .unwrap_or_else(Instant::now);
    let mut backoff = Duration::from_millis(20);
    let outcome = loop {
        let started = Instant::now();
        match write_batch(client, db, batch, copy) {
            Ok(dups) => {
                stats.healthy.store(true, Ordering::Relaxed);
                let micros = started.elapsed().as_micros() as u64;
                stats
                    .commit_micros_total
                    .fetch_add(micros, Ordering::Relaxed);
                stats.commit_latency.observe(micros);
                stats.batch_events.observe(rows);
                stats.batches_committed.fetch_add(1, Ordering::Relaxed);
                stats.events_committed.fetch_add(rows, Ordering::Relaxed);
                stats.last_batch_size.store(rows, Ordering::Relaxed);
                break Ok(dups);
            }
            Err(e) => {
                stats.commit_errors.fetch_add(1, Ordering::Relaxed);
                stats.healthy.store(false, Ordering::Relaxed);
                *client = None;
                if oldest.elapsed() + backoff >= commit_timeout {
                    log::warn!("persistence: giving up on a batch of {rows} events: {e}");
                    stats.events_failed.fetch_add(rows, Ordering::Relaxed);
                    break Err(Unavailable);
                }
                log::debug!("persistence: batch failed, retrying: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    };
    let mut per_shard: Vec<Vec<(oneshot::Sender<Outcome>, Outcome)>> =
        done.iter().map(|_| Vec::new()).collect();
    let mut answer = |item: &mut IngestItem, o: Outcome| {
        if let Some(tx) = item.done.take() {
            match per_shard.get_mut(item.shard) {
                Some(list) => list.push((tx, o)),
                None => {
                    let _ = tx.send(o);
                }
            }
        }
    };
    let mut stored: Vec<(uuid::Uuid, String)> = Vec::new();
    match outcome {
        Ok(dups) => {
            for (item, d) in batch.iter().zip(&dups) {
                for (row, dup) in item.rows.iter().zip(d) {
                    if dup.is_none()
                        && !stored
                            .last()
                            .is_some_and(|(o, t)| *o == row.organization_id && *t == row.event_type)
                    {
                        stored.push((row.organization_id, row.event_type.clone()));
                    }
                }
            }
            for (mut item, d) in batch.drain(..).zip(dups) {
                answer(&mut item, Ok(d));
            }
        }
        Err(u) => {
            for mut item in batch.drain(..) {
                answer(&mut item, Err(u));
            }
        }
    }
    stored.sort_unstable();
    stored.dedup();
    let stored: Arc<[(uuid::Uuid, String)]> = stored.into();
    for (shard, answers) in per_shard.into_iter().enumerate() {
        if answers.is_empty() && stored.is_empty() {
            continue;
        }
        let message = Completions {
            answers,
            stored: stored.clone(),
        };
        if let Err(e) = done[shard].unbounded_send(message) {
            // The shard is gone (shutdown): answer directly, nobody waits.
            for (tx, o) in e.into_inner().answers {
                let _ = tx.send(o);
            }
        }
    }
}

/// Completes, on the shard, every request of the batches the writers send
/// it, and tells `stored` what each batch stored.
pub async fn complete(
    mut batches: mpsc::UnboundedReceiver<Completions>,
    stored: impl Fn(&[(uuid::Uuid, String)]),
) {
    use futures::StreamExt;
    while let Some(c) = batches.next().await {
        for (tx, o) in c.answers {
            let _ = tx.send(o);
        }
        stored(&c.stored);
    }
}

/// Claims the batch's `dedup_id`s (24 h window, first claim wins, also within
/// the batch); returns, per item and row, the original event id of each
/// duplicate. Runs inside the batch's transaction.
fn claim_dedup_ids(
    tx: &mut postgres::Transaction<'_>,
    batch: &[IngestItem],
) -> Result<Vec<Vec<Option<uuid::Uuid>>>, postgres::Error> {
    use std::collections::HashMap;
    let mut dups: Vec<Vec<Option<uuid::Uuid>>> =
        batch.iter().map(|i| vec![None; i.rows.len()]).collect();
    // (org, dedup_id) → id of its first row in this batch
    let mut first: HashMap<(uuid::Uuid, &str), uuid::Uuid> = HashMap::new();
    let (mut orgs, mut keys, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    for item in batch {
        for row in &item.rows {
            if let Some(d) = row.dedup_id.as_deref() {
                if let std::collections::hash_map::Entry::Vacant(v) =
                    first.entry((row.organization_id, d))
                {
                    v.insert(row.id);
                    orgs.push(row.organization_id);
                    keys.push(d.to_string());
                    ids.push(row.id);
                }
            }
        }
    }
    if first.is_empty() {
        return Ok(dups);
    }
    // Claim in one order in every transaction: two writers inserting the same
    // keys in opposite orders would deadlock.
    let mut order: Vec<usize> = (0..orgs.len()).collect();
    order.sort_by(|&a, &b| (orgs[a], &keys[a]).cmp(&(orgs[b], &keys[b])));
    let orgs: Vec<uuid::Uuid> = order.iter().map(|&i| orgs[i]).collect();
    let keys: Vec<String> = order.iter().map(|&i| keys[i].clone()).collect();
    let ids: Vec<uuid::Uuid> = order.iter().map(|&i| ids[i]).collect();
    let claimed: std::collections::HashSet<(uuid::Uuid, String)> = tx
        .query(
            "INSERT INTO event_dedup (organization_id, dedup_id, event_id, expires_at)
             SELECT o, d, e, now() + interval '24 hours'
               FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS t(o, d, e)
             ON CONFLICT (organization_id, dedup_id) DO UPDATE
                SET event_id = EXCLUDED.event_id, expires_at = EXCLUDED.expires_at
              WHERE event_dedup.expires_at <= now()
          RETURNING organization_id, dedup_id",
            &[&orgs, &keys, &ids],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Keys another event holds already: that event is the original.
    let mut original: HashMap<(uuid::Uuid, String), uuid::Uuid> = HashMap::new();
    let (lost_orgs, lost_keys): (Vec<uuid::Uuid>, Vec<String>) = orgs
        .iter()
        .zip(&keys)
        .filter(|(o, k)| !claimed.contains(&(**o, (*k).clone())))
        .map(|(o, k)| (*o, k.clone()))
        .unzip();
    if !lost_orgs.is_empty() {
        for r in tx.query(
            "SELECT d.organization_id, d.dedup_id, d.event_id
               FROM event_dedup d
               JOIN unnest($1::uuid[], $2::text[]) AS t(o, k)
                 ON d.organization_id = t.o AND d.dedup_id = t.k",
            &[&lost_orgs, &lost_keys],
        )? {
            original.insert((r.get(0), r.get(1)), r.get(2));
        }
    }
    for (item, d) in batch.iter().zip(dups.iter_mut()) {
        for (row, slot) in item.rows.iter().zip(d.iter_mut()) {
            let Some(key) = row.dedup_id.as_deref() else {
                continue;
            };
            let k = (row.organization_id, key.to_string());
            if let Some(orig) = original.get(&k) {
                *slot = Some(*orig);
            } else if let Some(&winner) = first.get(&(row.organization_id, key)) {
                if winner != row.id {
                    *slot = Some(winner);
                }
            }
        }
    }
    Ok(dups)
}

/// A writer's PostgreSQL connection and its prepared statements.
struct Conn {
    client: postgres::Client,
    /// The common batch: no `dedup_id`, no `Idempotency-Key`. One statement,
    /// committed on its own: one round trip and one WAL flush per batch.
    insert: postgres::Statement,
}

const INSERT_EVENTS: &str = "INSERT INTO events
        (organization_id, id, type, source, payload, metadata, status, created_at, updated_at)
    SELECT o, i, t, s, p::jsonb, m::jsonb, 'pending', c, c
      FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::timestamptz[]) AS u(o, i, t, s, p, m, c)";

impl Conn {
    fn open(db: &DbSettings) -> Result<Conn, String> {
        let mut client = db.connect().map_err(|e| e.to_string())?;
        let insert = client.prepare(INSERT_EVENTS).map_err(|e| e.to_string())?;
        Ok(Conn { client, insert })
    }

    /// Inserts the batch in one autocommitted statement.
    fn insert_plain(&mut self, batch: &[IngestItem]) -> Result<(), postgres::Error> {
        let n: usize = batch.iter().map(|i| i.rows.len()).sum();
        let mut orgs = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        for row in batch.iter().flat_map(|i| &i.rows) {
            orgs.push(row.organization_id);
            ids.push(row.id);
            types.push(row.event_type.as_str());
            sources.push(row.source.as_deref());
            payloads.push(row.payload.as_str());
            metadata.push(row.metadata.as_deref());
            created
                .push(std::time::UNIX_EPOCH + Duration::from_micros(row.created_at.max(0) as u64));
        }
        self.client.execute(
            &self.insert,
            &[
                &orgs, &ids, &types, &sources, &payloads, &metadata, &created,
            ],
        )?;
        Ok(())
    }
}

fn write_batch(
    client: &mut Option<Conn>,
    db: &DbSettings,
    batch: &[IngestItem],
    copy: &mut Vec<u8>,
) -> Result<Vec<Vec<Option<uuid::Uuid>>>, String> {
    if client.as_ref().is_none_or(|c| c.client.is_closed()) {
        *client = Some(Conn::open(db)?);
    }
    let conn = client.as_mut().ok_or("no connection")?;
    let plain = batch
        .iter()
        .all(|i| i.idempotency.is_none() && i.rows.iter().all(|r| r.dedup_id.is_none()));
    if plain {
        conn.insert_plain(batch).map_err(|e| e.to_string())?;
        return Ok(batch.iter().map(|i| vec![None; i.rows.len()]).collect());
    }
    let c = &mut conn.client;
    let mut tx = c.transaction().map_err(|e| e.to_string())?;
    let dups = claim_dedup_ids(&mut tx, batch).map_err(|e| e.to_string())?;
    copy.clear();
    let mut any = false;
    for (item, d) in batch.iter().zip(&dups) {
        for (row, dup) in item.rows.iter().zip(d) {
            if dup.is_none() {
                encode_row(copy, row);
                any = true;
            }
        }
    }
    if any {
        let mut w = tx
            .copy_in(
                "COPY events (organization_id, id, type, source, payload, metadata, dedup_id, \
                 status, created_at, updated_at) FROM STDIN",
            )
            .map_err(|e| e.to_string())?;
        w.write_all(copy).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
    }
    for (item, d) in batch.iter().zip(&dups) {
        if let Some(rec) = &item.idempotency {
            if d.iter().all(Option::is_none) {
                tx.execute(
                    "INSERT INTO idempotency_keys
                         (organization_id, idempotency_key, request_digest, status_code, response_body, expires_at)
                     VALUES ($1, $2, $3, $4, $5, now() + interval '24 hours')
                     ON CONFLICT (organization_id, idempotency_key) DO UPDATE
                        SET request_digest = EXCLUDED.request_digest, status_code = EXCLUDED.status_code,
                            response_body = EXCLUDED.response_body, created_at = now(),
                            expires_at = EXCLUDED.expires_at
                      WHERE idempotency_keys.expires_at <= now()",
                    &[&rec.organization_id, &rec.key, &rec.request_digest, &rec.status, &rec.body],
                )
                .map_err(|e| e.to_string())?;
            }
        }
    }
    tx.commit().map_err(|e| e.to_string())?;
    Ok(dups)
}

/// Appends `s` escaped for COPY's text format.
fn copy_text(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

fn copy_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => copy_text(out, s),
        None => out.extend_from_slice(b"\\N"),
    }
}

fn encode_row(out: &mut Vec<u8>, i: &EventRow) {
    let ts = crate::time::rfc3339_micros(i.created_at);
    let mut uuid = uuid::Uuid::encode_buffer();
    out.extend_from_slice(
        i.organization_id
            .hyphenated()
            .encode_lower(&mut uuid)
            .as_bytes(),
    );
    out.push(b'\t');
    out.extend_from_slice(i.id.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.push(b'\t');
    copy_text(out, &i.event_type);
    out.push(b'\t');
    copy_opt(out, i.source.as_deref());
    out.push(b'\t');
    copy_text(out, &i.payload);
    out.push(b'\t');
    copy_opt(out, i.metadata.as_deref());
    out.push(b'\t');
    copy_opt(out, i.dedup_id.as_deref());
    out.extend_from_slice(b"\tpending\t");
    out.extend_from_slice(ts.as_bytes());
    out.push(b'\t');
    out.extend_from_slice(ts.as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_escape_text() {
        let item = EventRow {
            organization_id: uuid::Uuid::nil(),
            id: uuid::Uuid::nil(),
            event_type: "a.b".into(),
            source: None,
            payload: "{\"k\":\"tab\\there\\\\ \\n\"}".into(),
            metadata: Some("{}".into()),
            dedup_id: None,
            created_at: 0,
        };
        let mut out = Vec::new();
        encode_row(&mut out, &item);
        let line = String::from_utf8(out).expect("utf8");
        assert_eq!(line.matches('\t').count(), 9);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert!(line.contains("\\N"));
        assert!(line.contains("tab\\\\there\\\\\\\\ \\\\n"), "{line}");
    }
}
