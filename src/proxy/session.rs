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
//!   server answers, within `connect_timeout` (connect included). A server that completes TCP
//!   handshakes but never answers — a SIGSTOPped postmaster, whose kernel still fills its
//!   listen backlog — is then a failed connect like a refused one, instead of a client piped
//!   to a server that never speaks;
//! - a startup's answer is read until the client has to speak (`ReadyForQuery` for a trust
//!   login, the first authentication request otherwise), also after a declined `SSLRequest`
//!   (libpq's default `sslmode=prefer` against a server without TLS). A server that refuses or
//!   ends the session before then because it is stopping (`57P01`/`57P02`/`57P03`: a primary
//!   shutting down for a switchover terminates the backends still starting, after they queued
//!   `AuthenticationOk`) has not served the client: a failed connect too.
//!
//! Retrying is safe because it happens only before the client has anything it could not send
//! again: until then it has seen the kernel accept it and, at most, the `N` to its encryption
//! request, which each server tried must answer the same. A failed connect to the only eligible
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
use super::interrupt::interruptible;
use super::pgwire::{self, sqlstate, FirstPacket, Kind, StartupAnswer};
use super::pipe::{self, Reader};
use crate::balancer::pool::{Lease, Pool, Refusal};
use crate::config::{ListenerConfig, Role};
use crate::events::Events;
use crate::metrics::Both;

/// How long a refused client gets to read its ErrorResponse.
const REFUSE_LIMIT: Duration = Duration::from_secs(5);
/// How long a new client has to send its first packet (clients send it right after connecting;
/// PostgreSQL allows `authentication_timeout`, 60 s, for the whole authentication).
pub const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked of a server's first read: its one-byte answer to an encryption request, then in
/// the same buffer the answer to a startup (a trust login's, with its parameter statuses,
/// fits). A TLS answer gets a chunk of the pipe's (`Answer::Tls`).
const ANSWER_READ: usize = 1024;
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
        // The packet is often there already: read it before polling, and so registering
        // with, the stop token.
        biased;
        r = tokio::time::timeout(FIRST_PACKET_TIMEOUT, pgwire::read_first(Reader(&client))) => r,
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
    let mut prelude = Prelude { refused: Vec::new(), last: bytes, kind, answered: 0 };
    // Boxed: the setup's futures (connect, retries, answers, timeouts) are the largest state
    // of a session, and a task is as large as its largest state. Freed once the session is
    // placed, so an idle session's task holds only the pipe's (`benches/idle_memory.rs`).
    let (lease, server, prefix) = match Box::pin(place(&ctx, &mut client, deadline, &mut prelude)).await {
        Ok(p) => {
            // What the client sent went to this server: it counts as the session's first bytes.
            let sent = prelude.len() as u64;
            m.bytes_from_clients.inc_by(sent);
            p.0.server.sent_bytes.inc_by(sent);
            m.bytes_to_clients.inc_by(prelude.answered as u64);
            p.0.server.received_bytes.inc_by(prelude.answered as u64);
            p
        }
        Err(Placing::Gone(why)) => {
            debug!(listener = %ctx.cfg.name, %peer, "{why}");
            return;
        }
        Err(Placing::BadPacket) => {
            m.bad_startup.inc();
            debug!(listener = %ctx.cfg.name, %peer, "closed: its packet after the encryption answer is not PostgreSQL");
            return;
        }
        Err(Placing::Refused(refused)) => {
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
            pgwire::refuse(&mut client, prelude.kind, code, &msg, REFUSE_LIMIT).await;
            return;
        }
    };
    // However the session ends (closed, drained, killed), from the client's accept.
    let _duration = scopeguard(|| lease.server.session_duration.observe(accepted_at.elapsed().as_secs_f64()));

    // The key scanner starts where the client is: after the encryption answers it was given.
    let mut keys = KeyWatch::new(&ctx.cancels, &lease.backend.addr, prelude.kind);
    drop(prelude);
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
    // Drain and kill end a session from outside: polled only when they fire, not on every
    // wake-up of the pipe (`interrupt`).
    let ended = async {
        tokio::select! {
            biased;
            _ = lease.drain.cancelled() => true,
            _ = ctx.kill.cancelled() => false,
        }
    };
    match interruptible(pipe::pipe_watching(&client, &server, &up, &down, scanning.then_some(&mut watch)), ended).await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(listener = %ctx.cfg.name, %peer, member = %lease.backend.member, error = %e, "session ended");
        }
        Err(true) => {
            m.drained.inc();
            lease.closed_by_pgfront();
            debug!(listener = %ctx.cfg.name, %peer, member = %lease.backend.member, "closed: server drained");
        }
        Err(false) => {}
    }
}

