//! The admin HTTP endpoint. Every route is listed here:
//!
//! | route      | what |
//! |------------|------|
//! | `/metrics` | Prometheus text format |
//! | `/status`  | JSON: clusters (leader, members, roles, lag, routing paused for), listeners (servers, connections, queue, oldest queued wait, routing paused for), VIPs, configuration |
//! | `/events`  | JSON: the recent events, newest first (`events::Event`); `?since=<id>` for the newer ones only |
//! | `/health`  | 200 when every primary listener has a routable primary, else 503 with the reason |
//! | `/`        | the status page for humans (`page`): `/status` and the events as HTML, refreshing itself; `/?part=main` is its refreshed part |
//! | `POST /members/[<cluster>/]<member>/drain[?kill=true]` | no new connections to the member, on every listener (`control`) |
//! | `POST /members/[<cluster>/]<member>/resume` | the member takes connections again (`control`) |
//!
//! The read routes are open to whoever reaches the port. The control routes answer POST only,
//! to a loopback peer or to a request with `Authorization: Bearer <[admin] token>`
//! (`require_token = true`: the token from loopback too); see `control`.
//!
//! ## Limits (hostile or broken clients)
//! Whatever a client of this port does, the endpoint holds at most
//! [`DEFAULT_ADMIN_MAX_CONNECTIONS`] connections, each one a task of a `TaskTracker` that
//! stops with the endpoint, and each one bounded:
//! - a request's head must arrive within [`DEFAULT_ADMIN_HEADER_READ_TIMEOUT`] of the moment
//!   the connection waits for it: this bounds a slowloris client *and* an idle keep-alive
//!   connection (hyper restarts the timer when it waits for the next request);
//! - a connection lives at most [`DEFAULT_ADMIN_CONNECTION_LIFETIME`], keep-alive or not; then,
//!   as at shutdown, an answer in flight gets [`DEFAULT_ADMIN_CLOSE_GRACE`] to finish;
//! - request heads are at most [`DEFAULT_ADMIN_MAX_HEADER_SIZE`] bytes and
//!   [`DEFAULT_ADMIN_MAX_HEADERS`] headers (hyper answers 431 beyond), and the read buffer at
//!   most [`DEFAULT_ADMIN_MAX_BUF_SIZE`]; request bodies are never read.
//!
//! The connection cap is a semaphore permit taken *before* `accept`, as on the proxy's
//! listeners: over it, clients wait in the kernel's backlog (FIFO) and cost no task. A cap
//! alone would let one slowloris client fill every slot and lock the operators out until its
//! connections time out, so a second, lower cap applies per client address
//! ([`DEFAULT_ADMIN_MAX_CONNECTIONS_PER_PEER`]): a connection over it is accepted, answered
//! `503` and closed at once, which keeps the backlog moving and leaves room for the other
//! addresses (Prometheus, an operator's browser, `pgfront status`). Against many addresses
//! the endpoint queues fairly instead: the backlog is first come, first served and every
//! slot frees itself within the header timeout, so a request waits at most about
//! `(backlog ahead / cap) × header timeout`, and the endpoint recovers as soon as the flood stops.
//! (Past the listen backlog the kernel drops SYNs and the clients retry them: still bounded,
//! still no task.)
//!
//! Proxying is not delayed by this port: client sessions are accepted by other sockets and run
//! on other tasks, and nothing here is awaited by them or holds a lock across an `.await`. A
//! connection that sends nothing is an idle task plus hyper's read buffer, never woken until
//! its timer fires; at most the cap of them exist. A request reads the pools' counters under
//! their mutex only while copying them, as the data path itself does, and costs microseconds of
//! the shared runtime's CPU; the cap bounds how many run at once, not their rate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use arc_swap::ArcSwap;

use crate::balancer::maintenance::{self, Maintenance, MemberState};
use crate::balancer::pool::{Pool, PoolStatus};
use crate::config::AdminAuth;
use crate::config::ListenerConfig;
use crate::config::{Balance, Role};
use crate::discovery::ClusterHandle;
use crate::events::Events;
use crate::metrics::{self, AdminMetrics};
use crate::topology::{MemberRole, PrimaryStatus};

mod control;
mod page;

/// Admin connections open at once; more wait in the kernel's backlog. A scrape or a status
/// page needs one or a few; 64 leaves room for several tools and operators.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Admin connections open at once from one address: a browser opens up to 6, Prometheus 1.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS_PER_PEER: usize = 16;
/// Time a client has to send a request's head, from connect or from the previous answer.
/// Every legitimate client sends it in one packet.
pub const DEFAULT_ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one admin connection, keep-alive included.
pub const DEFAULT_ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Time an answer in flight gets to finish when the connection's life ends or at shutdown.
pub const DEFAULT_ADMIN_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Request line and headers; hyper answers 431 beyond.
pub const DEFAULT_ADMIN_MAX_HEADER_SIZE: usize = 8 << 10;
pub const DEFAULT_ADMIN_MAX_HEADERS: usize = 64;
/// Read buffer of one connection (hyper's minimum is 8 KiB).
pub const DEFAULT_ADMIN_MAX_BUF_SIZE: usize = 16 << 10;

