//! Guards that start real processes for the integration tests: etcd 3.4 (one member or a
//! three-member cluster), a 3-member Patroni 3.0 cluster of PostgreSQL 15, pgfront itself,
//! HAProxy. Each gets a temp dir, a log file and ports found by binding 127.0.0.1:0; readiness
//! is polled with a deadline; `Drop` sends SIGTERM to the process group, then SIGKILL.
//!
//! Invariants, so that the suite runs from any clone and a killed run leaves nothing behind:
//! - every child runs in a working directory it can enter (its own temp dir), never in the
//!   clone: Patroni and PostgreSQL run as the postgres user, who may not enter a clone in
//!   root's home or in a `mktemp -d` directory;
//! - every long-lived child gets `PR_SET_PDEATHSIG(SIGKILL)` and is forked by one thread that
//!   lives as long as the test process (the signal fires when the *forking thread* exits);
//! - what cannot die with the test (PostgreSQL postmasters: Patroni starts them in their own
//!   session) is written down in [`leftovers`] as it is started; SIGTERM, SIGINT or SIGHUP to
//!   the test process stops all of it at once, and a test process killed outright (SIGKILL)
//!   is cleaned up by the next test process, by PID from those records only.
//!
//! Nothing is ever killed by name.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod agent;
pub mod echo;
pub mod netns;
pub mod repmgr;
pub mod stats;

pub const PGBIN: &str = "/usr/lib/postgresql/15/bin";

/// The pgfront binary under test: `$PGFRONT_BIN` if set, else the one cargo built for this
/// test. The override exists because a target dir shared by several checkouts of pgfront
/// (same package, same lock file) has one `target/debug/pgfront` that any of them may
/// rebuild while this test runs; copy the binary away and point `PGFRONT_BIN` at the copy.
pub fn pgfront_bin() -> PathBuf {
    std::env::var_os("PGFRONT_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pgfront")), PathBuf::from)
}

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
        leftovers::hold_if_stopping();
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn postgres_ids() -> (u32, u32) {
    let out = Command::new("id").args(["-u", "postgres"]).current_dir("/").output().expect("id");
    let uid = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the postgres user exists (apt-get install postgresql-15)");
    let out = Command::new("id").args(["-g", "postgres"]).current_dir("/").output().expect("id");
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (uid, gid)
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A temp dir, recorded in [`leftovers`] so that a killed run's copy is removed by the next.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    temp_dir_in(prefix, &std::env::temp_dir())
}

fn temp_dir_in(prefix: &str, parent: &Path) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", parent.display()));
    leftovers::record("dir", &d.path().display().to_string());
    d
}

