//! Fencing before promotion, the proxy's half: this proxy registers itself under
//! `<prefix>proxies/<proxy_id>` (a lease of `REGISTRATION_TTL`, kept alive), and answers each
//! fencing request (`<prefix>fence`, written by `pgfront agent pre-promote`) with
//! `<prefix>fence-ack/<proxy_id>` once it sends no new primary connection to the fenced nodes
//! and has closed its primary sessions there.
//!
//! The fence itself is applied by the topology (`ClusterView::fenced`): the cluster task
//! publishes the view with the fence the moment the watch reports the key, and each listener's
//! follower drains the fenced servers at once (no drain grace). This task only waits for the
//! pools to show it done (`pending`, pure) and writes the acknowledgement, so the
//! acknowledgement never precedes the fact. The fence holds while the key exists; the ack key
//! shares the registration's lease and disappears with the proxy.
//!
//! Registration and routing are tied (`source = "agent"`): `pre-promote` stops waiting for a
//! proxy whose registration is gone, so a proxy must route nothing to a primary once its
//! registration may have expired. This task reports, at each keep-alive etcd answers, until
//! when the registration surely holds (the instant the request was *sent* plus the TTL: etcd
//! cannot have dropped it earlier); the cluster task fences the primary role `LAPSE_MARGIN`
//! before that instant (see `ClusterTask::manage_registration`). On stop the lease is revoked
//! (registration and acknowledgement go at once), so a restarted proxy's old id does not hold
//! a promotion up for a TTL.
//!
//! etcd v3 only (leases). Errors end the session; the next one registers again (a new lease)
//! and acknowledges the fence in force again, so a pre-promote waiting meanwhile still gets
//! its answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::balancer::pool::PoolStatus;
use crate::balancer::select::ServerState;
use crate::config::{ClusterConfig, Role};
use crate::etcd::{timed, CallError, ConnectError};
use crate::metrics::ClusterMetrics;
use crate::topology::ClusterView;

/// The lease of a proxy's registration and acknowledgements (the contract's 10 s).
pub(crate) const REGISTRATION_TTL: i64 = 10;
/// How long before its registration may expire a proxy fences its primary role: time for the
/// listeners to close the primary sessions (at once, no drain grace) before a `pre-promote`
/// can see the registration gone.
pub(crate) const LAPSE_MARGIN: Duration = Duration::from_secs(2);
/// How long a revocation of the registration's lease is waited for on stop.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) fn registration_ttl() -> Duration {
    Duration::from_secs(REGISTRATION_TTL as u64)
}

/// How often the pools are looked at while a fence is being applied.
const POLL: Duration = Duration::from_millis(2);
const RETRY: Duration = Duration::from_millis(500);

/// Who this proxy is, as it registers (`<prefix>proxies/<id>`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProxyInfo {
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub admin: Option<String>,
}

impl ProxyInfo {
    /// `<hostname>-<pid>`, as the contract says when no id is configured.
    pub(crate) fn this_process(admin: Option<std::net::SocketAddr>) -> ProxyInfo {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        let pid = std::process::id();
        ProxyInfo { id: format!("{host}-{pid}"), host, pid, admin: admin.map(|a| format!("http://{a}")) }
    }
}

/// What the supervisor tells this task about the pools of the cluster's listeners, read at
/// each look: (listener role, its replica lag limit, the pool's state).
pub(crate) type PoolsFn = Arc<dyn Fn() -> Vec<(Role, Option<u64>, PoolStatus)> + Send + Sync>;

/// Pure: how much of the fence in `view` the pools have not applied yet: connections still
/// open to fenced servers that their listener does not keep, plus fenced servers a pool still
/// offers to new connections. Replica listeners are not concerned (a fence is about the
/// primary role). 0 when done, or when no fence is in force.
pub(crate) fn pending(view: &ClusterView, pools: &[(Role, Option<u64>, PoolStatus)]) -> u32 {
    if view.state.fence.is_none() {
        return 0;
    }
    let mut n = 0;
    for (role, lag, pool) in pools {
        if *role == Role::Replica {
            continue;
        }
        let keep = view.targets(*role, *lag).keep;
        for s in &pool.servers {
            if !view.fenced(&s.member) || keep.iter().any(|b| *b.member == *s.member && b.addr == s.addr) {
                continue;
            }
            n += s.active + u32::from(s.state == ServerState::Eligible);
        }
    }
    n
}

