//! The admin HTTP endpoint. Every route is listed here:
//!
//! | route      | what |
//! |------------|------|
//! | `/metrics` | Prometheus text format |
//! | `/status`  | JSON: clusters (leader, members, roles, lag), listeners (servers, connections, queue) |
//! | `/health`  | 200 when every primary listener has a routable primary, else 503 with the reason |
//! | `/`        | the same as `/status`, as an HTML page for humans |

pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use arc_swap::ArcSwap;

use crate::balancer::pool::{Pool, PoolStatus};
use crate::config::ListenerConfig;
use crate::discovery::ClusterHandle;
use crate::config::{Balance, Role};
use crate::topology::{MemberRole, PrimaryStatus};

/// What the admin endpoint reads: the supervisor replaces it whole at every start and reload.
pub struct Shared {
    pub metrics: Arc<metrics::Metrics>,
    pub clusters: Vec<ClusterHandle>,
    pub listeners: Vec<(Arc<ListenerConfig>, Arc<Pool>)>,
    pub vips: Vec<crate::vip::driver::SharedVipStatus>,
    pub config: ConfigStatus,
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
    pub leader: Option<String>,
    pub primary: Option<String>,
    pub primary_status: PrimaryStatus,
    pub switchover_pending: bool,
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
}

#[derive(Debug, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub bind: SocketAddr,
    pub cluster: String,
    pub role: Role,
    pub balance: Balance,
    pub server_maxconn: u32,
    #[serde(flatten)]
    pub pool: PoolStatus,
}

pub fn status(shared: &Shared) -> Status {
    let clusters = shared
        .clusters
        .iter()
        .map(|c| {
            let view = c.view.borrow().clone();
            ClusterStatus {
                name: c.cfg.name.clone(),
                scope: c.cfg.scope.clone(),
                etcd_up: c.health.etcd_up.load(Ordering::Relaxed),
                etcd_error: c.health.last_error.lock().ok().and_then(|e| e.clone()),
                leader: view.state.leader.clone(),
                primary: view.primary().map(|m| m.name.clone()),
                primary_status: view.primary_status(),
                switchover_pending: view.state.failover.as_ref().is_some_and(|f| !f.scheduled),
                members: view
                    .state
                    .members
                    .values()
                    .map(|m| MemberStatus {
                        name: m.name.clone(),
                        addr: m.addr,
                        role: m.role,
                        state: m.state.clone(),
                        timeline: m.timeline,
                        lag_bytes: view.lag(m),
                        noloadbalance: m.noloadbalance,
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
            pool: pool.status(),
        })
        .collect();
    let vips = shared.vips.iter().filter_map(|v| v.lock().ok().map(|s| s.clone())).collect();
    Status { version: env!("CARGO_PKG_VERSION"), config: shared.config.clone(), clusters, listeners, vips }
}

/// Serves the admin routes until `stop` is cancelled.
pub async fn serve(listener: TcpListener, shared: Arc<ArcSwap<Shared>>, stop: CancellationToken) {
    info!(addr = ?listener.local_addr().ok(), "admin endpoint listening");
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared.load(), req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), svc).await {
                debug!(error = %e, "admin connection");
            }
        });
    }
}

fn reply(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    r
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", page(&status(shared))),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "routes: / /status /health /metrics\n"),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn page(s: &Status) -> String {
    use std::fmt::Write;
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2><title>pgfront</title>\
         <style>body{font:14px sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}\
         td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.ok{color:#070}.bad{color:#b00}</style></head><body>",
    );
    let _ = write!(h, "<h1>pgfront {}</h1>", s.version);
    let _ = write!(h, "<p>configuration {} &middot; revision {}", esc(&s.config.path), s.config.revision);
    if let Some(e) = &s.config.last_error {
        let _ = write!(h, " &middot; <b class=bad>last reload refused: {}</b>", esc(e));
    }
    h.push_str("</p>");
    for c in &s.clusters {
        let cls = if c.primary.is_some() { "ok" } else { "bad" };
        let _ = write!(
            h,
            "<h2>cluster {} <small>(scope {})</small></h2><p>etcd: {} &middot; primary: <b class={cls}>{}</b> ({:?})</p>\
             <table><tr><th>member</th><th>address</th><th>role</th><th>state</th><th>timeline</th><th>lag</th></tr>",
            esc(&c.name),
            esc(&c.scope),
            if c.etcd_up { "up" } else { "<b class=bad>unreachable</b>" },
            esc(c.primary.as_deref().unwrap_or("none")),
            c.primary_status,
        );
        for m in &c.members {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&m.name),
                m.addr.map(|a| a.to_string()).unwrap_or_default(),
                m.role,
                esc(&m.state),
                m.timeline.map(|t| t.to_string()).unwrap_or_default(),
                m.lag_bytes.map(|l| l.to_string()).unwrap_or_default(),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>listeners</h2><table><tr><th>listener</th><th>bind</th><th>role</th><th>queued</th><th>servers (active/maxconn)</th></tr>");
    for l in &s.listeners {
        let servers: Vec<String> = l
            .pool
            .servers
            .iter()
            .map(|sv| format!("{} {} {}/{} {:?}", esc(&sv.member), sv.addr, sv.active, l.server_maxconn, sv.state))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.name),
            l.bind,
            l.role,
            l.pool.queued,
            servers.join("<br>")
        );
    }
    h.push_str("</table>");
    if !s.vips.is_empty() {
        h.push_str("<h2>VIPs</h2><table><tr><th>vip</th><th>address</th><th>interface</th><th>vrid</th><th>state</th><th>priority</th><th>master seen</th><th>transitions</th><th>GARPs</th></tr>");
        for v in &s.vips {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&v.name), esc(&v.address), esc(&v.interface), v.vrid, v.state, v.priority,
                esc(v.master_seen.as_deref().unwrap_or("-")), v.transitions, v.garps_sent
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>");
    h
}
