//! Supervision of the embedded PostgreSQL: a thread that watches the
//! postmaster and, when it is gone (OOM killer, `kill -9`, `pg_ctl stop` by
//! hand), starts the cluster again on the same data directory and the same
//! port, so the connection URL every worker holds stays valid and the workers
//! reconnect by themselves. Attempts back off (after a SIGKILL the old
//! backends can hold the shared memory for a moment) with a bounded delay;
//! each restart logs one line and counts in
//! `triggers_embedded_db_restarts_total`.
//!
//! The postmaster is started by `pg_ctl` and orphaned at once; so that its
//! death can be seen and its exit status collected (an orphan whose
//! adopter never reaps it stays a zombie, and PostgreSQL then refuses to
//! start: its lock file names a pid that still exists), this process makes
//! itself a child subreaper before starting the cluster
//! ([`become_subreaper`]) and reaps the PostgreSQL processes it adopts.

use super::local_cluster::LocalCluster;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the postmaster is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Checks after a restart during which adopted backends are reaped.
const REAP_TICKS: u32 = 40;

/// The watching thread; it owns the cluster until [`ClusterSupervisor::stop`].
pub struct ClusterSupervisor {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<LocalCluster>>,
}

impl ClusterSupervisor {
    /// Starts watching the (running) cluster.
    pub fn start(cluster: LocalCluster, interval: Duration) -> ClusterSupervisor {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pg-supervisor".into())
            .spawn(move || watch(cluster, &rx, interval))
            .expect("spawn the embedded PostgreSQL supervisor thread");
        ClusterSupervisor {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Stops watching (after a restart in progress has finished) and hands
    /// the cluster back, still running, for the caller to stop.
    pub fn stop(&mut self) -> Option<LocalCluster> {
        drop(self.stop.take());
        self.thread.take()?.join().ok()
    }
}

impl Drop for ClusterSupervisor {
    /// Dropped without `stop` (a failed start-up): the cluster is stopped too.
    fn drop(&mut self) {
        drop(self.stop());
    }
}

/// True when the supervisor was told to stop (or its owner is gone) while
/// waiting `d`.
fn told_to_stop(rx: &mpsc::Receiver<()>, d: Duration) -> bool {
    !matches!(rx.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

fn watch(mut cluster: LocalCluster, rx: &mpsc::Receiver<()>, interval: Duration) -> LocalCluster {
    let mut pid = cluster.postmaster_pid();
    let mut reap_ticks = 0;
    while !told_to_stop(rx, interval) {
        if reap_ticks > 0 {
            reap_adopted_postgres();
            reap_ticks -= 1;
        }
        let Some(p) = pid else {
            pid = cluster.postmaster_pid();
            continue;
        };
        if postmaster_alive(p) {
            continue;
        }
        match restart(&mut cluster, rx, p) {
            Some(new) => {
                pid = new;
                reap_ticks = REAP_TICKS;
            }
            None => break,
        }
    }
    cluster
}

/// Restarts the cluster, retrying with a growing (bounded) delay. Returns
/// the new postmaster's pid, or `None` when told to stop first.
fn restart(cluster: &mut LocalCluster, rx: &mpsc::Receiver<()>, dead: i32) -> Option<Option<i32>> {
    let started = Instant::now();
    let mut delay = FIRST_RETRY;
    let mut attempt = 1u32;
    loop {
        reap_adopted_postgres();
        match cluster.restart() {
            Ok(false) => {
                log::warn!(
                    "embedded PostgreSQL postmaster (pid {dead}) was gone; another one runs now (started from outside), kept"
                );
                return Some(cluster.postmaster_pid());
            }
            Ok(true) => {
                let n = crate::metrics::count_embedded_db_restart();
                log::warn!(
                    "embedded PostgreSQL postmaster (pid {dead}) was gone; restarted it on 127.0.0.1:{} after {attempt} attempt(s) in {:.1} s (restart #{n})",
                    cluster.port(),
                    started.elapsed().as_secs_f64()
                );
                return Some(cluster.postmaster_pid());
            }
            Err(e) if delay == MAX_RETRY => {
                log::warn!("embedded PostgreSQL is down and does not start yet (attempt {attempt}, retrying every {} s): {e}", MAX_RETRY.as_secs());
            }
            Err(e) => log::debug!("embedded PostgreSQL restart attempt {attempt} failed: {e}"),
        }
        if told_to_stop(rx, delay) {
            return None;
        }
        delay = (delay * 2).min(MAX_RETRY);
        attempt += 1;
    }
}

/// Makes this process the adopter of the orphans of its descendants (the
/// postmaster `pg_ctl` leaves behind, and that postmaster's backends when it
/// dies), so their deaths are visible here and they can be reaped.
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        log::warn!(
            "cannot become a child subreaper ({}): a dead embedded PostgreSQL may not be restartable",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether process `pid` still runs. Our child (the adopted postmaster) is
/// reaped here when it has exited; another process counts as gone when it
/// does not exist or is a zombie.
fn postmaster_alive(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: a non-blocking wait for one given pid.
    match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
        0 => return true,
        r if r == pid => return false,
        _ => {}
    }
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    {
        return false;
    }
    !matches!(proc_stat(pid), Some((_, 'Z', _)))
}

/// `(comm, state, ppid)` of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(String, char, i32)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The name is between the first `(` and the last `)`: it may hold either.
fn parse_stat(text: &str) -> Option<(String, char, i32)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, state, ppid))
}

/// Reaps the exited PostgreSQL processes this process adopted (backends of
/// a killed postmaster, or a postmaster that exited). Only processes named
/// `postgres` are waited for: the programs this process runs itself
/// (`pg_ctl`, `initdb`) are waited for by whoever started them.
pub fn reap_adopted_postgres() {
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        if let Some((comm, 'Z', ppid)) = proc_stat(pid) {
            if ppid == me && comm == "postgres" {
                let mut status = 0;
                // SAFETY: a non-blocking wait for one exited child.
                unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_comm_state_and_parent_even_with_parentheses_in_the_name() {
        assert_eq!(
            parse_stat("4242 (post (gres) x) Z 17 4242 4242 0 -1"),
            Some(("post (gres) x".to_string(), 'Z', 17))
        );
        assert_eq!(parse_stat("4242 (postgres"), None);
        let me = std::process::id() as i32;
        let (comm, state, ppid) = proc_stat(me).expect("own stat");
        assert!(!comm.is_empty());
        assert!(state == 'R' || state == 'S', "{state}");
        // SAFETY: getppid has no preconditions.
        assert_eq!(ppid, unsafe { libc::getppid() });
    }

    #[test]
    fn a_running_child_is_alive_and_an_exited_one_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id() as i32;
        assert!(postmaster_alive(pid));
        child.kill().expect("kill");
        assert!(
            eventually(|| !postmaster_alive(pid)),
            "a killed child is seen dead"
        );
        // Already reaped by postmaster_alive: the handle's wait reports ECHILD.
        assert!(child.wait().is_err());
        assert!(!postmaster_alive(pid));
    }

    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        for _ in 0..100 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}
