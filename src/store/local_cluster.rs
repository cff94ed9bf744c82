//! The embedded default database: a private PostgreSQL cluster under
//! `<data_dir>/postgres`, created with the system's `initdb` on first use and
//! started and stopped with `pg_ctl`. It listens on 127.0.0.1 only, on a port
//! picked at each start, with a generated password (scram-sha-256) kept in
//! `<data_dir>/pg-password`. `initdb` refuses to run as root, so when this
//! process is root the cluster runs as the `postgres` user. A postmaster that
//! dies is started again by `store::supervisor` through [`LocalCluster::restart`].

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
#[error("embedded PostgreSQL: {0}")]
pub struct ClusterError(pub String);

fn fail(what: impl Into<String>) -> ClusterError {
    ClusterError(what.into())
}

/// The database created in the cluster for Triggers.
pub const DATABASE: &str = "triggers";
const SUPERUSER: &str = "triggers";

pub struct LocalCluster {
    data_dir: PathBuf,
    pgdata: PathBuf,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    password: String,
    port: u16,
    running: bool,
}

impl LocalCluster {
    /// Creates the cluster under `data_dir` if it does not exist yet. Does not start it.
    pub fn open(data_dir: &Path, bin_dir: &str) -> Result<LocalCluster, ClusterError> {
        let bin = find_bin_dir(bin_dir)?;
        fs::create_dir_all(data_dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", data_dir.display())))?;
        let data_dir = fs::canonicalize(data_dir)
            .map_err(|e| fail(format!("cannot resolve {}: {e}", data_dir.display())))?;
        let run_as = unprivileged_user()?;
        if let Some((uid, gid)) = run_as {
            // The cluster runs as `postgres`: it must be able to reach the data directory.
            let reachable = Command::new("test")
                .arg("-x")
                .arg(&data_dir)
                .uid(uid)
                .gid(gid)
                .status()
                .is_ok_and(|s| s.success());
            if !reachable {
                return Err(fail(format!(
                    "the postgres user cannot enter {} (a parent directory is private); choose a --data-dir under a world-traversable path such as /var/lib/triggers",
                    data_dir.display()
                )));
            }
        }
        let pgdata = data_dir.join("postgres");
        let password_file = data_dir.join("pg-password");
        let mut cluster = LocalCluster {
            data_dir: data_dir.clone(),
            pgdata,
            bin,
            run_as,
            password: String::new(),
            port: 0,
            running: false,
        };
        if cluster.pgdata.join("PG_VERSION").exists() {
            cluster.password = fs::read_to_string(&password_file)
                .map_err(|e| fail(format!("cannot read {}: {e}", password_file.display())))?
                .trim()
                .to_string();
        } else {
            cluster.init(&password_file)?;
        }
        Ok(cluster)
    }

    fn init(&mut self, password_file: &Path) -> Result<(), ClusterError> {
        self.password = uuid::Uuid::new_v4().simple().to_string();
        write_private(password_file, &self.password, None)?;
        let _ = fs::remove_dir_all(&self.pgdata);
        fs::create_dir_all(&self.pgdata)
            .map_err(|e| fail(format!("cannot create {}: {e}", self.pgdata.display())))?;
        fs::set_permissions(&self.pgdata, fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(e.to_string()))?;
        let pwfile = self.data_dir.join("initdb-pwfile");
        write_private(&pwfile, &self.password, self.run_as)?;
        if let Some((uid, gid)) = self.run_as {
            chown(&self.pgdata, Some(uid), Some(gid)).map_err(|e| fail(e.to_string()))?;
        }
        let out = self.run(
            "initdb",
            &[
                "-D".as_ref(),
                self.pgdata.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                format!("--pwfile={}", pwfile.display()).as_ref(),
                "--auth=scram-sha-256".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        );
        let _ = fs::remove_file(&pwfile);
        check("initdb", out?)?;
        let conf = self.pgdata.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(|e| fail(e.to_string()))?;
        text.push_str(
            "\n# Triggers: loopback only, no Unix socket; the port is set in triggers.conf at each start.\n\
             listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
             include_if_exists = 'triggers.conf'\n",
        );
        fs::write(&conf, text).map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// Starts the cluster on a free loopback port (stopping a stale one left by a crash).
    pub fn start(&mut self) -> Result<(), ClusterError> {
        if self.pgdata.join("postmaster.pid").exists() && self.status_running() {
            log::warn!("embedded PostgreSQL was left running (crash?); restarting it");
            self.pg_ctl_stop()?;
        }
        // A port picked here can be taken by another socket before PostgreSQL
        // binds it; that failure is retried on a fresh port. A port given by
        // the caller (a restart) is kept.
        let fresh = self.port == 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if fresh {
                self.port = free_port()?;
            }
            match self.pg_ctl_start() {
                Err(e) if fresh && attempt < 3 && e.to_string().contains("already in use") => {
                    log::warn!("embedded PostgreSQL port {} was taken; retrying", self.port);
                }
                other => break other?,
            }
        }
        self.running = true;
        self.ensure_database()?;
        Ok(())
    }

    /// Starts the cluster again after its postmaster died: same data
    /// directory and same port, so the connection URLs handed out stay
    /// valid. A postmaster found running (started by someone else) is kept:
    /// returns whether this call started it.
    pub fn restart(&mut self) -> Result<bool, ClusterError> {
        if self.status_running() {
            return Ok(false);
        }
        self.pg_ctl_start().map(|()| true)
    }

    /// The postmaster's pid: the first line of `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.pgdata.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let conf = self.pgdata.join("triggers.conf");
        write_private(&conf, &format!("port = {}\n", self.port), self.run_as)?;
        let log_file = self.pgdata.join("server.log");
        let out = self.run(
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "-D".as_ref(),
                self.pgdata.as_os_str(),
                "-l".as_ref(),
                log_file.as_os_str(),
            ],
        )?;
        if !out.status.success() {
            let tail = fs::read_to_string(&log_file).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(fail(format!(
                "pg_ctl start failed: {}{}\n{tail}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    fn ensure_database(&self) -> Result<(), ClusterError> {
        let mut client = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .map_err(|e| fail(format!("cannot connect: {e}")))?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
            .map_err(|e| fail(e.to_string()))?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    }

    /// Stops the cluster (fast shutdown: sessions are disconnected).
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        if !self.status_running() {
            // Its postmaster died and was not started again: nothing to stop.
            return Ok(());
        }
        self.pg_ctl_stop()
    }

    fn pg_ctl_stop(&self) -> Result<(), ClusterError> {
        let out = self.run(
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-w".as_ref(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-D".as_ref(),
                self.pgdata.as_os_str(),
            ],
        )?;
        check("pg_ctl stop", out)
    }

    fn status_running(&self) -> bool {
        self.run(
            "pg_ctl",
            &["status".as_ref(), "-D".as_ref(), self.pgdata.as_os_str()],
        )
        .is_ok_and(|o| o.status.success())
    }

    /// A connection URL for `database` (default: the Triggers database).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<Output, ClusterError> {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args).current_dir("/").env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            // std drops root's supplementary groups when it changes uid.
            cmd.uid(uid).gid(gid);
        }
        cmd.output()
            .map_err(|e| fail(format!("cannot run {program}: {e}")))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::error!("{e}");
        }
    }
}

