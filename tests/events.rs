//! Durable ingestion over real sockets and PostgreSQL: the 202 shape, the id
//! that is stored, every validation rule, tenant isolation on reads, many
//! concurrent ingests all committed, and the memory ack mode.

mod common;

use common::*;
use std::time::Duration;

fn post_event(port: u16, key: &str, body: &str) -> HttpResponse {
    call(
        port,
        "POST",
        "/api/events",
        &[("X-API-Key", key)],
        Some(body),
    )
}

#[test]
fn accepted_events_are_stored_exactly() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0]"]));
    let key = generate_key(s.port, "Ingest", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let body = r#"{"type":"user.created","payload":{"user_id":"12345","text":"tab\there \\ \"quoted\" \n ünïcode"},"source":"crm","metadata":{"trace":"abc"},"dedup_id":"d-1"}"#;
    let r = post_event(s.port, &key, body);
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "accepted");
    assert_eq!(v["type"], "user.created");
    assert_eq!(v["dedup_id"], "d-1");
    assert!(
        v["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 27),
        "{v}"
    );
    assert!(r.header("x-ratelimit-remaining").is_some());
    let id = uuid::Uuid::parse_str(v["id"].as_str().expect("id")).expect("uuid");
    assert_eq!(id.get_version_num(), 7);

    // The 202 came after the commit: the row is there, byte for byte.
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let row = c
        .query_one(
            "SELECT payload, metadata, type, source, dedup_id, status FROM events WHERE id = $1",
            &[&id],
        )
        .expect("stored");
    let sent: serde_json::Value = serde_json::from_str(body).expect("json");
    assert_eq!(row.get::<_, serde_json::Value>(0), sent["payload"]);
    assert_eq!(row.get::<_, serde_json::Value>(1), sent["metadata"]);
    assert_eq!(row.get::<_, String>(2), "user.created");
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("crm"));
    assert_eq!(row.get::<_, String>(5), "pending");

    let r = call(
        s.port,
        "GET",
        &format!("/api/events/{id}"),
        &[("X-API-Key", &key)],
        None,
    );
    assert_eq!(r.status, 200);
    let e = r.json();
    assert_eq!(e["id"], v["id"]);
    assert_eq!(e["payload"], sent["payload"]);
    assert_eq!(e["status"], "pending");
    assert_eq!(e["attempts"], 0);
    assert_eq!(e["created_at"], v["created_at"]);
    assert!(e["delivered_at"].is_null() && e["last_error"].is_null());

    // Any JSON value but null is a payload.
    for p in ["1", "\"text\"", "[1,2]", "true", "{}"] {
        let r = post_event(s.port, &key, &format!(r#"{{"type":"t","payload":{p}}}"#));
        assert_eq!(r.status, 202, "{p}: {}", r.text());
        assert!(r.json()["dedup_id"].is_null());
    }
}

#[test]
fn every_validation_rule_has_its_answer() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&[
            "cores.shards=[0]",
            "ingest.max_payload_bytes=1000",
            "ingest.max_body_bytes=4000",
        ]),
    );
    let key = generate_key(s.port, "Strict", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let long = "x".repeat(256);
    let cases: Vec<(String, &str)> = vec![
        (r#"{"payload":{}}"#.into(), "type"),
        (r#"{"type":"","payload":{}}"#.into(), "type"),
        (r#"{"type":"has space","payload":{}}"#.into(), "type"),
        (r#"{"type":"é","payload":{}}"#.into(), "type"),
        (format!(r#"{{"type":"{long}","payload":{{}}}}"#), "type"),
        (r#"{"type":5,"payload":{}}"#.into(), "type"),
        (r#"{"type":"t"}"#.into(), "payload"),
        (r#"{"type":"t","payload":null}"#.into(), "payload"),
        (
            format!(r#"{{"type":"t","payload":{{}},"dedup_id":"{long}"}}"#),
            "dedup_id",
        ),
        (
            r#"{"type":"t","payload":{},"dedup_id":7}"#.into(),
            "dedup_id",
        ),
        (
            format!(r#"{{"type":"t","payload":{{}},"source":"{long}"}}"#),
            "source",
        ),
        (
            r#"{"type":"t","payload":{},"metadata":"m"}"#.into(),
            "metadata",
        ),
        (
            r#"{"type":"t","payload":{},"metdata":{}}"#.into(),
            "metdata",
        ),
    ];
    for (body, field) in &cases {
        let r = post_event(s.port, &key, body);
        assert_eq!(r.status, 400, "{body}");
        let v = r.json();
        assert_eq!(v["code"], "validation_error", "{body}");
        assert!(v["details"][*field].is_string(), "{body}: {v}");
    }
    let r = post_event(s.port, &key, "{\"type\": \"t\",\n \"payload\": }");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "malformed_json");
    assert_eq!(r.json()["details"]["line"], 2);
    let r = post_event(s.port, &key, "[]");
    assert_eq!(r.json()["code"], "validation_error");

    let big = format!(r#"{{"type":"t","payload":"{}"}}"#, "y".repeat(1200));
    let r = post_event(s.port, &key, &big);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "payload_too_large");
    assert_eq!(r.json()["details"]["limit_bytes"], 1000);
    let huge = format!(r#"{{"type":"t","payload":"{}"}}"#, "y".repeat(5000));
    let r = post_event(s.port, &key, &huge);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["details"]["limit_bytes"], 4000);

    let r = request(
        s.port,
        &format!("POST /api/events HTTP/1.1\r\nX-API-Key: {key}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
    );
    assert_eq!(r.status, 415);
    // 401 comes before 415 and body checks.
    let r = request(s.port, "POST /api/events HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
    assert_eq!(r.status, 401);
    assert_eq!(
        call(s.port, "GET", "/api/events", &[("X-API-Key", &key)], None).status,
        405
    );
    let r = call(
        s.port,
        "GET",
        "/api/events/not-a-uuid",
        &[("X-API-Key", &key)],
        None,
    );
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (400, Some("validation_error"))
    );

    // Nothing that was refused was stored.
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let n: i64 = c
        .query_one("SELECT count(*) FROM events", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn another_organizations_event_is_not_found() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0, 1]"]));
    let a = generate_key(s.port, "A", "pro")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let b = generate_key(s.port, "B", "pro")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let id = post_event(s.port, &a, r#"{"type":"t","payload":{"secret":"a's"}}"#).json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        call(
            s.port,
            "GET",
            &format!("/api/events/{id}"),
            &[("X-API-Key", &a)],
            None
        )
        .status,
        200
    );
    let r = call(
        s.port,
        "GET",
        &format!("/api/events/{id}"),
        &[("X-API-Key", &b)],
        None,
    );
    assert_eq!(r.status, 404);
    assert!(!r.text().contains("a's"));
    let r = call(
        s.port,
        "GET",
        &format!("/api/events/{}", uuid::Uuid::now_v7()),
        &[("X-API-Key", &a)],
        None,
    );
    assert_eq!(r.status, 404);
}

#[test]
fn concurrent_ingest_every_202_is_committed() {
    concurrent_ingest(&[]);
}

#[test]
fn concurrent_ingest_with_three_writers() {
    // Batches of different writers commit concurrently and in any order.
    concurrent_ingest(&["ingest.writers=3"]);
}

fn concurrent_ingest(extra: &[&str]) {
    let db = fresh_database();
    let mut cfg = settings(&["cores.shards=[0, 1]", "limits.enterprise=1000000"]);
    cfg.extend_from_slice(extra);
    let s = TestServer::start(Some(&db), &cfg);
    let key = generate_key(s.port, "Busy", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let port = s.port;
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let key = key.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                let mut c = connect(port);
                for i in 0..100 {
                    let body = format!(r#"{{"type":"load.test","payload":{{"t":{t},"i":{i}}}}}"#);
                    let raw = format!(
                        "POST /api/events HTTP/1.1\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    std::io::Write::write_all(&mut c, raw.as_bytes()).expect("write");
                    let r = read_responses(&mut c, 1);
                    assert_eq!(r[0].status, 202, "{}", r[0].text());
                    ids.push((uuid::Uuid::parse_str(r[0].json()["id"].as_str().expect("id")).expect("uuid"), t, i));
                }
                ids
            })
        })
        .collect();
    let ids: Vec<(uuid::Uuid, i32, i32)> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    assert_eq!(ids.len(), 800);
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    for (id, t, i) in &ids {
        let row = c
            .query_one("SELECT payload FROM events WHERE id = $1", &[id])
            .expect("committed");
        assert_eq!(
            row.get::<_, serde_json::Value>(0),
            serde_json::json!({"t": t, "i": i})
        );
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM events", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, 800);
    let metrics = s.get("/metrics").text();
    assert!(metrics.contains("triggers_events_accepted_total"));
    assert!(
        metrics.contains("triggers_events_committed_total 800\n"),
        "{metrics}"
    );
    // Every committed event sits in exactly one batch of the histogram.
    assert!(
        metrics.contains("triggers_commit_batch_events_sum 800\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("triggers_commit_duration_seconds_bucket{le=\"+Inf\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("triggers_ring_events{shard=\"1\"} 0"),
        "{metrics}"
    );
}

#[test]
fn memory_ack_says_so() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "ingest.ack=memory"]),
    );
    let key = generate_key(s.port, "Fast", "pro")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let r = post_event(s.port, &key, r#"{"type":"t","payload":{}}"#);
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["durability"], "memory");
    assert_eq!(s.get("/status").json()["ack_mode"], "memory");
    let id = r.json()["id"].as_str().expect("id").to_string();
    assert!(eventually(Duration::from_secs(5), || {
        call(
            s.port,
            "GET",
            &format!("/api/events/{id}"),
            &[("X-API-Key", &key)],
            None,
        )
        .status
            == 200
    }));
}

#[test]
fn database_outage_gives_503s_and_loses_nothing() {
    let dir = open_tempdir();
    let mut cluster = start_cluster(dir.path());
    let url = cluster.url("postgres");
    let s = TestServer::start(
        Some(&url),
        &settings(&[
            "cores.shards=[0]",
            "ingest.commit_timeout_ms=1000",
            "http.request_timeout_ms=3000",
            "database.connect_timeout_ms=300",
        ]),
    );
    let key = generate_key(s.port, "Outage", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let mut accepted = Vec::new();
    let mut refused = 0;
    let ingest = |n: usize, accepted: &mut Vec<String>, refused: &mut i32| {
        for i in 0..n {
            let r = post_event(
                s.port,
                &key,
                &format!(r#"{{"type":"outage","payload":{{"i":{i}}}}}"#),
            );
            match r.status {
                202 => accepted.push(r.json()["id"].as_str().expect("id").to_string()),
                503 => {
                    assert!(r.header("retry-after").is_some());
                    *refused += 1;
                }
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
    };
    ingest(20, &mut accepted, &mut refused);
    assert_eq!(accepted.len(), 20);
    cluster.stop().expect("stop");
    ingest(5, &mut accepted, &mut refused);
    assert!(
        refused >= 5,
        "ingest during the outage must be refused, got {refused} refusals"
    );
    assert_eq!(
        s.get("/health").status,
        200,
        "the server survives the outage"
    );
    cluster.start().expect("start");
    assert!(
        eventually(Duration::from_secs(20), || {
            let before = accepted.len();
            ingest(1, &mut accepted, &mut refused);
            accepted.len() > before
        }),
        "ingest did not resume\n{}",
        s.log_text()
    );
    ingest(10, &mut accepted, &mut refused);
    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let stored: Vec<String> = c
        .query("SELECT id::text FROM events", &[])
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &accepted {
        assert!(stored.contains(id), "202'd event {id} is missing");
    }
    assert_eq!(
        stored.len(),
        accepted.len(),
        "an event that got an error was stored"
    );
}

#[test]
fn batches_validate_each_item_and_commit_together() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "limits.free=12"]),
    );
    let key = generate_key(s.port, "Batcher", "free")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let batch = r#"{"events":[
        {"type":"a.one","payload":{"n":1}},
        {"type":"bad type","payload":{}},
        {"type":"a.two","payload":[1,2],"dedup_id":"x"},
        "not an object",
        {"type":"a.three","payload":"p"}
    ]}"#;
    let r = call(
        s.port,
        "POST",
        "/api/events/batch",
        &[("X-API-Key", &key)],
        Some(batch),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(3), Some(2))
    );
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 5);
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["index"], i);
    }
    assert_eq!(results[1]["code"], "validation_error");
    assert_eq!(results[3]["code"], "validation_error");
    let ids: Vec<uuid::Uuid> = [0, 2, 4]
        .iter()
        .map(|&i| {
            assert_eq!(results[i]["status"], "accepted");
            uuid::Uuid::parse_str(results[i]["id"].as_str().expect("id")).expect("uuid")
        })
        .collect();
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let n: i64 = c
        .query_one("SELECT count(*) FROM events WHERE id = ANY($1)", &[&ids])
        .expect("count")
        .get(0);
    assert_eq!(n, 3);
    let total: i64 = c
        .query_one("SELECT count(*) FROM events", &[])
        .expect("count")
        .get(0);
    assert_eq!(total, 3);

    // No valid item: 400 with the same results; nothing stored.
    let r = call(
        s.port,
        "POST",
        "/api/events/batch",
        &[("X-API-Key", &key)],
        Some(r#"{"events":[{"type":"t"},{"payload":1}]}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["details"]["results"]
            .as_array()
            .expect("results")
            .len(),
        2
    );
    for bad in [
        r#"{"events":[]}"#.to_string(),
        r#"{"events":{}}"#.to_string(),
        r#"{}"#.to_string(),
        r#"{"events":[],"x":1}"#.to_string(),
    ] {
        let r = call(
            s.port,
            "POST",
            "/api/events/batch",
            &[("X-API-Key", &key)],
            Some(&bad),
        );
        assert_eq!(r.status, 400, "{bad}");
    }
    assert_eq!(
        call(
            s.port,
            "GET",
            "/api/events/batch",
            &[("X-API-Key", &key)],
            None
        )
        .status,
        405
    );

    // A batch counts once per item against the rate limit (12/min here; 8 used above).
    let four = r#"{"events":[{"type":"t","payload":1},{"type":"t","payload":2},{"type":"t","payload":3},{"type":"t","payload":4}]}"#;
    assert_eq!(
        call(
            s.port,
            "POST",
            "/api/events/batch",
            &[("X-API-Key", &key)],
            Some(four)
        )
        .status,
        429
    );
    let total: i64 = c
        .query_one("SELECT count(*) FROM events", &[])
        .expect("count")
        .get(0);
    assert_eq!(total, 3);
}

#[test]
fn oversized_batches_are_refused() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "limits.enterprise=1000000"]),
    );
    let key = generate_key(s.port, "Big", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let items: Vec<String> = (0..1001)
        .map(|i| format!(r#"{{"type":"t","payload":{i}}}"#))
        .collect();
    let body = format!(r#"{{"events":[{}]}}"#, items.join(","));
    let r = call(
        s.port,
        "POST",
        "/api/events/batch",
        &[("X-API-Key", &key)],
        Some(&body),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["details"]["events"].is_string());
    let body = format!(r#"{{"events":[{}]}}"#, items[..1000].join(","));
    let r = call(
        s.port,
        "POST",
        "/api/events/batch",
        &[("X-API-Key", &key)],
        Some(&body),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["accepted"], 1000);
}

#[test]
fn dedup_ids_within_a_day_are_duplicates() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0, 1]", "limits.enterprise=1000000"]),
    );
    let a = generate_key(s.port, "Dedup A", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let b = generate_key(s.port, "Dedup B", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let body = r#"{"type":"order.created","payload":{"n":1},"dedup_id":"order-1"}"#;
    let first = post_event(s.port, &a, body);
    assert_eq!(first.status, 202);
    let original = first.json()["id"].as_str().expect("id").to_string();
    let again = post_event(s.port, &a, body);
    assert_eq!(again.status, 409, "{}", again.text());
    let v = again.json();
    assert_eq!(v["code"], "duplicate_event");
    assert_eq!(v["details"]["dedup_id"], "order-1");
    assert_eq!(v["details"]["event_id"], original.as_str());
    // Another organization has its own dedup space.
    assert_eq!(post_event(s.port, &b, body).status, 202);

    // Concurrent first uses: exactly one wins, everyone else names the winner.
    let port = s.port;
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || {
                post_event(port, &a, r#"{"type":"t","payload":1,"dedup_id":"race"}"#)
            })
        })
        .collect();
    let answers: Vec<HttpResponse> = racers
        .into_iter()
        .map(|r| r.join().expect("racer"))
        .collect();
    let winners: Vec<&HttpResponse> = answers.iter().filter(|r| r.status == 202).collect();
    assert_eq!(
        winners.len(),
        1,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let winner = winners[0].json()["id"].clone();
    for r in answers.iter().filter(|r| r.status != 202) {
        assert_eq!(r.status, 409);
        assert_eq!(r.json()["details"]["event_id"], winner);
    }

    // In a batch: a repeat inside the batch and a key used before.
    let batch = r#"{"events":[
        {"type":"t","payload":1,"dedup_id":"fresh"},
        {"type":"t","payload":2,"dedup_id":"fresh"},
        {"type":"t","payload":3,"dedup_id":"order-1"},
        {"type":"t","payload":4}
    ]}"#;
    let r = call(
        s.port,
        "POST",
        "/api/events/batch",
        &[("X-API-Key", &a)],
        Some(batch),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["accepted"].as_u64(), v["rejected"].as_u64()),
        (Some(2), Some(2))
    );
    let res = v["results"].as_array().expect("results");
    assert_eq!(res[1]["code"], "duplicate_event");
    assert_eq!(res[1]["details"]["event_id"], res[0]["id"]);
    assert_eq!(res[2]["details"]["event_id"], original.as_str());

    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM events WHERE dedup_id = 'order-1'",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(n, 2, "one per organization");
    let n: i64 = c
        .query_one("SELECT count(*) FROM events WHERE dedup_id = 'race'", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, 1);

    // After 24 hours the dedup_id may be used again.
    c.execute("UPDATE event_dedup SET expires_at = now() - interval '1 second' WHERE dedup_id = 'order-1'", &[])
        .expect("age");
    let r = post_event(s.port, &a, body);
    assert_eq!(r.status, 202, "{}", r.text());
}

