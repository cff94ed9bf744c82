//! Reading events (runs on a query worker): one event by id and inbox pages,
//! each encoded to the API's JSON here, so the shard only frames the body.
//! `payload` and `metadata` are `json` columns holding the producer's text;
//! it is embedded unchanged (checked to be one JSON value, never re-encoded).

use super::{ts, StoreError};
use serde_json::value::RawValue;

/// The columns [`write_event`] reads, in its order.
fn columns() -> String {
    format!(
        "id, type, source, payload::text, metadata::text, dedup_id, status, attempts, last_error, \
         {}, {}, {}",
        ts("created_at"),
        ts("updated_at"),
        ts("delivered_at")
    )
}

/// An event as the API shows it (field order as in API.md).
#[derive(serde::Serialize)]
struct EventJson<'a> {
    id: uuid::Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    source: Option<&'a str>,
    payload: &'a RawValue,
    metadata: Option<&'a RawValue>,
    dedup_id: Option<&'a str>,
    status: &'a str,
    attempts: i32,
    last_error: Option<&'a str>,
    created_at: &'a str,
    updated_at: &'a str,
    delivered_at: Option<&'a str>,
    /// Only `GET /api/events/{id}` lists the delivery attempts.
    #[serde(skip_serializing_if = "Option::is_none")]
    deliveries: Option<[(); 0]>,
}

/// Stored JSON text as a raw value to embed; text that is not one JSON
/// value (it cannot be: PostgreSQL's `json` checks it) is an error, never
/// sent.
fn raw(text: &str, id: uuid::Uuid) -> Result<&RawValue, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::BadRow(format!("event {id}: stored JSON does not parse: {e}")))
}

/// Appends the event in `row` (selected with [`columns`]) as JSON.
fn write_event(
    out: &mut Vec<u8>,
    row: &postgres::Row,
    with_deliveries: bool,
) -> Result<(), StoreError> {
    let id: uuid::Uuid = row.try_get(0)?;
    let metadata: Option<&str> = row.try_get(4)?;
    let event = EventJson {
        id,
        event_type: row.try_get(1)?,
        source: row.try_get(2)?,
        payload: raw(row.try_get(3)?, id)?,
        metadata: metadata.map(|m| raw(m, id)).transpose()?,
        dedup_id: row.try_get(5)?,
        status: row.try_get(6)?,
        attempts: row.try_get(7)?,
        last_error: row.try_get(8)?,
        created_at: row.try_get(9)?,
        updated_at: row.try_get(10)?,
        delivered_at: row.try_get(11)?,
        deliveries: with_deliveries.then_some([]),
    };
    serde_json::to_writer(out, &event).map_err(|e| StoreError::BadRow(e.to_string()))
}

/// `GET /api/events/{id}`: the event's JSON, or `None` when the
/// organization has no such event.
pub fn event(
    client: &mut postgres::Client,
    org: uuid::Uuid,
    id: uuid::Uuid,
) -> Result<Option<Vec<u8>>, StoreError> {
    let sql = format!(
        "SELECT {} FROM events WHERE organization_id = $1 AND id = $2",
        columns()
    );
    let Some(row) = client.query_opt(&sql, &[&org, &id])? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(512);
    write_event(&mut out, &row, true)?;
    Ok(Some(out))
}

/// Which events an inbox page holds.
pub struct PageFilter {
    /// `None`: every status.
    pub status: Option<String>,
    pub event_type: Option<String>,
    /// Events after this id (the cursor).
    pub after: Option<uuid::Uuid>,
    pub limit: i64,
}

/// One inbox page, its `events` array already JSON.
pub struct Page {
    pub events_json: Vec<u8>,
    pub count: usize,
    pub last_id: Option<uuid::Uuid>,
    pub has_more: bool,
    /// The organization's events not yet delivered (any type).
    pub total_undelivered: i64,
}

/// An inbox page: oldest first, keyset on the time-ordered id.
pub fn inbox_page(
    client: &mut postgres::Client,
    org: uuid::Uuid,
    f: &PageFilter,
) -> Result<Page, StoreError> {
    let sql = format!(
        "SELECT {}
           FROM events
          WHERE organization_id = $1
            AND ($2::text IS NULL OR status = $2)
            AND ($3::text IS NULL OR type = $3)
            AND ($4::uuid IS NULL OR id > $4)
          ORDER BY id
          LIMIT $5",
        columns()
    );
    let rows = client.query(
        &sql,
        &[&org, &f.status, &f.event_type, &f.after, &(f.limit + 1)],
    )?;
    let total_undelivered: i64 = client
        .query_one(
            "SELECT count(*) FROM events WHERE organization_id = $1 AND status <> 'delivered'",
            &[&org],
        )?
        .try_get(0)?;
    let has_more = rows.len() as i64 > f.limit;
    let page = &rows[..rows.len().min(f.limit.max(0) as usize)];
    let mut events_json = Vec::with_capacity(page.len() * 256 + 2);
    events_json.push(b'[');
    for (i, row) in page.iter().enumerate() {
        if i > 0 {
            events_json.push(b',');
        }
        write_event(&mut events_json, row, false)?;
    }
    events_json.push(b']');
    let last_id = page.last().map(|r| r.try_get(0)).transpose()?;
    Ok(Page {
        events_json,
        count: page.len(),
        last_id,
        has_more,
        total_undelivered,
    })
}