/// Sessions pgfront has closed so far on each member's servers, over the listeners a fence
/// concerns (primary and read-only).
fn closed_by_member(pools: &[(Role, Option<u64>, PoolStatus)]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for (member, n) in pools.iter().filter(|(r, _, _)| *r != Role::Replica).flat_map(|(_, _, p)| &p.closed) {
        *out.entry(member.clone()).or_insert(0) += n;
    }
    out
}

/// The part of `closed` (per member) that falls on the members `view`'s fence names.
fn fenced_total(view: &ClusterView, closed: &HashMap<String, u64>) -> u64 {
    closed.iter().filter(|(m, _)| view.fenced(m)).map(|(_, n)| n).sum()
}

#[derive(Serialize)]
struct Ack<'a> {
    id: &'a str,
    closed_sessions: u32,
    at_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Registers this proxy and acknowledges fencing requests until `stop`.
pub(crate) async fn run(
    cfg: Arc<ClusterConfig>,
    me: ProxyInfo,
    mut view: watch::Receiver<Arc<ClusterView>>,
    pools: PoolsFn,
    metrics: ClusterMetrics,
    registration: watch::Sender<Instant>,
    stop: CancellationToken,
) {
    let mut memory = Memory::default();
    loop {
        let r = tokio::select! {
            r = session(&cfg, &me, &mut view, &pools, &metrics, (&registration, &stop), &mut memory) => r,
            // A registered session revokes its lease on stop; one still connecting is dropped.
            _ = async { stop.cancelled().await; tokio::time::sleep(REVOKE_TIMEOUT * 2).await } => return,
        };
        if stop.is_cancelled() {
            return;
        }
        if let Err(e) = r {
            warn!(cluster = %cfg.name, proxy = %me.id, error = %e, "proxy registration for fencing lost; registering again");
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Why a registration session ended (logged; the next session registers again).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("cannot encode the {what}: {source}")]
    Encode { what: &'static str, source: serde_json::Error },
    #[error("no keep-alive acknowledged for {0:?}")]
    Unanswered(Duration),
    #[error("lease expired")]
    Expired,
    #[error("keep-alive stream closed")]
    StreamClosed,
}

/// What outlives a session.
#[derive(Default)]
struct Memory {
    /// The fence being acknowledged, and the sessions pgfront had closed on its nodes before it.
    seen: Option<(String, u64)>,
    /// Sessions closed per member, as of the last look without a fence to acknowledge: the
    /// count before a fence arrives, which its own closings are measured from (they may be
    /// done before this task first sees the fence).
    closed_before: HashMap<String, u64>,
    registered_once: bool,
}

async fn session(
    cfg: &ClusterConfig,
    me: &ProxyInfo,
    view: &mut watch::Receiver<Arc<ClusterView>>,
    pools: &PoolsFn,
    metrics: &ClusterMetrics,
    (registration, stop): (&watch::Sender<Instant>, &CancellationToken),
    memory: &mut Memory,
) -> Result<(), SessionError> {
    let prefix = cfg.prefix();
    let t = cfg.etcd_timeout;
    let mut client = crate::etcd::connect(cfg, &cfg.endpoints).await?;
    let granting = Instant::now();
    let lease = timed("lease grant", t, client.lease_grant(REGISTRATION_TTL, None)).await?.id();
    let (mut keeper, mut acks) = timed("lease keep-alive", t, client.lease_keep_alive(lease)).await?;
    let value = serde_json::to_string(me).map_err(|source| SessionError::Encode { what: "registration", source })?;
    let reg_key = format!("{prefix}proxies/{}", me.id);
    timed("put registration", t, client.put(reg_key.as_str(), value, Some(PutOptions::new().with_lease(lease))))
        .await?;
    let ttl = registration_ttl();
    registration.send_replace(granting + ttl);
    if !memory.registered_once {
        info!(cluster = %cfg.name, key = %reg_key, "proxy registered for fencing requests");
        memory.registered_once = true;
    }
    let ack_key = format!("{prefix}fence-ack/{}", me.id);
    // When the oldest keep-alive not answered yet was sent: an answer proves the lease alive
    // from then on.
    let mut unanswered_since: Option<Instant> = None;
    let mut next_keepalive = Instant::now() + ttl / 3;
    let mut last_ack = Instant::now();
    // The fence this session has acknowledged (a new lease needs a new ack).
    let mut acked: Option<String> = None;
    let mut waiting_since: Option<Instant> = None;
    loop {
        let v = view.borrow_and_update().clone();
        let fence_id = v.state.fence.as_ref().map(|f| f.id.clone());
        let mut poll = false;
        let now_pools = pools();
        match &fence_id {
            Some(id) if acked.as_ref() != Some(id) => {
                if memory.seen.as_ref().is_none_or(|(s, _)| s != id) {
                    memory.seen = Some((id.clone(), fenced_total(&v, &memory.closed_before)));
                    waiting_since = Some(Instant::now());
                }
                let left = pending(&v, &now_pools);
                if left == 0 {
                    let before = memory.seen.as_ref().map_or(0, |(_, n)| *n);
                    let closed = fenced_total(&v, &closed_by_member(&now_pools)).saturating_sub(before);
                    let closed = u32::try_from(closed).unwrap_or(u32::MAX);
                    let ack = serde_json::to_string(&Ack { id, closed_sessions: closed, at_ms: unix_ms() })
                        .map_err(|source| SessionError::Encode { what: "acknowledgement", source })?;
                    let opts = Some(PutOptions::new().with_lease(lease));
                    timed("put acknowledgement", t, client.put(ack_key.as_str(), ack, opts)).await?;
                    metrics.fence_acks.inc();
                    let took = waiting_since.take().map_or(Duration::ZERO, |t| t.elapsed());
                    info!(cluster = %cfg.name, fence = %id, closed_sessions = closed, took_ms = took.as_secs_f64() * 1000.0, "fencing request acknowledged");
                    acked = Some(id.clone());
                } else {
                    if waiting_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                        warn!(cluster = %cfg.name, fence = %id, pending = left, "fencing request: sessions to the fenced nodes still open after 2s; not acknowledged yet");
                        waiting_since = Some(Instant::now());
                    }
                    poll = true;
                }
            }
            Some(_) => memory.closed_before = closed_by_member(&now_pools),
            None => {
                memory.closed_before = closed_by_member(&now_pools);
                if acked.take().is_some() {
                    // The fence is lifted: the acknowledgement has served.
                    let _ = timed("delete acknowledgement", t, client.delete(ack_key.as_str(), None)).await;
                    debug!(cluster = %cfg.name, "fence lifted: acknowledgement removed");
                }
            }
        }
        let now = Instant::now();
        if now >= last_ack + ttl - ttl / 4 {
            return Err(SessionError::Unanswered(now - last_ack));
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep(POLL), if poll => {}
            _ = tokio::time::sleep_until(next_keepalive) => {
                unanswered_since.get_or_insert_with(Instant::now);
                timed("keep-alive", t, keeper.keep_alive()).await?;
                next_keepalive = Instant::now() + ttl / 3;
            }
            a = acks.message() => match a {
                Ok(Some(a)) if a.ttl() > 0 => {
                    last_ack = Instant::now();
                    if let Some(sent) = unanswered_since.take() {
                        registration.send_if_modified(|until| {
                            let later = sent + ttl > *until;
                            if later {
                                *until = sent + ttl;
                            }
                            later
                        });
                    }
                }
                Ok(Some(_)) => return Err(SessionError::Expired),
                Ok(None) => return Err(SessionError::StreamClosed),
                Err(source) => return Err(CallError::Etcd { what: "keep-alive", source }.into()),
            },
            _ = stop.cancelled() => {
                // Registration and acknowledgement go at once: a pre-promote does not wait for
                // a proxy that is gone (its id may even be taken again by a restarted process).
                match timed("lease revoke", REVOKE_TIMEOUT, client.lease_revoke(lease)).await {
                    Ok(_) => info!(cluster = %cfg.name, key = %reg_key, "fencing registration revoked"),
                    Err(CallError::Etcd { source: e, .. }) => warn!(cluster = %cfg.name, error = %e, "cannot revoke the fencing registration; it goes within its TTL"),
                    Err(CallError::Timeout { .. }) => warn!(cluster = %cfg.name, "no answer to the revocation of the fencing registration; it goes within its TTL"),
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::pool::ServerStatus;
    use crate::topology::{ClusterState, Fence, Member, MemberRole};

    fn member(name: &str, port: u16, role: MemberRole) -> Member {
        Member {
            name: name.into(),
            addr: Some(([127, 0, 0, 1], port).into()),
            host: None,
            port: Some(port),
            api_url: None,
            role,
            state: "running".into(),
            timeline: Some(1),
            lsn: Some(1),
            noloadbalance: false,
            nofailover: false,
            maintenance: false,
            lag_bytes: None,
        }
    }

    fn view(fence: Option<(&str, Option<&str>)>) -> ClusterView {
        let mut s = ClusterState { leader: Some("pg1".into()), ..Default::default() };
        for m in [
            member("pg1", 1, MemberRole::Primary),
            member("pg2", 2, MemberRole::Replica),
            member("pg3", 3, MemberRole::Replica),
        ] {
            s.members.insert(m.name.clone(), m);
        }
        s.fence = fence.map(|(n, o)| Fence { id: "f".into(), new_primary: n.into(), old_primary: o.map(Into::into) });
        let mut v = ClusterView::default();
        v.handle_keys(s);
        v
    }

    fn pool(servers: &[(&str, u16, u32, ServerState)]) -> PoolStatus {
        PoolStatus {
            queued: 0,
            oldest_queued_wait_seconds: 0.0,
            servers: servers
                .iter()
                .map(|(m, p, active, state)| ServerStatus {
                    member: m.to_string(),
                    addr: ([127, 0, 0, 1], *p).into(),
                    active: *active,
                    state: *state,
                })
                .collect(),
            closed: Default::default(),
        }
    }

    #[test]
    fn pending_until_the_pools_drained_the_fenced_primary() {
        use ServerState::*;
        let v = view(Some(("pg2", Some("pg1"))));
        // Before the follower applied the fence: still eligible, 3 sessions.
        let before = vec![(Role::Primary, None, pool(&[("pg1", 1, 3, Eligible)]))];
        assert_eq!(pending(&v, &before), 4);
        // Drained, one session not closed yet.
        let closing = vec![(Role::Primary, None, pool(&[("pg1", 1, 1, Draining)]))];
        assert_eq!(pending(&v, &closing), 1);
        // Done; replica listeners and replica sessions of a read-only listener do not count.
        let done = vec![
            (Role::Primary, None, pool(&[])),
            (Role::Replica, None, pool(&[("pg2", 2, 5, Eligible), ("pg3", 3, 5, Eligible)])),
            (Role::ReadOnly, None, pool(&[("pg3", 3, 2, Eligible)])),
        ];
        assert_eq!(pending(&v, &done), 0);
        // old_primary null fences pg3 too, but a read-only listener keeps it as a replica.
        let v = view(Some(("pg2", None)));
        assert_eq!(pending(&v, &done), 0);
        // No fence: nothing pending whatever the pools hold.
        assert_eq!(pending(&view(None), &before), 0);
    }

    #[test]
    fn closed_sessions_count_from_before_the_fence_on_the_fenced_nodes_only() {
        use ServerState::*;
        let with_closed = |p: PoolStatus, closed: &[(&str, u64)]| PoolStatus {
            closed: closed.iter().map(|(m, n)| (m.to_string(), *n)).collect(),
            ..p
        };
        // Before the fence: pg1 had 2 sessions closed earlier (a drain), pg2 1; replica
        // listeners do not count.
        let before = vec![
            (Role::Primary, None, with_closed(pool(&[("pg1", 1, 3, Eligible)]), &[("pg1", 2), ("pg2", 1)])),
            (Role::Replica, None, with_closed(pool(&[("pg1", 1, 0, Eligible)]), &[("pg1", 7)])),
        ];
        let v = view(Some(("pg2", Some("pg1"))));
        let baseline = fenced_total(&v, &closed_by_member(&before));
        assert_eq!(baseline, 2);
        // The fence closed pg1's 3 sessions on two listeners; pg1 has left both pools (its
        // last session closed), its count has not.
        let after = vec![
            (Role::Primary, None, with_closed(pool(&[]), &[("pg1", 4), ("pg2", 1)])),
            (Role::ReadOnly, None, with_closed(pool(&[]), &[("pg1", 1)])),
            (Role::Replica, None, with_closed(pool(&[("pg1", 1, 0, Eligible)]), &[("pg1", 9)])),
        ];
        assert_eq!(fenced_total(&v, &closed_by_member(&after)) - baseline, 3);
        // Nothing is counted without a fence.
        assert_eq!(fenced_total(&view(None), &closed_by_member(&after)), 0);
    }
}
