//! The agent's HTTP endpoint: Patroni-compatible health checks, so an HAProxy (or any checker)
//! configured for Patroni's REST API keeps working against the agent, and the local control
//! routes of `pgfront agent drain` / `resume`.
//!
//! | route | GET | HEAD / OPTIONS |
//! |-------|-----|----------------|
//! | `/`, `/primary`, `/master`, `/leader`, `/read-write` | 200 on a running primary not in maintenance | same code, no body |
//! | `/replica` (`?lag=16MB`) | 200 on a running replica, not in maintenance, within lag of the primary | same |
//! | `/read-only` | 200 if `/primary` or `/replica` would be | same |
//! | `/health` | 200 while PostgreSQL runs | same |
//! | `/async`, `/read-only-sync` | as Patroni with no synchronous standby | same |
//! | `/liveness` | 200 while the probe loop runs (GET only, no body) | 503, as Patroni 3.0 |
//! | `/readiness` | 200 on a running primary, or a running node while etcd answers (GET only) | 503, as Patroni 3.0 |
//! | `/patroni` | 200, the status body | 503, as Patroni 3.0 |
//! | `/agent` | 200, this node's published key and etcd state (JSON) | — |
//! | `/metrics` | 200, Prometheus text: `pgfront_agent_*`, build and process metrics (Patroni's `/metrics` has `patroni_*`) | — |
//! | `POST /drain`, `POST /resume` | from loopback only: set or clear maintenance | — |
//!
//! The codes follow Patroni 3.0's `api.py` (`do_GET`), including its matching of paths by
//! substring (`/replica-foo` is `/replica`), its `?lag=` units (B, kB, MB, GB, TB, base 1024),
//! and its quirk that `HEAD`/`OPTIONS` on `/liveness`, `/readiness` and `/patroni` fall through
//! to the generic handler, which knows none of them (503). Differences, all documented in the
//! README: maintenance (`drain`) makes `/primary` 503 too (Patroni's tags never touch the
//! primary checks; a drained node must get no new connection from any checker), and the agent
//! has no tags (`?tag_x=y` turns a 200 into 503, as on a Patroni member without tags).
//!
//! `answer` is a pure function of the request and a [`View`]; the server around it has the
//! admin endpoint's limits (connection cap taken before `accept`, header timeout, header size,
//! connection lifetime).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::probe::{NodeState, Probe};
use super::publish::{lag, NodeDoc};
use super::Shared;
use crate::metrics::AgentNode;

pub const MAX_CONNECTIONS: usize = 64;
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
pub const MAX_HEADER_SIZE: usize = 8 << 10;
pub const MAX_HEADERS: usize = 64;

/// What the health answers are computed from.
#[derive(Debug, Clone)]
pub(crate) struct View<'a> {
    pub probe: Option<&'a Probe>,
    pub maintenance: bool,
    /// The primary's LSN from etcd (Patroni: the leader's optime in the DCS).
    pub primary_lsn: Option<u64>,
    /// etcd answered within the TTL.
    pub etcd_up: bool,
    /// Time since the last probe ended.
    pub probe_age: Option<Duration>,
    pub ttl: Duration,
    pub scope: &'a str,
    pub name: &'a str,
    pub dcs_last_seen: Option<u64>,
}

/// A status code and, for GET on a status route, the JSON body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Answer {
    pub status: u16,
    pub body: Option<serde_json::Value>,
}

impl View<'_> {
    fn running(&self) -> bool {
        self.probe.is_some_and(|p| p.state == NodeState::Running)
    }
    fn is_primary(&self) -> bool {
        self.probe.is_some_and(|p| p.state == NodeState::Running && p.in_recovery == Some(false))
    }
    fn is_replica(&self) -> bool {
        self.probe.is_some_and(|p| p.state == NodeState::Running && p.in_recovery == Some(true))
    }

    /// Patroni's status body (`get_postgresql_status` + `_write_status_response`).
    fn status_body(&self) -> serde_json::Value {
        let Some(p) = self.probe.filter(|p| p.state == NodeState::Running) else {
            let state = match self.probe.map(|p| p.state) {
                Some(NodeState::Starting) => "starting",
                Some(NodeState::Stopped) => "stopped",
                _ => "unknown",
            };
            return json!({
                "state": state,
                "role": "unknown",
                "cluster_unlocked": true,
                "dcs_last_seen": self.dcs_last_seen,
                "patroni": {"version": env!("CARGO_PKG_VERSION"), "scope": self.scope},
                "pgfront": {"agent": self.name, "maintenance": self.maintenance,
                            "error": self.probe.and_then(|p| p.error.clone())},
            });
        };
        let replica = p.in_recovery == Some(true);
        let xlog = if replica {
            json!({
                "received_location": p.receive_lsn.or(p.replay_lsn),
                "replayed_location": p.replay_lsn,
                "replayed_timestamp": p.replayed_timestamp,
                "paused": p.replay_paused.unwrap_or(false),
            })
        } else {
            json!({"location": p.current_lsn})
        };
        let mut body = json!({
            "state": "running",
            "postmaster_start_time": p.postmaster_start_time,
            // Patroni 3.0 says "master" here (later versions "primary").
            "role": if replica { "replica" } else { "master" },
            "server_version": p.server_version,
            "xlog": xlog,
            "timeline": p.timeline,
            "dcs_last_seen": self.dcs_last_seen,
            "database_system_identifier": p.system_identifier,
            "patroni": {"version": env!("CARGO_PKG_VERSION"), "scope": self.scope},
            "pgfront": {"agent": self.name, "maintenance": self.maintenance, "probe_ms": p.probe_ms},
        });
        if let (Some(o), true) = (body.as_object_mut(), self.primary_lsn.is_none() && !self.etcd_up) {
            o.insert("cluster_unlocked".into(), json!(true));
        }
        body
    }
}

