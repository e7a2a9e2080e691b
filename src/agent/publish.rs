//! Publication of the node's facts to etcd: the key `<prefix>nodes/<name>` (JSON, see
//! [`NodeDoc`] and the README), attached to a lease this task keeps alive.
//!
//! Invariants:
//! - the key exists only under a live lease of this process: an agent that dies loses it within
//!   the lease TTL, one that stops (SIGTERM) revokes the lease and the key goes at once;
//! - what proxies route on (state, role, timeline, upstream, replication state, maintenance) is
//!   written as soon as a probe or `drain`/`resume` changes it; LSNs and lag alone at most every
//!   `lsn_interval` ([`Throttle`], a pure core), so WAL traffic does not become etcd traffic;
//! - an etcd outage never stops probing or the health endpoint: this task retries with a
//!   backoff, and each new session takes a new lease and writes the key afresh.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::probe::{NodeState, Probe, RepmgrNode};
use super::Shared;
use crate::config::agent::AgentConfig;
use crate::etcd::{timed, CallError};

/// The `version` of the key's JSON; it changes only when a reader must be changed too.
pub const NODE_DOC_VERSION: u32 = 1;

/// The value of `<prefix>nodes/<name>`. Readers ignore fields they do not know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeDoc {
    pub version: u32,
    pub name: String,
    pub conn_url: String,
    pub api_url: String,
    pub state: NodeState,
    /// `primary` | `replica` | `unknown`.
    pub role: String,
    /// `null` when the probe failed.
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    pub lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub upstream: Option<String>,
    pub replication_state: Option<String>,
    pub probe_ms: f64,
    pub probed_at_ms: u64,
    pub maintenance: bool,
    pub repmgr: Option<RepmgrNode>,
}

impl NodeDoc {
    /// The document for `probe`; `primary_lsn` is the LSN of the primary as last read from etcd
    /// (for a replica's `lag_bytes`).
    pub(crate) fn new(cfg: &AgentConfig, probe: &Probe, maintenance: bool, primary_lsn: Option<u64>) -> NodeDoc {
        let replica = probe.in_recovery == Some(true);
        NodeDoc {
            version: NODE_DOC_VERSION,
            name: cfg.name.clone(),
            conn_url: cfg.conn_url.clone(),
            api_url: cfg.api_url.clone(),
            state: probe.state,
            role: probe.role().to_owned(),
            in_recovery: probe.in_recovery,
            timeline: probe.timeline,
            lsn: probe.lsn(),
            receive_lsn: probe.receive_lsn.filter(|_| replica),
            replay_lsn: probe.replay_lsn.filter(|_| replica),
            lag_bytes: lag(probe, primary_lsn),
            upstream: probe.upstream.clone().filter(|_| replica),
            replication_state: probe.replication_state.clone().filter(|_| replica),
            probe_ms: (probe.probe_ms * 10.0).round() / 10.0,
            probed_at_ms: probe.probed_at_ms,
            maintenance,
            repmgr: probe.repmgr.clone(),
        }
    }

    /// The document without what changes with every WAL record or probe.
    fn routing_facts(&self) -> NodeDoc {
        NodeDoc {
            lsn: None,
            receive_lsn: None,
            replay_lsn: None,
            lag_bytes: None,
            probe_ms: 0.0,
            probed_at_ms: 0,
            ..self.clone()
        }
    }

    fn lsns(&self) -> (Option<u64>, Option<u64>, Option<u64>, Option<u64>) {
        (self.lsn, self.receive_lsn, self.replay_lsn, self.lag_bytes)
    }
}

/// A replica's lag: bytes between the primary's LSN (from etcd) and its own replay LSN.
pub(crate) fn lag(probe: &Probe, primary_lsn: Option<u64>) -> Option<u64> {
    match (probe.in_recovery, primary_lsn, probe.replay_lsn) {
        (Some(true), Some(p), Some(r)) => Some(p.saturating_sub(r)),
        _ => None,
    }
}

/// Decides which documents are written (pure: time comes in).
#[derive(Debug)]
pub(crate) struct Throttle {
    lsn_interval: Duration,
    last: Option<(NodeDoc, Instant)>,
}

