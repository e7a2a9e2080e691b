//! The supervisor: the one place that binds sockets, spawns the long-lived tasks and owns
//! their channels, and handles signals.
//!
//! Start-up binds every listener before anything else runs, so a port that is taken fails the
//! start with a clear error instead of a half-working proxy. SIGTERM stops gracefully (stop
//! accepting, refuse queued clients, let open sessions finish for up to `SHUTDOWN_GRACE`);
//! SIGINT closes everything at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{self, metrics::Metrics};
use crate::balancer::pool::Pool;
use crate::config::{Config, ListenerConfig};
use crate::discovery::{self, ClusterHandle};
use crate::proxy::cancel::CancelMap;
use crate::proxy::listener;
use crate::proxy::session::SessionCtx;
use crate::topology::ClusterView;
use crate::vip;

/// How long open sessions may take to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("listener {listener}: cannot listen on {addr}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
    #[error("admin endpoint: cannot listen on {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: std::io::Error },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// What the admin endpoint reads.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub clusters: Vec<ClusterHandle>,
    pub listeners: Vec<(Arc<ListenerConfig>, Arc<Pool>)>,
    pub vips: Vec<vip::driver::SharedVipStatus>,
}

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), AppError> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        let sock = listener::bind(l.bind, l.backlog)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| AppError::Bind { listener: l.name.clone(), addr: l.bind, source })?;
        bound.push((l.clone(), sock));
    }
    let admin_sock = match config.admin {
        Some(addr) => Some(
            listener::bind(addr, 128)
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|source| AppError::AdminBind { addr, source })?,
        ),
        None => None,
    };
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;

    let stop = CancellationToken::new();
    let kill = CancellationToken::new();
    let tracker = TaskTracker::new();
    let vip_status: Vec<_> = config.vips.iter().map(|v| vip::driver::initial_status(v)).collect();
    let mut metrics = Metrics::new();
    metrics.register_vips(vip_status.clone());
    let metrics = Arc::new(metrics);

    let mut clusters = HashMap::new();
    for c in &config.clusters {
        clusters.insert(c.name.clone(), discovery::spawn(c.clone(), metrics.cluster(&c.name), stop.clone()));
    }
    let cancels = Arc::new(CancelMap::new(metrics.cancel_keys()));
    let fds = listener::fd_budget(&config.listeners);
    let mut pools = Vec::new();
    for (cfg, sock) in bound {
        let pool = Pool::new(&cfg, metrics.listener(&cfg.name));
        // Validation guarantees the cluster exists.
        let view = clusters[&cfg.cluster].view.clone();
        tokio::spawn(follow(cfg.clone(), pool.clone(), view, stop.clone()));
        let ctx = Arc::new(SessionCtx {
            cfg: cfg.clone(),
            pool: pool.clone(),
            cancels: cancels.clone(),
            stop: stop.clone(),
            kill: kill.clone(),
        });
        tokio::spawn(listener::run(sock, ctx, fds.clone(), stop.clone(), tracker.clone()));
        pools.push((cfg, pool));
    }
    // VIPs: each VRRP instance runs until `vip_stop`, which is cancelled first on the way
    // out so the backup takes over while this host still drains its sessions.
    let vip_stop = CancellationToken::new();
    let mut vip_tasks = Vec::new();
    let fitness = fitness(&config, &clusters);
    for (v, st) in config.vips.iter().zip(vip_status.iter().cloned()) {
        let (v, stop, fit) = (v.clone(), vip_stop.clone(), fitness.clone());
        let etcd = match &v.election {
            crate::config::Election::Etcd { cluster, .. } => {
                config.clusters.iter().find(|c| &c.name == cluster).cloned()
            }
            crate::config::Election::Vrrp => None,
        };
        vip_tasks.push(tokio::spawn(async move {
            let r = match etcd {
                Some(etcd) => vip::lease::run(v.clone(), etcd, st, fit, stop).await,
                None => vip::driver::run(v.clone(), st, fit, stop).await,
            };
            if let Err(e) = r {
                error!("{e}; this host will not hold {}", v.addr);
            }
        }));
    }
    let shared = Arc::new(Shared {
        metrics,
        clusters: config.clusters.iter().map(|c| clusters[&c.name].clone()).collect(),
        listeners: pools,
        vips: vip_status,
    });
    if let Some(sock) = admin_sock {
        tokio::spawn(admin::serve(sock, shared.clone(), stop.clone()));
    }
    info!(listeners = config.listeners.len(), clusters = config.clusters.len(), "pgfront proxy started");

    let graceful = loop {
        tokio::select! {
            _ = term.recv() => break true,
            _ = int.recv() => break false,
            _ = hup.recv() => {
                warn!("SIGHUP: live reload is not implemented in this version; the running configuration is unchanged (restart to apply changes)");
            }
        }
    };
    info!(graceful, open = tracker.len(), "stopping");
    vip_stop.cancel();
    for t in vip_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    stop.cancel();
    tracker.close();
    if graceful && tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        warn!(open = tracker.len(), "sessions still open after {SHUTDOWN_GRACE:?}: closing them");
    }
    kill.cancel();
    if tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await.is_err() {
        error!(open = tracker.len(), "sessions did not close");
    }
    info!("stopped");
    Ok(())
}

/// The proxy is fit to hold a VIP while every cluster behind a primary listener has etcd
/// reachable and a routable primary.
fn fitness(config: &Config, clusters: &HashMap<String, ClusterHandle>) -> vip::driver::Fitness {
    let watched: Vec<ClusterHandle> = config
        .listeners
        .iter()
        .filter(|l| l.role == crate::config::Role::Primary)
        .filter_map(|l| clusters.get(&l.cluster).cloned())
        .collect();
    Arc::new(move || {
        watched
            .iter()
            .all(|c| c.health.etcd_up.load(std::sync::atomic::Ordering::Relaxed) && c.view.borrow().primary().is_some())
    })
}

/// Applies every new view of the cluster to one listener's pool, as soon as it arrives.
async fn follow(
    cfg: Arc<ListenerConfig>,
    pool: Arc<Pool>,
    mut view: watch::Receiver<Arc<ClusterView>>,
    stop: CancellationToken,
) {
    loop {
        let v = view.borrow_and_update().clone();
        let targets = v.targets(cfg.role, cfg.max_replica_lag);
        for b in pool.apply(&targets, cfg.drain_grace) {
            info!(
                listener = %cfg.name, member = %b.member, addr = %b.addr, grace = ?cfg.drain_grace,
                "server lost its role: closing its connections"
            );
        }
        tokio::select! {
            r = view.changed() => if r.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}
