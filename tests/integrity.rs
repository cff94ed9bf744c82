//! Integrity and fault containment over real sockets and PostgreSQL:
//! payloads stored and returned exactly as sent, text PostgreSQL cannot hold
//! refused up front, a row PostgreSQL refuses fails that row only (never
//! another tenant's events), and the earlier clients' spellings accepted.

mod common;

use common::*;
use rand::Rng;
use std::time::{Duration, Instant};

fn post(port: u16, key: &str, path: &str, body: &str) -> HttpResponse {
    call(port, "POST", path, &[("X-API-Key", key)], Some(body))
}

fn get_event(port: u16, key: &str, id: &str) -> HttpResponse {
    call(
        port,
        "GET",
        &format!("/api/events/{id}"),
        &[("X-API-Key", key)],
        None,
    )
}

/// The payload text `body` (one event as the API shows it) embeds.
fn payload_text(body: &str) -> &str {
    let start = body.find("\"payload\":").expect("payload member") + "\"payload\":".len();
    let end = body[start..]
        .find(",\"metadata\":")
        .expect("metadata follows payload");
    &body[start..start + end]
}

/// Payload texts serde_json's re-encoding would change, and odd ones.
const ODD_PAYLOADS: [&str; 12] = [
    "0.22872765087281322",
    "123456789012345678901234567890",
    "-98765432109876543210987654321.000000000000000000001",
    "1.10",
    "1e400",
    "-0.0",
    r#"{"zebra":1,"apple":2,"mango":{"b":[],"a":{}}}"#,
    r#"{ "spaced" :  [ 1 ,2 ] , "tab":	true }"#,
    r#""NUL \u0000 inside, escaped \u00e9 and raw é, emoji \ud83d\ude00""#,
    r#"{"dup":1,"dup":2}"#,
    r#"[1e-400, 0E0, 1E+2, -1.5e-3]"#,
    r#""\ud800 lone surrogate escape""#,
];