/// What the client has sent so far, replayed on every server tried until one serves it.
struct Prelude {
    /// Encryption requests (`SSLRequest`, `GSSENCRequest`) the client was already answered `N`
    /// to: each is sent again to a new server, which must answer `N` again.
    refused: Vec<Vec<u8>>,
    /// The packet whose answer the client waits for, and its kind; after a startup or a TLS
    /// record, with what the client sent past it before any answer (`pgwire::read_first`).
    last: Vec<u8>,
    kind: Kind,
    /// Bytes pgfront answered the client on the servers' behalf (the `N`s).
    answered: usize,
}

impl Prelude {
    /// The client bytes it holds.
    fn len(&self) -> usize {
        self.refused.iter().map(Vec::len).sum::<usize>() + self.last.len()
    }

    fn expect(&self) -> Answer {
        answer_expected(self.kind)
    }
}

/// Why a client was not placed.
enum Placing {
    /// Answered with an `ErrorResponse` (or closed, for a cancel).
    Refused(Refused),
    /// The client left, or stopped talking, while it was being placed.
    Gone(String),
    /// The client's packet after an encryption answer was not PostgreSQL.
    BadPacket,
}

/// Places the client on a server (`connect_backend`), watching it while it waits. An
/// encryption request that the server declines (`N`: no TLS or GSSAPI there) is answered `N`
/// here and the client's next packet — its startup, or an `SSLRequest` after a
/// `GSSENCRequest` — continues on the same server connection, so that pgfront reads the
/// startup's answer for the many clients that ask for TLS first (libpq's `sslmode=prefer`).
/// If that server then fails, the client is placed again with its refused requests replayed.
/// A server that accepts encryption gets the session as it is: pgfront does not terminate TLS.
async fn place(
    ctx: &SessionCtx,
    client: &mut TcpStream,
    deadline: Instant,
    prelude: &mut Prelude,
) -> Result<(Lease, TcpStream, Vec<u8>), Placing> {
    let (mut lease, mut server, mut prefix, mut took) =
        watched(ctx, client, connect_backend(ctx, deadline, prelude)).await?.map_err(Placing::Refused)?;
    // At most a GSSENCRequest, then an SSLRequest, then the startup.
    for _ in 0..2 {
        // An encryption request's answer, read by `exchange`: `N` (declined) is answered here;
        // `S`, `G` or an error is the client's, first of what the server says, and so is
        // whatever answers a TLS record (a client that began with TLS).
        if !matches!(prelude.kind, Kind::SslRequest | Kind::GssEncRequest) || prefix != b"N" {
            break;
        }
        prefix.clear();
        client
            .write_all(b"N")
            .await
            .map_err(|e| Placing::Gone(format!("client gone after its encryption request: {e}")))?;
        prelude.answered += 1;
        let next = tokio::select! {
            r = tokio::time::timeout(FIRST_PACKET_TIMEOUT, pgwire::read_first(Reader(client))) => r,
            _ = ctx.stop.cancelled() => {
                // The client was answered `N` and sends its startup next: the refusal is the
                // ErrorResponse, not a second `N`.
                prelude.kind = Kind::Startup { version: pgwire::PROTOCOL_3 };
                return Err(Placing::Refused(Refused::Pool(Refusal::Closed)));
            }
        };
        let next = match next {
            Ok(Ok(p)) if p.kind != Kind::Invalid => p,
            Ok(Ok(_)) => return Err(Placing::BadPacket),
            Ok(Err(e)) => return Err(Placing::Gone(format!("closed after the encryption answer: {e}"))),
            Err(_) => {
                return Err(Placing::Gone(format!(
                    "no packet after the encryption answer within {FIRST_PACKET_TIMEOUT:?}"
                )))
            }
        };
        match next.kind {
            Kind::Cancel => return Err(cancel_after_n(ctx, &lease, &mut server, &next.bytes).await),
            Kind::DirectTls | Kind::GssEncRequest => {
                // TLS begun by the client after a declined GSSENCRequest: pgfront does not
                // terminate it, so the session is piped from here as it is.
                server.write_all(&next.bytes).await.map_err(|e| Placing::Gone(format!("server gone: {e}")))?;
                prelude.refused.push(std::mem::replace(&mut prelude.last, next.bytes));
                prelude.kind = Kind::DirectTls;
                break;
            }
            _ => {}
        }
        prelude.refused.push(std::mem::replace(&mut prelude.last, next.bytes));
        prelude.kind = next.kind;
        // The client has waited in the queue already: its next packet gets a whole
        // connect_timeout, even past the queue deadline.
        let first_by = Instant::now() + ctx.cfg.connect_timeout;
        let answer = exchange(ctx, &mut server, &prelude.last, prelude.expect(), first_by, std::mem::take(&mut prefix));
        match watched(ctx, client, answer).await? {
            Ok((p, _)) => prefix = p,
            Err(e) => {
                connect_failed(ctx, &lease, &e);
                drop((lease, server));
                // One more try at least, however long the queue took.
                let deadline = deadline.max(Instant::now() + ctx.cfg.connect_timeout);
                (lease, server, prefix, took) =
                    watched(ctx, client, connect_backend(ctx, deadline, prelude)).await?.map_err(Placing::Refused)?;
            }
        }
    }
    // Counted once, for the server that got the session: its first answer's time.
    lease.server.connect_time.observe(took.as_secs_f64());
    lease.server.connections.inc();
    Ok((lease, server, prefix))
}

