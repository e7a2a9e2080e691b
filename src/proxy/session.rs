//! One client connection: read its first packet, place it on a server (queueing and retrying
//! within the queue timeout), then pipe bytes both ways until a side closes, the server is
//! drained, or the process stops.
//!
//! The client speaks first, so pgfront reads that first packet itself (bounded: at most
//! `pgwire::MAX_STARTUP_LEN` bytes, within `FIRST_PACKET_TIMEOUT`) before choosing a server:
//! - a `CancelRequest` whose key a session on this process learnt is forwarded straight to the
//!   server running that session (`cancel`), without a pool slot; other cancels are routed
//!   like a session;
//! - anything else is sent to the chosen server, and the connect counts as done only when the
//!   server answers its first byte, within `connect_timeout` (connect included). A server that
//!   completes TCP handshakes but never answers — a SIGSTOPped postmaster, whose kernel still
//!   fills its listen backlog — is then a failed connect like a refused one, instead of a
//!   client piped to a server that never speaks.
//!
//! Retrying is safe because it happens only before the first byte reaches the client: until
//! then the client has only seen the kernel accept it. A failed connect to the only eligible
//! server (a primary shutting down for a switchover, before Patroni releases its key; a hung
//! one) is not an error for the client: it waits for the topology to change or a short
//! backoff, and tries again until `queue_timeout`, then gets a 57P03 `ErrorResponse`. While it
//! waits, its connection is watched: a client that leaves is dropped from the queue at once.
//! A connect that fails for lack of file descriptors is pgfront's fault, not the server's: it
//! is retried the same way and answered with 53300 if the queue timeout passes.
//!
//! Sessions whose server hangs once placed are bounded by TCP keepalive (`tcp_keepalive`, on
//! both sockets: probes after that much idle time, every 10 s, 3 unanswered probes close the
//! connection); a session with data in flight to a dead host is bounded by the kernel's
//! retransmission limit instead (`net.ipv4.tcp_retries2`). A SIGSTOPped postmaster leaves the
//! sessions it already forked running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::cancel::{self, CancelMap, KeyWatch};
use super::pgwire::{self, sqlstate, FirstPacket, Kind};
use super::pipe;
use crate::balancer::pool::{Lease, Pool, Refusal};
use crate::config::{ListenerConfig, Role};
use crate::events::Events;
use crate::metrics::Both;

/// How long a refused client gets to read its ErrorResponse.
const REFUSE_LIMIT: Duration = Duration::from_secs(5);
/// How long a new client has to send its first packet (clients send it right after connecting;
/// PostgreSQL allows `authentication_timeout`, 60 s, for the whole authentication).
pub const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff bounds after every eligible server refused a connect.
const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(200);

/// What every session of one listener shares.
pub struct SessionCtx {
    pub cfg: Arc<ListenerConfig>,
    pub pool: Arc<Pool>,
    /// Which server runs each open session's cancel key (shared by every listener).
    pub cancels: Arc<CancelMap>,
    /// Stop placing clients (queued ones are refused): the process is stopping.
    pub stop: CancellationToken,
    /// Close every open session now.
    pub kill: CancellationToken,
    /// Where refusals are counted for the status page (coalesced per listener and reason).
    pub events: Events,
}

/// Why a client is refused: the pool's answer, or pgfront out of file descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Pool(Refusal),
    NoDescriptors,
}

