//! The supervisor: the one place that spawns the long-lived tasks, owns their channels, and
//! applies a reload.
//!
//! The process is a set of named parts, each with its own cancellation token and join handle:
//! a **cluster** (its discovery task), a **listener** (socket, accept loop, pool, the follower
//! that applies the cluster's topology to the pool, and its sessions), a **VIP** (its election),
//! and the **admin** endpoint. Start-up and reload go through the same path: bind what is new,
//! then diff the configurations (`config::diff`, pure) and start, change or stop parts.
//!
//! Reload (SIGHUP, `Control::Reload`), atomically from a client's point of view:
//! - the file is read and validated on the side; an invalid one changes nothing (one `error!`
//!   line with `file:line: field: reason`, `pgfront_config_reloads_total{result="error"}`);
//! - every new listening address is bound before anything else changes: a bind that fails
//!   refuses the whole reload;
//! - sockets are keyed by address: a listener whose bind is unchanged keeps its socket (never
//!   closed, never re-bound), even if it was renamed; its settings apply to new connections, its
//!   sessions and its queue are untouched;
//! - a removed listener stops accepting, takes what is already in its kernel backlog, and its
//!   sessions finish on their own (closed after `[process] drain_timeout`); its pool keeps following the
//!   cluster meanwhile, so a demoted primary's sessions are still closed;
//! - a changed cluster restarts its discovery only; the new source starts from the last known
//!   topology, so routing never pauses for a reload.
//!
//! SIGTERM stops gracefully (VIPs released first, stop accepting, refuse queued clients, let
//! open sessions finish for up to `[process] shutdown_timeout`); SIGINT closes everything at once.
//!
//! Binary upgrade (SIGUSR2, `Control::Upgrade`): the process starts its own executable again and
//! hands it every listening socket and the VIP roles (`handover`). Both accept from the same
//! kernel queues until the new one says READY; then the old one tells systemd `MAINPID=`,
//! closes its copies of the sockets (nothing in a queue is lost: the new process holds them
//! too), gives its VIPs up without a priority-0 advert (the new process already advertises),
//! and lets its sessions finish within `drain_timeout` before it exits. Queued clients of the
//! old process are still placed: discovery keeps running there until the end. If the new
//! process fails to become ready within `upgrade_timeout`, the old one keeps serving and logs
//! why.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{self, ConfigStatus, Shared};
use crate::balancer::maintenance::{self, Maintenance};
use crate::balancer::pool::Pool;
use crate::config::diff::{self, ConfigDiff};
use crate::config::{ClusterConfig, Config, ListenerConfig, Role, VipConfig};
use crate::discovery::{self, ClusterHandle};
use crate::events::{EventKind, Events, NewEvent};
use crate::handover;
use crate::metrics::Metrics;
use crate::proxy::cancel::CancelMap;
use crate::proxy::listener;
use crate::proxy::session::SessionCtx;
use crate::proxy::workers::{self, Workers};
use crate::sysd;
use crate::topology::{Backend, ClusterView};
use crate::vip;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
    #[error("admin endpoint: cannot listen on {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: std::io::Error },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("upgrade: {0}")]
    Upgrade(String),
    #[error("cannot start the data path threads: {0}")]
    Threads(std::io::Error),
}

/// What the process is asked to do (by a signal, or by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the configuration file and apply the difference.
    Reload,
    /// Stop: gracefully (SIGTERM) or at once (SIGINT).
    Stop { graceful: bool },
    /// Start the executable again and hand it the sockets (SIGUSR2).
    Upgrade,
}

/// Listening sockets, bound (or inherited) before the supervisor starts so that a port in use
/// fails the start with a clear error. Keyed by address: that is what a reload keeps.
#[derive(Default)]
pub struct Sockets {
    listeners: HashMap<SocketAddr, std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    /// Set when this process is the new one of a binary upgrade: said once it serves.
    successor: Option<handover::Ready>,
    /// What the old process handed over besides the sockets (VIP roles).
    state: Vec<u8>,
}

/// Sockets this process did not bind itself: from systemd (socket activation) or, in a binary
/// upgrade, from the process it replaces.
#[derive(Default)]
pub struct InheritedSockets(Vec<handover::Inherited>);

impl InheritedSockets {
    /// systemd's `LISTEN_FDS` / `LISTEN_FDNAMES`, if they are meant for this process; the
    /// variables are removed.
    ///
    /// # Safety
    /// Changes the environment: call it before any other thread runs (before the runtime).
    pub unsafe fn from_systemd() -> Result<InheritedSockets, String> {
        // SAFETY: the caller runs this before any other thread exists.
        unsafe { handover::from_systemd() }.map(InheritedSockets).map_err(|e| e.to_string())
    }

    /// A listening socket bound to `addr`, taken out of the list.
    fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let i = self
            .0
            .iter()
            .position(|s| socket2::SockRef::from(&s.fd).local_addr().ok().and_then(|a| a.as_socket()) == Some(addr))?;
        let sock = std::net::TcpListener::from(self.0.remove(i).fd);
        // Inherited descriptors share their flags with the other process: both use O_NONBLOCK.
        sock.set_nonblocking(true).ok()?;
        Some(sock)
    }
}

impl Sockets {
    /// Binds every listener and the admin endpoint of `config`.
    pub fn bind(config: &Config) -> Result<Sockets, AppError> {
        Sockets::bind_or_inherit(config, InheritedSockets::default())
    }

    /// Takes the inherited socket of each address of `config`, binds the others.
    pub fn bind_or_inherit(config: &Config, mut inherited: InheritedSockets) -> Result<Sockets, AppError> {
        let mut s = Sockets::default();
        for l in &config.listeners {
            let sock = match inherited.take(l.bind) {
                Some(sock) => sock,
                None => listener::bind(l.bind, l.backlog).map_err(|source| AppError::Bind {
                    listener: l.name.clone(),
                    addr: l.bind,
                    source,
                })?,
            };
            s.listeners.insert(l.bind, sock);
        }
        if let Some(addr) = config.admin {
            s.admin = match inherited.take(addr) {
                Some(sock) => Some(sock),
                None => Some(listener::bind(addr, 128).map_err(|source| AppError::AdminBind { addr, source })?),
            };
        }
        for rest in &inherited.0 {
            warn!(name = %rest.name, "an inherited socket matches no listener of the configuration: closed");
        }
        Ok(s)
    }

    /// The address a listener socket is really bound to (port 0 resolved), for tests.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.values().filter_map(|l| l.local_addr().ok()).collect()
    }
}

/// Runs the proxy until SIGTERM or SIGINT; SIGHUP reloads `path`, SIGUSR2 upgrades the binary.
/// `inherited`: sockets from systemd. When started by an upgrade (`PGFRONT_HANDOVER` is set),
/// the old process's sockets are received first.
pub async fn run_with_signals(path: PathBuf, config: Config, mut inherited: InheritedSockets) -> Result<(), AppError> {
    let mut successor = None;
    let mut state = Vec::new();
    if let Some(from) = handover::handover_path_from_env() {
        match handover::receive(&from, config.process.upgrade_timeout).await {
            Ok((fds, st, ready)) => {
                info!(sockets = fds.len(), "upgrade: took over the old process's sockets");
                inherited.0.extend(fds);
                successor = Some(ready);
                state = st;
            }
            Err(e) => return Err(AppError::Upgrade(e.to_string())),
        }
    }
    let mut sockets = match Sockets::bind_or_inherit(&config, inherited) {
        Ok(s) => s,
        Err(e) => {
            // The old process keeps serving; tell it why this one cannot.
            if let Some(ready) = successor {
                let _ = ready.fail(&e.to_string()).await;
            }
            return Err(e);
        }
    };
    sockets.successor = successor;
    sockets.state = state;
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(AppError::Signal)?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = term.recv() => Control::Stop { graceful: true },
                _ = int.recv() => Control::Stop { graceful: false },
                _ = hup.recv() => Control::Reload,
                _ = usr2.recv() => Control::Upgrade,
            };
            if tx.send(c).await.is_err() {
                return;
            }
        }
    });
    run(path, config, sockets, rx).await
}

