//! The data path, pgfront next to HAProxy 2.6 and the direct path, in one run on one machine
//! (issue 10): what a proxy costs per transaction, per connection and per byte.
//!
//! One PostgreSQL 15 (no Patroni: the data path does not need a cluster) behind Patroni-format
//! keys in a real etcd, pgbench's tables at scale 10; echo backends behind a second scope for the
//! idle connections and the connect loop (`tests/common/echo.rs`). HAProxy runs a tuned `mode tcp`
//! configuration (`balance leastconn`, no health checks, `option splice-auto`), as the other
//! benches do. Three routes: `direct` (straight to PostgreSQL or the echo), `HAProxy`, `pgfront`.
//!
//! Figures, each run for every route, the routes' order rotating from round to round, rounds
//! interleaved (figure 1 for the three routes, figure 2 ..., then round 2):
//! - `c8`: `pgbench -S -n -c 8 -j 2 -T secs`: TPS and the proxy's CPU per transaction, user and
//!   system (utime and stime from `/proc/<pid>/stat`, before and after);
//! - `c64`: the same with `-c 64 -j 2`;
//! - `idle`: `c8` with `--idle` (5000) idle connections open through the proxy beside it;
//! - `connect`: `pgbench -S -C -c 8 -j 2` (a new connection per transaction);
//! - `tcp`: a plain connect, startup packet, echo, close loop (8 at a time) against the echo:
//!   connections per second and CPU per connection;
//! - `latency`: `SELECT 1` round trips on one connection, p50 and p99, and what the route adds to
//!   the direct path's;
//! - `copy`: `COPY (...) TO STDOUT` and `COPY ... FROM STDIN WHERE false` of `--bulk-mb` (1000) MB:
//!   MB/s and the proxy's CPU seconds per GB;
//! - `syscalls`: a separate, shorter `c8` run (`--strace-secs`) under `strace -c -f` attached to
//!   every thread of the proxy: system calls per transaction, by call (strace slows the proxy, so
//!   no other figure is taken meanwhile).
//!
//! - `profile` (only when named in `--figures`): `perf record -g` of each proxy during a `c8`
//!   run of `--strace-secs`, and the top of `perf report` by symbol and by DSO (sampling at
//!   `BENCH_PERF_FREQ`, 999 per second).
//! - `syscalls-connect` and `profile-connect` (only when named): the same two during a
//!   `pgbench -S -C -c 8` run instead (a new connection per transaction), so per connection.
//! - `allocs` and `allocs-connect` (only when named): calls to the C library's `malloc`,
//!   `calloc` and `realloc` per transaction (per connection for `allocs-connect`) of each proxy
//!   during a `--strace-secs` run, counted by uprobes (`perf probe`, removed at the end, and
//!   `perf stat`, counting only while pgbench runs). Unlike CPU time, the count does not depend
//!   on what else the machine runs.
//!
//! For each figure: median, spread (min–max) and pgfront's median over HAProxy's.
//!
//! `PGFRONT_BENCH_URING=<binary>` adds a route through the io_uring relay experiment (a pgfront
//! built with `--features uring-experiment`, src/uring_relay.rs) and its ratio to pgfront.
//!
//! Run: `cargo bench --bench datapath` (5 rounds, 15 s per pgbench run, about 25 minutes).
//! Flags after `--` or in the environment: `--rounds` / `BENCH_ROUNDS` (5), `--secs` /
//! `BENCH_SECS` (15), `--strace-secs` / `BENCH_STRACE_SECS` (5), `--idle` / `BENCH_IDLE` (5000),
//! `--bulk-mb` / `BENCH_BULK_MB` (1000), `--latency-n` / `BENCH_LATENCY_N` (20000 round trips),
//! `--scale` / `BENCH_SCALE` (10), `--figures` / `BENCH_FIGURES` (comma list of the figure keys
//! above), `--routes` / `BENCH_ROUTES` (comma list of direct,haproxy,pgfront).
//! Smoke test (1 round, a second or two per figure, well under a minute of load):
//! `cargo bench --bench datapath -- --quick`, or `PGFRONT_BENCH_QUICK=1 cargo test --bench
//! datapath` (scripts/test.sh runs it). The process exits non-zero if a run breaks (pgbench
//! fails, a connection fails, a COPY is short, strace counts nothing), never because a figure is
//! slow. Needs root (PostgreSQL runs as postgres), etcd-server, postgresql-15, pgbench, haproxy,
//! strace.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::echo::*;
use common::stats::{median, BenchArgs};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "datapath-bench";
const IDLE_SCOPE: &str = "datapath-bench-idle";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Direct,
    Haproxy,
    Pgfront,
    /// Another pgfront binary (`PGFRONT_BENCH_BASELINE`), to measure a change in the same run.
    Baseline,
    /// The io_uring relay experiment (`PGFRONT_BENCH_URING`: a pgfront binary built with
    /// `--features uring-experiment`, run as `pgfront uring-relay`; src/uring_relay.rs).
    Uring,
}

impl Route {
    const ALL: [Route; 3] = [Route::Direct, Route::Haproxy, Route::Pgfront];
    fn key(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Haproxy => "haproxy",
            Route::Pgfront => "pgfront",
            Route::Baseline => "baseline",
            Route::Uring => "uring",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Haproxy => "HAProxy",
            Route::Pgfront => "pgfront",
            Route::Baseline => "pgfront baseline",
            Route::Uring => "io_uring relay",
        }
    }
}

