//! Event bodies (`POST /api/events` and `POST /api/events/batch`), validated
//! in one pass without building a tree. The top-level members are read as
//! the exact text the producer sent (`serde_json::value::RawValue`, borrowed
//! from the request body), so `payload` and `metadata` reach PostgreSQL, and
//! later every reader, byte for byte as sent: every digit, the key order,
//! the escapes. Numbers are checked for syntax only, so any valid JSON
//! number is accepted. Text fields are decoded and refused when PostgreSQL's
//! `text` cannot hold them (NUL).

use super::body::FieldErrors;
use super::ApiError;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::json;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The fields an event may have.
const FIELDS: [&str; 5] = ["type", "payload", "dedup_id", "source", "metadata"];
/// Items a batch may hold.
pub const MAX_BATCH_ITEMS: usize = 1000;
/// Unknown fields named in one error (a body of thousands of them gets a
/// short answer).
const MAX_NAMED_UNKNOWN: usize = 16;

/// A validated event: `payload` and `metadata` are the producer's JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub payload: String,
    pub source: Option<String>,
    pub metadata: Option<String>,
    pub dedup_id: Option<String>,
}

/// A member name: borrowed from the body unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

type Members<'a> = Vec<(Key<'a>, &'a RawValue)>;

/// A JSON value that is an object (its members, values as raw text) or
/// something else (consumed and dropped).
struct ObjectOrNot<'a>(Option<Members<'a>>);

/// Implements the visitor methods that turn any non-object value into `not`.
macro_rules! not_an_object {
    ($not:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($not)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($not)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($not)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($not)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($not)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($not)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($not)
        }
    };
}

impl<'de> Deserialize<'de> for ObjectOrNot<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = ObjectOrNot<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(5);
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    members.push((k, map.next_value::<&'de RawValue>()?));
                }
                Ok(ObjectOrNot(Some(members)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ObjectOrNot(None))
            }
            not_an_object!(ObjectOrNot(None));
        }
        d.deserialize_any(ObjectVisitor)
    }
}

/// The `events` member of a batch: its items, or why it is not a list of
/// 1 to 1000 of them.
enum EventList<'a> {
    Items(Vec<ObjectOrNot<'a>>),
    TooMany,
    Empty,
    NotAList,
}

impl<'de> Deserialize<'de> for EventList<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = EventList<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of events")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(16).min(64));
                while items.len() < MAX_BATCH_ITEMS {
                    match seq.next_element::<ObjectOrNot<'de>>()? {
                        Some(item) => items.push(item),
                        None if items.is_empty() => return Ok(EventList::Empty),
                        None => return Ok(EventList::Items(items)),
                    }
                }
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(EventList::Items(items));
                }
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(EventList::TooMany)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(EventList::NotAList)
            }
            not_an_object!(EventList::NotAList);
        }
        d.deserialize_any(ListVisitor)
    }
}

/// A batch body: its `events` member (if any) and unknown member names.
struct BatchBody<'a> {
    events: Option<EventList<'a>>,
    duplicate: bool,
    unknown: Vec<Key<'a>>,
}

/// A batch body that is a JSON object, or `None`.
struct BatchOrNot<'a>(Option<BatchBody<'a>>);

impl<'de> Deserialize<'de> for BatchOrNot<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct BatchVisitor;
        impl<'de> Visitor<'de> for BatchVisitor {
            type Value = BatchOrNot<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut body = BatchBody {
                    events: None,
                    duplicate: false,
                    unknown: Vec::new(),
                };
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    if k.0 == "events" {
                        body.duplicate |= body.events.is_some();
                        body.events = Some(map.next_value::<EventList<'de>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                        if body.unknown.len() < MAX_NAMED_UNKNOWN {
                            body.unknown.push(k);
                        }
                    }
                }
                Ok(BatchOrNot(Some(body)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(BatchOrNot(None))
            }
            not_an_object!(BatchOrNot(None));
        }
        d.deserialize_any(BatchVisitor)
    }
}

/// 400 `malformed_json` with the line and column serde_json reports.
fn malformed(e: serde_json::Error) -> ApiError {
    ApiError::new(
        400,
        "malformed_json",
        format!("The body is not valid JSON: {e}."),
    )
    .details(json!({"line": e.line(), "column": e.column()}))
}

fn not_an_object() -> ApiError {
    ApiError::new(400, "validation_error", "The body must be a JSON object.")
        .details(json!({"body": "must be a JSON object"}))
}

/// Validates the body of `POST /api/events`.
pub fn parse_event(body: &[u8], max_payload_bytes: usize) -> Result<NewEvent, ApiError> {
    let ObjectOrNot(members) = serde_json::from_slice(body).map_err(malformed)?;
    event(&members.ok_or_else(not_an_object)?, max_payload_bytes)
}

