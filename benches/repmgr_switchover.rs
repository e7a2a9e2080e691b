//! `repmgr standby switchover` under writes, three client routes side by side in the same run
//! (issue 8, "Report in the closing note"): pgfront routing by agent keys, HAProxy 2.6 with the
//! usual `pg_is_in_recovery` check, and libpq's multi-host connection string.
//!
//! The cluster is the repmgr guard of the integration tests (`tests/common/repmgr.rs`: PostgreSQL
//! 15, a primary and two streaming replicas, repmgr 5.3), a `pgfront agent` beside each node
//! (`tests/common/agent.rs`) and pgfront with `source = "agent"` (primary listener,
//! `queue_timeout = "60s"`). Each round runs `repmgr standby switchover --siblings-follow` on the
//! candidate (pg2, then pg1, then pg2 …: rounds go back and forth) while three writers run at once:
//!
//! 1. **pgfront**: `write_loop` (tests/common) through pgfront's primary listener;
//! 2. **HAProxy**: the same `write_loop` through an HAProxy 2.6 `listen` section set up as a DBA
//!    does for a repmgr cluster without Patroni: `balance leastconn`, every node a server with
//!    `check inter 2s fall 2 rise 1 on-marked-down shutdown-sessions`, `option external-check` and
//!    `external-check command` running a script that does `psql -tAc 'select pg_is_in_recovery()'`
//!    against the server (`PGCONNECT_TIMEOUT=2`) and exits 0 only on `f` (global `external-check`
//!    and `insecure-fork-wanted`; check timeout = `inter`, HAProxy's default);
//! 3. **libpq multi-host**: a small Python writer (psycopg2, i.e. libpq) with
//!    `host=127.0.0.1,127.0.0.1,127.0.0.1 port=<the three nodes> target_session_attrs=read-write`.
//!
//! The writers' semantics are the same: one fresh connection per write (`INSERT INTO pgfront_probe
//! DEFAULT VALUES RETURNING inet_server_port()`, autocommit, then close), one attempt every 10 ms
//! (or as soon as the previous attempt ends if it took longer), `connect_timeout=60` in the
//! connection string (per host for libpq), no statement timeout, and after any failure simply the
//! next attempt. Each counts failed attempts by kind — connect failed (refused, timed out, an error
//! during startup, or for libpq no read-write host), refused read-only (SQLSTATE 25006), broken
//! session (any other error after connecting) — and the longest gap between two successful writes.
//! A round ends 3 s after pgfront and HAProxy both route to the new primary; the table says per
//! route whether its last write went to the new primary.
//!
//! Measured 2026-11-30 (`cargo bench --bench repmgr_switchover`, 2 loaded cores, 5 rounds,
//! median [min–max] per round): pgfront 0 connect failures, 0 read-only, 0 [0–1] broken (the
//! write in flight on the old primary at its shutdown), longest gap 0.229 [0.188–0.308] s;
//! HAProxy 5 [4–6] connect failures, 124 [69–162] read-only, 1 [0–1] broken, gap 1.805
//! [1.681–2.287] s; libpq multi-host 13 [10–21] connect failures ("no read-write host"), 0
//! read-only, gap 0.180 [0.170–0.260] s. Fencing: `pre_promote` took 11 [10–14] ms; candidate
//! writable after 2.27 [2.01–2.46] s with it, 2.24 [1.98–2.34] s without; pgfront's gap 1.574
//! vs 1.596 s, no failed write either way.
//!
//! A second mode, `fencing` (see `mod fencing` below), measures how long `pgfront agent
//! pre-promote` adds to a Patroni switchover: two Patroni clusters, with and without
//! `pre_promote`, rounds interleaved.
//!
//! Run: `cargo bench --bench repmgr_switchover` (both modes, 5 rounds each). Flags after `--` or
//! the environment: `--rounds N` / `BENCH_ROUNDS`, `--mode repmgr|fencing|all` / `BENCH_MODE`
//! (default all). Smoke run (1 round of each mode, under a minute on 2 cores, the clusters' setup
//! included): `cargo bench --bench repmgr_switchover -- --quick`, or `PGFRONT_BENCH_QUICK=1 cargo
//! test --bench repmgr_switchover`. Figures are reported, not judged; the process exits non-zero
//! only if a round could not run. Runs as root; needs postgresql-15, postgresql-15-repmgr,
//! etcd-server, haproxy, patroni, python3-psycopg2.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::agent::Agent;
use common::repmgr::Repmgr;
use common::stats::{spread, BenchArgs};
use common::*;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "main";
const SCOPE: &str = "pgfront-repmgr-bench";
const EVERY: Duration = Duration::from_millis(10);
/// Writes kept going after both proxies route to the new primary.
const TAIL: Duration = Duration::from_secs(3);
const ROUTES: [&str; 3] = ["pgfront", "HAProxy pg_is_in_recovery", "libpq multi-host"];