const FIGURES: [&str; 8] = ["c8", "c64", "idle", "connect", "tcp", "latency", "copy", "syscalls"];
/// Figures run only when asked for by name in `--figures`.
const OPT_IN: [&str; 5] = ["profile", "syscalls-connect", "profile-connect", "allocs", "allocs-connect"];

#[derive(Clone, Debug)]
struct Params {
    quick: bool,
    rounds: usize,
    secs: u64,
    strace_secs: u64,
    idle: usize,
    bulk_mb: u64,
    latency_n: usize,
    scale: u64,
    figures: Vec<String>,
    routes: Vec<Route>,
}

impl Params {
    fn from_env() -> Params {
        let args = BenchArgs::from_env();
        let quick = args.quick;
        let num = |flag: &str, env: &str, full: u64, quick_default: u64| args.num(flag, env, full, quick_default);
        let list = |flag: &str, env: &str| args.list(flag, env);
        let figures = list("--figures", "BENCH_FIGURES").unwrap_or_else(|| FIGURES.map(str::to_owned).to_vec());
        for f in &figures {
            assert!(
                FIGURES.contains(&f.as_str()) || OPT_IN.contains(&f.as_str()),
                "unknown figure {f}: one of {FIGURES:?} {OPT_IN:?}"
            );
        }
        let routes = match list("--routes", "BENCH_ROUTES") {
            Some(l) => l
                .iter()
                .map(|k| Route::ALL.into_iter().find(|r| r.key() == k).unwrap_or_else(|| panic!("unknown route {k}")))
                .collect(),
            None => Route::ALL.to_vec(),
        };
        let mut routes = routes;
        if std::env::var_os("PGFRONT_BENCH_BASELINE").is_some() && !routes.contains(&Route::Baseline) {
            routes.push(Route::Baseline);
        }
        if std::env::var_os("PGFRONT_BENCH_URING").is_some() && !routes.contains(&Route::Uring) {
            routes.push(Route::Uring);
        }
        Params {
            quick,
            rounds: num("--rounds", "BENCH_ROUNDS", 5, 1) as usize,
            secs: num("--secs", "BENCH_SECS", 15, 2),
            strace_secs: num("--strace-secs", "BENCH_STRACE_SECS", 5, 2),
            idle: num("--idle", "BENCH_IDLE", 5000, 200) as usize,
            bulk_mb: num("--bulk-mb", "BENCH_BULK_MB", 1000, 20),
            latency_n: num("--latency-n", "BENCH_LATENCY_N", 20000, 500) as usize,
            scale: num("--scale", "BENCH_SCALE", 10, 1),
            figures,
            routes,
        }
    }

    fn wants(&self, figure: &str) -> bool {
        self.figures.iter().any(|f| f == figure)
    }
}

/// CPU time a process has used so far, (user, system), in seconds (all its threads).
fn cpu(pid: i32) -> (f64, f64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces) start at field 3: utime is field 14.
    let rest = &stat[stat.rfind(')').expect("a /proc stat line") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().unwrap() / tck, f[12].parse::<f64>().unwrap() / tck)
}

/// CPU used by `pid` (if any) while `f` runs.
fn cpu_during<T>(pid: Option<i32>, f: impl FnOnce() -> T) -> (T, (f64, f64)) {
    let before = pid.map(cpu);
    let out = f();
    let used = match (pid, before) {
        (Some(p), Some((u0, s0))) => {
            let (u1, s1) = cpu(p);
            (u1 - u0, s1 - s0)
        }
        _ => (f64::NAN, f64::NAN),
    };
    (out, used)
}

/// Every thread of `pid`.
fn threads(pid: i32) -> Vec<i32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

struct Pgbench {
    bin: std::path::PathBuf,
}

/// What one pgbench run did.
struct PgbenchRun {
    tps: f64,
    txns: f64,
}