/// Serves one client. `_permits` (the listener's `maxconn`, the process's descriptor budget) are
/// given back when the session ends.
pub async fn run(
    mut client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<SessionCtx>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let accepted_at = Instant::now();
    let m = ctx.pool.metrics();
    m.accepted.inc();
    m.active.inc();
    let _active = scopeguard(|| {
        m.active.dec();
    });
    // TCP_NODELAY and keepalive: inherited from the listening socket (`listener::Inherited`).

    let first = tokio::select! {
        // The packet is usually there already (the listener defers accepts until the client
        // speaks): read it before polling, and so registering with, the stop token.
        biased;
        r = tokio::time::timeout(FIRST_PACKET_TIMEOUT, pgwire::read_first(&mut client)) => r,
        _ = ctx.stop.cancelled() => return,
    };
    let FirstPacket { kind, bytes } = match first {
        Ok(Ok(p)) if p.kind != Kind::Invalid => p,
        Ok(Ok(_)) => {
            m.bad_startup.inc();
            debug!(listener = %ctx.cfg.name, %peer, "closed: the first packet is not PostgreSQL");
            return;
        }
        Ok(Err(e)) => {
            m.bad_startup.inc();
            debug!(listener = %ctx.cfg.name, %peer, error = %e, "closed before its first packet");
            return;
        }
        Err(_) => {
            m.bad_startup.inc();
            debug!(listener = %ctx.cfg.name, %peer, "closed: no first packet within {FIRST_PACKET_TIMEOUT:?}");
            return;
        }
    };
    if kind == Kind::Cancel {
        // `read_first` only returns a Cancel of at least 16 bytes; `get` keeps that local.
        let known = bytes.get(8..).and_then(|key| ctx.cancels.lookup(key));
        if let Some(server) = known {
            m.cancels_routed.inc();
            if let Err(e) = cancel::forward(server, &bytes, ctx.cfg.connect_timeout).await {
                debug!(listener = %ctx.cfg.name, %peer, %server, error = %e, "cancel request not delivered");
            }
            return;
        }
        m.cancels_unrouted.inc();
    }

    let deadline = Instant::now() + ctx.cfg.queue_timeout;
    let placed = tokio::select! {
        r = connect_backend(&ctx, deadline, &bytes, answer_expected(kind)) => r,
        _ = client_gone(&client) => {
            debug!(listener = %ctx.cfg.name, %peer, "client left while waiting for a server");
            return;
        }
        _ = ctx.stop.cancelled() => Err(Refused::Pool(Refusal::Closed)),
    };
    let (lease, server, prefix) = match placed {
        Ok(p) => {
            // The first packet went to this server: it counts as the session's first bytes.
            m.bytes_from_clients.inc_by(bytes.len() as u64);
            p.0.server.sent_bytes.inc_by(bytes.len() as u64);
            p
        }
        Err(refused) => {
            let (code, msg) = refusal_message(&ctx.cfg, refused);
            let (counter, reason) = match refused {
                Refused::Pool(Refusal::NoServer) => (&m.refused_no_server, "no_server"),
                Refused::Pool(Refusal::Full) => (&m.refused_full, "full"),
                Refused::Pool(Refusal::Closed) => (&m.refused_closed, "closed"),
                Refused::NoDescriptors => (&m.refused_no_descriptors, "no_descriptors"),
            };
            counter.inc();
            ctx.events.refused(&ctx.cfg.name, reason, || msg.clone());
            warn!(listener = %ctx.cfg.name, %peer, code, "refused: {msg}");
            pgwire::refuse(&mut client, kind, code, &msg, REFUSE_LIMIT).await;
            return;
        }
    };
    drop(bytes);
    // However the session ends (closed, drained, killed), from the client's accept.
    let _duration = scopeguard(|| lease.server.session_duration.observe(accepted_at.elapsed().as_secs_f64()));

    let mut keys = KeyWatch::new(&ctx.cancels, &lease.backend.addr, kind);
    // What the connect already read of the server's answer goes to the client first.
    let mut scanning = true;
    if !prefix.is_empty() {
        scanning = keys.feed(&prefix);
        if let Err(e) = client.write_all(&prefix).await {
            debug!(listener = %ctx.cfg.name, %peer, error = %e, "client gone before the server's first message");
            return;
        }
        m.bytes_to_clients.inc_by(prefix.len() as u64);
        lease.server.received_bytes.inc_by(prefix.len() as u64);
    }
    drop(prefix);
    let mut watch = |chunk: &[u8]| keys.feed(chunk);
    let up = Both(&m.bytes_from_clients, &lease.server.sent_bytes);
    let down = Both(&m.bytes_to_clients, &lease.server.received_bytes);
    tokio::select! {
        r = pipe::pipe_watching(&client, &server, &up, &down, scanning.then_some(&mut watch)) => {
            if let Err(e) = r {
                debug!(listener = %ctx.cfg.name, %peer, member = %lease.backend.member, error = %e, "session ended");
            }
        }
        _ = lease.drain.cancelled() => {
            m.drained.inc();
            debug!(listener = %ctx.cfg.name, %peer, member = %lease.backend.member, "closed: server drained");
        }
        _ = ctx.kill.cancelled() => {}
    }
}

