//! Listening sockets and the accept loop of one listener.
//!
//! Sockets are made with socket2 (SO_REUSEADDR, explicit backlog, v6-only for IPv6) so that a
//! later reload can keep or hand them over. As in mini-redis, a permit of the listener's
//! `maxconn` semaphore is taken *before* `accept`: over the limit, clients wait in the kernel's
//! backlog instead of being accepted and dropped.
//!
//! File descriptors are budgeted the same way: a session needs two (client and server), so the
//! process-wide `fd_budget` holds `(RLIMIT_NOFILE - RESERVED_FDS) / 2` permits and one is taken
//! before each `accept` too. With a low `ulimit -n`, clients beyond it wait in the backlog
//! instead of being accepted into a process that cannot open their server connection, and the
//! reserve keeps etcd, the promotion checks and the admin endpoint working. Should `accept` still
//! fail for lack of descriptors (another part of the process used them), the loop pauses
//! instead of spinning and says so once per episode.
//!
//! TCP_NODELAY and keepalive (`tcp_keepalive`) are set on the listening socket, not on each
//! accepted one: Linux copies both to every connection it accepts from it (and starts the
//! keepalive timer), which saves five `setsockopt` per connection (`Inherited`). The options
//! apply to connections the kernel completes after they are set; so whenever the loop sets them
//! (its first accept, a reload that changes `tcp_keepalive`, a socket handed over by an older
//! process), the connections then in the accept queue, which may have been completed before,
//! get them explicitly too, with a margin for handshakes the kernel was completing meanwhile
//! (`Inherited::tune`). The queue's length is read from `TCP_INFO`; it used to be the whole
//! `backlog`: five `setsockopt` for each of the first 1025 connections of every thread, with
//! the default backlog.
//!
//! Not used: TCP_DEFER_ACCEPT (accept only once the client has spoken, one wake-up instead of
//! two). Measured, it bought 3–5 % of the CPU of a connect/close loop, inside the noise for
//! `pgbench -C`, and it would make a listener removed by a reload reset the clients whose
//! handshake completed just before (they are not in the accept queue `drain_backlog` empties).
//!
//! The loop itself costs no lock per accept: permits are taken without waiting when they are
//! free, and the stop token's future is made once, polled only when `accept` would block.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::session::{self, SessionCtx};
use super::workers::Thread;
use crate::config::ListenerConfig;

/// Descriptors kept out of the session budget: stdio, the control plane's runtime, listening
/// sockets, etcd connections, promotion checks, the admin endpoint, a cancel being forwarded
/// (the data-path threads' own are counted by `sessions_for`).
pub const RESERVED_FDS: u64 = 64;
/// How long the accept loop pauses when `accept` fails for lack of descriptors or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Descriptors each data-path thread keeps out of the session budget: its runtime's epoll and
/// eventfd, and one to spare.
pub const RESERVED_FDS_PER_THREAD: u64 = 3;

/// How many sessions a descriptor limit of `nofile` allows with `threads` data-path threads
/// accepting on `listeners` listeners: besides `RESERVED_FDS`, each thread's runtime, and per
/// thread and listener a duplicate of the listening socket and the connection an accept loop
/// may hold while it waits for a permit.
pub fn sessions_for(nofile: u64, threads: usize, listeners: usize) -> usize {
    let per_thread = RESERVED_FDS_PER_THREAD + 2 * listeners as u64;
    let reserved = RESERVED_FDS.saturating_add((threads as u64).saturating_mul(per_thread));
    let n = nofile.saturating_sub(reserved) / 2;
    usize::try_from(n).unwrap_or(usize::MAX).clamp(1, Semaphore::MAX_PERMITS)
}

/// The process-wide session budget from the soft RLIMIT_NOFILE, shared by every listener of
/// the first configuration and those a reload adds; warns when it is below the listeners'
/// total `maxconn`.
pub fn fd_budget(listeners: &[Arc<ListenerConfig>], threads: usize) -> Arc<Semaphore> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let nofile = if ok && lim.rlim_cur != libc::RLIM_INFINITY { lim.rlim_cur } else { u64::MAX };
    let sessions = sessions_for(nofile, threads, listeners.len());
    let wanted: u64 = listeners.iter().map(|l| u64::from(l.maxconn)).sum();
    if (sessions as u64) < wanted {
        warn!(
            nofile,
            sessions,
            wanted,
            "RLIMIT_NOFILE allows fewer sessions than the listeners' maxconn: the rest wait in the backlog"
        );
    }
    Arc::new(Semaphore::new(sessions))
}