impl Pgbench {
    fn run(&self, port: u16, clients: u32, secs: u64, connect: bool) -> PgbenchRun {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-S", "-n", "-c", &clients.to_string(), "-j", "2", "-T", &secs.to_string()]);
        if connect {
            cmd.arg("-C");
        }
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "postgres"]);
        let out = cmd.current_dir(std::env::temp_dir()).output().expect("pgbench");
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |prefix: &str, nth: usize| -> Option<f64> {
            text.lines().find_map(|l| l.trim().strip_prefix(prefix)?.split_whitespace().nth(nth)?.parse().ok())
        };
        let failed = value("number of failed transactions:", 0).unwrap_or(0.0);
        match (out.status.success(), value("tps =", 0), value("number of transactions actually processed:", 0)) {
            (true, Some(tps), Some(txns)) if txns > 0.0 && failed == 0.0 => PgbenchRun { tps, txns },
            _ => panic!(
                "pgbench through port {port} failed ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// Figures collected over the rounds: (figure, metric) -> route -> values, in first-seen order.
#[derive(Default)]
struct Results {
    order: Vec<(String, String)>,
    values: BTreeMap<(String, String), BTreeMap<Route, Vec<f64>>>,
}

impl Results {
    fn add(&mut self, figure: &str, metric: &str, route: Route, v: f64) {
        let k = (figure.to_owned(), metric.to_owned());
        if !self.values.contains_key(&k) {
            self.order.push(k.clone());
        }
        self.values.entry(k).or_default().entry(route).or_default().push(v);
    }

    fn print(&self, routes: &[Route]) {
        let mut figures: Vec<&str> = Vec::new();
        for (f, _) in &self.order {
            if !figures.contains(&f.as_str()) {
                figures.push(f);
            }
        }
        for figure in figures {
            print!("\n== {figure}\n{:<28}", "");
            for r in routes {
                print!(" {:>26}", r.label());
            }
            let base = if routes.contains(&Route::Baseline) { "  pgfront/baseline" } else { "" };
            let uring = if routes.contains(&Route::Uring) { "   io_uring/pgfront" } else { "" };
            println!(" {:>16}{base}{uring}", "pgfront/HAProxy");
            // Metrics in first-seen order, except that "total" and "errors" (system calls) come last.
            let mut metrics: Vec<&(String, String)> = self.order.iter().filter(|k| k.0 == figure).collect();
            metrics.sort_by_key(|k| matches!(k.1.as_str(), "total" | "errors"));
            for k in metrics {
                let per = &self.values[k];
                print!("{:<28}", k.1);
                for r in routes {
                    match per.get(r).filter(|v| !v.is_empty() && v.iter().all(|x| x.is_finite())) {
                        Some(v) => print!(" {:>26}", spread(v)),
                        None => print!(" {:>26}", "–"),
                    }
                }
                let ratio = |a: Route, b: Route| match (per.get(&a).map(|v| median(v)), per.get(&b).map(|v| median(v)))
                {
                    (Some(x), Some(y)) if x.is_finite() && y.is_finite() && y != 0.0 => format!("{:.2}×", x / y),
                    _ => "–".to_owned(),
                };
                print!(" {:>16}", ratio(Route::Pgfront, Route::Haproxy));
                if routes.contains(&Route::Baseline) {
                    print!(" {:>17}", ratio(Route::Pgfront, Route::Baseline));
                }
                if routes.contains(&Route::Uring) {
                    print!(" {:>18}", ratio(Route::Uring, Route::Pgfront));
                }
                println!();
            }
        }
    }
}

/// "median [min–max]", with as many decimals as the size of the numbers calls for; one round
/// alone is its value.
fn spread(v: &[f64]) -> String {
    let d = common::stats::decimals(median(v));
    if v.len() == 1 {
        format!("{:.d$}", v[0])
    } else {
        common::stats::spread(v, d)
    }
}

/// Everything a run shares: etcd and its keys, PostgreSQL, the echo backends, the three routes.
struct Fixture {
    rt: tokio::runtime::Runtime,
    pg: Postgres,
    echo: u16,
    haproxy: Proc,
    haproxy_ports: (u16, u16),
    pgfront: Pgfront,
    pgfront_ports: (u16, u16),
    baseline: Option<(Pgfront, (u16, u16))>,
    uring: Option<(Proc, (u16, u16))>,
    _etcd: Etcd,
    _work: tempfile::TempDir,
    _backends: tokio_util::sync::DropGuard,
}

impl Fixture {
    fn start(p: &Params) -> Fixture {
        raise_fd_limit();
        require("strace", "strace");
        let rt = runtime();
        let etcd = Etcd::start();
        let pg = Postgres::start(&[("max_connections", "300"), ("shared_buffers", "128MB")]);
        let stop = CancellationToken::new();
        let (echo, echo2) = rt.block_on(async { (echo_server(stop.clone()).await, echo_server(stop.clone()).await) });
        rt.block_on(put_keys(&etcd.endpoint(), SCOPE, pg.port, echo2));
        rt.block_on(put_keys(&etcd.endpoint(), IDLE_SCOPE, echo, echo2));

        let pgbench = require("pgbench", "postgresql-client-15");
        let init = Command::new(&pgbench)
            .args(["-i", "-q", "-s", &p.scale.to_string(), "-h", "127.0.0.1", "-p", &pg.port.to_string()])
            .args(["-U", "postgres", "postgres"])
            .current_dir(std::env::temp_dir())
            .output()
            .expect("pgbench -i");
        assert!(init.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&init.stderr));
        let (ok, _, err) = psql(pg.port, "CREATE TABLE IF NOT EXISTS bulk_sink (t text)");
        assert!(ok, "create bulk_sink: {err}");

        let work = temp_dir("pgfront-bench-datapath-");
        let haproxy_ports = (free_port(), free_port());
        let cfg = work.path().join("haproxy.cfg");
        fs::write(
            &cfg,
            format!(
                "global\n  maxconn 7000\n\
                 defaults\n  mode tcp\n  option splice-auto\n  maxconn 7000\n  timeout connect 4s\n  timeout client 30m\n  timeout server 30m\n\
                 listen rw\n  bind 127.0.0.1:{}\n  balance leastconn\n  server pg1 127.0.0.1:{} maxconn 1000\n\
                 listen idle\n  bind 127.0.0.1:{}\n  balance leastconn\n  server e1 127.0.0.1:{echo} maxconn 6000\n",
                haproxy_ports.0, pg.port, haproxy_ports.1
            ),
        )
        .unwrap();
        let mut cmd = Command::new(require("haproxy", "haproxy"));
        cmd.args(["-db", "-f", cfg.to_str().unwrap()]);
        let haproxy = Proc::spawn("haproxy", cmd, &work.path().join("haproxy.log"), false);

        let start_pgfront = || {
            let (admin, rw, idle) = (free_port(), free_port(), free_port());
            let e = etcd.endpoint();
            let pgfront = Pgfront::start(
            &format!(
                "[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 [[cluster]]\nname = \"main\"\nscope = \"{SCOPE}\"\netcd_endpoints = [\"{e}\"]\n\
                 [[cluster]]\nname = \"idle\"\nscope = \"{IDLE_SCOPE}\"\netcd_endpoints = [\"{e}\"]\n\
                 [[listener]]\nname = \"rw\"\ncluster = \"main\"\nbind = \"127.0.0.1:{rw}\"\nserver_maxconn = 1000\nmaxconn = 1000\n\
                 [[listener]]\nname = \"idle\"\ncluster = \"idle\"\nbind = \"127.0.0.1:{idle}\"\nserver_maxconn = 6000\nmaxconn = 6000\n"
            ),
            admin,
        );
            wait_for("pgfront to route both clusters", Duration::from_secs(20), || {
                (pgfront.primary("main").is_some() && pgfront.primary("idle").is_some()).then_some(())
            });
            (pgfront, (rw, idle))
        };
        let (pgfront, pgfront_ports) = start_pgfront();
        let baseline = std::env::var_os("PGFRONT_BENCH_BASELINE").map(|bin| {
            // Pgfront::start runs `$PGFRONT_BIN`; no other thread of this process reads the environment.
            let current = std::env::var_os("PGFRONT_BIN");
            std::env::set_var("PGFRONT_BIN", &bin);
            let b = start_pgfront();
            match current {
                Some(c) => std::env::set_var("PGFRONT_BIN", c),
                None => std::env::remove_var("PGFRONT_BIN"),
            }
            b
        });
        let uring = std::env::var_os("PGFRONT_BENCH_URING").map(|bin| {
            let ports = (free_port(), free_port());
            let mut cmd = Command::new(bin);
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            cmd.args(["uring-relay", "--route", &format!("127.0.0.1:{}=127.0.0.1:{}", ports.0, pg.port)])
                .args(["--route", &format!("127.0.0.1:{}=127.0.0.1:{echo}", ports.1)])
                .args(["--threads", &threads.to_string()]);
            (Proc::spawn("uring-relay", cmd, &work.path().join("uring.log"), false), ports)
        });
        let fx = Fixture {
            rt,
            pg,
            echo,
            haproxy,
            haproxy_ports,
            pgfront,
            pgfront_ports,
            baseline,
            uring,
            _etcd: etcd,
            _work: work,
            _backends: stop.drop_guard(),
        };
        for r in p.routes.iter().copied() {
            let (pg_port, idle_port) = fx.ports(r);
            let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_for(&format!("{} to reach PostgreSQL", r.label()), Duration::from_secs(20), || {
                    psql(pg_port, "SELECT 1").0.then_some(())
                });
                wait_for(&format!("{} to reach the echo", r.label()), Duration::from_secs(20), || {
                    fx.rt.block_on(handshake(idle_port)).ok().map(|_| ())
                });
            }));
            if let Err(e) = ready {
                eprintln!("--- psql: {:?}", psql(pg_port, "SELECT 1"));
                eprintln!("--- haproxy log ---\n{}", fx.haproxy.log_tail(30));
                eprintln!("--- pgfront log ---\n{}", fx.pgfront.proc.log_tail(30));
                if let Some((u, _)) = &fx.uring {
                    eprintln!("--- io_uring relay log ---\n{}", u.log_tail(30));
                }
                std::panic::resume_unwind(e);
            }
        }
        fx
    }

    /// (PostgreSQL port, echo port) of a route.
    fn ports(&self, r: Route) -> (u16, u16) {
        match r {
            Route::Direct => (self.pg.port, self.echo),
            Route::Haproxy => self.haproxy_ports,
            Route::Pgfront => self.pgfront_ports,
            Route::Baseline => self.baseline.as_ref().expect("PGFRONT_BENCH_BASELINE").1,
            Route::Uring => self.uring.as_ref().expect("PGFRONT_BENCH_URING").1,
        }
    }

    /// The proxy's pid, whose CPU is measured.
    fn pid(&self, r: Route) -> Option<i32> {
        match r {
            Route::Direct => None,
            Route::Haproxy => Some(self.haproxy.pid()),
            Route::Pgfront => Some(self.pgfront.proc.pid()),
            Route::Baseline => self.baseline.as_ref().map(|b| b.0.proc.pid()),
            Route::Uring => self.uring.as_ref().map(|u| u.0.pid()),
        }
    }

    /// `n` connections through `port`, each after its startup packet was echoed, opened 100 at a time.
    fn open_idle(&self, port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
        self.rt.block_on(async {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let batch = (n - out.len()).min(100);
                let opened = futures_util::future::join_all((0..batch).map(|_| handshake(port))).await;
                for c in opened {
                    out.push(c.unwrap_or_else(|e| panic!("idle connection {} through port {port}: {e}", out.len())));
                }
            }
            out
        })
    }
}

