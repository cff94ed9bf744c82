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
//! When the connection or the server fails, the batch is retried until
//! `ingest.commit_timeout_ms` has passed since its oldest event was queued;
//! then its rows are answered `Unavailable` and dropped. The shard waits
//! longer than that, so it never answers before the core has decided: an
//! event that got a 202 is committed, one that got an error is not stored.
//!
//! When PostgreSQL refuses a batch for its data (SQLSTATE classes 22, 23, 54
//! and P0: the rows, not the connection), retrying cannot help: the batch is
//! split in halves and each half written on its own, down to the single
//! rows to blame, which are answered with the refusal; every other row is
//! committed. One bad event costs a few extra commits, never the batch.

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

/// What became of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    Stored,
    /// Not stored: the organization used the row's `dedup_id` within 24 h
    /// for this event.
    Duplicate(uuid::Uuid),
    /// Not stored: PostgreSQL refused the row's data.
    Refused(Refusal),
    /// Not stored: the database did not commit it within the commit timeout.
    Unavailable,
}

/// PostgreSQL's reason for refusing a row: its SQLSTATE and primary message
/// (never its DETAIL, which can quote the row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: String,
    pub message: String,
}

impl Refusal {
    /// A data exception (class 22): the row's content is at fault.
    pub fn is_data_exception(&self) -> bool {
        self.sqlstate.starts_with("22")
    }
}

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
    /// Rows PostgreSQL refused (their requests got the refusal).
    pub events_refused: AtomicU64,
    /// Rows lost after their 202 (`ack = "memory"`): refused or not committed in time.
    pub events_dropped: AtomicU64,
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
            events_refused: AtomicU64::default(),
            events_dropped: AtomicU64::default(),
            commit_errors: AtomicU64::default(),
            healthy: AtomicBool::default(),
        }
    }
}

/// What a request waiting for its commit receives: one outcome per row.
pub type Outcome = Vec<RowOutcome>;

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
    /// Unbounded on purpose: a writer must never wait for a shard nor drop
    /// an answer. What it holds is bounded elsewhere: each answer belongs
    /// to a request still waiting on the shard (bounded by its connections),
    /// and `stored` notices come one per committed batch, drained by the
    /// shard's completion task between requests.
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
    /// `ack = "memory"`: requests were answered at enqueue, so a row not
    /// stored is a row lost (`events_dropped`).
    pub memory_ack: bool,
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
                let memory_ack = s.memory_ack;
                std::thread::Builder::new()
                    .name(format!("persist-{i}"))
                    .spawn(move || {
                        if let Some(core) = core {
                            crate::topology::pin_current_thread(core, true);
                        }
                        let policy = Policy {
                            max_batch,
                            commit_timeout,
                            memory_ack,
                        };
                        run(rxs, &done_txs, db, policy, &st, &stop);
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

/// A writer's limits and ack mode.
#[derive(Clone, Copy)]
struct Policy {
    max_batch: usize,
    commit_timeout: Duration,
    memory_ack: bool,
}

fn run(
    rxs: Vec<Receiver<IngestItem>>,
    done: &[mpsc::UnboundedSender<Completions>],
    db: DbSettings,
    policy: Policy,
    stats: &PersistStats,
    stopping: &AtomicBool,
) {
    let max_batch = policy.max_batch;
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
        let mut w = Writer {
            client: &mut client,
            db: &db,
            copy: &mut copy,
            stats,
        };
        let outcomes = w.commit(&batch, policy);
        answer_batch(&mut batch, outcomes, done);
    }
}

/// A row of a batch: (index of its item, index of the row in the item).
type RowRef = (usize, usize);

/// Why a write failed.
enum WriteError {
    /// The connection or the server failed: the same rows may succeed later.
    Transient(String),
    /// PostgreSQL refused the rows' data: one of them (at least) is to blame.
    Rows(Refusal),
}

/// Whether PostgreSQL refused the statement for the rows it carried.
fn row_level(sqlstate: &str) -> bool {
    ["22", "23", "54", "P0"]
        .iter()
        .any(|c| sqlstate.starts_with(c))
}

impl From<postgres::Error> for WriteError {
    fn from(e: postgres::Error) -> WriteError {
        match e.as_db_error() {
            Some(db) if row_level(db.code().code()) => WriteError::Rows(Refusal {
                sqlstate: db.code().code().to_string(),
                message: db.message().chars().take(200).collect(),
            }),
            // Only the SQLSTATE and primary message: a DETAIL can quote rows.
            Some(db) => WriteError::Transient(format!("{}: {}", db.code().code(), db.message())),
            None => WriteError::Transient(e.to_string()),
        }
    }
}

/// A row written earlier whose commit was not confirmed (the connection
/// broke after COMMIT): its id is in the table already.
fn already_stored(r: &Refusal) -> bool {
    r.sqlstate == "23505" && r.message.contains("events_pkey")
}

/// One writer's connection, buffers and counters, for one batch.
struct Writer<'a> {
    client: &'a mut Option<Conn>,
    db: &'a DbSettings,
    copy: &'a mut Vec<u8>,
    stats: &'a PersistStats,
}

