//! Scale: one pgfront in front of many Patroni clusters with many idle sessions. One real etcd
//! holds `--clusters` Patroni scopes (default 100) written by a generator: three members each
//! (a leader and two replicas) spread over a few echo "databases" on loopback, plus the
//! `config`, `initialize`, `status` and `history` keys Patroni 3.0 writes, so a full read of a
//! scope costs what it costs in production. pgfront runs with one `[[cluster]]` and one primary
//! `[[listener]]` per scope. Printed, each as median [min–max] over the rounds:
//!
//! - at rest, no session: pgfront's RSS and threads; its CPU (utime+stime from /proc) and
//!   context switches (all threads) per second over `--rest-secs` windows, and etcd's CPU over
//!   the same windows (the etcd cluster pays for what pgfront asks);
//! - `--conns` idle sessions (default 20 000) opened through the listeners, spread evenly: RSS
//!   per idle session, and CPU at rest with them open;
//! - leader change, with the sessions open: for one scope per round (a different one each
//!   round), the leader key and member roles move to another member in one etcd transaction;
//!   timed are the first new connection through that listener that reaches the new member
//!   (polled, one at a time) and the moment every session open on the old primary is closed.
//!
//! `PGFRONT_BENCH_BASELINE=<binary>`: a second pgfront (e.g. built from main) runs beside the
//! one under test with the same clusters, and its at-rest figures (no session) are measured in
//! the same windows, so a change is measured against the same noise.
//!
//! The echo backends answer the startup packet with itself, then echo, except `WHO?`, which
//! they answer with their own port (2 bytes): that names the member a session reached.
//!
//! Descriptors: pgfront holds a client and a backend socket per session, so it needs
//! RLIMIT_NOFILE >= 2 x conns + 1024 (its session budget is (RLIMIT_NOFILE - the reserve of `listener::sessions_for`) / 2, see
//! `proxy::listener::fd_budget`); the bench raises its own limit, which pgfront inherits (the
//! hard limit too when it may: root with CAP_SYS_RESOURCE), and says which `--conns` fits when
//! it cannot. The clients' ends stay in this process, the echo backends' in a child process, so
//! neither needs more than conns descriptors. Ephemeral ports: the clients' connections are
//! spread over the listeners and pgfront's over the echo backends, a few thousand 4-tuples per
//! destination at most.
//!
//! Run: `cargo bench --bench scale` (about 4 minutes). Flags: `--clusters N`, `--conns N`,
//! `--rounds N`, `--rest-secs S`, `--backends N`, `--resync-interval D` (every cluster's;
//! default pgfront's), `--print-log` (pgfront's log at the end). `--quick` (or
//! `PGFRONT_BENCH_QUICK=1 cargo test --bench scale`, as `scripts/test.sh` runs it): 4 clusters,
//! 300 sessions, 1 round of 2 s. Fails on a broken run (a session not opened, a leader change
//! not applied within 30 s), never on a slow one. Needs etcd-server.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::stats::{spread, BenchArgs};
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
struct Params {
    quick: bool,
    clusters: usize,
    conns: usize,
    rounds: usize,
    rest_secs: u64,
    backends: usize,
    /// `resync_interval` of every cluster (None: pgfront's default).
    resync: Option<String>,
}

impl Params {
    fn from_env() -> Params {
        let args = BenchArgs::from_env();
        let num = |flag: &str, env: &str, full: u64, quick_default: u64| args.num(flag, env, full, quick_default);
        let p = Params {
            quick: args.quick,
            clusters: num("--clusters", "BENCH_CLUSTERS", 100, 4) as usize,
            conns: num("--conns", "BENCH_CONNS", 20_000, 300) as usize,
            rounds: num("--rounds", "BENCH_ROUNDS", 5, 1) as usize,
            rest_secs: num("--rest-secs", "BENCH_REST_SECS", 10, 2),
            backends: num("--backends", "BENCH_BACKENDS", 8, 3) as usize,
            resync: args.get("--resync-interval", "BENCH_RESYNC_INTERVAL"),
        };
        assert!(p.clusters >= 1 && p.rounds >= 1 && p.rest_secs >= 1, "--clusters, --rounds, --rest-secs: at least 1");
        assert!(p.backends >= 3, "--backends: at least 3 (a scope's three members sit on three backends)");
        p
    }
}

const CLK_TCK: f64 = 100.0;

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime is field 14, stime 15: indexes 11 and 12 after the state field (3).
    (ticks(11) + ticks(12)) as f64 / clk_tck()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        CLK_TCK
    }
}