/// Runs the proxy with the sockets already bound, until `control` says stop (or is closed,
/// which stops gracefully). Tests drive the whole process in-process through this.
pub async fn run(
    path: PathBuf,
    config: Config,
    mut sockets: Sockets,
    mut control: mpsc::Receiver<Control>,
) -> Result<(), AppError> {
    let successor = sockets.successor.take();
    let threads = config.process.threads.unwrap_or_else(workers::default_threads);
    let workers = Workers::start(threads).map_err(AppError::Threads)?;
    info!(threads, "data path threads started");
    let mut sup = Supervisor::new(path, config.admin_auth.clone(), sockets.admin.map(|s| (config.admin, s)), workers);
    match vip::lifecycle::decode_handover_state(&sockets.state) {
        Ok(roles) => sup.takeover = roles,
        Err(e) => warn!("upgrade: the VIP roles handed over cannot be read ({e}): VIPs start as backup"),
    }
    match maintenance::from_handover_state(&sockets.state) {
        Ok(saved) => {
            for s in &saved {
                info!(cluster = %s.cluster, member = %s.member, kill = s.kill, "upgrade: member stays in maintenance");
            }
            sup.maintenance.restore(&saved);
        }
        Err(e) => error!("upgrade: the members in maintenance handed over cannot be read ({e}): none is drained"),
    }
    let mut pending = sockets.listeners;
    let mut bound: HashMap<SocketAddr, Arc<std::net::TcpListener>> = HashMap::new();
    for l in &config.listeners {
        let Some(sock) = pending.remove(&l.bind) else { continue };
        bound.insert(l.bind, Arc::new(sock));
    }
    let d = diff::diff(&Config::empty(), &config);
    let _ = sup.apply(config, d, bound);
    info!(
        listeners = sup.listeners.len(),
        clusters = sup.clusters.len(),
        vips = sup.vips.len(),
        "pgfront proxy started"
    );
    sysd::ready();
    sysd::status(&sup.summary());

    if let Some(ready) = successor {
        // The old process waits for this before it lets go of the sockets and the VIPs.
        if let Err(e) = ready.send().await {
            warn!("upgrade: cannot tell the old process this one is ready: {e}");
        }
    }

    let graceful = loop {
        match control.recv().await {
            Some(Control::Reload) => sup.reload().await,
            Some(Control::Upgrade) => {
                if sup.upgrade().await {
                    sup.retire_after_upgrade(&mut control).await;
                    return Ok(());
                }
            }
            Some(Control::Stop { graceful }) => break graceful,
            None => break true,
        }
    };
    sup.shutdown(graceful).await;
    Ok(())
}

/// A cluster's discovery.
struct ClusterPart {
    handle: ClusterHandle,
    stop: CancellationToken,
    /// The fencing registration task (etcd v3): waited for on shutdown, so that it revokes
    /// its registration before the process exits.
    fencing: Option<tokio::task::JoinHandle<()>>,
}

/// A listener: its socket (shared with any listener that takes it over in a reload; registered
/// with no runtime here, each data-path thread accepts from a duplicate of it), the
/// per-connection context new sessions take, its pool, and its tasks.
struct ListenerPart {
    cfg: Arc<ListenerConfig>,
    sock: Arc<std::net::TcpListener>,
    ctx: Arc<ArcSwap<SessionCtx>>,
    pool: Arc<Pool>,
    /// The listener's `maxconn`: a permit per open client connection, taken before `accept`.
    sem: Arc<Semaphore>,
    accept_stop: CancellationToken,
    /// Ends when the accept loops of every data-path thread have.
    accept: JoinHandle<()>,
    follow_stop: CancellationToken,
    /// Closes this listener's sessions (child of the process-wide kill).
    kill: CancellationToken,
    sessions: TaskTracker,
}

/// A VIP election.
struct VipPart {
    cfg: Arc<VipConfig>,
    /// Live settings (priority, interval, health ties …) go to the running instance.
    feed: watch::Sender<Arc<VipConfig>>,
    status: vip::driver::SharedVipStatus,
    stop: vip::lifecycle::VipStop,
    task: JoinHandle<()>,
}

struct Supervisor {
    path: PathBuf,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// The recent-events ring every part records into (served by the admin endpoint).
    events: Events,
    vip_statuses: Arc<Mutex<Vec<vip::driver::SharedVipStatus>>>,
    clusters: HashMap<String, ClusterPart>,
    listeners: HashMap<String, ListenerPart>,
    /// Removed listeners whose sessions are still finishing.
    retiring: Vec<(String, TaskTracker, JoinHandle<()>)>,
    /// The pools of those listeners, until their sessions have ended: a fence waits for them.
    retiring_pools: RetiringPools,
    vips: HashMap<String, VipPart>,
    /// Configured address, stop token, and a duplicate of its socket for a hand-over.
    admin: Option<(SocketAddr, CancellationToken, Option<std::os::fd::OwnedFd>)>,
    /// VIP roles handed over by the process this one replaces (binary upgrade); used by the
    /// first configuration only.
    takeover: Vec<vip::lifecycle::VipRole>,
    /// This executable, resolved at start-up (after a package upgrade, /proc/self/exe names
    /// the deleted old file).
    exe: Option<PathBuf>,
    shared: Arc<ArcSwap<Shared>>,
    config_status: ConfigStatus,
    /// Where sessions register their cancel keys (shared by every listener).
    cancels: Arc<CancelMap>,
    /// Members drained by an operator; outlives reloads, handed over by upgrades.
    maintenance: Arc<Maintenance>,
    /// The clusters `pgfront_server_state` reads at each scrape (refreshed by `publish`).
    cluster_list: Arc<Mutex<Vec<ClusterHandle>>>,
    /// The process's descriptor budget, a permit per session (`listener::fd_budget`).
    fds: Option<Arc<Semaphore>>,
    /// The data path's threads (`[process] threads`, read at start).
    workers: Workers,
    /// The process is stopping: queued clients are refused.
    stop: CancellationToken,
    /// Close every session now.
    kill: CancellationToken,
}

impl Supervisor {
    /// `admin`: the configured address and its socket, bound before start; `auth`: its access
    /// rules from the first configuration, in force from its first request (the rest of the
    /// configuration is published once applied); `workers`: the data path's threads, on which
    /// every listener accepts.
    fn new(
        path: PathBuf,
        auth: crate::config::AdminAuth,
        admin: Option<(Option<SocketAddr>, std::net::TcpListener)>,
        workers: Workers,
    ) -> Supervisor {
        let vip_statuses = Arc::new(Mutex::new(Vec::new()));
        let maintenance = Arc::new(Maintenance::default());
        let cluster_list: Arc<Mutex<Vec<ClusterHandle>>> = Arc::new(Mutex::new(Vec::new()));
        let mut metrics = Metrics::new();
        metrics.register_collector(vip::metrics::collector(vip_statuses.clone()));
        metrics.register_server_states(member_states(cluster_list.clone(), maintenance.clone()));
        let cancel_keys = metrics.cancel_keys();
        let metrics = Arc::new(metrics);
        let config_status = ConfigStatus {
            path: path.display().to_string(),
            revision: 1,
            loaded_at: unix_now(),
            last_reload: None,
            last_error: None,
        };
        let events = Events::default();
        let shared = Arc::new(ArcSwap::from_pointee(Shared {
            metrics: metrics.clone(),
            events: events.clone(),
            clusters: Vec::new(),
            listeners: Vec::new(),
            vips: Vec::new(),
            config: config_status.clone(),
            maintenance: maintenance.clone(),
            auth,
        }));
        let mut sup = Supervisor {
            path,
            config: Arc::new(Config::empty()),
            metrics,
            events,
            vip_statuses,
            clusters: HashMap::new(),
            listeners: HashMap::new(),
            retiring: Vec::new(),
            retiring_pools: RetiringPools::default(),
            vips: HashMap::new(),
            admin: None,
            exe: handover::startup_exe().ok(),
            takeover: Vec::new(),
            shared,
            config_status,
            cancels: Arc::new(CancelMap::new(cancel_keys)),
            maintenance,
            cluster_list,
            fds: None,
            workers,
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
        };
        if let Some((Some(addr), sock)) = admin {
            sup.start_admin(addr, sock);
        }
        sup
    }

