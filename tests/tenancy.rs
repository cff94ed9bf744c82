//! Organizations and API keys against the real server and PostgreSQL:
//! sign-up validation, the admin token, authentication by either header,
//! 401 codes held to one latency, rotation with and without grace (in one
//! process and across two), rate limits over two shards, the failure
//! throttle, connection handoff, secrets kept out of logs, concurrent
//! misses sharing one verification, and cached keys re-read past their TTL
//! without a new Argon2id verification.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

/// Timing-sensitive tests take this so they never run beside one another
/// (the flood would skew the rate measurement on a 2-core machine).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn get_keys(port: u16, key: &str) -> HttpResponse {
    call(port, "GET", "/api/keys", &[("X-API-Key", key)], None)
}

#[test]
fn sign_up_validation_and_admin_token() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0]"]));
    let v = generate_key(s.port, "  Acme Inc  ", "pro");
    assert_eq!(v["organization_name"], "Acme Inc");
    assert_eq!(v["tier"], "pro");
    assert_eq!(v["rate_limit_per_minute"], 1000);
    let key = v["api_key"].as_str().expect("key");
    assert!(key.starts_with("zt_") && key.len() == 48, "{key}");
    assert_eq!(&key[3..15], v["key_id"].as_str().expect("id"));
    assert!(v["warning"].is_string() && v["created_at"].is_string());
    assert_eq!(
        generate_key(s.port, "Defaults", "free")["rate_limit_per_minute"],
        100
    );
    let r = call(
        s.port,
        "POST",
        "/api/keys/generate",
        &[],
        Some(r#"{"organization_name":"NoTier"}"#),
    );
    assert_eq!(r.json()["tier"], "free");

    let long = "x".repeat(256);
    for (body, field) in [
        (r#"{}"#.to_string(), "organization_name"),
        (
            r#"{"organization_name":""}"#.to_string(),
            "organization_name",
        ),
        (
            r#"{"organization_name":"   "}"#.to_string(),
            "organization_name",
        ),
        (
            format!(r#"{{"organization_name":"{long}"}}"#),
            "organization_name",
        ),
        (
            r#"{"organization_name":42}"#.to_string(),
            "organization_name",
        ),
        (
            r#"{"organization_name":"a","tier":"gold"}"#.to_string(),
            "tier",
        ),
        (
            r#"{"organization_name":"a","tier":"Pro"}"#.to_string(),
            "tier",
        ),
        (r#"{"organization_name":"a","tier":5}"#.to_string(), "tier"),
        (
            r#"{"organization_name":"a","teir":"pro"}"#.to_string(),
            "teir",
        ),
    ] {
        let r = call(s.port, "POST", "/api/keys/generate", &[], Some(&body));
        assert_eq!(r.status, 400, "{body}");
        let v = r.json();
        assert_eq!(v["code"], "validation_error", "{body}");
        assert!(v["details"][field].is_string(), "{body}: {v}");
    }
    let r = call(
        s.port,
        "POST",
        "/api/keys/generate",
        &[],
        Some(r#"{"organization_name": "a",,}"#),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "malformed_json");
    assert_eq!(r.json()["details"]["line"], 1);
    assert!(r.json()["details"]["column"].as_u64().is_some());
    let r = call(s.port, "POST", "/api/keys/generate", &[], Some("[1]"));
    assert_eq!(r.json()["code"], "validation_error");
    let r = request(
        s.port,
        "POST /api/keys/generate HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(r.status, 415);
    assert_eq!(r.json()["code"], "unsupported_media_type");
    let r = request(
        s.port,
        "POST /api/keys/generate HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 28\r\nConnection: close\r\n\r\n{\"organization_name\":\"Semi\"}",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        call(s.port, "GET", "/api/keys/generate", &[], None).status,
        405
    );
    // Open sign-up is announced once, at start.
    let open = "auth.admin_token is not set";
    assert_eq!(s.log_text().matches(open).count(), 1, "{}", s.log_text());

    // With an admin token, sign-up needs it.
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "auth.admin_token=adm1n-t0ken"]),
    );
    let body = Some(r#"{"organization_name":"Closed"}"#);
    let r = call(s.port, "POST", "/api/keys/generate", &[], body);
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (401, Some("missing_api_key"))
    );
    let r = call(
        s.port,
        "POST",
        "/api/keys/generate",
        &[("Authorization", "Bearer nope")],
        body,
    );
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let r = call(
        s.port,
        "POST",
        "/api/keys/generate",
        &[("Authorization", "Bearer adm1n-t0ken")],
        body,
    );
    assert_eq!(r.status, 201);
    assert!(!s.log_text().contains(open), "{}", s.log_text());
}

#[test]
fn authentication_headers_and_401s_held_to_one_latency() {
    let _heavy = heavy();
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "auth.failure_delay_ms=150"]),
    );
    let v = generate_key(s.port, "Acme", "business");
    let key = v["api_key"].as_str().expect("key").to_string();

    let r = get_keys(s.port, &key);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["organization_id"], v["organization_id"]);
    assert_eq!(body["key_id"], v["key_id"]);
    assert_eq!(body["tier"], "business");
    assert_eq!(body["rate_limit_per_minute"], 10000);
    assert!(body["webhook_url"].is_null());
    assert!(
        body.get("api_key").is_none()
            && !r.text().contains(&key[16..])
            && !r.text().contains("argon2")
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("10000"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"tier\";q=10000;w=60"));
    assert!(r.header("x-ratelimit-remaining").is_some() && r.header("ratelimit").is_some());
    let r = call(
        s.port,
        "GET",
        "/api/keys",
        &[("Authorization", &format!("Bearer {key}"))],
        None,
    );
    assert_eq!(r.status, 200);

    let wrong_secret = format!("{}{}", &key[..16], "A".repeat(32));
    let unknown_id = format!("zt_{}_{}", "ZZZZZZZZZZZZ", &key[16..]);
    let cases: [(&str, Option<String>, &str); 4] = [
        ("missing", None, "missing_api_key"),
        ("malformed", Some("zt_short".into()), "invalid_api_key"),
        ("unknown", Some(unknown_id), "invalid_api_key"),
        ("wrong secret", Some(wrong_secret), "invalid_api_key"),
    ];
    let mut medians = Vec::new();
    for (what, k, code) in &cases {
        let mut times = Vec::new();
        for _ in 0..5 {
            let headers: Vec<(&str, &str)> = k.iter().map(|k| ("X-API-Key", k.as_str())).collect();
            let start = Instant::now();
            let r = call(s.port, "GET", "/api/keys", &headers, None);
            times.push(start.elapsed());
            assert_eq!(r.status, 401, "{what}");
            assert_eq!(r.json()["code"], *code, "{what}");
            assert!(
                r.header("x-ratelimit-limit").is_none(),
                "{what}: 401s are not counted"
            );
        }
        times.sort();
        assert!(times[0] >= Duration::from_millis(145), "{what}: {times:?}");
        medians.push(times[2]);
    }
    let (lo, hi) = (
        medians.iter().min().expect("min"),
        medians.iter().max().expect("max"),
    );
    assert!(
        *hi - *lo < Duration::from_millis(40),
        "medians differ: {medians:?}"
    );
}

