//! Guards that start real processes for the integration tests: etcd 3.4, a 3-member Patroni 3.0
//! cluster of PostgreSQL 15, pgfront itself, HAProxy. Each gets a temp dir, a log file and
//! ports found by binding 127.0.0.1:0; readiness is polled with a deadline; `Drop` sends
//! SIGTERM to the process group, then SIGKILL. Nothing is ever killed by name.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod echo;
pub mod netns;

pub const PGBIN: &str = "/usr/lib/postgresql/15/bin";

/// Fails with the install command when a binary the tests need is missing.
pub fn require(bin: &str, package: &str) -> PathBuf {
    let p = if bin.starts_with('/') {
        PathBuf::from(bin)
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(bin)).find(|p| p.is_file()))
            .unwrap_or_default()
    };
    assert!(p.is_file(), "{bin} is missing: install it with `apt-get install {package}` (or run `bash .ci/run`)");
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 20 ms until it returns Some, or panics with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn postgres_ids() -> (u32, u32) {
    let out = Command::new("id").args(["-u", "postgres"]).output().expect("id");
    let uid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the postgres user exists (apt-get install postgresql-15)");
    let out = Command::new("id").args(["-g", "postgres"]).output().expect("id");
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (uid, gid)
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A temp dir owned by postgres (Patroni and PostgreSQL refuse to run as root).
pub fn pg_tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("pgfront-test-").tempdir().unwrap();
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(d.path(), Some(uid), Some(gid)).unwrap();
    }
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A child process in its own process group.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, as_postgres: bool) -> Proc {
        let out = fs::File::create(log).unwrap();
        cmd.stdout(out.try_clone().unwrap()).stderr(out).stdin(Stdio::null()).process_group(0);
        if as_postgres && is_root() {
            let (uid, gid) = postgres_ids();
            cmd.uid(uid).gid(gid).env("HOME", "/var/lib/postgresql").env("USER", "postgres");
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name: name.to_owned(), child, log: log.to_owned() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal_group(&self, sig: i32) {
        unsafe {
            libc::kill(-self.pid(), sig);
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, wait up to `limit`, then SIGKILL; the whole group.
    pub fn stop(&mut self, limit: Duration) {
        if !self.running() {
            self.signal_group(libc::SIGKILL);
            return;
        }
        self.signal_group(libc::SIGCONT);
        self.signal_group(libc::SIGTERM);
        let start = Instant::now();
        while self.running() && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let v: Vec<&str> = s.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

pub struct Etcd {
    pub proc: Proc,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start() -> Etcd {
        let bin = require("etcd", "etcd-server");
        let dir = tempfile::Builder::new().prefix("pgfront-etcd-").tempdir().unwrap();
        let port = free_port();
        let peer = free_port();
        let mut cmd = Command::new(bin);
        cmd.args([
            "--name",
            "test",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen-client-urls",
            &format!("http://127.0.0.1:{port}"),
            "--advertise-client-urls",
            &format!("http://127.0.0.1:{port}"),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-cluster",
            &format!("test=http://127.0.0.1:{peer}"),
            "--enable-v2=true",
        ]);
        let proc = Proc::spawn("etcd", cmd, &dir.path().join("etcd.log"), false);
        let e = Etcd { proc, port, dir };
        wait_for("etcd health", Duration::from_secs(20), || {
            http_get(&format!("http://127.0.0.1:{port}/health"))
                .filter(|(s, b)| *s == 200 && b.contains("true"))
                .map(|_| ())
        });
        e
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pause(&self) {
        self.proc.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.proc.signal(libc::SIGCONT);
    }
}

/// A minimal blocking HTTP/1.0 GET for test polling (status, body).
pub fn http_get(url: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(hostport).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dcs {
    Etcd3,
    Etcd2,
}

pub struct PgMember {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub proc: Option<Proc>,
}

impl PgMember {
    /// SIGKILL Patroni and its PostgreSQL (a crash of the whole node).
    pub fn crash(&mut self) {
        let pm = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok();
        if let Some(p) = self.proc.as_ref() {
            p.signal_group(libc::SIGKILL);
        }
        if let Some(pid) = pm.and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok())) {
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.wait();
            std::mem::forget(p);
        }
    }
}

pub struct Patroni {
    pub scope: String,
    pub dir: tempfile::TempDir,
    pub members: Vec<PgMember>,
}

impl Patroni {
    /// Starts a 3-member cluster against `etcd` and waits until it runs with 2 streaming replicas.
    pub fn start(etcd: &Etcd, scope: &str, dcs: Dcs) -> Patroni {
        assert!(is_root(), "the Patroni tests run as root (they start Patroni as the postgres user)");
        let patroni = require("patroni", "patroni");
        require(&format!("{PGBIN}/postgres"), "postgresql-15");
        if dcs == Dcs::Etcd2 {
            let ok = Command::new("/usr/bin/python3")
                .args(["-c", "import etcd"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "Patroni's etcd v2 support needs python3-etcd: apt-get install python3-etcd");
        }
        let dir = pg_tempdir();
        let mut members = Vec::new();
        for i in 1..=3 {
            let name = format!("pg{i}");
            let pg_port = free_port();
            let api_port = free_port();
            let mdir = dir.path().join(&name);
            fs::create_dir_all(&mdir).unwrap();
            fs::set_permissions(&mdir, fs::Permissions::from_mode(0o700)).unwrap();
            if is_root() {
                let (uid, gid) = postgres_ids();
                std::os::unix::fs::chown(&mdir, Some(uid), Some(gid)).unwrap();
            }
            let dcs_section = match dcs {
                Dcs::Etcd3 => format!("etcd3:\n  hosts: 127.0.0.1:{}\n", etcd.port),
                Dcs::Etcd2 => format!("etcd:\n  hosts: 127.0.0.1:{}\n", etcd.port),
            };
            let data_dir = mdir.join("data");
            let yml = format!(
                r#"scope: {scope}
namespace: /service/
name: {name}
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
{dcs_section}bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 4
    maximum_lag_on_failover: 10485760
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 100
        wal_log_hints: "on"
  initdb:
  - encoding: UTF8
  pg_hba:
  - local all all trust
  - host replication all 127.0.0.1/32 trust
  - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: {PGBIN}
  pgpass: {mdir}/pgpass
  authentication:
    superuser: {{username: postgres, password: postgres}}
    replication: {{username: replicator, password: replicator}}
    rewind: {{username: postgres, password: postgres}}
  parameters:
    unix_socket_directories: {mdir}
    fsync: "off"
    synchronous_commit: "off"
    shared_buffers: 16MB
"#,
                data = data_dir.display(),
                mdir = mdir.display(),
            );
            let config = dir.path().join(format!("{name}.yml"));
            fs::write(&config, yml).unwrap();
            fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
            members.push(PgMember { name, pg_port, api_port, config, data_dir, proc: None });
        }
        let mut p = Patroni { scope: scope.to_owned(), dir, members };
        for i in 0..3 {
            let m = &mut p.members[i];
            let mut cmd = Command::new(&patroni);
            cmd.arg(&m.config);
            m.proc = Some(Proc::spawn(&m.name, cmd, &p.dir.path().join(format!("{}.log", m.name)), true));
        }
        p.wait_healthy(Duration::from_secs(90));
        p
    }

    /// Waits until there is a leader running as primary and the two others stream from it.
    pub fn wait_healthy(&self, limit: Duration) {
        wait_for("a healthy Patroni cluster (leader + 2 streaming replicas)", limit, || {
            let c = self.cluster()?;
            let leader = c.iter().filter(|m| m.role == "leader" && m.state == "running").count();
            let replicas =
                c.iter().filter(|m| m.role == "replica" && (m.state == "streaming" || m.state == "running")).count();
            (leader == 1 && replicas == 2).then_some(())
        })
    }

    /// Patroni's own view of the cluster, from the REST API of any live member.
    pub fn cluster(&self) -> Option<Vec<ClusterMember>> {
        for m in &self.members {
            if m.proc.is_none() {
                continue;
            }
            if let Some((200, body)) = http_get(&format!("http://127.0.0.1:{}/cluster", m.api_port)) {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                return Some(
                    v["members"]
                        .as_array()?
                        .iter()
                        .map(|m| ClusterMember {
                            name: m["name"].as_str().unwrap_or_default().to_owned(),
                            role: m["role"].as_str().unwrap_or_default().to_owned(),
                            state: m["state"].as_str().unwrap_or_default().to_owned(),
                            port: m["port"].as_u64().unwrap_or_default() as u16,
                        })
                        .collect(),
                );
            }
        }
        None
    }

    pub fn leader(&self) -> Option<ClusterMember> {
        self.cluster()?.into_iter().find(|m| m.role == "leader" && m.state == "running")
    }

    /// The last lines of every member's Patroni/PostgreSQL log, for a failing test's output.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for m in &self.members {
            let s = fs::read_to_string(self.dir.path().join(format!("{}.log", m.name))).unwrap_or_default();
            let v: Vec<&str> = s.lines().collect();
            out.push_str(&format!(
                "--- {} (last {lines} lines) ---\n{}\n",
                m.name,
                v[v.len().saturating_sub(lines)..].join("\n")
            ));
        }
        out
    }

    pub fn member(&self, name: &str) -> &PgMember {
        self.members.iter().find(|m| m.name == name).unwrap()
    }

    pub fn member_mut(&mut self, name: &str) -> &mut PgMember {
        self.members.iter_mut().find(|m| m.name == name).unwrap()
    }

    /// `patronictl switchover --leader L --candidate C --force`, waiting for it to finish.
    pub fn switchover(&self, leader: &str, candidate: &str) -> String {
        let out = Command::new(require("patronictl", "patroni"))
            .args([
                "-c",
                self.members[0].config.to_str().unwrap(),
                "switchover",
                "--leader",
                leader,
                "--candidate",
                candidate,
                "--force",
            ])
            .env("HOME", "/tmp")
            .output()
            .expect("patronictl");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // patronictl 3.0 exits 0 even when Patroni refused the switchover.
        assert!(
            out.status.success() && text.contains("Successfully switched over"),
            "patronictl switchover failed: {text}"
        );
        text
    }

    /// Waits until `table` exists on the member listening on `port` (replication caught up).
    pub fn wait_replicated(&self, port: u16, table: &str) {
        wait_for(&format!("{table} to reach the replica on port {port}"), Duration::from_secs(30), || {
            let (ok, out, _) = psql(port, &format!("SELECT to_regclass('{table}') IS NOT NULL"));
            (ok && out == "t").then_some(())
        });
    }

    /// Restarts a crashed member (it rejoins as a replica).
    pub fn restart_member(&mut self, name: &str) {
        let patroni = require("patroni", "patroni");
        let log = self.dir.path().join(format!("{name}.restart.log"));
        let m = self.member_mut(name);
        let mut cmd = Command::new(patroni);
        cmd.arg(&m.config);
        m.proc = Some(Proc::spawn(name, cmd, &log, true));
    }
}

impl Drop for Patroni {
    fn drop(&mut self) {
        // Stop Patroni (it stops PostgreSQL), then make sure no postmaster is left.
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                p.stop(Duration::from_secs(20));
            }
        }
        for m in &self.members {
            if let Some(pid) = fs::read_to_string(m.data_dir.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            {
                unsafe {
                    if libc::kill(pid, 0) == 0 {
                        libc::kill(pid, libc::SIGQUIT);
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClusterMember {
    pub name: String,
    pub role: String,
    pub state: String,
    pub port: u16,
}

/// pgfront started from the binary under test.
pub struct Pgfront {
    pub proc: Proc,
    pub admin: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Pgfront {
    pub fn start(config_text: &str, admin: u16) -> Pgfront {
        let dir = tempfile::Builder::new().prefix("pgfront-proxy-").tempdir().unwrap();
        let config = dir.path().join("pgfront.toml");
        fs::write(&config, config_text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgfront"));
        cmd.args(["proxy", "-c", config.to_str().unwrap()])
            .env("RUST_LOG", std::env::var("PGFRONT_TEST_LOG").unwrap_or_else(|_| "info".into()));
        let proc = Proc::spawn("pgfront", cmd, &dir.path().join("pgfront.log"), false);
        let p = Pgfront { proc, admin, dir, config };
        wait_for("pgfront admin endpoint", Duration::from_secs(10), || p.status());
        p
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let (s, body) = http_get(&format!("http://127.0.0.1:{}/status", self.admin))?;
        (s == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    /// The member pgfront routes the primary of `cluster` to, if any.
    pub fn primary(&self, cluster: &str) -> Option<String> {
        let s = self.status()?;
        let c = s["clusters"].as_array()?.iter().find(|c| c["name"] == cluster)?.clone();
        c["primary"].as_str().map(str::to_owned)
    }

    pub fn wait_primary(&self, cluster: &str, member: &str, limit: Duration) {
        wait_for(&format!("pgfront to route {cluster} to {member}"), limit, || {
            (self.primary(cluster).as_deref() == Some(member)).then_some(())
        });
    }

    pub fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.admin)).map(|(_, b)| b).unwrap_or_default()
    }

    /// Value of one metric sample line, e.g. `pgfront_listener_refused_total{listener="rw",reason="full"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics().lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.proc.log).unwrap_or_default()
    }
}

/// Connects with tokio-postgres (user postgres, trust auth on loopback).
pub async fn pg_connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1").port(port).user("postgres").dbname("postgres").connect_timeout(Duration::from_secs(60));
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// `inet_server_port()` and `pg_is_in_recovery()` of a fresh connection through `port`.
pub async fn whoami(port: u16) -> Result<(u16, bool), tokio_postgres::Error> {
    let c = pg_connect(port).await?;
    let row = c.query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[]).await?;
    Ok((row.get::<_, i32>(0) as u16, row.get(1)))
}

/// The full text of a client error (tokio-postgres' Display says only "db error").
pub fn pg_err(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {} ({})", d.severity(), d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// What a writer saw while something happened to the cluster.
#[derive(Debug, Default)]
pub struct WriteStats {
    pub ok: u64,
    /// Connects that failed (refused, timed out, or an error during startup).
    pub connect_failures: u64,
    /// Writes rejected with SQLSTATE 25006 (the server was a read-only replica).
    pub read_only: u64,
    /// Sessions that broke after connecting (e.g. killed by the old primary's shutdown).
    pub broken: u64,
    /// Longest time between two successful writes.
    pub max_gap: Duration,
    /// (time since start, server port) of every successful write.
    pub writes: Vec<(Duration, u16)>,
    pub errors: Vec<String>,
}

impl WriteStats {
    pub fn failed(&self) -> u64 {
        self.connect_failures + self.read_only + self.broken
    }

    pub fn summary(&self) -> String {
        format!(
            "{} writes ok, longest gap {:.3} s, failed attempts: {} connect, {} read-only, {} broken sessions",
            self.ok,
            self.max_gap.as_secs_f64(),
            self.connect_failures,
            self.read_only,
            self.broken
        )
    }
}

/// A client that opens a connection through `conninfo`, writes one row and closes, every
/// `every`, until `stop` is cancelled or `limit` passes. The table `pgfront_probe` must exist.
pub async fn write_loop(
    conninfo: String,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
    limit: Duration,
) -> WriteStats {
    let mut st = WriteStats::default();
    let start = tokio::time::Instant::now();
    let mut last_ok = start;
    while !stop.is_cancelled() && start.elapsed() < limit {
        let tick = tokio::time::Instant::now();
        match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
            Err(e) => {
                st.connect_failures += 1;
                st.errors.push(format!("{:.3}s connect: {}", start.elapsed().as_secs_f64(), pg_err(&e)));
            }
            Ok((client, conn)) => {
                tokio::spawn(conn);
                match client
                    .query_one("INSERT INTO pgfront_probe DEFAULT VALUES RETURNING inet_server_port()", &[])
                    .await
                {
                    Ok(row) => {
                        let now = tokio::time::Instant::now();
                        st.ok += 1;
                        st.max_gap = st.max_gap.max(now - last_ok);
                        last_ok = now;
                        st.writes.push((now - start, row.get::<_, i32>(0) as u16));
                    }
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) => {
                        st.read_only += 1;
                        st.errors.push(format!("{:.3}s read-only: {}", start.elapsed().as_secs_f64(), pg_err(&e)));
                    }
                    Err(e) => {
                        st.broken += 1;
                        st.errors.push(format!("{:.3}s session: {}", start.elapsed().as_secs_f64(), pg_err(&e)));
                    }
                }
            }
        }
        tokio::time::sleep_until(tick + every).await;
    }
    st
}

pub fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=60")
}

/// Runs `psql -c sql` against `port`; returns (success, stdout, stderr).
pub fn psql(port: u16, sql: &str) -> (bool, String, String) {
    let out = Command::new(require("psql", "postgresql-client-15"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-Atqc", sql])
        .env("PGCONNECT_TIMEOUT", "60")
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}
