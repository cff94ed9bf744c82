//! Operational routes over real sockets: health, readiness, status, metrics,
//! the error shape, X-Request-ID, and connections spread over two shards.

mod common;

use common::*;
use std::io::Write;

#[test]
fn ops_routes_and_error_shape() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &["cores.shards=[0]"]);

    let r = s.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"status": "healthy"}));
    assert_eq!(r.header("content-type"), Some("application/json"));

    let r = s.get("/health/ready");
    assert_eq!(r.status, 200, "{}", r.text());

    let v = s.get("/status").json();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["shards"], serde_json::json!([{"id": 0, "core": 0}]));
    assert_eq!(v["ack_mode"], "durable");
    assert!(v["uptime_seconds"].is_u64());

    // Unknown route: 404 in the error shape; the request id is in body and header.
    let r = s.get("/api/nothing-here");
    assert_eq!(r.status, 404);
    let v = r.json();
    assert_eq!(v["code"], "not_found");
    assert!(v["error"].is_string());
    assert_eq!(v["request_id"].as_str(), r.header("x-request-id"));

    // Known route, wrong method: 405 with Allow.
    let r = request(
        s.port,
        "DELETE /status HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    assert_eq!(r.json()["code"], "method_not_allowed");

    // X-Request-ID: a valid client value is echoed, an invalid one replaced.
    let r = request(
        s.port,
        "GET /health HTTP/1.1\r\nX-Request-ID: abc.DEF_1:2-3\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.header("x-request-id"), Some("abc.DEF_1:2-3"));
    for bad in ["has space", "semi;colon", &"x".repeat(129)] {
        let r = request(
            s.port,
            &format!("GET /health HTTP/1.1\r\nX-Request-ID: {bad}\r\nConnection: close\r\n\r\n"),
        );
        let id = r.header("x-request-id").expect("request id");
        assert_ne!(id, bad);
        assert!(!id.is_empty() && id.len() <= 128);
    }
    let a = s.get("/health");
    let b = s.get("/health");
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));

    // Metrics count what happened, labelled by shard, route and status.
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    let text = m.text();
    assert!(
        text.contains(
            "triggers_http_requests_total{shard=\"0\",route=\"/status\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains("route=\"unmatched\",status=\"404\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("route=\"unmatched\",status=\"405\"} 1"),
        "{text}"
    );
    assert!(text.contains("triggers_bytes_in_total{shard=\"0\""));
    assert!(text.contains("triggers_connections_open{shard=\"0\""));
}

#[test]
fn metrics_token_guards_the_scrape() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &["cores.shards=[0]", "ops.metrics_token=scrape-me"],
    );
    let r = s.get("/metrics");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "missing_api_key");
    let r = request(
        s.port,
        "GET /metrics HTTP/1.1\r\nAuthorization: Bearer wrong\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "invalid_api_key");
    let r = request(
        s.port,
        "GET /metrics HTTP/1.1\r\nAuthorization: Bearer scrape-me\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
}

fn metric(text: &str, name: &str, shard: usize) -> u64 {
    let prefix = format!("{name}{{shard=\"{shard}\"");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn two_shards_both_serve_connections() {
    let db = fresh_database();
    let s = TestServer::start(Some(&db), &["cores.shards=[0, 1]"]);
    let v = s.get("/status").json();
    assert_eq!(
        v["shards"],
        serde_json::json!([{"id": 0, "core": 0}, {"id": 1, "core": 1}])
    );
    for _ in 0..200 {
        let mut c = connect(s.port);
        c.write_all(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
            .expect("write");
        assert_eq!(read_responses(&mut c, 1)[0].status, 200);
    }
    let text = s.get("/metrics").text();
    let a = metric(&text, "triggers_connections_accepted_total", 0);
    let b = metric(&text, "triggers_connections_accepted_total", 1);
    assert!(a + b >= 201, "{a} + {b}");
    assert!(
        a >= 10 && b >= 10,
        "connections per shard: {a} and {b}\n{text}"
    );
}