impl Throttle {
    pub(crate) fn new(lsn_interval: Duration) -> Throttle {
        Throttle { lsn_interval, last: None }
    }

    /// Whether `doc` should be written at `now`: always the first one, at once when a routing
    /// fact changed, when only LSNs changed once `lsn_interval` passed since the last write,
    /// never when nothing but the probe's timing changed.
    pub(crate) fn handle_doc(&self, now: Instant, doc: &NodeDoc) -> bool {
        match &self.last {
            None => true,
            Some((last, at)) => {
                last.routing_facts() != doc.routing_facts()
                    || (last.lsns() != doc.lsns() && now.saturating_duration_since(*at) >= self.lsn_interval)
            }
        }
    }

    /// `doc` was written at `now`.
    pub(crate) fn written(&mut self, now: Instant, doc: NodeDoc) {
        self.last = Some((doc, now));
    }
}

/// The primary's LSN as the cluster's keys tell it: the running, not-in-recovery node of the
/// highest timeline among the agent keys (`nodes`: key, value), else Patroni's
/// `optime/leader` (a plain integer), so lag is known during a migration from either source.
pub(crate) fn primary_lsn(nodes: &[(String, Vec<u8>)], optime_leader: Option<&[u8]>) -> Option<u64> {
    let mut best: Option<(u32, u64)> = None;
    for (_, v) in nodes {
        let Ok(d) = serde_json::from_slice::<serde_json::Value>(v) else { continue };
        if d["state"] != "running" || d["role"] != "primary" {
            continue;
        }
        let (Some(tl), Some(lsn)) = (d["timeline"].as_u64(), d["lsn"].as_u64()) else { continue };
        let tl = u32::try_from(tl).unwrap_or(u32::MAX);
        if best.is_none_or(|b| (tl, lsn) > b) {
            best = Some((tl, lsn));
        }
    }
    best.map(|b| b.1).or_else(|| optime_leader.and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok()))
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error(transparent)]
    Connect(#[from] crate::etcd::ConnectError),
    #[error(transparent)]
    Call(#[from] crate::etcd::CallError),
    #[error("etcd lease {lease:x}: {reason}")]
    Lease { lease: i64, reason: String },
}

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Publishes until `stop`; on `stop`, revokes the lease (the key goes at once).
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let began = Instant::now();
        match session(&shared, &stop).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "etcd: cannot publish this node; retrying");
                shared.etcd.send_modify(|v| v.up = false);
            }
        }
        if began.elapsed() > MAX_BACKOFF * 2 {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn session(shared: &Shared, stop: &CancellationToken) -> Result<(), PublishError> {
    let cfg = &shared.cfg;
    let t = cfg.etcd.etcd_timeout;
    let mut client = crate::etcd::connect(&cfg.etcd, &cfg.etcd.endpoints).await?;
    let lease = timed("lease grant", t, client.lease_grant(cfg.ttl.as_secs() as i64, None)).await?.id();
    let (mut keeper, mut acks) = timed("lease keep-alive", t, client.lease_keep_alive(lease)).await?;
    let key = cfg.node_key();
    let mut throttle = Throttle::new(cfg.lsn_interval);
    let mut probe_rx = shared.probe.subscribe();
    let mut maint_rx = shared.maintenance.subscribe();
    let keepalive_every = cfg.ttl / 3;
    let mut keepalive = tokio::time::interval(keepalive_every);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ack = Instant::now();
    let mut next_refresh = Instant::now();
    let mut first = true;
    let result = loop {
        // Refresh the primary's LSN (for lag) at most every lsn_interval.
        if Instant::now() >= next_refresh {
            match refresh_primary_lsn(&mut client, cfg, t).await {
                Ok(lsn) => shared.etcd.send_modify(|v| {
                    v.primary_lsn = lsn;
                    v.up = true;
                    v.last_ok = Some(Instant::now());
                }),
                Err(e) => break Err(e),
            }
            next_refresh = Instant::now() + cfg.lsn_interval;
        }
        let probe = probe_rx.borrow_and_update().clone();
        let maintenance = *maint_rx.borrow_and_update();
        if let Some(p) = probe {
            let doc = NodeDoc::new(cfg, &p, maintenance, shared.etcd.borrow().primary_lsn);
            let now = Instant::now();
            if throttle.handle_doc(now, &doc) {
                let body = match serde_json::to_string(&doc) {
                    Ok(b) => b,
                    Err(e) => break Err(PublishError::Lease { lease, reason: format!("cannot encode: {e}") }),
                };
                if let Err(e) =
                    timed("put", t, client.put(key.as_str(), body, Some(PutOptions::new().with_lease(lease)))).await
                {
                    break Err(e.into());
                }
                if first {
                    info!(key = %key, lease = format!("{lease:x}"), ttl = ?cfg.ttl, "etcd: node published");
                    first = false;
                }
                shared.etcd.send_modify(|v| {
                    v.up = true;
                    v.last_ok = Some(Instant::now());
                    v.published_maintenance = Some(doc.maintenance);
                });
                throttle.written(now, doc);
            }
        }
        tokio::select! {
            _ = keepalive.tick() => {
                if last_ack.elapsed() > cfg.ttl - keepalive_every {
                    break Err(PublishError::Lease { lease, reason: format!("no keep-alive answered for {:?}", last_ack.elapsed()) });
                }
                if let Err(e) = keeper.keep_alive().await {
                    break Err(CallError::Etcd { what: "keep-alive", source: e }.into());
                }
            }
            ack = acks.message() => match ack {
                Ok(Some(a)) if a.ttl() > 0 => {
                    last_ack = Instant::now();
                    shared.etcd.send_modify(|v| { v.up = true; v.last_ok = Some(last_ack); });
                }
                Ok(Some(_)) => break Err(PublishError::Lease { lease, reason: "expired".into() }),
                Ok(None) => break Err(PublishError::Lease { lease, reason: "keep-alive stream closed".into() }),
                Err(e) => break Err(CallError::Etcd { what: "keep-alive", source: e }.into()),
            },
            r = probe_rx.changed() => if r.is_err() { break Ok(()) },
            r = maint_rx.changed() => if r.is_err() { break Ok(()) },
            _ = tokio::time::sleep_until(next_refresh.into()) => {}
            _ = stop.cancelled() => break Ok(()),
        }
    };
    if stop.is_cancelled() {
        match timed("lease revoke", t, client.lease_revoke(lease)).await {
            Ok(_) => info!(key = %key, "etcd: lease revoked, node key removed"),
            Err(CallError::Etcd { source: e, .. }) => {
                warn!(error = %e, "etcd: cannot revoke the lease; the key goes within its TTL")
            }
            Err(CallError::Timeout { .. }) => {
                warn!("etcd: no answer to the lease revocation; the key goes within its TTL")
            }
        }
        return Ok(());
    }
    // The lease is NOT revoked here: that would delete the key until the next session writes
    // it again, and a proxy would see a live node vanish. The next session puts the key under
    // a new lease; this one, left without keys, expires by itself.
    result
}

async fn refresh_primary_lsn(client: &mut Client, cfg: &AgentConfig, t: Duration) -> Result<Option<u64>, PublishError> {
    let prefix = format!("{}nodes/", cfg.prefix());
    let nodes = timed("get nodes/", t, client.get(prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
    let nodes: Vec<(String, Vec<u8>)> = nodes
        .kvs()
        .iter()
        .filter(|kv| kv.key() != cfg.node_key().as_bytes())
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()))
        .collect();
    let optime = format!("{}optime/leader", cfg.prefix());
    let optime = timed("get optime/leader", t, client.get(optime.as_str(), None)).await?;
    Ok(primary_lsn(&nodes, optime.kvs().first().map(|kv| kv.value())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> AgentConfig {
        AgentConfig::parse(
            Path::new("a.toml"),
            "[node]\nname = \"pg2\"\nconn_url = \"postgres://10.0.0.12:5432/postgres\"\n\
             [cluster]\nscope = \"main\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n",
        )
        .unwrap()
    }

    fn replica(replay: u64) -> Probe {
        let mut p = Probe::failed(NodeState::Running, String::new(), Duration::from_micros(1700));
        p.error = None;
        p.in_recovery = Some(true);
        p.timeline = Some(3);
        p.receive_lsn = Some(replay + 10);
        p.replay_lsn = Some(replay);
        p.upstream = Some("pg1".into());
        p.replication_state = Some("streaming".into());
        p
    }

    #[test]
    fn document_matches_the_contract() {
        let d = NodeDoc::new(&cfg(), &replica(1000), false, Some(1500));
        let v: serde_json::Value = serde_json::to_value(&d).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["name"], "pg2");
        assert_eq!(v["state"], "running");
        assert_eq!(v["role"], "replica");
        assert_eq!(v["in_recovery"], true);
        assert_eq!(v["timeline"], 3);
        assert_eq!(v["lsn"], 1000);
        assert_eq!(v["receive_lsn"], 1010);
        assert_eq!(v["lag_bytes"], 500);
        assert_eq!(v["upstream"], "pg1");
        assert_eq!(v["replication_state"], "streaming");
        assert_eq!(v["probe_ms"], 1.7);
        assert_eq!(v["maintenance"], false);
        assert!(v["repmgr"].is_null());
        for k in ["conn_url", "api_url", "probed_at_ms", "replay_lsn"] {
            assert!(!v[k].is_null(), "{k}");
        }
        let down = Probe::failed(NodeState::Stopped, "refused".into(), Duration::ZERO);
        let v = serde_json::to_value(NodeDoc::new(&cfg(), &down, true, Some(1))).unwrap();
        assert_eq!((v["state"].as_str(), v["role"].as_str()), (Some("stopped"), Some("unknown")));
        assert!(v["lsn"].is_null() && v["lag_bytes"].is_null() && v["timeline"].is_null());
        assert_eq!(v["maintenance"], true);
    }

    #[test]
    fn throttle_writes_routing_changes_at_once_and_lsns_at_most_every_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut th = Throttle::new(2 * s);
        let c = cfg();
        let d0 = NodeDoc::new(&c, &replica(100), false, Some(100));
        assert!(th.handle_doc(t0, &d0));
        th.written(t0, d0.clone());
        // Only the probe timing changed: never.
        let mut same = d0.clone();
        same.probe_ms = 9.0;
        same.probed_at_ms += 5000;
        assert!(!th.handle_doc(t0 + 10 * s, &same));
        // LSN churn: not before the interval, then yes.
        let d1 = NodeDoc::new(&c, &replica(200), false, Some(300));
        assert!(!th.handle_doc(t0 + s, &d1));
        assert!(th.handle_doc(t0 + 2 * s, &d1));
        // Maintenance, state, timeline: at once.
        let mut m = d0.clone();
        m.maintenance = true;
        assert!(th.handle_doc(t0, &m));
        let mut tl = d0.clone();
        tl.timeline = Some(4);
        assert!(th.handle_doc(t0, &tl));
        let mut st = d0.clone();
        st.replication_state = None;
        assert!(th.handle_doc(t0, &st));
    }

    #[test]
    fn primary_lsn_from_the_highest_timeline() {
        let doc = |role: &str, state: &str, tl: u32, lsn: u64| {
            format!(r#"{{"role":"{role}","state":"{state}","timeline":{tl},"lsn":{lsn}}}"#).into_bytes()
        };
        let nodes = vec![
            ("a".to_owned(), doc("primary", "running", 2, 900)),
            ("b".to_owned(), doc("primary", "running", 3, 500)),
            ("c".to_owned(), doc("replica", "running", 3, 5000)),
            ("d".to_owned(), doc("primary", "stopped", 4, 7000)),
            ("e".to_owned(), b"not json".to_vec()),
        ];
        assert_eq!(primary_lsn(&nodes, Some(b"1")), Some(500));
        assert_eq!(primary_lsn(&nodes[2..], Some(b"1234\n")), Some(1234));
        assert_eq!(primary_lsn(&[], None), None);
        assert_eq!(primary_lsn(&[], Some(b"x")), None);
    }
}