#[test]
fn rotation_grace_and_revocation() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0, 1]"]));
    let v = generate_key(s.port, "Rotating", "pro");
    let k1 = v["api_key"].as_str().expect("key").to_string();
    assert_eq!(get_keys(s.port, &k1).status, 200);

    // Grace period: both keys work until it ends.
    let r = call(
        s.port,
        "POST",
        "/api/keys/rotate",
        &[("X-API-Key", &k1)],
        Some(r#"{"grace_seconds": 2}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rv = r.json();
    let k2 = rv["api_key"].as_str().expect("key").to_string();
    assert_ne!(k1, k2);
    assert_eq!(rv["organization_id"], v["organization_id"]);
    assert!(rv["rotated_at"].is_string() && rv["old_key_expires_at"].is_string());
    assert_eq!(get_keys(s.port, &k1).status, 200);
    assert_eq!(get_keys(s.port, &k2).status, 200);
    std::thread::sleep(Duration::from_millis(2300));
    assert_eq!(get_keys(s.port, &k1).status, 401);
    assert_eq!(get_keys(s.port, &k2).status, 200);

    // No grace: the old key stops at once, on every connection and shard.
    let r = call(
        s.port,
        "POST",
        "/api/keys/rotate",
        &[("X-API-Key", &k2)],
        None,
    );
    assert_eq!(r.status, 200);
    let k3 = r.json()["api_key"].as_str().expect("key").to_string();
    for _ in 0..10 {
        assert_eq!(get_keys(s.port, &k2).status, 401);
        assert_eq!(get_keys(s.port, &k3).status, 200);
    }

    for bad in [
        r#"{"grace_seconds": -1}"#,
        r#"{"grace_seconds": 86401}"#,
        r#"{"grace_seconds": "5"}"#,
        r#"{"grace": 5}"#,
    ] {
        let r = call(
            s.port,
            "POST",
            "/api/keys/rotate",
            &[("X-API-Key", &k3)],
            Some(bad),
        );
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["code"], "validation_error");
    }
    assert_eq!(
        get_keys(s.port, &k3).status,
        200,
        "failed rotations change nothing"
    );
}