/// `?lag=` as Patroni's `parse_int(value, 'B')`: an integer with an optional unit (B, kB, MB,
/// GB, TB; base 1024); anything else means no limit.
pub(crate) fn parse_lag(v: &str) -> u64 {
    let v = v.trim();
    let digits = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let Ok(n) = v[..digits].parse::<u64>() else { return u64::MAX };
    let mult: u64 = match v[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return u64::MAX,
    };
    n.saturating_mul(mult)
}

/// The first value of each query parameter (`parse_qs` keeps lists; Patroni reads `[0]`).
fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// The answer to `method path?query`, as Patroni 3.0 would give it for a member in the state of
/// `v` (see the module doc).
pub(crate) fn answer(method: &Method, path: &str, query: &str, v: &View<'_>) -> Answer {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    let get = method == Method::GET;
    if get && first == "liveness" {
        let threshold = if v.is_primary() { v.ttl } else { v.ttl * 2 };
        let alive = v.probe_age.is_some_and(|a| a < threshold);
        return Answer { status: if alive { 200 } else { 503 }, body: None };
    }
    if get && first == "readiness" {
        let ready = v.is_primary() || (v.running() && v.etcd_up);
        return Answer { status: if ready { 200 } else { 503 }, body: None };
    }
    if get && first == "patroni" {
        return Answer { status: 200, body: Some(v.status_body()) };
    }
    if !(get || method == Method::HEAD || method == Method::OPTIONS) {
        return Answer { status: 501, body: None };
    }
    let path = if path == "/" { "/primary" } else { path };
    let max_lag = query_param(query, "lag").map_or(u64::MAX, parse_lag);
    let replayed = v.probe.and_then(|p| p.replay_lsn).unwrap_or(0);
    let lagging = v.primary_lsn.is_some_and(|l| l > 0 && l > replayed.saturating_add(max_lag));
    let code = |ok: bool| if ok { 200 } else { 503 };
    let replica = code(!v.maintenance && !lagging && v.is_replica());
    let primary = code(!v.maintenance && v.is_primary());
    let mut ignore_tags = false;
    let status = if path.contains("standby_leader") || path.contains("standby-leader") {
        ignore_tags = true;
        503
    } else if path.contains("leader")
        || path.contains("master")
        || path.contains("primary")
        || path.contains("read-write")
    {
        ignore_tags = true;
        primary
    } else if path.contains("replica") {
        replica
    } else if path.contains("read-only") && !path.contains("sync") {
        if primary == 200 {
            200
        } else {
            replica
        }
    } else if path.contains("health") {
        code(v.running())
    } else if v.etcd_up {
        match path {
            "/async" | "/asynchronous" => replica,
            "/read-only-sync" | "/read-only-synchronous" if primary == 200 => 200,
            _ => 503,
        }
    } else {
        503
    };
    // No tags on the agent: any `tag_*` parameter turns a 200 into 503, as on Patroni.
    let status =
        if !ignore_tags && status == 200 && query.split('&').any(|kv| kv.starts_with("tag_")) { 503 } else { status };
    Answer { status, body: get.then(|| v.status_body()) }
}

fn reply(status: u16, ctype: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

/// Serves until `stop`, within the module doc's limits.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    info!(addr = ?listener.local_addr().ok(), "agent health endpoint listening");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.cancelled() => break,
        };
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "health endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let shared = shared.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            connection(sock, peer, shared, stop).await;
            drop(permit);
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
}