/// Places the client on a server, retrying failed connects until `deadline`. `first` is the
/// client's first packet, sent to the server; with `expect_answer` the connect is done only
/// once the server has answered it.
async fn connect_backend(
    ctx: &SessionCtx,
    deadline: Instant,
    first: &[u8],
    expect_answer: Answer,
) -> Result<(Lease, TcpStream, Vec<u8>), Refused> {
    let mut avoid = Vec::new();
    let mut backoff = RETRY_MIN;
    let mut changes = ctx.pool.changes();
    loop {
        let lease = ctx.pool.acquire(&avoid, deadline).await.map_err(Refused::Pool)?;
        changes.borrow_and_update();
        let started = Instant::now();
        let limit = ctx.cfg.connect_timeout.min(deadline.saturating_duration_since(started));
        let opened = tokio::time::timeout(limit, open(lease.backend.addr, first, expect_answer, ctx.cfg.tcp_keepalive));
        let err = match opened.await {
            Ok(Ok((s, prefix))) => {
                lease.server.connect_time.observe(started.elapsed().as_secs_f64());
                lease.server.connections.inc();
                return Ok((lease, s, prefix));
            }
            Ok(Err(e)) => e,
            Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {limit:?}")),
        };
        if out_of_descriptors(&err) {
            // pgfront's own limit, not the server's fault: keep the server, wait for
            // descriptors to free up.
            debug!(listener = %ctx.cfg.name, error = %err, "backend connect: out of file descriptors");
            drop(lease);
            if Instant::now() >= deadline {
                return Err(Refused::NoDescriptors);
            }
            tokio::time::sleep_until((Instant::now() + backoff).min(deadline)).await;
            backoff = (backoff * 2).min(RETRY_MAX);
            continue;
        }
        ctx.pool.metrics().connect_errors.inc();
        lease.server.connect_errors.inc();
        debug!(listener = %ctx.cfg.name, member = %lease.backend.member, addr = %lease.backend.addr, error = %err, "backend connect failed");
        avoid.push(lease.backend.clone());
        drop(lease);
        if Instant::now() >= deadline {
            return Err(Refused::Pool(Refusal::NoServer));
        }
        if !ctx.pool.has_alternative(&avoid) {
            // Every eligible server failed: wait for the topology to move, or a short backoff.
            let until = (Instant::now() + backoff).min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = changes.changed() => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX);
            avoid.clear();
        }
    }
}

/// What a connect waits for before it counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Nothing (a cancel request gets no answer).
    Nothing,
    /// The server's first byte (the one-byte answer to SSLRequest / GSSENCRequest, or a TLS
    /// record): left in the socket for the pipe.
    FirstByte,
    /// The server's first message to a StartupMessage, read here: a server that answers
    /// `57P03` (cannot_connect_now: "the database system is shutting down", "… is starting
    /// up", "… is in recovery mode") has not served the client, so the connect is failed and
    /// retried like a refused one; any other message is handed to the client first.
    FirstMessage,
}

fn answer_expected(kind: Kind) -> Answer {
    match kind {
        Kind::Cancel => Answer::Nothing,
        Kind::Startup { .. } => Answer::FirstMessage,
        _ => Answer::FirstByte,
    }
}

/// Largest first message read here (an ErrorResponse is a few hundred bytes).
const MAX_FIRST_MESSAGE: usize = 8192;