fn status_field(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

/// Context switches (voluntary and not) of every thread of `pid`: how often it wakes.
fn ctx_switches(pid: i32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    dir.flatten()
        .map(|t| {
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            s.lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Raises RLIMIT_NOFILE (soft, and hard if needed) to `want`; pgfront, a child, inherits it.
fn raise_nofile(want: u64, conns: usize) {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0, "getrlimit");
        if l.rlim_cur >= want {
            return;
        }
        let new = libc::rlimit { rlim_cur: want, rlim_max: want.max(l.rlim_max) };
        let rc = libc::setrlimit(libc::RLIMIT_NOFILE, &new);
        assert_eq!(
            rc,
            0,
            "{conns} sessions need RLIMIT_NOFILE >= {want} in pgfront (two descriptors a session); the limit \
             here is soft {}, hard {} and cannot be raised (root without CAP_SYS_RESOURCE?): raise it \
             (`ulimit -Hn`), or run with --conns {} at most",
            l.rlim_cur,
            l.rlim_max,
            l.rlim_max.saturating_sub(RESERVE) / 2
        );
    }
}

/// Descriptors besides the sessions': pgfront's listeners, etcd connections, logs, admin.
const RESERVE: u64 = 1024;

/// An echo "database": answers the startup packet with itself, then echoes, except `WHO?`,
/// answered with the backend's port.
async fn echo_backend(l: TcpListener) {
    let port = l.local_addr().unwrap().port();
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let n = u32::from_be_bytes(len) as usize;
            if !(8..=10_000).contains(&n) {
                return;
            }
            let mut p = len.to_vec();
            p.resize(n, 0);
            if s.read_exact(&mut p[4..]).await.is_err() || s.write_all(&p).await.is_err() {
                return;
            }
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(4) if &buf[..4] == b"WHO?" => {
                        if s.write_all(&port.to_be_bytes()).await.is_err() {
                            return;
                        }
                    }
                    Ok(k) => {
                        if s.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// The child process: `n` echo backends; prints their ports on one line, then serves until killed.
fn echo_backends(n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut ports = Vec::new();
        for _ in 0..n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(l.local_addr().unwrap().port().to_string());
            tokio::spawn(echo_backend(l));
        }
        println!("{}", ports.join(" "));
        std::future::pending::<()>().await
    })
}

/// A session through `port`: startup packet echoed, then the backend's port.
async fn open(port: u16) -> std::io::Result<(TcpStream, u16)> {
    let mut s = echo::handshake(port).await?;
    s.write_all(b"WHO?").await?;
    let mut who = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut who))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer to WHO? within 10 s"))??;
    Ok((s, u16::from_be_bytes(who)))
}

/// `n` distinct free ports (`free_port` one at a time may hand out the same port twice).
fn distinct_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn member_json(port: u16, role: &str) -> String {
    format!(
        r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:{port}/patroni","state":"running","role":"{role}","version":"3.0.2","xlog_location":83886080,"timeline":3,"tags":{{}}}}"#
    )
}

/// A scope: its members' backend ports (member `m<i>` on `ports[i]`) and the current leader.
struct Scope {
    name: String,
    listen: u16,
    ports: [u16; 3],
    leader: usize,
}

/// Writes the scope's keys, `leader` the leader, in one transaction (one revision).
async fn put_scope(c: &mut etcd_client::Client, s: &Scope, with_static: bool) {
    use etcd_client::{Txn, TxnOp};
    let p = format!("/service/{}/", s.name);
    let mut ops = vec![TxnOp::put(format!("{p}leader"), format!("m{}", s.leader), None)];
    for (i, port) in s.ports.iter().enumerate() {
        let role = if i == s.leader { "master" } else { "replica" };
        ops.push(TxnOp::put(format!("{p}members/m{i}"), member_json(*port, role), None));
    }
    if with_static {
        ops.push(TxnOp::put(
            format!("{p}config"),
            r#"{"ttl":30,"loop_wait":10,"retry_timeout":10,"maximum_lag_on_failover":1048576,"postgresql":{"use_pg_rewind":true,"parameters":{"max_connections":500,"wal_level":"replica","hot_standby":"on","max_wal_senders":10,"max_replication_slots":10,"wal_log_hints":"on"}}}"#,
            None,
        ));
        ops.push(TxnOp::put(format!("{p}initialize"), "7301234567890123456", None));
        ops.push(TxnOp::put(
            format!("{p}status"),
            r#"{"optime":83886080,"slots":{"m1":83886080,"m2":83886080}}"#,
            None,
        ));
        ops.push(TxnOp::put(
            format!("{p}history"),
            r#"[[1,25165984,"no recovery target specified","2026-11-02T10:11:12.123456+00:00","m1"],[2,50331808,"no recovery target specified","2026-11-20T03:04:05.654321+00:00","m0"]]"#,
            None,
        ));
    }
    c.txn(Txn::new().and_then(ops)).await.unwrap_or_else(|e| panic!("writing scope {}: {e}", s.name));
}

