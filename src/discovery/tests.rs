//! The cluster task driven by hand: fake resolvers, source events, paused time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::dns::{Resolve, ResolveFuture};
use super::keys::KeyMap;
use super::*;
use crate::config::Config;
use crate::metrics::Metrics;

fn cluster_config(extra: &str) -> Arc<ClusterConfig> {
    let text = format!(
        r#"
[[cluster]]
name = "t"
scope = "s"
etcd_endpoints = ["http://127.0.0.1:1"]
{extra}

[[listener]]
cluster = "t"
bind = "127.0.0.1:0"
"#
    );
    Config::parse(std::path::Path::new("test.toml"), &text).unwrap().clusters[0].clone()
}

/// A DNS that answers from a table while up and never answers while down; counts lookups.
#[derive(Default)]
struct FakeDns {
    table: HashMap<String, SocketAddr>,
    down: AtomicBool,
    lookups: AtomicUsize,
}

impl FakeDns {
    fn new(table: &[(&str, SocketAddr)]) -> Arc<FakeDns> {
        Arc::new(FakeDns { table: table.iter().map(|(h, a)| (h.to_string(), *a)).collect(), ..Default::default() })
    }
}

impl Resolve for FakeDns {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        let a = self.table.get(host).map(|a| SocketAddr::new(a.ip(), port));
        Box::pin(async move { Ok(a) })
    }
}

/// A resolver that fails the test when it is called.
struct NoDns;

impl Resolve for NoDns {
    fn resolve(&self, host: &str, _: u16) -> ResolveFuture {
        panic!("members given by IP must not be resolved (asked for {host})")
    }
}

struct Harness {
    src: mpsc::Sender<SourceEvent>,
    view: watch::Receiver<Arc<ClusterView>>,
    events: crate::events::Events,
    health: Arc<ClusterHealth>,
    live: watch::Sender<Arc<ClusterConfig>>,
    registration: watch::Sender<Instant>,
    metrics: ClusterMetrics,
    _stop: tokio_util::sync::DropGuard,
}

fn start(cfg: Arc<ClusterConfig>, resolver: Arc<dyn Resolve>) -> Harness {
    start_from(cfg, resolver, Metrics::new().cluster("t"), None)
}

