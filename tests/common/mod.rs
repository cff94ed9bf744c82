//! Test harness: a throwaway PostgreSQL cluster per test process (with a
//! database per test), the real `triggers` binary started on a free port,
//! and a small raw-socket HTTP client so tests see exactly what goes over
//! the wire.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use triggers::store::local_cluster::{free_port, LocalCluster};

/// A cluster shared by the tests of one test binary. A watchdog process stops
/// it when this process exits (statics are never dropped).
struct SharedCluster {
    cluster: LocalCluster,
    _dir: tempfile::TempDir,
}

static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();
static DB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A temporary directory the `postgres` user can enter (for clusters run as it).
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("triggers-test-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Starts a private cluster under `dir` and arranges for it to be stopped when
/// this test process exits, even if the test panics.
pub fn start_cluster(dir: &Path) -> LocalCluster {
    let mut cluster = LocalCluster::open(&dir.join("pg"), "").expect("open cluster");
    cluster.start().expect("start cluster");
    watchdog(cluster.pgdata(), dir);
    cluster
}

fn watchdog(pgdata: &Path, dir: &Path) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         if [ -f '{pgdata}/postmaster.pid' ]; then kill -INT $(head -1 '{pgdata}/postmaster.pid') 2>/dev/null; sleep 3; fi; \
         rm -rf '{dir}'",
        pid = std::process::id(),
        pgdata = pgdata.display(),
        dir = dir.display()
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// A fresh, empty database on the shared cluster; returns its URL.
pub fn fresh_database() -> String {
    let shared = CLUSTER.get_or_init(|| {
        let dir = open_tempdir();
        let cluster = start_cluster(dir.path());
        SharedCluster { cluster, _dir: dir }
    });
    let name = format!(
        "t{}_{}",
        std::process::id(),
        DB_SEQ.fetch_add(1, Ordering::SeqCst)
    );
    let mut client = postgres::Client::connect(&shared.cluster.url("postgres"), postgres::NoTls)
        .expect("connect");
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create database");
    shared.cluster.url(&name)
}

/// A port no other server of this test process was given, below the
/// kernel's ephemeral range so that no client socket (ours, or a PostgreSQL
/// connection) can take it between this check and the server's bind. Ports
/// from `bind(0)` can also repeat between concurrent starts, and two servers
/// with `SO_REUSEPORT` on one port would split each other's connections.
pub fn test_port() -> u16 {
    use std::sync::atomic::AtomicU16;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32_768);
    let base: u16 = 10_000;
    let span = ephemeral_low.saturating_sub(base).max(1_000);
    let _ = NEXT.compare_exchange(
        0,
        base + (std::process::id() % u32::from(span / 200)) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if port >= base + span {
            NEXT.store(base, Ordering::SeqCst);
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port().expect("free port")
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_triggers")
}

/// The real server, started with `serve`; stopped with SIGTERM when dropped.
pub struct TestServer {
    pub port: u16,
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl TestServer {
    /// Starts a server on `database_url` (`None`: the embedded cluster) with
    /// extra `--set key=value` settings; waits until `/health` answers.
    pub fn start(database_url: Option<&str>, settings: &[&str]) -> TestServer {
        let dir = open_tempdir();
        Self::start_in(dir, database_url, settings)
    }

    pub fn start_in(
        dir: tempfile::TempDir,
        database_url: Option<&str>,
        settings: &[&str],
    ) -> TestServer {
        Self::start_full(dir, database_url, settings, &[])
    }

    /// Like `start`, with extra environment variables for the server.
    pub fn start_env(
        database_url: Option<&str>,
        settings: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        Self::start_full(open_tempdir(), database_url, settings, env)
    }

    pub fn start_full(
        dir: tempfile::TempDir,
        database_url: Option<&str>,
        settings: &[&str],
        env: &[(&str, &str)],
    ) -> TestServer {
        let log = dir.path().join("server.log");
        let mut server = TestServer {
            port: 0,
            child: None,
            dir,
            log,
        };
        // A port checked free can still be taken before the server binds it;
        // that one failure is retried on another port.
        for attempt in 1..=3 {
            server.port = test_port();
            server.spawn(database_url, settings, env);
            match server.wait_healthy(Duration::from_secs(90)) {
                Ok(()) => return server,
                Err(e) if attempt < 3 && e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn(&mut self, database_url: Option<&str>, settings: &[&str], env: &[(&str, &str)]) {
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .env("RUST_LOG", "info");
        if let Some(url) = database_url {
            cmd.arg("--database-url").arg(url);
        }
        for s in settings {
            cmd.arg("--set").arg(s);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = std::fs::File::create(&self.log).expect("log file");
        cmd.stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .stdin(Stdio::null());
        self.child = Some(cmd.spawn().expect("spawn triggers"));
    }

    fn wait_healthy(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(r) = try_request(
                self.port,
                "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            ) {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("server exited with {status}:\n{}", self.log_text()));
                }
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "server not healthy after {limit:?}:\n{}",
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends SIGTERM and waits for the exit status (at most `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        request(
            self.port,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(15));
    }
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses one response from the front of `buf`; returns it and the bytes used.
pub fn parse_response(buf: &[u8]) -> Option<(HttpResponse, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = r.parse(buf).ok()? else {
        return None;
    };
    let status = r.code?;
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let len = if status == 100 { 0 } else { len };
    if buf.len() < head + len {
        return None;
    }
    Some((
        HttpResponse {
            status,
            headers,
            body: buf[head..head + len].to_vec(),
        },
        head + len,
    ))
}

/// Connects with a read timeout.
pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// Reads until `n` responses are complete (or EOF / timeout).
pub fn read_responses(s: &mut TcpStream, n: usize) -> Vec<HttpResponse> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    while out.len() < n {
        while let Some((r, used)) = parse_response(&buf) {
            buf.drain(..used);
            out.push(r);
            if out.len() == n {
                return out;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    out
}

/// True when the server closed the connection (EOF) within the read timeout.
pub fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0))
        || matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// Connects from a chosen loopback source address (127.0.0.2, 127.0.0.3, …:
/// the failure throttle is per client address).
pub fn connect_from(local: &str, port: u16) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let local: std::net::SocketAddr = format!("{local}:0").parse().expect("addr");
    s.bind(&local.into()).expect("bind");
    let remote: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    s.connect(&remote.into()).expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

pub fn try_request(port: u16, raw: &str) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw.as_bytes())?;
    read_responses(&mut s, 1)
        .pop()
        .ok_or_else(|| std::io::Error::other("no response"))
}

/// Sends one raw request on a new connection and reads one response.
pub fn request(port: u16, raw: &str) -> HttpResponse {
    try_request(port, raw).unwrap_or_else(|e| panic!("request failed: {e}"))
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A request with headers and an optional JSON body, on a new connection.
pub fn call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        raw.push_str("\r\n");
    }
    request(port, &raw)
}

/// Creates an organization; returns the generate response body.
pub fn generate_key(port: u16, name: &str, tier: &str) -> serde_json::Value {
    let r = call(
        port,
        "POST",
        "/api/keys/generate",
        &[],
        Some(&format!(
            r#"{{"organization_name":"{name}","tier":"{tier}"}}"#
        )),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()
}

/// A new organization's API key.
pub fn new_api_key(port: u16, name: &str, tier: &str) -> String {
    generate_key(port, name, tier)["api_key"]
        .as_str()
        .expect("api_key")
        .to_string()
}

/// Small Argon2 parameters so tests run fast in debug builds.
pub const FAST_ARGON2: [&str; 2] = ["auth.argon2_memory_kib=1024", "auth.argon2_iterations=1"];

/// `extra` settings plus the fast Argon2 parameters.
pub fn settings<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut s: Vec<&str> = FAST_ARGON2.to_vec();
    s.extend_from_slice(extra);
    s
}

/// Command lines of the running `postgres` processes whose command line
/// names `path` (a cluster's data directory).
pub fn postgres_processes_for(path: &std::path::Path) -> Vec<String> {
    let needle = path.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle) && c.contains("postgres"))
        .collect()
}

/// SIGTERM: the server exits 0 within 30 s and leaves no PostgreSQL
/// process of the cluster under `data` behind.
pub fn assert_stops_cleanly(s: &mut TestServer, data: &Path) {
    let status = s
        .terminate(Duration::from_secs(30))
        .expect("exited in time");
    assert!(status.success(), "{status}\n{}", s.log_text());
    assert!(
        postgres_processes_for(data).is_empty(),
        "{:?}",
        postgres_processes_for(data)
    );
}

/// Sums the metric lines that start with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