/// Binds a listening socket.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(s.into())
}

/// Accepts until `stop` is cancelled, on data-path thread `thread` (`workers`); every
/// connection runs as a task of `tracker`, with the session context current at its accept (a
/// reload swaps it for new connections only), a permit of `sem` (the listener's `maxconn`,
/// resized by reloads) and one of the process's descriptor budget `fds`.
///
/// The `maxconn` permit is taken before `accept` (see the module doc); the descriptor permit
/// after it, so that the idle loops of every thread and listener hold none of the budget they
/// share. Waiting for a descriptor permit, the loop holds the one connection it accepted (the
/// reserve counts it) and accepts no more: the next clients wait in the backlog.
pub(crate) async fn run(
    listener: Arc<TcpListener>,
    ctxs: Arc<ArcSwap<SessionCtx>>,
    sem: Arc<Semaphore>,
    fds: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
    thread: Thread,
) {
    let name = {
        let ctx = ctxs.load();
        if thread.index() == 0 {
            info!(listener = %ctx.cfg.name, bind = %ctx.cfg.bind, role = ?ctx.cfg.role, cluster = %ctx.cfg.cluster, "listening");
        }
        ctx.cfg.name.clone()
    };
    let mut starved = false;
    let mut inherited = Inherited::default();
    // Made once: a fresh `cancelled()` per accept would register with the token (a lock) and
    // deregister again every time.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        if stop.is_cancelled() {
            break;
        }
        let Some(maxconn) = permit(&sem, stopped.as_mut()).await else { break };
        let accepted = tokio::select! {
            // `accept` first: when a connection is waiting, the stop future is not polled at all.
            biased;
            r = listener.accept() => r,
            _ = stopped.as_mut() => break,
        };
        match accepted {
            Ok((sock, peer)) => {
                if std::mem::take(&mut starved) {
                    info!(listener = %name, "accepting again");
                }
                let ctx = ctxs.load_full();
                inherited.tune(&listener, &sock, &ctx.cfg);
                let fd = match permit(&fds, stopped.as_mut()).await {
                    Some(fd) => fd,
                    // Stopping: this client was accepted, it is served all the same.
                    None => unbudgeted(),
                };
                match thread.elsewhere() {
                    None => {
                        tracker.spawn(thread.run(session::run(sock, peer, ctx, (maxconn, fd))));
                    }
                    Some(other) => hand_over(sock, peer, ctx, (maxconn, fd), &other, &tracker),
                }
            }
            Err(e) if session::out_of_descriptors(&e) => {
                // Out of descriptors or memory: back off instead of spinning; the kernel keeps
                // the pending connections in the backlog meanwhile.
                if std::mem::replace(&mut starved, true) {
                    debug!(listener = %name, error = %e, "accept failed: out of resources");
                } else {
                    error!(listener = %name, error = %e, "accept failed: out of resources, pausing {ACCEPT_PAUSE:?} between attempts");
                }
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
            Err(e) => warn!(listener = %name, error = %e, "accept failed"),
        }
    }
    if thread.index() == 0 {
        info!(listener = %name, "stopped accepting");
    }
}

/// Runs the session of a connection accepted on this thread on `other` (`workers`: this one
/// runs too many): the socket leaves this thread's epoll for the other's.
fn hand_over(
    sock: TcpStream,
    peer: SocketAddr,
    ctx: Arc<SessionCtx>,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    other: &Thread,
    tracker: &TaskTracker,
) {
    let sock = match sock.into_std() {
        Ok(s) => s,
        Err(e) => {
            debug!(listener = %ctx.cfg.name, %peer, error = %e, "closed: could not hand the connection to another thread");
            return;
        }
    };
    let session = other.run(async move {
        match TcpStream::from_std(sock) {
            Ok(sock) => session::run(sock, peer, ctx, permits).await,
            Err(e) => debug!(listener = %ctx.cfg.name, %peer, error = %e, "closed: could not hand the connection to another thread"),
        }
    });
    tracker.spawn_on(session, other.handle());
}