/// Whether a user other than the owner can reach `dir` (every ancestor searchable by others).
fn enterable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|a| fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// A temp dir owned by postgres (Patroni and PostgreSQL refuse to run as root), in a parent
/// the postgres user can enter: `$TMPDIR` if it can, else /tmp.
pub fn pg_tempdir() -> tempfile::TempDir {
    let tmp = std::env::temp_dir();
    let parent = if enterable_by_others(&tmp) { tmp } else { PathBuf::from("/tmp") };
    let d = temp_dir_in("pgfront-test-", &parent);
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(d.path(), Some(uid), Some(gid)).unwrap();
    }
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Makes `cmd`'s child receive SIGKILL when the thread that forks it exits. Spawn through
/// [`spawn_child`] so that this thread is one that lives as long as the test process.
fn die_with_test(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec and calls only async-signal-safe functions
    // (prctl, getppid); std applies uid/gid before this closure, and a credential change would
    // clear the parent-death signal.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test process may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` from a thread that lives as long as the test process. PR_SET_PDEATHSIG fires
/// when the *thread* that forked the child exits, and libtest runs each test on a thread of
/// its own (tests start helper threads too): a child forked there would be killed when that
/// thread ends, not when the test process does.
pub fn spawn_child(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("pgfront-test-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let gone = || std::io::Error::other("the spawner thread is gone");
    spawner.lock().unwrap_or_else(|e| e.into_inner()).send((cmd, reply_tx)).map_err(|_| gone())?;
    reply_rx.recv().map_err(|_| gone())?
}

/// A child process in its own process group.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its output in `log`, in its own process group, in the directory of
    /// `log` (its own temp dir) unless `cmd` names one, dying with the test process, and
    /// recorded in [`leftovers`]. `as_postgres`: as the postgres user (when root).
    pub fn spawn(name: &str, cmd: Command, log: &Path, as_postgres: bool) -> Proc {
        Proc::spawn_split(name, cmd, None, log, as_postgres)
    }

    /// `spawn` with the standard output in a file of its own (`stdout`), the errors in `log`.
    pub fn spawn_split(name: &str, mut cmd: Command, stdout: Option<&Path>, log: &Path, as_postgres: bool) -> Proc {
        leftovers::hold_if_stopping();
        let create = |p: &Path| fs::File::create(p).unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        let out = create(log);
        let stdout = stdout.map_or_else(|| out.try_clone().unwrap(), create);
        cmd.stdout(stdout).stderr(out).stdin(Stdio::null()).process_group(0);
        // Otherwise the child inherits the test's working directory, the clone, which the
        // postgres user cannot enter when the clone is in root's home or a `mktemp -d` dir.
        if cmd.get_current_dir().is_none() {
            cmd.current_dir(log.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("/")));
        }
        if as_postgres && is_root() {
            let (uid, gid) = postgres_ids();
            cmd.uid(uid).gid(gid).env("HOME", "/var/lib/postgresql").env("USER", "postgres");
        }
        die_with_test(&mut cmd);
        let child = spawn_child(cmd).unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        leftovers::record_proc(child.id() as i32);
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
        leftovers::hold_if_stopping();
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
        let dir = temp_dir("pgfront-etcd-");
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

/// One member of an [`EtcdCluster`].
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub proc: Option<Proc>,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Whether the member answers `/health` with true (it is part of a cluster with a leader).
    pub fn healthy(&self) -> bool {
        http_get(&format!("{}/health", self.endpoint())).is_some_and(|(s, b)| s == 200 && b.contains("true"))
    }
}

/// A three-member etcd 3.4 cluster on loopback, one member per "data centre" (dc1, dc2, dc3),
/// each with its own client and peer ports, the v2 API enabled. Members can be killed,
/// stopped (SIGSTOP: connections stay open, nothing answers), restarted from their data, or
/// the whole cluster re-created empty on the same ports (revisions start again from 1).
pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<EtcdMember>,
    /// Incremented by `recreate`: a new cluster token, so no member mistakes the new cluster
    /// for the old one.
    pub generation: u32,
    /// Members started so far, to name each start's log.
    starts: u32,
}