/// A `CancelRequest` sent after pgfront declined its encryption request (libpq's cancel API
/// with `sslmode=prefer`): forwarded to the server of the session it names, or sent on to the
/// server already connected (as a first-packet cancel with an unknown key is routed). The
/// client is then closed, as a server closes a cancel connection.
async fn cancel_after_n(ctx: &SessionCtx, lease: &Lease, server: &mut TcpStream, bytes: &[u8]) -> Placing {
    let m = ctx.pool.metrics();
    match bytes.get(8..).and_then(|key| ctx.cancels.lookup(key)) {
        Some(addr) if addr != lease.backend.addr => {
            m.cancels_routed.inc();
            if let Err(e) = cancel::forward(addr, bytes, ctx.cfg.connect_timeout).await {
                return Placing::Gone(format!("cancel request to {addr} not delivered: {e}"));
            }
        }
        known => {
            if known.is_some() {
                m.cancels_routed.inc();
            } else {
                m.cancels_unrouted.inc();
            }
            if let Err(e) = server.write_all(bytes).await {
                return Placing::Gone(format!("cancel request not delivered: {e}"));
            }
        }
    }
    Placing::Gone("cancel request after the encryption answer: delivered".into())
}

/// Runs `work` while the waiting client is watched: a client that leaves, or a stopping
/// process, ends the wait.
async fn watched<T>(
    ctx: &SessionCtx,
    client: &TcpStream,
    work: impl std::future::Future<Output = T>,
) -> Result<T, Placing> {
    tokio::select! {
        r = work => Ok(r),
        _ = client_gone(client) => Err(Placing::Gone("client left while waiting for a server".into())),
        _ = ctx.stop.cancelled() => Err(Placing::Refused(Refused::Pool(Refusal::Closed))),
    }
}

