//! Reload and binary upgrade under load, pgfront next to HAProxy 2.6, in one run on one machine
//! (issue 7, "Report in the closing note").
//!
//! The same client load runs through each front end: a bounded loop opening new connections at a
//! target rate (each a handshake: a PostgreSQL startup packet, echoed), and N long-lived sessions
//! exchanging a message every 100 ms. Backends are echo servers behind Patroni-format keys in a
//! real etcd (`tests/common/echo.rs`). While the load runs, one of five modes reloads the front
//! end, one reload per cadence (0.5 s, or as soon as the previous one is done if it takes longer):
//!
//! 1. pgfront SIGHUP: alternating two valid files (limits and balance changed, a second listener
//!    added then removed); each waits for `/status` `config.revision` to move;
//! 2. pgfront binary upgrade (SIGUSR2); each waits for `/status` `pid` to change;
//! 3. HAProxy classic: a new `haproxy -f cfg -sf <old pids>`;
//! 4. HAProxy master-worker: `haproxy -W`, SIGUSR2 to the master. In 2.6 the master re-executes
//!    itself with `-sf <workers> -x sockpair@<fd>` (management.txt, `-x`; src/haproxy.c
//!    `mworker_reexec`), so this mode is seamless without `expose-fd` (configuration.txt says
//!    `expose-fd listeners` "is not required anymore" in master-worker mode);
//! 5. HAProxy seamless without a master: `stats socket ... expose-fd listeners` and a new
//!    `haproxy -f cfg -x <stats socket> -sf <old pids>`.
//!
//! HAProxy alternates the same two configurations (a plain `mode tcp` listen section, `balance
//! leastconn` / `roundrobin`, server `maxconn` 2000 / 1500, a second listen section added then
//! removed); each of its reloads waits until the stats socket's `show info` names a new `Pid`.
//! Counted per run: failed new connections (refused, reset, no echo within 20 s), broken
//! long-lived sessions, the achieved rate, and for the modes that replace a process, how long each
//! old process lived after the reload that superseded it, and whether it exited at all within
//! 20 s of the end of its sessions (the sessions end when the load stops; pgfront's
//! `drain_timeout` is set to 60 s, HAProxy has no `hard-stop-after`).
//!
//! Rounds are interleaved (mode 1..5, then again), each run on a fresh front end.
//!
//! Run: `cargo bench --bench reload` (5 rounds at 1000 connections/s). Parameters, as flags after
//! `--` or in the environment: `--rate` / `BENCH_RATE` (new connections per second, default 1000),
//! `--sessions` / `BENCH_SESSIONS` (200), `--rounds` / `BENCH_ROUNDS` (5), `--sighups` /
//! `BENCH_SIGHUPS` (50), `--upgrades` / `BENCH_UPGRADES` (10), `--haproxy-reloads` /
//! `BENCH_HAPROXY_RELOADS` (50), `--cadence-ms` / `BENCH_CADENCE_MS` (500), `--modes` /
//! `BENCH_MODES` (comma list of sighup,upgrade,classic,master-worker,seamless).
//! Smoke test (1 round, a few reloads, well under a minute): `cargo bench --bench reload --
//! --quick`, or `PGFRONT_BENCH_QUICK=1 cargo test --bench reload`. The process exits non-zero if
//! a run could not complete, or if pgfront lost a connection or a session or left an old process
//! behind; HAProxy's losses are reported, not judged. Needs etcd-server and haproxy.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::echo::*;
use common::stats::{spread, BenchArgs};
use common::*;
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "reload-bench";
/// How long an old process may take to exit once its sessions have ended.
const EXIT_WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Sighup,
    Upgrade,
    Classic,
    MasterWorker,
    Seamless,
}

impl Mode {
    const ALL: [Mode; 5] = [Mode::Sighup, Mode::Upgrade, Mode::Classic, Mode::MasterWorker, Mode::Seamless];

    fn label(self) -> &'static str {
        match self {
            Mode::Sighup => "pgfront SIGHUP",
            Mode::Upgrade => "pgfront upgrade (SIGUSR2)",
            Mode::Classic => "HAProxy -sf",
            Mode::MasterWorker => "HAProxy -W, SIGUSR2",
            Mode::Seamless => "HAProxy expose-fd, -x -sf",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Mode::Sighup => "sighup",
            Mode::Upgrade => "upgrade",
            Mode::Classic => "classic",
            Mode::MasterWorker => "master-worker",
            Mode::Seamless => "seamless",
        }
    }

    fn is_pgfront(self) -> bool {
        matches!(self, Mode::Sighup | Mode::Upgrade)
    }

    fn replaces_process(self) -> bool {
        self != Mode::Sighup
    }
}

