//! `pgfront agent`: the node agent beside each PostgreSQL. It probes the local server
//! (`probe`), publishes its facts to etcd under a lease (`publish`), answers Patroni-compatible
//! health checks (`health`), keeps the maintenance flag of `drain`/`resume` across restarts
//! (the state file), and fences proxies before a promotion (`fence`, `pgfront agent
//! pre-promote`).
//!
//! Tasks: one prober, one publisher, one HTTP server, all under one stop token; they share
//! only watch channels in [`Shared`] (latest probe, maintenance flag, etcd view), so no task
//! waits on another: an etcd outage never delays the probe or the health answers, and a hung
//! PostgreSQL never delays the lease keep-alive.
//!
//! Shutdown (SIGTERM, SIGINT): the publisher revokes its lease, so the node's key disappears
//! at once and proxies stop routing to it before the process exits.

pub mod fence;
pub(crate) mod health;
pub(crate) mod probe;
pub(crate) mod publish;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::agent::AgentConfig;
use probe::{Pace, Probe, Prober};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("health endpoint: cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("state file {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
}

/// What the publisher learnt from etcd, for the health answers.
#[derive(Debug, Clone, Default)]
pub(crate) struct EtcdView {
    pub up: bool,
    pub last_ok: Option<Instant>,
    pub primary_lsn: Option<u64>,
    /// `maintenance` in the last document written (None: nothing written yet).
    pub published_maintenance: Option<bool>,
}

/// The state the agent's tasks share (each field one writer).
pub(crate) struct Shared {
    pub cfg: Arc<AgentConfig>,
    /// The last probe (prober).
    pub probe: watch::Sender<Option<Arc<Probe>>>,
    /// When the last probe ended (prober), for `/liveness`.
    pub probe_done: watch::Sender<Option<Instant>>,
    /// `drain` / `resume` (health endpoint's control routes).
    pub maintenance: watch::Sender<bool>,
    /// The publisher's view of etcd.
    pub etcd: watch::Sender<EtcdView>,
    /// `GET /metrics` (the prober counts its probes; a scrape sets the rest).
    pub metrics: crate::metrics::AgentMetrics,
}

/// The persisted maintenance flag.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StateFile {
    maintenance: bool,
    changed_at_ms: u64,
}