impl Writer<'_> {
    /// Writes the batch and decides every row: stored, duplicate, refused
    /// (its data; found by splitting the batch) or unavailable (the
    /// database did not commit it before the deadline).
    fn commit(&mut self, batch: &[IngestItem], policy: Policy) -> Vec<Vec<RowOutcome>> {
        let mut outcomes: Vec<Vec<RowOutcome>> = batch
            .iter()
            .map(|i| vec![RowOutcome::Unavailable; i.rows.len()])
            .collect();
        let oldest = batch.iter().map(|i| i.queued).min();
        let deadline = oldest.unwrap_or_else(Instant::now) + policy.commit_timeout;
        let all: Vec<RowRef> = batch
            .iter()
            .enumerate()
            .flat_map(|(i, item)| (0..item.rows.len()).map(move |r| (i, r)))
            .collect();
        let total = all.len() as u64;
        // Depth-first, left half first: rows commit in the batch's order.
        let mut work = vec![all];
        while let Some(rows) = work.pop() {
            match self.write_retrying(batch, &rows, deadline) {
                Ok(dups) => {
                    for (&(i, r), dup) in rows.iter().zip(dups) {
                        outcomes[i][r] = dup.map_or(RowOutcome::Stored, RowOutcome::Duplicate);
                    }
                }
                Err(WriteError::Transient(e)) => {
                    let left = rows.len() + work.iter().map(Vec::len).sum::<usize>();
                    log::warn!(
                        "persistence: giving up on {left} of a batch of {total} events: {e}"
                    );
                    break;
                }
                Err(WriteError::Rows(refusal)) if rows.len() == 1 => {
                    let (i, r) = rows[0];
                    outcomes[i][r] = if already_stored(&refusal) {
                        RowOutcome::Stored
                    } else {
                        self.refused(&batch[i].rows[r], &refusal);
                        RowOutcome::Refused(refusal)
                    };
                }
                Err(WriteError::Rows(_)) => {
                    let (left, right) = rows.split_at(rows.len() / 2);
                    work.push(right.to_vec());
                    work.push(left.to_vec());
                }
            }
        }
        self.count(&outcomes, policy.memory_ack);
        outcomes
    }

    /// Writes `rows` in one transaction, retrying connection and server
    /// failures with backoff until `deadline`.
    fn write_retrying(
        &mut self,
        batch: &[IngestItem],
        rows: &[RowRef],
        deadline: Instant,
    ) -> Result<Vec<Option<uuid::Uuid>>, WriteError> {
        let mut backoff = Duration::from_millis(20);
        loop {
            let started = Instant::now();
            match write_rows(self.client, self.db, batch, rows, self.copy) {
                Ok(dups) => {
                    let micros = started.elapsed().as_micros() as u64;
                    let st = self.stats;
                    st.healthy.store(true, Ordering::Relaxed);
                    st.commit_micros_total.fetch_add(micros, Ordering::Relaxed);
                    st.commit_latency.observe(micros);
                    st.batch_events.observe(rows.len() as u64);
                    st.batches_committed.fetch_add(1, Ordering::Relaxed);
                    st.last_batch_size
                        .store(rows.len() as u64, Ordering::Relaxed);
                    return Ok(dups);
                }
                Err(WriteError::Rows(r)) => return Err(WriteError::Rows(r)),
                Err(WriteError::Transient(e)) => {
                    self.stats.commit_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.healthy.store(false, Ordering::Relaxed);
                    *self.client = None;
                    if Instant::now() + backoff >= deadline {
                        return Err(WriteError::Transient(e));
                    }
                    log::debug!("persistence: batch failed, retrying: {e}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// Logs a refused row: which event, and PostgreSQL's code and message
    /// (never the payload).
    fn refused(&self, row: &EventRow, r: &Refusal) {
        log::warn!(
            "persistence: PostgreSQL refused event {} of organization {}: SQLSTATE {}: {}",
            row.id,
            row.organization_id,
            r.sqlstate,
            r.message
        );
    }

    fn count(&self, outcomes: &[Vec<RowOutcome>], memory_ack: bool) {
        let (mut stored, mut refused, mut failed) = (0u64, 0u64, 0u64);
        for o in outcomes.iter().flatten() {
            match o {
                RowOutcome::Stored => stored += 1,
                RowOutcome::Duplicate(_) => {}
                RowOutcome::Refused(_) => refused += 1,
                RowOutcome::Unavailable => failed += 1,
            }
        }
        let st = self.stats;
        st.events_committed.fetch_add(stored, Ordering::Relaxed);
        st.events_refused.fetch_add(refused, Ordering::Relaxed);
        st.events_failed.fetch_add(failed, Ordering::Relaxed);
        if memory_ack {
            st.events_dropped
                .fetch_add(refused + failed, Ordering::Relaxed);
        }
    }
}

/// Sends every request of the batch its outcome, with one message per
/// shard, and tells every shard what the batch stored.
fn answer_batch(
    batch: &mut Vec<IngestItem>,
    outcomes: Vec<Vec<RowOutcome>>,
    done: &[mpsc::UnboundedSender<Completions>],
) {
    debug_assert_eq!(batch.len(), outcomes.len());
    let mut per_shard: Vec<Vec<(oneshot::Sender<Outcome>, Outcome)>> =
        done.iter().map(|_| Vec::new()).collect();
    let mut stored: Vec<(uuid::Uuid, String)> = Vec::new();
    for (mut item, o) in batch.drain(..).zip(outcomes) {
        for (row, _) in item
            .rows
            .iter()
            .zip(&o)
            .filter(|(_, o)| **o == RowOutcome::Stored)
        {
            let seen = stored
                .last()
                .is_some_and(|(org, t)| *org == row.organization_id && *t == row.event_type);
            if !seen {
                stored.push((row.organization_id, row.event_type.clone()));
            }
        }
        if let Some(tx) = item.done.take() {
            match per_shard.get_mut(item.shard) {
                Some(list) => list.push((tx, o)),
                None => {
                    let _ = tx.send(o);
                }
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

/// Claims the `dedup_id`s of `rows` (24 h window, first claim wins, also
/// among `rows`); returns, per row, the original event id when the row is a
/// duplicate. Runs inside the rows' transaction.
fn claim_dedup_ids(
    tx: &mut postgres::Transaction<'_>,
    batch: &[IngestItem],
    rows: &[RowRef],
) -> Result<Vec<Option<uuid::Uuid>>, postgres::Error> {
    use std::collections::HashMap;
    let mut dups: Vec<Option<uuid::Uuid>> = vec![None; rows.len()];
    // (org, dedup_id) → id of its first row here
    let mut first: HashMap<(uuid::Uuid, &str), uuid::Uuid> = HashMap::new();
    for row in rows.iter().map(|&(i, r)| &batch[i].rows[r]) {
        if let Some(d) = row.dedup_id.as_deref() {
            first.entry((row.organization_id, d)).or_insert(row.id);
        }
    }
    if first.is_empty() {
        return Ok(dups);
    }
    // Claim in one order in every transaction: two writers inserting the same
    // keys in opposite orders would deadlock.
    let mut claims: Vec<(uuid::Uuid, &str, uuid::Uuid)> =
        first.iter().map(|(&(o, d), &id)| (o, d, id)).collect();
    claims.sort_unstable();
    let orgs: Vec<uuid::Uuid> = claims.iter().map(|c| c.0).collect();
    let keys: Vec<&str> = claims.iter().map(|c| c.1).collect();
    let ids: Vec<uuid::Uuid> = claims.iter().map(|c| c.2).collect();
    let claimed = tx.query(
        "INSERT INTO event_dedup (organization_id, dedup_id, event_id, expires_at)
         SELECT o, d, e, now() + interval '24 hours'
           FROM unnest($1::uuid[], $2::text[], $3::uuid[]) AS t(o, d, e)
         ON CONFLICT (organization_id, dedup_id) DO UPDATE
            SET event_id = EXCLUDED.event_id, expires_at = EXCLUDED.expires_at
          WHERE event_dedup.expires_at <= now()
      RETURNING organization_id, dedup_id",
        &[&orgs, &keys, &ids],
    )?;
    let mut won: std::collections::HashSet<(uuid::Uuid, String)> = Default::default();
    for r in &claimed {
        won.insert((r.try_get(0)?, r.try_get(1)?));
    }
    // Keys another event holds already: that event is the original.
    let (lost_orgs, lost_keys): (Vec<uuid::Uuid>, Vec<&str>) = claims
        .iter()
        .filter(|c| !won.contains(&(c.0, c.1.to_string())))
        .map(|c| (c.0, c.1))
        .unzip();
    let mut original: HashMap<(uuid::Uuid, String), uuid::Uuid> = HashMap::new();
    if !lost_orgs.is_empty() {
        for r in tx.query(
            "SELECT d.organization_id, d.dedup_id, d.event_id
               FROM event_dedup d
               JOIN unnest($1::uuid[], $2::text[]) AS t(o, k)
                 ON d.organization_id = t.o AND d.dedup_id = t.k",
            &[&lost_orgs, &lost_keys],
        )? {
            original.insert((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?);
        }
    }
    for (slot, row) in dups
        .iter_mut()
        .zip(rows.iter().map(|&(i, r)| &batch[i].rows[r]))
    {
        let Some(key) = row.dedup_id.as_deref() else {
            continue;
        };
        let winner = original
            .get(&(row.organization_id, key.to_string()))
            .or_else(|| first.get(&(row.organization_id, key)));
        // A claim by the row itself is an earlier attempt of this write
        // whose commit was not confirmed: not a duplicate.
        *slot = winner.copied().filter(|&w| w != row.id);
    }
    Ok(dups)
}

/// A writer's PostgreSQL connection and its prepared statements.
struct Conn {
    client: postgres::Client,
    /// Rows without `dedup_id` or `Idempotency-Key`. One statement,
    /// committed on its own: one round trip and one WAL flush per batch.
    insert: postgres::Statement,
}

const INSERT_EVENTS: &str = "INSERT INTO events
        (organization_id, id, type, source, payload, metadata, status, created_at, updated_at)
    SELECT o, i, t, s, p::json, m::json, 'pending', c, c
      FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                  $7::timestamptz[]) AS u(o, i, t, s, p, m, c)";

impl Conn {
    fn open(db: &DbSettings) -> Result<Conn, WriteError> {
        let unavailable = |e: crate::store::StoreError| WriteError::Transient(e.to_string());
        let mut client = db.connect().map_err(unavailable)?;
        let insert = client.prepare(INSERT_EVENTS)?;
        Ok(Conn { client, insert })
    }

    /// Inserts `rows` in one autocommitted statement.
    fn insert_plain(
        &mut self,
        batch: &[IngestItem],
        rows: &[RowRef],
    ) -> Result<(), postgres::Error> {
        let n = rows.len();
        let mut orgs = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        for row in rows.iter().map(|&(i, r)| &batch[i].rows[r]) {
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

/// Writes `rows` of `batch` in one transaction; returns, per row, the
/// original event id of a duplicate (`None`: stored).
fn write_rows(
    client: &mut Option<Conn>,
    db: &DbSettings,
    batch: &[IngestItem],
    rows: &[RowRef],
    copy: &mut Vec<u8>,
) -> Result<Vec<Option<uuid::Uuid>>, WriteError> {
    if client.as_ref().is_none_or(|c| c.client.is_closed()) {
        *client = Some(Conn::open(db)?);
    }
    let conn = client
        .as_mut()
        .ok_or_else(|| WriteError::Transient("no connection".into()))?;
    let plain = rows
        .iter()
        .all(|&(i, r)| batch[i].idempotency.is_none() && batch[i].rows[r].dedup_id.is_none());
    if plain {
        conn.insert_plain(batch, rows)?;
        return Ok(vec![None; rows.len()]);
    }
    let mut tx = conn.client.transaction()?;
    let dups = claim_dedup_ids(&mut tx, batch, rows)?;
    copy.clear();
    for (&(i, r), dup) in rows.iter().zip(&dups) {
        if dup.is_none() {
            encode_row(copy, &batch[i].rows[r]);
        }
    }
    if !copy.is_empty() {
        let mut w = tx.copy_in(
            "COPY events (organization_id, id, type, source, payload, metadata, dedup_id, \
             status, created_at, updated_at) FROM STDIN",
        )?;
        w.write_all(copy)
            .map_err(|e| WriteError::Transient(format!("COPY: {e}")))?;
        w.finish()?;
    }
    for (&(i, _), dup) in rows.iter().zip(&dups) {
        let Some(rec) = &batch[i].idempotency else {
            continue;
        };
        // A request with an Idempotency-Key carries one event.
        debug_assert_eq!(batch[i].rows.len(), 1);
        if dup.is_none() {
            store_idempotency(&mut tx, rec)?;
        }
    }
    tx.commit()?;
    Ok(dups)
}

/// Records an `Idempotency-Key` and the 2xx answer to replay for it.
fn store_idempotency(
    tx: &mut postgres::Transaction<'_>,
    rec: &IdempotencyRecord,
) -> Result<(), postgres::Error> {
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
    )?;
    Ok(())
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