#[test]
fn payloads_round_trip_exactly() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "limits.enterprise=1000000"]),
    );
    let key = new_api_key(s.port, "Exact", "enterprise");
    let mut sent: Vec<(String, String, Option<String>)> = Vec::new();
    for p in ODD_PAYLOADS {
        let meta = r#"{"z": 1.10, "a": 123456789012345678901234567890}"#;
        let body = format!(r#"{{"type":"odd","payload":{p},"metadata":{meta}}}"#);
        let r = post(s.port, &key, "/api/events", &body);
        assert_eq!(r.status, 202, "{p}: {}", r.text());
        let id = r.json()["id"].as_str().expect("id").to_string();
        sent.push((id, p.to_string(), Some(meta.to_string())));
    }
    // Random doubles, in batches, as the shortest round-trip text of each.
    let mut rng = rand::thread_rng();
    for _ in 0..4 {
        let payloads: Vec<String> = (0..250)
            .map(|_| {
                let x: f64 = rng.gen::<f64>() * 10f64.powi(rng.gen_range(-30..30));
                format!(r#"{{"x":{x},"y":[{:e}],"n":{}}}"#, -x, rng.gen::<u128>())
            })
            .collect();
        let items: Vec<String> = payloads
            .iter()
            .map(|p| format!(r#"{{"type":"double","payload":{p}}}"#))
            .collect();
        let body = format!(r#"{{"events":[{}]}}"#, items.join(","));
        let r = post(s.port, &key, "/api/events/batch", &body);
        assert_eq!(r.status, 202, "{}", r.text());
        let v = r.json();
        assert_eq!(v["accepted"], 250, "{v}");
        for (res, p) in v["results"]
            .as_array()
            .expect("results")
            .iter()
            .zip(payloads)
        {
            sent.push((res["id"].as_str().expect("id").to_string(), p, None));
        }
    }
    // GET shows each payload's text unchanged; so does PostgreSQL.
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    for (id, p, meta) in &sent {
        let r = get_event(s.port, &key, id);
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.text();
        assert_eq!(payload_text(&body), p, "{body}");
        if let Some(m) = meta {
            assert!(body.contains(&format!("\"metadata\":{m},")), "{body}");
        }
        let uuid = uuid::Uuid::parse_str(id).expect("uuid");
        let row = c
            .query_one("SELECT payload::text FROM events WHERE id = $1", &[&uuid])
            .expect("stored");
        assert_eq!(&row.get::<_, String>(0), p);
    }
    // Inbox pages embed the same text.
    let mut seen = 0;
    let mut cursor = String::new();
    loop {
        let r = call(
            s.port,
            "GET",
            &format!("/api/inbox?limit=1000{cursor}"),
            &[("X-API-Key", &key)],
            None,
        );
        assert_eq!(r.status, 200);
        let text = r.text();
        for (_, p, _) in &sent {
            if text.contains(&format!("\"payload\":{p},")) {
                seen += 1;
            }
        }
        // (Not parsed with serde_json: it refuses 1e400, which is valid JSON.)
        match text.split("\"next_cursor\":\"").nth(1) {
            Some(rest) => cursor = format!("&cursor={}", &rest[..rest.find('"').expect("end")]),
            None => break,
        }
    }
    assert_eq!(seen, sent.len());
}

#[test]
fn text_postgresql_cannot_hold_is_refused_up_front() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0]"]));
    let key = new_api_key(s.port, "Nul", "pro");
    for (field, body) in [
        ("source", r#"{"type":"t","payload":1,"source":"a\u0000b"}"#),
        (
            "dedup_id",
            r#"{"type":"t","payload":1,"dedup_id":"\u0000"}"#,
        ),
        ("type", r#"{"type":"a\u0000b","payload":1}"#),
    ] {
        let r = post(s.port, &key, "/api/events", body);
        assert_eq!(r.status, 400, "{field}: {}", r.text());
        let v = r.json();
        assert_eq!(v["code"], "validation_error");
        assert!(v["details"][field].is_string(), "{v}");
        let batch = format!(r#"{{"events":[{body},{{"type":"ok","payload":2}}]}}"#);
        let r = post(s.port, &key, "/api/events/batch", &batch);
        assert_eq!(r.status, 202, "{}", r.text());
        let v = r.json();
        assert_eq!(v["results"][0]["code"], "validation_error", "{v}");
        assert_eq!(v["accepted"], 1);
    }
    for idem in ["a\0b", "\"a\0b\""] {
        let r = call(
            s.port,
            "POST",
            "/api/events",
            &[("X-API-Key", &key), ("Idempotency-Key", idem)],
            Some(r#"{"type":"t","payload":1}"#),
        );
        assert_eq!(r.status, 400, "{}", r.text());
    }
    let r = call(
        s.port,
        "POST",
        "/api/keys/generate",
        &[],
        Some(r#"{"organization_name":"bad\u0000name"}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["details"]["organization_name"].is_string());
    // Only the three "ok" items of the batches are stored.
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let types: Vec<String> = c
        .query("SELECT type FROM events ORDER BY id", &[])
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        types.iter().filter(|t| *t == "ok").count() == 3,
        "{types:?}"
    );
    assert_eq!(types.len(), 3, "{types:?}");
    let orgs: i64 = c
        .query_one("SELECT count(*) FROM organizations", &[])
        .expect("count")
        .get(0);
    assert_eq!(orgs, 1);
}

/// Makes PostgreSQL refuse some rows for real: a CHECK constraint that
/// fails for `source = 'refuse-me'` (SQLSTATE 23514) and one that divides
/// by zero for `source = 'divide'` (a data exception, 22012).
fn refuse_some_rows(db: &str) {
    let mut c = postgres::Client::connect(db, postgres::NoTls).expect("connect");
    c.batch_execute(
        "ALTER TABLE events ADD CONSTRAINT test_refuse CHECK (source IS DISTINCT FROM 'refuse-me');
         ALTER TABLE events ADD CONSTRAINT test_divide CHECK (source IS DISTINCT FROM 'divide' OR 1 / (length(source) - 6) = 1);",
    )
    .expect("constraints");
}

#[test]
fn a_refused_row_fails_alone_and_quickly() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "limits.enterprise=1000000"]),
    );
    let key = new_api_key(s.port, "Refused", "enterprise");
    refuse_some_rows(&db);
    let started = Instant::now();
    let r = post(
        s.port,
        &key,
        "/api/events",
        r#"{"type":"t","payload":1,"source":"refuse-me"}"#,
    );
    assert_eq!(r.status, 500, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], "internal_error");
    assert_eq!(v["details"]["sqlstate"], "23514", "{v}");
    let r = post(
        s.port,
        &key,
        "/api/events",
        r#"{"type":"t","payload":1,"source":"divide"}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["details"]["event"]["sqlstate"], "22012");
    assert!(started.elapsed() < Duration::from_secs(2), "no retrying");
    // A batch with unstorable items commits the others.
    let batch = r#"{"events":[
        {"type":"b","payload":0},
        {"type":"b","payload":1,"source":"refuse-me"},
        {"type":"b","payload":2,"dedup_id":"d2"},
        {"type":"b","payload":3,"source":"divide"},
        {"type":"b","payload":4}
    ]}"#;
    let r = post(s.port, &key, "/api/events/batch", batch);
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    let results = v["results"].as_array().expect("results");
    assert_eq!(results[1]["code"], "internal_error");
    assert_eq!(results[3]["code"], "validation_error");
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let stored: Vec<String> = c
        .query(
            "SELECT payload::text FROM events WHERE type = 'b' ORDER BY id",
            &[],
        )
        .expect("select")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ["0", "2", "4"]);
    // The refused row's dedup_id claim did not survive; the stored one's did.
    let r = post(
        s.port,
        &key,
        "/api/events",
        r#"{"type":"b","payload":5,"dedup_id":"d2"}"#,
    );
    assert_eq!(r.status, 409, "{}", r.text());
    // A batch of nothing storable is answered with the first refusal.
    let r = post(
        s.port,
        &key,
        "/api/events/batch",
        r#"{"events":[{"type":"c","payload":1,"source":"refuse-me"}]}"#,
    );
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.json()["details"]["results"].is_array());
    let metrics = s.get("/metrics").text();
    assert_eq!(metric_sum(&metrics, "triggers_events_refused_total "), 5);
    assert_eq!(metric_sum(&metrics, "triggers_events_dropped_total "), 0);
    let log = s.log_text();
    assert!(log.contains("SQLSTATE 23514"), "{log}");
    assert!(
        !log.contains("refuse-me"),
        "the log never quotes the row: {log}"
    );
}

