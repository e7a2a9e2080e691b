//! The probe of the local PostgreSQL: one statement over one kept connection, with repmgr's own
//! view (`repmgr.nodes`) when its schema exists, and the pace of probing.
//!
//! Invariants: a probe ends within `connect_timeout + probe_timeout` whatever the server does (a
//! hung server is a failed probe, `state = "unreachable"`), and a failed probe drops the
//! connection, so the next one starts afresh. `Pace` is pure: time comes in as an argument.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_postgres::{Client, NoTls, Statement};
use tracing::{debug, info};

use crate::config::agent::AgentPostgres;

/// How the local PostgreSQL answered the last probe (the `state` of the published key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Connected and the probe statement ran.
    Running,
    /// No answer in time, or an error other than the ones below.
    Unreachable,
    /// The server is starting up or recovering before accepting connections (SQLSTATE 57P03).
    Starting,
    /// Nothing listens (connection refused, no socket), or the server is shutting down.
    Stopped,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Running => "running",
            NodeState::Unreachable => "unreachable",
            NodeState::Starting => "starting",
            NodeState::Stopped => "stopped",
        }
    }
}

/// This node's row of `repmgr.nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RepmgrNode {
    pub node_id: i32,
    /// `primary`, `standby`, `witness` or `bdr`.
    #[serde(rename = "type")]
    pub kind: String,
    pub upstream_node_id: Option<i32>,
    pub active: bool,
}

/// What one probe found. Every field but `state`, `probe_ms` and `probed_at_ms` is `None` when
/// the probe failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub state: NodeState,
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    /// Primary: `pg_current_wal_lsn()`.
    pub current_lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    pub replay_paused: Option<bool>,
    pub replayed_timestamp: Option<String>,
    /// Upstream node name (repmgr) or the WAL sender's host.
    pub upstream: Option<String>,
    /// `pg_stat_wal_receiver.status` (`streaming`, `stopping`, …), `None` without a receiver.
    pub replication_state: Option<String>,
    pub repmgr: Option<RepmgrNode>,
    /// repmgr's `type` of an active node other than this one that claims to be the primary
    /// (name), seen in the same read: a switchover in progress shows up here.
    pub repmgr_primary: Option<String>,
    pub postmaster_start_time: Option<String>,
    pub server_version: Option<i32>,
    pub system_identifier: Option<String>,
    pub probe_ms: f64,
    pub probed_at_ms: u64,
    /// Why the probe failed, for logs and the health body.
    pub error: Option<String>,
}

impl Probe {
    pub(crate) fn failed(state: NodeState, error: String, took: Duration) -> Probe {
        Probe {
            state,
            in_recovery: None,
            timeline: None,
            current_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            replay_paused: None,
            replayed_timestamp: None,
            upstream: None,
            replication_state: None,
            repmgr: None,
            repmgr_primary: None,
            postmaster_start_time: None,
            server_version: None,
            system_identifier: None,
            probe_ms: took.as_secs_f64() * 1000.0,
            probed_at_ms: unix_ms(),
            error: Some(error),
        }
    }