/// Places the client on a server, retrying failed connects until `deadline`: each try
/// connects, replays `prelude` and waits for the answer it expects.
async fn connect_backend(
    ctx: &SessionCtx,
    deadline: Instant,
    prelude: &Prelude,
) -> Result<(Lease, TcpStream, Vec<u8>, Duration), Refused> {
    let mut avoid = Vec::new();
    let mut backoff = RETRY_MIN;
    let mut changes = ctx.pool.changes();
    loop {
        let lease = ctx.pool.acquire(&avoid, deadline).await.map_err(Refused::Pool)?;
        changes.borrow_and_update();
        let err = match open(ctx, lease.backend.addr, prelude, deadline).await {
            Ok((s, prefix, took)) => return Ok((lease, s, prefix, took)),
            Err(e) => e,
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
        connect_failed(ctx, &lease, &err);
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

fn connect_failed(ctx: &SessionCtx, lease: &Lease, err: &std::io::Error) {
    ctx.pool.metrics().connect_errors.inc();
    lease.server.connect_errors.inc();
    debug!(listener = %ctx.cfg.name, member = %lease.backend.member, addr = %lease.backend.addr, error = %err, "backend connect failed");
}

/// What a connect waits for before it counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Nothing (a cancel request gets no answer).
    Nothing,
    /// The one-byte answer to an SSLRequest / GSSENCRequest (`N`, `S`, `G`, or an error), read
    /// here: `place` answers an `N` itself, the rest is the client's.
    Encryption,
    /// The server's first bytes after a client's TLS record (PostgreSQL 17's direct TLS), read
    /// for the client, up to a chunk of the pipe's (a TLS server's first flight, certificate
    /// included, is usually over 1 KiB).
    Tls,
    /// The server's answer to a StartupMessage, read here until the client has to speak
    /// (`pgwire::startup_answer`): `ReadyForQuery` for a trust login, the first authentication
    /// request otherwise. A server that refuses or ends the session before then because it
    /// is stopping or not ready (`57P01`, `57P02`, `57P03`: a primary shutting down for a
    /// switchover terminates the backends it is still starting) has not served the client, so
    /// the connect is failed and retried like a refused one; anything else is handed to the
    /// client first.
    Startup,
}

fn answer_expected(kind: Kind) -> Answer {
    match kind {
        Kind::Cancel => Answer::Nothing,
        Kind::Startup { .. } => Answer::Startup,
        Kind::SslRequest | Kind::GssEncRequest => Answer::Encryption,
        Kind::DirectTls | Kind::Invalid => Answer::Tls,
    }
}

/// Connects to `addr`, replays the encryption requests the client was refused, then sends its
/// last packet and reads the answer (`exchange`). Returns the socket, the bytes read from it
/// (for the client, before the pipe starts) and the time to the server's first answer.
async fn open(
    ctx: &SessionCtx,
    addr: SocketAddr,
    prelude: &Prelude,
    deadline: Instant,
) -> std::io::Result<(TcpStream, Vec<u8>, Duration)> {
    let started = Instant::now();
    let limit = ctx.cfg.connect_timeout.min(deadline.saturating_duration_since(started));
    let connect = async {
        let mut s = TcpStream::connect(addr).await?;
        tune(&s, ctx.cfg.tcp_keepalive);
        for request in &prelude.refused {
            s.write_all(request).await?;
            // One read: `N` alone (and the readiness cleared, `Reader`), as the first server
            // answered.
            let mut b = [0u8; 2];
            let n = Reader(&s).read(&mut b).await?;
            if n == 0 {
                return Err(closed_early(std::io::ErrorKind::UnexpectedEof.into()));
            }
            if b[..n] != *b"N" {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "the server does not decline the encryption the client was told another server declined",
                ));
            }
        }
        Ok::<_, std::io::Error>(s)
    };
    let mut s = tokio::time::timeout(limit, connect).await.map_err(|_| no_answer(limit))??;
    let (prefix, _) = exchange(ctx, &mut s, &prelude.last, prelude.expect(), started + limit, Vec::new()).await?;
    Ok((s, prefix, started.elapsed()))
}

