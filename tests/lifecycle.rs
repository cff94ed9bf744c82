//! The server's life: configuration errors, --print-config, migrations, the
//! embedded PostgreSQL (started, stopped, no process left behind), the data
//! directory lock, and readiness following the database's availability.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn serve_fails_with(args: &[&str], expect: &[&str]) {
    let dir = open_tempdir();
    let out = Command::new(binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    for e in expect {
        assert!(err.contains(e), "{args:?}: expected {e:?} in {err}");
    }
}

#[test]
fn bad_configuration_stops_the_server_naming_key_and_value() {
    serve_fails_with(
        &["--set", "cores.shards=[0, 7]"],
        &["cores.shards", "7", "does not exist"],
    );
    serve_fails_with(
        &["--listen", "not-an-address"],
        &["listen", "not-an-address"],
    );
    serve_fails_with(
        &["--set", "ingest.ring_capacity=0"],
        &["ingest.ring_capacity", "0"],
    );
    serve_fails_with(&["--set", "ingest.ack=maybe"], &["ingest.ack", "maybe"]);
    serve_fails_with(
        &["--set", "http.nonsense=1"],
        &["unknown setting http.nonsense"],
    );
    let dir = open_tempdir();
    let out = Command::new(binary())
        .args(["serve", "--print-config"])
        .env("TRIGGERS_CORES_PERSISTENCE", "9")
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cores.persistence"));
}

#[test]
fn print_config_shows_effective_values_masked_and_the_plan() {
    let path = open_tempdir();
    let file = path.path().join("triggers.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:9999\"\n[auth]\nadmin_token = \"top-secret-admin\"\n[limits]\npro = 42\n")
        .expect("write");
    let out = Command::new(binary())
        .args(["serve", "--print-config", "--config"])
        .arg(&file)
        .env("TRIGGERS_LIMITS_BUSINESS", "77")
        .args(["--set", "cores.shards=[1]"])
        .output()
        .expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");
    assert!(text.contains("pro = 42"), "{text}");
    assert!(text.contains("business = 77"), "{text}");
    assert!(!text.contains("top-secret-admin"), "{text}");
    assert!(
        text.contains("core plan:") && text.contains("shard(s) on cores [1]"),
        "{text}"
    );
}

#[test]
fn migrate_applies_once() {
    let db = fresh_database();
    let dir = open_tempdir();
    let run = || {
        Command::new(binary())
            .args(["migrate", "--database-url", &db, "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("run")
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("[1, 2]"));
    let second = run();
    assert!(String::from_utf8_lossy(&second.stdout).contains("[]"));
    let mut c = postgres::Client::connect(&db, postgres::NoTls).expect("connect");
    for table in [
        "organizations",
        "api_keys",
        "events",
        "delivery_attempts",
        "idempotency_keys",
        "webhooks",
    ] {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
                &[&table],
            )
            .expect("query")
            .get(0);
        assert_eq!(n, 1, "{table}");
    }
    // Payloads keep the producer's text (migration 2).
    let types: Vec<String> = c
        .query(
            "SELECT data_type FROM information_schema.columns
              WHERE table_name = 'events' AND column_name IN ('payload', 'metadata')",
            &[],
        )
        .expect("columns")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["json", "json"]);
}

#[test]
fn embedded_cluster_lifecycle_and_data_dir_lock() {
    let dir = open_tempdir();
    let data = dir.path().join("data");
    let mut s = TestServer::start_in(dir, None, &["cores.shards=[0]"]);
    assert_eq!(s.get("/health/ready").status, 200);
    assert!(
        !postgres_processes_for(&data).is_empty(),
        "embedded cluster runs"
    );

    // A second server on the same data directory fails at once.
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:1", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM: exit 0, and no PostgreSQL process left behind.
    assert_stops_cleanly(&mut s, &data);
    assert!(s.log_text().contains("embedded PostgreSQL stopped"));
}

#[test]
fn readiness_follows_the_database_without_a_restart() {
    let dir = open_tempdir();
    let mut cluster = start_cluster(dir.path());
    let url = cluster.url("postgres");
    let s = TestServer::start(
        Some(&url),
        &["cores.shards=[0]", "database.connect_timeout_ms=500"],
    );
    assert_eq!(s.get("/health/ready").status, 200);

    cluster.stop().expect("stop cluster");
    assert!(
        eventually(Duration::from_secs(15), || s.get("/health/ready").status
            == 503),
        "readiness did not turn 503"
    );
    let r = s.get("/health/ready");
    assert_eq!(r.json()["code"], "unavailable");
    assert!(r.header("retry-after").is_some());
    // Liveness is not readiness.
    assert_eq!(s.get("/health").status, 200);

    cluster.start().expect("restart cluster");
    assert!(
        eventually(Duration::from_secs(15), || s.get("/health/ready").status
            == 200),
        "readiness did not come back\n{}",
        s.log_text()
    );
}

#[test]
fn sigterm_with_idle_keep_alive_connections_stops_promptly() {
    use std::io::Write;
    let db = fresh_database();
    let mut s = TestServer::start(Some(&db), &settings(&["cores.shards=[0, 1]"]));
    // Keep-alive connections on both shards, answered and then idle.
    let mut idle: Vec<_> = (0..8)
        .map(|_| {
            let mut c = connect(s.port);
            c.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                .expect("write");
            assert_eq!(read_responses(&mut c, 1)[0].status, 200);
            c
        })
        .collect();
    let started = std::time::Instant::now();
    let status = s
        .terminate(Duration::from_secs(15))
        .expect("the server stops although clients keep idle connections open");
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The server closed them.
    for c in &mut idle {
        assert!(closed_by_server(c));
    }
}

/// Runs `triggers serve` with RLIMIT_MEMLOCK set to (soft, hard) bytes.
fn serve_with_memlock(soft: u64, hard: u64, args: &[&str]) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(binary());
    cmd.arg("serve").args(args);
    // SAFETY: setrlimit is async-signal-safe; it only lowers (or keeps) our limits.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn")
}

#[test]
fn a_memlock_limit_glommio_cannot_use_is_raised_or_refused() {
    // Too low, and the hard limit forbids raising it: a clear start-up error,
    // not a server whose listeners nobody serves.
    let dir = open_tempdir();
    let data = dir.path().to_string_lossy().into_owned();
    let child = serve_with_memlock(64 * 1024, 64 * 1024, &["--data-dir", &data]);
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {err}");
    assert!(err.contains("RLIMIT_MEMLOCK is 64 KiB"), "{err}");

    // Too low but the hard limit allows more: raised, and the shards serve.
    let url = fresh_database();
    let port = test_port();
    let listen = format!("127.0.0.1:{port}");
    let child = serve_with_memlock(
        64 * 1024,
        1024 * 1024,
        &[
            "--data-dir",
            &data,
            "--database-url",
            &url,
            "--listen",
            &listen,
            "--set",
            "cores.shards=[0,1]",
        ],
    );
    let healthy = eventually(Duration::from_secs(60), || {
        // Both shards must answer: several fresh connections spread over them.
        (0..8).all(|_| {
            try_request(
                port,
                "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )
            .is_ok_and(|r| r.status == 200)
        })
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("wait");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        healthy,
        "server with a raisable memlock limit never served: {log}"
    );
    assert!(log.contains("RLIMIT_MEMLOCK raised"), "{log}");
    assert!(out.status.success(), "{log}");
}
