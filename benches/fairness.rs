//! Pipe fairness (issue 6, defect 4): the latency of small request/response sessions through
//! pgfront's pipe, with and without one bulk flow (a backend streaming without pause, like a
//! large `COPY ... TO STDOUT`) on the same proxy runtime.
//!
//! Backend, proxy and clients run in this process, on loopback, in separate runtimes: the
//! backend (echo, or an endless sender for the bulk flow) and the small clients on their own
//! threads, the bulk client drained by a plain std thread, and the proxy — an accept loop and
//! `pgfront::proxy::pipe::pipe` per connection, as in pgfront without the protocol — on a runtime
//! of its own: current-thread (the worst case, one worker) and multi-thread with 2 workers
//! (pgfront's runtime on this 2-core machine). Each scenario runs `BENCH_SECONDS` (default 2)
//! with 100 sessions doing 64-byte round trips back to back; p50/p99/max of the round trips
//! are printed.
//!
//! Run: `cargo bench --bench fairness`.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SESSIONS: usize = 100;
const MSG: usize = 64;

/// First byte of a backend connection: `B` for the bulk sender, anything else for echo.
async fn backend(l: TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { continue };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).await.is_err() {
                return;
            }
            if first[0] == b'B' {
                let chunk = vec![b'd'; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
                return;
            }
            let mut buf = [0u8; 4096];
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

/// pgfront's data path without the protocol: accept, connect, `pipe`.
async fn proxy(l: TcpListener, backend: SocketAddr) {
    loop {
        let Ok((c, _)) = l.accept().await else { continue };
        tokio::spawn(async move {
            let Ok(s) = TcpStream::connect(backend).await else { return };
            let _ = c.set_nodelay(true);
            let _ = s.set_nodelay(true);
            let _ = pgfront::proxy::pipe::pipe(&c, &s, &Counter::default(), &Counter::default()).await;
        });
    }
}

/// 100 sessions, round trips until `until`; returns every round trip's latency and how many
/// were still unanswered at the end.
async fn small_sessions(proxy: SocketAddr, until: Instant) -> (Vec<Duration>, usize) {
    let mut tasks = Vec::new();
    for _ in 0..SESSIONS {
        tasks.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(proxy).await.unwrap();
            c.set_nodelay(true).unwrap();
            c.write_all(b"E").await.unwrap();
            let mut lat = Vec::new();
            let msg = [b'q'; MSG];
            let mut back = [0u8; MSG];
            while Instant::now() < until {
                let t = Instant::now();
                c.write_all(&msg).await.unwrap();
                let answered =
                    tokio::time::timeout_at((until + Duration::from_secs(5)).into(), c.read_exact(&mut back));
                match answered.await {
                    Ok(Ok(_)) => lat.push(t.elapsed()),
                    _ => return (lat, 1),
                }
            }
            (lat, 0)
        }));
    }
    let mut all = Vec::new();
    let mut stuck = 0;
    for t in tasks {
        let (l, s) = t.await.unwrap();
        all.extend(l);
        stuck += s;
    }
    (all, stuck)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(label: &str, addr: SocketAddr, clients: &tokio::runtime::Runtime, secs: f64) {
    for bulk in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let drain = bulk.then(|| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut s, b"B").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = s.read(&mut buf) {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            })
        });
        if bulk {
            std::thread::sleep(Duration::from_millis(200)); // the bulk flow is at full speed
        }
        let start = Instant::now();
        let before = received.load(Ordering::Relaxed);
        let (mut lat, stuck) = clients.block_on(small_sessions(addr, start + Duration::from_secs_f64(secs)));
        let elapsed = start.elapsed().as_secs_f64();
        let bulk_mbps = (received.load(Ordering::Relaxed) - before) as f64 / elapsed / 1e6;
        stop.store(true, Ordering::Relaxed);
        if let Some(d) = drain {
            d.join().unwrap();
        }
        lat.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{label:<26} {:<14} round trips {:>7}  p50 {:>8.0} µs  p99 {:>9.0} µs  max {:>9.0} µs  unanswered {stuck:>3}{}",
            if bulk { "+ bulk flow" } else { "alone" },
            lat.len(),
            us(pct(&lat, 0.5)),
            us(pct(&lat, 0.99)),
            us(lat.last().copied().unwrap_or_default()),
            if bulk { format!("  bulk {bulk_mbps:.0} MB/s") } else { String::new() },
        );
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("fairness bench: skipped (run it with `cargo bench --bench fairness`)");
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2.0);
    let backend_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let l = backend_rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let backend_addr = l.local_addr().unwrap();
    backend_rt.spawn(backend(l));
    let clients = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();

    // The proxy on a current-thread runtime, driven by a thread of its own (left running).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move { proxy(TcpListener::from_std(l).unwrap(), backend_addr).await });
    });
    run("proxy: current-thread", addr, &clients, secs);

    let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let l = multi.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    multi.spawn(proxy(l, backend_addr));
    run("proxy: multi-thread (2)", addr, &clients, secs);
}
