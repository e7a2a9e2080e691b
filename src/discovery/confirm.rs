//! Confirms that a new leader runs as a primary before Patroni says so in its member key.
//!
//! Patroni 3.0 promotes asynchronously and rewrites the member key only on its next HA cycle
//! (up to `loop_wait` later), while its REST API reports `master` only after it has polled
//! pg_controldata (about once a second). Clients held during a switchover would wait for
//! that. So while the leader key names a member not yet seen as primary, this task asks the
//! member directly every `confirm_interval`: `SELECT pg_is_in_recovery()` when check
//! credentials are configured, and Patroni's `GET /patroni` (role and state). The first
//! positive answer for *this* leader makes it routable; the task is aborted when the leader
//! changes.
//!
//! The same two checks watch the routed primary while etcd is unreachable (`watch_primary`):
//! over one persistent connection, so that a PostgreSQL restarted by Patroni to demote it is
//! noticed the moment the connection drops, before a client can reach the restarted node.
//!
//! Not `GET /primary`: Patroni 3.0 answers it with 200 as soon as the member holds the leader
//! lock, before its promotion has finished (measured: writes routed on that signal fail with
//! "cannot execute INSERT in a read-only transaction").

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use crate::config::{ClusterConfig, PgCheck};
use crate::http;
use crate::topology::{CheckResult, Member};

const CHECK_TIMEOUT: Duration = Duration::from_millis(800);

pub async fn run(member: Member, cfg: Arc<ClusterConfig>, tx: mpsc::Sender<String>) {
    let client = http::client();
    let rest = member.api_url.as_deref().and_then(status_url);
    loop {
        let by_pg = async {
            match (&cfg.check, member.addr) {
                (Some(check), Some(addr)) => Some(pg_is_primary(check, addr).await),
                _ => None,
            }
        };
        let by_rest = async {
            let url = rest.as_ref()?;
            Some(match http::get(&client, url, None, CHECK_TIMEOUT).await {
                Ok(r) if r.status == 200 => runs_as_primary(&r.body),
                _ => false,
            })
        };
        if first_yes(by_pg, by_rest, CHECK_TIMEOUT).await {
            let _ = tx.send(member.name.clone()).await;
            return;
        }
        tokio::time::sleep(cfg.confirm_interval).await;
    }
}

/// Whether `watch_primary` has a way to check `member`.
pub(crate) fn can_watch(member: &Member, cfg: &ClusterConfig) -> bool {
    (cfg.check.is_some() && member.addr.is_some()) || member.api_url.as_deref().and_then(status_url).is_some()
}

/// Watches what `member` says of itself, every `confirm_interval`, until aborted; sends
/// `(member, result)` on every change. With `check_user`: `SELECT pg_is_in_recovery()` over
/// one persistent connection, whose loss is reported at once; without: Patroni's
/// `GET /patroni`.
pub(crate) async fn watch_primary(member: Member, cfg: Arc<ClusterConfig>, tx: mpsc::Sender<(String, CheckResult)>) {
    let mut rep = Reporter { member: member.name.clone(), tx, last: None };
    match (&cfg.check, member.addr, member.api_url.as_deref().and_then(status_url)) {
        (Some(check), Some(addr), _) => watch_pg(check, addr, cfg.confirm_interval, &mut rep).await,
        (_, _, Some(url)) => watch_rest(&url, cfg.confirm_interval, &mut rep).await,
        _ => {}
    }
}

struct Reporter {
    member: String,
    tx: mpsc::Sender<(String, CheckResult)>,
    last: Option<CheckResult>,
}

impl Reporter {
    /// Sends `r` if it differs from the last result; false once the cluster task is gone.
    async fn report(&mut self, r: CheckResult) -> bool {
        if self.last == Some(r) {
            return true;
        }
        self.last = Some(r);
        self.tx.send((self.member.clone(), r)).await.is_ok()
    }
}

