//! Memory per idle proxied connection: pgfront, HAProxy 2.6, and a minimal tokio proxy built
//! on `tokio::io::copy_bidirectional` (the baseline pgfront's own pipe must beat), measured in
//! the same run. Each proxy forwards N client connections to an echo backend on loopback;
//! every connection sends and receives a few bytes, then stays idle; the proxy's VmRSS growth
//! divided by N is reported. Also: a 64 MiB transfer through each, for throughput.
//!
//! Run: `cargo bench --bench idle_memory`: 5 rounds (`--rounds` / `BENCH_ROUNDS`), each with
//! fresh proxy processes measured in a rotating order, of 4000 connections (`--conns` /
//! `BENCH_CONNS`); printed as median [min–max]. `PGFRONT_BENCH_QUICK=1` (the test suite's
//! smoke run): one round of 200. Needs etcd and haproxy.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::echo::raise_fd_limit;
use common::stats::{median, spread, BenchArgs};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The baseline: accept, connect, `copy_bidirectional`. Runs as a child process of this bench.
fn baseline_proxy(listen: &str, backend: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let l = TcpListener::bind(listen).await.unwrap();
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let backend = backend.to_owned();
            tokio::spawn(async move {
                if let Ok(mut s) = TcpStream::connect(&backend).await {
                    let _ = c.set_nodelay(true);
                    let _ = s.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
            });
        }
    });
}

async fn echo_backend(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// A connection through a proxy to the echo backend. pgfront reads a client's first packet
/// and waits for the server's first byte before piping, so open with a startup packet (the
/// echo backend answers it with itself).
async fn connect(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut startup = 196608u32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0bench\0\0");
    let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(startup);
    c.write_all(&packet).await.unwrap();
    let mut back = vec![0u8; packet.len()];
    c.read_exact(&mut back).await.unwrap();
    c
}

async fn measure(name: &str, port: u16, pid: i32, n: usize) -> (f64, f64) {
    // Warm up: one connection through, so lazily built state is not counted.
    let mut warm = connect(port).await;
    warm.write_all(b"warm").await.unwrap();
    let mut b = [0u8; 4];
    warm.read_exact(&mut b).await.unwrap();
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = connect(port).await;
        c.write_all(b"hello pgfront").await.unwrap();
        let mut b = [0u8; 13];
        c.read_exact(&mut b).await.unwrap();
        conns.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    drop(conns);
    // Throughput: 64 MiB up and back through one connection.
    let c = connect(port).await;
    c.set_nodelay(true).unwrap();
    let total = 64usize << 20;
    let (mut r, mut w) = c.into_split();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < total {
        let k = r.read(&mut buf).await.unwrap();
        assert!(k > 0, "{name}: connection closed early");
        got += k;
    }
    let _w = writer.await.unwrap();
    let mbps = (2 * total) as f64 / start.elapsed().as_secs_f64() / 1e6;
    println!("{name:<28} rss {before:>7} KiB -> {after:>7} KiB with {n} idle connections: {per_conn:>7.0} B/conn; echo 64 MiB: {mbps:>6.0} MB/s");
    (per_conn, mbps)
}

/// The three proxies of one round, each a fresh process: memory growth is measured from a
/// process that never had the connections (a process that had them and closed them keeps the
/// memory for the next ones).
struct Proxies {
    pgfront: Pgfront,
    haproxy: Proc,
    baseline: Proc,
    ports: [u16; 3],
    _work: tempfile::TempDir,
}

fn start_proxies(etcd: &Etcd, backend_port: u16) -> Proxies {
    let work = tempfile::tempdir().unwrap();
    let (pf_port, admin, hp_port, base_port) = (free_port(), free_port(), free_port(), free_port());
    let pgfront = Pgfront::start(
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[cluster]]\nname = \"m\"\nscope = \"membench\"\netcd_endpoints = [\"{}\"]\n\
             [[listener]]\nname = \"rw\"\ncluster = \"m\"\nbind = \"127.0.0.1:{pf_port}\"\nserver_maxconn = 100000\nmaxconn = 100000\n",
            etcd.endpoint()
        ),
        admin,
    );
    pgfront.wait_primary("m", "m1", Duration::from_secs(10));
    let cfg = work.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 4s\n  timeout client 30m\n  timeout server 30m\n\
             listen rw\n  bind 127.0.0.1:{hp_port}\n  balance leastconn\n  server m1 127.0.0.1:{backend_port} maxconn 9000\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(require("haproxy", "haproxy"));
    cmd.args(["-db", "-f", cfg.to_str().unwrap()]);
    let haproxy = Proc::spawn("haproxy", cmd, &work.path().join("haproxy.log"), false);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--baseline-proxy", &format!("127.0.0.1:{base_port}"), &format!("127.0.0.1:{backend_port}")]);
    let baseline = Proc::spawn("copy_bidirectional", cmd, &work.path().join("baseline.log"), false);
    for p in [hp_port, base_port] {
        wait_for("proxy to listen", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", p)).ok());
    }
    Proxies { pgfront, haproxy, baseline, ports: [pf_port, hp_port, base_port], _work: work }
}