    /// `addr`: the configured address (what a reload compares), `sock` bound to it.
    fn start_admin(&mut self, addr: SocketAddr, sock: std::net::TcpListener) {
        let dup = std::os::fd::AsFd::as_fd(&sock).try_clone_to_owned().ok();
        match TcpListener::from_std(sock) {
            Ok(sock) => {
                let stop = CancellationToken::new();
                tokio::spawn(admin::serve(sock, self.shared.clone(), stop.clone()));
                self.admin = Some((addr, stop, dup));
            }
            Err(e) => error!(%addr, error = %e, "admin endpoint: cannot register the socket"),
        }
    }

    /// One line for systemd's STATUS= and the log: what runs and where the primaries are.
    fn summary(&self) -> String {
        let mut primaries: Vec<String> = self
            .clusters
            .iter()
            .map(|(name, c)| {
                let p = c.handle.view.borrow().primary().map(|m| m.name.clone());
                format!("{name}: primary {}", p.as_deref().unwrap_or("none"))
            })
            .collect();
        primaries.sort();
        let masters =
            self.vips.values().filter(|v| v.status.lock().is_ok_and(|s| s.state == vip::fsm::State::Master)).count();
        let mut s = format!("{} listener(s), {}", self.listeners.len(), primaries.join(", "));
        if !self.vips.is_empty() {
            s.push_str(&format!(", VIP master {masters}/{}", self.vips.len()));
        }
        s
    }

    /// Re-reads the file and applies it; an invalid file or a failed bind changes nothing.
    async fn reload(&mut self) {
        sysd::reloading();
        let at = unix_now();
        let outcome = match Config::load(&self.path) {
            Err(e) => Err(e.to_string()),
            Ok(new) => {
                let d = diff::diff(&self.config, &new);
                match self.bind_new(&new) {
                    Err(e) => Err(e.to_string()),
                    Ok(bound) => {
                        let summary = d.summary();
                        // Done when every removed listener's socket is closed: after READY=1,
                        // nothing reaches an address the new configuration does not have.
                        for closed in self.apply(new, d, bound) {
                            let _ = closed.await;
                        }
                        Ok(summary)
                    }
                }
            }
        };
        self.config_status.last_reload = Some(at);
        match outcome {
            Ok(summary) => {
                self.config_status.revision += 1;
                self.config_status.loaded_at = at;
                self.config_status.last_error = None;
                self.metrics.config_reloads_ok.inc();
                info!(revision = self.config_status.revision, "configuration reloaded: {summary}");
                self.events.record(
                    EventKind::Reload,
                    NewEvent {
                        detail: format!("configuration reloaded (revision {}): {summary}", self.config_status.revision),
                        ..NewEvent::default()
                    },
                );
            }
            Err(e) => {
                self.config_status.last_error = Some(e.clone());
                self.metrics.config_reloads_error.inc();
                error!("configuration reload refused, the running configuration is unchanged: {e}");
                self.events.record(
                    EventKind::ReloadFailed,
                    NewEvent {
                        detail: format!("configuration reload refused, the running configuration is unchanged: {e}"),
                        ..NewEvent::default()
                    },
                );
            }
        }
        self.publish();
        sysd::ready();
        sysd::status(&self.summary());
    }

