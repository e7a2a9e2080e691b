//! Discovery: one task per cluster turns what etcd says into a `ClusterView` and publishes it
//! on a `watch` channel the moment it changes; listeners apply it in their own tasks.
//!
//! ```text
//! etcd3 / etcd2 source ──SourceEvent──► cluster task ──watch<Arc<ClusterView>>──► listener followers
//!                                        ▲ ▲ ▲  │ leader runs but is not seen as primary yet
//!                                        │ │ └── confirm (PostgreSQL / Patroni REST, every ~20 ms)
//!                                        │ └──── primary check (while etcd is unreachable)
//!                                        └────── DNS lookups (member host names, cached)
//! ```
//! The cluster task never waits on I/O between an event and its publication: promotion
//! checks, primary checks and DNS lookups run in their own tasks and report back.
//!
//! While etcd is unreachable the last keys stand only as far as a direct check of the routed
//! primary allows (see `topology`): without Patroni's `failsafe_mode`, Patroni demotes its
//! primary when it cannot reach etcd. The source reconnects with backoff (moving to the next
//! endpoint each time) and re-reads everything, so nothing is missed. The v3 source follows
//! the keys through two sessions on two members at once (`etcd3`): etcd is unreachable for
//! the cluster task only when neither has them.

pub(crate) mod agent_keys;
pub mod confirm;
pub(crate) mod dns;
pub mod etcd2;
pub mod etcd3;
pub(crate) mod fence;
pub mod keys;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{ClusterConfig, EtcdApi};
use crate::events::{EventKind, Events, NewEvent};
use crate::metrics::ClusterMetrics;
use crate::topology::{CheckResult, ClusterView, PrimaryStatus};
use dns::{DnsCache, HostPort, Outcome};
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
    /// etcd's history went back (etcd restored from a snapshot or re-created) or the watch
    /// was cancelled or compacted: not an outage, the source re-reads and watches again.
    #[error("etcd at {endpoint}: {reason}")]
    Resync { endpoint: String, reason: String },
}

/// What a source reports to its cluster task.
#[derive(Debug)]
pub enum SourceEvent {
    /// The full set of the cluster's keys, after any change.
    Keys(KeyMap),
    /// etcd could not be read; the last view stands.
    Down(DiscoveryError),
}