fn pgfront_config(admin: u16, etcd: &str, scopes: &[Scope], resync: Option<&str>) -> String {
    let resync = resync.map_or(String::new(), |r| format!("resync_interval = \"{r}\"\n"));
    let mut cfg = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    for s in scopes {
        cfg.push_str(&format!(
            "[[cluster]]\nname = \"{0}\"\nscope = \"{0}\"\netcd_endpoints = [\"{etcd}\"]\n{resync}\
             [[listener]]\nname = \"{0}-rw\"\ncluster = \"{0}\"\nbind = \"127.0.0.1:{1}\"\nserver_maxconn = 100000\nmaxconn = 100000\n",
            s.name, s.listen
        ));
    }
    cfg
}

/// Starts pgfront from `bin` (None: the binary under test) and waits until it routes every
/// scope to its leader. Like `Pgfront::start`, but a pgfront that exits or does not answer
/// fails with its log: a free port chosen for one of 100 listeners may be taken meanwhile.
fn start_pgfront(
    bin: Option<&std::ffi::OsStr>,
    admin: u16,
    etcd: &str,
    scopes: &[Scope],
    resync: Option<&str>,
) -> Pgfront {
    let dir = temp_dir("pgfront-proxy-");
    let config = dir.path().join("pgfront.toml");
    std::fs::write(&config, pgfront_config(admin, etcd, scopes, resync)).unwrap();
    let mut cmd = std::process::Command::new(bin.map_or_else(pgfront_bin, std::path::PathBuf::from));
    cmd.args(["proxy", "-c", config.to_str().unwrap()])
        .env("RUST_LOG", std::env::var("PGFRONT_TEST_LOG").unwrap_or_else(|_| "info".into()));
    let proc = Proc::spawn("pgfront", cmd, &dir.path().join("pgfront.log"), false);
    let mut pf = Pgfront { proc, admin, dir, config };
    let start = Instant::now();
    loop {
        let routed = pf
            .status()
            .and_then(|st| Some(st["clusters"].as_array()?.iter().filter(|c| c["primary"].as_str().is_some()).count()));
        if routed == Some(scopes.len()) {
            return pf;
        }
        assert!(
            pf.proc.running() && start.elapsed() < Duration::from_secs(60),
            "pgfront did not route all {} scopes within 60 s ({routed:?} routed); its log:\n{}",
            scopes.len(),
            pf.proc.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU (share of one core), context switches per second of each of `pids` over `secs`.
fn rest_window(pids: &[i32], secs: u64) -> Vec<(f64, f64)> {
    let before: Vec<(f64, u64)> = pids.iter().map(|p| (cpu_secs(*p), ctx_switches(*p))).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let el = t.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, (c, x))| ((cpu_secs(*p) - c) / el * 100.0, (ctx_switches(*p).saturating_sub(x)) as f64 / el))
        .collect()
}

/// At-rest windows over `pids` (named by `names`), printed with `what`.
fn measure_rest(what: &str, names: &[&str], pids: &[i32], p: &Params) -> Vec<Vec<(f64, f64)>> {
    let rounds: Vec<Vec<(f64, f64)>> = (0..p.rounds).map(|_| rest_window(pids, p.rest_secs)).collect();
    for (i, name) in names.iter().enumerate() {
        let cpu: Vec<f64> = rounds.iter().map(|r| r[i].0).collect();
        let cs: Vec<f64> = rounds.iter().map(|r| r[i].1).collect();
        println!("{what:<36} {name:<18} CPU {:>22} % of a core   wakeups {:>24} /s", spread(&cpu, 2), spread(&cs, 0));
    }
    rounds
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--echo-backends") {
        let n: usize = args.get(i + 1).and_then(|v| v.parse().ok()).expect("--echo-backends N");
        return echo_backends(n);
    }
    let p = Params::from_env();
    if !args.iter().any(|a| a == "--bench") && !p.quick {
        println!("scale bench: skipped (run it with `cargo bench --bench scale`, or `PGFRONT_BENCH_QUICK=1` for the smoke run)");
        return;
    }
    println!("scale bench: {p:?}");
    raise_nofile(2 * p.conns as u64 + RESERVE, p.conns);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // The echo backends run in a child process: its descriptors do not count against this
    // one's, which holds the clients' ends.
    let work = tempfile::tempdir().unwrap();
    let ports_file = work.path().join("echo-ports");
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--echo-backends", &p.backends.to_string()]);
    let echo_proc = Proc::spawn_split("echo backends", cmd, Some(&ports_file), &work.path().join("echo.log"), false);
    let backend_ports: Vec<u16> = wait_for("the echo backends' ports", Duration::from_secs(10), || {
        let line = std::fs::read_to_string(&ports_file).ok()?;
        let line = line.strip_suffix('\n')?;
        line.split(' ').map(|v| v.parse().ok()).collect()
    });
    assert_eq!(backend_ports.len(), p.backends, "echo backends: {backend_ports:?}");

    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    // Scope i: members on backends i, i+1, i+2 (mod backends), leader m0, so the primaries, and
    // with them pgfront's backend connections, spread over every backend.
    // The listen ports of both pgfronts and their admin ports, all distinct.
    let mut free = distinct_ports(2 * p.clusters + 2).into_iter();
    let mut scopes: Vec<Scope> = (0..p.clusters)
        .map(|i| Scope {
            name: format!("scale-{i:03}"),
            listen: free.next().unwrap(),
            ports: [0, 1, 2].map(|k| backend_ports[(i + k) % p.backends]),
            leader: 0,
        })
        .collect();
    let t = Instant::now();
    let mut etcd_c = rt.block_on(etcd_client::Client::connect([endpoint.as_str()], None)).unwrap();
    for s in &scopes {
        rt.block_on(put_scope(&mut etcd_c, s, true));
    }
    println!("wrote {} scopes ({} keys) in {:.2} s", scopes.len(), scopes.len() * 8, t.elapsed().as_secs_f64());

    let t = Instant::now();
    let pf = start_pgfront(None, free.next().unwrap(), &endpoint, &scopes, p.resync.as_deref());
    println!("pgfront routes all {} scopes {:.2} s after its start", scopes.len(), t.elapsed().as_secs_f64());
    let baseline_bin = std::env::var_os("PGFRONT_BENCH_BASELINE");
    let admin_b = free.next().unwrap();
    let baseline = baseline_bin.as_deref().map(|b| {
        // Its own listen ports: the same scopes, other listeners.
        let other: Vec<Scope> = scopes
            .iter()
            .map(|s| Scope { name: s.name.clone(), listen: free.next().unwrap(), ports: s.ports, leader: s.leader })
            .collect();
        start_pgfront(Some(b), admin_b, &endpoint, &other, p.resync.as_deref())
    });
    // Let start-up work (first reads, registrations, DNS) settle.
    std::thread::sleep(Duration::from_secs(2));

    let pid = pf.proc.pid();
    let mut names = vec!["pgfront"];
    let mut pids = vec![pid];
    if let Some(b) = &baseline {
        names.push("pgfront baseline");
        pids.push(b.proc.pid());
    }
    names.push("etcd");
    pids.push(etcd.proc.pid());
    println!("\n== {} clusters, at rest, no session ({} windows of {} s)", p.clusters, p.rounds, p.rest_secs);
    for (name, pid) in names.iter().zip(&pids).filter(|(n, _)| **n != "etcd") {
        println!(
            "{name:<18} RSS {:>7} KiB, {:>3} threads, {:>4} descriptors",
            status_field(*pid, "VmRSS:"),
            status_field(*pid, "Threads:"),
            std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
        );
    }
    measure_rest("at rest, no session", &names, &pids, &p);
    // The baseline's part ends here: sessions and leader changes go through the binary under test.
    drop(baseline);

    // Idle sessions, spread over the listeners.
    let rss_before = status_field(pid, "VmRSS:");
    let t = Instant::now();
    let targets: Vec<(usize, u16)> =
        (0..p.conns).map(|i| (i % scopes.len(), scopes[i % scopes.len()].listen)).collect();
    let opened: Vec<(usize, std::io::Result<(TcpStream, u16)>)> = rt.block_on(
        futures_util::stream::iter(targets)
            .map(|(i, port)| async move { (i, open(port).await) })
            .buffer_unordered(64)
            .collect(),
    );
    let mut sessions: BTreeMap<usize, Vec<TcpStream>> = BTreeMap::new();
    let mut failed = Vec::new();
    for (i, r) in opened {
        match r {
            Ok((s, who)) if who == scopes[i].ports[scopes[i].leader] => sessions.entry(i).or_default().push(s),
            Ok((_, who)) => failed.push(format!("{}: reached backend {who}, not its leader", scopes[i].name)),
            Err(e) => failed.push(format!("{}: {e}", scopes[i].name)),
        }
    }
    let open_secs = t.elapsed().as_secs_f64();
    assert!(
        failed.is_empty(),
        "{} of {} sessions failed, e.g. {:?}",
        failed.len(),
        p.conns,
        &failed[..failed.len().min(5)]
    );
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = status_field(pid, "VmRSS:");
    println!(
        "\n== {} idle sessions opened in {open_secs:.1} s ({:.0}/s): pgfront RSS {rss_before} KiB -> {rss_after} KiB: {:.0} B per idle session; {} threads, {} descriptors",
        p.conns,
        p.conns as f64 / open_secs,
        rss_after.saturating_sub(rss_before) as f64 * 1024.0 / p.conns as f64,
        status_field(pid, "Threads:"),
        std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
    );
    let with = format!("at rest, {} idle sessions", p.conns);
    measure_rest(&with, &["pgfront", "etcd"], &[pid, etcd.proc.pid()], &p);

    // Leader changes: one scope per round, spread over the scopes.
    println!("\n== leader change with {} idle sessions open ({} rounds)", p.conns, p.rounds);
    let mut reach = Vec::new();
    let mut closed = Vec::new();
    for round in 0..p.rounds {
        let i = (round * scopes.len() / p.rounds + round) % scopes.len();
        let old_sessions = sessions.remove(&i).unwrap_or_default();
        let n_old = old_sessions.len();
        let s = &mut scopes[i];
        let (old, new) = (s.leader, (s.leader + 1) % 3);
        let (listen, new_port) = (s.listen, s.ports[new]);
        // Every old session waits for its end (EOF or reset), bounded.
        let closers: Vec<_> = old_sessions
            .into_iter()
            .map(|mut c| {
                rt.spawn(async move {
                    let mut b = [0u8; 64];
                    let end = tokio::time::timeout(Duration::from_secs(30), async {
                        loop {
                            match c.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    end.ok().map(|()| Instant::now())
                })
            })
            .collect();
        s.leader = new;
        let t0 = Instant::now();
        rt.block_on(put_scope(&mut etcd_c, s, false));
        // Polled back to back (1 ms apart), one connection at a time, 30 s at most.
        let mut first = None;
        while first.is_none() && t0.elapsed() < Duration::from_secs(30) {
            match rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), open(listen)).await }) {
                Ok(Ok((_, who))) if who == new_port => first = Some(t0.elapsed()),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let first = first.unwrap_or_else(|| {
            panic!("{}: no new connection reached the new leader m{new} within 30 s\n{}", s.name, pf.log())
        });
        let ends: Vec<Option<Instant>> = closers.into_iter().map(|h| rt.block_on(h).unwrap()).collect();
        let lost = ends.iter().filter(|e| e.is_none()).count();
        assert_eq!(
            lost, 0,
            "{}: {lost} of {n_old} sessions on the old primary m{old} still open 30 s after the change",
            s.name
        );
        let last = ends.iter().flatten().max().map_or(Duration::ZERO, |t| t.duration_since(t0));
        println!(
            "round {round}: {} m{old} -> m{new}: new connection reaches m{new} after {:.1} ms; {n_old} old sessions closed after {:.1} ms",
            s.name,
            first.as_secs_f64() * 1e3,
            last.as_secs_f64() * 1e3
        );
        reach.push(first.as_secs_f64() * 1e3);
        closed.push(last.as_secs_f64() * 1e3);
    }
    println!("\n== summary ({} clusters, {} idle sessions, {} rounds)", p.clusters, p.conns, p.rounds);
    println!("leader change -> new connection on the new primary: {} ms", spread(&reach, 1));
    println!("leader change -> every old session closed:          {} ms", spread(&closed, 1));
    let remaining: usize = sessions.values().map(Vec::len).sum();
    drop(sessions);
    println!("({remaining} sessions still open at the end, closed now)");
    if args.iter().any(|a| a == "--print-log") {
        println!("{}", pf.log());
    }
    drop(pf);
    drop(echo_proc);
}
