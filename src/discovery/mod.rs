//! Discovery: one task per cluster turns what etcd says into a `ClusterView` and publishes it
//! on a `watch` channel the moment it changes; listeners apply it in their own tasks.
//!
//! ```text
//! etcd3 / etcd2 source ──SourceEvent──► cluster task ──watch<Arc<ClusterView>>──► listener followers
//!                                          ▲   │ leader runs but is not seen as primary yet
//!                                          └── confirm (PostgreSQL / Patroni REST, every ~20 ms)
//! ```
//! While etcd is unreachable the last view stands; the source reconnects with backoff and
//! re-reads everything, so nothing is missed.

pub mod confirm;
pub(crate) mod dns;
pub mod etcd2;
pub mod etcd3;
pub mod http;
pub mod keys;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::metrics::ClusterMetrics;
use crate::config::{ClusterConfig, EtcdApi};
use crate::topology::{ClusterState, ClusterView, PrimaryStatus};
use keys::KeyMap;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd3 { endpoints: String, source: etcd_client::Error },
    #[error("etcd at {endpoints}: no answer within {timeout:?}")]
    Timeout { endpoints: String, timeout: Duration },
    #[error("etcd watch ended: {reason}")]
    WatchEnded { reason: String },
    #[error("etcd v2 at {endpoint}: {reason}")]
    Etcd2 { endpoint: String, reason: String },
}