#[derive(Clone, Debug)]
struct Params {
    quick: bool,
    rate: u64,
    sessions: usize,
    rounds: usize,
    sighups: usize,
    upgrades: usize,
    haproxy_reloads: usize,
    cadence: Duration,
    modes: Vec<Mode>,
}

impl Params {
    fn from_env() -> Params {
        let args = BenchArgs::from_env();
        let quick = args.quick;
        let num = |flag: &str, env: &str, full: u64, quick_default: u64| args.num(flag, env, full, quick_default);
        let modes = match args.get("--modes", "BENCH_MODES") {
            Some(list) => list
                .split(',')
                .map(|k| {
                    Mode::ALL.into_iter().find(|m| m.key() == k.trim()).unwrap_or_else(|| panic!("unknown mode {k}"))
                })
                .collect(),
            None => Mode::ALL.to_vec(),
        };
        Params {
            quick,
            rate: num("--rate", "BENCH_RATE", 1000, 1000),
            sessions: num("--sessions", "BENCH_SESSIONS", 200, 200) as usize,
            rounds: num("--rounds", "BENCH_ROUNDS", 5, 1) as usize,
            sighups: num("--sighups", "BENCH_SIGHUPS", 50, 6) as usize,
            upgrades: num("--upgrades", "BENCH_UPGRADES", 10, 3) as usize,
            haproxy_reloads: num("--haproxy-reloads", "BENCH_HAPROXY_RELOADS", 50, 6) as usize,
            cadence: Duration::from_millis(num("--cadence-ms", "BENCH_CADENCE_MS", 500, 500)),
            modes,
        }
    }

    fn reloads(&self, mode: Mode) -> usize {
        match mode {
            Mode::Sighup => self.sighups,
            Mode::Upgrade => self.upgrades,
            _ => self.haproxy_reloads,
        }
    }
}

/// What every run shares: etcd with the Patroni-format keys, the echo backends, the client runtime.
struct Fixture {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
    primary: u16,
    replica: u16,
    _backends: tokio_util::sync::DropGuard,
}

/// A front end under test, started fresh for each run and stopped (with all its processes) on drop.
trait FrontEnd {
    /// The listener every configuration has.
    fn port(&self) -> u16;
    /// The listener that configuration B adds and A removes.
    fn second(&self) -> u16;
    /// Reload number `i` (0-based); returns once the new configuration or process serves, with the
    /// pid it superseded, if any. Panics (the run is recorded as aborted) if it does not.
    fn reload(&mut self, i: usize) -> Option<u32>;
    /// Whether the second listener should answer after reload `i`, if this mode changes it.
    fn second_expected(&self, i: usize) -> Option<bool>;
    fn log_tail(&self) -> String;
}

fn pgfront_config(admin: u16, etcd: &str, rw: u16, ro: u16, b: bool) -> String {
    let (maxconn, balance) = if b { (1500, "roundrobin") } else { (2000, "leastconn") };
    let second = if b {
        format!(
            "\n[[listener]]\nname = \"ro\"\ncluster = \"main\"\nbind = \"127.0.0.1:{ro}\"\nrole = \"replica\"\nserver_maxconn = 2000\n"
        )
    } else {
        String::new()
    };
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[process]
drain_timeout = "60s"
upgrade_timeout = "20s"

[[cluster]]
name = "main"
scope = "{SCOPE}"
etcd_endpoints = ["{etcd}"]

[[listener]]
name = "rw"
cluster = "main"
bind = "127.0.0.1:{rw}"
role = "primary"
server_maxconn = {maxconn}
balance = "{balance}"
queue_timeout = "20s"
{second}"#
    )
}

struct PgfrontFront {
    pf: Pgfront,
    upgrade: bool,
    rw: u16,
    ro: u16,
    configs: [String; 2],
    revision: u64,
    pid: u32,
}