#[test]
fn revocation_reaches_another_process_within_a_second() {
    let db = fresh_database();
    let a = TestServer::start(Some(&db), &settings(&["cores.shards=[0]"]));
    let b = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[1]", "auth.cache_ttl_seconds=3600"]),
    );
    let k1 = new_api_key(a.port, "Shared", "free");
    assert_eq!(get_keys(b.port, &k1).status, 200, "B caches the key");
    assert_eq!(get_keys(b.port, &k1).status, 200);
    let r = call(
        a.port,
        "POST",
        "/api/keys/rotate",
        &[("X-API-Key", &k1)],
        None,
    );
    assert_eq!(r.status, 200);
    let rotated = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || get_keys(b.port, &k1).status
            == 401),
        "B still accepts the revoked key after {:?}",
        rotated.elapsed()
    );
    let k2 = r.json()["api_key"].as_str().expect("key").to_string();
    assert_eq!(get_keys(b.port, &k2).status, 200);
}

#[test]
fn rate_limit_is_exact_across_two_shards() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0, 1]", "limits.free=40"]),
    );
    let key = new_api_key(s.port, "Limited", "free");
    // New connections land on both shards; every request is settled by the owner.
    let mut allowed = 0;
    let mut limited = None;
    for _ in 0..50 {
        let r = get_keys(s.port, &key);
        match r.status {
            200 => allowed += 1,
            429 => limited = Some(r),
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert!((40..=41).contains(&allowed), "allowed {allowed}");
    let r = limited.expect("some requests were limited");
    let v = r.json();
    assert_eq!(v["code"], "rate_limited");
    assert_eq!(v["details"]["limit"], 40);
    assert_eq!(v["details"]["window"], 60);
    let retry: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("int");
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(v["details"]["retry_after"], retry);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let text = s.get("/metrics").text();
    assert!(text.contains("triggers_rate_limited_total"));
    // The limit refills continuously: 40/min is one request per 1.5 s.
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(get_keys(s.port, &key).status, 200);
    assert_eq!(get_keys(s.port, &key).status, 429);
}

#[test]
fn failed_authentications_are_throttled_per_address() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&[
            "cores.shards=[0]",
            "auth.max_failures_per_minute=5",
            "auth.failure_delay_ms=10",
        ]),
    );
    let key = new_api_key(s.port, "Victim", "free");
    for _ in 0..5 {
        assert_eq!(get_keys(s.port, "zt_nope").status, 401);
    }
    let r = get_keys(s.port, "zt_nope");
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "rate_limited");
    assert!(r.header("retry-after").is_some());
    // The throttle is about the address: the shard does no key work for it now.
    assert_eq!(get_keys(s.port, &key).status, 429);
    assert!(s
        .get("/metrics")
        .text()
        .contains("triggers_auth_throttled_total{shard=\"0\",core=\"0\"} 2"));
}

