//! Bounded tables fail closed, and workers are supervised, against the real
//! server and PostgreSQL: a rate limiter full of live organizations still
//! limits the next one; a failure throttle full of live addresses still
//! throttles the next one; a panic injected into query and verifier jobs
//! (debug builds: `TRIGGERS_DEBUG_PANIC_ON`) fails only that request with
//! 500 `internal_error`, is counted, and the pools keep serving.

mod common;

use common::*;
use std::io::Write;

fn get_keys(port: u16, key: &str) -> HttpResponse {
    call(port, "GET", "/api/keys", &[("X-API-Key", key)], None)
}

/// Sends `n` pipelined `GET /api/keys` with `key` on one connection; the
/// statuses in order.
fn burst(port: u16, key: &str, n: usize) -> Vec<u16> {
    let mut c = connect(port);
    let one = format!("GET /api/keys HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n");
    c.write_all(one.repeat(n).as_bytes()).expect("write");
    let rs = read_responses(&mut c, n);
    assert_eq!(rs.len(), n, "every pipelined request answered");
    rs.iter().map(|r| r.status).collect()
}

fn admitted(statuses: &[u16]) -> usize {
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    // Once limited, the rest of a burst is limited too.
    let n = statuses.iter().take_while(|&&s| s == 200).count();
    assert!(statuses[n..].iter().all(|&s| s == 429), "{statuses:?}");
    n
}

#[test]
fn a_full_rate_limiter_still_limits_the_next_organization() {
    let db = fresh_database();
    // The limiter holds `auth.cache_capacity` organizations (at least 16).
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "auth.cache_capacity=16"]),
    );
    // 16 live organizations, each with its minute's quota (free: 100) spent.
    for i in 0..16 {
        let key = new_api_key(s.port, &format!("Filler {i}"), "free");
        let n = admitted(&burst(s.port, &key, 101));
        assert!((100..=101).contains(&n), "filler {i}: {n} admitted");
    }
    // Every further organization is recorded (another entry makes room)
    // and so limited: 100 admitted, then 429. Before, the full table
    // admitted them without recording them: no limit at all.
    for i in 0..4 {
        let key = new_api_key(s.port, &format!("Next {i}"), "free");
        let statuses = burst(s.port, &key, 130);
        let n = admitted(&statuses);
        assert!((100..=101).contains(&n), "next {i}: {n} admitted");
        let r = get_keys(s.port, &key);
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["code"], "rate_limited");
        assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    }
    let text = s.get("/metrics").text();
    let limited = metric_sum(&text, "triggers_rate_limited_total");
    assert!(limited >= 4 * 29 + 4, "{limited}");
}

/// One failing request (an unknown key) from `local`; the status.
fn fail_from(local: &str, port: u16) -> HttpResponse {
    let mut c = connect_from(local, port);
    c.write_all(
        b"GET /api/keys HTTP/1.1\r\nHost: t\r\nX-API-Key: zt_nope\r\nConnection: close\r\n\r\n",
    )
    .expect("write");
    read_responses(&mut c, 1).pop().expect("an answer")
}

#[test]
fn a_full_failure_throttle_still_throttles_the_next_address() {
    let db = fresh_database();
    // The throttle holds `auth.negative_capacity` addresses (at least 16).
    let s = TestServer::start(
        Some(&db),
        &settings(&[
            "cores.shards=[0]",
            "auth.negative_capacity=16",
            "auth.max_failures_per_minute=3",
            "auth.failure_delay_ms=1",
        ]),
    );
    let key = new_api_key(s.port, "Victim", "pro");
    // 16 live addresses (127.0.0.2 ... 127.0.0.17), two failures each.
    for i in 2..18 {
        let ip = format!("127.0.0.{i}");
        for _ in 0..2 {
            assert_eq!(fail_from(&ip, s.port).status, 401, "{ip}");
        }
    }
    // Further addresses are recorded and throttled after 3 failures.
    // Before, the full table did not record them: 401s without end.
    for i in 100..104 {
        let ip = format!("127.0.0.{i}");
        for _ in 0..3 {
            assert_eq!(fail_from(&ip, s.port).status, 401, "{ip}");
        }
        let r = fail_from(&ip, s.port);
        assert_eq!(r.status, 429, "{ip}: {}", r.text());
        assert_eq!(r.json()["code"], "rate_limited");
        assert!(r.header("retry-after").is_some());
        // The throttle is about the address: a valid key from it waits too.
        let mut c = connect_from(&ip, s.port);
        let req = format!("GET /api/keys HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n");
        c.write_all(req.as_bytes()).expect("write");
        assert_eq!(read_responses(&mut c, 1)[0].status, 429, "{ip}");
    }
    // Another address with the valid key is served.
    assert_eq!(get_keys(s.port, &key).status, 200);
    let text = s.get("/metrics").text();
    assert_eq!(metric_sum(&text, "triggers_auth_throttled_total"), 8);
}