impl PgfrontFront {
    fn start(fx: &Fixture, upgrade: bool) -> PgfrontFront {
        let (admin, rw, ro) = (free_port(), free_port(), free_port());
        let etcd = fx.etcd.endpoint();
        let configs = [pgfront_config(admin, &etcd, rw, ro, false), pgfront_config(admin, &etcd, rw, ro, true)];
        let pf = Pgfront::start(&configs[0], admin);
        wait_for("pgfront to route the primary", Duration::from_secs(20), || pf.primary("main").map(|_| ()));
        let status = pf.status().expect("pgfront /status");
        let revision = status["config"]["revision"].as_u64().expect("config.revision in /status");
        let pid = status["pid"].as_u64().expect("pid in /status") as u32;
        PgfrontFront { pf, upgrade, rw, ro, configs, revision, pid }
    }
}

impl FrontEnd for PgfrontFront {
    fn port(&self) -> u16 {
        self.rw
    }

    fn second(&self) -> u16 {
        self.ro
    }

    fn reload(&mut self, i: usize) -> Option<u32> {
        if self.upgrade {
            // SAFETY: a signal to a pgfront process this bench started (or its successor).
            unsafe { libc::kill(self.pid as i32, libc::SIGUSR2) };
            let old = self.pid;
            let next = wait_for(&format!("upgrade {i}: a new pid in /status"), Duration::from_secs(30), || {
                self.pf.status().and_then(|s| s["pid"].as_u64()).map(|p| p as u32).filter(|p| *p != old)
            });
            self.pid = next;
            Some(old)
        } else {
            std::fs::write(&self.pf.config, &self.configs[usize::from(i % 2 == 0)]).expect("write the config");
            self.pf.proc.signal(libc::SIGHUP);
            self.revision += 1;
            let want = self.revision;
            wait_for(&format!("reload {i}: revision {want}"), Duration::from_secs(20), || {
                let s = self.pf.status()?;
                if let Some(e) = s["config"]["last_error"].as_str() {
                    assert!(s["config"]["revision"].as_u64() >= Some(want), "reload {i} rejected: {e}");
                }
                (s["config"]["revision"].as_u64()? >= want).then_some(())
            });
            None
        }
    }

    fn second_expected(&self, i: usize) -> Option<bool> {
        (!self.upgrade).then_some(i % 2 == 0)
    }

    fn log_tail(&self) -> String {
        self.pf.proc.log_tail(60)
    }
}

struct HaproxyFront {
    mode: Mode,
    bin: PathBuf,
    dir: tempfile::TempDir,
    cfg: PathBuf,
    sock: PathBuf,
    rw: u16,
    ro: u16,
    primary: u16,
    replica: u16,
    /// Every haproxy process this bench started (for -W: only the master), each in its own
    /// process group, stopped on drop.
    procs: Vec<Proc>,
    /// The process that serves now (the worker, under -W).
    current: u32,
}

impl HaproxyFront {
    fn start(fx: &Fixture, mode: Mode) -> HaproxyFront {
        let bin = require("haproxy", "haproxy");
        let dir = tempfile::Builder::new().prefix("pgfront-bench-haproxy-").tempdir().expect("temp dir");
        let cfg = dir.path().join("haproxy.cfg");
        let sock = dir.path().join("stats.sock");
        let mut h = HaproxyFront {
            mode,
            bin,
            cfg,
            sock,
            dir,
            rw: free_port(),
            ro: free_port(),
            primary: fx.primary,
            replica: fx.replica,
            procs: Vec::new(),
            current: 0,
        };
        std::fs::write(&h.cfg, h.config(false)).expect("write the config");
        let args: Vec<String> = match mode {
            Mode::MasterWorker => vec!["-W".into()],
            _ => vec![],
        };
        h.spawn(args);
        let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let pid = wait_for("haproxy's stats socket", Duration::from_secs(20), || h.serving_pid());
            wait_for("haproxy to forward", Duration::from_secs(20), || {
                fx.rt.block_on(handshake(h.rw)).ok().map(|_| ())
            });
            pid
        }));
        match ready {
            Ok(pid) => h.current = pid,
            Err(e) => {
                eprintln!("--- haproxy log ---\n{}", h.log_tail());
                std::panic::resume_unwind(e)
            }
        }
        h
    }

    fn config(&self, b: bool) -> String {
        let (maxconn, balance) = if b { (1500, "roundrobin") } else { (2000, "leastconn") };
        let expose = if self.mode == Mode::Seamless { " expose-fd listeners" } else { "" };
        let mut c = format!(
            "global\n  maxconn 8000\n  stats socket {} mode 600 level admin{expose}\n\
             defaults\n  mode tcp\n  maxconn 8000\n  timeout connect 4s\n  timeout client 30m\n  timeout server 30m\n\
             listen rw\n  bind 127.0.0.1:{}\n  balance {balance}\n  server pg1 127.0.0.1:{} maxconn {maxconn}\n",
            self.sock.display(),
            self.rw,
            self.primary
        );
        if b {
            c.push_str(&format!(
                "listen ro\n  bind 127.0.0.1:{}\n  balance leastconn\n  server pg2 127.0.0.1:{} maxconn 2000\n",
                self.ro, self.replica
            ));
        }
        c
    }

    fn spawn(&mut self, extra: Vec<String>) {
        let n = self.procs.len();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-f").arg(&self.cfg).args(extra);
        let log = self.dir.path().join(format!("haproxy-{n}.log"));
        self.procs.push(Proc::spawn(&format!("haproxy-{n}"), cmd, &log, false));
    }

    /// The pid that answers `show info` on the stats socket: the process that serves now.
    fn serving_pid(&self) -> Option<u32> {
        let mut s = UnixStream::connect(&self.sock).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"show info\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.lines().find_map(|l| l.strip_prefix("Pid: ")).and_then(|p| p.trim().parse().ok())
    }
}

