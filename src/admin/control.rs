//! The control routes of the admin endpoint: drain and resume a member.
//!
//! `POST /members/<cluster>/<member>/drain[?kill=true]`, `POST /members/<cluster>/<member>/resume`,
//! and the same without `<cluster>/` when the member's name is in one cluster only (otherwise
//! 409, asking for the cluster). What a drain does is `balancer::maintenance`'s: no new
//! connection to the member on any listener of its cluster, its open sessions kept (or closed
//! with `kill`), until a resume; reloads keep it, upgrades hand it over.
//!
//! Who may: a loopback peer, or any peer sending `Authorization: Bearer <token>` with the
//! `[admin] token` of the configuration (compared in constant time). With `require_token = true`
//! loopback peers need the token too. Anything else gets 403 and a one-line reason; another
//! method than POST gets 405 with `Allow: POST`. The request's body is never read.
//!
//! Answers: 200 with a JSON object (`cluster`, `member`, `action`, `maintenance`, `kill`,
//! `changed`, `message`); errors are one line of text. Every change is logged on one line, with
//! the peer that asked; every request is counted in `pgfront_admin_control_requests_total`.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use super::{reply, Shared};
use crate::balancer::maintenance::Change;
use crate::config::AdminAuth;

/// What a control request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ask<'a> {
    cluster: Option<&'a str>,
    member: &'a str,
    action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Drain { kill: bool },
    Resume,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Drain { .. } => "drain",
            Action::Resume => "resume",
        }
    }
}

/// Why a request is not served; each one answers with its status and one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum ControlError {
    #[error("use POST for {0} (e.g. curl -X POST)")]
    Method(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("refused: {0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
}

impl ControlError {
    fn status(&self) -> StatusCode {
        match self {
            ControlError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControlError::Forbidden(_) => StatusCode::FORBIDDEN,
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Ambiguous(_) => StatusCode::CONFLICT,
        }
    }

    /// The `result` label of `pgfront_admin_control_requests_total`.
    fn result(&self) -> &'static str {
        match self {
            ControlError::Forbidden(_) => "refused",
            _ => "invalid",
        }
    }
}

const USAGE: &str = "POST /members/[<cluster>/]<member>/drain[?kill=true] or POST /members/[<cluster>/]<member>/resume";

/// Pure: the route's path and query.
fn parse<'a>(path: &'a str, query: Option<&'a str>) -> Result<Ask<'a>, ControlError> {
    let bad = || ControlError::BadRequest(format!("unknown route {path}: {USAGE}"));
    let rest = path.strip_prefix("/members/").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (cluster, member, action) = match parts.as_slice() {
        [member, action] => (None, *member, *action),
        [cluster, member, action] => (Some(*cluster), *member, *action),
        _ => return Err(bad()),
    };
    if member.is_empty() || cluster.is_some_and(str::is_empty) {
        return Err(bad());
    }
    let mut kill = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        match (k, v) {
            ("kill", "true" | "1" | "yes") => kill = Some(true),
            ("kill", "false" | "0" | "no") => kill = Some(false),
            _ => return Err(ControlError::BadRequest(format!("unknown parameter {pair:?}: only kill=true"))),
        }
    }
    let action = match action {
        "drain" => Action::Drain { kill: kill.unwrap_or(false) },
        "resume" if kill.is_none() => Action::Resume,
        "resume" => return Err(ControlError::BadRequest("kill applies to drain only".into())),
        _ => return Err(bad()),
    };
    Ok(Ask { cluster, member, action })
}

/// Pure: whether a peer may use the control routes. `header`: its `Authorization` value.
fn authorize(auth: &AdminAuth, peer: IpAddr, header: Option<&[u8]>) -> Result<(), ControlError> {
    let loopback = peer.to_canonical().is_loopback();
    if loopback && !auth.require_token {
        return Ok(());
    }
    let Some(token) = &auth.token else {
        return Err(ControlError::Forbidden(
            "drain and resume are allowed from loopback only: no [admin] token is configured",
        ));
    };
    let Some(header) = header else {
        return Err(ControlError::Forbidden(if loopback {
            "require_token is set: send Authorization: Bearer <the [admin] token>"
        } else {
            "not a loopback address: send Authorization: Bearer <the [admin] token>"
        }));
    };
    let given = header.strip_prefix(b"Bearer ").unwrap_or(b"");
    // Constant time in the token's content (its length may show; it is at least 16 characters).
    if bool::from(given.ct_eq(token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ControlError::Forbidden("wrong admin token"))
    }
}

