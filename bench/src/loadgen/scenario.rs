//! The requests each scenario sends, as ready-to-write HTTP/1.1 bytes, and
//! the reading of the response bodies that matter (batch `accepted`, inbox
//! event ids, ack `acknowledged`).

use serde_json::Value;

use crate::args::{Args, ScenarioName};

/// Body of one ingested event (single, many-keys, mixed producers).
pub const SINGLE_EVENT: &str = r#"{"type": "test.event", "payload": {"test": "data"}}"#;
/// Inbox page read by consumers.
pub const INBOX_PATH: &str = "/api/inbox?limit=100";

/// The kinds of request, reported separately under `kinds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// The generic request (--method/--path/--body).
    Request,
    /// `POST /api/events`.
    Ingest,
    /// `POST /api/events/batch`.
    Batch,
    /// `GET /api/inbox`.
    Inbox,
    /// `POST /api/ack`.
    Ack,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Ingest => "ingest",
            Kind::Batch => "batch",
            Kind::Inbox => "inbox",
            Kind::Ack => "ack",
        }
    }
}

/// What one connection does in a scenario.
#[derive(Clone, Debug)]
pub enum Role {
    /// Sends the same request over and over (possibly on a schedule).
    Producer {
        kind: Kind,
        method: String,
        path: String,
        body: String,
    },
    /// Reads an inbox page, then bulk-acks the ids it got.
    Consumer,
}

impl Role {
    /// The kind charged for connection failures of this role.
    pub fn kind(&self) -> Kind {
        match self {
            Role::Producer { kind, .. } => *kind,
            Role::Consumer => Kind::Inbox,
        }
    }

    /// The producer's request with this key.
    pub fn request(&self, key: Option<&str>) -> Vec<u8> {
        match self {
            Role::Producer {
                method, path, body, ..
            } => request_bytes(method, path, key, body),
            Role::Consumer => request_bytes("GET", INBOX_PATH, key, ""),
        }
    }
}

/// The role of the connection with this index (0-based) in the scenario:
/// in `mixed`, the last `consumers` connections consume.
pub fn role(a: &Args, connection: usize) -> Role {
    let producer = |kind, path: &str, body: String| Role::Producer {
        kind,
        method: "POST".into(),
        path: path.into(),
        body,
    };
    match a.scenario {
        ScenarioName::Generic => Role::Producer {
            kind: Kind::Request,
            method: a.method.clone(),
            path: a.path.clone(),
            body: a.body.clone(),
        },
        ScenarioName::Single | ScenarioName::ManyKeys => {
            producer(Kind::Ingest, "/api/events", SINGLE_EVENT.into())
        }
        ScenarioName::Batch => producer(Kind::Batch, "/api/events/batch", batch_body(a.batch_size)),
        ScenarioName::Mixed if connection >= a.connections - a.consumers() => Role::Consumer,
        ScenarioName::Mixed => producer(Kind::Ingest, "/api/events", SINGLE_EVENT.into()),
    }
}

/// Whether the scenario needs API keys.
pub fn needs_keys(s: ScenarioName) -> bool {
    s != ScenarioName::Generic
}

/// Whether the scenario ingests events (reports `events`, `events_per_s`).
pub fn ingests(s: ScenarioName) -> bool {
    s != ScenarioName::Generic
}

/// `{"events": [...]}` with `n` copies of the single event.
pub fn batch_body(n: usize) -> String {
    let events = vec![SINGLE_EVENT; n].join(", ");
    format!(r#"{{"events": [{events}]}}"#)
}

/// One HTTP/1.1 request; a non-empty body goes as application/json.
pub fn request_bytes(method: &str, path: &str, key: Option<&str>, body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\n");
    if let Some(k) = key {
        r.push_str(&format!("X-API-Key: {k}\r\n"));
    }
    if !body.is_empty() {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// The bulk-ack request for these event ids.
pub fn ack_request(key: Option<&str>, ids: &[String]) -> Vec<u8> {
    let body = serde_json::json!({ "ids": ids }).to_string();
    request_bytes("POST", "/api/ack", key, &body)
}

fn json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("response is not JSON: {e}"))
}

/// The event ids of an inbox page `{"events": [{"id": ...}, ...], ...}`.
pub fn inbox_ids(body: &[u8]) -> Result<Vec<String>, String> {
    let v = json(body)?;
    let events = v
        .get("events")
        .and_then(Value::as_array)
        .ok_or("inbox response has no `events` array")?;
    events
        .iter()
        .map(|e| {
            e.get("id")
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| "inbox event without a string `id`".to_string())
        })
        .collect()
}

/// A non-negative integer field of a JSON object body.
fn count_field(body: &[u8], field: &str) -> Result<u64, String> {
    json(body)?
        .get(field)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("response has no integer `{field}`"))
}