#[test]
fn keys_are_served_on_every_shard_by_leases() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0, 1]"]));
    let keys: Vec<String> = (0..6)
        .map(|i| new_api_key(s.port, &format!("Org {i}"), "enterprise"))
        .collect();
    let mut requests = 0;
    for key in &keys {
        for _ in 0..4 {
            let mut c = connect(s.port);
            // Pipelined: on the shard that does not own the key, the first
            // request asks the owner for a lease and the rest join the ask.
            let one = format!("GET /api/keys HTTP/1.1\r\nX-API-Key: {key}\r\n\r\n");
            c.write_all(one.repeat(5).as_bytes()).expect("write");
            let rs = read_responses(&mut c, 5);
            assert_eq!(rs.len(), 5);
            assert!(
                rs.iter().all(|r| r.status == 200),
                "{:?}",
                rs.iter().map(|r| r.status).collect::<Vec<_>>()
            );
            // The rate-limit headers are the organization's on both shards.
            for r in &rs {
                assert_eq!(r.header("x-ratelimit-limit"), Some("100000"));
                let remaining: u64 = r
                    .header("x-ratelimit-remaining")
                    .expect("remaining")
                    .parse()
                    .expect("int");
                assert!((99_900..100_000).contains(&remaining), "{remaining}");
            }
            for _ in 0..3 {
                c.write_all(one.as_bytes()).expect("write");
                assert_eq!(read_responses(&mut c, 1)[0].status, 200);
            }
            requests += 8;
        }
    }
    let text = s.get("/metrics").text();
    let served = |shard: &str| {
        metric_sum(
            &text,
            &format!("triggers_http_requests_total{{shard=\"{shard}\",route=\"/api/keys\",status=\"200\""),
        )
    };
    assert_eq!(served("0") + served("1"), requests);
    assert!(served("0") > 0 && served("1") > 0, "{text}");
    assert_eq!(metric_sum(&text, "triggers_connection_handoffs_total"), 0);
    let messages = metric_sum(&text, "triggers_cross_shard_messages_total");
    let leased = metric_sum(&text, "triggers_auth_lease_hits_total");
    let granted = metric_sum(&text, "triggers_auth_leases_granted_total");
    assert!(
        (1..=24).contains(&messages),
        "{messages} lease requests for {requests} requests"
    );
    assert!(granted >= 1 && granted <= messages);
    assert!(
        leased > messages,
        "{leased} requests served on leases, {messages} asks"
    );
}

#[test]
fn rotation_with_leases_on_the_other_shard() {
    // The old key stops at once on both shards, although the shard that
    // does not own it holds a lease of it.
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &settings(&["cores.shards=[0, 1]"]));
    for round in 0..3 {
        let key = new_api_key(s.port, &format!("Rot {round}"), "enterprise");
        // New connections spread over both shards: leases on the other one.
        for _ in 0..8 {
            assert_eq!(get_keys(s.port, &key).status, 200);
        }
        let r = call(
            s.port,
            "POST",
            "/api/keys/rotate",
            &[("X-API-Key", &key)],
            None,
        );
        assert_eq!(r.status, 200);
        let fresh = r.json()["api_key"].as_str().expect("key").to_string();
        for _ in 0..8 {
            assert_eq!(get_keys(s.port, &key).status, 401);
            assert_eq!(get_keys(s.port, &fresh).status, 200);
        }
    }
}

