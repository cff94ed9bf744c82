//! The embedded PostgreSQL is supervised: its postmaster killed with SIGKILL
//! under load is started again by the server on the same port, ingest
//! resumes by itself, each restart is logged once and counted in
//! `triggers_embedded_db_restarts_total`, every event answered 202 is stored,
//! and shutdown still stops the cluster without a restart.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PRODUCERS: usize = 4;

/// What the producers share with the test.
#[derive(Default)]
struct Load {
    stop: AtomicBool,
    acked: AtomicU64,
    /// 202s for requests sent after `mark` was set.
    acked_after_mark: AtomicU64,
    mark: Mutex<Option<Instant>>,
}

impl Load {
    fn set_mark(&self) {
        self.acked_after_mark.store(0, Ordering::SeqCst);
        *self.mark.lock().expect("mark") = Some(Instant::now());
    }

    fn after_mark(&self, sent: Instant) -> bool {
        self.mark.lock().expect("mark").is_some_and(|m| sent > m)
    }
}

/// One producer's record: each 202's id with the payload sent, and every status seen.
#[derive(Default)]
struct Outcome {
    acked: Vec<(uuid::Uuid, String)>,
    statuses: Vec<u16>,
}

fn post_event(
    conn: &mut Option<TcpStream>,
    port: u16,
    key: &str,
    body: &str,
) -> Option<(u16, Vec<u8>)> {
    if conn.is_none() {
        *conn = TcpStream::connect(("127.0.0.1", port)).ok();
        conn.as_ref()?
            .set_read_timeout(Some(Duration::from_secs(15)))
            .ok()?;
    }
    let s = conn.as_mut()?;
    let raw = format!(
        "POST /api/events HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = s
        .write_all(raw.as_bytes())
        .ok()
        .and_then(|()| read_responses(s, 1).pop());
    if answer.is_none() {
        *conn = None;
    }
    answer.map(|r| (r.status, r.body))
}

/// Posts events one after another on a keep-alive connection until told to stop.
fn produce(port: u16, key: String, me: usize, load: Arc<Load>) -> Outcome {
    let mut out = Outcome::default();
    let mut conn = None;
    for seq in 0u64.. {
        if load.stop.load(Ordering::SeqCst) {
            break;
        }
        // Exact payloads: the stored text is this text, key order and spacing included.
        let payload = format!(r#"{{"seq": {seq}, "producer": {me}, "x": 0.22872765087281322}}"#);
        let body = format!(r#"{{"type":"supervision.test","payload":{payload}}}"#);
        let sent = Instant::now();
        let Some((status, answer)) = post_event(&mut conn, port, &key, &body) else {
            out.statuses.push(0);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        out.statuses.push(status);
        if status == 202 {
            let v: serde_json::Value = serde_json::from_slice(&answer).expect("202 is JSON");
            let id = v["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("202 has an id");
            out.acked.push((id, payload));
            load.acked.fetch_add(1, Ordering::SeqCst);
            if load.after_mark(sent) {
                load.acked_after_mark.fetch_add(1, Ordering::SeqCst);
            }
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    out
}

fn restarts(s: &TestServer) -> u64 {
    metric_sum(
        &s.get("/metrics").text(),
        "triggers_embedded_db_restarts_total",
    )
}

fn pgdata(data: &Path) -> PathBuf {
    data.join("postgres")
}

fn postmaster_pid(data: &Path) -> i32 {
    let text =
        std::fs::read_to_string(pgdata(data).join("postmaster.pid")).expect("postmaster.pid");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid line")
}

fn cluster_port(data: &Path) -> u16 {
    let text = std::fs::read_to_string(pgdata(data).join("triggers.conf")).expect("triggers.conf");
    text.trim()
        .strip_prefix("port = ")
        .and_then(|p| p.parse().ok())
        .expect("port line")
}

fn cluster_url(data: &Path) -> String {
    let password = std::fs::read_to_string(data.join("pg-password")).expect("pg-password");
    format!(
        "postgresql://triggers:{}@127.0.0.1:{}/triggers",
        password.trim(),
        cluster_port(data)
    )
}

fn alive(pid: i32) -> bool {
    // A zombie is not alive: /proc/<pid>/stat's state after the name is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// SIGKILLs the postmaster under load and waits for the restart and for
/// ingest to resume; returns the new postmaster's pid.
fn kill_and_recover(s: &TestServer, data: &Path, load: &Load, expect_restarts: u64) -> i32 {
    let port_before = cluster_port(data);
    let pid = postmaster_pid(data);
    // SAFETY: sending SIGKILL to the cluster's postmaster, a process of this test's server.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid)),
        "postmaster {pid} survived SIGKILL"
    );
    assert!(
        eventually(Duration::from_secs(60), || restarts(s) == expect_restarts),
        "restart #{expect_restarts} not counted\n{}",
        s.log_text()
    );
    load.set_mark();
    assert!(
        eventually(Duration::from_secs(30), || load
            .acked_after_mark
            .load(Ordering::SeqCst)
            >= 20),
        "ingest did not resume after restart #{expect_restarts}\n{}",
        s.log_text()
    );
    eprintln!(
        "restart #{expect_restarts}: ingest resumed {:?} after the SIGKILL",
        killed.elapsed()
    );
    let new_pid = postmaster_pid(data);
    assert_ne!(new_pid, pid, "a new postmaster runs");
    assert!(alive(new_pid));
    assert_eq!(
        cluster_port(data),
        port_before,
        "same port: the workers' URL stays valid"
    );
    new_pid
}

/// Every acknowledged event is in the cluster with the exact payload text it was sent with.
fn assert_all_stored(data: &Path, acked: &[(uuid::Uuid, String)]) {
    let mut db = postgres::Client::connect(&cluster_url(data), postgres::NoTls)
        .expect("connect to the cluster");
    let ids: Vec<uuid::Uuid> = acked.iter().map(|(id, _)| *id).collect();
    let rows = db
        .query(
            "SELECT id, payload::text FROM events WHERE id = ANY($1)",
            &[&ids],
        )
        .expect("select");
    let stored: std::collections::HashMap<uuid::Uuid, String> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let missing: Vec<_> = acked
        .iter()
        .filter(|(id, _)| !stored.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events are missing: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    for (id, sent) in acked {
        assert_eq!(&stored[id], sent, "event {id}");
    }
}

#[test]
fn a_killed_postmaster_is_restarted_and_nothing_acknowledged_is_lost() {
    let dir = open_tempdir();
    let data = dir.path().join("data");
    let mut s = TestServer::start_in(dir, None, &settings(&["cores.shards=[0]"]));
    assert_eq!(restarts(&s), 0);
    let key = new_api_key(s.port, "supervised", "enterprise");
    let load = Arc::new(Load::default());
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|me| {
            let (key, load, port) = (key.clone(), load.clone(), s.port);
            std::thread::spawn(move || produce(port, key, me, load))
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(30), || load
            .acked
            .load(Ordering::SeqCst)
            >= 50),
        "no load before the kill\n{}",
        s.log_text()
    );

    // Twice: the supervisor follows the new postmaster after a restart.
    kill_and_recover(&s, &data, &load, 1);
    kill_and_recover(&s, &data, &load, 2);

    load.stop.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = producers
        .into_iter()
        .map(|p| p.join().expect("producer"))
        .collect();
    let acked: Vec<_> = outcomes
        .iter()
        .flat_map(|o| o.acked.iter().cloned())
        .collect();
    let statuses: Vec<u16> = outcomes
        .iter()
        .flat_map(|o| o.statuses.iter().copied())
        .collect();
    let count = |c: u16| statuses.iter().filter(|&&s| s == c).count();
    eprintln!(
        "answers: {} x 202, {} x 503, {} other",
        count(202),
        count(503),
        statuses.len() - count(202) - count(503)
    );
    assert!(
        statuses.iter().all(|&c| c == 202 || c == 503),
        "only 202 and 503 are expected: {:?}",
        statuses
            .iter()
            .filter(|&&c| c != 202 && c != 503)
            .collect::<Vec<_>>()
    );
    assert_eq!(acked.len(), count(202));
    assert_all_stored(&data, &acked);
    let log = s.log_text();
    assert_eq!(log.matches("was gone; restarted it").count(), 2, "{log}");

    // Shutdown stops the cluster and does not restart it.
    assert_stops_cleanly(&mut s, &data);
    let log = s.log_text();
    assert!(log.contains("embedded PostgreSQL stopped"), "{log}");
    assert_eq!(log.matches("was gone; restarted it").count(), 2, "{log}");
}
