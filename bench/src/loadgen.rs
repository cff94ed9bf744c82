//! A closed-loop HTTP/1.1 load generator: N keep-alive connections, each
//! sending one request and waiting for its answer, on `may` coroutines.
//! Each connection uses one API key and, with `--per-connection R`, moves to
//! the next key (on a new connection) after R requests: the pattern of many
//! tenants, each with its own clients.
//!
//! loadgen --addr 127.0.0.1:8080 --path /api/keys --connections 64 \
//!         --duration 10 [--keys FILE] [--per-connection R] [--workers W]
//!         [--method POST --body JSON]
//!
//! Prints one JSON line: requests, per-status counts, req/s, latency
//! percentiles in microseconds.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    addr: String,
    path: String,
    method: String,
    body: String,
    connections: usize,
    duration: f64,
    workers: usize,
    keys: Vec<String>,
    per_connection: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:8080".into(),
        path: "/health".into(),
        method: "GET".into(),
        body: String::new(),
        connections: 64,
        duration: 10.0,
        workers: 1,
        keys: Vec::new(),
        per_connection: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--addr" => a.addr = v,
            "--path" => a.path = v,
            "--method" => a.method = v,
            "--body" => a.body = v,
            "--connections" => a.connections = v.parse().unwrap_or(64),
            "--duration" => a.duration = v.parse().unwrap_or(10.0),
            "--workers" => a.workers = v.parse().unwrap_or(1),
            "--per-connection" => a.per_connection = v.parse().unwrap_or(0),
            "--keys" => {
                a.keys = std::fs::read_to_string(&v)
                    .unwrap_or_else(|e| panic!("--keys {v}: {e}"))
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn request_bytes(a: &Args, key: Option<&str>) -> Vec<u8> {
    let mut r = format!("{} {} HTTP/1.1\r\nHost: bench\r\n", a.method, a.path);
    if let Some(k) = key {
        r.push_str(&format!("X-API-Key: {k}\r\n"));
    }
    if !a.body.is_empty() {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            a.body.len()
        ));
    }
    r.push_str("\r\n");
    r.push_str(&a.body);
    r.into_bytes()
}

/// Reads one response; returns its status.
fn read_response(s: &mut may::net::TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    let mut chunk = [0u8; 16384];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(buf) {
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            let status = resp.code?;
            if buf.len() >= head + len {
                buf.drain(..head + len);
                return Some(status);
            }
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn main() {
    let a = Arc::new(parse_args());
    may::config().set_workers(a.workers);
    let stop = Arc::new(AtomicBool::new(false));
    let next_key = Arc::new(AtomicUsize::new(0));
    type Totals = (Vec<u32>, BTreeMap<u16, u64>, u64);
    let results: Arc<Mutex<Totals>> = Arc::new(Mutex::new((Vec::new(), BTreeMap::new(), 0)));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..a.connections {
        let (a, stop, next_key, results) =
            (a.clone(), stop.clone(), next_key.clone(), results.clone());
        handles.push(may::go!(move || {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
            let mut errors = 0u64;
            let mut buf = Vec::with_capacity(16384);
            'conn: while !stop.load(Ordering::Relaxed) {
                let key = (!a.keys.is_empty()).then(|| {
                    a.keys[next_key.fetch_add(1, Ordering::Relaxed) % a.keys.len()].clone()
                });
                let req = request_bytes(&a, key.as_deref());
                let mut s = match may::net::TcpStream::connect(&a.addr) {
                    Ok(s) => s,
                    Err(_) => {
                        errors += 1;
                        may::coroutine::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = s.set_nodelay(true);
                buf.clear();
                let mut sent = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if s.write_all(&req).is_err() {
                        errors += 1;
                        continue 'conn;
                    }
                    match read_response(&mut s, &mut buf) {
                        Some(status) => {
                            lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            *statuses.entry(status).or_default() += 1;
                        }
                        None => {
                            errors += 1;
                            continue 'conn;
                        }
                    }
                    sent += 1;
                    if a.per_connection > 0 && sent >= a.per_connection {
                        continue 'conn;
                    }
                }
            }
            let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
            r.0.extend(lat);
            for (k, v) in statuses {
                *r.1.entry(k).or_default() += v;
            }
            r.2 += errors;
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(a.duration));
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for h in handles {
        let _ = h.join();
    }
    let mut r = results.lock().unwrap_or_else(|e| e.into_inner());
    r.0.sort_unstable();
    let n = r.0.len();
    let pct = |p: f64| {
        if n == 0 {
            0
        } else {
            r.0[((n as f64 * p) as usize).min(n - 1)]
        }
    };
    let statuses: serde_json::Map<String, serde_json::Value> =
        r.1.iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
    println!(
        "{}",
        serde_json::json!({
            "requests": n,
            "errors": r.2,
            "statuses": statuses,
            "rps": n as f64 / elapsed,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
            "max_us": r.0.last().copied().unwrap_or(0),
            "connections": a.connections,
            "keys": a.keys.len(),
        })
    );
}