    /// Binds the addresses of `new` that no running listener holds yet: the only step of a
    /// reload that can fail, so it runs before anything changes.
    fn bind_new(&self, new: &Config) -> Result<HashMap<SocketAddr, Arc<std::net::TcpListener>>, AppError> {
        let mut bound = HashMap::new();
        for l in &new.listeners {
            if let Some(sock) = self.socket_for(l.bind) {
                bound.insert(l.bind, sock);
                continue;
            }
            let sock = listener::bind(l.bind, l.backlog).map_err(|source| AppError::Bind {
                listener: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            bound.insert(l.bind, Arc::new(sock));
        }
        if let Some(addr) = new.admin {
            if self.admin.as_ref().map(|a| a.0) != Some(addr) {
                // Checked here, bound for real in `apply` (a std socket cannot wait in `bound`).
                let probe = listener::bind(addr, 128).map_err(|source| AppError::AdminBind { addr, source })?;
                drop(probe);
            }
        }
        Ok(bound)
    }

    /// The socket of a running listener bound to `addr`, if any.
    fn socket_for(&self, addr: SocketAddr) -> Option<Arc<std::net::TcpListener>> {
        self.listeners.values().find(|p| p.cfg.bind == addr).map(|p| p.sock.clone())
    }

    /// Applies `d` (which turns the running configuration into `new`); every socket `new`
    /// needs is in `bound`.
    /// Returns, for each listener that stops accepting, a receiver that resolves once it has.
    fn apply(
        &mut self,
        new: Config,
        d: ConfigDiff,
        mut bound: HashMap<SocketAddr, Arc<std::net::TcpListener>>,
    ) -> Vec<oneshot::Receiver<()>> {
        let threads = self.workers.len();
        if self.fds.is_none() {
            // Once per process: the limit does not change with the configuration.
            self.fds = Some(listener::fd_budget(&new.listeners, threads));
        }
        let configured = new.process.threads.unwrap_or_else(workers::default_threads);
        if new.process.threads != self.config.process.threads && configured != threads {
            warn!(
                running = threads,
                configured, "process.threads changed: applied by the next restart or binary upgrade"
            );
        }
        // Clusters first: listeners that move follow the new ones.
        for c in &d.clusters.added {
            self.start_cluster(c.clone());
        }
        for (_, c) in &d.clusters.changed {
            self.restart_cluster(c.clone());
        }
        // A source switch alone: the running discovery re-parses what it mirrors (no restart).
        for (old, c) in &d.resourced {
            match self.clusters.get_mut(&c.name) {
                Some(part) => {
                    info!(cluster = %c.name, from = ?old.source, to = ?c.source, "cluster source switched live");
                    part.handle.switch_source(c.clone());
                }
                None => self.start_cluster(c.clone()),
            }
        }
        // Listeners whose settings changed in place keep their socket, pool and sessions.
        for (old, cfg) in &d.listeners.changed {
            self.reconfigure_listener(old, cfg.clone());
        }
        // Removed and rebound listeners stop accepting; their sessions finish on their own.
        let reused: Vec<SocketAddr> = new.listeners.iter().map(|l| l.bind).collect();
        let mut closing = Vec::new();
        for old in d.rebound.iter().map(|(o, _)| o).chain(&d.listeners.removed) {
            closing.extend(self.retire_listener(&old.name, reused.contains(&old.bind)));
        }
        for cfg in d.listeners.added.iter().chain(d.rebound.iter().map(|(_, n)| n)) {
            match bound.remove(&cfg.bind) {
                Some(sock) => self.start_listener(cfg.clone(), sock),
                None => error!(listener = %cfg.name, bind = %cfg.bind, "no socket was bound for this listener"),
            }
        }
        for c in &d.clusters.removed {
            if let Some(part) = self.clusters.remove(&c.name) {
                part.stop.cancel();
                info!(cluster = %c.name, "cluster removed: discovery stopped");
            }
            self.forget_maintenance(&c.name, "the cluster was removed");
        }
        // VIPs: removed ones are released (priority-0 advert, or the etcd key deleted); changed
        // ones keep their role unless the change needs a new election; added ones start as backup.
        for v in &d.vips.removed {
            let _ = self.stop_vip(&v.name);
        }
        // An etcd election restarts only when its etcd connection changed, not for a change of
        // scope, checks or intervals (a restart releases the VIP).
        let changed_clusters: Vec<&str> = d
            .clusters
            .changed
            .iter()
            .filter(|(o, n)| etcd_connection(o) != etcd_connection(n))
            .map(|(_, c)| c.name.as_str())
            .collect();
        for v in &new.vips {
            let changed = d.vips.changed.iter().find(|(_, n)| n.name == v.name).map(|(_, n)| n.clone());
            let etcd_changed = matches!(&v.election, crate::config::Election::Etcd { cluster, .. } if changed_clusters.contains(&cluster.as_str()));
            if changed.is_some() || etcd_changed {
                self.change_vip(v.clone(), &new, etcd_changed);
            }
        }
        for v in &d.vips.added {
            self.start_vip(v.clone(), &new);
        }
        self.takeover.clear();
        if let Some(addr) = d.admin.filter(|a| *a != self.admin.as_ref().map(|a| a.0)) {
            if let Some((_, stop, _)) = self.admin.take() {
                stop.cancel();
            }
            if let Some(addr) = addr {
                match listener::bind(addr, 128) {
                    Ok(sock) => self.start_admin(addr, sock),
                    Err(e) => error!(%addr, error = %e, "admin endpoint: cannot listen"),
                }
            }
        }
        self.config = Arc::new(new);
        self.publish();
        closing
    }

    /// Rebuilds what the admin endpoint reads.
    fn publish(&self) {
        let mut listeners: Vec<(Arc<ListenerConfig>, Arc<Pool>)> =
            self.listeners.values().map(|p| (p.cfg.clone(), p.pool.clone())).collect();
        let order = |name: &str| self.config.listeners.iter().position(|l| l.name == name);
        listeners.sort_by_key(|(c, _)| order(&c.name));
        let corder = |name: &str| self.config.clusters.iter().position(|c| c.name == name);
        let mut clusters: Vec<ClusterHandle> = self.clusters.values().map(|c| c.handle.clone()).collect();
        clusters.sort_by_key(|c| corder(&c.cfg.name));
        let vorder = |name: &str| self.config.vips.iter().position(|v| v.name == name);
        let mut vips: Vec<(Arc<VipConfig>, vip::driver::SharedVipStatus)> =
            self.vips.values().map(|v| (v.cfg.clone(), v.status.clone())).collect();
        vips.sort_by_key(|(c, _)| vorder(&c.name));
        let vips: Vec<_> = vips.into_iter().map(|(_, s)| s).collect();
        if let Ok(mut l) = self.vip_statuses.lock() {
            *l = vips.clone();
        }
        if let Ok(mut l) = self.cluster_list.lock() {
            *l = clusters.clone();
        }
        self.shared.store(Arc::new(Shared {
            metrics: self.metrics.clone(),
            events: self.events.clone(),
            clusters,
            listeners,
            vips,
            config: self.config_status.clone(),
            maintenance: self.maintenance.clone(),
            auth: self.config.admin_auth.clone(),
        }));
    }

    /// Members in maintenance of a cluster that is gone are not carried over (one line each).
    fn forget_maintenance(&self, cluster: &str, why: &str) {
        for member in self.maintenance.forget_cluster(cluster) {
            warn!(%cluster, %member, "member no longer in maintenance: {why}");
        }
    }

    fn start_cluster(&mut self, cfg: Arc<ClusterConfig>) {
        let stop = CancellationToken::new();
        let handle =
            discovery::spawn(cfg.clone(), self.metrics.cluster(&cfg.name), self.events.clone(), stop.clone(), None);
        let fencing = self.start_fencing(&handle, &stop);
        self.clusters.insert(cfg.name.clone(), ClusterPart { handle, stop, fencing });
    }

    /// etcd v3 clusters: registers this proxy under `<prefix>proxies/` and acknowledges fencing
    /// requests once the cluster's pools have applied them (`discovery::fence`). Stops with the
    /// cluster's discovery.
    fn start_fencing(&self, handle: &ClusterHandle, stop: &CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        if handle.cfg.api != crate::config::EtcdApi::V3 {
            return None;
        }
        let shared = self.shared.clone();
        let retiring = self.retiring_pools.clone();
        let name = handle.cfg.name.clone();
        let pools: discovery::fence::PoolsFn =
            Arc::new(move || fence_pools(&shared.load().listeners, &retiring, &name));
        let me = discovery::fence::ProxyInfo::this_process(self.config.admin.or(self.admin.as_ref().map(|a| a.0)));
        Some(tokio::spawn(discovery::fence::run(
            handle.cfg.clone(),
            me,
            handle.view.clone(),
            pools,
            self.metrics.cluster(&handle.cfg.name),
            handle.registration.clone(),
            stop.child_token(),
        )))
    }

    /// New endpoints, credentials or scope: a new discovery task that starts from the last
    /// known topology and publishes into the same channel, so listeners never see a gap.
    fn restart_cluster(&mut self, cfg: Arc<ClusterConfig>) {
        let Some(old) = self.clusters.remove(&cfg.name) else {
            return self.start_cluster(cfg);
        };
        old.stop.cancel();
        let stop = CancellationToken::new();
        let same_cluster = old.handle.cfg.prefix() == cfg.prefix();
        if !same_cluster {
            // Another Patroni cluster (scope or namespace changed): its last view would route to
            // the wrong database. Clients are held until the new one is read.
            old.handle.tx.send_replace(Arc::new(ClusterView::default()));
            self.forget_maintenance(&cfg.name, "the cluster follows another Patroni scope now");
        }
        let handle = discovery::spawn(
            cfg.clone(),
            self.metrics.cluster(&cfg.name),
            self.events.clone(),
            stop.clone(),
            Some(&old.handle),
        );
        let fencing = self.start_fencing(&handle, &stop);
        info!(cluster = %cfg.name, same_cluster, "cluster changed: discovery restarted (from the last known topology when the scope is the same)");
        self.clusters.insert(cfg.name.clone(), ClusterPart { handle, stop, fencing });
    }

    fn view(&self, cluster: &str) -> watch::Receiver<Arc<ClusterView>> {
        match self.clusters.get(cluster) {
            Some(c) => c.handle.view.clone(),
            // Validation guarantees the cluster exists; an empty view routes nothing.
            None => watch::channel(Arc::new(ClusterView::default())).1,
        }
    }

    fn start_listener(&mut self, cfg: Arc<ListenerConfig>, sock: Arc<std::net::TcpListener>) {
        let pool = Pool::new(&cfg, self.metrics.listener(&cfg.name));
        let kill = self.kill.child_token();
        let ctx = Arc::new(ArcSwap::from_pointee(SessionCtx {
            cfg: cfg.clone(),
            pool: pool.clone(),
            cancels: self.cancels.clone(),
            stop: self.stop.clone(),
            kill: kill.clone(),
            events: self.events.clone(),
        }));
        let threads = self.workers.len();
        let fds = self.fds.get_or_insert_with(|| listener::fd_budget(&[], threads)).clone();
        let sem = Arc::new(Semaphore::new(cfg.maxconn as usize));
        let follow_stop = CancellationToken::new();
        tokio::spawn(follow(
            cfg.clone(),
            pool.clone(),
            self.view(&cfg.cluster),
            self.events.clone(),
            self.maintenance.clone(),
            follow_stop.clone(),
        ));
        let accept_stop = CancellationToken::new();
        let sessions = TaskTracker::new();
        // An accept loop per data-path thread, each on its own duplicate of the socket (see
        // `proxy::workers`), registered with that thread's runtime.
        let loops = self.workers.spawn_each(|thread| {
            let dup = sock.try_clone();
            let (ctx, sem, fds, stop, sessions) =
                (ctx.clone(), sem.clone(), fds.clone(), accept_stop.clone(), sessions.clone());
            let name = cfg.name.clone();
            async move {
                let index = thread.index();
                match dup.and_then(TcpListener::from_std) {
                    Ok(l) => listener::run(Arc::new(l), ctx, sem, fds, stop, sessions, thread).await,
                    Err(e) => {
                        error!(listener = %name, thread = index, error = %e, "cannot accept on this data path thread")
                    }
                }
            }
        });
        let accept = tokio::spawn(async move {
            for l in loops {
                let _ = l.await;
            }
        });
        self.listeners.insert(
            cfg.name.clone(),
            ListenerPart { cfg, sock, ctx, pool, sem, accept_stop, accept, follow_stop, kill, sessions },
        );
    }

    /// Same socket, new settings: new connections get them; open sessions and queued clients
    /// keep their place.
    fn reconfigure_listener(&mut self, old: &ListenerConfig, cfg: Arc<ListenerConfig>) {
        let view = self.view(&cfg.cluster);
        let Some(p) = self.listeners.get_mut(&cfg.name) else { return };
        p.pool.reconfigure(&cfg);
        if cfg.maxconn > old.maxconn {
            p.sem.add_permits((cfg.maxconn - old.maxconn) as usize);
        } else if cfg.maxconn < old.maxconn {
            // Permits held by open connections are forgotten as they come back.
            let (sem, n) = (p.sem.clone(), old.maxconn - cfg.maxconn);
            tokio::spawn(async move {
                if let Ok(permits) = sem.acquire_many_owned(n).await {
                    permits.forget();
                }
            });
        }
        let routing_changed = (old.cluster.as_str(), old.role, old.max_replica_lag, old.drain_grace)
            != (cfg.cluster.as_str(), cfg.role, cfg.max_replica_lag, cfg.drain_grace);
        if routing_changed {
            p.follow_stop.cancel();
            p.follow_stop = CancellationToken::new();
            tokio::spawn(follow(
                cfg.clone(),
                p.pool.clone(),
                view,
                self.events.clone(),
                self.maintenance.clone(),
                p.follow_stop.clone(),
            ));
        }
        let ctx = p.ctx.load();
        p.ctx.store(Arc::new(SessionCtx {
            cfg: cfg.clone(),
            pool: ctx.pool.clone(),
            cancels: ctx.cancels.clone(),
            stop: ctx.stop.clone(),
            kill: ctx.kill.clone(),
            events: ctx.events.clone(),
        }));
        p.cfg = cfg;
    }

    /// Stops accepting on a listener; takes what waits in its backlog unless another listener
    /// keeps the socket; lets its sessions finish within `DRAIN_DEADLINE`.
    fn retire_listener(&mut self, name: &str, socket_kept: bool) -> Option<oneshot::Receiver<()>> {
        let p = self.listeners.remove(name)?;
        p.accept_stop.cancel();
        let (closed_tx, closed) = oneshot::channel();
        let name = name.to_owned();
        let entry = (name.clone(), p.sessions.clone());
        let deadline = self.config.process.drain_timeout;
        let retiring = self.retiring_pools.clone();
        retiring.push(p.cfg.clone(), p.pool.clone());
        let task = tokio::spawn(async move {
            let _ = p.accept.await;
            if !socket_kept {
                let taken = listener::drain_backlog(&p.sock, &p.ctx, &p.sessions);
                info!(listener = %name, taken, open = p.sessions.len(), "listener removed: stopped accepting");
            }
            drop(p.sock);
            let _ = closed_tx.send(());
            p.sessions.close();
            if tokio::time::timeout(deadline, p.sessions.wait()).await.is_err() {
                warn!(listener = %name, open = p.sessions.len(), "removed listener: closing sessions after {deadline:?}");
                p.kill.cancel();
                p.sessions.wait().await;
            }
            // Its sessions are over: nothing left for a fence to wait for.
            retiring.remove(&p.pool);
            p.follow_stop.cancel();
        });
        self.retiring.push((entry.0, entry.1, task));
        self.retiring.retain(|(_, _, t)| !t.is_finished());
        Some(closed)
    }

    fn start_vip(&mut self, v: Arc<VipConfig>, config: &Config) {
        self.start_vip_after(v, config, None)
    }

    /// Starts a VIP instance once `previous` (the instance it replaces) has finished.
    fn start_vip_after(&mut self, v: Arc<VipConfig>, config: &Config, previous: Option<JoinHandle<()>>) {
        let status = vip::driver::initial_status(&v);
        let stop = vip::lifecycle::VipStop::new();
        let fit = self.fitness();
        // After a binary upgrade: carry on the old process's role (a master stays master).
        let start = vip::lifecycle::Start::for_vip(&self.takeover, &v.name);
        let (feed, rx) = watch::channel(v.clone());
        let etcd = match &v.election {
            crate::config::Election::Etcd { cluster, .. } => {
                config.clusters.iter().find(|c| &c.name == cluster).cloned()
            }
            crate::config::Election::Vrrp => None,
        };
        let (cfg, st, s, ev) = (v.clone(), status.clone(), stop.clone(), self.events.clone());
        let task = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let r = match etcd {
                Some(etcd) => vip::lease::run_with(rx, etcd, st, fit, s, start, ev).await,
                None => vip::driver::run_with(rx, st, fit, s, start, ev).await,
            };
            if let Err(e) = r {
                error!("{e}; this host will not hold {}", cfg.addr);
            }
        });
        self.vips.insert(v.name.clone(), VipPart { cfg: v, feed, status, stop, task });
    }