/// The libpq writer: the same loop as `write_loop`, stopping at EOF on stdin, its figures as JSON.
const PY_WRITER: &str = r#"
import json, sys, threading, time
import psycopg2
dsn, every, limit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
stop = threading.Event()
def watch():
    sys.stdin.read()
    stop.set()
threading.Thread(target=watch, daemon=True).start()
st = {"ok": 0, "connect_failures": 0, "read_only": 0, "broken": 0, "max_gap": 0.0, "last_port": None, "errors": []}
start = time.monotonic()
last_ok = start
def err(kind, e):
    if len(st["errors"]) < 50:
        st["errors"].append("%.3fs %s: %s" % (time.monotonic() - start, kind, str(e).strip().replace("\n", " | ")))
while not stop.is_set() and time.monotonic() - start < limit:
    tick = time.monotonic()
    try:
        conn = psycopg2.connect(dsn)
    except Exception as e:
        st["connect_failures"] += 1
        err("connect", e)
    else:
        try:
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("INSERT INTO pgfront_probe DEFAULT VALUES RETURNING inet_server_port()")
            port = cur.fetchone()[0]
            now = time.monotonic()
            st["ok"] += 1
            st["max_gap"] = max(st["max_gap"], now - last_ok)
            last_ok = now
            st["last_port"] = port
        except psycopg2.Error as e:
            if e.pgcode == "25006":
                st["read_only"] += 1
                err("read-only", e)
            else:
                st["broken"] += 1
                err("session", e)
        finally:
            try:
                conn.close()
            except Exception:
                pass
    d = tick + every - time.monotonic()
    if d > 0:
        time.sleep(d)
print(json.dumps(st))
"#;

/// One route's figures in one round.
#[derive(Debug, Default, Clone)]
struct Route {
    ok: u64,
    connect: u64,
    read_only: u64,
    broken: u64,
    max_gap: f64,
    /// Whether the last successful write went to the new primary.
    resumed: bool,
    errors: Vec<String>,
}

impl Route {
    fn from_stats(st: &WriteStats, new_primary: u16) -> Route {
        Route {
            ok: st.ok,
            connect: st.connect_failures,
            read_only: st.read_only,
            broken: st.broken,
            max_gap: st.max_gap.as_secs_f64(),
            resumed: st.writes.last().is_some_and(|w| w.1 == new_primary),
            errors: st.errors.clone(),
        }
    }

    fn line(&self) -> String {
        format!(
            "{:>6} ok, connect failed {:>4}, read-only {:>4}, broken {:>3}, longest gap {:>6.3} s{}",
            self.ok,
            self.connect,
            self.read_only,
            self.broken,
            self.max_gap,
            if self.resumed { "" } else { ", NOT resumed on the new primary" }
        )
    }
}

struct RoundResult {
    round: usize,
    from: String,
    to: String,
    /// How long `repmgr standby switchover` ran.
    switchover: f64,
    routes: Vec<Route>,
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    _etcd: Etcd,
    rm: Repmgr,
    _agents: Vec<Agent>,
    pf: Pgfront,
    rw: u16,
    haproxy: Haproxy,
    python: PathBuf,
}

/// HAProxy 2.6 in front of the three nodes, checked with `pg_is_in_recovery()`.
struct Haproxy {
    _dir: tempfile::TempDir,
    _proc: Proc,
    port: u16,
    sock: PathBuf,
}