/// Sends `packet` and waits for what `expect` says: the server's first answer by `first_by`
/// (a server that never answers is a failed connect), then, for a startup,
/// the rest of the answer until the client has to speak, within `connect_timeout` again (a
/// server that answered but is slow to finish its startup is handed over as it is, as before
/// pgfront read it). Returns the bytes read, into `got` (cleared first: the buffer of the
/// previous answer on the same connection is reused), and the time to the first answer.
async fn exchange(
    ctx: &SessionCtx,
    s: &mut TcpStream,
    packet: &[u8],
    expect: Answer,
    first_by: Instant,
    mut got: Vec<u8>,
) -> std::io::Result<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let limit = first_by.saturating_duration_since(started);
    got.clear();
    got.reserve(match expect {
        Answer::Nothing => 0,
        Answer::Tls => pipe::CHUNK,
        Answer::Encryption | Answer::Startup => ANSWER_READ,
    });
    let first = async {
        s.write_all(packet).await?;
        match expect {
            Answer::Nothing => {}
            // Whatever the server says first, in one read.
            Answer::Encryption | Answer::Tls => read_until(s, &mut got, |b| !b.is_empty()).await?,
            // A message header: the server answers.
            Answer::Startup => read_until(s, &mut got, |b| b.len() >= 5).await?,
        }
        Ok::<_, std::io::Error>(got)
    };
    let mut got = tokio::time::timeout(limit, first).await.map_err(|_| no_answer(limit))??;
    let took = started.elapsed();
    if expect == Answer::Startup {
        // The server answered: what is left of its startup is no longer a connect that hangs.
        let done = |b: &[u8]| pgwire::startup_answer(b) != StartupAnswer::Incomplete;
        if let Ok(r) = tokio::time::timeout(ctx.cfg.connect_timeout, read_until(s, &mut got, done)).await {
            r?;
        }
        if let StartupAnswer::NotServed { code, message } = pgwire::startup_answer(&got) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("the server did not serve the session ({code}: {message})"),
            ));
        }
    }
    Ok((got, took))
}