impl EtcdCluster {
    pub fn start() -> EtcdCluster {
        require("etcd", "etcd-server");
        let dir = temp_dir("pgfront-etcd3-");
        let members = (1..=3)
            .map(|i| {
                let name = format!("dc{i}");
                let data_dir = dir.path().join(&name);
                EtcdMember { name, client_port: free_port(), peer_port: free_port(), data_dir, proc: None }
            })
            .collect();
        let mut c = EtcdCluster { dir, members, generation: 0, starts: 0 };
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    fn spawn(&mut self, i: usize) {
        let bin = require("etcd", "etcd-server");
        let initial: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port)).collect();
        let token = format!("pgfront-test-{}-{}", std::process::id(), self.generation);
        self.starts += 1;
        let log = self.dir.path().join(format!("{}.{}.log", self.members[i].name, self.starts));
        let m = &mut self.members[i];
        let mut cmd = Command::new(bin);
        cmd.args([
            "--name",
            &m.name,
            "--data-dir",
            m.data_dir.to_str().unwrap(),
            "--listen-client-urls",
            &m.endpoint(),
            "--advertise-client-urls",
            &m.endpoint(),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", m.peer_port),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{}", m.peer_port),
            "--initial-cluster",
            &initial.join(","),
            "--initial-cluster-token",
            &token,
            "--initial-cluster-state",
            "new",
            "--enable-v2=true",
        ]);
        let name = m.name.clone();
        m.proc = Some(Proc::spawn(&name, cmd, &log, false));
    }

    /// Waits until every running member answers `/health` with true.
    pub fn wait_healthy(&self, limit: Duration) {
        wait_for("every running etcd member healthy", limit, || {
            self.members.iter().filter(|m| m.proc.is_some()).all(EtcdMember::healthy).then_some(())
        });
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    pub fn hosts(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::host).collect()
    }

    /// The member whose client port is `port`.
    pub fn by_client_port(&self, port: u16) -> Option<usize> {
        self.members.iter().position(|m| m.client_port == port)
    }

    /// SIGKILL member `i` (a crash); its data stays for `restart`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.signal_group(libc::SIGKILL);
            p.stop(Duration::from_secs(1));
        }
    }

    /// SIGSTOP member `i`: its TCP connections stay open and nothing answers on them.
    pub fn pause(&self, i: usize) {
        if let Some(p) = &self.members[i].proc {
            p.signal(libc::SIGSTOP);
        }
    }

    pub fn resume(&self, i: usize) {
        if let Some(p) = &self.members[i].proc {
            p.signal(libc::SIGCONT);
        }
    }

    /// Starts a killed member again from its data dir; it rejoins the cluster.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].proc.is_none(), "{} is running", self.members[i].name);
        self.spawn(i);
    }

    /// Kills every member, wipes their data and starts an empty cluster on the same ports
    /// (what a restore of an older snapshot or a re-created cluster looks like to clients:
    /// revisions go back).
    pub fn recreate(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        for m in &self.members {
            let _ = fs::remove_dir_all(&m.data_dir);
        }
        self.generation += 1;
        for i in 0..self.members.len() {
            self.spawn(i);
        }
    }

    /// `(cluster id, revision)` as member `i` reports them (v3 `endpoint status`).
    pub fn status(&self, i: usize) -> Option<(u64, i64)> {
        let v = self.endpoint_status(i)?;
        let h = &v["header"];
        Some((h["cluster_id"].as_u64()?, h["revision"].as_i64()?))
    }

    /// Whether member `i` is the etcd cluster's leader, as it reports.
    pub fn is_leader(&self, i: usize) -> Option<bool> {
        let v = self.endpoint_status(i)?;
        Some(v["leader"].as_u64()? == v["header"]["member_id"].as_u64()?)
    }

    /// The Raft term member `i` reports: it grows with every etcd leader election.
    pub fn raft_term(&self, i: usize) -> Option<u64> {
        self.endpoint_status(i)?["raft_term"].as_u64()
    }

    /// Member `i`'s `etcdctl endpoint status`.
    fn endpoint_status(&self, i: usize) -> Option<serde_json::Value> {
        let out = Command::new(require("etcdctl", "etcd-client"))
            .args([
                "--endpoints",
                &self.members[i].endpoint(),
                "--command-timeout=2s",
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .env("ETCDCTL_API", "3")
            .current_dir(self.dir.path())
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v.get(0)?["Status"].clone())
    }
}

