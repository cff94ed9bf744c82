//! The HTTP/1.1 rules of the connection loop, over real sockets against the
//! real server: pipelining, chunked bodies, 100-continue, 413, 431, 408 (also
//! for slow-drip clients), idle timeout, Connection: close, garbage, the
//! per-shard connection limit.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

fn server() -> TestServer {
    let db = fresh_database();
    TestServer::start(
        Some(&db),
        &[
            "cores.shards=[0]",
            "ingest.max_body_bytes=1024",
            "http.request_timeout_ms=700",
            "http.idle_timeout_ms=1500",
        ],
    )
}

#[test]
fn codec_rules_over_a_live_connection() {
    let s = server();

    // Pipelining: three requests in one write, answered in order.
    let mut c = connect(s.port);
    c.write_all(
        b"GET /health HTTP/1.1\r\nX-Request-ID: first\r\n\r\n\
          GET /nope HTTP/1.1\r\nX-Request-ID: second\r\n\r\n\
          GET /status HTTP/1.1\r\nX-Request-ID: third\r\n\r\n",
    )
    .expect("write");
    let rs = read_responses(&mut c, 3);
    assert_eq!(rs.len(), 3);
    assert_eq!(
        rs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200, 404, 200]
    );
    assert_eq!(
        rs.iter()
            .map(|r| r.header("x-request-id").unwrap_or(""))
            .collect::<Vec<_>>(),
        vec!["first", "second", "third"]
    );

    // A chunked body is consumed exactly: the pipelined request after it is answered.
    c.write_all(
        b"POST /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n\
          GET /health HTTP/1.1\r\n\r\n",
    )
    .expect("write");
    let rs = read_responses(&mut c, 2);
    assert_eq!(rs[0].status, 405);
    assert_eq!(rs[0].header("allow"), Some("GET"));
    assert_eq!(rs[1].status, 200);

    // Content-Length body split over several writes.
    c.write_all(b"POST /health HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234")
        .expect("write");
    std::thread::sleep(Duration::from_millis(50));
    c.write_all(b"56789GET /health HTTP/1.1\r\n\r\n")
        .expect("write");
    let rs = read_responses(&mut c, 2);
    assert_eq!((rs[0].status, rs[1].status), (405, 200));

    // Expect: 100-continue: the interim response comes before the body is sent.
    c.write_all(b"POST /health HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .expect("write");
    let interim = read_responses(&mut c, 1);
    assert_eq!(interim[0].status, 100);
    c.write_all(b"body").expect("write");
    assert_eq!(read_responses(&mut c, 1)[0].status, 405);

    // Connection: close is honoured.
    c.write_all(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    let r = read_responses(&mut c, 1);
    assert_eq!(r[0].header("connection"), Some("close"));
    assert!(closed_by_server(&mut c));
}

#[test]
fn limits_answer_with_their_status_and_close() {
    let s = server();

    // 413 by Content-Length, without 100 Continue and without reading the body.
    let mut c = connect(s.port);
    c.write_all(
        b"POST /api/events HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
    )
    .expect("write");
    let r = read_responses(&mut c, 1);
    assert_eq!(r[0].status, 413);
    let v = r[0].json();
    assert_eq!(v["code"], "payload_too_large");
    assert_eq!(v["details"]["limit_bytes"], 1024);
    assert!(closed_by_server(&mut c));

    // 413 for a chunked body that grows past the limit.
    let mut c = connect(s.port);
    c.write_all(b"POST /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("write");
    for _ in 0..3 {
        let _ = c.write_all(b"200\r\n");
        let _ = c.write_all(&[b'x'; 0x200]);
        let _ = c.write_all(b"\r\n");
    }
    assert_eq!(read_responses(&mut c, 1)[0].status, 413);

    // 431 for a header block over 16 KiB.
    let mut c = connect(s.port);
    let big = format!(
        "GET /health HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(17 * 1024)
    );
    let _ = c.write_all(big.as_bytes());
    let r = read_responses(&mut c, 1);
    assert_eq!(r[0].status, 431);
    assert_eq!(r[0].json()["code"], "header_too_large");

    // Garbage bytes: 400, connection closed, the shard keeps serving.
    for garbage in [
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
    ] {
        let mut c = connect(s.port);
        c.write_all(garbage).expect("write");
        let r = read_responses(&mut c, 1);
        assert_eq!(r.len(), 1, "{garbage:?}");
        assert_eq!(r[0].status, 400, "{garbage:?}");
        assert_eq!(r[0].json()["code"], "validation_error");
        assert!(closed_by_server(&mut c));
    }
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn slow_and_idle_clients_are_cut_off() {
    let s = server();

    // A request not complete within the request timeout: 408 and close.
    let mut c = connect(s.port);
    let start = Instant::now();
    c.write_all(b"GET /health HTTP/1.1\r\nHost:")
        .expect("write");
    let r = read_responses(&mut c, 1);
    assert_eq!(r[0].status, 408);
    assert_eq!(r[0].json()["code"], "request_timeout");
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "{:?}",
        start.elapsed()
    );
    assert!(closed_by_server(&mut c));

    // A slow-drip client (one byte every 100 ms) cannot extend the deadline.
    let mut c = connect(s.port);
    let start = Instant::now();
    let request = b"GET /health HTTP/1.1\r\nHost: a-very-long-host-name\r\n\r\n";
    let mut got = None;
    for b in request.iter() {
        if c.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        c.set_nonblocking(true).expect("nonblocking");
        let mut probe = [0u8; 1];
        let ready = std::io::Read::read(&mut c, &mut probe).is_ok();
        c.set_nonblocking(false).expect("blocking");
        if ready {
            got = Some(start.elapsed());
            break;
        }
    }
    let elapsed = got.expect("server answered before the request was complete");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");

    // An idle keep-alive connection is closed after the idle timeout, silently.
    let mut c = connect(s.port);
    c.write_all(b"GET /health HTTP/1.1\r\n\r\n").expect("write");
    assert_eq!(read_responses(&mut c, 1)[0].status, 200);
    let start = Instant::now();
    assert!(closed_by_server(&mut c));
    let idle = start.elapsed();
    assert!(
        idle >= Duration::from_millis(1300) && idle < Duration::from_secs(5),
        "{idle:?}"
    );

    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn connection_limit_per_shard() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &["cores.shards=[0]", "http.max_connections_per_shard=3"],
    );
    let mut held: Vec<_> = (0..3)
        .map(|_| {
            let mut c = connect(s.port);
            c.write_all(b"GET /health HTTP/1.1\r\n\r\n").expect("write");
            assert_eq!(read_responses(&mut c, 1)[0].status, 200);
            c
        })
        .collect();
    let mut extra = connect(s.port);
    let r = read_responses(&mut extra, 1);
    assert_eq!(r[0].status, 503);
    assert_eq!(r[0].json()["code"], "overloaded");
    assert!(r[0].header("retry-after").is_some());
    held.pop();
    // Once a connection closes, a new one is served again.
    assert!(eventually(Duration::from_secs(5), || {
        try_request(s.port, "GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
            .is_ok_and(|r| r.status == 200)
    }));
    // The refusal is counted (a retry above may have been refused too, before
    // the server saw the close).
    let metrics = s.get("/metrics").text();
    let refused: u64 = metrics
        .lines()
        .find(|l| l.starts_with("triggers_connections_refused_total{shard=\"0\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
}

#[test]
fn deadline_holds_while_busy_polling() {
    // A long busy-poll budget catches every byte of a dripping client; the
    // request deadline must still end the request with 408.
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &[
            "cores.shards=[0]",
            "http.request_timeout_ms=500",
            "http.busy_poll_us=200000",
        ],
    );
    let mut c = connect(s.port);
    let start = Instant::now();
    c.write_all(b"GET /health HTTP/1.1\r\n").expect("write");
    let mut answered = false;
    for _ in 0..300 {
        if c.write_all(b"X: y\r\n").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        c.set_nonblocking(true).expect("nonblocking");
        let mut probe = [0u8; 1];
        let ready = std::io::Read::read(&mut c, &mut probe).is_ok();
        c.set_nonblocking(false).expect("blocking");
        if ready {
            answered = true;
            break;
        }
    }
    assert!(answered, "no answer to a request that never completes");
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(s.get("/health").status, 200);
}