#[test]
fn idempotency_keys_replay_refuse_and_survive_a_restart() {
    let db = fresh_database();
    let mut s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0, 1]", "limits.enterprise=1000000"]),
    );
    let key = generate_key(s.port, "Idem", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let body = r#"{"type":"payment.made","payload":{"amount":10}}"#;
    let with_key = |port: u16, k: &str, b: &str| {
        call(
            port,
            "POST",
            "/api/events",
            &[("X-API-Key", &key), ("Idempotency-Key", k)],
            Some(b),
        )
    };

    let first = with_key(s.port, "pay-1", body);
    assert_eq!(first.status, 202, "{}", first.text());
    assert!(first.header("idempotent-replayed").is_none());
    let id = first.json()["id"].clone();
    // The same key and body: the original answer, marked as a replay.
    let again = with_key(s.port, "pay-1", body);
    assert_eq!(again.status, 202);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), first.json());
    // Quoted structured-field form is the same key.
    assert_eq!(with_key(s.port, "\"pay-1\"", body).json()["id"], id);
    // The same key with another body: 422.
    let other = with_key(
        s.port,
        "pay-1",
        r#"{"type":"payment.made","payload":{"amount":11}}"#,
    );
    assert_eq!(other.status, 422);
    assert_eq!(other.json()["code"], "idempotency_key_reused");
    // Validation failures are not stored: fixing the body under the same key works.
    let bad = with_key(s.port, "pay-2", r#"{"type":"","payload":1}"#);
    assert_eq!(bad.status, 400);
    assert_eq!(with_key(s.port, "pay-2", body).status, 202);
    // Keys are checked before dedup_id and scoped per organization.
    let other_org = generate_key(s.port, "Idem 2", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let r = call(
        s.port,
        "POST",
        "/api/events",
        &[("X-API-Key", &other_org), ("Idempotency-Key", "pay-1")],
        Some(body),
    );
    assert_eq!(r.status, 202);
    assert_ne!(r.json()["id"], id);
    let long = "k".repeat(256);
    assert_eq!(with_key(s.port, &long, body).status, 400);

    // Concurrent retries: one is handled, the others are told it is in progress
    // or get its replay.
    let port = s.port;
    let racers: Vec<_> = (0..6)
        .map(|_| {
            let key = key.clone();
            std::thread::spawn(move || {
                call(
                    port,
                    "POST",
                    "/api/events",
                    &[("X-API-Key", &key), ("Idempotency-Key", "race-1")],
                    Some(r#"{"type":"t","payload":1}"#),
                )
            })
        })
        .collect();
    let answers: Vec<HttpResponse> = racers
        .into_iter()
        .map(|r| r.join().expect("racer"))
        .collect();
    let fresh: Vec<&HttpResponse> = answers
        .iter()
        .filter(|r| r.status == 202 && r.header("idempotent-replayed").is_none())
        .collect();
    assert_eq!(
        fresh.len(),
        1,
        "{:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in &answers {
        match r.status {
            202 => assert_eq!(r.json()["id"], fresh[0].json()["id"]),
            409 => assert_eq!(r.json()["code"], "request_in_progress"),
            other => panic!("unexpected {other}"),
        }
    }

    // The record is durable: a restarted server replays the same answer.
    let status = s.terminate(Duration::from_secs(20)).expect("stopped");
    assert!(status.success());
    let s2 = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0, 1]", "limits.enterprise=1000000"]),
    );
    let replay = call(
        s2.port,
        "POST",
        "/api/events",
        &[("X-API-Key", &key), ("Idempotency-Key", "pay-1")],
        Some(body),
    );
    assert_eq!(replay.status, 202, "{}", replay.text());
    assert_eq!(replay.json()["id"], id);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM events WHERE type = 'payment.made'",
            &[],
        )
        .expect("count")
        .get(0);
    assert_eq!(n, 3, "pay-1 once, pay-2 once, the other organization once");
}