/// Validates the body of `POST /api/events/batch`: the body itself (an
/// object with 1 to 1000 `events`), then each item on its own.
pub fn parse_batch(
    body: &[u8],
    max_payload_bytes: usize,
) -> Result<Vec<Result<NewEvent, ApiError>>, ApiError> {
    let BatchOrNot(batch) = serde_json::from_slice(body).map_err(malformed)?;
    let batch = batch.ok_or_else(not_an_object)?;
    let mut errors = FieldErrors::default();
    for k in &batch.unknown {
        errors.add(&k.0, "unknown field");
    }
    if batch.duplicate {
        errors.add("events", "appears more than once");
    }
    let items = match batch.events {
        Some(EventList::Items(items)) => items,
        Some(EventList::TooMany | EventList::Empty) => {
            errors.add("events", "must hold 1 to 1000 events");
            Vec::new()
        }
        Some(EventList::NotAList) => {
            errors.add("events", "must be a list of events");
            Vec::new()
        }
        None => {
            errors.add("events", "is required");
            Vec::new()
        }
    };
    errors.finish()?;
    Ok(items
        .into_iter()
        .map(|item| match item.0 {
            Some(members) => event(&members, max_payload_bytes),
            None => Err(ApiError::new(
                400,
                "validation_error",
                "Each event must be a JSON object.",
            )),
        })
        .collect())
}

/// Builds the event from an object's members.
fn event(members: &Members<'_>, max_payload_bytes: usize) -> Result<NewEvent, ApiError> {
    let mut errors = FieldErrors::default();
    let mut found: [Option<&RawValue>; FIELDS.len()] = [None; FIELDS.len()];
    let mut unknown = 0;
    for (k, v) in members {
        match FIELDS.iter().position(|f| *f == k.0) {
            Some(i) if found[i].is_some() => errors.add(&k.0, "appears more than once"),
            Some(i) => found[i] = Some(v),
            None if unknown < MAX_NAMED_UNKNOWN => {
                unknown += 1;
                errors.add(&k.0, "unknown field");
            }
            None => {}
        }
    }
    let [event_type, payload, dedup_id, source, metadata] = found;
    let event_type = match event_type.map(text) {
        Some(Ok(Some(t))) if valid_type(&t) => t,
        Some(Ok(Some(_))) => bad(&mut errors, "type", TYPE_RULE),
        Some(Ok(None)) | None => bad(&mut errors, "type", "is required"),
        Some(Err(why)) => bad(&mut errors, "type", why),
    };
    let payload = match payload.map(RawValue::get) {
        None => bad(&mut errors, "payload", "is required"),
        Some("null") => bad(&mut errors, "payload", "must not be null"),
        Some(p) => p.to_owned(),
    };
    let source = optional_text(source, "source", &mut errors);
    let dedup_id = optional_text(dedup_id, "dedup_id", &mut errors);
    let metadata = match metadata.map(RawValue::get) {
        None | Some("null") => None,
        Some(m) if m.starts_with('{') => Some(m.to_owned()),
        Some(_) => {
            errors.add("metadata", "must be an object");
            None
        }
    };
    errors.finish()?;
    if payload.len() > max_payload_bytes {
        return Err(ApiError::new(
            413,
            "payload_too_large",
            format!("The payload exceeds {max_payload_bytes} bytes as sent."),
        )
        .details(json!({"limit_bytes": max_payload_bytes})));
    }
    Ok(NewEvent {
        event_type,
        payload,
        source,
        metadata,
        dedup_id,
    })
}

const TYPE_RULE: &str = "must be 1-255 characters of A-Z a-z 0-9 . _ : / -";

fn valid_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 255
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

/// Records `why` for `field` and yields a placeholder.
fn bad(errors: &mut FieldErrors, field: &str, why: &str) -> String {
    errors.add(field, why);
    String::new()
}

/// A string member decoded (`None` for `null`), or why it cannot be one.
fn text(raw: &RawValue) -> Result<Option<String>, &'static str> {
    let t = raw.get();
    if t == "null" {
        return Ok(None);
    }
    if !t.starts_with('"') {
        return Err("must be a string");
    }
    let s: String = serde_json::from_str(t).map_err(|_| "must be valid Unicode text")?;
    if s.contains('\0') {
        return Err("must not contain NUL (\\u0000)");
    }
    Ok(Some(s))
}

