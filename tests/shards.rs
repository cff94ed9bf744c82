//! Two shards under connection churn: many short connections, pipelined and
//! split requests; ingests with an Idempotency-Key are handed to the key's
//! owner shard, the rest are served on leases. Every request
//! must be answered and both shards must keep accepting. (This caught shards
//! that stopped accepting after glommio cancelled operations of dropped
//! streams; see `src/shard/conn.rs`.)

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Deterministic xorshift, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn raw_request(kind: u64, key: &str, nonce: u64) -> Vec<u8> {
    match kind {
        0 => {
            // An Idempotency-Key makes the owner shard serve it: half of
            // these connections are handed over.
            let body = br#"{"type":"churn.test","payload":{"n":1}}"#;
            let mut r = format!(
                "POST /api/events HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\
                 Idempotency-Key: churn-{nonce}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        }
        1 => format!("GET /api/keys HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n").into_bytes(),
        2 => format!("GET /api/inbox?limit=2 HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\n\r\n")
            .into_bytes(),
        _ => b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
    }
}

/// One connection: sends `n` pipelined requests in two pieces, reads `n`
/// answers. Returns an error describing what was missing.
fn exchange(port: u16, key: &str, rng: &mut Rng) -> Result<(), String> {
    let n = 1 + rng.below(4) as usize;
    let mut data = Vec::new();
    for _ in 0..n {
        let (kind, nonce) = (rng.below(4), rng.next());
        data.extend(raw_request(kind, key, nonce));
    }
    let split = rng.below(data.len() as u64 + 1) as usize;
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(&data[..split]).map_err(|e| e.to_string())?;
    if rng.below(3) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    s.write_all(&data[split..]).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut answered = 0;
    while answered < n {
        while let Some((r, used)) = parse_response(&buf) {
            assert!(r.status < 500, "status {}: {}", r.status, r.text());
            buf.drain(..used);
            answered += 1;
        }
        if answered == n {
            break;
        }
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("closed after {answered} of {n} answers")),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) => return Err(format!("{e} after {answered} of {n} answers")),
        }
    }
    Ok(())
}

#[test]
fn every_request_is_answered_under_connection_churn() {
    let db = fresh_database();
    let s = TestServer::start(
        Some(&db),
        &settings(&["cores.shards=[0, 1]", "limits.enterprise=100000000"]),
    );
    let key = generate_key(s.port, "Churn", "enterprise")["api_key"]
        .as_str()
        .expect("key")
        .to_string();
    let port = s.port;
    let run_for = Duration::from_secs(8);
    let workers: Vec<_> = (0..12u64)
        .map(|i| {
            let key = key.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1));
                let start = Instant::now();
                let mut done = 0u32;
                while start.elapsed() < run_for {
                    if let Err(e) = exchange(port, &key, &mut rng) {
                        return Err(format!("worker {i}, connection {done}: {e}"));
                    }
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w
            .join()
            .expect("worker panicked")
            .expect("unanswered request");
    }
    assert!(total > 100, "only {total} connections in {run_for:?}");
    // Both shards still accept: fresh connections all get answers.
    for _ in 0..40 {
        let r = try_request(port, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.expect("health after churn").status, 200);
    }
    let metrics = s.get("/metrics").text();
    let handed = metric_sum(&metrics, "triggers_connection_handoffs_total{");
    assert!(handed > 10, "the churn never crossed shards:\n{metrics}");
}