/// What a source reports to its cluster task.
#[derive(Debug)]
pub enum SourceEvent {
    /// The full set of the cluster's keys, after any change.
    Keys(KeyMap),
    /// etcd could not be read; the last view stands.
    Down(DiscoveryError),
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Runs a source's `session` again and again until `stop`: each failure is reported as
/// `Down` and followed by a backoff (100 ms doubling to 2 s, back to 100 ms after a session
/// that read the keys). `session(attempt)` returns its result and whether it read the keys;
/// `Ok` means the cluster task is gone.
pub(crate) async fn supervise<F, Fut>(tx: mpsc::Sender<SourceEvent>, stop: CancellationToken, mut session: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = (Result<(), DiscoveryError>, bool)>,
{
    let mut backoff = BACKOFF_MIN;
    for attempt in 0.. {
        let (r, got_keys) = tokio::select! {
            r = session(attempt) => r,
            _ = stop.cancelled() => return,
        };
        match r {
            Ok(()) => return,
            Err(e) => {
                if tx.send(SourceEvent::Down(e)).await.is_err() {
                    return;
                }
            }
        }
        if got_keys {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Health of a cluster's discovery, shared with the admin endpoint.
#[derive(Debug, Default)]
pub struct ClusterHealth {
    pub etcd_up: AtomicBool,
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// The handle the rest of the process keeps of a cluster.
#[derive(Clone)]
pub struct ClusterHandle {
    pub cfg: Arc<ClusterConfig>,
    pub view: watch::Receiver<Arc<ClusterView>>,
    pub health: Arc<ClusterHealth>,
}

/// Starts discovery of one cluster; stops when `stop` is cancelled.
pub fn spawn(cfg: Arc<ClusterConfig>, metrics: ClusterMetrics, stop: CancellationToken) -> ClusterHandle {
    let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
    let health = Arc::new(ClusterHealth::default());
    let (src_tx, src_rx) = mpsc::channel(64);
    match cfg.api {
        EtcdApi::V3 => tokio::spawn(etcd3::run(cfg.clone(), src_tx, stop.clone())),
        EtcdApi::V2 => tokio::spawn(etcd2::run(cfg.clone(), src_tx, stop.clone())),
    };
    let task = ClusterTask::new(cfg.clone(), tx, metrics, health.clone(), Arc::new(dns::SystemResolver));
    tokio::spawn(task.run(src_rx, stop));
    ClusterHandle { cfg, view: rx, health }
}

struct ClusterTask {
    cfg: Arc<ClusterConfig>,
    tx: watch::Sender<Arc<ClusterView>>,
    metrics: ClusterMetrics,
    health: Arc<ClusterHealth>,
    state: ClusterState,
    confirmed: Option<String>,
    confirming: Option<(String, JoinHandle<()>)>,
    confirm_tx: mpsc::Sender<String>,
    key_errors: BTreeSet<String>,
    dns: HashMap<(String, u16), (SocketAddr, Instant)>,
    /// The member taking new primary connections, and since when routing has been paused.
    routed: Option<String>,
    paused_since: Option<(Instant, Option<String>)>,
    seen_keys: bool,
    resolver: Arc<dyn dns::Resolve>,
}

const DNS_TTL: Duration = Duration::from_secs(60);

impl ClusterTask {
    fn new(
        cfg: Arc<ClusterConfig>,
        tx: watch::Sender<Arc<ClusterView>>,
        metrics: ClusterMetrics,
        health: Arc<ClusterHealth>,
        resolver: Arc<dyn dns::Resolve>,
    ) -> Self {
        ClusterTask {
            cfg,
            tx,
            metrics,
            health,
            state: ClusterState::default(),
            confirmed: None,
            confirming: None,
            confirm_tx: mpsc::channel(1).0,
            key_errors: BTreeSet::new(),
            dns: HashMap::new(),
            routed: None,
            paused_since: None,
            seen_keys: false,
            resolver,
        }
    }

    async fn run(mut self, mut src: mpsc::Receiver<SourceEvent>, stop: CancellationToken) {
        let (confirm_tx, mut confirm_rx) = mpsc::channel(4);
        self.confirm_tx = confirm_tx;
        loop {
            tokio::select! {
                ev = src.recv() => match ev {
                    Some(SourceEvent::Keys(keys)) => self.on_keys(keys).await,
                    Some(SourceEvent::Down(e)) => self.on_down(e),
                    None => break,
                },
                Some(name) = confirm_rx.recv() => {
                    if self.state.leader.as_deref() == Some(name.as_str()) {
                        debug!(cluster = %self.cfg.name, member = %name, "new leader confirmed primary by direct check");
                        self.confirmed = Some(name);
                    }
                }
                _ = stop.cancelled() => break,
            }
            self.publish();
        }
        if let Some((_, h)) = self.confirming.take() {
            h.abort();
        }
    }

    async fn on_keys(&mut self, keys: KeyMap) {
        if !self.health.etcd_up.swap(true, Ordering::Relaxed) {
            if self.seen_keys {
                info!(cluster = %self.cfg.name, "etcd reachable again; following Patroni's keys");
            } else {
                info!(cluster = %self.cfg.name, prefix = %self.cfg.prefix(), keys = keys.len(), "read cluster from etcd");
            }
            self.metrics.etcd_up.set(1);
        }
        self.seen_keys = true;
        let (mut state, errors) = keys::parse_cluster(&keys);
        let errors: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for e in errors.difference(&self.key_errors) {
            warn!(cluster = %self.cfg.name, "ignoring bad key: {e}");
            self.metrics.key_errors.inc();
        }
        self.key_errors = errors;
        self.resolve(&mut state).await;
        if state.leader != self.state.leader {
            self.confirmed = None;
        }
        self.state = state;
    }

    fn on_down(&mut self, e: DiscoveryError) {
        self.metrics.etcd_errors.inc();
        let msg = e.to_string();
        let was_up = self.health.etcd_up.swap(false, Ordering::Relaxed);
        let first_error = !self.seen_keys && self.health.last_error.lock().is_ok_and(|l| l.is_none());
        if was_up || first_error {
            warn!(cluster = %self.cfg.name, error = %msg, "etcd unreachable; routing stays on the last known topology");
        } else {
            debug!(cluster = %self.cfg.name, error = %msg, "etcd still unreachable");
        }
        self.metrics.etcd_up.set(0);
        if let Ok(mut l) = self.health.last_error.lock() {
            *l = Some(msg);
        }
    }

    /// Fills in addresses of members whose conn_url names a host rather than an IP.
    async fn resolve(&mut self, state: &mut ClusterState) {
        for m in state.members.values_mut() {
            let (Some(host), Some(port), None) = (&m.host, m.port, m.addr) else { continue };
            let key = (host.clone(), port);
            if let Some((addr, at)) = self.dns.get(&key) {
                if at.elapsed() < DNS_TTL {
                    m.addr = Some(*addr);
                    continue;
                }
            }
            match tokio::time::timeout(Duration::from_secs(2), self.resolver.resolve(host, port)).await {
                Ok(Ok(addrs)) => {
                    if let Some(a) = addrs {
                        self.dns.insert(key, (a, Instant::now()));
                        m.addr = Some(a);
                    }
                }
                _ => {
                    warn!(cluster = %self.cfg.name, member = %m.name, %host, "cannot resolve member host");
                    m.addr = self.dns.get(&key).map(|(a, _)| *a);
                }
            }
        }
    }

    /// Publishes the view if it changed, starts or stops the promotion check, logs routing
    /// changes.
    fn publish(&mut self) {
        let view = ClusterView { state: self.state.clone(), confirmed: self.confirmed.clone() };
        self.manage_confirmation(&view);
        let status = view.primary_status();
        let routed = view.primary().map(|m| m.name.clone());
        self.metrics.primary_routable.set(i64::from(routed.is_some()));
        if routed != self.routed {
            let now = Instant::now();
            match (&self.routed, &routed) {
                (Some(old), None) => {
                    info!(cluster = %self.cfg.name, member = %old, reason = ?status, "primary takes no new connections; clients are held");
                    self.paused_since = Some((now, Some(old.clone())));
                }
                (old, Some(new)) => {
                    let (paused, was) = match self.paused_since.take() {
                        Some((t, was)) => (now - t, was),
                        None => (Duration::ZERO, old.clone()),
                    };
                    if was.is_some() || !paused.is_zero() {
                        self.metrics.leader_changes.inc();
                        self.metrics.routing_pause.observe(paused.as_secs_f64());
                    }
                    info!(
                        cluster = %self.cfg.name,
                        old = was.as_deref().unwrap_or("-"),
                        new = %new,
                        paused_ms = paused.as_millis() as u64,
                        "primary routed"
                    );
                }
                (None, None) => {}
            }
            self.routed = routed;
        } else if routed.is_none() && self.paused_since.is_none() && self.seen_keys && status != PrimaryStatus::Routable
        {
            self.paused_since = Some((Instant::now(), None));
        }
        if **self.tx.borrow() != view {
            self.tx.send_replace(Arc::new(view));
        }
    }

    fn manage_confirmation(&mut self, view: &ClusterView) {
        let want = view.awaiting_confirmation().cloned();
        let current = self.confirming.as_ref().map(|(n, _)| n.as_str());
        if want.as_ref().map(|m| m.name.as_str()) == current {
            return;
        }
        if let Some((_, h)) = self.confirming.take() {
            h.abort();
        }
        if let Some(m) = want {
            let h = tokio::spawn(confirm::run(m.clone(), self.cfg.clone(), self.confirm_tx.clone()));
            self.confirming = Some((m.name, h));
        }
    }
}