fn panics(port: u16, pool: &str) -> u64 {
    let text = call(port, "GET", "/metrics", &[], None).text();
    metric_sum(
        &text,
        &format!("triggers_worker_panics_total{{pool=\"{pool}\"}}"),
    )
}

fn assert_internal_error(r: &HttpResponse) {
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.json()["code"], "internal_error", "{}", r.text());
}

#[test]
fn worker_panics_fail_one_request_each_and_the_pools_keep_serving() {
    let db = fresh_database();
    // Debug builds: every query worker (4) and verifier (2) panics on its
    // first job.
    let s = TestServer::start_env(
        Some(&db),
        &settings(&[
            "cores.shards=[0]",
            "database.query_workers=4",
            "auth.verify_workers=2",
        ]),
        &[("TRIGGERS_DEBUG_PANIC_ON", "query,verify")],
    );
    assert_eq!(panics(s.port, "query"), 0);
    // Sign-up runs on the verifier pool: each verifier fails one job.
    let mut key = None;
    let mut failed = 0;
    for i in 0..20 {
        let body = format!(r#"{{"organization_name":"Survivor {i}","tier":"enterprise"}}"#);
        let r = call(s.port, "POST", "/api/keys/generate", &[], Some(&body));
        if r.status == 201 {
            key = Some(r.json()["api_key"].as_str().expect("key").to_string());
            if panics(s.port, "verify") == 2 {
                break;
            }
        } else {
            assert_internal_error(&r);
            failed += 1;
        }
    }
    let key = key.expect("a sign-up succeeded");
    // A verifier may instead fail a key's first verification: that 500 too.
    for _ in 0..4 {
        let r = get_keys(s.port, &key);
        if r.status == 200 {
            break;
        }
        assert_internal_error(&r);
        failed += 1;
    }
    assert_eq!(panics(s.port, "verify"), 2);
    assert_eq!(failed, 2, "one failed request per verifier panic");
    assert_eq!(get_keys(s.port, &key).status, 200);

    // Ingest does not use the query workers.
    let r = call(
        s.port,
        "POST",
        "/api/events",
        &[("X-API-Key", &key)],
        Some(r#"{"type":"t.one","payload":{"n":1}}"#),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().expect("id").to_string();
    let path = format!("/api/events/{id}");
    // GET /api/events/{id} runs on a query worker: rounds of 4 concurrent
    // reads until every worker has failed its job.
    let mut errors = 0;
    for _ in 0..30 {
        let answers: Vec<HttpResponse> = std::thread::scope(|sc| {
            let reads: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| call(s.port, "GET", &path, &[("X-API-Key", &key)], None)))
                .collect();
            reads
                .into_iter()
                .map(|t| t.join().expect("reader"))
                .collect()
        });
        for r in &answers {
            if r.status == 200 {
                assert_eq!(r.json()["id"], id.as_str());
            } else {
                assert_internal_error(r);
                errors += 1;
            }
        }
        if panics(s.port, "query") == 4 {
            break;
        }
    }
    assert_eq!(
        panics(s.port, "query"),
        4,
        "each query worker panicked once"
    );
    assert_eq!(errors, 4, "one 500 per panic, no other failure");
    // The pool still serves, with every worker through its panic.
    for _ in 0..20 {
        let r = call(s.port, "GET", &path, &[("X-API-Key", &key)], None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["payload"]["n"], 1);
    }
    let r = call(s.port, "GET", "/api/inbox", &[("X-API-Key", &key)], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["events"][0]["id"], id.as_str());
    assert_eq!(call(s.port, "GET", "/health/ready", &[], None).status, 200);
    let text = call(s.port, "GET", "/metrics", &[], None).text();
    assert!(text.contains("triggers_worker_panics_total{pool=\"query\"} 4\n"));
    assert!(text.contains("triggers_worker_panics_total{pool=\"verify\"} 2\n"));
    assert!(text.contains("triggers_worker_panics_total{pool=\"persist\"} 0\n"));
    // One error line per panic, naming the pool; never the panic's message.
    let log = s.log_text();
    let lines = |pool: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("a {pool} worker job panicked at src/")))
            .count()
    };
    assert_eq!((lines("query"), lines("verify")), (4, 2), "{log}");
    assert!(!log.contains("an injected panic"), "{log}");
}