#[test]
fn another_tenants_ingest_is_not_held_by_refused_events() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "limits.enterprise=1000000"]),
    );
    let attacker = new_api_key(s.port, "Attacker", "enterprise");
    let victim = new_api_key(s.port, "Victim", "enterprise");
    refuse_some_rows(&db);
    let port = s.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let bad = std::thread::spawn(move || {
        let mut sent = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            for body in [
                r#"{"type":"x","payload":1,"source":"refuse-me"}"#,
                r#"{"type":"x","payload":"\u0000"}"#,
            ] {
                let r = post(port, &attacker, "/api/events", body);
                assert!(r.status == 500 || r.status == 202, "{}", r.text());
                sent += 1;
            }
        }
        sent
    });
    let victims: Vec<_> = (0..8)
        .map(|t| {
            let key = victim.clone();
            std::thread::spawn(move || {
                let mut slowest = Duration::ZERO;
                for i in 0..100 {
                    let started = Instant::now();
                    let body = format!(r#"{{"type":"v","payload":{{"t":{t},"i":{i}}}}}"#);
                    let r = post(port, &key, "/api/events", &body);
                    assert_eq!(r.status, 202, "{}", r.text());
                    slowest = slowest.max(started.elapsed());
                }
                slowest
            })
        })
        .collect();
    let slowest = victims
        .into_iter()
        .map(|v| v.join().expect("victim"))
        .max()
        .unwrap_or_default();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attacks = bad.join().expect("attacker");
    assert!(attacks >= 4, "the attacker ran alongside: {attacks}");
    assert!(
        slowest < Duration::from_secs(1),
        "slowest victim ingest {slowest:?}"
    );
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let n: i64 = c
        .query_one("SELECT count(*) FROM events WHERE type = 'v'", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, 800);
}

#[test]
fn memory_ack_counts_what_it_drops() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "ingest.ack=memory"]),
    );
    let key = new_api_key(s.port, "Memory", "pro");
    refuse_some_rows(&db);
    let batch = r#"{"events":[{"type":"m","payload":1},{"type":"m","payload":2,"source":"refuse-me"},{"type":"m","payload":3}]}"#;
    let r = post(s.port, &key, "/api/events/batch", batch);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["durability"], "memory");
    let dropped = || metric_sum(&s.get("/metrics").text(), "triggers_events_dropped_total ");
    assert!(eventually(Duration::from_secs(5), || dropped() == 1));
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let n: i64 = c
        .query_one("SELECT count(*) FROM events WHERE type = 'm'", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, 2, "the rest of the batch is stored");
}

#[test]
fn the_earlier_clients_spellings_are_accepted() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0]"]));
    let r = call(
        s.port,
        "POST",
        "/api/keys/generate",
        &[],
        Some(r#"{"org_name":"Old client","tier":"pro"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["organization_name"], "Old client");
    let key = v["api_key"].as_str().expect("key").to_string();
    let r = call(
        s.port,
        "POST",
        "/api/keys/generate",
        &[],
        Some(r#"{"org_name":"a","organization_name":"b"}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["details"]["org_name"].is_string());
    let r = s.get("/health/live");
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("healthy"))
    );
    let r = post(s.port, &key, "/api/events", r#"{"type":"t","payload":1}"#);
    let id = r.json()["id"].as_str().expect("id").to_string();
    let r = post(s.port, &key, &format!("/api/ack/{id}"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["success"], true);
    let r = post(s.port, &key, "/api/ack", &format!(r#"{{"ids":["{id}"]}}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["success"].as_bool(), v["acknowledged"].as_u64()),
        (Some(true), Some(1))
    );
}