/// Pure: the one cluster that `ask` names among `clusters` (name, members it knows).
fn resolve<'a>(ask: &Ask<'_>, clusters: &'a [(String, Vec<String>)]) -> Result<&'a str, ControlError> {
    let has = |members: &[String]| members.iter().any(|m| m == ask.member);
    match ask.cluster {
        Some(name) => {
            let Some((c, members)) = clusters.iter().find(|(c, _)| c == name) else {
                let names: Vec<&str> = clusters.iter().map(|(c, _)| c.as_str()).collect();
                return Err(ControlError::NotFound(format!(
                    "unknown cluster {name:?} (clusters: {})",
                    names.join(", ")
                )));
            };
            if has(members) {
                Ok(c)
            } else {
                Err(ControlError::NotFound(format!(
                    "unknown member {:?} in cluster {c} (members: {})",
                    ask.member,
                    members.join(", ")
                )))
            }
        }
        None => {
            let found: Vec<&str> = clusters.iter().filter(|(_, m)| has(m)).map(|(c, _)| c.as_str()).collect();
            match found.as_slice() {
                [one] => Ok(one),
                [] => {
                    let known: Vec<String> = clusters.iter().map(|(c, m)| format!("{c}: {}", m.join(", "))).collect();
                    Err(ControlError::NotFound(format!(
                        "unknown member {:?} (members of each cluster: {})",
                        ask.member,
                        known.join("; ")
                    )))
                }
                many => Err(ControlError::Ambiguous(format!(
                    "member {:?} is in clusters {}: name the cluster (pgfront {} {} --cluster NAME)",
                    ask.member,
                    many.join(", "),
                    ask.action.name(),
                    ask.member
                ))),
            }
        }
    }
}

/// Serves a `/members/…` request.
pub(super) fn handle<B>(shared: &Shared, peer: SocketAddr, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let action = if path.ends_with("/resume") { "resume" } else { "drain" };
    match serve(shared, peer, req) {
        Ok(body) => {
            shared.metrics.admin_control(action, "ok");
            reply(StatusCode::OK, "application/json", body)
        }
        Err(e) => {
            shared.metrics.admin_control(action, e.result());
            if let ControlError::Forbidden(why) = &e {
                warn!(%peer, path, "admin: {action} refused: {why}");
            }
            let mut r = reply(e.status(), "text/plain; charset=utf-8", format!("{e}\n"));
            if matches!(e, ControlError::Method(_)) {
                r.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
            }
            r
        }
    }
}