/// A permit of no budget: for a client accepted while its loop stops, or taken from the
/// backlog of a listener that goes away.
fn unbudgeted() -> OwnedSemaphorePermit {
    Arc::new(Semaphore::new(1)).try_acquire_owned().expect("a new semaphore has its permit")
}

/// A permit of `sem`: at once if one is free (no future, no lock), else waiting for one or for
/// `stopped`. `None`: stop (or the semaphore is closed).
async fn permit(
    sem: &Arc<Semaphore>,
    stopped: std::pin::Pin<&mut WaitForCancellationFuture<'_>>,
) -> Option<OwnedSemaphorePermit> {
    match sem.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(TryAcquireError::Closed) => None,
        Err(TryAcquireError::NoPermits) => tokio::select! {
            p = sem.clone().acquire_owned() => p.ok(),
            _ = stopped => None,
        },
    }
}

/// Interval between keepalive probes once `tcp_keepalive` has passed without traffic.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered keepalive probes after which the connection is closed.
pub(crate) const KEEPALIVE_RETRIES: u32 = 3;

/// TCP_NODELAY and keepalive (`tcp_keepalive` idle time, then `KEEPALIVE_INTERVAL` ×
/// `KEEPALIVE_RETRIES` probes; off with `None`) on a proxied socket, or on a listening socket
/// whose accepted connections inherit them.
pub(crate) fn set_tcp_options(s: SockRef<'_>, keepalive: Option<Duration>) -> std::io::Result<()> {
    s.set_tcp_nodelay(true)?;
    match keepalive {
        Some(idle) => s.set_tcp_keepalive(
            &TcpKeepalive::new().with_time(idle).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_RETRIES),
        ),
        None => s.set_keepalive(false),
    }
}