#[test]
fn secrets_never_reach_the_log() {
    let db = fresh_database();
    let s = TestServer::start_env(
        Some(&db),
        &settings(&["cores.shards=[0, 1]"]),
        &[("RUST_LOG", "debug")],
    );
    let mut secrets = Vec::new();
    for i in 0..3 {
        let k = new_api_key(s.port, &format!("Secretive {i}"), "pro");
        assert_eq!(get_keys(s.port, &k).status, 200);
        let r = call(
            s.port,
            "POST",
            "/api/keys/rotate",
            &[("X-API-Key", &k)],
            Some(r#"{"grace_seconds": 60}"#),
        );
        let k2 = r.json()["api_key"].as_str().expect("key").to_string();
        assert_eq!(get_keys(s.port, &k2).status, 200);
        let wrong = format!("{}{}", &k2[..16], "B".repeat(32));
        assert_eq!(get_keys(s.port, &wrong).status, 401);
        secrets.extend([k, k2, wrong]);
    }
    let log = s.log_text();
    assert!(log.contains("DEBUG"), "the log ran at debug level");
    for k in &secrets {
        assert!(!log.contains(&k[16..]), "a secret reached the log");
    }
    assert!(!log.contains("$argon2id$"), "a key hash reached the log");
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

#[test]
fn a_flood_of_random_keys_leaves_legitimate_clients_served() {
    let _heavy = heavy();
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&[
            "cores.shards=[0]",
            "auth.max_failures_per_minute=1000000",
            "limits.enterprise=1000000",
        ]),
    );
    let key = new_api_key(s.port, "Legit", "enterprise");
    assert_eq!(get_keys(s.port, &key).status, 200);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = s.port;
    let flooders: Vec<_> = (0..1)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Many connections, one random key each, never waiting for the
                // held 401s: every request costs the server a verification.
                let mut sent = 0u64;
                let mut open = std::collections::VecDeque::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sent += 1;
                    let id = format!("{t}{sent:0>11}");
                    let mut c = connect_from("127.0.0.2", port);
                    let req = format!(
                        "GET /api/keys HTTP/1.1\r\nX-API-Key: zt_{}_{}\r\n\r\n",
                        &id[id.len() - 12..],
                        "Q".repeat(32)
                    );
                    if c.write_all(req.as_bytes()).is_ok() {
                        open.push_back(c);
                    }
                    if open.len() > 200 {
                        open.pop_front();
                    }
                    // About 2 000 random keys a second from this thread: a
                    // flood, without the test's own threads starving the
                    // server of CPU on a 2-core machine.
                    std::thread::sleep(Duration::from_micros(500));
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut c = connect(s.port);
    let one = format!("GET /api/keys HTTP/1.1\r\nX-API-Key: {key}\r\n\r\n");
    let mut times = Vec::new();
    for _ in 0..1000 {
        let start = Instant::now();
        c.write_all(one.as_bytes()).expect("write");
        let r = read_responses(&mut c, 1);
        times.push(start.elapsed());
        assert_eq!(r[0].status, 200);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded: u64 = flooders
        .into_iter()
        .map(|f| f.join().expect("flooder"))
        .sum();
    let p50 = percentile(&mut times, 50);
    let p99 = percentile(&mut times, 99);
    let text = s.get("/metrics").text();
    println!("legitimate P50 {p50:?} P99 {p99:?} under a flood of {flooded} random-key requests");
    assert!(
        flooded >= 100,
        "the flood was too small to mean anything: {flooded}"
    );
    // Debug build sharing 2 cores with the flood, PostgreSQL and the test
    // itself, so scheduler noise reaches the tail: the median must stay low
    // (a shard doing verification work itself would push it to many ms) and
    // the tail bounded. The release figure (P99 well under 2 ms) is measured
    // by bench/auth, see tuning.md.
    assert!(p50 < Duration::from_millis(25), "P50 {p50:?}");
    assert!(p99 < Duration::from_millis(500), "P99 {p99:?}");
    assert!(text.contains("triggers_auth_failures_total"));
}

#[test]
fn admitted_rate_matches_the_limit_over_time() {
    let _heavy = heavy();
    // 1200/min = 20/s. Spend the burst, then count what is admitted over 20 s
    // of over-limit demand from connections spread over both shards.
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0, 1]", "limits.pro=1200"]),
    );
    let key = new_api_key(s.port, "Steady", "pro");
    let one = format!("GET /api/keys HTTP/1.1\r\nX-API-Key: {key}\r\n\r\n");
    let mut conns: Vec<_> = (0..8).map(|_| connect(s.port)).collect();
    // Drain the burst.
    let mut drained = 0;
    'drain: loop {
        for c in conns.iter_mut() {
            c.write_all(one.as_bytes()).expect("write");
            let r = read_responses(c, 1);
            if r[0].status == 429 {
                break 'drain;
            }
            drained += 1;
        }
    }
    assert!(
        (1195..=1240).contains(&drained),
        "burst {drained} (the burst plus what refills while draining)"
    );
    let window = Duration::from_secs(20);
    let start = Instant::now();
    let mut admitted = 0u64;
    let mut i = 0usize;
    while start.elapsed() < window {
        let c = &mut conns[i % 8];
        i += 1;
        c.write_all(one.as_bytes()).expect("write");
        if read_responses(c, 1)[0].status == 200 {
            admitted += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let expected = 20.0 * window.as_secs_f64();
    let error = (admitted as f64 - expected).abs() / expected;
    assert!(
        error <= 0.02,
        "admitted {admitted}, expected {expected} (±2%)"
    );
    assert!(
        i as f64 > 1.5 * expected,
        "demand {i} did not exceed the limit"
    );
}

#[test]
fn keys_in_use_are_refreshed_without_argon2_and_revocation_still_lands() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "auth.cache_ttl_seconds=3"]),
    );
    let key = new_api_key(s.port, "Busy", "enterprise");
    // Three TTLs of steady use: one verification, then background re-reads
    // (each must answer within two fifths of the TTL, even on a loaded CI
    // machine running a debug build).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(9) {
        assert_eq!(get_keys(s.port, &key).status, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = s.get("/metrics").text();
    let count = |name: &str| metric_sum(&text, name);
    assert_eq!(count("triggers_auth_verifications_total"), 1, "{text}");
    assert!(count("triggers_auth_refreshes_total") >= 2, "{text}");
    // Revoked behind the server's back (no NOTIFY): the next refresh sees it.
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let key_id = key.split('_').nth(1).expect("key id").to_string();
    let n = c
        .execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1",
            &[&key_id],
        )
        .expect("revoke");
    assert_eq!(n, 1);
    let revoked = Instant::now();
    assert!(
        eventually(Duration::from_secs(6), || {
            std::thread::sleep(Duration::from_millis(50));
            get_keys(s.port, &key).status == 401
        }),
        "still accepted {:?} after the revocation",
        revoked.elapsed()
    );
}