/// Reads from `s` into `got` until `done(got)`. The end of the stream first is an error: the
/// server closed without answering.
async fn read_until(s: &TcpStream, got: &mut Vec<u8>, done: impl Fn(&[u8]) -> bool) -> std::io::Result<()> {
    while !done(got) {
        if got.capacity() == got.len() {
            got.reserve(1024);
        }
        if Reader(s).read_buf(got).await? == 0 {
            return Err(closed_early(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(())
}

fn closed_early(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed without answering")
    } else {
        e
    }
}

fn no_answer(limit: Duration) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {limit:?}"))
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

    /// A server that answers an encryption request with `encryption` (`N`, `S`, or an error,
    /// after which it closes) and a startup with `answer` (sent in two writes:
    /// `AuthenticationOk` first, as PostgreSQL flushes it before the backend's initialisation),
    /// then holds the session; it records every packet it got.
    async fn scripted_server(
        encryption: &'static [u8],
        answer: Vec<u8>,
    ) -> (SocketAddr, Arc<std::sync::Mutex<Vec<Kind>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (log, answer) = (log.clone(), answer.clone());
                tokio::spawn(async move {
                    while let Ok(p) = pgwire::read_first(&mut s).await {
                        log.lock().unwrap().push(p.kind);
                        if matches!(p.kind, Kind::SslRequest | Kind::GssEncRequest) {
                            let _ = s.write_all(encryption).await;
                            if encryption.first() == Some(&b'E') {
                                return;
                            }
                            continue;
                        }
                        let split = answer.len().min(9);
                        let _ = s.write_all(&answer[..split]).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = s.write_all(&answer[split..]).await;
                        let mut rest = Vec::new();
                        let _ = s.read_to_end(&mut rest).await;
                        return;
                    }
                });
            }
        });
        (addr, seen)
    }

    /// What libpq sends first with `sslmode=prefer` / `gssencmode=prefer`.
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];
    const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 48];

    /// A client connected to a primary listener in front of `server` alone.
    async fn client_of(server: SocketAddr) -> (TcpStream, Arc<SessionCtx>) {
        let cfg = listener_cfg(Role::Primary, Duration::from_secs(1), Duration::from_secs(5));
        let (front, ctx) = front(cfg, &[server]).await;
        (TcpStream::connect(front).await.unwrap(), ctx)
    }

    const AUTH_OK: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];

    fn login(pid: u32) -> Vec<u8> {
        let mut hello = AUTH_OK.to_vec();
        hello.extend_from_slice(&[b'K', 0, 0, 0, 12]);
        hello.extend_from_slice(&pid.to_be_bytes());
        hello.extend_from_slice(&[7, 7, 7, 7, b'Z', 0, 0, 0, 5, b'I']);
        hello
    }

    fn terminated() -> Vec<u8> {
        [&AUTH_OK[..], &pgwire::error_response("57P01", "terminating connection due to administrator command")].concat()
    }

    /// Reads from `c` until `want` bytes came, or it closes.
    async fn read_n(c: &mut TcpStream, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while got.len() < want {
            let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await.expect("an answer").unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_backend_terminated_during_its_startup_is_a_failed_connect_and_the_client_is_placed_again() {
        // A primary shutting down for a switchover (repmgr's fast shutdown) terminates a backend
        // that has sent AuthenticationOk but not yet ReadyForQuery: the client never sees it.
        let (old, seen) = scripted_server(b"N", terminated()).await;
        let cfg = listener_cfg(Role::Primary, Duration::from_secs(1), Duration::from_secs(20));
        let (front, ctx) = front(cfg, &[old]).await;
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(&startup()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "the old primary was tried, and tried again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (new, _) = scripted_server(b"N", login(9)).await;
        ctx.pool.apply(
            &Targets { eligible: vec![Backend { member: "new".into(), addr: new }], keep: vec![] },
            Duration::ZERO,
        );
        let answer = read_n(&mut c, login(9).len()).await;
        assert_eq!(answer, login(9), "served whole by the new primary, never shown 57P01");
        assert!(ctx.pool.metrics().connect_errors.get() >= 2);
        assert!(!ctx.cancels.is_empty(), "the key of the prefix read at connect is learnt");
    }

    #[tokio::test]
    async fn a_client_asking_for_tls_first_is_answered_n_and_its_startup_replayed_elsewhere() {
        // libpq's sslmode=prefer against servers without TLS: SSLRequest, N, then the startup.
        let (old, seen_old) = scripted_server(b"N", terminated()).await;
        let (new, seen_new) = scripted_server(b"N", login(5)).await;
        let cfg = listener_cfg(Role::Replica, Duration::from_secs(1), Duration::from_secs(20));
        let (front, ctx) = front(cfg, &[old]).await;
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(&SSL_REQUEST).await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"N");
        c.write_all(&startup()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen_old.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "the old server got the SSLRequest and the startup");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ctx.pool.apply(
            &Targets { eligible: vec![Backend { member: "new".into(), addr: new }], keep: vec![] },
            Duration::ZERO,
        );
        assert_eq!(read_n(&mut c, login(5).len()).await, login(5), "one N, then the new server's login only");
        let startup_kind = Kind::Startup { version: 196608 };
        assert_eq!(*seen_new.lock().unwrap(), vec![Kind::SslRequest, startup_kind], "the SSLRequest was replayed");
        assert_eq!(seen_old.lock().unwrap()[..2], [Kind::SslRequest, startup_kind]);
        assert!(!ctx.cancels.is_empty(), "the key is learnt after a declined SSLRequest too");
    }

    /// SSLRequest, `N`, then the startup on the same server, whose login comes in one write: it
    /// must wake the session although the `N` cleared the socket's readiness (a lost wake-up
    /// would be a connect timeout, a connect error and a retry).
    #[tokio::test]
    async fn a_declined_ssl_request_then_the_startup_is_served_by_the_same_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            assert_eq!(pgwire::read_first(&mut s).await.unwrap().kind, Kind::SslRequest);
            s.write_all(b"N").await.unwrap();
            assert!(matches!(pgwire::read_first(&mut s).await.unwrap().kind, Kind::Startup { .. }));
            s.write_all(&login(42)).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let cfg = listener_cfg(Role::Primary, Duration::from_secs(5), Duration::from_secs(10));
        let (front, ctx) = front(cfg, &[addr]).await;
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(&SSL_REQUEST).await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"N");
        c.write_all(&startup()).await.unwrap();
        assert_eq!(read_n(&mut c, login(42).len()).await, login(42));
        let m = ctx.pool.metrics();
        assert_eq!(m.connect_errors.get(), 0, "served by the first try");
        assert!(!ctx.cancels.is_empty(), "the key is learnt");
        assert_eq!(m.bytes_to_clients.get(), 1 + login(42).len() as u64, "the N and the login, once each");
        assert_eq!(m.bytes_from_clients.get(), 8 + startup().len() as u64);
    }

    #[tokio::test]
    async fn a_cancel_after_a_declined_ssl_request_reaches_the_server_of_its_session() {
        // libpq's cancel API with sslmode=prefer: SSLRequest, N, then the CancelRequest.
        let (a, seen_a) = scripted_server(b"N", login(100)).await;
        let (b, seen_b) = scripted_server(b"N", login(200)).await;
        let cfg = listener_cfg(Role::Replica, Duration::from_secs(1), Duration::from_secs(5));
        let (front, ctx) = front(cfg, &[a, b]).await;
        let (_held, hello) = session(front).await;
        let pid = u32::from_be_bytes(hello[14..18].try_into().unwrap());
        let (sessions, other) = if pid == 100 { (&seen_a, &seen_b) } else { (&seen_b, &seen_a) };
        let mut cancel = 16u32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&pgwire::CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&hello[14..22]);
        // Leastconn places the SSLRequest on the other server; the cancel goes to the session's.
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(&SSL_REQUEST).await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"N");
        c.write_all(&cancel).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sessions.lock().unwrap().contains(&Kind::Cancel) {
            assert!(Instant::now() < deadline, "the cancel reached the session's server");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*other.lock().unwrap(), vec![Kind::SslRequest], "only the SSLRequest went to the other one");
        assert_eq!(ctx.pool.metrics().cancels_routed.get(), 1);
        assert_eq!(ctx.pool.metrics().bad_startup.get(), 0);
    }

    #[tokio::test]
    async fn a_client_answered_n_and_refused_at_shutdown_gets_the_error_not_a_second_n() {
        let (server, _) = scripted_server(b"N", login(1)).await;
        let (mut c, ctx) = client_of(server).await;
        c.write_all(&SSL_REQUEST).await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"N");
        ctx.stop.cancel();
        c.write_all(&startup()).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest)).await;
        assert_eq!(rest.first(), Some(&b'E'), "an ErrorResponse: {rest:?}");
        assert!(String::from_utf8_lossy(&rest).contains("57P01"), "{rest:?}");
    }

    /// A client that begins with TLS (PostgreSQL 17's `sslnegotiation=direct`): its record goes
    /// to the server, and the server's answer, however long, reaches the client whole, counted.
    #[tokio::test]
    async fn a_direct_tls_client_gets_the_servers_answer_whole() {
        let answer: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let (server, seen) = scripted_server(b"N", answer.clone()).await;
        let (mut c, ctx) = client_of(server).await;
        let mut hello = vec![0x16, 0x03, 0x01, 0x00, 0x30];
        hello.extend_from_slice(&[0xab; 0x30]);
        c.write_all(&hello).await.unwrap();
        assert_eq!(read_n(&mut c, answer.len()).await, answer);
        assert_eq!(*seen.lock().unwrap(), vec![Kind::DirectTls]);
        let m = ctx.pool.metrics();
        assert_eq!((m.connect_errors.get(), m.bad_startup.get()), (0, 0));
        assert_eq!(m.bytes_to_clients.get(), answer.len() as u64);
        assert_eq!(m.bytes_from_clients.get(), hello.len() as u64);
    }

    /// libpq with `gssencmode=prefer` and `sslmode=prefer` against a server with neither:
    /// GSSENCRequest, `N`, SSLRequest, `N`, then the startup, all on one server connection.
    #[tokio::test]
    async fn a_gssenc_request_then_an_ssl_request_both_declined_then_the_startup_on_one_server() {
        let (server, seen) = scripted_server(b"N", login(3)).await;
        let (mut c, ctx) = client_of(server).await;
        c.write_all(&GSSENC_REQUEST).await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"N");
        c.write_all(&SSL_REQUEST).await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"N");
        c.write_all(&startup()).await.unwrap();
        assert_eq!(read_n(&mut c, login(3).len()).await, login(3));
        let startup_kind = Kind::Startup { version: 196608 };
        assert_eq!(*seen.lock().unwrap(), vec![Kind::GssEncRequest, Kind::SslRequest, startup_kind]);
        let m = ctx.pool.metrics();
        assert_eq!((m.connect_errors.get(), m.bad_startup.get()), (0, 0));
        assert!(!ctx.cancels.is_empty(), "the key is learnt");
    }

    /// A server that answers an SSLRequest with an `ErrorResponse` (a server that fails before
    /// it reads the request answers with an error, in whatever form): the client gets the
    /// error whole, as the server sent it, not an `N` of pgfront's.
    #[tokio::test]
    async fn an_error_answering_an_ssl_request_reaches_the_client_whole() {
        const ERROR: &[u8] = b"E\0\0\0\x22SFATAL\0C53300\0Mout of memory\0\0";
        let (server, seen) = scripted_server(ERROR, login(1)).await;
        let (mut c, _ctx) = client_of(server).await;
        c.write_all(&SSL_REQUEST).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await.expect("closed").unwrap();
        assert_eq!(got, ERROR);
        assert_eq!(*seen.lock().unwrap(), vec![Kind::SslRequest]);
    }

    #[tokio::test]
    async fn a_server_that_accepts_tls_gets_the_session_as_it_is() {
        let (tls, seen) = scripted_server(b"S", login(1)).await;
        let (mut c, ctx) = client_of(tls).await;
        c.write_all(&SSL_REQUEST).await.unwrap();
        assert_eq!(read_n(&mut c, 1).await, b"S", "the server's S reaches the client");
        assert_eq!(*seen.lock().unwrap(), vec![Kind::SslRequest]);
        assert_eq!(ctx.pool.metrics().connect_errors.get(), 0);
    }

    #[tokio::test]
    async fn a_server_slow_to_finish_its_startup_is_handed_over_not_failed() {
        // AuthenticationOk comes at once, the rest later than connect_timeout: as before
        // pgfront read the startup, the client gets what came and the session is piped.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            pgwire::read_first(&mut s).await.unwrap();
            s.write_all(&AUTH_OK).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            s.write_all(&login(3)[9..]).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let cfg = listener_cfg(Role::Primary, Duration::from_millis(200), Duration::from_secs(5));
        let (front, ctx) = front(cfg, &[addr]).await;
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(&startup()).await.unwrap();
        assert_eq!(read_n(&mut c, login(3).len()).await, login(3));
        assert_eq!(ctx.pool.metrics().connect_errors.get(), 0, "a slow startup is no failed connect");
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