/// The limits of `serve`, a struct so that tests can shrink them.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub header_read_timeout: Duration,
    pub connection_lifetime: Duration,
    pub close_grace: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_buf_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_ADMIN_MAX_CONNECTIONS_PER_PEER,
            header_read_timeout: DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
            connection_lifetime: DEFAULT_ADMIN_CONNECTION_LIFETIME,
            close_grace: DEFAULT_ADMIN_CLOSE_GRACE,
            max_header_size: DEFAULT_ADMIN_MAX_HEADER_SIZE,
            max_headers: DEFAULT_ADMIN_MAX_HEADERS,
            max_buf_size: DEFAULT_ADMIN_MAX_BUF_SIZE,
        }
    }
}

/// What the admin endpoint reads: the supervisor replaces it whole at every start and reload.
pub struct Shared {
    pub metrics: Arc<metrics::Metrics>,
    /// The recent-events ring (the same one for the life of the process).
    pub events: Events,
    pub clusters: Vec<ClusterHandle>,
    pub listeners: Vec<(Arc<ListenerConfig>, Arc<Pool>)>,
    pub vips: Vec<crate::vip::driver::SharedVipStatus>,
    pub config: ConfigStatus,
    /// Members drained by an operator (the process's one registry).
    pub maintenance: Arc<Maintenance>,
    /// Who may use the control routes.
    pub auth: AdminAuth,
}

/// The running configuration: which file, which revision (1 at start, +1 per applied reload),
/// and how the last reload went.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigStatus {
    pub path: String,
    pub revision: u64,
    /// When the running configuration was loaded (Unix seconds).
    pub loaded_at: u64,
    /// When the last reload was attempted (Unix seconds), applied or not.
    pub last_reload: Option<u64>,
    /// Why the last reload was refused; `None` once a reload succeeds.
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    /// This process (a binary upgrade changes it).
    pub pid: u32,
    pub config: ConfigStatus,
    pub clusters: Vec<ClusterStatus>,
    pub listeners: Vec<ListenerStatus>,
    pub vips: Vec<crate::vip::driver::VipStatus>,
}

#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub scope: String,
    pub etcd_up: bool,
    pub etcd_error: Option<String>,
    /// The etcd endpoints whose discovery sessions have the keys (two with several endpoints).
    pub etcd_sessions: Vec<String>,
    pub leader: Option<String>,
    pub primary: Option<String>,
    pub primary_status: PrimaryStatus,
    pub switchover_pending: bool,
    /// Seconds since no primary has been routable; `None` while one is.
    pub routing_paused_seconds: Option<f64>,
    /// Which keys decide the roles: "patroni" or "agent".
    pub source: crate::config::Source,
    /// Nodes claiming primary together on the highest timeline (agent keys; CRITICAL).
    pub split_brain: Vec<String>,
    /// The fencing request in force, if any.
    pub fence: Option<crate::topology::Fence>,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Serialize)]
pub struct MemberStatus {
    pub name: String,
    pub addr: Option<SocketAddr>,
    pub role: MemberRole,
    pub state: String,
    pub timeline: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub noloadbalance: bool,
    /// Drained by an operator (`pgfront drain`) or by its agent (`pgfront agent drain`): no
    /// new connections on any listener.
    pub maintenance: bool,
    /// With `--kill`: its sessions were closed too.
    pub maintenance_kill: bool,
    /// Since when (Unix seconds), for a drain by an operator of this proxy.
    pub maintenance_since: Option<u64>,
    /// What pgfront does with it: up, nolb, drain, maint, down (`pgfront_server_state`).
    pub server_state: MemberState,
    /// A fencing request (`pgfront agent pre-promote`) names it: no primary connections.
    pub fenced: bool,
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub bind: SocketAddr,
    pub cluster: String,
    pub role: Role,
    pub balance: Balance,
    pub server_maxconn: u32,
    /// Primary listeners: seconds since no primary of the cluster has been routable (clients
    /// wait in the queue meanwhile); `None` while one is, and for other roles.
    pub routing_paused_seconds: Option<f64>,
    #[serde(flatten)]
    pub pool: PoolStatus,
}