/// Events stored by a successful batch: its `accepted` count.
pub fn batch_accepted(body: &[u8]) -> Result<u64, String> {
    count_field(body, "accepted")
}

/// Events acknowledged by a bulk ack: its `acknowledged` count.
pub fn ack_count(body: &[u8]) -> Result<u64, String> {
    count_field(body, "acknowledged")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses request bytes with httparse; returns (method, path, headers, body).
    fn parse(bytes: &[u8]) -> (String, String, Vec<(String, String)>, Vec<u8>) {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        let head = match req.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("not a complete request: {other:?}"),
        };
        let hs = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        (
            req.method.unwrap_or_default().to_string(),
            req.path.unwrap_or_default().to_string(),
            hs,
            bytes[head..].to_vec(),
        )
    }

    fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
        hs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn args(extra: &[&str]) -> Args {
        use clap::Parser;
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    #[test]
    fn single_request_is_valid_http_with_the_event() {
        let a = args(&["--scenario", "single"]);
        let bytes = role(&a, 0).request(Some("zt_key"));
        let (method, path, hs, body) = parse(&bytes);
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/api/events"));
        assert_eq!(header(&hs, "x-api-key"), Some("zt_key"));
        assert_eq!(header(&hs, "content-type"), Some("application/json"));
        assert_eq!(
            header(&hs, "content-length"),
            Some(&*body.len().to_string())
        );
        let v: Value = serde_json::from_slice(&body).expect("JSON body");
        assert_eq!(v["type"], "test.event");
        assert_eq!(v["payload"]["test"], "data");
    }

    #[test]
    fn batch_request_holds_batch_size_events() {
        let a = args(&["--scenario", "batch", "--batch-size", "7"]);
        let (method, path, hs, body) = parse(&role(&a, 3).request(Some("k")));
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("POST", "/api/events/batch")
        );
        assert_eq!(
            header(&hs, "content-length"),
            Some(&*body.len().to_string())
        );
        let v: Value = serde_json::from_slice(&body).expect("JSON body");
        let events = v["events"].as_array().expect("events array");
        assert_eq!(events.len(), 7);
        assert!(events.iter().all(|e| e["type"] == "test.event"));
    }

    #[test]
    fn generic_request_without_body_has_no_content_length() {
        let a = args(&["--path", "/api/keys"]);
        let (method, path, hs, body) = parse(&role(&a, 0).request(None));
        assert_eq!((method.as_str(), path.as_str()), ("GET", "/api/keys"));
        assert_eq!(header(&hs, "content-length"), None);
        assert_eq!(header(&hs, "x-api-key"), None);
        assert!(body.is_empty());
    }

    #[test]
    fn mixed_puts_consumers_last() {
        let a = args(&[
            "--scenario",
            "mixed",
            "--connections",
            "4",
            "--consumers",
            "1",
        ]);
        let kinds: Vec<Kind> = (0..4).map(|i| role(&a, i).kind()).collect();
        assert_eq!(
            kinds,
            [Kind::Ingest, Kind::Ingest, Kind::Ingest, Kind::Inbox]
        );
        let (method, path, _, _) = parse(&role(&a, 3).request(Some("k")));
        assert_eq!((method.as_str(), path.as_str()), ("GET", INBOX_PATH));
    }

    #[test]
    fn inbox_page_becomes_an_ack_body() {
        let page = br#"{"events": [{"id": "0190a0b0-0000-7000-8000-000000000001", "type": "t"},
            {"id": "0190a0b0-0000-7000-8000-000000000002"}],
            "pagination": {"next_cursor": null, "has_more": false, "limit": 100, "total_undelivered": 2}}"#;
        let ids = inbox_ids(page).expect("valid page");
        assert_eq!(ids.len(), 2);
        let (method, path, hs, body) = parse(&ack_request(Some("k"), &ids));
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/api/ack"));
        assert_eq!(
            header(&hs, "content-length"),
            Some(&*body.len().to_string())
        );
        let v: Value = serde_json::from_slice(&body).expect("JSON body");
        assert_eq!(
            v,
            serde_json::json!({"ids": [
                "0190a0b0-0000-7000-8000-000000000001",
                "0190a0b0-0000-7000-8000-000000000002"
            ]})
        );
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        assert_eq!(inbox_ids(br#"{"events": []}"#), Ok(vec![]));
        assert!(inbox_ids(b"not json").is_err());
        assert!(inbox_ids(br#"{"events": {}}"#).is_err());
        assert!(inbox_ids(br#"{"events": [{"id": 5}]}"#).is_err());
        assert_eq!(batch_accepted(br#"{"accepted": 3, "rejected": 0}"#), Ok(3));
        assert!(batch_accepted(br#"{"accepted": -1}"#).is_err());
        assert_eq!(ack_count(br#"{"acknowledged": 2, "not_found": []}"#), Ok(2));
        assert!(ack_count(b"").is_err());
    }
}