/// Records CPU per transaction (µs, user / system / total) of a proxy run.
fn add_cpu(res: &mut Results, figure: &str, per: &str, route: Route, (u, s): (f64, f64), n: f64) {
    if route == Route::Direct {
        return;
    }
    res.add(figure, &format!("proxy CPU µs/{per} user"), route, u * 1e6 / n);
    res.add(figure, &format!("proxy CPU µs/{per} system"), route, s * 1e6 / n);
    res.add(figure, &format!("proxy CPU µs/{per} total"), route, (u + s) * 1e6 / n);
}

/// Connect, startup packet, echo, close, `conc` at a time for `secs`: (connections, failures).
fn connect_loop(rt: &tokio::runtime::Runtime, port: u16, conc: usize, secs: u64) -> (u64, u64, Vec<String>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    rt.block_on(async {
        let end = tokio::time::Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..conc)
            .map(|_| {
                let (ok, failed, errors) = (ok.clone(), failed.clone(), errors.clone());
                tokio::spawn(async move {
                    while tokio::time::Instant::now() < end {
                        match handshake(port).await {
                            Ok(s) => {
                                drop(s);
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut v) = errors.lock() {
                                    if v.len() < 5 {
                                        v.push(e.to_string());
                                    }
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
    let errors = errors.lock().map(|v| v.clone()).unwrap_or_default();
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), errors)
}

/// Reads PostgreSQL messages until ReadyForQuery; panics on an ErrorResponse.
fn until_ready(r: &mut impl std::io::Read, port: u16) {
    loop {
        let mut head = [0u8; 5];
        r.read_exact(&mut head).unwrap_or_else(|e| panic!("reading from {port}: {e}"));
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        r.read_exact(&mut body).unwrap_or_else(|e| panic!("reading from {port}: {e}"));
        match head[0] {
            b'E' => panic!("error from {port}: {}", String::from_utf8_lossy(&body)),
            b'Z' => return,
            _ => {}
        }
    }
}

/// `n` `SELECT 1` round trips on one connection through `port`: their durations, sorted, in µs.
/// A blocking client speaking the protocol itself (one write per query, TCP_NODELAY, no runtime
/// between the socket and the clock), so that what is measured is the route.
fn latencies(port: u16, n: usize) -> Vec<f64> {
    use std::io::Write;
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to {port}: {e}"));
    s.set_nodelay(true).unwrap();
    let mut body = 196608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend(body);
    (&s).write_all(&startup).unwrap();
    let mut r = std::io::BufReader::new(&s);
    until_ready(&mut r, port);
    let sql = b"SELECT 1\0";
    let mut q = vec![b'Q'];
    q.extend(((sql.len() + 4) as u32).to_be_bytes());
    q.extend(sql);
    for _ in 0..n.min(200) {
        (&s).write_all(&q).unwrap();
        until_ready(&mut r, port);
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        (&s).write_all(&q).unwrap_or_else(|e| panic!("write to {port}: {e}"));
        until_ready(&mut r, port);
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(f64::total_cmp);
    v
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Bytes of a `COPY (...) TO STDOUT` of about `mb` MB through `port`.
fn copy_out(rt: &tokio::runtime::Runtime, port: u16, mb: u64) -> u64 {
    rt.block_on(async {
        let c = pg_connect(port).await.unwrap_or_else(|e| panic!("connect through {port}: {}", pg_err(&e)));
        let rows = mb * 1_000_000 / 1001;
        let q = format!("COPY (SELECT repeat('x', 1000) FROM generate_series(1, {rows})) TO STDOUT");
        let stream = c.copy_out(q.as_str()).await.unwrap_or_else(|e| panic!("COPY TO STDOUT: {}", pg_err(&e)));
        let mut stream = std::pin::pin!(stream);
        let mut bytes = 0u64;
        while let Some(chunk) = stream.next().await {
            bytes += chunk.unwrap_or_else(|e| panic!("COPY TO STDOUT through {port}: {}", pg_err(&e))).len() as u64;
        }
        assert_eq!(bytes, rows * 1001, "COPY TO STDOUT through {port}: short");
        bytes
    })
}

/// Bytes of a `COPY ... FROM STDIN` of about `mb` MB through `port` (rows parsed by the server,
/// then discarded by `WHERE false`, so that the disk is not what is measured).
fn copy_in(rt: &tokio::runtime::Runtime, port: u16, mb: u64) -> u64 {
    rt.block_on(async {
        let c = pg_connect(port).await.unwrap_or_else(|e| panic!("connect through {port}: {}", pg_err(&e)));
        let mut row = vec![b'y'; 1000];
        row.push(b'\n');
        let block = bytes::Bytes::from(row.repeat(64)); // 64 064 bytes
        let blocks = mb * 1_000_000 / block.len() as u64;
        let sink = c
            .copy_in::<_, bytes::Bytes>("COPY bulk_sink FROM STDIN WHERE false")
            .await
            .unwrap_or_else(|e| panic!("COPY FROM STDIN: {}", pg_err(&e)));
        let mut sink = std::pin::pin!(sink);
        for _ in 0..blocks {
            sink.send(block.clone()).await.unwrap_or_else(|e| panic!("COPY FROM STDIN through {port}: {}", pg_err(&e)));
        }
        let rows =
            sink.as_mut().finish().await.unwrap_or_else(|e| panic!("COPY FROM STDIN through {port}: {}", pg_err(&e)));
        assert_eq!(rows, 0, "WHERE false keeps no row");
        blocks * block.len() as u64
    })
}

/// System calls per transaction of `pid` (every thread) during a pgbench `c8` run (`-C` with
/// `connect`: a connection per transaction): by call name, with "total" and "errors".
fn syscalls(pgbench: &Pgbench, pid: i32, port: u16, secs: u64, dir: &Path, connect: bool) -> BTreeMap<String, f64> {
    let out = dir.join(format!("strace-{pid}.txt"));
    let tids = threads(pid);
    let mut cmd = Command::new(require("strace", "strace"));
    cmd.args(["-c", "-f", "-qq", "-o", out.to_str().unwrap()]);
    for t in &tids {
        cmd.args(["-p", &t.to_string()]);
    }
    let mut strace = Proc::spawn("strace", cmd, &dir.join(format!("strace-{pid}.log")), false);
    wait_for("strace to attach to every thread", Duration::from_secs(20), || {
        tids.iter()
            .all(|t| {
                fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).is_ok_and(|s| {
                    s.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
                })
            })
            .then_some(())
    });
    let run = pgbench.run(port, 8, secs, connect);
    strace.signal(libc::SIGINT);
    wait_for("strace to write its summary", Duration::from_secs(20), || (!strace.running()).then_some(()));
    let text = fs::read_to_string(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let mut per = BTreeMap::new();
    let mut errors = 0.0;
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "% time seconds usecs/call calls [errors] syscall"
        if f.len() < 5 || f[0].parse::<f64>().is_err() {
            continue;
        }
        let Ok(calls) = f[3].parse::<f64>() else { continue };
        if f.len() == 6 && f[5] != "total" {
            errors += f[4].parse::<f64>().unwrap_or(0.0);
        }
        per.insert(f[f.len() - 1].to_owned(), calls / run.txns);
    }
    assert!(per.get("total").is_some_and(|t| *t > 0.0), "strace counted nothing:\n{text}");
    per.insert("errors".to_owned(), errors / run.txns);
    per
}

/// The C library's allocation calls counted by `MallocProbe`.
const ALLOC_CALLS: [&str; 3] = ["malloc", "calloc", "realloc"];

/// Uprobes on `malloc`, `calloc` and `realloc` of the C library that `pid` runs
/// (`probe_libc:malloc` …), removed on drop. Allocators with their own pools (HAProxy's) call
/// them less; both proxies' other allocation paths (`mmap`) are not counted.
struct MallocProbe {
    perf: std::path::PathBuf,
}

impl MallocProbe {
    fn add(pid: i32) -> MallocProbe {
        let perf = require("perf", "linux-perf");
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_else(|e| panic!("/proc/{pid}/maps: {e}"));
        let libc = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|path| path.contains("/libc.so") || path.contains("/libc-"))
            .unwrap_or_else(|| panic!("no C library mapped by {pid}"))
            .to_owned();
        let probe = MallocProbe { perf };
        // Probes left by an interrupted run are replaced.
        probe.remove();
        for f in ALLOC_CALLS {
            let out = Command::new(&probe.perf).args(["probe", "-q", "-x", &libc, f]).output().expect("perf probe");
            assert!(
                out.status.success(),
                "perf probe -x {libc} {f} (uprobes need root and a kernel with CONFIG_UPROBE_EVENTS): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        probe
    }

    fn remove(&self) {
        for f in ALLOC_CALLS {
            let _ = Command::new(&self.perf).args(["probe", "-q", "-d", &format!("probe_libc:{f}")]).output();
        }
    }

    /// Allocation calls per transaction of `pid` (every thread) during a pgbench `c8` run (`-C`
    /// with `connect`). `perf stat` starts with its counters off and counts only while pgbench
    /// runs (`--control`).
    fn per_txn(&self, pgbench: &Pgbench, pid: i32, port: u16, secs: u64, dir: &Path, connect: bool) -> f64 {
        use std::io::{Read as _, Write as _};
        use std::os::unix::fs::OpenOptionsExt;
        let (out, ctl, ack) = (
            dir.join(format!("allocs-{pid}.csv")),
            dir.join(format!("allocs-{pid}.ctl")),
            dir.join(format!("allocs-{pid}.ack")),
        );
        for fifo in [&ctl, &ack] {
            let _ = fs::remove_file(fifo);
            let st = Command::new("mkfifo").arg(fifo).status().expect("mkfifo");
            assert!(st.success(), "mkfifo {}", fifo.display());
        }
        let events = ALLOC_CALLS.map(|f| format!("probe_libc:{f}")).join(",");
        let control = format!("fifo:{},{}", ctl.display(), ack.display());
        let mut cmd = Command::new(&self.perf);
        cmd.args(["stat", "-x", ",", "-e", &events, "-D", "-1", "--control", &control]);
        cmd.args(["-o", out.to_str().unwrap(), "-p", &pid.to_string()]);
        let mut stat = Proc::spawn("perf stat", cmd, &dir.join(format!("allocs-{pid}.log")), false);
        // Non-blocking opens and reads, so that a perf that failed fails the wait, not the run.
        let mut ctl_w = wait_for("perf stat to open its control fifo", Duration::from_secs(20), || {
            fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&ctl).ok()
        });
        let mut ack_r = fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&ack).expect("ack fifo");
        let mut command = |what: &str| {
            ctl_w.write_all(format!("{what}\n").as_bytes()).unwrap_or_else(|e| panic!("perf stat {what}: {e}"));
            let mut got = Vec::new();
            wait_for(&format!("perf stat to {what} its counters"), Duration::from_secs(20), || {
                let mut b = [0u8; 16];
                if let Ok(n) = ack_r.read(&mut b) {
                    got.extend_from_slice(&b[..n]);
                }
                // perf writes "ack\n" and a NUL.
                got.windows(4).any(|w| w == b"ack\n").then_some(())
            });
        };
        command("enable");
        let run = pgbench.run(port, 8, secs, connect);
        command("disable");
        stat.signal(libc::SIGINT);
        wait_for("perf stat to write its counts", Duration::from_secs(20), || (!stat.running()).then_some(()));
        let text = fs::read_to_string(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        let counts: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("probe_libc:"))
            .filter_map(|l| l.split(',').next()?.trim().parse::<f64>().ok())
            .collect();
        assert!(counts.len() == ALLOC_CALLS.len(), "perf stat counted no allocation:\n{text}\n{}", stat.log_tail(10));
        counts.iter().sum::<f64>() / run.txns
    }
}

impl Drop for MallocProbe {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `perf record -g` of `pid` during a pgbench `c8` run of `secs` (`-C` with `connect`); prints
/// the top of `perf report` (self time by symbol, then by DSO: the kernel's share).
fn profile(pgbench: &Pgbench, pid: i32, port: u16, secs: u64, dir: &Path, label: &str, connect: bool) {
    let perf = require("perf", "linux-perf");
    let data = dir.join(format!("perf-{pid}.data"));
    let mut cmd = Command::new(&perf);
    // More samples for a closer look: `BENCH_PERF_FREQ` (999 per second).
    let freq = std::env::var("BENCH_PERF_FREQ").unwrap_or_else(|_| "999".to_owned());
    cmd.args(["record", "-g", "-F", &freq, "-o", data.to_str().unwrap(), "-p", &pid.to_string()]);
    let mut rec = Proc::spawn("perf", cmd, &dir.join(format!("perf-{pid}.log")), false);
    // perf writes nothing before it is attached; a short pgbench warm-up covers its start.
    pgbench.run(port, 8, 1, connect);
    pgbench.run(port, 8, secs, connect);
    rec.signal(libc::SIGINT);
    wait_for("perf record to finish", Duration::from_secs(60), || (!rec.running()).then_some(()));
    for sort in ["dso,sym", "dso"] {
        let out = Command::new(&perf)
            .args(["report", "--no-children", "--stdio", "-g", "none", "--percent-limit", "0.7", "--sort", sort])
            .arg("-i")
            .arg(&data)
            .output()
            .expect("perf report");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.trim().is_empty(),
            "perf report: {}\n{}\nperf record: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            rec.log_tail(20)
        );
        let c = if connect { " -C" } else { "" };
        println!("\n== perf profile of {label}, pgbench -S{c} -c 8 for {secs} s, self time by {sort}");
        for l in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).take(25) {
            println!("{l}");
        }
    }
}

fn main() {
    let p = Params::from_env();
    if !p.quick && !BenchArgs::from_env().bench_requested() {
        println!(
            "datapath bench: skipped (run it with `cargo bench --bench datapath`, or `PGFRONT_BENCH_QUICK=1` for the smoke run)"
        );
        return;
    }
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "datapath bench{}: {p:?}\ncpus: {}, load average at start: {}",
        if p.quick { " (quick)" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let fx = Fixture::start(&p);
    let pgbench = Pgbench { bin: require("pgbench", "postgresql-client-15") };
    let mut res = Results::default();
    let secs = p.secs;
    let c8 = format!("pgbench -S -c 8 -j 2 -T {secs} (scale {})", p.scale);
    let c64 = format!("pgbench -S -c 64 -j 2 -T {secs}");
    let idle = format!("pgbench -S -c 8 -j 2 -T {secs}, {} idle connections beside", p.idle);
    let conn = format!("pgbench -S -C -c 8 -j 2 -T {secs} (a connection per transaction)");
    let tcp = format!("connect, startup packet, echo, close; 8 at a time for {secs} s");
    let lat = format!("SELECT 1 round trip, one connection, {} in a row", p.latency_n);
    let copy = format!("COPY of {} MB", p.bulk_mb);
    let sys =
        format!("system calls per transaction of the proxy, pgbench -S -c 8 -T {} under strace -c -f", p.strace_secs);
    let sys_conn =
        format!("system calls per connection of the proxy, pgbench -S -C -c 8 -T {} under strace -c -f", p.strace_secs);
    let allocs = format!("allocations per transaction of the proxy, pgbench -S -c 8 -T {}", p.strace_secs);
    let allocs_conn = format!("allocations per connection of the proxy, pgbench -S -C -c 8 -T {}", p.strace_secs);
    let mut malloc_probe = None;
    let work = temp_dir("pgfront-bench-strace-");
    for round in 0..p.rounds {
        let mut routes = p.routes.clone();
        let n = routes.len().max(1);
        routes.rotate_left(round % n);
        eprintln!("-- round {} of {} (order: {routes:?})", round + 1, p.rounds);
        for r in routes.iter().copied() {
            let (pg_port, echo_port) = fx.ports(r);
            let pid = fx.pid(r);
            if p.wants("c8") {
                let (run, used) = cpu_during(pid, || pgbench.run(pg_port, 8, secs, false));
                res.add(&c8, "TPS", r, run.tps);
                add_cpu(&mut res, &c8, "txn", r, used, run.txns);
            }
            if p.wants("c64") {
                let (run, used) = cpu_during(pid, || pgbench.run(pg_port, 64, secs, false));
                res.add(&c64, "TPS", r, run.tps);
                add_cpu(&mut res, &c64, "txn", r, used, run.txns);
            }
            if p.wants("idle") {
                let conns = fx.open_idle(echo_port, p.idle);
                let (run, used) = cpu_during(pid, || pgbench.run(pg_port, 8, secs, false));
                drop(conns);
                res.add(&idle, "TPS", r, run.tps);
                add_cpu(&mut res, &idle, "txn", r, used, run.txns);
            }
            if p.wants("connect") {
                let (run, used) = cpu_during(pid, || pgbench.run(pg_port, 8, secs, true));
                res.add(&conn, "TPS", r, run.tps);
                add_cpu(&mut res, &conn, "txn", r, used, run.txns);
            }
            if p.wants("tcp") {
                let ((ok, failed, errors), used) = cpu_during(pid, || connect_loop(&fx.rt, echo_port, 8, secs));
                assert!(
                    ok > 0 && failed * 100 <= ok,
                    "connect loop through {}: {ok} ok, {failed} failed: {errors:?}",
                    r.label()
                );
                res.add(&tcp, "connections/s", r, ok as f64 / secs as f64);
                res.add(&tcp, "failed", r, failed as f64);
                add_cpu(&mut res, &tcp, "conn", r, used, ok as f64);
            }
            if p.wants("latency") {
                let v = latencies(pg_port, p.latency_n);
                res.add(&lat, "p50 µs", r, percentile(&v, 0.50));
                res.add(&lat, "p99 µs", r, percentile(&v, 0.99));
            }
            if p.wants("copy") {
                let (bytes, used) = cpu_during(pid, || {
                    let t = Instant::now();
                    let b = copy_out(&fx.rt, pg_port, p.bulk_mb);
                    (b, t.elapsed())
                });
                res.add(&copy, "TO STDOUT MB/s", r, bytes.0 as f64 / 1e6 / bytes.1.as_secs_f64());
                if r != Route::Direct {
                    res.add(&copy, "TO STDOUT proxy CPU s/GB", r, (used.0 + used.1) / (bytes.0 as f64 / 1e9));
                }
                let (bytes, used) = cpu_during(pid, || {
                    let t = Instant::now();
                    let b = copy_in(&fx.rt, pg_port, p.bulk_mb);
                    (b, t.elapsed())
                });
                res.add(&copy, "FROM STDIN MB/s", r, bytes.0 as f64 / 1e6 / bytes.1.as_secs_f64());
                if r != Route::Direct {
                    res.add(&copy, "FROM STDIN proxy CPU s/GB", r, (used.0 + used.1) / (bytes.0 as f64 / 1e9));
                }
            }
        }
        if p.wants("latency") && p.routes.contains(&Route::Direct) {
            // What each proxy adds to the direct path's round trip, this round.
            let direct = |m: &str| res.values[&(lat.clone(), m.to_owned())][&Route::Direct].last().copied();
            let (d50, d99) = (direct("p50 µs"), direct("p99 µs"));
            for r in routes.iter().copied().filter(|r| *r != Route::Direct) {
                let own = |m: &str| res.values[&(lat.clone(), m.to_owned())][&r].last().copied();
                if let (Some(d50), Some(d99), Some(p50), Some(p99)) = (d50, d99, own("p50 µs"), own("p99 µs")) {
                    res.add(&lat, "p50 added µs", r, p50 - d50);
                    res.add(&lat, "p99 added µs", r, p99 - d99);
                }
            }
        }
        for (figure, title, connect) in [("syscalls", &sys, false), ("syscalls-connect", &sys_conn, true)] {
            if p.wants(figure) {
                for r in routes.iter().copied().filter(|r| *r != Route::Direct) {
                    let per =
                        syscalls(&pgbench, fx.pid(r).unwrap(), fx.ports(r).0, p.strace_secs, work.path(), connect);
                    for (name, v) in per {
                        res.add(title, &name, r, v);
                    }
                }
            }
        }
        for (figure, title, connect) in [("allocs", &allocs, false), ("allocs-connect", &allocs_conn, true)] {
            if p.wants(figure) {
                let probe = malloc_probe.get_or_insert_with(|| {
                    MallocProbe::add(p.routes.iter().find_map(|r| fx.pid(*r)).expect("a proxy among the routes"))
                });
                for r in routes.iter().copied().filter(|r| *r != Route::Direct) {
                    let (pid, port) = (fx.pid(r).unwrap(), fx.ports(r).0);
                    res.add(
                        title,
                        "malloc + calloc + realloc calls",
                        r,
                        probe.per_txn(&pgbench, pid, port, p.strace_secs, work.path(), connect),
                    );
                }
            }
        }
        for (figure, connect) in [("profile", false), ("profile-connect", true)] {
            if p.wants(figure) {
                for r in routes.iter().copied().filter(|r| *r != Route::Direct) {
                    let (pid, port) = (fx.pid(r).unwrap(), fx.ports(r).0);
                    profile(&pgbench, pid, port, p.strace_secs, work.path(), r.label(), connect);
                }
            }
        }
        if round + 1 < p.rounds {
            res.print(&p.routes);
        }
    }
    println!("\n==== datapath: {} round(s), median [min–max]; then ratios of medians", p.rounds);
    res.print(&p.routes);
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("\nload average at end: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
}
