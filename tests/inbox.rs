//! The consumer side over real sockets and PostgreSQL: the inbox (filters,
//! oldest first, cursor pages walked exactly once, total_undelivered), single
//! and bulk acknowledgements, DELETE, and isolation between organizations.

mod common;

use common::*;
use serde_json::Value;

fn post_event(port: u16, key: &str, t: &str, i: usize) -> String {
    let r = call(
        port,
        "POST",
        "/api/events",
        &[("X-API-Key", key)],
        Some(&format!(r#"{{"type":"{t}","payload":{{"i":{i}}}}}"#)),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().expect("id").to_string()
}

fn inbox(port: u16, key: &str, query: &str) -> HttpResponse {
    call(
        port,
        "GET",
        &format!("/api/inbox{query}"),
        &[("X-API-Key", key)],
        None,
    )
}

#[test]
fn inbox_pages_filters_and_acknowledgements() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0, 1]", "limits.enterprise=1000000"]),
    );
    let key = new_api_key(s.port, "Consumer", "enterprise");
    let other = new_api_key(s.port, "Other", "enterprise");
    let mut ids = Vec::new();
    for i in 0..25 {
        ids.push(post_event(
            s.port,
            &key,
            if i % 5 == 0 {
                "order.created"
            } else {
                "user.created"
            },
            i,
        ));
    }
    let foreign = post_event(s.port, &other, "user.created", 99);

    // Cursor pages: oldest first, every event exactly once.
    let mut seen: Vec<String> = Vec::new();
    let mut query = "?limit=10".to_string();
    let mut pages = 0;
    loop {
        let r = inbox(s.port, &key, &query);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        pages += 1;
        assert_eq!(v["pagination"]["limit"], 10);
        assert_eq!(v["pagination"]["total_undelivered"], 25);
        for e in v["events"].as_array().expect("events") {
            seen.push(e["id"].as_str().expect("id").to_string());
            assert_eq!(e["status"], "pending");
        }
        match v["pagination"]["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(v["pagination"]["has_more"], true);
                query = format!("?limit=10&cursor={c}");
            }
            None => {
                assert_eq!(v["pagination"]["has_more"], false);
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "oldest first, each once");
    assert!(!seen.contains(&foreign));

    // Type filter; total_undelivered ignores it.
    let v = inbox(s.port, &key, "?type=order.created").json();
    assert_eq!(v["events"].as_array().expect("events").len(), 5);
    assert_eq!(v["pagination"]["total_undelivered"], 25);

    // Acknowledge one, twice (idempotent).
    let r = call(
        s.port,
        "POST",
        &format!("/api/ack/{}", ids[0]),
        &[("X-API-Key", &key)],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json();
    assert_eq!(first["status"], "delivered");
    let again = call(
        s.port,
        "POST",
        &format!("/api/ack/{}", ids[0]),
        &[("X-API-Key", &key)],
        None,
    )
    .json();
    assert_eq!(again["acknowledged_at"], first["acknowledged_at"]);
    let e = call(
        s.port,
        "GET",
        &format!("/api/events/{}", ids[0]),
        &[("X-API-Key", &key)],
        None,
    )
    .json();
    assert_eq!(e["status"], "delivered");
    assert_eq!(e["delivered_at"], first["acknowledged_at"]);

    // Bulk, with an unknown id and another organization's id.
    let unknown = uuid::Uuid::now_v7().to_string();
    let body = serde_json::json!({"ids": [ids[1], ids[2], unknown, foreign]}).to_string();
    let r = call(
        s.port,
        "POST",
        "/api/ack",
        &[("X-API-Key", &key)],
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["acknowledged"], 2);
    let nf: Vec<&str> = v["not_found"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(nf, vec![unknown.as_str(), foreign.as_str()]);

    // DELETE acknowledges too; GET still shows the event.
    let r = call(
        s.port,
        "DELETE",
        &format!("/api/events/{}", ids[3]),
        &[("X-API-Key", &key)],
        None,
    );
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(
        call(
            s.port,
            "DELETE",
            &format!("/api/events/{}", ids[3]),
            &[("X-API-Key", &key)],
            None
        )
        .status,
        204
    );
    let e = call(
        s.port,
        "GET",
        &format!("/api/events/{}", ids[3]),
        &[("X-API-Key", &key)],
        None,
    )
    .json();
    assert_eq!(e["status"], "delivered");

    let v = inbox(s.port, &key, "").json();
    assert_eq!(v["pagination"]["total_undelivered"], 21);
    assert_eq!(v["events"].as_array().expect("events").len(), 21);
    let v = inbox(s.port, &key, "?status=delivered").json();
    assert_eq!(v["events"].as_array().expect("events").len(), 4);
    assert_eq!(
        inbox(s.port, &key, "?status=all&limit=1000").json()["events"]
            .as_array()
            .expect("e")
            .len(),
        25
    );

    // Another organization can neither see nor acknowledge these events.
    let path = format!("/api/ack/{}", ids[5]);
    assert_eq!(
        call(s.port, "POST", &path, &[("X-API-Key", &other)], None).status,
        404
    );
    assert_eq!(
        call(
            s.port,
            "DELETE",
            &format!("/api/events/{}", ids[5]),
            &[("X-API-Key", &other)],
            None
        )
        .status,
        404
    );
    let v = inbox(s.port, &other, "?status=all").json();
    assert_eq!(v["events"].as_array().expect("events").len(), 1);
    assert_eq!(v["pagination"]["total_undelivered"], 1);
}

#[test]
fn bad_inbox_and_ack_input_is_named() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0]"]));
    let key = new_api_key(s.port, "Picky", "pro");
    for (query, param) in [
        ("?status=done", "status"),
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?cursor=garbage!", "cursor"),
        ("?wait=31", "wait"),
        ("?colour=red", "colour"),
    ] {
        let r = inbox(s.port, &key, query);
        assert_eq!(r.status, 400, "{query}");
        assert!(
            r.json()["details"][param].is_string(),
            "{query}: {}",
            r.text()
        );
    }
    for body in [
        r#"{}"#,
        r#"{"ids": []}"#,
        r#"{"ids": ["nope"]}"#,
        r#"{"ids": "x"}"#,
        r#"{"ids": ["00000000-0000-0000-0000-000000000000"], "x": 1}"#,
    ] {
        let r = call(
            s.port,
            "POST",
            "/api/ack",
            &[("X-API-Key", &key)],
            Some(body),
        );
        assert_eq!(r.status, 400, "{body}");
    }
    let many: Vec<String> = (0..1001)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let r = call(
        s.port,
        "POST",
        "/api/ack",
        &[("X-API-Key", &key)],
        Some(&serde_json::json!({"ids": many}).to_string()),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        call(
            s.port,
            "POST",
            "/api/ack/not-a-uuid",
            &[("X-API-Key", &key)],
            None
        )
        .status,
        400
    );
    assert_eq!(
        call(s.port, "GET", "/api/ack/x", &[("X-API-Key", &key)], None).status,
        405
    );
    assert_eq!(
        call(
            s.port,
            "POST",
            "/api/inbox",
            &[("X-API-Key", &key)],
            Some("{}")
        )
        .status,
        405
    );
    assert_eq!(inbox(s.port, "zt_nope", "").status, 401);
}

#[test]
fn long_poll_is_woken_by_commits() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0, 1]"]));
    let key = new_api_key(s.port, "Waiter", "pro");

    // Nothing arrives: the request returns empty after the wait.
    let start = std::time::Instant::now();
    let v = inbox(s.port, &key, "?wait=1").json();
    let waited = start.elapsed();
    assert!(v["events"].as_array().expect("events").is_empty());
    assert!(
        waited >= std::time::Duration::from_millis(950)
            && waited < std::time::Duration::from_secs(3),
        "{waited:?}"
    );

    // An event of another type does not end a filtered wait; a matching one does.
    let (port, k) = (s.port, key.clone());
    let producer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        post_event(port, &k, "other.type", 1);
        std::thread::sleep(std::time::Duration::from_millis(800));
        post_event(port, &k, "wanted.type", 2)
    });
    let start = std::time::Instant::now();
    let v = inbox(s.port, &key, "?wait=10&type=wanted.type").json();
    let waited = start.elapsed();
    let wanted = producer.join().expect("producer");
    let events = v["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{v}");
    assert_eq!(events[0]["id"].as_str(), Some(wanted.as_str()));
    assert!(
        waited >= std::time::Duration::from_millis(1100)
            && waited < std::time::Duration::from_secs(5),
        "{waited:?}"
    );

    // Waiter and producer on new connections, so on either shard: a commit
    // wakes waiters on every shard (by chance all six pairs share a shard
    // one time in 64).
    for round in 0..6 {
        let (port, k) = (s.port, key.clone());
        let t = format!("round.{round}");
        let producer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            post_event(port, &k, &t, 1)
        });
        let start = std::time::Instant::now();
        let v = inbox(s.port, &key, &format!("?wait=10&type=round.{round}")).json();
        let waited = start.elapsed();
        let id = producer.join().expect("producer");
        assert_eq!(v["events"][0]["id"].as_str(), Some(id.as_str()), "{v}");
        assert!(
            waited < std::time::Duration::from_secs(3),
            "round {round}: {waited:?}"
        );
    }
}

