//! Event and batch body validation (`triggers::api::event_body`) under
//! arbitrary bytes. The input is the request body; both `parse_event` and
//! `parse_batch` see it, each with a small payload limit and with none.
//!
//! What must hold: no panic; an accepted `payload` (and `metadata`) is a byte
//! slice of the body, valid JSON on its own, not `null` (metadata: an
//! object), and means what the body's member means (compared through
//! `serde_json::Value` when the whole body parses as one); `type` follows its
//! rule, `source`/`dedup_id` are at most 255 characters, and no text field
//! holds NUL; the limit only turns an event whose payload is longer than it
//! into 413 `payload_too_large`, and changes nothing else; every error is 400
//! `malformed_json`/`validation_error` or 413 `payload_too_large`; a batch
//! holds 1 to 1000 items, one per element of its `events` list.

use serde::de::IgnoredAny;
use serde_json::{Map, Value};
use triggers::api::event_body::{parse_batch, parse_event, NewEvent, MAX_BATCH_ITEMS};
use triggers::api::ApiError;

/// The payload limit of the limited runs; fuzz payloads straddle it.
const SMALL: usize = 64;

/// Runs the property on one fuzz input.
pub fn check(body: &[u8]) {
    let whole = serde_json::from_slice::<Value>(body).ok();
    let obj = whole.as_ref().and_then(Value::as_object);
    let big = parse_event(body, usize::MAX);
    compare_limits(&parse_event(body, SMALL), &big);
    if let Ok(e) = &big {
        check_event(body, e, obj);
    }
    check_batch(body, obj);
}

fn check_batch(body: &[u8], obj: Option<&Map<String, Value>>) {
    let (small, big) = (parse_batch(body, SMALL), parse_batch(body, usize::MAX));
    let (small, big) = match (small, big) {
        (Err(a), Err(b)) => {
            check_error(&a);
            assert_eq!(
                (a.status, a.code),
                (b.status, b.code),
                "batch errors differ"
            );
            return;
        }
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!(
            "the limit decided the batch: {:?} vs {:?}",
            a.is_ok(),
            b.is_ok()
        ),
    };
    assert!(
        (1..=MAX_BATCH_ITEMS).contains(&big.len()),
        "{} items",
        big.len()
    );
    assert_eq!(small.len(), big.len());
    let list = obj.map(|o| {
        assert!(
            o.keys().all(|k| k == "events"),
            "accepted with {:?}",
            o.keys()
        );
        let list = o
            .get("events")
            .and_then(Value::as_array)
            .expect("events is a list");
        assert_eq!(list.len(), big.len(), "one item per element");
        list
    });
    for (i, (s, b)) in small.iter().zip(&big).enumerate() {
        compare_limits(s, b);
        match b {
            Ok(e) => {
                let item = list.map(|l| l[i].as_object().expect("an accepted item is an object"));
                check_event(body, e, item);
            }
            Err(e) => check_error(e),
        }
    }
}

/// `small` was validated with the limit `SMALL`, `big` without one.
fn compare_limits(small: &Result<NewEvent, ApiError>, big: &Result<NewEvent, ApiError>) {
    match (small, big) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            assert!(
                a.payload.len() <= SMALL,
                "{} bytes accepted",
                a.payload.len()
            );
        }
        (Err(a), Ok(b)) => {
            assert_eq!((a.status, a.code), (413, "payload_too_large"), "{a:?}");
            assert!(b.payload.len() > SMALL, "413 for {} bytes", b.payload.len());
        }
        (Err(a), Err(b)) => {
            check_error(a);
            check_error(b);
            assert_eq!(
                (a.status, a.code),
                (b.status, b.code),
                "the limit changed the error"
            );
        }
        (Ok(_), Err(b)) => panic!("accepted under the limit, refused without it: {b:?}"),
    }
}

fn check_error(e: &ApiError) {
    let ok = matches!(
        (e.status, e.code),
        (400, "malformed_json" | "validation_error") | (413, "payload_too_large")
    );
    assert!(
        ok,
        "unexpected error {} {}: {}",
        e.status, e.code, e.message
    );
}

/// Checks an accepted event against the body, and against the body's
/// object as `serde_json::Value` sees it when it parses as one.
fn check_event(body: &[u8], e: &NewEvent, obj: Option<&Map<String, Value>>) {
    let texts = [
        Some(&e.event_type),
        Some(&e.payload),
        e.source.as_ref(),
        e.metadata.as_ref(),
        e.dedup_id.as_ref(),
    ];
    for t in texts.into_iter().flatten() {
        assert!(!t.contains('\0'), "NUL in {t:?}");
    }
    for raw in [Some(&e.payload), e.metadata.as_ref()]
        .into_iter()
        .flatten()
    {
        let found = memchr::memmem::find(body, raw.as_bytes()).is_some();
        assert!(found, "{raw:?} is not a slice of the body");
        let valid = serde_json::from_str::<IgnoredAny>(raw).is_ok();
        assert!(valid, "{raw:?} is not JSON on its own");
    }
    assert_ne!(e.payload, "null");
    assert!(e.metadata.as_ref().is_none_or(|m| m.starts_with('{')));
    let type_ok = e
        .event_type
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'));
    assert!(
        type_ok && (1..=255).contains(&e.event_type.len()),
        "type {:?}",
        e.event_type
    );
    for t in [&e.source, &e.dedup_id].into_iter().flatten() {
        assert!(t.chars().count() <= 255, "{} characters", t.chars().count());
    }
    if let Some(obj) = obj {
        same_meaning(e, obj);
    }
}

/// The event means what the object's members mean.
fn same_meaning(e: &NewEvent, obj: &Map<String, Value>) {
    const FIELDS: [&str; 5] = ["type", "payload", "dedup_id", "source", "metadata"];
    assert!(
        obj.keys().all(|k| FIELDS.contains(&k.as_str())),
        "{:?}",
        obj.keys()
    );
    let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
    assert_eq!(text("type").as_ref(), Some(&e.event_type));
    assert_eq!(text("source"), e.source);
    assert_eq!(text("dedup_id"), e.dedup_id);
    let value = |raw: &str| serde_json::from_str::<Value>(raw).ok();
    if let Some(p) = value(&e.payload) {
        assert_eq!(Some(&p), obj.get("payload"), "payload {:?}", e.payload);
    }
    match &e.metadata {
        Some(m) => {
            if let Some(v) = value(m) {
                assert_eq!(Some(&v), obj.get("metadata"), "metadata {m:?}");
            }
        }
        None => assert!(obj.get("metadata").is_none_or(Value::is_null)),
    }
}