#[test]
fn keys_used_now_and_then_are_reread_past_their_ttl_without_argon2() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0]", "auth.cache_ttl_seconds=1"]),
    );
    let key = new_api_key(s.port, "Sparse", "enterprise");
    let other = new_api_key(s.port, "Other", "enterprise");
    let parts = |k: &str| {
        let mut p = k.splitn(3, '_').skip(1);
        let id = p.next().expect("key id").to_string();
        (id, p.next().expect("secret").to_string())
    };
    let (id, secret) = parts(&key);
    let (other_id, other_secret) = parts(&other);
    let verifications = |s: &TestServer| {
        metric_sum(
            &s.get("/metrics").text(),
            "triggers_auth_verifications_total",
        )
    };
    assert_eq!(get_keys(s.port, &key).status, 200);
    assert_eq!(get_keys(s.port, &other).status, 200);
    assert_eq!(verifications(&s), 2);
    // Used once a TTL and a half apart: every use finds the entry expired,
    // re-reads the row and needs no Argon2. A wrong secret for a known id is
    // still refused without one.
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1_500));
        let wrong = format!("zt_{id}_{}", "x".repeat(secret.len()));
        let (first, second) = if round % 2 == 0 {
            ((&key, 200), (&wrong, 401))
        } else {
            ((&wrong, 401), (&key, 200))
        };
        assert_eq!(get_keys(s.port, first.0).status, first.1, "round {round}");
        assert_eq!(get_keys(s.port, second.0).status, second.1, "round {round}");
    }
    let text = s.get("/metrics").text();
    assert_eq!(
        metric_sum(&text, "triggers_auth_verifications_total"),
        2,
        "{text}"
    );
    assert!(
        metric_sum(&text, "triggers_auth_refreshes_total") >= 3,
        "{text}"
    );
    // The stored hash changes behind the server's back (the other key's
    // hash copied over): past the TTL the re-read sees another hash, so the
    // old secret is verified again, fails, and the other secret now works.
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    let n = c
        .execute(
            "UPDATE api_keys SET secret_hash = (SELECT secret_hash FROM api_keys WHERE key_id = $2)
              WHERE key_id = $1",
            &[&id, &other_id],
        )
        .expect("copy the hash");
    assert_eq!(n, 1);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(get_keys(s.port, &key).status, 401);
    assert_eq!(verifications(&s), 3);
    let swapped = format!("zt_{id}_{other_secret}");
    assert_eq!(get_keys(s.port, &swapped).status, 200);
    assert_eq!(verifications(&s), 4);
}