/// Bumped when another process may have set its own options on the listening sockets this
/// one shares with it: a successor that failed its binary upgrade had begun to accept (and
/// so to tune the sockets) before it gave up. Each accept loop then sets its options again.
static SHARED_SOCKETS_TOUCHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// After a failed handover: the listening sockets may carry the failed successor's options.
pub(crate) fn reapply_socket_options() {
    SHARED_SOCKETS_TOUCHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// What the listening socket passes on to the connections accepted from it (see the module
/// doc): the keepalive it was last given, and how many accepted connections still get the
/// options explicitly because they may have been completed before.
#[derive(Default)]
struct Inherited {
    /// The listening socket carries TCP_NODELAY and this keepalive setting.
    applied: Option<Option<Duration>>,
    /// `SHARED_SOCKETS_TOUCHED` when `applied` was set.
    epoch: u64,
    /// Accepted connections still to be tuned one by one.
    explicit: u64,
    /// Setting the options on the listening socket failed: every connection is tuned itself.
    failed: bool,
}

impl Inherited {
    /// Called with each accepted connection before its session starts.
    fn tune(&mut self, listener: &TcpListener, sock: &TcpStream, cfg: &ListenerConfig) {
        let epoch = SHARED_SOCKETS_TOUCHED.load(std::sync::atomic::Ordering::Relaxed);
        if self.applied != Some(cfg.tcp_keepalive) || self.epoch != epoch {
            self.applied = Some(cfg.tcp_keepalive);
            self.epoch = epoch;
            if let Err(e) = set_tcp_options(SockRef::from(listener), cfg.tcp_keepalive) {
                if !std::mem::replace(&mut self.failed, true) {
                    warn!(listener = %cfg.name, error = %e, "TCP_NODELAY / keepalive on the listening socket: set on each connection instead");
                }
            }
            // Those in the accept queue now may predate the change, and so may one handshake
            // per CPU that the kernel was completing meanwhile: it copies the options when it
            // creates the connection, and queues it in the same pass. New connections other
            // CPUs queue meanwhile may come before those in the accept order, hence twice that.
            // Without the queue's length, all that the backlog may hold, plus the one the
            // kernel admits over it.
            self.explicit = match queued(listener) {
                Some(n) => n + 2 * possible_cpus(),
                None => u64::from(cfg.backlog) + 1,
            };
        }
        if self.failed || self.explicit > 0 {
            self.explicit = self.explicit.saturating_sub(1);
            if let Err(e) = set_tcp_options(SockRef::from(sock), cfg.tcp_keepalive) {
                debug!(listener = %cfg.name, error = %e, "TCP_NODELAY / keepalive");
            }
        }
    }
}

/// Connections waiting in a listening socket's accept queue: Linux reports it in `TCP_INFO`, as
/// `tcpi_unacked` of a socket in the LISTEN state.
fn queued(listener: &TcpListener) -> Option<u64> {
    use std::os::fd::AsRawFd;
    /// `TCP_LISTEN` in Linux's `include/net/tcp_states.h` (not in the libc crate).
    const TCP_LISTEN: u8 = 10;
    // SAFETY: `tcp_info` is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large, and
    // `len`; the descriptor is the listener's, open for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_unacked) + std::mem::size_of::<u32>();
    (r == 0 && len as usize >= needed && info.tcpi_state == TCP_LISTEN).then_some(u64::from(info.tcpi_unacked))
}

/// CPUs the kernel may run its receive path on: all those configured, whatever this process's
/// affinity or cgroup quota (which `available_parallelism` reports). At most one handshake per
/// CPU is between its connection's creation and its place in the accept queue at any time.
fn possible_cpus() -> u64 {
    // SAFETY: sysconf reads a system value; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    u64::try_from(n).ok().filter(|n| *n > 0).unwrap_or(64)
}

/// Takes every connection already waiting in the kernel backlog of a listener that stops for
/// good (removed by a reload), so that closing the socket resets nobody who was already
/// connected. Returns how many were taken. They are served over the listener's `maxconn`: they
/// were accepted by the kernel before the listener went away. They run on the caller's runtime.
pub fn drain_backlog(listener: &std::net::TcpListener, ctxs: &ArcSwap<SessionCtx>, tracker: &TaskTracker) -> usize {
    let mut taken = 0;
    // Straight to accept(2): tokio's cached readiness may say "not ready" for a backlog that
    // filled while nobody polled the socket.
    let sock = socket2::SockRef::from(listener);
    loop {
        let (conn, peer) = match sock.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                warn!(error = %e, "accepting the backlog of a removed listener");
                break;
            }
        };
        let (Some(peer), Ok(())) = (peer.as_socket(), conn.set_nonblocking(true)) else { continue };
        // The accept loop may never have set the options on the listening socket: set them
        // here (a rare path, one reload).
        let ctx = ctxs.load();
        if let Err(e) = set_tcp_options(SockRef::from(&conn), ctx.cfg.tcp_keepalive) {
            debug!(listener = %ctx.cfg.name, error = %e, "TCP_NODELAY / keepalive");
        }
        let Ok(stream) = tokio::net::TcpStream::from_std(conn.into()) else { continue };
        tracker.spawn(session::run(stream, peer, ctxs.load_full(), (unbudgeted(), unbudgeted())));
        taken += 1;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, Role};

    fn cfg(keepalive: Option<Duration>) -> ListenerConfig {
        ListenerConfig {
            name: "t".into(),
            cluster: "c".into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            role: Role::Primary,
            balance: Balance::Leastconn,
            server_maxconn: 10,
            maxconn: 100,
            queue_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            tcp_keepalive: keepalive,
            max_replica_lag: None,
            drain_grace: Duration::ZERO,
            backlog: 4,
        }
    }

    /// Thread 1 is blocked while 40 clients connect, so thread 0 accepts them all: past
    /// `BALANCE_SLACK` sessions ahead, it hands them to thread 1, whose sessions are served
    /// once it runs again.
    #[test]
    fn a_thread_ahead_by_the_slack_hands_its_connections_to_the_least_loaded_one() {
        use super::super::workers::{Workers, BALANCE_SLACK};
        use crate::metrics::Metrics;
        use crate::topology::{Backend, Targets};
        use std::io::{Read, Write};
        const CLIENTS: usize = 40;

        // A server that answers any startup with AuthenticationOk and ReadyForQuery, then holds
        // the session.
        let bg = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let server = bg.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut first = [0u8; 256];
                        if s.read(&mut first).await.is_err() {
                            return;
                        }
                        let hello = [b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'];
                        if s.write_all(&hello).await.is_ok() {
                            let _ = s.read(&mut first).await;
                        }
                    });
                }
            });
            addr
        });
        let cfg = Arc::new(ListenerConfig { backlog: 128, server_maxconn: 100, ..cfg(None) });
        let pool = crate::balancer::pool::Pool::new(&cfg, Metrics::new().listener("t"));
        pool.apply(
            &Targets { eligible: vec![Backend { member: "m0".into(), addr: server }], keep: vec![] },
            Duration::ZERO,
        );
        let ctx = Arc::new(ArcSwap::from_pointee(SessionCtx {
            cfg: cfg.clone(),
            pool,
            cancels: Arc::new(super::super::cancel::CancelMap::new(Default::default())),
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            events: crate::events::Events::default(),
        }));
        let sock = Arc::new(bind("127.0.0.1:0".parse().unwrap(), 128).unwrap());
        let addr = sock.local_addr().unwrap();
        let workers = Workers::start(2).unwrap();
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (sem, fds) = (Arc::new(Semaphore::new(1000)), Arc::new(Semaphore::new(1000)));
        let loops = workers.spawn_each(|thread| {
            let dup = sock.try_clone().unwrap();
            let (ctx, sem, fds, stop, tracker) = (ctx.clone(), sem.clone(), fds.clone(), stop.clone(), tracker.clone());
            async move { run(Arc::new(TcpListener::from_std(dup).unwrap()), ctx, sem, fds, stop, tracker, thread).await }
        });
        let (blocked_tx, blocked) = std::sync::mpsc::channel();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let mut release = Some(release);
        drop(workers.spawn_each(|thread| {
            let blocked_tx = blocked_tx.clone();
            let release = if thread.index() == 1 { release.take() } else { None };
            async move {
                if let Some(release) = release {
                    blocked_tx.send(()).unwrap();
                    // Blocks the thread's runtime: its accept loop cannot run.
                    let _ = release.recv_timeout(Duration::from_secs(20));
                }
            }
        }));
        blocked.recv_timeout(Duration::from_secs(10)).expect("thread 1 blocked");
        let mut clients: Vec<std::net::TcpStream> = (0..CLIENTS)
            .map(|_| {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.write_all(&[0, 0, 0, 16, 0, 3, 0, 0, b'u', b's', b'e', b'r', 0, b'u', 0, 0]).unwrap();
                c
            })
            .collect();
        // Thread 0 has accepted them all, handing some to the blocked thread 1.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while workers.loads().iter().sum::<usize>() < CLIENTS {
            assert!(std::time::Instant::now() < deadline, "accepted: {:?}", workers.loads());
            std::thread::sleep(Duration::from_millis(10));
        }
        let loads = workers.loads();
        release_tx.send(()).unwrap();
        for c in &mut clients {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut hello = [0u8; 15];
            c.read_exact(&mut hello).expect("every session is served, on either thread");
            assert_eq!(hello[9], b'Z');
        }
        assert!(loads[1] > 0, "no connection was handed to the blocked thread: {loads:?}");
        assert!(loads[0].abs_diff(loads[1]) <= BALANCE_SLACK + 1, "unbalanced: {loads:?}");
        stop.cancel();
        drop(clients);
        bg.block_on(async {
            for l in loops {
                l.await.unwrap();
            }
            tracker.close();
            tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.expect("sessions end");
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while workers.loads() != [0, 0] {
            assert!(std::time::Instant::now() < deadline, "sessions still counted: {:?}", workers.loads());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// (nodelay, keepalive on, idle, interval, probes) of a socket.
    fn options(s: &TcpStream) -> (bool, bool, Duration, Duration, u32) {
        let r = SockRef::from(s);
        (
            r.tcp_nodelay().unwrap(),
            r.keepalive().unwrap(),
            r.tcp_keepalive_time().unwrap(),
            r.tcp_keepalive_interval().unwrap(),
            r.tcp_keepalive_retries().unwrap(),
        )
    }

    fn with(idle: u64) -> (bool, bool, Duration, Duration, u32) {
        (true, true, Duration::from_secs(idle), KEEPALIVE_INTERVAL, KEEPALIVE_RETRIES)
    }

    #[tokio::test]
    async fn accepted_connections_carry_the_listeners_options_even_those_queued_before_a_change() {
        let l = TcpListener::from_std(bind("127.0.0.1:0".parse().unwrap(), 4).unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut inherited = Inherited::default();
        let (a, b) = (cfg(Some(Duration::from_secs(37))), cfg(Some(Duration::from_secs(91))));

        // The first accept sets the options on the listening socket (and on itself).
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (s1, _) = l.accept().await.unwrap();
        inherited.tune(&l, &s1, &a);
        assert_eq!(options(&s1), with(37));
        // Past those that may have been queued before (none, and the margin for handshakes
        // being completed), connections get them from the listening socket alone.
        for _ in 0..2 * possible_cpus() + 2 {
            let _c = TcpStream::connect(addr).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            assert_eq!(options(&s), with(37), "inherited from the listening socket");
            inherited.tune(&l, &s, &a);
        }
        assert_eq!(inherited.explicit, 0);

        // Queued under the old keepalive, accepted after a reload changed it: set explicitly.
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (s2, _) = l.accept().await.unwrap();
        assert_eq!(options(&s2), with(37), "completed by the kernel before the change");
        inherited.tune(&l, &s2, &b);
        assert_eq!(options(&s2), with(91));
        let _c3 = TcpStream::connect(addr).await.unwrap();
        let (s3, _) = l.accept().await.unwrap();
        assert_eq!(options(&s3), with(91), "inherited the new setting");

        // Keepalive switched off by a reload: new connections have none.
        let (off, _c4) = (cfg(None), TcpStream::connect(addr).await.unwrap());
        let (s4, _) = l.accept().await.unwrap();
        inherited.tune(&l, &s4, &off);
        let _c5 = TcpStream::connect(addr).await.unwrap();
        let (s5, _) = l.accept().await.unwrap();
        assert_eq!((options(&s4).0, options(&s4).1), (true, false));
        assert_eq!((options(&s5).0, options(&s5).1), (true, false));
    }

    #[tokio::test]
    async fn only_the_connections_queued_before_the_options_are_tuned_one_by_one() {
        let l = TcpListener::from_std(bind("127.0.0.1:0".parse().unwrap(), 64).unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(queued(&l), Some(0));
        // Three handshakes completed before the loop ever set its options.
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while queued(&l) != Some(3) {
            assert!(tokio::time::Instant::now() < deadline, "accept queue: {:?}", queued(&l));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (mut inherited, a) = (Inherited::default(), cfg(Some(Duration::from_secs(37))));
        for _ in 0..3 {
            let (s, _) = l.accept().await.unwrap();
            assert!(!options(&s).0, "completed before the listening socket had TCP_NODELAY");
            inherited.tune(&l, &s, &a);
            assert_eq!(options(&s), with(37));
        }
        // The two still queued at the first accept, then the margin: not the backlog's 64.
        assert_eq!(inherited.explicit, 2 * possible_cpus() - 1);
    }

    #[tokio::test]
    async fn a_failed_upgrade_makes_the_loop_set_its_options_again() {
        let l = TcpListener::from_std(bind("127.0.0.1:0".parse().unwrap(), 4).unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut inherited = Inherited::default();
        let mine = cfg(Some(Duration::from_secs(37)));
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let (s1, _) = l.accept().await.unwrap();
        inherited.tune(&l, &s1, &mine);
        // A successor shares the socket, sets its own options, then fails its upgrade.
        set_tcp_options(SockRef::from(&l), None).unwrap();
        reapply_socket_options();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (s2, _) = l.accept().await.unwrap();
        assert!(!SockRef::from(&l).keepalive().unwrap(), "the successor's options");
        inherited.tune(&l, &s2, &mine);
        let r = SockRef::from(&l);
        assert!(r.keepalive().unwrap(), "the listening socket carries this process's options again");
        assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(37));
        assert_eq!(options(&s2), with(37));
    }

    #[test]
    fn the_session_budget_keeps_a_reserve() {
        assert_eq!(super::sessions_for(256, 1, 1), (256 - 64 - 5) / 2);
        assert_eq!(super::sessions_for(1_048_576, 2, 3), (1_048_576 - 64 - 2 * 9) / 2);
        assert_eq!(super::sessions_for(10, 1, 1), 1, "never zero: one session at a time still works");
        assert_eq!(super::sessions_for(u64::MAX, 64, 4), tokio::sync::Semaphore::MAX_PERMITS);
    }
}