/// Remote ports of `pid`'s ESTABLISHED TCP connections to 127.0.0.1, from its socket fds
/// matched by inode against /proc/<pid>/net/tcp (no `ss` needed).
pub fn established_ports(pid: i32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let l = fs::read_link(e.path()).ok()?;
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let mut ports: Vec<u16> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // f[2] remote "0100007F:0929", f[3] state (01 = ESTABLISHED), f[9] inode.
            let (ip, port) = f.get(2)?.split_once(':')?;
            (f.get(3) == Some(&"01") && ip == "0100007F" && inodes.contains(*f.get(9)?))
                .then(|| u16::from_str_radix(port, 16).ok())
                .flatten()
        })
        .collect();
    ports.sort_unstable();
    ports
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
        Patroni::start_with_hosts(&[format!("127.0.0.1:{}", etcd.port)], scope, dcs)
    }

    /// `start` against several etcd members (`host:port` each), as in production with one
    /// etcd member per data centre: Patroni moves to another member when one fails.
    pub fn start_with_hosts(hosts: &[String], scope: &str, dcs: Dcs) -> Patroni {
        Patroni::start_with_pre_promote(hosts, scope, dcs, None)
    }

    /// `start_with_hosts` with Patroni's `postgresql.pre_promote` set to `pre_promote`, in which
    /// `{dir}` is the cluster's directory (readable by postgres) and `{name}` the member's name.
    pub fn start_with_pre_promote(hosts: &[String], scope: &str, dcs: Dcs, pre_promote: Option<&str>) -> Patroni {
        assert!(is_root(), "the Patroni tests run as root (they start Patroni as the postgres user)");
        let patroni = require("patroni", "patroni");
        require(&format!("{PGBIN}/postgres"), "postgresql-15");
        if dcs == Dcs::Etcd2 {
            let ok = Command::new("/usr/bin/python3")
                .args(["-c", "import etcd"])
                .current_dir("/")
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
            // The postmaster runs in a session of its own, out of reach of PDEATHSIG and of
            // the signal to Patroni's process group: record where its pid file will be.
            let mdir = mdir.canonicalize().unwrap_or(mdir);
            leftovers::record("postmaster", &mdir.join("data").display().to_string());
            fs::set_permissions(&mdir, fs::Permissions::from_mode(0o700)).unwrap();
            if is_root() {
                let (uid, gid) = postgres_ids();
                std::os::unix::fs::chown(&mdir, Some(uid), Some(gid)).unwrap();
            }
            let hosts = hosts.join(",");
            let dcs_section = match dcs {
                Dcs::Etcd3 => format!("etcd3:\n  hosts: {hosts}\n"),
                Dcs::Etcd2 => format!("etcd:\n  hosts: {hosts}\n"),
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
{pre_promote}  pgpass: {mdir}/pgpass
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
                pre_promote = pre_promote.map_or(String::new(), |t| format!(
                    "  pre_promote: {}\n",
                    t.replace("{dir}", &dir.path().display().to_string()).replace("{name}", &name)
                )),
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

    fn member_log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// The length of every member's Patroni/PostgreSQL log, to print what follows with `logs_since`.
    pub fn log_lens(&self) -> Vec<usize> {
        self.members.iter().map(|m| self.member_log(&m.name).len()).collect()
    }

    /// What every member logged after `lens` (from `log_lens`).
    pub fn logs_since(&self, lens: &[usize]) -> String {
        let mut out = String::new();
        for (m, &from) in self.members.iter().zip(lens) {
            let s = self.member_log(&m.name);
            out.push_str(&format!("--- {} ---\n{}\n", m.name, s.get(from..).unwrap_or_default().trim_end()));
        }
        out
    }

    /// The last lines of every member's Patroni/PostgreSQL log, for a failing test's output.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for m in &self.members {
            let s = self.member_log(&m.name);
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
    ///
    /// Patroni answers 503 to a switchover it could not carry out in its own time (a candidate
    /// whose replication it has not seen catch up yet, a loop slowed down on a loaded machine):
    /// tried again, for 90 s, while `leader` still leads. If the candidate leads in the end
    /// (Patroni gave up waiting, not switching), that counts as done. Any other answer fails.
    pub fn switchover(&self, leader: &str, candidate: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let text = match self.try_switchover(leader, candidate) {
                Ok(text) => return text,
                Err(text) => text,
            };
            let refused = text.contains("Switchover failed") || text.contains("exceeds maximum replication lag");
            if !refused || Instant::now() > deadline {
                panic!("patronictl switchover failed: {text}\n{}", self.log_tails(20));
            }
            // Settled one way or the other?
            let now = wait_for("a leader after a refused switchover", Duration::from_secs(30), || self.leader());
            if now.name == candidate {
                eprintln!("patronictl switchover answered 503, but {candidate} leads: done");
                return text;
            }
            if now.name != leader {
                panic!("patronictl switchover failed and {} leads now: {text}", now.name);
            }
            eprintln!("patronictl switchover refused ({}); trying again", text.lines().last().unwrap_or(""));
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// `switchover`, returning patronictl's output either way.
    pub fn try_switchover(&self, leader: &str, candidate: &str) -> Result<String, String> {
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
            .current_dir(self.dir.path())
            .output()
            .expect("patronictl");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // patronictl 3.0 exits 0 even when Patroni refused the switchover.
        if out.status.success() && text.contains("Successfully switched over") {
            Ok(text)
        } else {
            Err(text)
        }
    }

    /// `switchover`, tried again while Patroni cannot write the switchover key: with the etcd
    /// member it talks to stopped, Patroni needs a few of its own timeouts to move to another.
    /// Returns the output and the number of attempts.
    pub fn switchover_retrying(&self, leader: &str, candidate: &str, limit: Duration) -> (String, u32) {
        let mut attempts = 0;
        let out = wait_for(&format!("a switchover from {leader} to {candidate}"), limit, || {
            attempts += 1;
            match self.try_switchover(leader, candidate) {
                Ok(text) => Some(text),
                Err(text) if text.contains("failed to write switchover key into DCS") => {
                    eprintln!("patronictl switchover: Patroni could not write the switchover key; trying again");
                    None
                }
                Err(text) => panic!("patronictl switchover failed: {text}"),
            }
        });
        (out, attempts)
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
        leftovers::hold_if_stopping();
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

/// One PostgreSQL 15 (no Patroni), run as the postgres user: for benchmarks of the data path,
/// where what matters is the bytes between client and server, not the failover. Trust auth on
/// loopback, fsync off; stopped (fast shutdown of its process group) on drop.
pub struct Postgres {
    pub proc: Proc,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Postgres {
    /// initdb and start; `settings` are extra `-c name=value` pairs. Waits until it accepts a
    /// connection.
    pub fn start(settings: &[(&str, &str)]) -> Postgres {
        assert!(is_root(), "PostgreSQL runs as the postgres user: run as root");
        let initdb = require(&format!("{PGBIN}/initdb"), "postgresql-15");
        let dir = pg_tempdir();
        let data = dir.path().join("data");
        leftovers::record("postmaster", &data.display().to_string());
        let mut cmd = Command::new(initdb);
        cmd.args(["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]);
        let mut init = Proc::spawn("initdb", cmd, &dir.path().join("initdb.log"), true);
        let ok = init.child.wait().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "initdb failed:\n{}", init.log_tail(30));
        let port = free_port();
        let mut cmd = Command::new(format!("{PGBIN}/postgres"));
        cmd.arg("-D").arg(&data).args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"]);
        cmd.arg("-c").arg(format!("unix_socket_directories={}", dir.path().display()));
        for (k, v) in
            [("fsync", "off"), ("synchronous_commit", "off"), ("full_page_writes", "off")].iter().chain(settings)
        {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let proc = Proc::spawn("postgres", cmd, &dir.path().join("postgres.log"), true);
        let pg = Postgres { proc, port, dir };
        wait_for("PostgreSQL to accept connections", Duration::from_secs(60), || {
            psql(port, "SELECT 1").0.then_some(())
        });
        pg
    }
}

/// The tokio runtime the tests drive their clients with (2 workers: the machine has 2 cores).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A proxy config's head: `[admin]` on `admin` and one `[[cluster]]` `name` for the Patroni
/// (or agent) keys of `scope` on the etcd v3 `endpoint`, `etcd_timeout = "1s"`, plus `extra`
/// lines of that cluster (`check_user = "postgres"`, `source = "agent"` …). Listeners follow
/// with [`listener_config`].
pub fn cluster_config(admin: u16, name: &str, scope: &str, endpoint: &str, extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[[cluster]]
name = "{name}"
scope = "{scope}"
etcd_endpoints = ["{endpoint}"]
etcd_timeout = "1s"
{extra}
"#
    )
}

/// One `[[listener]]` of `cluster` on 127.0.0.1:`port` for `role`, clients queued up to
/// `queue_timeout`.
pub fn listener_config(cluster: &str, name: &str, port: u16, role: &str, queue_timeout: &str) -> String {
    format!(
        r#"
[[listener]]
name = "{name}"
cluster = "{cluster}"
bind = "127.0.0.1:{port}"
role = "{role}"
queue_timeout = "{queue_timeout}"
"#
    )
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
        let dir = temp_dir("pgfront-proxy-");
        let config = dir.path().join("pgfront.toml");
        fs::write(&config, config_text).unwrap();
        let mut cmd = Command::new(pgfront_bin());
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
                st.errors.push(format!("{} connect: {}", at(start), pg_err(&e)));
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
                        st.errors.push(format!("{} read-only: {}", at(start), pg_err(&e)));
                    }
                    Err(e) => {
                        st.broken += 1;
                        st.errors.push(format!("{} session: {}", at(start), pg_err(&e)));
                    }
                }
            }
        }
        tokio::time::sleep_until(tick + every).await;
    }
    st
}

/// The time since `start` and the wall clock (UTC, as pgfront's and Patroni's logs print it).
fn at(start: tokio::time::Instant) -> String {
    format!(
        "{:.3}s ({})",
        start.elapsed().as_secs_f64(),
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    )
}

pub fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=60")
}

/// Runs `psql -c sql` against `port`; returns (success, stdout, stderr).
pub fn psql(port: u16, sql: &str) -> (bool, String, String) {
    let out = Command::new(require("psql", "postgresql-client-15"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-Atqc", sql])
        .env("PGCONNECT_TIMEOUT", "60")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// Everything a test process starts that could outlive it, written down as it is started, in
/// `/tmp/pgfront-tests/reg-<pid>-<start time>` (one line each: `proc <pid> <start time>`,
/// `postmaster <data dir>`, `dir <path>`, `netns <name>`).
///
/// - SIGTERM, SIGINT or SIGHUP to the test process: a thread stops all of it (each child's
///   process group, each postmaster, then removes the dirs and namespaces) and the process
///   then dies of that signal. Test threads that meet the dying processes are held (never
///   finish) so that libtest cannot exit before the clean-up is done.
/// - Killed outright (SIGKILL): its direct children die of PDEATHSIG; the first guard of the
///   next test process sweeps the records of every test process no longer alive.
/// - Normal exit: the same clean-up runs from `atexit` (normally a no-op) and the record goes.
///
/// Processes are only ever signalled by PID from these records, and only after checking they
/// are still the process recorded: same start time for a child, current directory equal to
/// the data dir for a postmaster. Processes of live test processes (another engineer's run)
/// are never touched.
pub mod leftovers {
    use std::fs;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    /// Where test processes keep their records.
    pub const DIR: &str = "/tmp/pgfront-tests";

    static OWN: OnceLock<Option<Mutex<(PathBuf, fs::File)>>> = OnceLock::new();
    static STOPPING: AtomicBool = AtomicBool::new(false);
    static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

    /// The kernel's start time of `pid` (clock ticks since boot, field 22 of /proc/<pid>/stat);
    /// None if there is no such process or it is a zombie. With the pid, it names a process
    /// uniquely: a reused pid has a later start time.
    pub fn start_time(pid: i32) -> Option<u64> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if rest.first() == Some(&"Z") {
            return None;
        }
        rest.get(19)?.parse().ok()
    }

    /// The process group of `pid` (field 5 of /proc/<pid>/stat).
    fn pgid(pid: i32) -> Option<i32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(2)?.parse().ok()
    }

    fn own() -> Option<&'static Mutex<(PathBuf, fs::File)>> {
        OWN.get_or_init(|| {
            if fs::create_dir_all(DIR).is_err() {
                return None;
            }
            for line in sweep() {
                eprintln!("leftovers of a dead test process: {line}");
            }
            let me = std::process::id() as i32;
            let path = Path::new(DIR).join(format!("reg-{me}-{}", start_time(me)?));
            let file = fs::OpenOptions::new().create(true).append(true).open(&path).ok()?;
            install_signal_handlers();
            // SAFETY: registers a plain extern "C" function.
            unsafe { libc::atexit(at_exit) };
            Some(Mutex::new((path, file)))
        })
        .as_ref()
    }

    /// Records one thing to clean up if this test process dies without its guards' `Drop`.
    /// The first call sweeps what dead test processes left.
    pub fn record(kind: &str, what: &str) {
        if let Some(own) = own() {
            let mut g = own.lock().unwrap_or_else(|e| e.into_inner());
            // One write per line on an O_APPEND file: a reader never sees half a line.
            let _ = g.1.write_all(format!("{kind} {what}\n").as_bytes());
        }
    }

    /// Records a child process (its process group too: children are group leaders).
    pub fn record_proc(pid: i32) {
        if let Some(t) = start_time(pid) {
            record("proc", &format!("{pid} {t}"));
        }
    }

    /// Holds the calling thread for good while the process is being cleaned up after a signal.
    pub fn hold_if_stopping() {
        if STOPPING.load(Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
    }

    fn parse_ids(s: &str) -> Option<(i32, u64)> {
        let mut it = s.splitn(3, '-');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    }

    fn alive(pid: i32, start: u64) -> bool {
        start_time(pid) == Some(start)
    }

    /// Cleans up after every test process that is gone; returns what it did. A record is
    /// claimed by renaming it (`sweep-<sweeper pid>-<start>-<owner pid>-<start>`), so two test
    /// processes starting together do not both work on it; a claim whose sweeper died is taken
    /// over.
    pub fn sweep() -> Vec<String> {
        let me = std::process::id() as i32;
        let Some(my_start) = start_time(me) else { return Vec::new() };
        let Ok(entries) = fs::read_dir(DIR) else { return Vec::new() };
        let mut done = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (holder, owner) = if let Some(rest) = name.strip_prefix("reg-") {
                (parse_ids(rest), rest.to_owned())
            } else if let Some(rest) = name.strip_prefix("sweep-") {
                let mut parts = rest.splitn(3, '-');
                let sweeper = (parts.next(), parts.next());
                let owner = parts.next().unwrap_or_default().to_owned();
                let sweeper = match sweeper {
                    (Some(p), Some(t)) => p.parse().ok().zip(t.parse().ok()),
                    _ => None,
                };
                (sweeper, owner)
            } else {
                continue;
            };
            if holder.is_some_and(|(p, t)| alive(p, t)) {
                continue;
            }
            let claimed = Path::new(DIR).join(format!("sweep-{me}-{my_start}-{owner}"));
            if fs::rename(e.path(), &claimed).is_err() {
                continue;
            }
            done.extend(clean(&claimed).into_iter().map(|l| format!("{owner}: {l}")));
            let _ = fs::remove_file(&claimed);
        }
        done
    }

    /// The pid in `data_dir/postmaster.pid`, if that process runs in `data_dir` (a postmaster
    /// changes into its data dir; a reused pid would not be there).
    fn postmaster_in(data_dir: &Path) -> Option<i32> {
        let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        (cwd == data_dir && start_time(pid).is_some()).then_some(pid)
    }

    fn wait_gone(pids: &[(i32, u64)], limit: Duration) -> bool {
        let t = Instant::now();
        loop {
            if pids.iter().all(|&(p, s)| !alive(p, s)) {
                return true;
            }
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops and removes what the record at `path` lists; returns what it did.
    fn clean(path: &Path) -> Vec<String> {
        let text = fs::read_to_string(path).unwrap_or_default();
        let (mut procs, mut postmasters, mut dirs, mut namespaces) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("proc", ids)) => {
                    let mut it = ids.split_whitespace().map(str::parse::<u64>);
                    if let (Some(Ok(p)), Some(Ok(t))) = (it.next(), it.next()) {
                        procs.push((p as i32, t));
                    }
                }
                Some(("postmaster", d)) => postmasters.push(PathBuf::from(d)),
                Some(("dir", d)) => dirs.push(PathBuf::from(d)),
                Some(("netns", n)) => namespaces.push(n.to_owned()),
                _ => {}
            }
        }
        let mut done = Vec::new();
        // Children first (Patroni would restart a postmaster), each with its process group:
        // while any member of group P lives, pid P is not reused, so the group is still the
        // child's if P is gone or is still the recorded process.
        for &(pid, t) in &procs {
            let leader = start_time(pid);
            if leader.is_some() && leader != Some(t) {
                continue;
            }
            // SAFETY: kill(2) on a pid/group checked above.
            unsafe {
                if leader.is_none() || pgid(pid) == Some(pid) {
                    if libc::kill(-pid, libc::SIGKILL) == 0 {
                        done.push(format!("killed process group {pid}"));
                    }
                }
                if leader.is_some() && libc::kill(pid, libc::SIGKILL) == 0 {
                    done.push(format!("killed {pid}"));
                }
            }
        }
        wait_gone(&procs, Duration::from_secs(5));
        // Postmasters: immediate shutdown (SIGQUIT stops the backends too), SIGKILL if stuck.
        for d in &postmasters {
            let Some(pid) = postmaster_in(d) else { continue };
            let Some(t) = start_time(pid) else { continue };
            // SAFETY: kill(2) on the postmaster found in its data dir.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGQUIT);
            }
            if !wait_gone(&[(pid, t)], Duration::from_secs(5)) && alive(pid, t) {
                // SAFETY: as above, and it is still the same process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            done.push(format!("stopped the postmaster {pid} of {}", d.display()));
        }
        for n in &namespaces {
            if Path::new("/var/run/netns").join(n).exists() {
                let _ = Command::new("ip").args(["netns", "del", n]).current_dir("/").output();
                done.push(format!("deleted network namespace {n}"));
            }
        }
        for d in &dirs {
            if d.starts_with(std::env::temp_dir()) || d.starts_with("/tmp") {
                if fs::remove_dir_all(d).is_ok() {
                    done.push(format!("removed {}", d.display()));
                }
            }
        }
        done
    }

    fn clean_own() {
        let Some(own) = OWN.get().and_then(Option::as_ref) else { return };
        let path = own.lock().unwrap_or_else(|e| e.into_inner()).0.clone();
        for line in clean(&path) {
            eprintln!("pgfront tests: {line}");
        }
        let _ = fs::remove_file(&path);
    }

    extern "C" fn at_exit() {
        clean_own();
    }

    extern "C" fn on_signal(sig: libc::c_int) {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the fd is the pipe's write end.
        unsafe { libc::write(SIGNAL_PIPE.load(Ordering::Relaxed), (&b as *const u8).cast(), 1) };
    }

    fn install_signal_handlers() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the array; both ends close on exec.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
        let read_end = fds[0];
        let spawned = std::thread::Builder::new().name("pgfront-test-reaper".into()).spawn(move || {
            let mut b = 0u8;
            loop {
                // SAFETY: reads one byte into `b`.
                let n = unsafe { libc::read(read_end, (&mut b as *mut u8).cast(), 1) };
                if n == 1 {
                    break;
                }
                if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            STOPPING.store(true, Ordering::SeqCst);
            eprintln!("pgfront tests: signal {b}: stopping what this test process started");
            clean_own();
            let sig = libc::c_int::from(b);
            // SAFETY: restores the default action and dies of the signal, as without a handler.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::raise(sig);
                libc::_exit(128 + sig);
            }
        });
        if spawned.is_err() {
            return;
        }
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: installs a handler that only writes to a pipe.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }
}