impl Haproxy {
    fn start(rm: &Repmgr) -> Haproxy {
        let bin = require("haproxy", "haproxy");
        let psql = require("/usr/bin/psql", "postgresql-client-15");
        let dir = temp_dir("pgfront-bench-repmgr-haproxy-");
        let port = free_port();
        let sock = dir.path().join("stats.sock");
        let script = dir.path().join("pg-is-primary.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# HAProxy external check ($3 server address, $4 server port): up only on a primary.\n\
                 r=$(PGCONNECT_TIMEOUT=2 {} -X -h \"$3\" -p \"$4\" -U postgres -d postgres -tAc 'select pg_is_in_recovery()' 2>/dev/null)\n\
                 [ \"$r\" = f ]\n",
                psql.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let servers: String =
            rm.nodes.iter().map(|n| format!("  server {} 127.0.0.1:{} check\n", n.name, n.port)).collect();
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 2000\n  external-check\n  insecure-fork-wanted\n  stats socket {sock} level admin\n\
                 defaults\n  mode tcp\n  timeout connect 4s\n  timeout client 60s\n  timeout server 60s\n\
                 listen pg_rw\n  bind 127.0.0.1:{port}\n  balance leastconn\n  option external-check\n\
                 \x20 external-check path \"/usr/bin:/bin\"\n  external-check command {script}\n\
                 \x20 default-server inter 2s fall 2 rise 1 on-marked-down shutdown-sessions\n{servers}",
                sock = sock.display(),
                script = script.display(),
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["-db", "-f", cfg.to_str().unwrap()]);
        let proc = Proc::spawn("haproxy", cmd, &dir.path().join("haproxy.log"), false);
        let h = Haproxy { _dir: dir, _proc: proc, port, sock };
        wait_for("haproxy's stats socket", Duration::from_secs(20), || h.up_servers());
        h
    }

    /// The servers HAProxy has UP (`show stat`), or None when the socket does not answer.
    fn up_servers(&self) -> Option<Vec<String>> {
        let mut s = UnixStream::connect(&self.sock).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let mut up: Vec<String> = out
            .lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > 17 && f[0] == "pg_rw" && f[1] != "FRONTEND" && f[1] != "BACKEND")
            .filter(|f| f[17].starts_with("UP"))
            .map(|f| f[1].to_owned())
            .collect();
        up.sort();
        Some(up)
    }

    fn wait_only_up(&self, name: &str, limit: Duration) {
        wait_for(&format!("HAProxy: only {name} UP"), limit, || {
            (self.up_servers()? == [name.to_owned()]).then_some(())
        });
    }
}

fn setup() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let python = require("/usr/bin/python3", "python3 python3-psycopg2");
    let ok = Command::new(&python).args(["-c", "import psycopg2"]).status().is_ok_and(|s| s.success());
    assert!(ok, "python3 cannot import psycopg2: install it with `apt-get install python3-psycopg2`");
    let (etcd, rm, agents) = common::repmgr::with_agents(SCOPE, 10);
    let (rw, admin) = (free_port(), free_port());
    let config = cluster_config(admin, CLUSTER, SCOPE, &etcd.endpoint(), "source = \"agent\"")
        + &listener_config(CLUSTER, "rw", rw, "primary", "60s");
    let pf = Pgfront::start(&config, admin);
    let haproxy = Haproxy::start(&rm);
    Fixture { rt, _etcd: etcd, rm, _agents: agents, pf, rw, haproxy, python }
}