/// An optional string member of at most 255 characters.
fn optional_text(raw: Option<&RawValue>, field: &str, errors: &mut FieldErrors) -> Option<String> {
    match raw.map(text) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(s))) if s.chars().count() <= 255 => Some(s),
        Some(Ok(Some(_))) => {
            errors.add(field, "must be at most 255 characters");
            None
        }
        Some(Err(why)) => {
            errors.add(field, why);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload_of(body: &str) -> String {
        parse_event(body.as_bytes(), 1 << 20)
            .unwrap_or_else(|e| panic!("{body}: {e:?}"))
            .payload
    }

    #[test]
    fn payload_and_metadata_are_the_text_sent() {
        for p in [
            "0.22872765087281322",
            "123456789012345678901234567890",
            "1.10",
            "1e400",
            "-0.0",
            r#"{"b":1,"a":2}"#,
            r#"{ "spaced" : [ 1 , 2 ] }"#,
            r#""\u0000 \ud83d\ude00 é \"q\"""#,
            r#"[{"z":{"y":1e-400}}]"#,
        ] {
            assert_eq!(payload_of(&format!(r#"{{"type":"t","payload":{p}}}"#)), p);
            assert_eq!(
                payload_of(&format!("{{ \"payload\" :\n {p} ,\"type\":\"t\"}}")),
                p
            );
        }
        let e = parse_event(
            br#"{"type":"t","payload":1,"metadata":{"k": 1.10, "a":[]}}"#,
            100,
        )
        .expect("valid");
        assert_eq!(e.metadata.as_deref(), Some(r#"{"k": 1.10, "a":[]}"#));
    }

    #[test]
    fn text_fields_are_decoded_and_nul_is_refused() {
        let e = parse_event(
            br#"{"type":"a.b","payload":{},"source":"caf\u00e9","dedup_id":"x\"y"}"#,
            100,
        )
        .expect("valid");
        assert_eq!(e.source.as_deref(), Some("café"));
        assert_eq!(e.dedup_id.as_deref(), Some("x\"y"));
        for field in ["source", "dedup_id"] {
            let body = format!(r#"{{"type":"t","payload":1,"{field}":"a\u0000b"}}"#);
            let err = parse_event(body.as_bytes(), 100).expect_err("NUL");
            assert_eq!((err.status, err.code), (400, "validation_error"));
            assert!(err.details.expect("details")[field].is_string());
        }
        let err = parse_event(br#"{"type":"t","payload":1,"source":"\ud800"}"#, 100)
            .expect_err("lone surrogate");
        assert_eq!(
            err.details.expect("details")["source"],
            "must be valid Unicode text"
        );
    }

    #[test]
    fn field_rules() {
        let cases: [(&str, &str); 9] = [
            (r#"{"payload":1}"#, "type"),
            (r#"{"type":"t"}"#, "payload"),
            (r#"{"type":"t","payload":null}"#, "payload"),
            (r#"{"type":"a b","payload":1}"#, "type"),
            (r#"{"type":7,"payload":1}"#, "type"),
            (r#"{"type":"t","payload":1,"metadata":[1]}"#, "metadata"),
            (r#"{"type":"t","payload":1,"source":5}"#, "source"),
            (r#"{"type":"t","payload":1,"tpye":5}"#, "tpye"),
            (r#"{"type":"t","payload":1,"payload":2}"#, "payload"),
        ];
        for (body, field) in cases {
            let err = parse_event(body.as_bytes(), 100).expect_err(body);
            assert_eq!(err.code, "validation_error", "{body}");
            assert!(err.details.expect("details")[field].is_string(), "{body}");
        }
        let err = parse_event(b"[1,2]", 100).expect_err("array");
        assert_eq!(err.code, "validation_error");
        let err = parse_event(b"{\"type\":", 100).expect_err("malformed");
        assert_eq!(err.code, "malformed_json");
        assert_eq!(err.details.expect("details")["line"], 1);
        let err = parse_event(br#"{"type":"t","payload":"12345678"}"#, 5).expect_err("big");
        assert_eq!((err.status, err.code), (413, "payload_too_large"));
    }

    #[test]
    fn batches_validate_each_item() {
        let items = parse_batch(
            br#"{"events":[{"type":"a","payload":1.10},7,{"type":"b"}]}"#,
            100,
        )
        .expect("batch");
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().expect("first").payload, "1.10");
        assert!(items[1].is_err() && items[2].is_err());
        for (body, field) in [
            (r#"{"events":[]}"#, "events"),
            (r#"{"events":{}}"#, "events"),
            (r#"{}"#, "events"),
            (r#"{"events":[1],"x":1}"#, "x"),
        ] {
            let err = parse_batch(body.as_bytes(), 100).expect_err(body);
            assert!(err.details.expect("details")[field].is_string(), "{body}");
        }
        let many = format!(r#"{{"events":[{}1]}}"#, "1,".repeat(MAX_BATCH_ITEMS));
        assert!(parse_batch(many.as_bytes(), 100).is_err());
        let most = format!(r#"{{"events":[{}1]}}"#, "1,".repeat(MAX_BATCH_ITEMS - 1));
        assert_eq!(parse_batch(most.as_bytes(), 100).expect("1000").len(), 1000);
    }
}
