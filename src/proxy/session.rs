//! One client connection: place it on a server (queueing and retrying within the queue
//! timeout), then pipe bytes both ways until a side closes, the server is drained, or the
//! process stops.
//!
//! Retrying is safe because it happens only before the first byte is forwarded: until then the
//! client has only spoken to the kernel. A refused connect to the only eligible server (a
//! primary shutting down for a switchover, before Patroni releases its key) is not an error for
//! the client: it waits for the topology to change or a short backoff, and tries again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::pgwire::{self, sqlstate};
use super::pipe;
use crate::balancer::pool::{Lease, Pool, Refusal};
use crate::config::{ListenerConfig, Role};

/// How long a refused client gets to read its ErrorResponse.
const REFUSE_LIMIT: Duration = Duration::from_secs(5);
/// Backoff bounds after every eligible server refused a connect.
const RETRY_MIN: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(200);

/// What every session of one listener shares.
pub struct SessionCtx {
    pub cfg: Arc<ListenerConfig>,
    pub pool: Arc<Pool>,
    /// Stop placing clients (queued ones are refused): the process is stopping.
    pub stop: CancellationToken,
    /// Close every open session now.
    pub kill: CancellationToken,
}

pub async fn run(mut client: TcpStream, peer: SocketAddr, ctx: Arc<SessionCtx>, _permit: OwnedSemaphorePermit) {
    let m = ctx.pool.metrics();
    m.accepted.inc();
    m.active.inc();
    let _active = scopeguard(|| {
        m.active.dec();
    });
    tune(&client, ctx.cfg.tcp_keepalive);
    let deadline = Instant::now() + ctx.cfg.queue_timeout;

    let placed = tokio::select! {
        r = connect_backend(&ctx, deadline) => r,
        _ = client_gone(&client) => {
            debug!(listener = %ctx.cfg.name, %peer, "client left while waiting for a server");
            return;
        }
        _ = ctx.stop.cancelled() => Err(Refusal::Closed),
    };
    let (lease, server) = match placed {
        Ok(p) => p,
        Err(refusal) => {
            let (code, msg) = refusal_message(&ctx.cfg, refusal);
            match refusal {
                Refusal::NoServer => m.refused_no_server.inc(),
                Refusal::Full => m.refused_full.inc(),
                Refusal::Closed => m.refused_closed.inc(),
            };
            warn!(listener = %ctx.cfg.name, %peer, code, "refused: {msg}");
            pgwire::refuse(&mut client, code, &msg, REFUSE_LIMIT).await;
            return;
        }
    };

    tokio::select! {
        r = pipe::pipe(&client, &server, &m.bytes_from_clients, &m.bytes_to_clients) => {
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

/// Places the client on a server, retrying refused connects until `deadline`.
async fn connect_backend(ctx: &SessionCtx, deadline: Instant) -> Result<(Lease, TcpStream), Refusal> {
    let mut avoid = Vec::new();
    let mut backoff = RETRY_MIN;
    let mut changes = ctx.pool.changes();
    loop {
        let lease = ctx.pool.acquire(&avoid, deadline).await?;
        changes.borrow_and_update();
        let limit = ctx.cfg.connect_timeout.min(deadline.saturating_duration_since(Instant::now()));
        let err = match tokio::time::timeout(limit, TcpStream::connect(lease.backend.addr)).await {
            Ok(Ok(s)) => {
                tune(&s, ctx.cfg.tcp_keepalive);
                return Ok((lease, s));
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {limit:?}"),
        };
        ctx.pool.metrics().connect_errors.inc();
        debug!(listener = %ctx.cfg.name, member = %lease.backend.member, addr = %lease.backend.addr, error = %err, "backend connect failed");
        avoid.push(lease.backend.clone());
        drop(lease);
        if Instant::now() >= deadline {
            return Err(Refusal::NoServer);
        }
        if !ctx.pool.has_alternative(&avoid) {
            // Every eligible server refused: wait for the topology to move, or a short backoff.
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

fn refusal_message(cfg: &ListenerConfig, r: Refusal) -> (&'static str, String) {
    let what = match cfg.role {
        Role::Primary => "primary",
        Role::Replica => "replica",
        Role::ReadOnly => "replica or primary",
    };
    match r {
        Refusal::NoServer => (
            sqlstate::CANNOT_CONNECT_NOW,
            format!("pgfront: no {what} available for cluster {} (listener {}, waited {:?})", cfg.cluster, cfg.name, cfg.queue_timeout),
        ),
        Refusal::Full => (
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "pgfront: too many connections: every {what} of cluster {} is at server_maxconn {} (listener {}, waited {:?})",
                cfg.cluster, cfg.server_maxconn, cfg.name, cfg.queue_timeout
            ),
        ),
        Refusal::Closed => (sqlstate::ADMIN_SHUTDOWN, "pgfront is shutting down".to_owned()),
    }
}

/// TCP_NODELAY and keepalive on a proxied socket. Failures only cost latency, so they are
/// logged, not fatal.
fn tune(s: &TcpStream, keepalive: Option<Duration>) {
    if let Err(e) = s.set_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY");
    }
    if let Some(idle) = keepalive {
        let ka = TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(10)).with_retries(3);
        if let Err(e) = SockRef::from(s).set_tcp_keepalive(&ka) {
            debug!(error = %e, "SO_KEEPALIVE");
        }
    }
}

/// Resolves when a waiting client closes its connection. A client that already sent its
/// startup packet cannot be watched without reading it, so then this never resolves.
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