async fn watch_pg(check: &PgCheck, addr: std::net::SocketAddr, every: Duration, rep: &mut Reporter) {
    loop {
        match tokio::time::timeout(CHECK_TIMEOUT, pg_config(check, addr).connect(tokio_postgres::NoTls)).await {
            Ok(Ok((client, conn))) => {
                tokio::pin!(conn);
                loop {
                    let r = tokio::select! {
                        r = tokio::time::timeout(CHECK_TIMEOUT, client.query_one("SELECT pg_is_in_recovery()", &[])) => r,
                        _ = &mut conn => {
                            debug!(%addr, "primary check: connection closed");
                            break;
                        }
                    };
                    match r.map(|r| r.and_then(|row| row.try_get::<_, bool>(0))) {
                        Ok(Ok(in_recovery)) => {
                            let r = if in_recovery { CheckResult::ReadOnly } else { CheckResult::Writable };
                            if !rep.report(r).await {
                                return;
                            }
                        }
                        Ok(Err(e)) => {
                            debug!(%addr, error = %e, "primary check");
                            break;
                        }
                        Err(_) => {
                            debug!(%addr, "primary check: no answer within {CHECK_TIMEOUT:?}");
                            break;
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = &mut conn => {
                            debug!(%addr, "primary check: connection closed");
                            break;
                        }
                    }
                }
            }
            Ok(Err(e)) => debug!(%addr, error = %e, "primary check: cannot connect"),
            Err(_) => debug!(%addr, "primary check: no connection within {CHECK_TIMEOUT:?}"),
        }
        if !rep.report(CheckResult::Lost).await {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

async fn watch_rest(url: &str, every: Duration, rep: &mut Reporter) {
    let client = http::client();
    loop {
        let r = match http::get(&client, url, None, CHECK_TIMEOUT).await {
            Ok(resp) => rest_result(&resp.body),
            Err(e) => {
                debug!(error = %e, "primary check");
                CheckResult::Lost
            }
        };
        if !rep.report(r).await {
            return;
        }
        tokio::time::sleep(every).await;
    }
}

/// What Patroni's `/patroni` JSON says of a member that was the primary: a finished, running
/// primary is writable; any other role runs read-only; a primary in any other state (stopping,
/// restarting) or an answer that cannot be read is no answer.
fn rest_result(body: &[u8]) -> CheckResult {
    #[derive(serde::Deserialize)]
    struct S {
        role: Option<String>,
        state: Option<String>,
    }
    match serde_json::from_slice::<S>(body) {
        Ok(S { role: Some(role), state }) => match (role.as_str(), state.as_deref()) {
            ("master" | "primary", Some("running")) => CheckResult::Writable,
            ("master" | "primary", _) => CheckResult::Lost,
            _ => CheckResult::ReadOnly,
        },
        _ => CheckResult::Lost,
    }
}

/// Runs both checks at once: true as soon as one says yes; false when every check that
/// applies (`Some`) said no, or after `limit`.
async fn first_yes(
    a: impl Future<Output = Option<bool>>,
    b: impl Future<Output = Option<bool>>,
    limit: Duration,
) -> bool {
    let (mut a_done, mut b_done) = (false, false);
    tokio::pin!(a, b);
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer);
    while !(a_done && b_done) {
        tokio::select! {
            r = &mut a, if !a_done => { if r == Some(true) { return true } a_done = true; }
            r = &mut b, if !b_done => { if r == Some(true) { return true } b_done = true; }
            _ = &mut timer => return false,
        }
    }
    false
}

/// `http://host:port/whatever` → `http://host:port/patroni`.
fn status_url(api_url: &str) -> Option<String> {
    let rest = api_url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    Some(format!("http://{authority}/patroni"))
}

/// Patroni's `/patroni` JSON says the member runs as a finished primary.
fn runs_as_primary(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct S {
        role: Option<String>,
        state: Option<String>,
    }
    serde_json::from_slice::<S>(body)
        .is_ok_and(|s| matches!(s.role.as_deref(), Some("master" | "primary")) && s.state.as_deref() == Some("running"))
}

fn pg_config(check: &PgCheck, addr: std::net::SocketAddr) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(addr.ip().to_string()).port(addr.port()).user(&check.user).dbname(&check.database);
    c.connect_timeout(CHECK_TIMEOUT).application_name("pgfront-check");
    if let Some(p) = &check.password {
        c.password(p.expose());
    }
    c
}

async fn pg_is_primary(check: &PgCheck, addr: std::net::SocketAddr) -> bool {
    let c = pg_config(check, addr);
    let r = tokio::time::timeout(CHECK_TIMEOUT, async {
        let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await;
        drop(client);
        let _ = driver.await;
        row.map(|r| !r.get::<_, bool>(0))
    })
    .await;
    match r {
        Ok(Ok(primary)) => primary,
        Ok(Err(e)) => {
            debug!(%addr, error = %e, "promotion check");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test(start_paused = true)]
    async fn first_yes_does_not_wait_for_the_timer_when_all_said_no() {
        use std::time::Duration;
        let start = tokio::time::Instant::now();
        assert!(!super::first_yes(async { Some(false) }, async { None }, Duration::from_secs(5)).await);
        assert!(start.elapsed() < Duration::from_millis(1));
        let slow_yes = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some(true)
        };
        assert!(super::first_yes(async { Some(false) }, slow_yes, Duration::from_secs(5)).await);
        let never = std::future::pending::<Option<bool>>();
        assert!(!super::first_yes(async { Some(false) }, never, Duration::from_secs(1)).await);
        assert_eq!(start.elapsed(), Duration::from_millis(1300));
    }

    #[test]
    fn status_url_from_api_url() {
        assert_eq!(
            super::status_url("http://127.0.0.1:8008/patroni").as_deref(),
            Some("http://127.0.0.1:8008/patroni")
        );
        assert_eq!(super::status_url("https://x/patroni"), None);
    }

    #[test]
    fn rest_roles_as_check_results() {
        use crate::topology::CheckResult::*;
        for (body, want) in [
            (r#"{"state":"running","role":"master"}"#, Writable),
            (r#"{"state":"running","role":"primary"}"#, Writable),
            (r#"{"state":"stopping","role":"master"}"#, Lost),
            (r#"{"state":"running","role":"replica"}"#, ReadOnly),
            (r#"{"state":"starting","role":"replica"}"#, ReadOnly),
            (r#"{"state":"running","role":"demoted"}"#, ReadOnly),
            (r#"{"state":"running"}"#, Lost),
            ("garbage", Lost),
        ] {
            assert_eq!(super::rest_result(body.as_bytes()), want, "{body}");
        }
    }

    #[test]
    fn promoted_is_not_primary_yet() {
        assert!(super::runs_as_primary(br#"{"state":"running","role":"master","timeline":2}"#));
        assert!(super::runs_as_primary(br#"{"state":"running","role":"primary"}"#));
        assert!(!super::runs_as_primary(br#"{"state":"running","role":"promoted"}"#));
        assert!(!super::runs_as_primary(br#"{"state":"running","role":"replica"}"#));
        assert!(!super::runs_as_primary(br#"{"state":"starting","role":"master"}"#));
        assert!(!super::runs_as_primary(b"garbage"));
    }
}