pub fn status(shared: &Shared) -> Status {
    let clusters: Vec<ClusterStatus> = shared
        .clusters
        .iter()
        .map(|c| {
            let view = c.view.borrow().clone();
            let drained = shared.maintenance.cluster(&c.cfg.name);
            ClusterStatus {
                name: c.cfg.name.clone(),
                scope: c.cfg.scope.clone(),
                etcd_up: c.health.etcd_up.load(Ordering::Relaxed),
                etcd_error: c.health.last_error.lock().ok().and_then(|e| e.clone()),
                etcd_sessions: c.health.etcd_sessions.lock().map(|s| s.clone()).unwrap_or_default(),
                leader: view.state.leader.clone(),
                primary: view.primary().map(|m| m.name.clone()),
                primary_status: view.primary_status(),
                switchover_pending: view.state.failover.as_ref().is_some_and(|f| !f.scheduled),
                routing_paused_seconds: c.health.routing_paused_for().map(|d| d.as_secs_f64()),
                source: c.cfg.source,
                split_brain: view.state.split_brain.clone(),
                fence: view.state.fence.clone(),
                members: view
                    .state
                    .members
                    .values()
                    .map(|m| {
                        let entry = drained.get(&m.name).copied();
                        MemberStatus {
                            name: m.name.clone(),
                            addr: m.addr,
                            role: m.role,
                            state: m.state.clone(),
                            timeline: m.timeline,
                            lag_bytes: view.lag(m),
                            noloadbalance: m.noloadbalance,
                            maintenance: entry.is_some() || m.maintenance,
                            maintenance_kill: entry.is_some_and(|e| e.kill),
                            maintenance_since: entry.map(|e| e.since),
                            server_state: maintenance::member_state(&view, m, entry),
                            fenced: view.fenced(&m.name),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let listeners = shared
        .listeners
        .iter()
        .map(|(cfg, pool)| ListenerStatus {
            name: cfg.name.clone(),
            bind: cfg.bind,
            cluster: cfg.cluster.clone(),
            role: cfg.role,
            balance: cfg.balance,
            server_maxconn: cfg.server_maxconn,
            routing_paused_seconds: match cfg.role {
                Role::Primary => clusters.iter().find(|c| c.name == cfg.cluster).and_then(|c| c.routing_paused_seconds),
                _ => None,
            },
            pool: pool.status(),
        })
        .collect();
    let vips = shared.vips.iter().filter_map(|v| v.lock().ok().map(|s| s.clone())).collect();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        config: shared.config.clone(),
        clusters,
        listeners,
        vips,
    }
}

/// Serves the admin routes until `stop` is cancelled, within the limits of the module doc.
pub async fn serve(listener: TcpListener, shared: Arc<ArcSwap<Shared>>, stop: CancellationToken) {
    serve_with(listener, shared, stop, Limits::default(), TaskTracker::new()).await
}

/// `serve` with explicit limits; every connection is a task of `tracker`. Returns once the
/// connections have closed (within `close_grace` of `stop`).
pub(crate) async fn serve_with(
    listener: TcpListener,
    shared: Arc<ArcSwap<Shared>>,
    stop: CancellationToken,
    limits: Limits,
    tracker: TaskTracker,
) {
    info!(addr = ?listener.local_addr().ok(), "admin endpoint listening");
    let limits = Arc::new(limits);
    let metrics = shared.load().metrics.admin();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(Mutex::new(HashMap::new()));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset while queued: pause rather
                    // than spin; pending clients stay in the backlog.
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Some(slot) = Slot::take(&peers, peer.ip(), limits.max_connections_per_peer, permit, &metrics) else {
            metrics.closed_peer_limit.inc();
            debug!(%peer, "admin: too many connections from this address");
            refuse(sock);
            continue;
        };
        tracker.spawn(connection(sock, peer, shared.clone(), limits.clone(), stop.clone(), metrics.clone(), slot));
    }
    tracker.close();
    // Every connection task watches `stop` and ends within `close_grace`.
    if tokio::time::timeout(limits.close_grace * 2, tracker.wait()).await.is_err() {
        warn!(open = tracker.len(), "admin connections still open after shutdown");
    }
}

/// One connection's share of the limits: the global permit and its address's count, both
/// given back on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl Slot {
    fn take(
        peers: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        per_peer: usize,
        permit: OwnedSemaphorePermit,
        metrics: &AdminMetrics,
    ) -> Option<Slot> {
        let mut map = peers.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= per_peer {
            return None;
        }
        *n += 1;
        metrics.connections.inc();
        Some(Slot { _permit: permit, peers: peers.clone(), ip, open: metrics.connections.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
        let mut map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Tells a client over its address's limit why, without waiting for it: the answer fits in
/// the empty send buffer of a new socket, and a client that does not read it loses nothing.
fn refuse(sock: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 46\r\n\
        Connection: close\r\n\r\ntoo many admin connections from your address\r\n";
    let _ = sock.try_write(BUSY);
}

async fn connection(
    sock: TcpStream,
    peer: SocketAddr,
    shared: Arc<ArcSwap<Shared>>,
    limits: Arc<Limits>,
    stop: CancellationToken,
    metrics: AdminMetrics,
    _slot: Slot,
) {
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared.load(), peer, req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_size)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_buf_size.max(8 << 10))
        .serve_connection(TokioIo::new(sock), svc);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = tokio::time::sleep(limits.connection_lifetime) => {
            metrics.closed_lifetime.inc();
            None
        }
        _ = stop.cancelled() => {
            metrics.closed_shutdown.inc();
            None
        }
    };
    match ended {
        Some(Ok(())) => {}
        Some(Err(e)) if e.is_timeout() => {
            metrics.closed_header_timeout.inc();
            debug!("admin connection: no request within {:?}", limits.header_read_timeout);
        }
        Some(Err(e)) => debug!(error = %e, "admin connection"),
        None => {
            // Finish the answer in flight, if any, then close.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.close_grace, conn).await;
        }
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    r
}

fn route(shared: &Shared, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path().starts_with("/members/") {
        return control::handle(shared, peer, &req);
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", shared.metrics.encode()),
        "/status" => {
            let body = serde_json::to_vec_pretty(&status(shared)).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        "/health" => {
            let s = status(shared);
            let bad: Vec<String> = s
                .listeners
                .iter()
                .filter(|l| l.role == Role::Primary)
                .filter_map(|l| {
                    let c = s.clusters.iter().find(|c| c.name == l.cluster)?;
                    c.primary.is_none().then(|| format!("{}: {:?}", l.name, c.primary_status))
                })
                .collect();
            if bad.is_empty() {
                reply(StatusCode::OK, "text/plain", "ok\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("no primary: {}\n", bad.join(", ")))
            }
        }
        "/events" => match since(req.uri().query()) {
            Ok(since) => {
                let body = serde_json::to_vec_pretty(&shared.events.list(since)).unwrap_or_default();
                reply(StatusCode::OK, "application/json", body)
            }
            Err(bad) => reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("since: not an event id: {bad:?} (use /events?since=<id>)\n"),
            ),
        },
        "/" => {
            let s = serde_json::to_value(status(shared)).unwrap_or_default();
            let events = shared.events.list(None);
            if req.uri().query() == Some("part=main") {
                reply(StatusCode::OK, "text/html; charset=utf-8", page::main(&s, &events))
            } else {
                let nonce = nonce();
                let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", page::render(&s, &events, &nonce));
                let csp = format!(
                    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; \
                     base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                );
                if let Ok(v) = hyper::header::HeaderValue::from_str(&csp) {
                    r.headers_mut().insert(hyper::header::CONTENT_SECURITY_POLICY, v);
                }
                r
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "routes: / /status /events /health /metrics, POST /members/[<cluster>/]<member>/drain|resume\n",
        ),
    }
}

/// `since=<id>` of `/events`; other parameters are ignored.
fn since(query: Option<&str>) -> Result<Option<u64>, String> {
    let Some(v) = query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("since=")) else {
        return Ok(None);
    };
    v.parse().map(Some).map_err(|_| v.to_owned())
}

/// A value for the page's script nonce that differs at each answer: an injected script
/// cannot know it. (`RandomState` is keyed from the OS's random source.)
fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;
    use tokio::task::JoinSet;
    use tokio::time::{sleep, Instant};

    use super::*;
    use crate::metrics::Metrics;

    struct Server {
        addr: SocketAddr,
        tracker: TaskTracker,
        stop: CancellationToken,
        shared: Arc<ArcSwap<Shared>>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(limits: Limits, shared: Shared) -> Server {
        // A backlog that holds every test client: with tokio's 128, the excess SYNs are
        // dropped and retried a second later in real time, which paused time runs past.
        let std = crate::proxy::listener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 1024).unwrap();
        let listener = TcpListener::from_std(std).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tracker, stop, shared) =
            (TaskTracker::new(), CancellationToken::new(), Arc::new(ArcSwap::from_pointee(shared)));
        let task = tokio::spawn(serve_with(listener, shared.clone(), stop.clone(), limits, tracker.clone()));
        Server { addr, tracker, stop, shared, task }
    }

    fn empty() -> Shared {
        Shared {
            metrics: Arc::new(Metrics::new()),
            events: Events::default(),
            clusters: vec![],
            listeners: vec![],
            vips: vec![],
            config: config_status(),
            maintenance: Default::default(),
            auth: Default::default(),
        }
    }

    fn config_status() -> ConfigStatus {
        ConfigStatus { path: "test.toml".into(), revision: 1, loaded_at: 0, last_reload: None, last_error: None }
    }

    async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((src, 0))).unwrap();
        s.connect(dst).await.unwrap()
    }

    /// A slowloris client: sends a request head one byte every 20 ms and never finishes it,
    /// until the server closes the connection, counted in `closed`. Bounded: it gives up
    /// (uncounted) after 5000 bytes.
    async fn slowloris(src: Ipv4Addr, dst: SocketAddr, closed: Arc<AtomicUsize>) {
        slowloris_counted(src, dst, closed, Arc::default()).await
    }

    /// `slowloris`, counting its connect in `connected`.
    async fn slowloris_counted(src: Ipv4Addr, dst: SocketAddr, closed: Arc<AtomicUsize>, connected: Arc<AtomicUsize>) {
        let mut s = connect_from(src, dst).await;
        connected.fetch_add(1, Ordering::SeqCst);
        let head = b"GET /health HTTP/1.1\r\nHost: pgfront\r\nX-Slow: ";
        let mut buf = [0u8; 256];
        let mut server_closed = false;
        for i in 0..5000 {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(n) if n > 0 => {} // a 503 or 408: the close follows
                    _ => server_closed = true,
                },
                _ = sleep(Duration::from_millis(20)) => {
                    server_closed = s.write_all(&[head.get(i).copied().unwrap_or(b'a')]).await.is_err();
                }
            }
            if server_closed {
                closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }

    /// One request on a fresh connection from `src`: what came back, or `ERR …` on a reset.
    async fn get(src: Ipv4Addr, dst: SocketAddr, path: &str) -> String {
        let mut s = connect_from(src, dst).await;
        let req = format!("GET {path} HTTP/1.1\r\nHost: pgfront\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        match s.write_all(req.as_bytes()).await {
            Ok(()) => match s.read_to_end(&mut out).await {
                Ok(_) => String::from_utf8_lossy(&out).into_owned(),
                Err(e) => format!("ERR {e}"),
            },
            Err(e) => format!("ERR {e}"),
        }
    }

    /// Polls `cond` every 5 ms until it holds or `within` passes; records the largest number of
    /// admin tasks seen meanwhile in `max_tasks`.
    async fn wait_for(within: Duration, tracker: &TaskTracker, max_tasks: &mut usize, cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            *max_tasks = (*max_tasks).max(tracker.len());
            if cond() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(5)).await;
        }
    }

    /// With the default limits, in paused time (hyper's timer is tokio's, and loopback data is
    /// in the peer's socket when `write` returns, so auto-advance does not outrun it): 300
    /// slowloris connections from 30 addresses (under the per-address cap, so only the global
    /// cap and the header timeout act) are all closed, and never more than the cap are served.
    #[tokio::test(start_paused = true)]
    async fn slowloris_connections_are_closed_and_tasks_stay_under_the_cap() {
        const N: usize = 300;
        let srv = start(Limits::default(), empty()).await;
        let closed = Arc::new(AtomicUsize::new(0));
        let mut clients = JoinSet::new();
        for i in 0..N {
            let src = Ipv4Addr::new(127, 0, 1, 1 + (i % 30) as u8);
            clients.spawn(slowloris(src, srv.addr, closed.clone()));
        }
        let started = Instant::now();
        let mut max_tasks = 0;
        // Each connection is closed DEFAULT_ADMIN_HEADER_READ_TIMEOUT after its accept:
        // ceil(300 / 64) = 5 rounds of 5 s.
        let all_closed =
            wait_for(Duration::from_secs(120), &srv.tracker, &mut max_tasks, || closed.load(Ordering::SeqCst) == N)
                .await;
        let took = started.elapsed();
        assert!(max_tasks <= DEFAULT_ADMIN_MAX_CONNECTIONS, "{max_tasks} admin tasks alive at once");
        assert!(max_tasks > 0);
        assert!(all_closed, "only {} of {N} slowloris connections were closed", closed.load(Ordering::SeqCst));
        let rounds = N.div_ceil(DEFAULT_ADMIN_MAX_CONNECTIONS) as u32;
        assert!(took >= DEFAULT_ADMIN_HEADER_READ_TIMEOUT * rounds, "{took:?}: closed before their timeout");
        assert_eq!(srv.shared.load().metrics.admin().closed_header_timeout.get(), N as u64);
        assert_eq!(srv.shared.load().metrics.admin().closed_peer_limit.get(), 0);
        eprintln!("{N} slowloris connections closed in {took:?} of virtual time, at most {max_tasks} tasks");
        srv.stop.cancel();
        srv.task.await.unwrap();
        assert_eq!(srv.tracker.len(), 0);
    }

    /// The same with a short timeout in real time, and the endpoint answering afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slowloris_from_one_address_recovers_in_real_time() {
        const N: usize = 300;
        const CAP: usize = 16;
        let limits = Limits {
            max_connections: CAP,
            max_connections_per_peer: CAP,
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let srv = start(limits, empty()).await;
        let closed = Arc::new(AtomicUsize::new(0));
        let mut clients = JoinSet::new();
        for _ in 0..N {
            clients.spawn(slowloris(Ipv4Addr::LOCALHOST, srv.addr, closed.clone()));
        }
        let mut max_tasks = 0;
        // 300 / 16 rounds of 200 ms ≈ 4 s.
        let all_closed =
            wait_for(Duration::from_secs(60), &srv.tracker, &mut max_tasks, || closed.load(Ordering::SeqCst) == N)
                .await;
        assert!(max_tasks <= CAP, "{max_tasks} admin tasks alive at once, cap {CAP}");
        assert!(all_closed, "only {} of {N} slowloris connections were closed", closed.load(Ordering::SeqCst));
        assert_eq!(srv.shared.load().metrics.admin().closed_header_timeout.get(), N as u64);
        assert!(get(Ipv4Addr::LOCALHOST, srv.addr, "/health").await.starts_with("HTTP/1.1 200"));
        srv.stop.cancel();
        srv.task.await.unwrap();
        assert_eq!(srv.tracker.len(), 0);
    }

    /// The common slowloris comes from one address: it gets its per-address share and the
    /// other addresses are answered at once, while its connections stay open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_is_answered_while_one_address_holds_slowloris_connections() {
        const N: usize = 300;
        const PER_PEER: usize = 8;
        let limits = Limits {
            max_connections: 16,
            max_connections_per_peer: PER_PEER,
            header_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let srv = start(limits, empty()).await;
        let closed = Arc::new(AtomicUsize::new(0));
        let mut clients = JoinSet::new();
        for _ in 0..N {
            clients.spawn(slowloris(Ipv4Addr::LOCALHOST, srv.addr, closed.clone()));
        }
        let mut max_tasks = 0;
        let settled = wait_for(Duration::from_secs(30), &srv.tracker, &mut max_tasks, || {
            closed.load(Ordering::SeqCst) == N - PER_PEER && srv.tracker.len() == PER_PEER
        })
        .await;
        assert!(settled, "closed {}, open {}", closed.load(Ordering::SeqCst), srv.tracker.len());
        let started = Instant::now();
        let reply = get(Ipv4Addr::new(127, 0, 0, 2), srv.addr, "/health").await;
        let waited = started.elapsed();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert_eq!(reply.rsplit("\r\n\r\n").next(), Some("ok\n"));
        // The slowloris connections are still open: the answer did not wait for them. (The
        // /health connection's task may still be ending when its answer arrives.)
        assert_eq!(closed.load(Ordering::SeqCst), N - PER_PEER);
        let back =
            wait_for(Duration::from_secs(5), &srv.tracker, &mut max_tasks, || srv.tracker.len() == PER_PEER).await;
        assert!(back, "{} admin tasks after /health was answered, {PER_PEER} expected", srv.tracker.len());
        assert_eq!(closed.load(Ordering::SeqCst), N - PER_PEER);
        assert!(max_tasks <= PER_PEER + 1, "{max_tasks}");
        // The attacker's own address is refused: a 503 saying why, unless the request arrived
        // after the close and the kernel answered it with a reset.
        let refused = get(Ipv4Addr::LOCALHOST, srv.addr, "/health").await;
        let told = refused.starts_with("HTTP/1.1 503") && refused.contains("too many admin connections");
        assert!(told || refused.starts_with("ERR ") || refused.is_empty(), "{refused}");
        let m = srv.shared.load().metrics.encode();
        assert!(
            m.contains(&format!(
                "pgfront_admin_closed_connections_total{{reason=\"peer_limit\"}} {}",
                N - PER_PEER + 1
            )),
            "{m}"
        );
        assert!(m.contains(&format!("pgfront_admin_connections {PER_PEER}")), "{m}");
        eprintln!("/health from another address answered in {waited:?} with {PER_PEER} slowloris connections open");
        // Shutdown closes the slowloris connections too.
        srv.stop.cancel();
        srv.task.await.unwrap();
        assert_eq!(srv.tracker.len(), 0);
        assert!(
            wait_for(Duration::from_secs(10), &srv.tracker, &mut max_tasks, || closed.load(Ordering::SeqCst) == N)
                .await
        );
    }

    /// Slowloris from many addresses fills the cap: a new request queues in the backlog, first
    /// come first served, and is answered once the connections ahead of it time out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_is_answered_after_a_many_address_slowloris_times_out() {
        const N: usize = 300;
        const CAP: usize = 16;
        let limits = Limits {
            max_connections: CAP,
            max_connections_per_peer: CAP,
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let srv = start(limits, empty()).await;
        let (closed, connected) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut clients = JoinSet::new();
        for i in 0..N {
            let src = Ipv4Addr::new(127, 0, 1, 1 + (i % 30) as u8);
            clients.spawn(slowloris_counted(src, srv.addr, closed.clone(), connected.clone()));
        }
        let mut max_tasks = 0;
        let full = || srv.tracker.len() == CAP && connected.load(Ordering::SeqCst) == N;
        assert!(wait_for(Duration::from_secs(10), &srv.tracker, &mut max_tasks, full).await);
        let started = Instant::now();
        let reply = get(Ipv4Addr::new(127, 0, 0, 2), srv.addr, "/health").await;
        let waited = started.elapsed();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(max_tasks <= CAP);
        // First come, first served: it was accepted after every connection ahead of it in the
        // backlog (all N), of which at most CAP - 1 were still open.
        let timed_out = srv.shared.load().metrics.admin().closed_header_timeout.get();
        assert!(timed_out >= (N - CAP + 1) as u64, "{timed_out}");
        eprintln!(
            "/health queued behind {N} slowloris connections (cap {CAP}, header timeout 200ms) answered in {waited:?}; \
             {} of them closed by then",
            closed.load(Ordering::SeqCst)
        );
        srv.stop.cancel();
        srv.task.await.unwrap();
    }

    /// Reads one `/health` answer on a keep-alive connection; false when the server closed.
    async fn read_answer(s: &mut TcpStream) -> bool {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"ok\n") {
            match s.read(&mut buf).await {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        true
    }

    /// Keep-alive is bounded twice: an idle connection by the header timeout, a busy one by the
    /// connection lifetime.
    #[tokio::test(start_paused = true)]
    async fn keep_alive_is_bounded_by_the_header_timeout_and_the_lifetime() {
        let srv = start(Limits::default(), empty()).await;
        let request = b"GET /health HTTP/1.1\r\nHost: pgfront\r\n\r\n";
        // Idle after one answer: closed DEFAULT_ADMIN_HEADER_READ_TIMEOUT later.
        let mut s = connect_from(Ipv4Addr::LOCALHOST, srv.addr).await;
        s.write_all(request).await.unwrap();
        assert!(read_answer(&mut s).await);
        let idle = Instant::now();
        assert_eq!(s.read(&mut [0u8; 64]).await.unwrap_or(0), 0);
        assert!(idle.elapsed() >= DEFAULT_ADMIN_HEADER_READ_TIMEOUT, "{:?}", idle.elapsed());
        assert!(idle.elapsed() < DEFAULT_ADMIN_CONNECTION_LIFETIME, "{:?}", idle.elapsed());
        // A request every second: closed at the end of its lifetime.
        let mut s = connect_from(Ipv4Addr::LOCALHOST, srv.addr).await;
        let born = Instant::now();
        let mut answered = 0;
        for _ in 0..1000 {
            if s.write_all(request).await.is_err() || !read_answer(&mut s).await {
                break;
            }
            answered += 1;
            sleep(Duration::from_secs(1)).await;
        }
        let lived = born.elapsed();
        assert!(lived >= DEFAULT_ADMIN_CONNECTION_LIFETIME, "{lived:?}");
        assert!(lived < DEFAULT_ADMIN_CONNECTION_LIFETIME + Duration::from_secs(2), "{lived:?}");
        assert!(answered >= 59, "{answered}");
        let m = srv.shared.load().metrics.admin();
        assert_eq!((m.closed_header_timeout.get(), m.closed_lifetime.get()), (1, 1));
        srv.stop.cancel();
        srv.task.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_request_heads_are_refused() {
        let srv = start(Limits::default(), empty()).await;
        let mut s = connect_from(Ipv4Addr::LOCALHOST, srv.addr).await;
        let big = "a".repeat(DEFAULT_ADMIN_MAX_HEADER_SIZE);
        let req = format!("GET /health HTTP/1.1\r\nHost: pgfront\r\nX-Big: {big}\r\n\r\n");
        // The server may close before reading it all: the write can fail, the answer must not be 200.
        let _ = s.write_all(req.as_bytes()).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
        let many: String = (0..DEFAULT_ADMIN_MAX_HEADERS + 1).map(|i| format!("X-H{i}: v\r\n")).collect();
        let mut s = connect_from(Ipv4Addr::LOCALHOST, srv.addr).await;
        s.write_all(format!("GET /health HTTP/1.1\r\nHost: pgfront\r\n{many}\r\n").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
        assert!(get(Ipv4Addr::LOCALHOST, srv.addr, "/health").await.starts_with("HTTP/1.1 200"));
        srv.stop.cancel();
        srv.task.await.unwrap();
    }

    /// `/events` (newest first, `since`), and the page: whole with a CSP whose nonce is its
    /// script's, or only its refreshed part.
    #[tokio::test]
    async fn events_and_the_page() {
        use crate::events::{EventKind, NewEvent};
        let shared = empty();
        let events = shared.events.clone();
        events.record(EventKind::Reload, NewEvent { detail: "configuration reloaded".into(), ..NewEvent::default() });
        events.refused("rw", "no_server", || "no primary <b>".into());
        let srv = start(Limits::default(), shared).await;
        let body = |r: &str| r.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        let all: Vec<serde_json::Value> =
            serde_json::from_str(&body(&get(Ipv4Addr::LOCALHOST, srv.addr, "/events").await)).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0]["kind"].as_str(), all[0]["count"].as_u64()), (Some("refused"), Some(1)));
        assert_eq!(all[1]["kind"], "reload");
        let newer: Vec<serde_json::Value> =
            serde_json::from_str(&body(&get(Ipv4Addr::LOCALHOST, srv.addr, "/events?since=1").await)).unwrap();
        assert_eq!(newer.len(), 1);
        let bad = get(Ipv4Addr::LOCALHOST, srv.addr, "/events?since=abc").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

        let page = get(Ipv4Addr::LOCALHOST, srv.addr, "/").await;
        let csp = page.lines().find(|l| l.to_ascii_lowercase().starts_with("content-security-policy:")).unwrap();
        let nonce = csp.split("'nonce-").nth(1).and_then(|n| n.split('\'').next()).unwrap();
        assert!(page.contains(&format!("<script nonce=\"{nonce}\">")), "{page}");
        assert!(page.contains("no primary &lt;b&gt;"));
        let again = get(Ipv4Addr::LOCALHOST, srv.addr, "/").await;
        assert!(!again.contains(nonce), "a nonce is used once");
        let part = body(&get(Ipv4Addr::LOCALHOST, srv.addr, "/?part=main").await);
        assert!(part.starts_with("<section") && !part.contains("<script") && part.contains("recent events"), "{part}");
        srv.stop.cancel();
        srv.task.await.unwrap();
    }

    /// `/status`, `/` and `/metrics` of a proxy whose configuration holds every kind of secret.
    #[tokio::test]
    async fn no_route_shows_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("check.pw");
        std::fs::write(&pw, "checkpw-Ub52\n").unwrap();
        let text = format!(
            "[[cluster]]\nname = \"main\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:9\"]\n\
             username = \"u\"\npassword = \"etcdpw-Zq81\"\ncheck_user = \"c\"\ncheck_password_file = {pw:?}\n\
             [[listener]]\ncluster = \"main\"\nbind = \"127.0.0.1:0\"\n\
             [[vip]]\nname = \"v\"\naddress = \"10.0.0.10/24\"\ninterface = \"eth0\"\nvrid = 51\nversion = 2\n\
             auth_pass = \"vrrp-K7x\"\n"
        );
        let cfg = crate::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap();
        let mut metrics = Metrics::new();
        let vips: Vec<_> = cfg.vips.iter().map(|v| crate::vip::driver::initial_status(v)).collect();
        metrics.register_collector(crate::vip::metrics::collector(Arc::new(std::sync::Mutex::new(vips.clone()))));
        let cluster = cfg.clusters[0].clone();
        let (tx, view) = tokio::sync::watch::channel(Arc::new(crate::topology::ClusterView::default()));
        let health = Arc::new(crate::discovery::ClusterHealth::default());
        // What discovery records when etcd refuses the credentials.
        *health.last_error.lock().unwrap() = Some("etcd at http://127.0.0.1:9: authentication failed".into());
        let listeners = cfg
            .listeners
            .iter()
            .map(|l| (l.clone(), crate::balancer::pool::Pool::new(l, metrics.listener(&l.name))))
            .collect();
        let shared = Shared {
            metrics: Arc::new(metrics),
            events: Events::default(),
            clusters: vec![crate::discovery::ClusterHandle {
                live: tokio::sync::watch::channel(cluster.clone()).0,
                cfg: cluster,
                view,
                health,
                tx,
                registration: tokio::sync::watch::channel(tokio::time::Instant::now()).0,
            }],
            listeners,
            vips,
            config: config_status(),
            maintenance: Default::default(),
            auth: cfg.admin_auth.clone(),
        };
        let srv = start(Limits::default(), shared).await;
        for path in ["/status", "/", "/?part=main", "/events", "/metrics", "/health", "/nothing"] {
            let body = get(Ipv4Addr::LOCALHOST, srv.addr, path).await;
            assert!(body.starts_with("HTTP/1.1 "), "{path}: {body}");
            for secret in ["etcdpw-Zq81", "checkpw-Ub52", "vrrp-K7x"] {
                assert!(!body.contains(secret), "{path} shows {secret}:\n{body}");
            }
        }
        let status = get(Ipv4Addr::LOCALHOST, srv.addr, "/status").await;
        assert!(status.contains("\"scope\": \"s\"") && status.contains("authentication failed"), "{status}");
        srv.stop.cancel();
        srv.task.await.unwrap();
    }
}