    /// New settings for a running VIP: applied live when the election allows it, else the
    /// instance is released and started again.
    fn change_vip(&mut self, v: Arc<VipConfig>, config: &Config, etcd_changed: bool) {
        let restart = match self.vips.get_mut(&v.name) {
            Some(p) if !etcd_changed && !vip::lifecycle::needs_restart(&p.cfg, &v) => {
                let _ = p.feed.send(v.clone());
                p.cfg = v.clone();
                info!(vip = %v.name, "VIP settings applied live");
                false
            }
            _ => true,
        };
        if restart {
            // The new instance starts once the old one has released (or after 2 s): otherwise
            // the old one's late address removal could undo the new one's claim.
            let previous = self.stop_vip(&v.name);
            self.start_vip_after(v, config, previous);
        }
    }

    /// Releases a VIP; returns a handle that resolves once its instance has finished (2 s at
    /// most).
    fn stop_vip(&mut self, name: &str) -> Option<JoinHandle<()>> {
        let v = self.vips.remove(name)?;
        v.stop.release();
        info!(vip = %name, "VIP removed or changed: released");
        Some(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), v.task).await;
        }))
    }

    /// The proxy is fit to hold a VIP while every cluster behind a primary listener has etcd
    /// reachable and a routable primary. Reads the live parts, so it follows reloads.
    fn fitness(&self) -> vip::driver::Fitness {
        let shared = self.shared.clone();
        Arc::new(move || {
            let s = shared.load();
            s.listeners.iter().filter(|(l, _)| l.role == Role::Primary).all(|(l, _)| {
                s.clusters.iter().find(|c| c.cfg.name == l.cluster).is_some_and(|c| {
                    c.health.etcd_up.load(std::sync::atomic::Ordering::Relaxed) && c.view.borrow().primary().is_some()
                })
            })
        })
    }

    /// Starts the executable again and hands it the sockets; true once it said READY (then this
    /// process must retire), false if it failed (this process keeps serving; logged).
    async fn upgrade(&mut self) -> bool {
        let Some(exe) = self.exe.clone() else {
            error!(
                "upgrade refused: the executable's path could not be resolved at start-up; this process keeps serving"
            );
            return false;
        };
        let path = match std::env::var_os("RUNTIME_DIRECTORY") {
            Some(dir) => PathBuf::from(dir).join("handover.sock"),
            None => std::env::temp_dir().join(format!("pgfront-{}.handover", std::process::id())),
        };
        info!(exe = %exe.display(), handover = %path.display(), "upgrade: starting the new process");
        let result = async {
            let offer = handover::Offer::bind(&path).map_err(|e| e.to_string())?;
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            let mut child = handover::spawn_successor(&exe, &args, &path).map_err(|e| e.to_string())?;
            let names: Vec<(String, std::os::fd::BorrowedFd<'_>)> = self
                .listeners
                .values()
                .map(|p| (handover::listener_fd_name(&p.cfg.name), std::os::fd::AsFd::as_fd(&*p.sock)))
                .chain(self.admin.iter().filter_map(|(_, _, fd)| {
                    fd.as_ref().map(|fd| (handover::ADMIN_FD_NAME.to_owned(), std::os::fd::AsFd::as_fd(fd)))
                }))
                .collect();
            let sockets: Vec<(&str, std::os::fd::BorrowedFd<'_>)> =
                names.iter().map(|(n, fd)| (n.as_str(), *fd)).collect();
            let statuses: Vec<_> = self.vips.values().map(|v| v.status.clone()).collect();
            let state = vip::lifecycle::handover_state(&statuses);
            let state = maintenance::add_to_handover_state(state, self.maintenance.saved());
            let r = tokio::select! {
                r = offer.hand_over(&sockets, &state, self.config.process.upgrade_timeout) => r.map_err(|e| e.to_string()),
                w = child.wait() => Err(match w {
                    Ok(status) => format!("the new process exited before it was ready ({status})"),
                    Err(e) => format!("the new process: {e}"),
                }),
            };
            if r.is_err() {
                let _ = child.start_kill();
            }
            r
        }
        .await;
        match result {
            Ok(pid) => {
                sysd::mainpid(pid);
                info!(new_pid = pid, "upgrade: the new process is ready; this one stops accepting and drains");
                true
            }
            Err(e) => {
                error!("upgrade failed: {e}; this process keeps serving");
                // The successor may have tuned the shared listening sockets with its own
                // configuration before it failed.
                crate::proxy::listener::reapply_socket_options();
                false
            }
        }
    }

    /// After a successful upgrade: close this process's copies of the sockets (the new process
    /// holds them), let the VIPs go without a priority-0 advert (the new process advertises
    /// already), and let the sessions finish within `drain_timeout`.
    /// SIGTERM meanwhile shortens the wait to `shutdown_timeout`; SIGINT closes the sessions now.
    async fn retire_after_upgrade(mut self, control: &mut mpsc::Receiver<Control>) {
        // No priority-0 advert, the address and the etcd key stay: the new process carries on.
        let vips: Vec<VipPart> = self.vips.drain().map(|(_, v)| v).collect();
        for v in &vips {
            v.stop.hand_over();
        }
        for v in vips {
            let _ = tokio::time::timeout(Duration::from_secs(2), v.task).await;
        }
        let mut trackers: Vec<TaskTracker> = self.retiring.iter().map(|(_, t, _)| t.clone()).collect();
        let parts: Vec<ListenerPart> = self.listeners.drain().map(|(_, p)| p).collect();
        for p in parts {
            p.accept_stop.cancel();
            let _ = p.accept.await;
            // Dropped, never shut down: shutdown(2) would stop the socket for the new process too.
            drop(p.sock);
            p.sessions.close();
            trackers.push(p.sessions.clone());
            // The follower and the pool stay until the sessions end: a demoted primary's
            // sessions are still closed here.
            let follow_stop = p.follow_stop.clone();
            let sessions = p.sessions.clone();
            tokio::spawn(async move {
                sessions.wait().await;
                follow_stop.cancel();
            });
        }
        if let Some((_, stop, fd)) = self.admin.take() {
            stop.cancel();
            drop(fd);
        }
        let open: usize = trackers.iter().map(|t| t.len()).sum();
        let deadline = self.config.process.drain_timeout;
        info!(open, ?deadline, "upgrade: sockets handed over; waiting for this process's sessions to end");
        let mut until = tokio::time::Instant::now() + deadline;
        let mut listening = true;
        let finished = loop {
            let all = async {
                for t in &trackers {
                    t.wait().await;
                }
            };
            tokio::select! {
                r = tokio::time::timeout_at(until, all) => {
                    if r.is_err() {
                        let open: usize = trackers.iter().map(|t| t.len()).sum();
                        warn!(open, "upgrade: sessions still open after {deadline:?}: closing them");
                    }
                    break r.is_ok();
                }
                c = control.recv(), if listening => match c {
                    Some(Control::Stop { graceful: true }) => {
                        let sooner = tokio::time::Instant::now() + self.config.process.shutdown_timeout;
                        until = until.min(sooner);
                        info!("SIGTERM while draining after an upgrade: sessions get the shutdown timeout");
                    }
                    Some(Control::Stop { graceful: false }) => {
                        warn!("SIGINT while draining after an upgrade: closing the sessions");
                        break false;
                    }
                    // Reload and upgrade belong to the new process now.
                    Some(_) => warn!("this process has handed over to a new one: only SIGTERM and SIGINT apply"),
                    None => listening = false,
                },
            }
        };
        if !finished {
            self.kill.cancel();
            let all = async {
                for t in &trackers {
                    t.wait().await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), all).await;
        }
        for c in self.clusters.values() {
            c.stop.cancel();
        }
        info!("upgrade: old process done");
    }

    async fn shutdown(mut self, graceful: bool) {
        sysd::stopping();
        let open: usize = self.listeners.values().map(|p| p.sessions.len()).sum();
        info!(graceful, open, "stopping");
        // VIPs first, so the backup takes over while this host still drains its sessions.
        let vips: Vec<VipPart> = self.vips.drain().map(|(_, v)| v).collect();
        for v in &vips {
            v.stop.release();
        }
        for v in vips {
            let _ = tokio::time::timeout(Duration::from_secs(2), v.task).await;
        }
        self.stop.cancel();
        let mut trackers: Vec<TaskTracker> = self.retiring.iter().map(|(_, t, _)| t.clone()).collect();
        for p in self.listeners.values() {
            p.accept_stop.cancel();
        }
        // Every accept loop has ended (a client it accepted meanwhile is in its tracker) before
        // the trackers are closed.
        for p in self.listeners.values_mut() {
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut p.accept).await;
        }
        for p in self.listeners.values() {
            p.sessions.close();
            trackers.push(p.sessions.clone());
        }
        let all = async {
            for t in &trackers {
                t.wait().await;
            }
        };
        let grace = self.config.process.shutdown_timeout;
        if graceful && tokio::time::timeout(grace, all).await.is_err() {
            let open: usize = trackers.iter().map(|t| t.len()).sum();
            warn!(open, "sessions still open after {grace:?}: closing them");
        }
        self.kill.cancel();
        let all = async {
            for t in &trackers {
                t.wait().await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), all).await.is_err() {
            error!("sessions did not close");
        }
        for c in self.clusters.values() {
            c.stop.cancel();
        }
        // The fencing registrations are revoked (bounded by the revocation's own timeout).
        for c in self.clusters.values_mut() {
            if let Some(h) = c.fencing.take() {
                let _ = tokio::time::timeout(Duration::from_secs(3), h).await;
            }
        }
        if let Some((_, stop, _)) = &self.admin {
            stop.cancel();
        }
        info!("stopped");
    }
}