/// A task as `spawn` starts it, on `metrics`, seeded from `last` as a restarted one is.
fn start_from(
    cfg: Arc<ClusterConfig>,
    resolver: Arc<dyn Resolve>,
    metrics: ClusterMetrics,
    last: Option<&ClusterView>,
) -> Harness {
    let (tx, view) = watch::channel(Arc::new(last.cloned().unwrap_or_default()));
    let (src, src_rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let (events, health) = (crate::events::Events::default(), Arc::new(ClusterHealth::default()));
    let (live, live_rx) = watch::channel(cfg.clone());
    let (registration, reg_rx) = watch::channel(Instant::now() + fence::registration_ttl());
    let mut task = ClusterTask::new(cfg, tx, metrics.clone(), events.clone(), health.clone(), resolver);
    if let Some(last) = last {
        task.seed(last);
    }
    task.sync_gauges();
    tokio::spawn(task.run(src_rx, live_rx, reg_rx, stop.clone()));
    Harness { src, view, events, health, live, registration, metrics, _stop: stop.drop_guard() }
}

fn member_json(host: &str, port: u16, role: &str) -> Vec<u8> {
    format!(r#"{{"conn_url":"postgres://{host}:{port}/postgres","state":"running","role":"{role}"}}"#).into_bytes()
}

fn keys(leader: &str, members: &[(&str, &str, u16, &str)]) -> KeyMap {
    let mut k = KeyMap::new();
    k.insert("leader".into(), leader.as_bytes().to_vec());
    for (name, host, port, role) in members {
        k.insert(format!("members/{name}"), member_json(host, *port, role));
    }
    k
}

/// Waits (in virtual time, without limit: callers bound it) for a view that satisfies `f`.
async fn view_where(rx: &mut watch::Receiver<Arc<ClusterView>>, f: impl Fn(&ClusterView) -> bool) -> Arc<ClusterView> {
    loop {
        let v = rx.borrow_and_update().clone();
        if f(&v) {
            return v;
        }
        rx.changed().await.expect("the cluster task runs");
    }
}

fn primary_at(v: &ClusterView) -> Option<(String, SocketAddr)> {
    v.primary().and_then(|m| Some((m.name.clone(), m.addr?)))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn leader_change_is_published_at_once_while_dns_hangs() {
    let dns = FakeDns::new(&[
        ("db1.test", addr("10.0.0.1:0")),
        ("db2.test", addr("10.0.0.2:0")),
        ("db3.test", addr("10.0.0.3:0")),
    ]);
    let mut h = start(cluster_config(""), dns.clone());
    let before = [
        ("pg1", "db1.test", 5432, "master"),
        ("pg2", "db2.test", 5432, "replica"),
        ("pg3", "db3.test", 5432, "replica"),
    ];
    h.src.send(SourceEvent::Keys(keys("pg1", &before))).await.unwrap();
    let v = tokio::time::timeout(
        Duration::from_secs(1),
        view_where(&mut h.view, |v| v.state.members.values().all(|m| m.addr.is_some()) && v.primary().is_some()),
    )
    .await
    .expect("members resolved while DNS answers");
    assert_eq!(primary_at(&v), Some(("pg1".into(), addr("10.0.0.1:5432"))));

    // DNS goes down for good; every cached answer is past its lifetime.
    dns.down.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(3600)).await;
    let after = [
        ("pg1", "db1.test", 5432, "replica"),
        ("pg2", "db2.test", 5432, "master"),
        ("pg3", "db3.test", 5432, "replica"),
    ];
    h.src.send(SourceEvent::Keys(keys("pg2", &after))).await.unwrap();
    // Published without waiting on the resolver: not even a fraction of one lookup timeout of
    // virtual time passes.
    let v = tokio::time::timeout(
        Duration::from_millis(100),
        view_where(&mut h.view, |v| v.state.leader.as_deref() == Some("pg2")),
    )
    .await
    .expect("the leader change is published while DNS hangs");
    assert_eq!(primary_at(&v), Some(("pg2".into(), addr("10.0.0.2:5432"))), "last good address kept");
    assert_eq!(v.state.members["pg1"].addr, Some(addr("10.0.0.1:5432")));
}

#[tokio::test(start_paused = true)]
async fn members_given_by_ip_never_reach_the_resolver() {
    let mut h = start(cluster_config(""), Arc::new(NoDns));
    let ms = [("pg1", "10.0.0.1", 5432, "master"), ("pg2", "[::1]", 5433, "replica")];
    h.src.send(SourceEvent::Keys(keys("pg1", &ms))).await.unwrap();
    let v = tokio::time::timeout(Duration::from_millis(100), view_where(&mut h.view, |v| v.primary().is_some()))
        .await
        .expect("published");
    assert_eq!(primary_at(&v), Some(("pg1".into(), addr("10.0.0.1:5432"))));
    assert_eq!(v.state.members["pg2"].addr, Some(addr("[::1]:5433")));
}

/// A leader change is one event with the routing pause (measured in the task's clock), after
/// the routing-paused event; `/status`'s "routing paused for" is set meanwhile.
#[tokio::test(start_paused = true)]
async fn a_leader_change_is_recorded_with_its_routing_pause() {
    use crate::events::EventKind;
    let mut h = start(cluster_config(""), Arc::new(NoDns));
    let ms = [("pg1", "10.0.0.1", 5432, "master"), ("pg2", "10.0.0.2", 5432, "replica")];
    h.src.send(SourceEvent::Keys(keys("pg1", &ms))).await.unwrap();
    view_where(&mut h.view, |v| v.primary().is_some()).await;
    assert_eq!(h.health.routing_paused_for(), None);
    let mut gone = keys("pg1", &ms);
    gone.remove("leader");
    h.src.send(SourceEvent::Keys(gone)).await.unwrap();
    view_where(&mut h.view, |v| v.primary().is_none()).await;
    assert!(h.health.routing_paused_for().is_some());
    tokio::time::advance(Duration::from_millis(1500)).await;
    let ms = [("pg1", "10.0.0.1", 5432, "replica"), ("pg2", "10.0.0.2", 5432, "master")];
    h.src.send(SourceEvent::Keys(keys("pg2", &ms))).await.unwrap();
    view_where(&mut h.view, |v| v.primary().is_some_and(|m| m.name == "pg2")).await;
    assert_eq!(h.health.routing_paused_for(), None);
    let ev = h.events.list(None);
    let kinds: Vec<EventKind> = ev.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EventKind::LeaderChange, EventKind::RoutingPaused, EventKind::LeaderChange, EventKind::EtcdUp],
        "{ev:#?}"
    );
    let change = &ev[0];
    assert_eq!((change.old.as_deref(), change.member.as_deref()), (Some("pg1"), Some("pg2")));
    assert_eq!(change.pause_ms, Some(1500));
    assert_eq!(change.detail, "pg1 → pg2, routing paused 1500 ms");
    assert_eq!(ev[1].detail, "pg1 takes no new connections (no leader); clients are held");
}