    /// `primary` / `replica` / `unknown`, from `pg_is_in_recovery()`.
    pub fn role(&self) -> &'static str {
        match (self.state, self.in_recovery) {
            (NodeState::Running, Some(false)) => "primary",
            (NodeState::Running, Some(true)) => "replica",
            _ => "unknown",
        }
    }

    /// The LSN published as `lsn`: the primary's current LSN, a replica's replay LSN.
    pub fn lsn(&self) -> Option<u64> {
        match self.in_recovery {
            Some(false) => self.current_lsn,
            Some(true) => self.replay_lsn,
            None => None,
        }
    }

    /// repmgr and PostgreSQL disagree about this node's role: a repmgr switchover or failover
    /// is under way (repmgr updates `repmgr.nodes` around the promotion, not at its instant).
    pub fn repmgr_disagrees(&self) -> bool {
        let Some(r) = &self.repmgr else { return false };
        match self.in_recovery {
            Some(true) => r.kind == "primary",
            Some(false) => r.kind == "standby" || self.repmgr_primary.is_some(),
            None => false,
        }
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long after a change of role, state, timeline or replication state the agent keeps
/// probing fast: a switchover's steps (demote, promote, rewire the replicas) follow each other
/// within seconds.
pub const FAST_HOLD: Duration = Duration::from_secs(10);

/// The pace of probing: `interval` normally, `fast_interval` while a switchover looks under way
/// (repmgr's view and PostgreSQL's disagree, or something that matters changed within
/// [`FAST_HOLD`]).
#[derive(Debug)]
pub(crate) struct Pace {
    interval: Duration,
    fast_interval: Duration,
    last: Option<PaceKey>,
    changed_at: Option<Instant>,
}

type PaceKey = (NodeState, Option<bool>, Option<u32>, Option<String>, Option<String>);

impl Pace {
    pub(crate) fn new(interval: Duration, fast_interval: Duration) -> Pace {
        Pace { interval, fast_interval, last: None, changed_at: None }
    }

    /// Records `probe`, taken at `now`; returns the wait before the next probe.
    pub(crate) fn handle_probe(&mut self, now: Instant, probe: &Probe) -> Duration {
        let key = (
            probe.state,
            probe.in_recovery,
            probe.timeline,
            probe.replication_state.clone(),
            probe.repmgr.as_ref().map(|r| r.kind.clone()),
        );
        if self.last.as_ref().is_some_and(|k| *k != key) {
            self.changed_at = Some(now);
        }
        self.last = Some(key);
        let recent = self.changed_at.is_some_and(|t| now.saturating_duration_since(t) < FAST_HOLD);
        if recent || probe.repmgr_disagrees() {
            self.fast_interval
        } else {
            self.interval
        }
    }
}

/// The probe statement: one round trip. The primary's timeline comes from its current WAL file
/// name (as Patroni reads it): `pg_control_checkpoint()` still shows the old timeline until the
/// first checkpoint after a promotion, and the proxies compare timelines to refuse a split brain.
const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8 END, \
  (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::int8, \
  (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8, \
  CASE WHEN pg_is_in_recovery() THEN COALESCE(w.received_tli, (SELECT timeline_id FROM pg_control_checkpoint())) \
       ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
  w.status, w.sender_host, \
  CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END, \
  pg_last_xact_replay_timestamp()::text, \
  pg_postmaster_start_time()::text, \
  current_setting('server_version_num')::int, \
  (SELECT system_identifier FROM pg_control_system())::text, \
  to_regclass('repmgr.nodes') IS NOT NULL \
  FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS w ON true";

const REPMGR_SQL: &str = "SELECT node_id, node_name, type, upstream_node_id, active FROM repmgr.nodes";

/// The prober: a kept connection to the local PostgreSQL and its prepared statement.
pub(crate) struct Prober {
    cfg: AgentPostgres,
    conn: Option<(Client, Statement, tokio::task::JoinHandle<()>)>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some((_, _, task)) = self.conn.take() {
            task.abort();
        }
    }
}

impl Prober {
    pub(crate) fn new(cfg: AgentPostgres) -> Prober {
        Prober { cfg, conn: None }
    }

    /// One probe; never longer than `connect_timeout + probe_timeout`.
    pub(crate) async fn probe(&mut self) -> Probe {
        let started = Instant::now();
        if self.conn.is_none() {
            match tokio::time::timeout(self.cfg.connect_timeout, self.connect()).await {
                Ok(Ok(c)) => self.conn = Some(c),
                Ok(Err((state, e))) => return Probe::failed(state, e, started.elapsed()),
                Err(_) => {
                    let e = format!("no connection within {:?}", self.cfg.connect_timeout);
                    return Probe::failed(NodeState::Unreachable, e, started.elapsed());
                }
            }
        }
        let Some((client, stmt, _)) = &self.conn else {
            return Probe::failed(NodeState::Unreachable, "no connection".into(), started.elapsed());
        };
        let res = tokio::time::timeout(self.cfg.probe_timeout, query(client, stmt, &self.cfg.repmgr_node_name)).await;
        let probe = match res {
            Ok(Ok(mut p)) => {
                p.probe_ms = started.elapsed().as_secs_f64() * 1000.0;
                return p;
            }
            Ok(Err(e)) => Probe::failed(classify(&e), pg_error(&e), started.elapsed()),
            Err(_) => Probe::failed(
                NodeState::Unreachable,
                format!("probe took longer than {:?}", self.cfg.probe_timeout),
                started.elapsed(),
            ),
        };
        if let Some((_, _, task)) = self.conn.take() {
            task.abort();
        }
        probe
    }

    async fn connect(&self) -> Result<(Client, Statement, tokio::task::JoinHandle<()>), (NodeState, String)> {
        let mut pg = tokio_postgres::Config::new();
        pg.host(&self.cfg.host)
            .port(self.cfg.port)
            .user(&self.cfg.user)
            .dbname(&self.cfg.database)
            .application_name("pgfront-agent")
            .connect_timeout(self.cfg.connect_timeout);
        if let Some(p) = &self.cfg.password {
            pg.password(p.expose());
        }
        let (client, conn) = pg.connect(NoTls).await.map_err(|e| (classify(&e), pg_error(&e)))?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "probe connection closed");
            }
        });
        match client.prepare(PROBE_SQL).await {
            Ok(stmt) => Ok((client, stmt, task)),
            Err(e) => {
                task.abort();
                Err((classify(&e), pg_error(&e)))
            }
        }
    }
}