/// Connects to `addr`, sends the client's first packet and waits for the answer `expect`
/// says. Returns the socket and the bytes already read from it (to be sent to the client
/// before the pipe starts).
async fn open(
    addr: SocketAddr,
    first: &[u8],
    expect: Answer,
    keepalive: Option<Duration>,
) -> std::io::Result<(TcpStream, Vec<u8>)> {
    let closed = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed without answering");
    let mut s = TcpStream::connect(addr).await?;
    tune(&s, keepalive);
    s.write_all(first).await?;
    match expect {
        Answer::Nothing => Ok((s, Vec::new())),
        Answer::FirstByte => {
            let mut b = [0u8; 1];
            if s.peek(&mut b).await? == 0 {
                return Err(closed());
            }
            Ok((s, Vec::new()))
        }
        Answer::FirstMessage => {
            let mut head = [0u8; 5];
            s.read_exact(&mut head).await.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    closed()
                } else {
                    e
                }
            })?;
            let mut got = head.to_vec();
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if head[0] == b'E' && (4..=MAX_FIRST_MESSAGE).contains(&len) {
                got.resize(1 + len, 0);
                s.read_exact(&mut got[5..]).await?;
                if let Some((code, message)) = pgwire::error_code(&got[5..]) {
                    if code == sqlstate::CANNOT_CONNECT_NOW {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            format!("the server is not ready ({code}: {message})"),
                        ));
                    }
                }
            }
            Ok((s, got))
        }
    }
}

/// The process (or system) is out of file descriptors or socket memory.
pub(crate) fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

fn refusal_message(cfg: &ListenerConfig, r: Refused) -> (&'static str, String) {
    let what = match cfg.role {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::ReadOnly => "replica or primary",
    };
    match r {
        Refused::Pool(Refusal::NoServer) => (
            sqlstate::CANNOT_CONNECT_NOW,
            format!("pgfront: no {what} available for cluster {} (listener {}, waited {:?})", cfg.cluster, cfg.name, cfg.queue_timeout),
        ),
        Refused::Pool(Refusal::Full) => (
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "pgfront: too many connections: every {what} of cluster {} is at server_maxconn {} (listener {}, waited {:?})",
                cfg.cluster, cfg.server_maxconn, cfg.name, cfg.queue_timeout
            ),
        ),
        Refused::Pool(Refusal::Closed) => (sqlstate::ADMIN_SHUTDOWN, "pgfront is shutting down".to_owned()),
        Refused::NoDescriptors => (
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "pgfront: too many connections: out of file descriptors (listener {}, waited {:?}; raise LimitNOFILE)",
                cfg.name, cfg.queue_timeout
            ),
        ),
    }
}

/// TCP_NODELAY and keepalive on a proxied socket. Failures only cost latency, so they are
/// logged, not fatal.
fn tune(s: &TcpStream, keepalive: Option<Duration>) {
    // A new socket has no keepalive: nothing to switch off.
    let set = match keepalive {
        Some(_) => super::listener::set_tcp_options(SockRef::from(s), keepalive),
        None => s.set_nodelay(true),
    };
    if let Err(e) = set {
        debug!(error = %e, "TCP_NODELAY / keepalive");
    }
}