#[test]
fn cursor_walks_ten_thousand_events_exactly_once() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "limits.enterprise=100000000"]),
    );
    let key = new_api_key(s.port, "Walker", "enterprise");
    for b in 0..10 {
        let items: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"type":"walk","payload":{}}}"#, b * 1000 + i))
            .collect();
        let body = format!(r#"{{"events":[{}]}}"#, items.join(","));
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
    let mut seen = std::collections::HashSet::new();
    let mut payloads = Vec::new();
    let mut query = "?limit=777".to_string();
    let mut pages = 0;
    loop {
        let v = inbox(s.port, &key, &query).json();
        pages += 1;
        for e in v["events"].as_array().expect("events") {
            assert!(
                seen.insert(e["id"].as_str().expect("id").to_string()),
                "an event came twice"
            );
            payloads.push(e["payload"].as_i64().expect("payload"));
        }
        match v["pagination"]["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=777&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 10_000);
    assert_eq!(pages, 13);
    // Oldest first: batches in order; ids within a batch are minted in item order.
    assert_eq!(payloads, (0..10_000).collect::<Vec<i64>>());
}

#[test]
fn concurrent_single_acks_share_batches() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0]"]));
    let key = new_api_key(s.port, "Acker", "enterprise");
    let other = new_api_key(s.port, "Other", "enterprise");
    let ids: Vec<String> = (0..160)
        .map(|i| post_event(s.port, &key, "ack.me", i))
        .collect();
    let foreign = post_event(s.port, &other, "not.yours", 0);
    // 16 clients ack 10 events each, plus one unknown id and one of the
    // other organization's events each, all at once.
    let port = s.port;
    let workers: Vec<_> = ids
        .chunks(10)
        .map(|chunk| {
            let (chunk, key, foreign) = (chunk.to_vec(), key.clone(), foreign.clone());
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                let unknown = "0190aaaa-0000-7000-8000-000000000000".to_string();
                for id in chunk.iter().chain([&unknown, &foreign]) {
                    let r = call(
                        port,
                        "POST",
                        &format!("/api/ack/{id}"),
                        &[("X-API-Key", &key)],
                        None,
                    );
                    answers.push((id.clone(), r));
                }
                answers
            })
        })
        .collect();
    for w in workers {
        for (id, r) in w.join().expect("worker") {
            if id.starts_with("0190aaaa") || id == foreign {
                assert_eq!(r.status, 404, "{id}: {}", r.text());
                continue;
            }
            assert_eq!(r.status, 200, "{id}: {}", r.text());
            let v = r.json();
            assert_eq!(v["id"].as_str(), Some(id.as_str()));
            assert_eq!(v["status"], "delivered");
            assert!(v["acknowledged_at"].is_string());
        }
    }
    // Every event acknowledged exactly, the other organization's untouched.
    let v = inbox(s.port, &key, "?status=delivered&limit=1000").json();
    assert_eq!(v["events"].as_array().expect("events").len(), 160);
    let v = inbox(s.port, &key, "").json();
    assert_eq!(v["events"].as_array().expect("events").len(), 0);
    assert_eq!(v["pagination"]["total_undelivered"], 0);
    let v = inbox(s.port, &other, "").json();
    assert_eq!(v["events"][0]["id"].as_str(), Some(foreign.as_str()));
    let text = s.get("/metrics").text();
    let count = |name: &str| metric_sum(&text, name);
    assert_eq!(count("triggers_acks_batched_total"), 192);
    let batches = count("triggers_ack_batches_total");
    assert!(
        batches < 192,
        "{batches} statements for 192 concurrent acks"
    );
}