impl FrontEnd for HaproxyFront {
    fn port(&self) -> u16 {
        self.rw
    }

    fn second(&self) -> u16 {
        self.ro
    }

    fn reload(&mut self, i: usize) -> Option<u32> {
        std::fs::write(&self.cfg, self.config(i % 2 == 0)).expect("write the config");
        match self.mode {
            Mode::MasterWorker => self.procs[0].signal(libc::SIGUSR2),
            _ => {
                let mut args = Vec::new();
                if self.mode == Mode::Seamless {
                    args.extend(["-x".to_owned(), self.sock.display().to_string()]);
                }
                // -sf last: its pid list ends at the next option.
                args.push("-sf".into());
                for p in self.procs.iter_mut() {
                    if p.running() {
                        args.push(p.pid().to_string());
                    }
                }
                self.spawn(args);
            }
        }
        let old = self.current;
        self.current =
            wait_for(&format!("reload {i}: a new haproxy pid on the stats socket"), Duration::from_secs(20), || {
                self.serving_pid().filter(|p| *p != old)
            });
        Some(old)
    }

    fn second_expected(&self, i: usize) -> Option<bool> {
        Some(i % 2 == 0)
    }

    fn log_tail(&self) -> String {
        self.procs.iter().rev().take(2).map(|p| format!("--- {} ---\n{}\n", p.name, p.log_tail(30))).collect()
    }
}

/// A process that is gone or a zombie (exited, not yet reaped by its parent).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[derive(Clone, Copy)]
struct Old {
    pid: u32,
    superseded: Instant,
    exited: Option<Instant>,
}