async fn connection(sock: TcpStream, peer: SocketAddr, shared: Arc<Shared>, stop: CancellationToken) {
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared, peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEADER_SIZE)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(sock), svc);
    tokio::pin!(conn);
    let done = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => None,
        _ = stop.cancelled() => None,
    };
    match done {
        Some(Ok(())) => {}
        Some(Err(e)) => debug!(error = %e, %peer, "health connection"),
        None => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

async fn route(shared: &Shared, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    if req.method() == Method::POST && (path == "/drain" || path == "/resume") {
        if !peer.ip().to_canonical().is_loopback() {
            return reply(403, "text/plain", Bytes::from_static(b"drain/resume: from this host only\n"));
        }
        if req.headers().contains_key(hyper::header::ORIGIN) {
            // A browser sends Origin with every cross-site POST: a web page open on this host
            // (or reached by DNS rebinding) must not drain the node. `pgfront agent drain` sends none.
            return reply(
                403,
                "text/plain",
                Bytes::from_static(b"drain/resume: not from a web page (Origin header)\n"),
            );
        }
        return control(shared, path == "/drain").await;
    }
    let probe = shared.probe.borrow().clone();
    let etcd = shared.etcd.borrow().clone();
    let maintenance = *shared.maintenance.borrow();
    if req.method() == Method::GET && path == "/agent" {
        let doc = probe.as_ref().map(|p| NodeDoc::new(&shared.cfg, p, maintenance, etcd.primary_lsn));
        let body = json!({
            "key": shared.cfg.node_key(),
            "node": doc,
            "etcd_up": etcd.up,
            "published_maintenance": etcd.published_maintenance,
        });
        return reply(200, "application/json", Bytes::from(body.to_string()));
    }
    let now = Instant::now();
    let etcd_up = etcd.last_ok.is_some_and(|t| now.saturating_duration_since(t) < shared.cfg.ttl);
    if req.method() == Method::GET && path == "/metrics" {
        shared.metrics.set_node(&AgentNode {
            state: probe.as_ref().map(|p| p.state.as_str()),
            in_recovery: probe.as_ref().and_then(|p| p.in_recovery),
            timeline: probe.as_ref().and_then(|p| p.timeline),
            lag_bytes: probe.as_ref().and_then(|p| lag(p, etcd.primary_lsn)),
            maintenance,
            etcd_up,
        });
        return reply(200, "text/plain; version=0.0.4; charset=utf-8", Bytes::from(shared.metrics.encode()));
    }
    let view = View {
        probe: probe.as_deref(),
        maintenance,
        primary_lsn: etcd.primary_lsn,
        etcd_up,
        probe_age: shared.probe_done.borrow().map(|t| now.saturating_duration_since(t)),
        ttl: shared.cfg.ttl,
        scope: &shared.cfg.etcd.scope,
        name: &shared.cfg.name,
        dcs_last_seen: etcd.last_ok.map(|t| {
            let ago = now.saturating_duration_since(t).as_secs();
            (super::probe::unix_ms() / 1000).saturating_sub(ago)
        }),
    };
    let a = answer(req.method(), &path, &query, &view);
    match a.body {
        Some(b) => reply(a.status, "application/json", Bytes::from(b.to_string())),
        None => reply(a.status, "text/plain", Bytes::new()),
    }
}

/// `POST /drain` / `POST /resume`: persist the flag first (a drained node stays drained across
/// restarts), then publish; the answer says whether etcd has it yet.
async fn control(shared: &Shared, on: bool) -> Response<Full<Bytes>> {
    let path = shared.cfg.state_file.clone();
    let saved = tokio::task::spawn_blocking(move || super::save_state(&path, on)).await;
    match saved {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let body = json!({"error": e.to_string()});
            return reply(500, "application/json", Bytes::from(body.to_string()));
        }
        Err(e) => return reply(500, "text/plain", Bytes::from(e.to_string())),
    }
    if shared.maintenance.send_replace(on) != on {
        info!(maintenance = on, "{}", if on { "drained: proxies send no new connection here" } else { "resumed" });
    }
    let mut rx = shared.etcd.subscribe();
    let wait = shared.cfg.etcd.etcd_timeout + Duration::from_secs(1);
    let published =
        tokio::time::timeout(wait, rx.wait_for(|e| e.published_maintenance == Some(on))).await.is_ok_and(|r| r.is_ok());
    let body = json!({
        "maintenance": on,
        "published": published,
        "key": shared.cfg.node_key(),
        "state_file": shared.cfg.state_file,
    });
    reply(200, "application/json", Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(in_recovery: Option<bool>, replay: Option<u64>) -> Probe {
        let state = if in_recovery.is_some() { NodeState::Running } else { NodeState::Stopped };
        let mut p = Probe::failed(state, String::new(), Duration::ZERO);
        p.in_recovery = in_recovery;
        p.replay_lsn = replay;
        p.current_lsn = Some(1000).filter(|_| in_recovery == Some(false));
        p
    }

    fn view(p: Option<&Probe>) -> View<'_> {
        View {
            probe: p,
            maintenance: false,
            primary_lsn: Some(1000),
            etcd_up: true,
            probe_age: Some(Duration::from_millis(300)),
            ttl: Duration::from_secs(10),
            scope: "main",
            name: "pg1",
            dcs_last_seen: Some(1),
        }
    }

    fn codes(v: &View<'_>, target: &str) -> [u16; 3] {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        [Method::GET, Method::HEAD, Method::OPTIONS].map(|m| answer(&m, path, query, v).status)
    }

    #[test]
    fn primary_answers_as_patroni() {
        let p = probe(Some(false), None);
        let v = view(Some(&p));
        for path in ["/", "/primary", "/master", "/leader", "/read-write", "/read-only", "/health"] {
            assert_eq!(codes(&v, path), [200, 200, 200], "{path}");
        }
        for path in ["/replica", "/replica?lag=1MB", "/standby-leader", "/sync", "/async", "/nothing"] {
            assert_eq!(codes(&v, path), [503, 503, 503], "{path}");
        }
        assert_eq!(codes(&v, "/liveness"), [200, 503, 503]);
        assert_eq!(codes(&v, "/readiness"), [200, 503, 503]);
        assert_eq!(codes(&v, "/patroni"), [200, 503, 503]);
        assert_eq!(codes(&v, "/read-only-sync"), [200, 200, 200]);
        // Tags are ignored on the primary routes, and no tag exists elsewhere.
        assert_eq!(codes(&v, "/primary?tag_x=1"), [200, 200, 200]);
        assert_eq!(codes(&v, "/health?tag_x=1"), [503, 503, 503]);
        let body = answer(&Method::GET, "/primary", "", &v).body.unwrap();
        assert_eq!(body["role"], "master");
        assert_eq!(body["state"], "running");
        assert_eq!(body["xlog"]["location"], 1000);
        assert!(answer(&Method::HEAD, "/primary", "", &v).body.is_none());
    }

    #[test]
    fn replica_answers_as_patroni() {
        let p = probe(Some(true), Some(900));
        let v = view(Some(&p));
        for path in ["/replica", "/read-only", "/health", "/async", "/replica?lag=100", "/replica?lag=1kB"] {
            assert_eq!(codes(&v, path), [200, 200, 200], "{path}");
        }
        for path in ["/", "/primary", "/master", "/leader", "/replica?lag=99", "/sync", "/read-only-sync"] {
            assert_eq!(codes(&v, path), [503, 503, 503], "{path}");
        }
        assert_eq!(codes(&v, "/readiness"), [200, 503, 503]);
        assert_eq!(codes(&v, "/replica?lag=junk"), [200, 200, 200]);
        assert_eq!(codes(&v, "/replica?tag_nofailover=true"), [503, 503, 503]);
        // Without etcd: readiness fails, the async check too; the rest stands.
        let mut off = view(Some(&p));
        off.etcd_up = false;
        assert_eq!(codes(&off, "/readiness"), [503, 503, 503]);
        assert_eq!(codes(&off, "/async"), [503, 503, 503]);
        assert_eq!(codes(&off, "/replica"), [200, 200, 200]);
        let body = answer(&Method::GET, "/replica", "", &v).body.unwrap();
        assert_eq!(body["role"], "replica");
        assert_eq!(body["xlog"]["replayed_location"], 900);
    }

    #[test]
    fn maintenance_and_down_nodes() {
        let p = probe(Some(true), Some(1000));
        let mut v = view(Some(&p));
        v.maintenance = true;
        assert_eq!(codes(&v, "/replica"), [503, 503, 503]);
        assert_eq!(codes(&v, "/read-only"), [503, 503, 503]);
        assert_eq!(codes(&v, "/health"), [200, 200, 200]);
        let q = probe(Some(false), None);
        let mut v = view(Some(&q));
        v.maintenance = true;
        assert_eq!(codes(&v, "/primary"), [503, 503, 503]);

        let down = probe(None, None);
        let v = view(Some(&down));
        for path in ["/", "/replica", "/read-only", "/health", "/readiness"] {
            assert_eq!(codes(&v, path)[0], 503, "{path}");
        }
        assert_eq!(answer(&Method::GET, "/health", "", &v).body.unwrap()["state"], "stopped");
        let mut stale = view(Some(&down));
        stale.probe_age = Some(Duration::from_secs(21));
        assert_eq!(codes(&stale, "/liveness")[0], 503);
        assert_eq!(answer(&Method::DELETE, "/primary", "", &v).status, 501);
    }

    #[test]
    fn lag_units() {
        assert_eq!(parse_lag("1024"), 1024);
        assert_eq!(parse_lag(" 16MB "), 16 << 20);
        assert_eq!(parse_lag("1kB"), 1024);
        assert_eq!(parse_lag("1 GB"), 1 << 30);
        assert_eq!(parse_lag("1mb"), u64::MAX);
        assert_eq!(parse_lag(""), u64::MAX);
    }
}
