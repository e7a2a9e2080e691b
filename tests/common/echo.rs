//! Echo "databases" behind Patroni-format keys, for tests of the proxy's own socket handling
//! (reload, upgrade): what is under test there is pgfront, not PostgreSQL. Clients speak first
//! with a real PostgreSQL startup packet, which pgfront handles as it would a real one, and the
//! echo answers it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A StartupMessage (protocol 3.0) for user `app`.
pub fn startup() -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

/// An echo server on loopback until `stop`; returns its port.
pub async fn echo_server(stop: CancellationToken) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                r = l.accept() => match r { Ok(a) => a, Err(_) => continue },
                _ = stop.cancelled() => return,
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// Connects through `port`, sends a startup packet and reads it back.
pub async fn handshake(port: u16) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let p = startup();
    s.write_all(&p).await?;
    let mut back = vec![0u8; p.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo within 20 s"))??;
    if back != p {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "echo differs (an ErrorResponse?)"));
    }
    Ok(s)
}

/// Writes Patroni-format keys for scope `scope`: `pg1` the leader on `primary`, `pg2` a replica.
pub async fn put_keys(etcd: &str, scope: &str, primary: u16, replica: u16) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    let member = |port: u16, role: &str| {
        format!(
            r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:1/patroni","state":"running","role":"{role}","version":"3.0.2","xlog_location":100,"timeline":1}}"#
        )
    };
    c.put(format!("/service/{scope}/members/pg1"), member(primary, "master"), None).await.unwrap();
    c.put(format!("/service/{scope}/members/pg2"), member(replica, "replica"), None).await.unwrap();
    c.put(format!("/service/{scope}/leader"), "pg1", None).await.unwrap();
}

/// Writes one Patroni-format member key (`role` as Patroni 3.0 writes it: `master`, `replica`).
pub async fn put_member(etcd: &str, scope: &str, name: &str, port: u16, role: &str) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    let value = format!(
        r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:1/patroni","state":"running","role":"{role}","version":"3.0.2","xlog_location":100,"timeline":1}}"#
    );
    c.put(format!("/service/{scope}/members/{name}"), value, None).await.unwrap();
}

/// Writes the leader key of `scope`.
pub async fn put_leader(etcd: &str, scope: &str, name: &str) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    c.put(format!("/service/{scope}/leader"), name, None).await.unwrap();
}

/// One round trip of `msg` on an echo session; false when the session is closed (EOF, reset or
/// no answer within 5 s).
pub async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> bool {
    let r = async {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        std::io::Result::Ok(back == msg)
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), r).await, Ok(Ok(true)))
}

/// Raises this process's descriptor limit (children such as pgfront inherit it): thousands of
/// sockets would otherwise test EMFILE instead.
pub fn raise_fd_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < 65536.min(l.rlim_max) {
            l.rlim_cur = 65536.min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// What a load saw: successes, failures (with the first few reasons), and what is in flight.
#[derive(Default)]
pub struct Counts {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub in_flight: AtomicU64,
    pub errors: std::sync::Mutex<Vec<String>>,
}

impl Counts {
    pub fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(what);
            }
        }
    }
}

/// `n` long-lived sessions through `port`, each exchanging a message every 100 ms until `stop`
/// (3000 messages at most).
pub fn long_lived(
    rt: &tokio::runtime::Runtime,
    port: u16,
    n: usize,
    stop: &CancellationToken,
    counts: &std::sync::Arc<Counts>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let (stop, counts) = (stop.clone(), counts.clone());
            rt.spawn(async move {
                let mut s = match handshake(port).await {
                    Ok(s) => s,
                    Err(e) => return counts.fail(format!("long-lived session, connect: {e}")),
                };
                let mut i = 0u64;
                while !stop.is_cancelled() && i < 3000 {
                    i += 1;
                    let msg = i.to_be_bytes();
                    let mut back = [0u8; 8];
                    let r = async {
                        s.write_all(&msg).await?;
                        s.read_exact(&mut back).await?;
                        std::io::Result::Ok(())
                    };
                    match tokio::time::timeout(Duration::from_secs(10), r).await {
                        Ok(Ok(())) if back == msg => counts.ok.fetch_add(1, Ordering::Relaxed),
                        r => return counts.fail(format!("long-lived session, round trip {i}: {r:?}")),
                    };
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect()
}

/// A new connection through `port` every millisecond until `stop` (5 minutes at most), each
/// checked with a handshake.
pub fn opener(
    rt: &tokio::runtime::Runtime,
    port: u16,
    stop: &CancellationToken,
    counts: &std::sync::Arc<Counts>,
) -> tokio::task::JoinHandle<()> {
    let (stop, counts) = (stop.clone(), counts.clone());
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let start = tokio::time::Instant::now();
        while !stop.is_cancelled() && start.elapsed() < Duration::from_secs(300) {
            tick.tick().await;
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
    })
}

/// Ends a load (`stop`, then waits for the opener, the long-lived sessions and the connections
/// in flight), prints what it saw, prefixed by `what` (e.g. "50 reloads"), and asserts that
/// nothing failed.
pub fn finish_load(
    rt: &tokio::runtime::Runtime,
    what: &str,
    elapsed: Duration,
    stop: &CancellationToken,
    opener: tokio::task::JoinHandle<()>,
    long: Vec<tokio::task::JoinHandle<()>>,
    conns: &Counts,
    sessions: &Counts,
) {
    stop.cancel();
    rt.block_on(opener).unwrap();
    for h in long {
        rt.block_on(h).unwrap();
    }
    super::wait_for("the last connections", Duration::from_secs(30), || {
        (conns.in_flight.load(Ordering::Relaxed) == 0).then_some(())
    });
    let (c_ok, c_failed) = (conns.ok.load(Ordering::Relaxed), conns.failed.load(Ordering::Relaxed));
    let (s_ok, s_failed) = (sessions.ok.load(Ordering::Relaxed), sessions.failed.load(Ordering::Relaxed));
    eprintln!(
        "{what} in {:.1} s: {c_ok} new connections ok ({:.0}/s), {c_failed} failed; long-lived: {s_ok} round trips ok, {s_failed} broken",
        elapsed.as_secs_f64(),
        c_ok as f64 / elapsed.as_secs_f64()
    );
    for e in conns.errors.lock().unwrap().iter().chain(sessions.errors.lock().unwrap().iter()) {
        eprintln!("  {e}");
    }
    assert_eq!(c_failed, 0, "failed new connections");
    assert_eq!(s_failed, 0, "broken long-lived sessions");
}