/// Resolves when a waiting client closes its connection. Its first packet has been read and it
/// waits for an answer, so anything readable is its EOF (or a reset); a client that sends more
/// before being answered is simply not watched any longer.
async fn client_gone(s: &TcpStream) {
    let mut b = [0u8; 1];
    match s.peek(&mut b).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

struct ScopeGuard<F: FnMut()>(F);
impl<F: FnMut()> Drop for ScopeGuard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> ScopeGuard<F> {
    ScopeGuard(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;
    use crate::metrics::Metrics;
    use crate::topology::{Backend, Targets};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, Semaphore};

    fn listener_cfg(role: Role, connect_timeout: Duration, queue_timeout: Duration) -> Arc<ListenerConfig> {
        Arc::new(ListenerConfig {
            name: "t".into(),
            cluster: "c".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            role,
            balance: Balance::Leastconn,
            server_maxconn: 10,
            maxconn: 100,
            queue_timeout,
            connect_timeout,
            tcp_keepalive: None,
            max_replica_lag: None,
            drain_grace: Duration::ZERO,
            backlog: 128,
        })
    }

    /// A listener running `run` for every client, routing to `servers`.
    async fn front(cfg: Arc<ListenerConfig>, servers: &[SocketAddr]) -> (SocketAddr, Arc<SessionCtx>) {
        let pool = Pool::new(&cfg, Metrics::new().listener("t"));
        let eligible = servers.iter().enumerate().map(|(i, a)| Backend { member: format!("m{i}").into(), addr: *a });
        pool.apply(&Targets { eligible: eligible.collect(), keep: vec![] }, Duration::ZERO);
        let cancels = Arc::new(CancelMap::new(Default::default()));
        let ctx = Arc::new(SessionCtx {
            cfg,
            pool,
            cancels,
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            events: Events::default(),
        });
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, sem) = (ctx.clone(), Arc::new(Semaphore::new(100)));
        tokio::spawn(async move {
            while let Ok((s, peer)) = l.accept().await {
                let permits = (sem.clone().acquire_owned().await.unwrap(), sem.clone().acquire_owned().await.unwrap());
                tokio::spawn(run(s, peer, c.clone(), permits));
            }
        });
        (addr, ctx)
    }

    fn startup() -> Vec<u8> {
        let mut body = 196608u32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0u\0\0");
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    /// A PostgreSQL stand-in: answers a startup with AuthenticationOk, BackendKeyData (pid =
    /// `pid`) and ReadyForQuery, then holds the session; reports every cancel request it gets.
    async fn fake_server(pid: u32, cancels: mpsc::UnboundedSender<(u32, Vec<u8>)>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let cancels = cancels.clone();
                tokio::spawn(async move {
                    let Ok(p) = pgwire::read_first(&mut s).await else { return };
                    if p.kind == Kind::Cancel {
                        let _ = cancels.send((pid, p.bytes));
                        return;
                    }
                    let mut hello = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'K', 0, 0, 0, 12];
                    hello.extend_from_slice(&pid.to_be_bytes());
                    hello.extend_from_slice(&[7, 7, 7, 7]);
                    hello.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                    if s.write_all(&hello).await.is_ok() {
                        let mut rest = Vec::new();
                        let _ = s.read_to_end(&mut rest).await;
                    }
                });
            }
        });
        addr
    }

    /// Connects through pgfront, sends a startup, returns the socket and its first answer.
    async fn session(front: SocketAddr) -> (TcpStream, Vec<u8>) {
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(&startup()).await.unwrap();
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await.expect("an answer").unwrap();
        buf.truncate(n);
        (c, buf)
    }

    /// A listening socket nobody accepts from: the kernel completes handshakes, nothing answers
    /// (a SIGSTOPped postmaster).
    fn hung_server() -> (std::net::TcpListener, SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_a_failed_connect_and_the_client_is_refused_in_time() {
        let (_hung, addr) = hung_server();
        let cfg = listener_cfg(Role::Primary, Duration::from_millis(200), Duration::from_secs(1));
        let (front, ctx) = front(cfg, &[addr]).await;
        let (_c, answer) = session(front).await;
        assert_eq!(answer[0], b'E', "an ErrorResponse, not a client piped to a server that never speaks");
        assert!(String::from_utf8_lossy(&answer).contains("57P03"), "{answer:?}");
        assert!(ctx.pool.metrics().connect_errors.get() >= 2, "retried within the queue timeout");
        // The refusal is on the status page's events, by reason, before the client reads it.
        let ev = ctx.events.list(None);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].listener.as_deref(), ev[0].reason, ev[0].count),
            (Some(ctx.cfg.name.as_str()), Some("no_server"), 1)
        );
        assert!(ev[0].detail.starts_with("pgfront: no primary available"), "{}", ev[0].detail);
    }

    /// A server that answers every startup with `57P03` (a PostgreSQL shutting down), and
    /// counts the startups it got.
    async fn shutting_down_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let n = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let n = n.clone();
                tokio::spawn(async move {
                    if pgwire::read_first(&mut s).await.is_ok() {
                        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let e = pgwire::error_response("57P03", "the database system is shutting down");
                        let _ = s.write_all(&e).await;
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_server_that_is_shutting_down_is_a_failed_connect_and_the_client_is_held() {
        // The old primary of a switchover that discovery has not seen yet (etcd partitioned):
        // its "shutting down" never reaches the client, who is placed on the new primary.
        let (old, seen) = shutting_down_server().await;
        let cfg = listener_cfg(Role::Primary, Duration::from_millis(500), Duration::from_secs(20));
        let (front, ctx) = front(cfg, &[old]).await;
        let client = tokio::spawn(session(front));
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline, "the old primary was tried, and tried again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (tx, _rx) = mpsc::unbounded_channel();
        let new = fake_server(1, tx).await;
        ctx.pool.apply(
            &Targets { eligible: vec![Backend { member: "new".into(), addr: new }], keep: vec![] },
            Duration::ZERO,
        );
        let (_c, answer) = client.await.unwrap();
        assert_eq!(answer[0], b'R', "served by the new primary, never shown 57P03: {answer:?}");
        // The first message the connect read is handed on whole, and its key is learnt.
        assert_eq!(&answer[..9], &[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
    }

    #[tokio::test]
    async fn a_client_held_on_a_hung_primary_moves_to_the_next_one() {
        let (_hung, addr) = hung_server();
        let cfg = listener_cfg(Role::Primary, Duration::from_millis(200), Duration::from_secs(20));
        let (front, ctx) = front(cfg, &[addr]).await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let good = fake_server(1, tx).await;
        let client = tokio::spawn(session(front));
        // Failover while the client is held: it is placed on the new primary.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctx.pool.metrics().connect_errors.get() == 0 {
            assert!(Instant::now() < deadline, "the hung server was tried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ctx.pool.apply(
            &Targets { eligible: vec![Backend { member: "new".into(), addr: good }], keep: vec![] },
            Duration::ZERO,
        );
        let (_c, answer) = client.await.unwrap();
        assert_eq!(answer[0], b'R', "served by the new primary: {answer:?}");
    }

    #[tokio::test]
    async fn a_queued_client_that_leaves_after_its_startup_leaves_the_queue() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let server = fake_server(1, tx).await;
        let mut cfg = (*listener_cfg(Role::Primary, Duration::from_secs(1), Duration::from_secs(30))).clone();
        cfg.server_maxconn = 1;
        let (front, ctx) = front(Arc::new(cfg), &[server]).await;
        let (_held, hello) = session(front).await;
        assert_eq!(hello[0], b'R');
        // The second client sends its startup, waits in the queue (server_maxconn 1), leaves.
        let mut queued = TcpStream::connect(front).await.unwrap();
        queued.write_all(&startup()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctx.pool.status().queued != 1 {
            assert!(Instant::now() < deadline, "the second client is queued");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(queued);
        while ctx.pool.status().queued != 0 {
            assert!(Instant::now() < deadline, "the client that left is dropped from the queue at once");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ctx.pool.metrics().active.get(), 1, "its session task ended");
    }

    #[tokio::test]
    async fn a_cancel_reaches_the_server_of_its_session_not_the_least_loaded_one() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = fake_server(100, tx.clone()).await;
        let b = fake_server(200, tx).await;
        let (front, ctx) =
            front(listener_cfg(Role::Replica, Duration::from_secs(2), Duration::from_secs(2)), &[a, b]).await;
        // One session: its server (pid 100 or 200) has one connection, the other none, so
        // leastconn would send a balanced cancel to the other one.
        let (_held, hello) = session(front).await;
        let pid = u32::from_be_bytes(hello[14..18].try_into().unwrap());
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&pgwire::CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&hello[14..22]);
        for _ in 0..5 {
            let mut c = TcpStream::connect(front).await.unwrap();
            c.write_all(&cancel).await.unwrap();
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
            let (got_by, got) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
            assert_eq!((got_by, &got), (pid, &cancel), "the cancel reached the session's server");
        }
        assert_eq!(ctx.pool.metrics().cancels_routed.get(), 5);
        drop(_held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ctx.cancels.is_empty() {
            assert!(Instant::now() < deadline, "the key is forgotten when the session ends");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