fn serve<B>(shared: &Shared, peer: SocketAddr, req: &Request<B>) -> Result<Vec<u8>, ControlError> {
    let path = req.uri().path();
    let ask = parse(path, req.uri().query())?;
    if req.method() != Method::POST {
        return Err(ControlError::Method(path.to_owned()));
    }
    if req.headers().contains_key(ORIGIN) && !req.headers().contains_key(AUTHORIZATION) {
        // A browser sends Origin with every cross-site POST: a page open on this host (or one
        // reached by DNS rebinding) must not drain members through the loopback exemption.
        return Err(ControlError::Forbidden(
            "a request from a web page (Origin header) needs Authorization: Bearer <the [admin] token>",
        ));
    }
    authorize(&shared.auth, peer.ip(), req.headers().get(AUTHORIZATION).map(|h| h.as_bytes()))?;
    // Members etcd shows, and those already in maintenance (a stopped member can be resumed).
    let clusters: Vec<(String, Vec<String>)> = shared
        .clusters
        .iter()
        .map(|c| {
            let mut members: Vec<String> = c.view.borrow().state.members.keys().cloned().collect();
            for m in shared.maintenance.cluster(&c.cfg.name).into_keys() {
                if !members.contains(&m) {
                    members.push(m);
                }
            }
            (c.cfg.name.clone(), members)
        })
        .collect();
    let cluster = resolve(&ask, &clusters)?;
    let member = ask.member;
    let change = match ask.action {
        Action::Drain { kill } => shared.maintenance.drain(cluster, member, kill, unix_now()),
        Action::Resume => shared.maintenance.resume(cluster, member),
    };
    let entry = shared.maintenance.get(cluster, member);
    let kill = entry.is_some_and(|e| e.kill);
    let sessions = if kill { "its open sessions are closed" } else { "its open sessions are kept" };
    let message = match change {
        Change::Drained => {
            format!("{member} (cluster {cluster}) is in maintenance: no new connections on any listener; {sessions}")
        }
        Change::Killed => format!("{member} (cluster {cluster}) was in maintenance; its open sessions are closed now"),
        Change::AlreadyDrained => format!("{member} (cluster {cluster}) was already in maintenance; {sessions}"),
        Change::Resumed => {
            format!("{member} (cluster {cluster}) is out of maintenance: it takes new connections as its role allows")
        }
        Change::NotDrained => format!("{member} (cluster {cluster}) was not in maintenance: nothing changed"),
    };
    if change.changed() {
        info!(%cluster, %member, kill, by = %peer, "{message}");
        shared.events.record(
            crate::events::EventKind::Admin,
            crate::events::NewEvent {
                cluster: Some(cluster.to_owned()),
                member: Some(member.to_owned()),
                detail: format!("{message} (by {peer})"),
                ..Default::default()
            },
        );
    }
    let body = serde_json::json!({
        "cluster": cluster,
        "member": member,
        "action": ask.action.name(),
        "maintenance": entry.is_some(),
        "kill": kill,
        "changed": change.changed(),
        "message": message,
    });
    Ok(serde_json::to_vec_pretty(&body).unwrap_or_default())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn routes_parse() {
        let a = parse("/members/main/pg2/drain", Some("kill=true")).unwrap();
        assert_eq!(a, Ask { cluster: Some("main"), member: "pg2", action: Action::Drain { kill: true } });
        let a = parse("/members/pg2/resume", None).unwrap();
        assert_eq!(a, Ask { cluster: None, member: "pg2", action: Action::Resume });
        assert_eq!(parse("/members/pg2/drain", Some("kill")).unwrap().action, Action::Drain { kill: true });
        for (path, q) in [
            ("/members/pg2", None),
            ("/members//pg2/drain", None),
            ("/members/a/b/c/drain", None),
            ("/members/pg2/stop", None),
            ("/members/pg2/drain", Some("force=1")),
            ("/members/pg2/resume", Some("kill=true")),
        ] {
            assert!(matches!(parse(path, q), Err(ControlError::BadRequest(_))), "{path} {q:?}");
        }
    }

    #[test]
    fn loopback_or_the_token() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let far: IpAddr = "192.0.2.7".parse().unwrap();
        let open = AdminAuth::default();
        assert_eq!(authorize(&open, lo, None), Ok(()));
        assert_eq!(authorize(&open, mapped, None), Ok(()));
        let e = authorize(&open, far, Some(b"Bearer x")).unwrap_err();
        assert!(e.to_string().contains("no [admin] token is configured"), "{e}");
        let token = AdminAuth { token: Some(Secret::new("0123456789abcdef")), require_token: false };
        assert_eq!(authorize(&token, far, Some(b"Bearer 0123456789abcdef")), Ok(()));
        assert_eq!(authorize(&token, lo, None), Ok(()));
        assert_eq!(
            authorize(&token, far, Some(b"Bearer 0123456789abcdeX")),
            Err(ControlError::Forbidden("wrong admin token"))
        );
        assert_eq!(
            authorize(&token, far, Some(b"0123456789abcdef")),
            Err(ControlError::Forbidden("wrong admin token"))
        );
        assert!(authorize(&token, far, None).unwrap_err().to_string().contains("not a loopback address"));
        let strict = AdminAuth { require_token: true, ..token };
        assert!(authorize(&strict, lo, None).unwrap_err().to_string().contains("require_token"));
        assert_eq!(authorize(&strict, lo, Some(b"Bearer 0123456789abcdef")), Ok(()));
    }

    #[test]
    fn members_resolve_to_one_cluster_or_say_why_not() {
        let clusters = vec![
            ("main".to_owned(), vec!["pg1".to_owned(), "pg2".to_owned()]),
            ("other".to_owned(), vec!["pg2".to_owned(), "pg9".to_owned()]),
        ];
        let ask = |cluster, member| Ask { cluster, member, action: Action::Drain { kill: false } };
        assert_eq!(resolve(&ask(None, "pg1"), &clusters), Ok("main"));
        assert_eq!(resolve(&ask(Some("other"), "pg2"), &clusters), Ok("other"));
        let e = resolve(&ask(None, "pg2"), &clusters).unwrap_err();
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert!(e.to_string().contains("main, other") && e.to_string().contains("--cluster"), "{e}");
        let e = resolve(&ask(None, "pg7"), &clusters).unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert!(e.to_string().contains("unknown member \"pg7\""), "{e}");
        let e = resolve(&ask(Some("main"), "pg9"), &clusters).unwrap_err();
        assert!(e.to_string().contains("in cluster main (members: pg1, pg2)"), "{e}");
        let e = resolve(&ask(Some("nope"), "pg1"), &clusters).unwrap_err();
        assert!(e.to_string().contains("unknown cluster"), "{e}");
    }
}