/// Watches superseded processes every 10 ms and notes when each exits.
struct OldProcs {
    list: Arc<Mutex<Vec<Old>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OldProcs {
    fn start() -> OldProcs {
        let list: Arc<Mutex<Vec<Old>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (list.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(mut v) = l.lock() {
                    let now = Instant::now();
                    for o in v.iter_mut().filter(|o| o.exited.is_none()) {
                        if !alive(o.pid) {
                            o.exited = Some(now);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        OldProcs { list, stop, thread: Some(thread) }
    }

    fn add(&self, pid: u32, superseded: Instant) {
        self.list.lock().expect("old process list").push(Old { pid, superseded, exited: None });
    }

    fn snapshot(&self) -> Vec<Old> {
        self.list.lock().expect("old process list").clone()
    }
}

impl Drop for OldProcs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the opener did: connections started, connections it could not start in time (the
/// generator fell more than 200 ms behind), and for how long it ran.
struct Opened {
    started: u64,
    skipped: u64,
    window: Duration,
}

/// New connections through `port` at `rate` per second until `stop` (10 minutes at most), each
/// checked with a handshake. Paced by credit every millisecond, so rates above 1000/s work with
/// tokio's 1 ms timer; it never bursts more than 200 ms worth to catch up.
fn opener(
    rt: &tokio::runtime::Runtime,
    port: u16,
    rate: u64,
    stop: &CancellationToken,
    counts: &Arc<Counts>,
) -> tokio::task::JoinHandle<Opened> {
    let (stop, counts) = (stop.clone(), counts.clone());
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let start = tokio::time::Instant::now();
        let cap = (rate / 5).max(1);
        let (mut started, mut skipped) = (0u64, 0u64);
        while !stop.is_cancelled() && start.elapsed() < Duration::from_secs(600) {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).saturating_sub(skipped);
            if due > started + cap {
                skipped += due - started - cap;
            }
            let due = due.min(started + cap);
            while started < due {
                started += 1;
                let counts = counts.clone();
                counts.in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    match handshake(port).await {
                        Ok(_) => {
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => counts.fail(format!("new connection: {e}")),
                    }
                    counts.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
        Opened { started, skipped, window: start.elapsed() }
    })
}

/// Whether a handshake through `port` succeeds (`want`) or fails (`!want`) within 2 s of polling.
fn listener_state_is(rt: &tokio::runtime::Runtime, port: u16, want: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let ok = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(1), handshake(port)).await })
            .is_ok_and(|r| r.is_ok());
        if ok == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Clone, Debug)]
struct RunResult {
    mode: Mode,
    round: usize,
    reloads: usize,
    reload_secs: f64,
    conns_ok: u64,
    conns_failed: u64,
    started: u64,
    skipped: u64,
    window: f64,
    sessions: usize,
    broken: u64,
    old: usize,
    /// Longest time from a reload to the exit of the process it superseded (s).
    old_max_life: Option<f64>,
    /// Longest time from the end of the sessions to an old process's exit (s).
    old_max_after_end: Option<f64>,
    /// Old processes still alive EXIT_WAIT after the sessions ended.
    old_left: usize,
    /// Reloads after which the second listener did not answer (B) or still answered (A).
    apply_misses: usize,
    errors: Vec<String>,
    aborted: Option<String>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.conns_ok as f64 / self.window.max(1e-9)
    }

    fn line(&self) -> String {
        if let Some(a) = &self.aborted {
            return format!("round {} {:<27} ABORTED: {a}", self.round, self.mode.label());
        }
        let old = match (self.old_max_life, self.old_max_after_end) {
            (Some(l), Some(e)) => format!(
                "; {} old processes: longest lived {l:.1} s, last exit {e:.2} s after the sessions ended, {} left",
                self.old, self.old_left
            ),
            _ if self.old > 0 => format!("; {} old processes, {} never exited", self.old, self.old_left),
            _ => String::new(),
        };
        format!(
            "round {} {:<27} {} reloads in {:.1} s: {} new connections ok ({:.0}/s, {} started, {} skipped by the generator), {} failed; {} sessions, {} broken; {} apply misses{old}",
            self.round,
            self.mode.label(),
            self.reloads,
            self.reload_secs,
            self.conns_ok,
            self.rate(),
            self.started,
            self.skipped,
            self.conns_failed,
            self.sessions,
            self.broken,
            self.apply_misses,
        )
    }

    /// What would make the issue's goal fail for pgfront.
    fn pgfront_bad(&self) -> bool {
        self.mode.is_pgfront()
            && (self.aborted.is_some()
                || self.conns_failed > 0
                || self.broken > 0
                || self.old_left > 0
                || self.apply_misses > 0)
    }
}

fn run_once(fx: &Fixture, p: &Params, mode: Mode, round: usize) -> RunResult {
    let mut front: Box<dyn FrontEnd> = match mode {
        Mode::Sighup => Box::new(PgfrontFront::start(fx, false)),
        Mode::Upgrade => Box::new(PgfrontFront::start(fx, true)),
        _ => Box::new(HaproxyFront::start(fx, mode)),
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_and_reload(fx, p, mode, round, &mut *front)));
    match r {
        Ok(r) => r,
        Err(e) => {
            eprintln!("--- {} log (tail) ---\n{}", mode.label(), front.log_tail());
            std::panic::resume_unwind(e)
        }
    }
}

