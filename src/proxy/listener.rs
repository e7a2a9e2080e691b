//! Listening sockets and the accept loop of one listener.
//!
//! Sockets are made with socket2 (SO_REUSEADDR, explicit backlog, v6-only for IPv6) so that a
//! later reload can keep or hand them over. As in mini-redis, a permit of the listener's
//! `maxconn` semaphore is taken *before* `accept`: over the limit, clients wait in the kernel's
//! backlog instead of being accepted and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::session::{self, SessionCtx};

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
/// session context current at its accept (a reload swaps it for new connections only) and a
/// permit of `sem` (the listener's `maxconn`, resized by reloads).
pub async fn run(
    listener: Arc<TcpListener>,
    ctxs: Arc<ArcSwap<SessionCtx>>,
    sem: Arc<Semaphore>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let name = {
        let ctx = ctxs.load();
        info!(listener = %ctx.cfg.name, bind = %ctx.cfg.bind, role = ?ctx.cfg.role, cluster = %ctx.cfg.cluster, "listening");
        ctx.cfg.name.clone()
    };
    loop {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p {
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
                tracker.spawn(session::run(sock, peer, ctxs.load_full(), permit));
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) => {
                // Out of descriptors or memory: back off instead of spinning; the kernel keeps
                // the pending connections in the backlog meanwhile.
                error!(listener = %name, error = %e, "accept failed: out of resources, pausing 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
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
        let Ok(permit) = extra.clone().try_acquire_owned() else { break };
        tracker.spawn(session::run(stream, peer, ctxs.load_full(), permit));
        taken += 1;
    }
    taken
}