const NAMES: [&str; 3] = ["pgfront", "HAProxy 2.6", "tokio copy_bidirectional"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline-proxy") {
        baseline_proxy(&args[i + 1], &args[i + 2]);
        return;
    }
    let bench = BenchArgs::from_env();
    if !bench.bench_requested() && !bench.quick {
        println!("idle_memory bench: skipped (run it with `cargo bench --bench idle_memory`)");
        return;
    }
    let n = bench.num("--conns", "BENCH_CONNS", 4000, 200) as usize;
    let rounds = bench.num("--rounds", "BENCH_ROUNDS", 5, 1) as usize;
    raise_fd_limit();
    let rt = runtime();
    let backend = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    rt.spawn(echo_backend(backend));

    // pgfront learns the backend from Patroni-style keys in a real etcd.
    let etcd = Etcd::start();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap();
        c.put("/service/membench/leader", "m1", None).await.unwrap();
        let member =
            format!(r#"{{"conn_url":"postgres://127.0.0.1:{backend_port}/x","role":"master","state":"running"}}"#);
        c.put("/service/membench/members/m1", member, None).await.unwrap();
    });

    // Per proxy: bytes per idle connection, echo MB/s; one value per round.
    let mut per_conn: [Vec<f64>; 3] = Default::default();
    let mut mbps: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        let p = start_proxies(&etcd, backend_port);
        let pids = [p.pgfront.proc.pid(), p.haproxy.pid(), p.baseline.pid()];
        // The order rotates from round to round.
        for k in 0..3 {
            let i = (round + k) % 3;
            let (b, t) = rt.block_on(measure(NAMES[i], p.ports[i], pids[i], n));
            per_conn[i].push(b);
            mbps[i].push(t);
        }
    }
    println!(
        "\n== {n} idle connections through each proxy, {rounds} rounds (fresh processes each round), median [min–max]"
    );
    println!("{:<28} {:>26} {:>26}", "proxy", "memory per idle conn, B", "echo 64 MiB, MB/s");
    for i in 0..3 {
        println!("{:<28} {:>26} {:>26}", NAMES[i], spread(&per_conn[i], 0), spread(&mbps[i], 0));
    }
    let ratio = |v: &[Vec<f64>; 3], j: usize| median(&v[0]) / median(&v[j]);
    println!(
        "pgfront / HAProxy: memory per idle connection {:.2}x, throughput {:.2}x",
        ratio(&per_conn, 1),
        ratio(&mbps, 1)
    );
    println!(
        "pgfront / copy_bidirectional: memory per idle connection {:.2}x, throughput {:.2}x",
        ratio(&per_conn, 2),
        ratio(&mbps, 2)
    );
}