fn load_and_reload(fx: &Fixture, p: &Params, mode: Mode, round: usize, front: &mut dyn FrontEnd) -> RunResult {
    let port = front.port();
    let stop = CancellationToken::new();
    // On a panic, the load stops with the run.
    let _stop_load = stop.clone().drop_guard();
    let sessions = Arc::new(Counts::default());
    let long = long_lived(&fx.rt, port, p.sessions, &stop, &sessions);
    let conns = Arc::new(Counts::default());
    let opener = opener(&fx.rt, port, p.rate, &stop, &conns);
    // Every session established (about three round trips each) before the first reload.
    let n = p.sessions as u64;
    wait_for("the long-lived sessions", Duration::from_secs(30), || {
        let failed = sessions.failed.load(Ordering::Relaxed);
        (sessions.ok.load(Ordering::Relaxed) >= 3 * n.saturating_sub(failed)).then_some(())
    });

    let olds = OldProcs::start();
    let reloads = p.reloads(mode);
    let mut apply_misses = 0;
    let began = Instant::now();
    for i in 0..reloads {
        let t = Instant::now();
        if let Some(old) = front.reload(i) {
            olds.add(old, t);
        }
        if let Some(want) = front.second_expected(i) {
            if !listener_state_is(&fx.rt, front.second(), want) {
                apply_misses += 1;
            }
        }
        if let Some(rest) = (t + p.cadence).checked_duration_since(Instant::now()) {
            std::thread::sleep(rest);
        }
    }
    let reload_secs = began.elapsed().as_secs_f64();
    // The load goes on for a moment on the last configuration / process.
    std::thread::sleep(Duration::from_secs(1));
    stop.cancel();
    let opened = fx.rt.block_on(opener).expect("the opener task");
    for h in long {
        fx.rt.block_on(h).expect("a long-lived session task");
    }
    let sessions_end = Instant::now();
    wait_for("the last new connections", Duration::from_secs(30), || {
        (conns.in_flight.load(Ordering::Relaxed) == 0).then_some(())
    });
    // Old processes: each should exit once its sessions have ended.
    let deadline = sessions_end + EXIT_WAIT;
    while Instant::now() < deadline && olds.snapshot().iter().any(|o| o.exited.is_none()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let old = olds.snapshot();
    let lives: Vec<f64> =
        old.iter().filter_map(|o| o.exited.map(|e| e.duration_since(o.superseded).as_secs_f64())).collect();
    let after_end: Vec<f64> =
        old.iter().filter_map(|o| o.exited.map(|e| e.saturating_duration_since(sessions_end).as_secs_f64())).collect();
    let max = |v: &[f64]| v.iter().cloned().reduce(f64::max);
    let mut errors: Vec<String> = conns.errors.lock().map(|e| e.clone()).unwrap_or_default();
    errors.extend(sessions.errors.lock().map(|e| e.clone()).unwrap_or_default());
    RunResult {
        mode,
        round,
        reloads,
        reload_secs,
        conns_ok: conns.ok.load(Ordering::Relaxed),
        conns_failed: conns.failed.load(Ordering::Relaxed),
        started: opened.started,
        skipped: opened.skipped,
        window: opened.window.as_secs_f64(),
        sessions: p.sessions,
        broken: sessions.failed.load(Ordering::Relaxed),
        old: old.len(),
        old_max_life: if old.is_empty() { None } else { max(&lives) },
        old_max_after_end: if old.is_empty() { None } else { max(&after_end) },
        old_left: old.iter().filter(|o| o.exited.is_none()).count(),
        apply_misses,
        errors,
        aborted: None,
    }
}

fn report(p: &Params, results: &[RunResult]) {
    println!("\n== per mode: median [min–max] over the rounds");
    let mut rows = Vec::new();
    for mode in &p.modes {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.mode == *mode && r.aborted.is_none()).collect();
        let aborted = results.iter().filter(|r| r.mode == *mode && r.aborted.is_some()).count();
        let failed = spread(&runs.iter().map(|r| r.conns_failed as f64).collect::<Vec<_>>(), 0);
        let broken = spread(&runs.iter().map(|r| r.broken as f64).collect::<Vec<_>>(), 0);
        let rate = spread(&runs.iter().map(|r| r.rate()).collect::<Vec<_>>(), 0);
        let life = spread(&runs.iter().filter_map(|r| r.old_max_life).collect::<Vec<_>>(), 1);
        let after = spread(&runs.iter().filter_map(|r| r.old_max_after_end).collect::<Vec<_>>(), 2);
        let total_ok: u64 = runs.iter().map(|r| r.conns_ok).sum();
        let total_failed: u64 = runs.iter().map(|r| r.conns_failed).sum();
        let old: usize = runs.iter().map(|r| r.old).sum();
        let left: usize = runs.iter().map(|r| r.old_left).sum();
        let misses: usize = runs.iter().map(|r| r.apply_misses).sum();
        println!(
            "{} ({} rounds × {} reloads{}): failed new connections {failed} (total {total_failed} of {}); broken sessions {broken} of {} per round; achieved new connections/s {rate}; old-process lifetime (longest per round, s) {life}, exit after the sessions ended (s) {after}; old processes {old}, still alive {}s after their sessions: {left}; apply misses {misses}",
            mode.label(),
            runs.len(),
            p.reloads(*mode),
            if aborted > 0 { format!(", {aborted} ABORTED") } else { String::new() },
            total_ok + total_failed,
            p.sessions,
            EXIT_WAIT.as_secs(),
        );
        rows.push((
            mode.label(),
            runs.len(),
            p.reloads(*mode),
            total_ok,
            failed,
            broken,
            rate,
            life,
            after,
            left,
            mode.replaces_process(),
        ));
    }
    println!(
        "\n== reload under load: {} new connections/s target, {} long-lived sessions (1 message / 100 ms), one reload per {} ms at most",
        p.rate,
        p.sessions,
        p.cadence.as_millis()
    );
    println!(
        "| {:<26} | {:>6} | {:>7} | {:>9} | {:>16} | {:>16} | {:>18} | {:>22} | {:>24} | {:>8} |",
        "mode",
        "rounds",
        "reloads",
        "conns ok",
        "failed conns",
        "broken sessions",
        "achieved conn/s",
        "old-proc lifetime (s)",
        "exit after sessions (s)",
        "old left"
    );
    println!(
        "|{:-<28}|{:->8}|{:->9}|{:->11}|{:->18}|{:->18}|{:->20}|{:->24}|{:->26}|{:->10}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for (label, n, reloads, ok, failed, broken, rate, life, after, left, replaces) in rows {
        println!(
            "| {label:<26} | {n:>6} | {reloads:>7} | {ok:>9} | {failed:>16} | {broken:>16} | {rate:>18} | {life:>22} | {after:>24} | {:>8} |",
            if replaces { left.to_string() } else { "—".into() }
        );
    }
}