#[test]
fn concurrent_misses_for_one_key_share_one_verification() {
    let db = fresh_database();
    // Two shards: half the connections land on the key's owner, half ask it
    // for a lease; both kinds join one verification. Argon2id must take far
    // longer than the requests take to arrive, also on a loaded machine: a
    // request arriving after the wrong secret's verification ended (and
    // before the right one's did) would start a third. So this test uses
    // dearer parameters than the other tests' fast ones.
    let s = TestServer::start(
        Some(&db),
        &[
            "cores.shards=[0,1]",
            "auth.max_failures_per_minute=1000000",
            "auth.argon2_memory_kib=8192",
            "auth.argon2_iterations=2",
        ],
    );
    let key = new_api_key(s.port, "Crowd", "enterprise");
    let wrong = format!("{}{}", &key[..16], "W".repeat(32));
    let before = metric_sum(
        &s.get("/metrics").text(),
        "triggers_auth_verifications_total",
    );
    assert_eq!(before, 0, "generating a key verifies nothing");
    // 24 connections, opened first, then one request each at the same
    // moment: 16 with the right secret, 8 with one wrong secret.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(24));
    let port = s.port;
    let clients: Vec<_> = (0..24)
        .map(|i| {
            let barrier = barrier.clone();
            let k = if i < 16 { key.clone() } else { wrong.clone() };
            std::thread::spawn(move || {
                let mut c = connect(port);
                let req = format!("GET /api/keys HTTP/1.1\r\nX-API-Key: {k}\r\n\r\n");
                barrier.wait();
                c.write_all(req.as_bytes()).expect("write");
                read_responses(&mut c, 1)[0].status
            })
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    assert!(statuses[..16].iter().all(|&s| s == 200), "{statuses:?}");
    assert!(statuses[16..].iter().all(|&s| s == 401), "{statuses:?}");
    let text = s.get("/metrics").text();
    // One Argon2 run for the right secret and one for the wrong one, however
    // many requests and shards waited on them.
    assert_eq!(
        metric_sum(&text, "triggers_auth_verifications_total"),
        2,
        "{text}"
    );
    // Later requests are cache or lease hits: no more verifications.
    for _ in 0..5 {
        assert_eq!(get_keys(s.port, &key).status, 200);
    }
    assert_eq!(
        metric_sum(
            &s.get("/metrics").text(),
            "triggers_auth_verifications_total"
        ),
        2
    );
}

#[test]
fn keys_are_stored_as_argon2id_with_the_configured_parameters() {
    let db = fresh_database();
    let stored = |s: &TestServer, name: &str| {
        let key = new_api_key(s.port, name, "free");
        let key_id = key.split('_').nth(1).expect("key id").to_string();
        let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
        let hash: String = c
            .query_one(
                "SELECT secret_hash FROM api_keys WHERE key_id = $1",
                &[&key_id],
            )
            .expect("the key's row")
            .get(0);
        assert!(!hash.contains(&key[16..]), "the secret itself is stored");
        assert_eq!(get_keys(s.port, &key).status, 200);
        hash
    };
    {
        // The default parameters (no fast test ones): slow in a debug
        // build, so only one key.
        let s = TestServer::start(Some(&db), &["cores.shards=[0]"]);
        let hash = stored(&s, "Defaults");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
    }
    let s = TestServer::start(
        Some(&db),
        &settings(&[
            "cores.shards=[0]",
            "auth.argon2_memory_kib=8192",
            "auth.argon2_iterations=1",
        ]),
    );
    let hash = stored(&s, "Configured");
    assert!(hash.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"), "{hash}");
}