/// The pools of removed (or rebound) listeners whose sessions are still finishing. Their
/// followers still apply views to them, and a fence's acknowledgement must wait for their
/// sessions as for any other (`fence_pools`).
#[derive(Clone, Default)]
struct RetiringPools(Arc<Mutex<Vec<ListenerPool>>>);

/// A listener's settings and its pool.
type ListenerPool = (Arc<ListenerConfig>, Arc<Pool>);

impl RetiringPools {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ListenerPool>> {
        // Plain pushes and removals cannot leave it inconsistent: recover from a poisoned lock.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, cfg: Arc<ListenerConfig>, pool: Arc<Pool>) {
        self.lock().push((cfg, pool));
    }

    fn remove(&self, pool: &Arc<Pool>) {
        self.lock().retain(|(_, p)| !Arc::ptr_eq(p, pool));
    }
}

/// What a cluster's fencing task sees of its pools (`discovery::fence::PoolsFn`): those of the
/// running listeners of `cluster`, and those of its removed listeners whose sessions are still
/// open, so that no acknowledgement is written while one of them can still reach a fenced server.
fn fence_pools(
    listeners: &[ListenerPool],
    retiring: &RetiringPools,
    cluster: &str,
) -> Vec<(Role, Option<u64>, crate::balancer::pool::PoolStatus)> {
    let retiring = retiring.lock().clone();
    listeners
        .iter()
        .chain(&retiring)
        .filter(|(l, _)| l.cluster == cluster)
        .map(|(l, p)| (l.role, l.max_replica_lag, p.status()))
        .collect()
}

