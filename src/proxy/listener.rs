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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::session::{self, SessionCtx};
use crate::config::ListenerConfig;

/// Descriptors kept out of the session budget: stdio, the runtime, listening sockets, etcd
/// connections, promotion checks, the admin endpoint, a cancel being forwarded.
pub const RESERVED_FDS: u64 = 64;
/// How long the accept loop pauses when `accept` fails for lack of descriptors or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How many sessions a descriptor limit of `nofile` allows.
pub fn sessions_for(nofile: u64) -> usize {
    let n = nofile.saturating_sub(RESERVED_FDS) / 2;
    usize::try_from(n).unwrap_or(usize::MAX).clamp(1, Semaphore::MAX_PERMITS)
}

/// The process-wide session budget from the soft RLIMIT_NOFILE, shared by every listener;
/// warns when it is below the listeners' total `maxconn`.
pub fn fd_budget(listeners: &[Arc<ListenerConfig>]) -> Arc<Semaphore> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    let nofile = if ok && lim.rlim_cur != libc::RLIM_INFINITY { lim.rlim_cur } else { u64::MAX };
    let sessions = sessions_for(nofile);
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

/// Accepts until `stop` is cancelled; every connection runs as a task of `tracker`, with the
/// session context current at its accept (a reload swaps it for new connections only), a permit
/// of `sem` (the listener's `maxconn`, resized by reloads) and one of the process's descriptor
/// budget `fds`.
pub async fn run(
    listener: Arc<TcpListener>,
    ctxs: Arc<ArcSwap<SessionCtx>>,
    sem: Arc<Semaphore>,
    fds: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let name = {
        let ctx = ctxs.load();
        info!(listener = %ctx.cfg.name, bind = %ctx.cfg.bind, role = ?ctx.cfg.role, cluster = %ctx.cfg.cluster, "listening");
        ctx.cfg.name.clone()
    };
    let mut starved = false;
    loop {
        let permits = tokio::select! {
            p = async { Ok::<_, tokio::sync::AcquireError>((sem.clone().acquire_owned().await?, fds.clone().acquire_owned().await?)) } => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
        };
        match accepted {
            Ok((sock, peer)) => {
                if std::mem::take(&mut starved) {
                    info!(listener = %name, "accepting again");
                }
                tracker.spawn(session::run(sock, peer, ctxs.load_full(), permits));
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
    info!(listener = %name, "stopped accepting");
}

/// Takes every connection already waiting in the kernel backlog of a listener that stops for
/// good (removed by a reload), so that closing the socket resets nobody who was already
/// connected. Returns how many were taken. They are served over the listener's `maxconn`: they
/// were accepted by the kernel before the listener went away.
pub fn drain_backlog(listener: &TcpListener, ctxs: &ArcSwap<SessionCtx>, tracker: &TaskTracker) -> usize {
    let mut taken = 0;
    let extra = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS));
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
        let Ok(stream) = tokio::net::TcpStream::from_std(conn.into()) else { continue };
        let (Ok(a), Ok(b)) = (extra.clone().try_acquire_owned(), extra.clone().try_acquire_owned()) else { break };
        tracker.spawn(session::run(stream, peer, ctxs.load_full(), (a, b)));
        taken += 1;
    }
    taken
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_session_budget_keeps_a_reserve() {
        assert_eq!(super::sessions_for(256), 96);
        assert_eq!(super::sessions_for(1_048_576), (1_048_576 - 64) / 2);
        assert_eq!(super::sessions_for(10), 1, "never zero: one session at a time still works");
        assert_eq!(super::sessions_for(u64::MAX), tokio::sync::Semaphore::MAX_PERMITS);
    }
}