async fn query(client: &Client, stmt: &Statement, my_name: &str) -> Result<Probe, tokio_postgres::Error> {
    let row = client.query_one(stmt, &[]).await?;
    let u = |i: usize| -> Result<Option<u64>, tokio_postgres::Error> {
        Ok(row.try_get::<_, Option<i64>>(i)?.and_then(|v| u64::try_from(v).ok()))
    };
    let in_recovery: bool = row.try_get(0)?;
    let has_repmgr: bool = row.try_get(12)?;
    let sender_host: Option<String> = row.try_get(6)?;
    let mut p = Probe {
        state: NodeState::Running,
        in_recovery: Some(in_recovery),
        timeline: row.try_get::<_, Option<i32>>(4)?.and_then(|v| u32::try_from(v).ok()),
        current_lsn: u(1)?,
        receive_lsn: if in_recovery { u(2)? } else { None },
        replay_lsn: if in_recovery { u(3)? } else { None },
        replay_paused: row.try_get(7)?,
        replayed_timestamp: row.try_get(8)?,
        upstream: if in_recovery { sender_host } else { None },
        replication_state: if in_recovery { row.try_get(5)? } else { None },
        repmgr: None,
        repmgr_primary: None,
        postmaster_start_time: row.try_get(9)?,
        server_version: row.try_get(10)?,
        system_identifier: row.try_get(11)?,
        probe_ms: 0.0,
        probed_at_ms: unix_ms(),
        error: None,
    };
    if has_repmgr {
        let rows = client.query(REPMGR_SQL, &[]).await?;
        let mut nodes = Vec::new();
        for r in &rows {
            let id: i32 = r.try_get(0)?;
            let name: String = r.try_get(1)?;
            let kind: String = r.try_get(2)?;
            let upstream: Option<i32> = r.try_get(3)?;
            let active: bool = r.try_get(4)?;
            nodes.push((id, name, kind, upstream, active));
        }
        if let Some((id, _, kind, upstream, active)) = nodes.iter().find(|n| n.1 == my_name) {
            p.repmgr =
                Some(RepmgrNode { node_id: *id, kind: kind.clone(), upstream_node_id: *upstream, active: *active });
            if in_recovery {
                if let Some(up) = upstream.and_then(|u| nodes.iter().find(|n| n.0 == u)) {
                    p.upstream = Some(up.1.clone());
                }
            }
            p.repmgr_primary = nodes
                .iter()
                .find(|n| n.0 != *id && n.4 && n.2 == "primary")
                .map(|n| n.1.clone())
                .filter(|_| !in_recovery);
        }
    }
    Ok(p)
}