/// A reload that switches the source re-parses the keys already read: the new primary is
/// published at once, with no new read from etcd, and the view never goes empty.
#[tokio::test(start_paused = true)]
async fn source_switch_reparses_the_mirrored_keys() {
    let mut h = start(cluster_config(""), Arc::new(NoDns));
    let mut k = keys("pg1", &[("pg1", "10.0.0.1", 5432, "master"), ("pg2", "10.0.0.2", 5432, "replica")]);
    let node = |port: u16, role: &str, tl: u64| {
        format!(r#"{{"version":1,"conn_url":"postgres://10.0.0.9:{port}/postgres","state":"running","role":"{role}","timeline":{tl},"maintenance":false}}"#).into_bytes()
    };
    k.insert("nodes/a1".into(), node(6001, "primary", 2));
    k.insert("nodes/a2".into(), node(6002, "replica", 2));
    h.src.send(SourceEvent::Keys(k)).await.unwrap();
    let v = tokio::time::timeout(Duration::from_millis(100), view_where(&mut h.view, |v| v.primary().is_some()))
        .await
        .expect("published");
    assert_eq!(primary_at(&v), Some(("pg1".into(), addr("10.0.0.1:5432"))));
    let agent = cluster_config("source = \"agent\"");
    h.live.send_replace(agent);
    let v = tokio::time::timeout(
        Duration::from_millis(100),
        view_where(&mut h.view, |v| v.primary().is_some_and(|m| m.name == "a1")),
    )
    .await
    .expect("switched without a new read");
    assert_eq!(primary_at(&v), Some(("a1".into(), addr("10.0.0.9:6001"))));
    assert!(v.state.members.keys().all(|n| n.starts_with('a')), "{:?}", v.state.members.keys());
    // And back.
    h.live.send_replace(cluster_config(""));
    let v = tokio::time::timeout(
        Duration::from_millis(100),
        view_where(&mut h.view, |v| v.primary().is_some_and(|m| m.name == "pg1")),
    )
    .await
    .expect("switched back");
    assert_eq!(v.state.members.len(), 2);
}

fn agent_node(port: u16, role: &str, tl: u64) -> Vec<u8> {
    format!(r#"{{"version":1,"conn_url":"postgres://10.0.0.9:{port}/postgres","state":"running","role":"{role}","timeline":{tl},"maintenance":false}}"#).into_bytes()
}

fn agent_keys(nodes: &[(&str, u16, &str, u64)]) -> KeyMap {
    nodes.iter().map(|(n, port, role, tl)| (format!("nodes/{n}"), agent_node(*port, role, *tl))).collect()
}

/// Review item 1: a proxy whose fencing registration may have expired routes no primary
/// connection and keeps no primary session (pre-promote no longer waits for it), until it is
/// registered again and has read etcd; Patroni clusters keep the etcd-outage design.
#[tokio::test(start_paused = true)]
async fn a_lapsed_registration_fences_the_primary_role_until_registered_and_read_again() {
    let step = Duration::from_millis(100);
    let h = start(cluster_config("source = \"agent\""), Arc::new(NoDns));
    let mut view = h.view.clone();
    let k = agent_keys(&[("a1", 6001, "primary", 2), ("a2", 6002, "replica", 2)]);
    h.src.send(SourceEvent::Keys(k.clone())).await.unwrap();
    tokio::time::timeout(step, view_where(&mut view, |v| v.primary().is_some())).await.expect("routed");
    // Keep-alives answered: still routed well past the first TTL.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        h.registration.send_replace(Instant::now() + fence::registration_ttl());
    }
    assert_eq!(primary_at(&view.borrow()), Some(("a1".into(), addr("10.0.0.9:6001"))));
    // etcd unreachable: the direct check would keep a1 routed; the registration lapses.
    let registered = Instant::now() + fence::registration_ttl();
    h.registration.send_replace(registered);
    h.src.send(SourceEvent::Down(DiscoveryError::WatchEnded { reason: "test".into() })).await.unwrap();
    let v = tokio::time::timeout(fence::registration_ttl(), view_where(&mut view, |v| v.unregistered))
        .await
        .expect("fenced within the TTL");
    assert!(Instant::now() + fence::LAPSE_MARGIN <= registered + step, "fenced {:?} early", fence::LAPSE_MARGIN);
    assert_eq!(v.primary_status(), PrimaryStatus::Unregistered);
    assert!(v.targets(crate::config::Role::Primary, None).eligible.is_empty());
    assert!(v.targets(crate::config::Role::Primary, None).keep.is_empty(), "primary sessions closed");
    // Registered again while etcd is still unreadable: the keys may be stale, still fenced.
    h.registration.send_replace(Instant::now() + fence::registration_ttl());
    tokio::time::sleep(step).await;
    assert!(view.borrow().unregistered);
    // etcd read again: routed.
    h.src.send(SourceEvent::Keys(k.clone())).await.unwrap();
    tokio::time::timeout(step, view_where(&mut view, |v| !v.unregistered && v.primary().is_some()))
        .await
        .expect("routed again");

    // source = "patroni": an etcd outage keeps the direct-check design, no self-fence.
    let h = start(cluster_config(""), Arc::new(NoDns));
    let mut view = h.view.clone();
    h.src.send(SourceEvent::Keys(keys("pg1", &[("pg1", "10.0.0.1", 5432, "master")]))).await.unwrap();
    tokio::time::timeout(step, view_where(&mut view, |v| v.primary().is_some())).await.expect("routed");
    h.src.send(SourceEvent::Down(DiscoveryError::WatchEnded { reason: "test".into() })).await.unwrap();
    tokio::time::sleep(fence::registration_ttl() * 3).await;
    assert!(!view.borrow().unregistered);
    assert_eq!(view.borrow().primary_status(), PrimaryStatus::Routable);
}

/// Review item 11: a restarted task sets the shared split-brain and fence gauges from the view
/// it starts from, and does not count a split brain already counted.
#[tokio::test(start_paused = true)]
async fn a_restarted_task_does_not_leave_the_gauges_stuck() {
    let step = Duration::from_millis(100);
    let cfg = cluster_config("source = \"agent\"");
    let metrics = Metrics::new().cluster("t");
    let h = start_from(cfg.clone(), Arc::new(NoDns), metrics.clone(), None);
    let mut view = h.view.clone();
    let mut k = agent_keys(&[("a1", 6001, "primary", 2), ("a2", 6002, "primary", 2)]);
    k.insert("fence".into(), br#"{"id":"f1","new_primary":"a2","old_primary":"a1","requested_at_ms":1}"#.to_vec());
    h.src.send(SourceEvent::Keys(k.clone())).await.unwrap();
    let last = tokio::time::timeout(step, view_where(&mut view, |v| !v.state.split_brain.is_empty()))
        .await
        .expect("split brain seen");
    assert!(last.state.fence.is_some());
    assert_eq!((metrics.split_brain.get(), metrics.split_brains.get(), metrics.fence_active.get()), (1, 1, 1));
    drop(h);
    // Same scope: starts from the last view; the same split brain is not a new episode.
    let h = start_from(cfg.clone(), Arc::new(NoDns), metrics.clone(), Some(&last));
    h.src.send(SourceEvent::Keys(k)).await.unwrap();
    tokio::time::sleep(step).await;
    assert_eq!((h.metrics.split_brain.get(), h.metrics.split_brains.get(), h.metrics.fence_active.get()), (1, 1, 1));
    drop(h);
    // Scope change: an empty view, nothing in force.
    let _h = start_from(cfg, Arc::new(NoDns), metrics.clone(), Some(&ClusterView::default()));
    tokio::time::sleep(step).await;
    assert_eq!((metrics.split_brain.get(), metrics.split_brains.get(), metrics.fence_active.get()), (0, 1, 0));
}