/// Reads the maintenance flag: `false` when the file does not exist; `true` (fail-safe: no new
/// connection) with an error logged when it exists but cannot be read or parsed.
pub(crate) fn load_state(path: &Path) -> bool {
    match std::fs::read(path) {
        Ok(b) => match serde_json::from_slice::<StateFile>(&b) {
            Ok(s) => s.maintenance,
            Err(e) => {
                error!(path = %path.display(), error = %e, "state file unreadable: staying in maintenance (fail-safe); `pgfront agent resume` rewrites it");
                true
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            error!(path = %path.display(), error = %e, "state file unreadable: staying in maintenance (fail-safe)");
            true
        }
    }
}

/// Writes the flag atomically (temporary file, fsync, rename), creating the directory.
pub(crate) fn save_state(path: &Path, maintenance: bool) -> Result<(), AgentError> {
    use std::io::Write;
    let err = |source| AgentError::State { path: path.to_owned(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec(&StateFile { maintenance, changed_at_ms: probe::unix_ms() })
        .map_err(|e| err(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Runs the agent until `stop`; returns once the lease is revoked (or etcd did not answer) and
/// the tasks ended.
pub async fn run(cfg: AgentConfig, listener: TcpListener, stop: CancellationToken) -> Result<(), AgentError> {
    let cfg = Arc::new(cfg);
    let maintenance = load_state(&cfg.state_file);
    if maintenance {
        info!(state_file = %cfg.state_file.display(), "starting in maintenance (drained): `pgfront agent resume` to end it");
    }
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        probe: watch::Sender::new(None),
        probe_done: watch::Sender::new(None),
        maintenance: watch::Sender::new(maintenance),
        etcd: watch::Sender::new(EtcdView::default()),
        metrics: crate::metrics::AgentMetrics::new(),
    });
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(health::serve(listener, shared.clone(), stop.clone()));
    tracker.spawn(publish::run(shared.clone(), stop.clone()));
    tracker.spawn(probe_loop(shared.clone(), stop.clone()));
    tracker.close();
    crate::sysd::ready();
    tracker.wait().await;
    Ok(())
}

async fn probe_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let pg = &shared.cfg.postgres;
    let mut prober = Prober::new(pg.clone());
    let mut pace = Pace::new(pg.interval, pg.fast_interval);
    loop {
        let started = Instant::now();
        let p = tokio::select! {
            p = prober.probe() => p,
            _ = stop.cancelled() => return,
        };
        shared.metrics.probed(p.state == probe::NodeState::Running, started.elapsed());
        probe::log_transition(shared.probe.borrow().as_deref(), &p);
        let wait = pace.handle_probe(Instant::now(), &p);
        shared.probe.send_replace(Some(Arc::new(p)));
        shared.probe_done.send_replace(Some(Instant::now()));
        let next = started + wait;
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// `pgfront agent -c FILE`: binds the health endpoint, runs until SIGTERM/SIGINT.
pub fn main_run(path: &Path) -> ExitCode {
    let cfg = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r: Result<(), AgentError> = rt.block_on(async move {
        let listener = TcpListener::bind(cfg.api_listen)
            .await
            .map_err(|source| AgentError::Listen { addr: cfg.api_listen, source })?;
        let stop = CancellationToken::new();
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(AgentError::Signals)?;
        let mut int =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(AgentError::Signals)?;
        info!(node = %cfg.name, key = %cfg.node_key(), "pgfront agent starting");
        let s = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: revoking the lease and stopping"),
                _ = int.recv() => info!("SIGINT: revoking the lease and stopping"),
            }
            crate::sysd::stopping();
            s.cancel();
        });
        run(cfg, listener, stop).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `pgfront agent drain|resume -c FILE`: asks the running agent (over loopback) to set or clear
/// maintenance. Exit 0 once the agent has saved it (and says whether etcd has it yet), 1 if the
/// agent cannot be reached or refused.
pub fn main_maintenance(path: &Path, on: bool) -> ExitCode {
    let cfg = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("{}/{}", cfg.local_api(), if on { "drain" } else { "resume" });
    let timeout = cfg.etcd.etcd_timeout + Duration::from_secs(3);
    match rt.block_on(post(&url, timeout)) {
        Ok((200, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let what = if on { "drained (maintenance on)" } else { "resumed (maintenance off)" };
            if v["published"] == true {
                println!("{}: {what}; published to {}", cfg.name, v["key"].as_str().unwrap_or("etcd"));
            } else {
                println!(
                    "{}: {what}; saved in {}, NOT yet in etcd (unreachable?): the agent publishes it as soon as etcd answers",
                    cfg.name,
                    cfg.state_file.display()
                );
            }
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!("{url}: HTTP {code}: {}", String::from_utf8_lossy(&body).trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{url}: {e} (is `pgfront agent` running on this host with this configuration?)");
            ExitCode::FAILURE
        }
    }
}

async fn post(url: &str, timeout: Duration) -> Result<(u16, bytes::Bytes), String> {
    use http_body_util::{BodyExt, Empty};
    let uri: hyper::Uri = url.parse().map_err(|_| format!("bad URL {url:?}"))?;
    let client = crate::http::client();
    let req = hyper::Request::post(uri).body(Empty::new()).map_err(|e| e.to_string())?;
    let fut = async {
        let resp = client.request(req).await.map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        })?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

/// Whether `load_state` would warn: used by `config check` to report an unreadable state file.
pub fn state_file_problem(path: &Path) -> Option<String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice::<StateFile>(&b).err().map(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_round_trip_and_fail_safe() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.json");
        assert!(!load_state(&p));
        save_state(&p, true).unwrap();
        assert!(load_state(&p));
        save_state(&p, false).unwrap();
        assert!(!load_state(&p));
        std::fs::write(&p, b"{garbage").unwrap();
        assert!(load_state(&p), "an unreadable state file keeps the node drained");
        assert!(state_file_problem(&p).is_some());
    }
}