/// Patroni's default `ttl`, when its `config` key does not say.
const DEFAULT_PATRONI_TTL: Duration = Duration::from_secs(30);
const GRACE_MIN: Duration = Duration::from_secs(1);
const GRACE_MAX: Duration = Duration::from_secs(300);

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Runs a source's `session` again and again until `stop`: each failure is reported as
/// `down(error)` and followed by a backoff (100 ms doubling to 2 s, back to 100 ms after a session
/// that read the keys). `session(attempt)` returns its result and whether it read the keys;
/// `Ok` means the receiver of `tx` is gone.
pub(crate) async fn supervise<E, F, Fut>(
    tx: mpsc::Sender<E>,
    down: impl Fn(DiscoveryError) -> E,
    stop: CancellationToken,
    mut session: F,
) where
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
            Err(e @ DiscoveryError::Resync { .. }) => {
                info!(error = %e, "re-reading the cluster's keys and watching again");
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                if tx.send(down(e)).await.is_err() {
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
    /// Since when no primary has been routable (`None` while one is): the admin endpoint's
    /// "routing paused for". Written by the cluster task at each change only.
    pub routing_paused_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// The etcd endpoints whose sessions have the cluster's keys (v3; see `etcd3`).
    pub etcd_sessions: std::sync::Mutex<Vec<String>>,
}

impl ClusterHealth {
    /// How long primary routing has been paused, `None` while a primary is routable.
    pub fn routing_paused_for(&self) -> Option<Duration> {
        self.routing_paused_since.lock().ok().and_then(|s| s.map(|t| t.elapsed()))
    }

    fn set_routing_paused(&self, paused: bool) {
        if let Ok(mut s) = self.routing_paused_since.lock() {
            match (paused, s.is_some()) {
                (true, false) => *s = Some(std::time::Instant::now()),
                (false, true) => *s = None,
                _ => {}
            }
        }
    }
}

/// The handle the rest of the process keeps of a cluster.
#[derive(Clone)]
pub struct ClusterHandle {
    pub cfg: Arc<ClusterConfig>,
    /// Settings the running discovery applies live (today: `source`, see `config::diff`).
    pub(crate) live: watch::Sender<Arc<ClusterConfig>>,
    pub view: watch::Receiver<Arc<ClusterView>>,
    pub health: Arc<ClusterHealth>,
    /// Kept so that a replacing discovery (reload) publishes into the same channel.
    pub(crate) tx: watch::Sender<Arc<ClusterView>>,
    /// Until when this proxy's fencing registration surely holds in etcd, written by
    /// `fence::run` at each acknowledged keep-alive; the cluster task fences the primary role
    /// when it lapses (`source = "agent"`, see `ClusterTask::manage_registration`).
    pub(crate) registration: watch::Sender<Instant>,
}

/// Starts discovery of one cluster; stops when `stop` is cancelled.
///
/// `previous`: the handle of the discovery this one replaces (a reload changed the cluster's
/// endpoints, credentials or scope; the caller has stopped it). The new task publishes into
/// the same channel and starts from the last view published there, so listeners keep routing
/// on the last known topology until the new source has answered.
/// `events`: where leader changes, routing pauses and etcd outages are recorded.
pub fn spawn(
    cfg: Arc<ClusterConfig>,
    metrics: ClusterMetrics,
    events: Events,
    stop: CancellationToken,
    previous: Option<&ClusterHandle>,
) -> ClusterHandle {
    let (tx, rx, health) = match previous {
        Some(p) => (p.tx.clone(), p.view.clone(), p.health.clone()),
        None => {
            let (tx, rx) = watch::channel(Arc::new(ClusterView::default()));
            (tx, rx, Arc::new(ClusterHealth::default()))
        }
    };
    let (src_tx, src_rx) = mpsc::channel(64);
    match cfg.api {
        EtcdApi::V3 => tokio::spawn(etcd3::run(cfg.clone(), src_tx, health.clone(), stop.clone())),
        EtcdApi::V2 => tokio::spawn(etcd2::run(cfg.clone(), src_tx, stop.clone())),
    };
    let mut task =
        ClusterTask::new(cfg.clone(), tx.clone(), metrics, events, health.clone(), Arc::new(dns::SystemResolver));
    if previous.is_some() {
        let last = rx.borrow().clone();
        task.seed(&last);
    } else {
        // Nothing is routable before etcd has been read.
        health.set_routing_paused(true);
    }
    task.sync_gauges();
    let (live, live_rx) = watch::channel(cfg.clone());
    // A fresh start has one registration TTL to register before it counts as lapsed.
    let (registration, reg_rx) = watch::channel(Instant::now() + fence::registration_ttl());
    tokio::spawn(task.run(src_rx, live_rx, reg_rx, stop));
    ClusterHandle { cfg, live, view: rx, health, tx, registration }
}

impl ClusterHandle {
    /// Applies a change of `source` alone (`config::diff::source_only`) to the running
    /// discovery: it parses the keys it already mirrors by the new rules and publishes at once.
    /// No etcd session is restarted and the view never goes empty.
    pub(crate) fn switch_source(&mut self, cfg: Arc<ClusterConfig>) {
        self.live.send_replace(cfg.clone());
        self.cfg = cfg;
    }
}

struct ClusterTask {
    cfg: Arc<ClusterConfig>,
    tx: watch::Sender<Arc<ClusterView>>,
    metrics: ClusterMetrics,
    events: Events,
    health: Arc<ClusterHealth>,
    view: ClusterView,
    confirming: Option<(String, JoinHandle<()>)>,
    confirm_tx: mpsc::Sender<String>,
    /// The direct check of the primary while etcd is unreachable.
    checking: Option<(String, JoinHandle<()>)>,
    check_tx: mpsc::Sender<(String, CheckResult)>,
    /// The last verdict logged: (member, result).
    verdict: Option<(String, CheckResult)>,
    /// When the check's verdict stops outliving etcd's return (see `topology`).
    grace_until: Option<Instant>,
    key_errors: BTreeSet<String>,
    dns: DnsCache,
    resolver: Arc<dyn dns::Resolve>,
    lookups: JoinSet<(HostPort, Result<SocketAddr, String>)>,
    /// The member taking new primary connections, and since when routing has been paused.
    routed: Option<String>,
    paused_since: Option<(Instant, Option<String>)>,
    seen_keys: bool,
    /// The keys last read: re-parsed when the source changes.
    keys: KeyMap,
    /// The members of the split brain last logged (empty: none).
    split_brain: Vec<String>,
    /// The fencing request last logged.
    fence: Option<String>,
    /// Until when this proxy's fencing registration surely holds (from `fence::run`).
    registered_until: Instant,
}

impl ClusterTask {
    fn new(
        cfg: Arc<ClusterConfig>,
        tx: watch::Sender<Arc<ClusterView>>,
        metrics: ClusterMetrics,
        events: Events,
        health: Arc<ClusterHealth>,
        resolver: Arc<dyn dns::Resolve>,
    ) -> Self {
        ClusterTask {
            cfg,
            tx,
            metrics,
            events,
            health,
            view: ClusterView::default(),
            confirming: None,
            confirm_tx: mpsc::channel(1).0,
            checking: None,
            check_tx: mpsc::channel(1).0,
            verdict: None,
            grace_until: None,
            key_errors: BTreeSet::new(),
            dns: DnsCache::default(),
            resolver,
            lookups: JoinSet::new(),
            routed: None,
            paused_since: None,
            seen_keys: false,
            keys: KeyMap::new(),
            split_brain: Vec::new(),
            fence: None,
            registered_until: Instant::now() + fence::registration_ttl(),
        }
    }

    /// Starts from what the discovery this task replaces last published.
    fn seed(&mut self, last: &ClusterView) {
        self.view = last.clone();
        self.routed = last.primary().map(|m| m.name.clone());
        // A new scope starts from an empty view: paused from now, not routable.
        self.health.set_routing_paused(self.routed.is_none());
        self.seen_keys = true;
        // The split brain and fence in force are the ones already logged and counted (an
        // empty view after a scope change: none).
        self.split_brain = last.state.split_brain.clone();
        self.fence = last.state.fence.as_ref().map(|f| f.id.clone());
    }

    /// Sets the split-brain and fence gauges to what this task starts from: the gauges are
    /// shared with the task it replaces, which may have left them at 1.
    fn sync_gauges(&self) {
        self.metrics.split_brain.set(i64::from(!self.split_brain.is_empty()));
        self.metrics.fence_active.set(i64::from(self.fence.is_some()));
    }

    async fn run(
        mut self,
        mut src: mpsc::Receiver<SourceEvent>,
        mut live: watch::Receiver<Arc<ClusterConfig>>,
        mut registration: watch::Receiver<Instant>,
        stop: CancellationToken,
    ) {
        self.registered_until = *registration.borrow_and_update();
        let (confirm_tx, mut confirm_rx) = mpsc::channel(4);
        self.confirm_tx = confirm_tx;
        let (check_tx, mut check_rx) = mpsc::channel(4);
        self.check_tx = check_tx;
        loop {
            let dns_due = self.dns.poll_timeout();
            let grace = self.grace_until;
            let lapse = self.lapse_at();
            tokio::select! {
                ev = src.recv() => match ev {
                    Some(SourceEvent::Keys(keys)) => self.on_keys(keys),
                    Some(SourceEvent::Down(e)) => self.on_down(e),
                    None => break,
                },
                Some(name) = confirm_rx.recv() => {
                    if self.view.state.leader.as_deref() == Some(name.as_str()) {
                        debug!(cluster = %self.cfg.name, member = %name, "new leader confirmed primary by direct check");
                    }
                    self.view.handle_confirmed(&name);
                }
                Some((name, result)) = check_rx.recv() => self.view.handle_check(&name, result),
                Ok(()) = live.changed() => {
                    let cfg = live.borrow_and_update().clone();
                    self.on_source(cfg);
                }
                Some(done) = self.lookups.join_next(), if !self.lookups.is_empty() => {
                    // A lookup task neither panics nor is aborted before the task ends.
                    if let Ok((key, r)) = done {
                        self.on_lookup(key, r);
                    }
                }
                _ = tokio::time::sleep_until(dns_due.unwrap_or_else(Instant::now)), if dns_due.is_some() => {
                    let due = self.dns.poll_due(Instant::now());
                    self.start_lookups(due);
                }
                _ = tokio::time::sleep_until(grace.unwrap_or_else(Instant::now)), if grace.is_some() => {
                    self.grace_until = None;
                    self.view.handle_grace_over();
                }
                Ok(()) = registration.changed() => self.registered_until = *registration.borrow_and_update(),
                _ = tokio::time::sleep_until(lapse.unwrap_or_else(Instant::now)), if lapse.is_some() => {}
                _ = stop.cancelled() => break,
            }
            self.publish();
        }
        for (_, h) in self.confirming.take().into_iter().chain(self.checking.take()) {
            h.abort();
        }
    }

    fn on_keys(&mut self, keys: KeyMap) {
        if !self.health.etcd_up.swap(true, Ordering::Relaxed) {
            let detail = if self.seen_keys {
                info!(cluster = %self.cfg.name, "etcd reachable again; following Patroni's keys");
                "etcd reachable again; following Patroni's keys".to_owned()
            } else {
                info!(cluster = %self.cfg.name, prefix = %self.cfg.prefix(), keys = keys.len(), "read cluster from etcd");
                format!("read the cluster from etcd ({} keys under {})", keys.len(), self.cfg.prefix())
            };
            self.events.record(EventKind::EtcdUp, NewEvent::cluster(&self.cfg.name, detail));
            self.metrics.etcd_up.set(1);
        }
        self.seen_keys = true;
        self.keys = keys;
        self.parse_keys();
    }

    /// A reload switched the source: the keys already read are parsed by the new rules.
    fn on_source(&mut self, cfg: Arc<ClusterConfig>) {
        let (from, to) = (self.cfg.source, cfg.source);
        self.cfg = cfg;
        if from != to {
            info!(cluster = %self.cfg.name, ?from, ?to, keys = self.keys.len(), "source switched: roles now come from the {} keys", match to { crate::config::Source::Patroni => "Patroni", crate::config::Source::Agent => "agent" });
            self.key_errors.clear();
            if self.seen_keys {
                self.parse_keys();
            }
        }
    }

    fn parse_keys(&mut self) {
        let (state, errors) = keys::parse(self.cfg.source, &self.keys);
        let errors: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for e in errors.difference(&self.key_errors) {
            warn!(cluster = %self.cfg.name, "ignoring bad key: {e}");
            self.metrics.key_errors.inc();
        }
        self.key_errors = errors;
        self.view.handle_keys(state);
        // Addresses from the cache at once; lookups that are due run beside.
        let due = self.dns.handle_state(Instant::now(), &mut self.view.state);
        self.start_lookups(due);
    }

    fn on_down(&mut self, e: DiscoveryError) {
        self.metrics.etcd_errors.inc();
        let msg = e.to_string();
        let was_up = self.health.etcd_up.swap(false, Ordering::Relaxed);
        let first_error = !self.seen_keys && self.health.last_error.lock().is_ok_and(|l| l.is_none());
        if was_up || first_error {
            warn!(cluster = %self.cfg.name, error = %msg, "etcd unreachable; routing stays on the last known topology while a direct check finds the primary writable");
            self.events
                .record(EventKind::EtcdDown, NewEvent::cluster(&self.cfg.name, format!("etcd unreachable: {msg}")));
        } else {
            debug!(cluster = %self.cfg.name, error = %msg, "etcd still unreachable");
        }
        self.metrics.etcd_up.set(0);
        if let Ok(mut l) = self.health.last_error.lock() {
            *l = Some(msg);
        }
        self.view.handle_etcd_down();
    }

    /// Starts a lookup task per host; each reports to the cluster task when done.
    fn start_lookups(&mut self, due: Vec<HostPort>) {
        for key in due {
            let lookup = self.resolver.resolve(&key.0, key.1);
            self.lookups.spawn(async move {
                let r = match tokio::time::timeout(dns::DNS_TIMEOUT, lookup).await {
                    Ok(Ok(Some(a))) => Ok(a),
                    Ok(Ok(None)) => Err("no address".to_owned()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {:?}", dns::DNS_TIMEOUT)),
                };
                (key, r)
            });
        }
    }

    fn on_lookup(&mut self, key: HostPort, r: Result<SocketAddr, String>) {
        let (host, port) = (&key.0, key.1);
        let error = r.as_ref().err().cloned();
        match self.dns.handle_result(Instant::now(), &key, r.ok()) {
            Outcome::Unchanged => {}
            Outcome::Resolved(addr) => debug!(cluster = %self.cfg.name, %host, port, %addr, "member host resolved"),
            Outcome::Failed { kept } => warn!(
                cluster = %self.cfg.name, %host, port, error = error.as_deref().unwrap_or(""),
                kept = %kept.map_or("none".to_owned(), |a| a.to_string()),
                "cannot resolve member host; keeping its last address"
            ),
            Outcome::StillFailing => debug!(cluster = %self.cfg.name, %host, port, "member host still unresolved"),
        }
        self.dns.fill(&mut self.view.state);
    }

    /// Publishes the view if it changed, starts or stops the promotion and primary checks,
    /// logs routing changes.
    fn publish(&mut self) {
        self.manage_registration(Instant::now());
        self.manage_confirmation();
        self.manage_check();
        self.log_verdict();
        self.manage_grace();
        self.log_split_brain_and_fence();
        let view = &self.view;
        let status = view.primary_status();
        let routed = view.primary().map(|m| m.name.clone());
        self.metrics.primary_routable.set(i64::from(routed.is_some()));
        if routed != self.routed {
            let now = Instant::now();
            match (&self.routed, &routed) {
                (Some(old), None) => {
                    info!(cluster = %self.cfg.name, member = %old, reason = ?status, "primary takes no new connections; clients are held");
                    self.events.record(
                        EventKind::RoutingPaused,
                        NewEvent::cluster(
                            &self.cfg.name,
                            format!("{old} takes no new connections ({}); clients are held", status_text(status)),
                        )
                        .member(old),
                    );
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
                    let pause_ms = paused.as_millis() as u64;
                    let detail = match &was {
                        Some(was) if was == new => format!("{new} routed again after a pause of {pause_ms} ms"),
                        Some(was) => format!("{was} → {new}, routing paused {pause_ms} ms"),
                        None => format!("{new} routed (no primary before; paused {pause_ms} ms)"),
                    };
                    self.events.record(
                        EventKind::LeaderChange,
                        NewEvent {
                            old: was.clone(),
                            pause_ms: Some(pause_ms),
                            ..NewEvent::cluster(&self.cfg.name, detail)
                        }
                        .member(new),
                    );
                }
                (None, None) => {}
            }
            self.routed = routed;
            self.health.set_routing_paused(self.routed.is_none());
        } else if routed.is_none() && self.paused_since.is_none() && self.seen_keys && status != PrimaryStatus::Routable
        {
            self.paused_since = Some((Instant::now(), None));
        }
        if **self.tx.borrow() != self.view {
            self.tx.send_replace(Arc::new(self.view.clone()));
        }
    }

    /// When this proxy's registration lapses, if it is to fence itself then (`source = "agent"`
    /// and not fenced already).
    fn lapse_at(&self) -> Option<Instant> {
        (self.cfg.source == crate::config::Source::Agent && !self.view.unregistered)
            .then(|| self.registered_until.checked_sub(fence::LAPSE_MARGIN).unwrap_or(self.registered_until))
    }

    /// Fences the primary role while this proxy's fencing registration may have expired in
    /// etcd, `source = "agent"` only: `pgfront agent pre-promote` stops waiting for a proxy
    /// whose registration is gone, and under repmgr an old primary cut off from etcd stays
    /// writable, so the direct check would keep routing to it after a promotion elsewhere.
    /// (Under Patroni an old primary that lost the leader key demotes itself, which the direct
    /// check sees; fencing there would turn every etcd outage into a write outage, against
    /// `failsafe_mode`.) Lifted once registered again and etcd has been read (`etcd_down`
    /// false): the keys from before the outage may still name the old primary.
    fn manage_registration(&mut self, now: Instant) {
        let lapsed = self.lapse_at().is_some_and(|t| now >= t);
        if lapsed {
            error!(cluster = %self.cfg.name, "fencing registration lapsed (no keep-alive answered by etcd): a promotion may go ahead without this proxy; no primary connection and primary sessions closed until registered again");
            self.events.record(
                EventKind::RoutingPaused,
                NewEvent::cluster(&self.cfg.name, "fencing registration lapsed: the primary role is fenced"),
            );
            self.view.unregistered = true;
        } else if self.view.unregistered
            && !self.view.etcd_down
            && (self.cfg.source != crate::config::Source::Agent || now + fence::LAPSE_MARGIN < self.registered_until)
        {
            info!(cluster = %self.cfg.name, "registered again for fencing and etcd read: the primary role is routed by the keys again");
            self.view.unregistered = false;
        }
    }

    /// One line when a split brain begins or ends, and when a fencing request appears or goes.
    fn log_split_brain_and_fence(&mut self) {
        let cluster = &self.cfg.name;
        let now = &self.view.state.split_brain;
        if *now != self.split_brain {
            if now.is_empty() {
                info!(%cluster, was = %self.split_brain.join(","), "split brain over: one node claims primary at most");
                self.metrics.split_brain.set(0);
            } else {
                error!(%cluster, members = %now.join(","), "SPLIT BRAIN: several nodes claim primary on the highest timeline; no new connection goes to any of them and their sessions are closed");
                if self.split_brain.is_empty() {
                    self.metrics.split_brains.inc();
                }
                self.metrics.split_brain.set(1);
            }
            self.split_brain = now.clone();
        }
        let fence = self.view.state.fence.as_ref();
        if fence.map(|f| &f.id) != self.fence.as_ref() {
            match fence {
                Some(f) => {
                    warn!(%cluster, id = %f.id, new_primary = %f.new_primary, old_primary = f.old_primary.as_deref().unwrap_or("(all others)"), "fencing request: no new primary connection to the fenced nodes, their primary sessions are closed")
                }
                None => info!(%cluster, "fencing request gone: fence lifted"),
            }
            self.metrics.fence_active.set(i64::from(fence.is_some()));
            self.fence = fence.map(|f| f.id.clone());
        }
    }

    fn manage_confirmation(&mut self) {
        let want = self.view.awaiting_confirmation().cloned();
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

    fn manage_check(&mut self) {
        let want = self.view.check_target().cloned();
        let current = self.checking.as_ref().map(|(n, _)| n.as_str());
        if want.as_ref().map(|m| m.name.as_str()) == current {
            return;
        }
        if let Some((_, h)) = self.checking.take() {
            h.abort();
        }
        if let Some(m) = want {
            if !confirm::can_watch(&m, &self.cfg) {
                warn!(cluster = %self.cfg.name, member = %m.name, "cannot check the primary directly (no check_user and no Patroni api_url): routing stays on the last known topology");
            }
            let h = tokio::spawn(confirm::watch_primary(m.clone(), self.cfg.clone(), self.check_tx.clone()));
            self.checking = Some((m.name, h));
        }
    }

    /// Starts the grace period when etcd is back while a verdict of the direct check stands:
    /// one Patroni ttl, the longest a leader key can outlive its holder's last refresh.
    fn manage_grace(&mut self) {
        match (self.view.in_grace(), self.grace_until) {
            (true, None) => {
                let ttl =
                    self.view.state.ttl.map_or(DEFAULT_PATRONI_TTL, Duration::from_secs).clamp(GRACE_MIN, GRACE_MAX);
                if let Some(c) = &self.view.check {
                    info!(cluster = %self.cfg.name, member = %c.member, result = ?c.result, grace = ?ttl, "etcd reachable again; the direct check's verdict stands while etcd may still show keys from before the outage");
                }
                self.grace_until = Some(Instant::now() + ttl);
            }
            (false, Some(_)) => self.grace_until = None,
            _ => {}
        }
    }

    /// One log line, and a count, per change of what the direct check says of the primary.
    fn log_verdict(&mut self) {
        let now = self.view.check.as_ref().map(|c| (c.member.clone(), c.result));
        if now == self.verdict {
            return;
        }
        let before = self.verdict.as_ref().map(|(_, r)| *r);
        let cluster = &self.cfg.name;
        // The check runs while etcd is unreachable, and for a grace period after it is back.
        let etcd = if self.view.etcd_down { "unreachable" } else { "back" };
        match &now {
            Some((m, CheckResult::Pending)) => {
                info!(%cluster, member = %m, "etcd unreachable: checking the primary directly")
            }
            Some((m, CheckResult::Lost)) => {
                self.metrics.primary_check_lost.inc();
                self.events.record(
                    EventKind::PrimaryCheck,
                    NewEvent::cluster(
                        cluster,
                        format!("etcd {etcd}: the direct check of the primary has no connection"),
                    )
                    .member(m),
                );
                warn!(%cluster, member = %m, %etcd, "the primary check has no connection: no new connections to it until a check finds it writable");
            }
            Some((m, CheckResult::ReadOnly)) => {
                self.metrics.primary_read_only.inc();
                self.events.record(
                    EventKind::PrimaryCheck,
                    NewEvent::cluster(cluster, format!("etcd {etcd}: primary found read-only by direct check"))
                        .member(m),
                );
                warn!(%cluster, member = %m, %etcd, "primary found read-only by direct check (demoted when etcd was unreachable): no new connections, its sessions are closed");
            }
            Some((m, CheckResult::Writable)) => {
                if matches!(before, Some(CheckResult::Lost | CheckResult::ReadOnly)) {
                    info!(%cluster, member = %m, "primary found writable by direct check: routing resumes");
                    self.events.record(
                        EventKind::PrimaryCheck,
                        NewEvent::cluster(cluster, "primary found writable by direct check").member(m),
                    );
                } else {
                    debug!(%cluster, member = %m, "primary found writable by direct check");
                }
            }
            None => {
                if matches!(before, Some(CheckResult::Lost | CheckResult::ReadOnly)) {
                    info!(%cluster, "primary check ended: Patroni's keys decide again");
                } else {
                    debug!(%cluster, "primary check ended");
                }
            }
        }
        self.verdict = now;
    }
}

/// Why the primary is not routable, in words.
pub(crate) fn status_text(s: PrimaryStatus) -> &'static str {
    match s {
        PrimaryStatus::Routable => "routable",
        PrimaryStatus::NoLeader => "no leader",
        PrimaryStatus::LeaderUnknown => "leader without a member entry",
        PrimaryStatus::LeaderNotRunning => "leader not running",
        PrimaryStatus::Promoting => "new leader promoting",
        PrimaryStatus::SplitBrain => "split brain: several nodes claim primary",
        PrimaryStatus::Maintenance => "primary in maintenance",
        PrimaryStatus::Fenced => "primary fenced for a promotion elsewhere",
        PrimaryStatus::SwitchoverPending => "switchover pending",
        PrimaryStatus::Unregistered => "this proxy's fencing registration lapsed (etcd unreachable)",
        PrimaryStatus::Unconfirmed => "etcd unreachable, primary unconfirmed",
        PrimaryStatus::ReadOnly => "primary read-only",
    }
}

#[cfg(test)]
mod tests;