/// What an etcd client of a cluster connects with (`crate::etcd::connect`).
fn etcd_connection(c: &ClusterConfig) -> impl PartialEq + '_ {
    (&c.endpoints, c.api, &c.credentials, &c.tls, c.etcd_timeout)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The members' states for `pgfront_server_state`, read at each scrape.
fn member_states(clusters: Arc<Mutex<Vec<ClusterHandle>>>, maint: Arc<Maintenance>) -> crate::metrics::MemberStates {
    Arc::new(move || {
        let clusters = clusters.lock().map(|l| l.clone()).unwrap_or_default();
        let mut out = Vec::new();
        for c in &clusters {
            let view = c.view.borrow().clone();
            let drained = maint.cluster(&c.cfg.name);
            for m in view.state.members.values() {
                let state = maintenance::member_state(&view, m, drained.get(&m.name).copied());
                out.push(crate::metrics::MemberStateSample {
                    cluster: c.cfg.name.clone(),
                    member: m.name.clone(),
                    state: state.label(),
                });
            }
        }
        out
    })
}

/// Applies every new view of the cluster, and every change of the members in maintenance, to
/// one listener's pool, as soon as it arrives. Each drained server is recorded in `events`.
/// While a fence holds or a split brain is seen, servers lose their role without grace, and
/// the sessions of fenced servers and claimants that were already draining are closed too.
async fn follow(
    cfg: Arc<ListenerConfig>,
    pool: Arc<Pool>,
    mut view: watch::Receiver<Arc<ClusterView>>,
    events: Events,
    maint: Arc<Maintenance>,
    stop: CancellationToken,
) {
    let mut drained = maint.subscribe();
    loop {
        let v = view.borrow_and_update().clone();
        drained.borrow_and_update();
        let present = pool.backends();
        let (targets, maint_kill) =
            maintenance::targets(&v, cfg.role, cfg.max_replica_lag, &maint.cluster(&cfg.cluster), &present);
        // A fence closes at once: a promotion elsewhere waits for it. So does a split brain
        // (no claimant may keep taking writes) and a lapsed fencing registration (a promotion
        // may go ahead without this proxy). Servers they reach that were already draining from
        // an earlier change (with the full grace) are closed now too.
        let urgent = v.state.fence.is_some() || !v.state.split_brain.is_empty() || v.unregistered;
        let grace = if urgent { Duration::ZERO } else { cfg.drain_grace };
        let mut kill = maint_kill.clone();
        if urgent {
            let listed = |b: &Backend| targets.eligible.contains(b) || targets.keep.contains(b);
            // A fence is about the primary role: a replica listener's draining replicas keep their grace.
            let fenced = |b: &Backend| cfg.role != Role::Replica && v.fenced(&b.member);
            let unregistered = |b: &Backend| {
                cfg.role != Role::Replica && v.unregistered && v.state.leader.as_deref() == Some(&*b.member)
            };
            let cut = |b: &Backend| fenced(b) || unregistered(b) || v.state.split_brain.iter().any(|c| *c == *b.member);
            kill.extend(present.iter().filter(|b| cut(b) && !listed(b) && !maint_kill.contains(b)).cloned());
        }
        let closed = pool.apply_killing(&targets, grace, &kill);
        for b in kill.iter().filter(|b| !closed.contains(b) && !maint_kill.contains(b)) {
            let why = if v.fenced(&b.member) {
                "fenced"
            } else if v.unregistered {
                "fencing registration lapsed"
            } else {
                "split brain"
            };
            info!(listener = %cfg.name, member = %b.member, addr = %b.addr, "{why}: closing the connections of a server already draining now");
        }
        for b in closed {
            let when = if maint_kill.contains(&b) {
                info!(listener = %cfg.name, member = %b.member, addr = %b.addr, "member in maintenance (kill): closing its connections now");
                "now (maintenance with kill)".to_owned()
            } else {
                info!(
                    listener = %cfg.name, member = %b.member, addr = %b.addr, grace = ?grace,
                    "server lost its role: closing its connections"
                );
                if grace.is_zero() {
                    "now".to_owned()
                } else {
                    format!("after {grace:?}")
                }
            };
            events.record(
                EventKind::Drain,
                NewEvent {
                    cluster: Some(cfg.cluster.clone()),
                    ..NewEvent::listener(
                        &cfg.name,
                        format!("{} ({}) lost its role: its connections are closed {when}", b.member, b.addr),
                    )
                }
                .member(&b.member),
            );
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            r = drained.changed() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::select::ServerState;
    use crate::topology::tests::three;
    use crate::topology::{Fence, MemberRole};
    use tokio::time::Instant;

    const GRACE: Duration = Duration::from_secs(3600);

    fn listener(role: Role) -> Arc<ListenerConfig> {
        Arc::new(ListenerConfig {
            name: "l".to_owned(),
            cluster: "c".to_owned(),
            bind: ([127, 0, 0, 1], 0).into(),
            role,
            balance: crate::config::Balance::Leastconn,
            server_maxconn: 100,
            maxconn: 1000,
            queue_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
            tcp_keepalive: None,
            max_replica_lag: None,
            drain_grace: GRACE,
            backlog: 128,
        })
    }

    /// A follower of `view` for a listener of `role` (drain grace: an hour), and its pool.
    struct Followed {
        pool: Arc<Pool>,
        view: watch::Sender<Arc<ClusterView>>,
        maint: Arc<Maintenance>,
        _stop: tokio_util::sync::DropGuard,
    }

    fn followed(role: Role, first: ClusterView, maint: Arc<Maintenance>) -> Followed {
        let cfg = listener(role);
        let pool = Pool::new(&cfg, Metrics::new().listener("l"));
        let (tx, rx) = watch::channel(Arc::new(first));
        let stop = CancellationToken::new();
        tokio::spawn(follow(cfg, pool.clone(), rx, Events::default(), maint.clone(), stop.clone()));
        Followed { pool, view: tx, maint, _stop: stop.drop_guard() }
    }

    /// Lets the follower run until `cond` holds (a bounded number of turns; time is paused and
    /// never advanced by this loop, so no drain grace can run out meanwhile).
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never happened: {what}");
    }

    fn state(pool: &Pool, member: &str) -> Option<ServerState> {
        pool.status().servers.into_iter().find(|s| s.member == member).map(|s| s.state)
    }

    async fn lease(pool: &Arc<Pool>) -> crate::balancer::pool::Lease {
        let deadline = Instant::now() + Duration::from_millis(100);
        match pool.acquire(&[], deadline).await {
            Ok(l) => l,
            Err(r) => panic!("no server: {r:?}"),
        }
    }

    /// pg1 lost the leader key to pg2, which is not promoted yet: pg1 drains with its grace.
    fn switching() -> ClusterView {
        let mut v = three();
        v.state.leader = Some("pg2".into());
        v
    }

    #[tokio::test(start_paused = true)]
    async fn a_fence_closes_the_sessions_of_a_primary_already_draining() {
        let f = followed(Role::Primary, three(), Arc::default());
        until("pg1 routed", || state(&f.pool, "pg1") == Some(ServerState::Eligible)).await;
        let l = lease(&f.pool).await;
        let start = Instant::now();
        f.view.send_replace(Arc::new(switching()));
        until("pg1 draining", || state(&f.pool, "pg1") == Some(ServerState::Draining)).await;
        assert!(!l.drain.is_cancelled(), "closed before its grace without a fence");
        let mut fenced = switching();
        fenced.state.fence =
            Some(Fence { id: "f1".into(), new_primary: "pg2".into(), old_primary: Some("pg1".into()) });
        f.view.send_replace(Arc::new(fenced));
        until("the fence closes pg1's session", || l.drain.is_cancelled()).await;
        assert!(start.elapsed() < GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_split_brain_closes_the_claimants_sessions_at_once() {
        // Straight from a routed primary, and from a primary already draining (leader key gone).
        for draining_first in [false, true] {
            let f = followed(Role::Primary, three(), Arc::default());
            until("pg1 routed", || state(&f.pool, "pg1") == Some(ServerState::Eligible)).await;
            let l = lease(&f.pool).await;
            let start = Instant::now();
            if draining_first {
                let mut v = three();
                v.state.leader = None;
                f.view.send_replace(Arc::new(v));
                until("pg1 draining", || state(&f.pool, "pg1") == Some(ServerState::Draining)).await;
                assert!(!l.drain.is_cancelled(), "closed before its grace without a split brain");
            }
            let mut v = three();
            v.state.leader = None;
            v.state.members.get_mut("pg2").unwrap().role = MemberRole::Primary;
            v.state.split_brain = vec!["pg1".into(), "pg2".into()];
            f.view.send_replace(Arc::new(v));
            until("the split brain closes pg1's session", || l.drain.is_cancelled()).await;
            assert!(start.elapsed() < GRACE, "draining_first = {draining_first}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drain_kill_closes_the_sessions_of_a_member_already_draining() {
        let f = followed(Role::Replica, three(), Arc::default());
        until("replicas routed", || state(&f.pool, "pg2") == Some(ServerState::Eligible)).await;
        let l = lease(&f.pool).await;
        let member = l.backend.member.to_string();
        let start = Instant::now();
        // It stops: no longer a replica target, drained with the grace.
        let mut v = three();
        v.state.members.get_mut(&member).unwrap().state = "stopped".into();
        f.view.send_replace(Arc::new(v));
        until("draining", || state(&f.pool, &member) == Some(ServerState::Draining)).await;
        assert!(!l.drain.is_cancelled());
        f.maint.drain("c", &member, true, 1);
        until("drain --kill closes the session", || l.drain.is_cancelled()).await;
        assert!(start.elapsed() < GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_only_listener_takes_the_primary_when_every_replica_is_in_maintenance() {
        let maint = Arc::new(Maintenance::default());
        let f = followed(Role::ReadOnly, three(), maint.clone());
        until("replicas routed", || state(&f.pool, "pg2") == Some(ServerState::Eligible)).await;
        maint.drain("c", "pg2", false, 1);
        maint.drain("c", "pg3", false, 1);
        until("the primary routed", || state(&f.pool, "pg1") == Some(ServerState::Eligible)).await;
        assert_eq!(&*lease(&f.pool).await.backend.member, "pg1");
        // A replica back from maintenance takes the connections again.
        maint.resume("c", "pg3");
        until("pg3 routed", || state(&f.pool, "pg3") == Some(ServerState::Eligible)).await;
        assert_ne!(state(&f.pool, "pg1"), Some(ServerState::Eligible));
    }

    #[tokio::test(start_paused = true)]
    async fn the_fence_counts_the_pools_of_removed_listeners_until_their_sessions_end() {
        let cfg = listener(Role::Primary);
        let pool = Pool::new(&cfg, Metrics::new().listener("l"));
        pool.apply(&three().targets(Role::Primary, None), GRACE);
        let l = lease(&pool).await;
        let retiring = RetiringPools::default();
        retiring.push(cfg.clone(), pool.clone());
        let other = Arc::new(ListenerConfig { cluster: "other".into(), ..(*cfg).clone() });
        let running = vec![(other, Pool::new(&cfg, Metrics::new().listener("o")))];
        let seen = fence_pools(&running, &retiring, "c");
        assert_eq!(seen.len(), 1, "the removed listener's pool, not another cluster's");
        assert_eq!(seen[0].2.servers.iter().map(|s| s.active).sum::<u32>(), 1);
        let mut fenced = three();
        fenced.state.fence = Some(Fence { id: "f1".into(), new_primary: "pg2".into(), old_primary: None });
        assert!(discovery::fence::pending(&fenced, &seen) > 0, "its session still reaches pg1");
        drop(l);
        retiring.remove(&pool);
        assert!(fence_pools(&running, &retiring, "c").is_empty());
    }

    #[tokio::test]
    async fn the_admin_endpoint_enforces_the_token_from_its_first_request() {
        // The admin socket serves before the first configuration is applied: its access rules
        // must be those of that configuration already, not an open default.
        let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let addr = sock.local_addr().unwrap();
        let auth = crate::config::AdminAuth { token: Some(crate::config::Secret::new(SECRET)), require_token: true };
        let workers = Workers::start(1).unwrap();
        let _sup = Supervisor::new(PathBuf::from("/nonexistent.toml"), auth, Some((Some(addr), sock)), workers);
        let client = crate::http::client();
        let url = format!("http://{addr}/members/pg1/drain");
        let r = crate::http::post(&client, &url, None, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
        assert!(String::from_utf8_lossy(&r.body).contains("require_token"), "{}", String::from_utf8_lossy(&r.body));
    }

    const SECRET: &str = "admin-test-token-0123456789";

    fn cluster(extra: &str) -> Arc<ClusterConfig> {
        let text = format!(
            "[[cluster]]\nname = \"main\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n{extra}\n\
             [[listener]]\ncluster = \"main\"\nbind = \"127.0.0.1:5432\"\n"
        );
        Config::parse(std::path::Path::new("t.toml"), &text).unwrap().clusters[0].clone()
    }

    #[test]
    fn etcd_elections_restart_only_when_the_etcd_connection_changes() {
        let base = cluster("");
        // Checks, intervals and scope do not touch the election's etcd client.
        for other in ["check_user = \"postgres\"", "resync_interval = \"5s\"", "confirm_interval = \"50ms\""] {
            let c = cluster(other);
            assert_ne!(base, c);
            assert!(etcd_connection(&base) == etcd_connection(&c), "{other}");
        }
        let slower = cluster("etcd_timeout = \"5s\"");
        assert!(etcd_connection(&base) != etcd_connection(&slower));
        let moved = cluster("").as_ref().clone();
        let moved = ClusterConfig { endpoints: vec!["http://127.0.0.1:2380".into()], ..moved };
        assert!(etcd_connection(&base) != etcd_connection(&moved));
    }
}