fn main() {
    let p = Params::from_env();
    if !p.quick && !BenchArgs::from_env().bench_requested() {
        println!(
            "reload bench: skipped (run it with `cargo bench --bench reload`, or `PGFRONT_BENCH_QUICK=1` for the smoke run)"
        );
        return;
    }
    if !bench(&p) {
        std::process::exit(1);
    }
}

/// Runs every round and reports; false if a run aborted or pgfront lost anything.
fn bench(p: &Params) -> bool {
    raise_fd_limit();
    let hv = Command::new(require("haproxy", "haproxy")).arg("-v").output().expect("haproxy -v");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "reload bench{}: {p:?}\n{}cpus: {}, load average at start: {}",
        if p.quick { " (quick)" } else { "" },
        String::from_utf8_lossy(&hv.stdout).lines().next().unwrap_or("haproxy ?").to_owned() + "\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.trim()
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let etcd = Etcd::start();
    let backends = CancellationToken::new();
    let (primary, replica) =
        rt.block_on(async { (echo_server(backends.clone()).await, echo_server(backends.clone()).await) });
    rt.block_on(put_keys(&etcd.endpoint(), SCOPE, primary, replica));
    let fx = Fixture { rt, etcd, primary, replica, _backends: backends.drop_guard() };

    let mut results = Vec::new();
    for round in 0..p.rounds {
        for &mode in &p.modes {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_once(&fx, p, mode, round)));
            let r = r.unwrap_or_else(|e| {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                RunResult {
                    mode,
                    round,
                    reloads: 0,
                    reload_secs: 0.0,
                    conns_ok: 0,
                    conns_failed: 0,
                    started: 0,
                    skipped: 0,
                    window: 0.0,
                    sessions: p.sessions,
                    broken: 0,
                    old: 0,
                    old_max_life: None,
                    old_max_after_end: None,
                    old_left: 0,
                    apply_misses: 0,
                    errors: vec![],
                    aborted: Some(why),
                }
            });
            println!("{}", r.line());
            for e in r.errors.iter().take(5) {
                println!("    {e}");
            }
            results.push(r);
        }
    }
    report(p, &results);
    let bad: Vec<&RunResult> = results.iter().filter(|r| r.pgfront_bad() || r.aborted.is_some()).collect();
    for r in &bad {
        println!("NOT OK: {}", r.line());
    }
    bad.is_empty()
}