/// Starts the libpq writer; it stops when its stdin closes.
fn start_python(fx: &Fixture) -> Child {
    let hosts = vec!["127.0.0.1"; fx.rm.nodes.len()].join(",");
    let ports: Vec<String> = fx.rm.nodes.iter().map(|n| n.port.to_string()).collect();
    let dsn = format!(
        "host={hosts} port={} user=postgres dbname=postgres connect_timeout=60 target_session_attrs=read-write",
        ports.join(",")
    );
    let mut cmd = Command::new(&fx.python);
    cmd.args(["-c", PY_WRITER, &dsn, &EVERY.as_secs_f64().to_string(), "600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .current_dir(std::env::temp_dir());
    spawn_child(cmd).expect("cannot start python3")
}

fn finish_python(mut child: Child, new_primary: u16) -> Route {
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("python writer");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("python writer: no JSON ({e}): {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Route {
        ok: n("ok"),
        connect: n("connect_failures"),
        read_only: n("read_only"),
        broken: n("broken"),
        max_gap: v["max_gap"].as_f64().unwrap_or(0.0),
        resumed: v["last_port"].as_u64() == Some(u64::from(new_primary)),
        errors: v["errors"]
            .as_array()
            .map_or_else(Vec::new, |a| a.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect()),
    }
}

fn run_round(fx: &Fixture, round: usize, from: &str, to: &str) -> RoundResult {
    fx.rm.wait_streaming(from, Duration::from_secs(60));
    fx.pf.wait_primary(CLUSTER, from, Duration::from_secs(30));
    fx.haproxy.wait_only_up(from, Duration::from_secs(30));
    let stop = CancellationToken::new();
    let limit = Duration::from_secs(600);
    let via_pgfront = fx.rt.spawn(write_loop(conninfo(fx.rw), EVERY, stop.clone(), limit));
    let via_haproxy = fx.rt.spawn(write_loop(conninfo(fx.haproxy.port), EVERY, stop.clone(), limit));
    let via_libpq = start_python(fx);
    // Let every writer settle on the old primary first.
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let out = fx.rm.try_repmgr(fx.rm.node(to), &["standby", "switchover", "--siblings-follow"]);
    let switchover = t0.elapsed().as_secs_f64();
    let routed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let out = out.map_err(|e| format!("repmgr standby switchover to {to}: {e}"))?;
        if !out.contains("switchover was successful") {
            return Err(format!("repmgr standby switchover to {to} did not report success:\n{out}"));
        }
        fx.pf.wait_primary(CLUSTER, to, Duration::from_secs(30));
        fx.haproxy.wait_only_up(to, Duration::from_secs(30));
        std::thread::sleep(TAIL);
        Ok(())
    }));
    stop.cancel();
    let new_primary = fx.rm.node(to).port;
    let libpq = finish_python(via_libpq, new_primary);
    let pgfront = fx.rt.block_on(via_pgfront).expect("pgfront writer");
    let haproxy = fx.rt.block_on(via_haproxy).expect("haproxy writer");
    match routed {
        Ok(Ok(())) => {}
        Ok(Err(why)) => panic!("{why}"),
        Err(p) => std::panic::resume_unwind(p),
    }
    RoundResult {
        round,
        from: from.to_owned(),
        to: to.to_owned(),
        switchover,
        routes: vec![Route::from_stats(&pgfront, new_primary), Route::from_stats(&haproxy, new_primary), libpq],
    }
}

fn report(results: &[RoundResult]) {
    println!(
        "\nrepmgr standby switchover --siblings-follow, {} round(s), 3 writers at once (one write per 10 ms each)",
        results.len()
    );
    println!("per route, median [min–max] over rounds, total in parentheses:");
    println!(
        "{:<27} {:>22} {:>22} {:>20} {:>26} {:>9} {:>8}",
        "route", "connect failed", "read-only (25006)", "broken session", "longest gap (s)", "writes ok", "resumed"
    );
    for (i, name) in ROUTES.iter().enumerate() {
        let col = |f: &dyn Fn(&Route) -> u64| {
            let v: Vec<f64> = results.iter().map(|r| f(&r.routes[i]) as f64).collect();
            let total: u64 = results.iter().map(|r| f(&r.routes[i])).sum();
            format!("{} ({total})", spread(&v, 0))
        };
        let gaps: Vec<f64> = results.iter().map(|r| r.routes[i].max_gap).collect();
        let ok: u64 = results.iter().map(|r| r.routes[i].ok).sum();
        let resumed = results.iter().filter(|r| r.routes[i].resumed).count();
        println!(
            "{:<27} {:>22} {:>22} {:>20} {:>26} {:>9} {:>8}",
            name,
            col(&|r| r.connect),
            col(&|r| r.read_only),
            col(&|r| r.broken),
            spread(&gaps, 3),
            ok,
            format!("{resumed}/{}", results.len())
        );
    }
    let sw: Vec<f64> = results.iter().map(|r| r.switchover).collect();
    println!("repmgr standby switchover duration (s): {}", spread(&sw, 2));
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// repmgr switchover: pgfront, HAProxy, libpq multi-host.
    Repmgr,
    /// Patroni switchover with and without `pre_promote` fencing.
    Fencing,
}

struct Params {
    quick: bool,
    rounds: usize,
    modes: Vec<Mode>,
}

impl Params {
    fn from_env() -> Params {
        let args = BenchArgs::from_env();
        let quick = args.quick;
        let rounds = args.num("--rounds", "BENCH_ROUNDS", 5, 1) as usize;
        let modes = match args.get("--mode", "BENCH_MODE").as_deref() {
            Some("repmgr") => vec![Mode::Repmgr],
            Some("fencing") => vec![Mode::Fencing],
            None | Some("all") => vec![Mode::Repmgr, Mode::Fencing],
            Some(other) => panic!("--mode / BENCH_MODE: repmgr, fencing or all, not {other}"),
        };
        Params { quick, rounds: if quick { 1 } else { rounds }, modes }
    }
}