/// The node state a failed connection or statement means.
fn classify(e: &tokio_postgres::Error) -> NodeState {
    if let Some(db) = e.as_db_error() {
        // 57P03 cannot_connect_now: "the database system is starting up" (or "in recovery mode",
        // "not yet accepting connections"); "shutting down" is the same code.
        if db.code() == &tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW {
            return if db.message().contains("shutting down") { NodeState::Stopped } else { NodeState::Starting };
        }
        if db.code() == &tokio_postgres::error::SqlState::ADMIN_SHUTDOWN {
            return NodeState::Stopped;
        }
        return NodeState::Unreachable;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) {
                return NodeState::Stopped;
            }
        }
        src = s.source();
    }
    NodeState::Unreachable
}

/// A PostgreSQL error on one line with its cause (tokio-postgres' own text often says only
/// "db error" or "error connecting to server").
pub(crate) fn pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut out = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Logs the transitions of the probe that matter to an operator (one line each).
pub(crate) fn log_transition(prev: Option<&Probe>, p: &Probe) {
    let changed = prev.is_none_or(|q| q.state != p.state || q.in_recovery != p.in_recovery || q.timeline != p.timeline);
    if changed {
        match &p.error {
            Some(e) => info!(state = p.state.as_str(), error = %e, "local PostgreSQL"),
            None => info!(state = p.state.as_str(), role = p.role(), timeline = ?p.timeline, "local PostgreSQL"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(in_recovery: bool, tl: u32) -> Probe {
        let mut p = Probe::failed(NodeState::Running, String::new(), Duration::ZERO);
        p.error = None;
        p.in_recovery = Some(in_recovery);
        p.timeline = Some(tl);
        p
    }

    #[test]
    fn roles() {
        assert_eq!(running(false, 1).role(), "primary");
        assert_eq!(running(true, 1).role(), "replica");
        assert_eq!(Probe::failed(NodeState::Stopped, "x".into(), Duration::ZERO).role(), "unknown");
    }

    #[test]
    fn pace_goes_fast_after_a_change_and_back() {
        let t0 = Instant::now();
        let mut pace = Pace::new(Duration::from_secs(1), Duration::from_millis(100));
        assert_eq!(pace.handle_probe(t0, &running(false, 1)), Duration::from_secs(1));
        assert_eq!(pace.handle_probe(t0 + Duration::from_secs(1), &running(false, 1)), Duration::from_secs(1));
        // The primary goes down: fast.
        let down = Probe::failed(NodeState::Stopped, "refused".into(), Duration::ZERO);
        assert_eq!(pace.handle_probe(t0 + Duration::from_secs(2), &down), Duration::from_millis(100));
        assert_eq!(pace.handle_probe(t0 + Duration::from_secs(5), &down), Duration::from_millis(100));
        // Unchanged for FAST_HOLD: slow again.
        assert_eq!(pace.handle_probe(t0 + Duration::from_secs(2) + FAST_HOLD, &down), Duration::from_secs(1));
        // A timeline change counts too.
        let t1 = t0 + Duration::from_secs(30);
        pace.handle_probe(t1, &running(true, 1));
        assert_eq!(pace.handle_probe(t1 + Duration::from_secs(11), &running(true, 1)), Duration::from_secs(1));
        assert_eq!(pace.handle_probe(t1 + Duration::from_secs(12), &running(true, 2)), Duration::from_millis(100));
    }

    #[test]
    fn pace_is_fast_while_repmgr_disagrees() {
        let t0 = Instant::now();
        let mut pace = Pace::new(Duration::from_secs(1), Duration::from_millis(100));
        let mut p = running(true, 1);
        p.repmgr = Some(RepmgrNode { node_id: 1, kind: "primary".into(), upstream_node_id: None, active: true });
        assert!(p.repmgr_disagrees());
        pace.handle_probe(t0, &p);
        assert_eq!(pace.handle_probe(t0 + Duration::from_secs(60), &p), Duration::from_millis(100));
        // Promoted while repmgr still lists another primary.
        let mut q = running(false, 2);
        q.repmgr = Some(RepmgrNode { node_id: 2, kind: "primary".into(), upstream_node_id: None, active: true });
        q.repmgr_primary = Some("pg1".into());
        assert!(q.repmgr_disagrees());
        q.repmgr_primary = None;
        assert!(!q.repmgr_disagrees());
    }
}