fn check(what: &str, out: Output) -> Result<(), ClusterError> {
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn write_private(path: &Path, text: &str, owner: Option<(u32, u32)>) -> Result<(), ClusterError> {
    let _ = fs::remove_file(path);
    fs::write(path, text).map_err(|e| fail(format!("cannot write {}: {e}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| fail(e.to_string()))?;
    if let Some((uid, gid)) = owner {
        chown(path, Some(uid), Some(gid)).map_err(|e| fail(e.to_string()))?;
    }
    Ok(())
}

/// The directory with `initdb` and `pg_ctl`: configured, else the newest
/// `/usr/lib/postgresql/*/bin`, else `PATH`.
pub fn find_bin_dir(configured: &str) -> Result<PathBuf, ClusterError> {
    if !configured.is_empty() {
        let p = PathBuf::from(configured);
        return if p.join("initdb").exists() {
            Ok(p)
        } else {
            Err(fail(format!(
                "no initdb in database.pg_bin_dir = {configured}"
            )))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .ok_or_else(|| {
            fail("PostgreSQL server binaries (initdb, pg_ctl) not found: install them (apt-get install -y postgresql) or set database.url")
        })
}

/// When running as root: the `postgres` user's (uid, gid).
fn unprivileged_user() -> Result<Option<(u32, u32)>, ClusterError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = c"postgres";
    // SAFETY: getpwnam reads a static entry; we copy the two ids out at once,
    // and this runs at start-up before other threads use getpw*.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(fail(
            "running as root, and initdb refuses root: create the 'postgres' user (apt-get install -y postgresql) or set database.url",
        ));
    }
    // SAFETY: pw is non-null and points to a valid passwd entry.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// A currently free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16, ClusterError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| fail(format!("no free port: {e}")))
}