fn main() {
    let p = Params::from_env();
    if !p.quick && !BenchArgs::from_env().bench_requested() {
        println!(
            "repmgr_switchover bench: skipped (run it with `cargo bench --bench repmgr_switchover`, or \
             `PGFRONT_BENCH_QUICK=1` for the one-round smoke run)"
        );
        return;
    }
    println!(
        "repmgr_switchover bench{}: {} round(s), modes {:?}\ncpus: {}, load average at start: {}",
        if p.quick { " (quick)" } else { "" },
        p.rounds,
        p.modes,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    let mut ok = true;
    for mode in &p.modes {
        ok &= match mode {
            Mode::Repmgr => repmgr_bench(&p),
            Mode::Fencing => fencing::bench(&p),
        };
    }
    if !ok {
        std::process::exit(1);
    }
}

/// The repmgr comparison; false if a round could not run.
fn repmgr_bench(p: &Params) -> bool {
    let hv = Command::new(require("haproxy", "haproxy")).arg("-v").output().expect("haproxy -v");
    println!("{}", String::from_utf8_lossy(&hv.stdout).lines().next().unwrap_or("haproxy ?"));
    let t = Instant::now();
    let fx = setup();
    println!("cluster, agents, pgfront and HAProxy ready in {:.1} s", t.elapsed().as_secs_f64());
    let mut results = Vec::new();
    let mut aborted = 0;
    for round in 0..p.rounds {
        let (from, to) = if round % 2 == 0 { ("pg1", "pg2") } else { ("pg2", "pg1") };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_round(&fx, round, from, to)));
        match r {
            Ok(r) => {
                println!("round {} {} -> {}: repmgr switchover {:.2} s", r.round, r.from, r.to, r.switchover);
                for (name, route) in ROUTES.iter().zip(&r.routes) {
                    println!("  {name:<27} {}", route.line());
                    for e in route.errors.iter().take(4) {
                        println!("      {e}");
                    }
                }
                results.push(r);
            }
            Err(e) => {
                let why = panic_message(&e);
                println!("round {round} {from} -> {to}: ABORTED: {why}");
                println!("--- pgfront log (last 30 lines) ---\n{}", fx.pf.proc.log_tail(30));
                println!("{}", fx.rm.log_tails(20));
                aborted += 1;
                // The cluster's state is unknown: later rounds would measure something else.
                break;
            }
        }
    }
    if !results.is_empty() {
        report(&results);
    }
    println!("total time {:.1} s", t.elapsed().as_secs_f64());
    aborted == 0
}

/// `--mode fencing`: how long `pgfront agent pre-promote` adds to a Patroni switchover. Two
/// Patroni 3.0 clusters on the same etcd, identical but for `postgresql.pre_promote: pgfront
/// agent pre-promote -c <agent.toml>` (`timeout = "5s"`, `on_timeout = "refuse"`) on one of them;
/// an agent beside every member of both; one pgfront routing both by Patroni's keys (a primary
/// listener each, `queue_timeout = "90s"`), registered for fencing in both scopes (it is asked to
/// fence only by the cluster with `pre_promote`). Rounds are interleaved (with, without, then
/// without, with, …); each runs `patronictl switchover --force` from the leader to a replica while
/// `write_loop` writes every 10 ms through pgfront, and measures the time from the start of
/// `patronictl switchover` until the candidate accepts an INSERT (polled directly every 10 ms,
/// 1 s connect timeout), patronictl's own duration, the longest write gap through pgfront and
/// the failed writes, and for the fenced cluster the fence's own duration as `pre-promote` logs it.
mod fencing {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    use super::common::agent::Agent;
    use super::common::*;
    use super::{spread, Params};
    use tokio_util::sync::CancellationToken;

    const FENCED: &str = "fenced";
    const PLAIN: &str = "plain";

    struct Variant {
        cluster: &'static str,
        label: &'static str,
        pg: Patroni,
        rw: u16,
    }

    struct Round {
        /// patronictl start → the candidate takes an INSERT.
        writable: f64,
        patronictl: f64,
        gap: f64,
        failed: (u64, u64, u64),
        /// The fence's duration as pre-promote logged it (ms).
        fence_ms: Option<f64>,
    }