#[test]
fn kill_dash_nine_under_load_loses_no_accepted_event() {
    let db = fresh_database();
    let cfg = settings(&["cores.shards=[0, 1]", "limits.enterprise=100000000"]);
    let mut s = TestServer::start(Some(&db), &cfg);
    let key = generate_key(s.port, "Crash", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let port = s.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producers: Vec<_> = (0..6)
        .map(|t| {
            let (key, stop) = (key.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut accepted = Vec::new();
                let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    return accepted;
                };
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let body = format!(r#"{{"type":"crash.test","payload":{{"t":{t},"i":{i},"s":"x\ty"}}}}"#);
                    let raw = format!(
                        "POST /api/events HTTP/1.1\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if std::io::Write::write_all(&mut c, raw.as_bytes()).is_err() {
                        break;
                    }
                    let r = read_responses(&mut c, 1);
                    let Some(r) = r.first() else { break };
                    if r.status == 202 {
                        accepted.push((r.json()["id"].as_str().expect("id").to_string(), body));
                    }
                }
                accepted
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // SIGKILL: no drain, no goodbye.
    let mut child = s.child.take().expect("child");
    child.kill().expect("kill -9");
    let _ = child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let accepted: Vec<(String, String)> = producers
        .into_iter()
        .flat_map(|p| p.join().expect("producer"))
        .collect();
    assert!(
        accepted.len() > 50,
        "too little load to mean anything: {}",
        accepted.len()
    );

    // Restarted on the same database, every 202 is there with its exact payload.
    let s2 = TestServer::start(Some(&db), &cfg);
    assert_eq!(s2.get("/health/ready").status, 200);
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    for (id, body) in &accepted {
        let id = uuid::Uuid::parse_str(id).expect("uuid");
        let row = c
            .query_opt("SELECT payload FROM events WHERE id = $1", &[&id])
            .expect("query");
        let row = row.unwrap_or_else(|| panic!("202'd event {id} is missing after kill -9"));
        let sent: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(row.get::<_, serde_json::Value>(0), sent["payload"]);
    }
    let _ = s.terminate(Duration::from_secs(1));
}