    fn logs(pg: &Patroni) -> Vec<String> {
        pg.members
            .iter()
            .flat_map(|m| {
                fs::read_to_string(pg.dir.path().join(format!("{}.log", m.name)))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("acknowledged by every proxy"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// "… in 12 ms; promotion proceeds" → 12.
    fn fence_ms(line: &str) -> Option<f64> {
        let head = &line[..line.rfind(" ms;")?];
        head.rsplit(' ').next()?.parse().ok()
    }

    async fn writable(port: u16) -> bool {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1").port(port).user("postgres").password("postgres").dbname("postgres");
        c.connect_timeout(Duration::from_secs(1));
        let Ok((client, conn)) = c.connect(tokio_postgres::NoTls).await else { return false };
        tokio::spawn(conn);
        client.simple_query("INSERT INTO pgfront_probe DEFAULT VALUES").await.is_ok()
    }

    fn round(rt: &tokio::runtime::Runtime, pf: &Pgfront, v: &Variant) -> Round {
        v.pg.wait_healthy(Duration::from_secs(90));
        let old = v.pg.leader().expect("a leader");
        pf.wait_primary(v.cluster, &old.name, Duration::from_secs(30));
        let mut replicas: Vec<ClusterMember> =
            v.pg.cluster().expect("cluster").into_iter().filter(|m| m.role == "replica").collect();
        replicas.sort_by(|a, b| a.name.cmp(&b.name));
        let cand = replicas.first().expect("a replica").clone();
        v.pg.wait_replicated(cand.port, "pgfront_probe");
        let acks_before = logs(&v.pg).len();
        let stop = CancellationToken::new();
        let writer =
            rt.spawn(write_loop(conninfo(v.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(300)));
        std::thread::sleep(Duration::from_secs(1));
        let t0 = Instant::now();
        let (writable_at, switched) = std::thread::scope(|s| {
            let ctl = s.spawn(|| {
                let r = v.pg.try_switchover(&old.name, &cand.name);
                (r, t0.elapsed().as_secs_f64())
            });
            let deadline = t0 + Duration::from_secs(120);
            let mut at = None;
            while Instant::now() < deadline {
                let tick = Instant::now();
                if rt.block_on(writable(cand.port)) {
                    at = Some(t0.elapsed().as_secs_f64());
                    break;
                }
                std::thread::sleep((tick + Duration::from_millis(10)).saturating_duration_since(Instant::now()));
            }
            (at, ctl.join().expect("patronictl thread"))
        });
        let (out, patronictl) = switched;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            out.unwrap_or_else(|t| panic!("patronictl switchover {} -> {}: {t}", old.name, cand.name));
            pf.wait_primary(v.cluster, &cand.name, Duration::from_secs(30));
            std::thread::sleep(Duration::from_secs(2));
        }));
        stop.cancel();
        let st = rt.block_on(writer).expect("writer");
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        let writable = writable_at.unwrap_or_else(|| panic!("{} never took a write within 120 s", cand.name));
        let acks = logs(&v.pg);
        let fence = (acks.len() > acks_before).then(|| acks.last().and_then(|l| fence_ms(l))).flatten();
        for e in st.errors.iter().take(4) {
            println!("      {e}");
        }
        Round {
            writable,
            patronictl,
            gap: st.max_gap.as_secs_f64(),
            failed: (st.connect_failures, st.read_only, st.broken),
            fence_ms: fence,
        }
    }

    /// Runs the interleaved rounds and reports; false if a round could not run.
    pub(super) fn bench(p: &Params) -> bool {
        let t = Instant::now();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let etcd = Etcd::start();
        let hosts = [format!("127.0.0.1:{}", etcd.port)];
        let fenced = Patroni::start_with_pre_promote(
            &hosts,
            "pgfront-bench-fenced",
            Dcs::Etcd3,
            Some("{dir}/pgfront agent pre-promote -c {dir}/{name}-agent.toml"),
        );
        let plain = Patroni::start_with_pre_promote(&hosts, "pgfront-bench-plain", Dcs::Etcd3, None);
        let bin = fenced.dir.path().join("pgfront");
        fs::copy(pgfront_bin(), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let mut agents: Vec<Agent> = Vec::new();
        for pg in [&fenced, &plain] {
            for m in &pg.members {
                let a = Agent::start(&etcd.endpoint(), &pg.scope, &m.name, m.pg_port, 10);
                let conf = pg.dir.path().join(format!("{}-agent.toml", a.name));
                let text = fs::read_to_string(&a.config).unwrap()
                    + "\n[pre_promote]\ntimeout = \"5s\"\non_timeout = \"refuse\"\n";
                fs::write(&conf, text).unwrap();
                fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
                agents.push(a);
            }
        }
        let (admin, rw_f, rw_p) = (free_port(), free_port(), free_port());
        let mut config = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
        for (name, pg, rw) in [(FENCED, &fenced, rw_f), (PLAIN, &plain, rw_p)] {
            config += &format!(
                "\n[[cluster]]\nname = \"{name}\"\nscope = \"{}\"\netcd_endpoints = [\"{}\"]\netcd_timeout = \"1s\"\n\
                 check_user = \"postgres\"\n\n[[listener]]\nname = \"rw_{name}\"\ncluster = \"{name}\"\n\
                 bind = \"127.0.0.1:{rw}\"\nrole = \"primary\"\nqueue_timeout = \"90s\"\n",
                pg.scope,
                etcd.endpoint()
            );
        }
        let pf = Pgfront::start(&config, admin);
        let variants = [
            Variant { cluster: FENCED, label: "with pre_promote fencing", pg: fenced, rw: rw_f },
            Variant { cluster: PLAIN, label: "without pre_promote", pg: plain, rw: rw_p },
        ];
        for v in &variants {
            let leader = v.pg.leader().expect("a leader");
            let (ok, _, err) = psql(leader.port, "CREATE TABLE pgfront_probe (id bigserial PRIMARY KEY)");
            assert!(ok, "{err}");
        }
        println!("fencing mode: two Patroni clusters, agents and pgfront ready in {:.1} s", t.elapsed().as_secs_f64());
        let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
        let mut aborted = false;
        'rounds: for r in 0..p.rounds {
            let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let v = &variants[i];
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| round(&rt, &pf, v))) {
                    Ok(x) => {
                        println!(
                            "round {r} {:<25} writable after {:.2} s, patronictl {:.2} s, pgfront gap {:.3} s, \
                             failed (connect/read-only/broken) {}/{}/{}{}",
                            v.label,
                            x.writable,
                            x.patronictl,
                            x.gap,
                            x.failed.0,
                            x.failed.1,
                            x.failed.2,
                            x.fence_ms.map_or(String::new(), |ms| format!(", fence {ms:.0} ms"))
                        );
                        results[i].push(x);
                    }
                    Err(e) => {
                        let why = super::panic_message(&e);
                        println!("round {r} {}: ABORTED: {why}", v.label);
                        println!("--- pgfront log (last 30 lines) ---\n{}", pf.proc.log_tail(30));
                        println!("{}", v.pg.log_tails(20));
                        aborted = true;
                        break 'rounds;
                    }
                }
            }
        }
        println!("\nPatroni switchover, {} round(s) per variant, interleaved; median [min–max]:", p.rounds);
        println!(
            "{:<27} {:>26} {:>26} {:>26} {:>18} {:>22}",
            "variant", "to writable (s)", "patronictl (s)", "pgfront write gap (s)", "failed c/ro/b", "fence (ms)"
        );
        for (i, v) in variants.iter().enumerate() {
            let rs = &results[i];
            let col = |f: &dyn Fn(&Round) -> f64, prec| spread(&rs.iter().map(f).collect::<Vec<_>>(), prec);
            let fences: Vec<f64> = rs.iter().filter_map(|x| x.fence_ms).collect();
            let failed = rs.iter().fold((0, 0, 0), |a, x| (a.0 + x.failed.0, a.1 + x.failed.1, a.2 + x.failed.2));
            println!(
                "{:<27} {:>26} {:>26} {:>26} {:>18} {:>22}",
                v.label,
                col(&|x| x.writable, 2),
                col(&|x| x.patronictl, 2),
                col(&|x| x.gap, 3),
                format!("{}/{}/{}", failed.0, failed.1, failed.2),
                if fences.is_empty() { "—".into() } else { spread(&fences, 0) }
            );
        }
        println!("fencing mode total time {:.1} s", t.elapsed().as_secs_f64());
        drop(agents);
        !aborted
    }
}

/// The message of a caught panic (a round that aborted).
fn panic_message(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
