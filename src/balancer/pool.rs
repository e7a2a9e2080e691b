//! The shell around `Selector` for one listener: waiters parked on oneshot channels, a RAII
//! `Lease` per connection that gives its slot back on drop, and a drain token per server that
//! closes the connections of a server that lost its role.
//!
//! The lock is a plain mutex held for a few hundred nanoseconds and never across an `.await`.
//! Topology changes are applied by the listener's own follower task as soon as they arrive
//! (`apply`), never lazily at accept time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::select::{Acquire, Selector, ServerState, WaiterId};
use prometheus_client::metrics::gauge::Gauge;

use crate::admin::metrics::{ListenerMetrics, ServerLabels};
use crate::config::ListenerConfig;
use crate::topology::{Backend, Targets};

/// Why a client could not be given a server in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No server could take it: no primary (or replica) was routable.
    NoServer,
    /// Servers were there but all at their maxconn for the whole queue timeout.
    Full,
    /// The listener is shutting down.
    Closed,
}

struct Inner {
    sel: Selector,
    waiters: HashMap<WaiterId, oneshot::Sender<Backend>>,
    servers: HashMap<Backend, ServerHandle>,
}

/// Per-server handles, made once when the server appears so that a connection's setup only
/// clones two `Arc`s.
#[derive(Clone)]
struct ServerHandle {
    drain: CancellationToken,
    active: Gauge,
}

pub struct Pool {
    pub name: Arc<str>,
    inner: Mutex<Inner>,
    generation: watch::Sender<u64>,
    metrics: ListenerMetrics,
}

/// One connection's claim on a server: the slot is given back when it is dropped.
pub struct Lease {
    pool: Arc<Pool>,
    pub backend: Backend,
    /// Cancelled when the server is drained.
    pub drain: CancellationToken,
    active: Gauge,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.active.dec();
        let mut g = self.pool.lock();
        g.sel.release(&self.backend);
        self.pool.dispatch(&mut g);
    }
}

/// Removes a queued waiter whose `acquire` was dropped (client gone, timeout).
struct WaitGuard<'a> {
    pool: &'a Pool,
    id: WaiterId,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.pool.lock();
        if g.sel.cancel(self.id) {
            g.waiters.remove(&self.id);
        }
        self.pool.metrics.queue.set(g.sel.queue_len() as i64);
    }
}

/// A point-in-time view of a pool for the status endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStatus {
    pub queued: usize,
    pub servers: Vec<ServerStatus>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    pub member: String,
    pub addr: std::net::SocketAddr,
    pub active: u32,
    pub state: ServerState,
}

impl Pool {
    pub fn new(cfg: &ListenerConfig, metrics: ListenerMetrics) -> Arc<Pool> {
        Arc::new(Pool {
            name: Arc::from(cfg.name.as_str()),
            inner: Mutex::new(Inner {
                sel: Selector::new(cfg.balance, cfg.server_maxconn),
                waiters: HashMap::new(),
                servers: HashMap::new(),
            }),
            generation: watch::channel(0).0,
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug in Selector; the state is still
        // consistent enough to keep serving, so recover instead of poisoning every connection.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies new targets, grants waiting clients, and drains servers that lost their role
    /// (their connections are closed after `grace`). Returns the drained servers.
    pub fn apply(&self, targets: &Targets, grace: Duration) -> Vec<Backend> {
        let mut g = self.lock();
        let update = g.sel.update(&targets.eligible, &targets.keep);
        for b in &update.drained {
            if let Some(ServerHandle { drain: token, .. }) = g.servers.remove(b) {
                if grace.is_zero() {
                    token.cancel();
                } else {
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        token.cancel();
                    });
                }
            }
        }
        let live: Vec<Backend> =
            g.sel.servers().iter().filter(|s| s.state != ServerState::Draining).map(|s| s.backend.clone()).collect();
        for b in live {
            if !g.servers.contains_key(&b) {
                let h = self.handle(&b);
                g.servers.insert(b, h);
            }
        }
        self.dispatch(&mut g);
        drop(g);
        self.generation.send_modify(|n| *n += 1);
        update.drained
    }

    /// Hands freed slots to queued clients, in order. A client that went away in the
    /// meantime gives its slot straight back.
    fn dispatch(&self, g: &mut Inner) {
        loop {
            let grants = g.sel.poll_grants();
            if grants.is_empty() {
                break;
            }
            for (id, b) in grants {
                let delivered = g.waiters.remove(&id).is_some_and(|tx| tx.send(b.clone()).is_ok());
                if !delivered {
                    g.sel.release(&b);
                }
            }
        }
        self.metrics.queue.set(g.sel.queue_len() as i64);
    }

    fn handle(&self, b: &Backend) -> ServerHandle {
        ServerHandle { drain: CancellationToken::new(), active: self.metrics.server_active(b) }
    }

    fn lease(self: &Arc<Self>, g: &mut Inner, backend: Backend) -> Lease {
        let h = match g.servers.get(&backend) {
            Some(h) => h.clone(),
            None => {
                let h = self.handle(&backend);
                g.servers.insert(backend.clone(), h.clone());
                h
            }
        };
        h.active.inc();
        Lease { pool: self.clone(), backend, drain: h.drain, active: h.active }
    }

    /// A server for a new connection, waiting in the queue until `deadline` if none has room.
    /// `avoid`: servers that just refused this client.
    pub async fn acquire(self: &Arc<Self>, avoid: &[Backend], deadline: Instant) -> Result<Lease, Refusal> {
        let (id, mut rx) = {
            let mut g = self.lock();
            match g.sel.acquire(avoid) {
                Acquire::Granted(b) => return Ok(self.lease(&mut g, b)),
                Acquire::Queued(id) => {
                    let (tx, rx) = oneshot::channel();
                    g.waiters.insert(id, tx);
                    self.metrics.queue.set(g.sel.queue_len() as i64);
                    (id, rx)
                }
            }
        };
        let guard = WaitGuard { pool: self, id };
        let started = Instant::now();
        let got = tokio::time::timeout_at(deadline, &mut rx).await;
        self.metrics.queue_wait.observe(started.elapsed().as_secs_f64());
        let backend = match got {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => return Err(Refusal::Closed),
            Err(_) => {
                // Granted just as the timeout fired? Then the slot is ours: use it.
                drop(guard);
                match rx.try_recv() {
                    Ok(b) => b,
                    Err(_) => {
                        return Err(if self.lock().sel.has_eligible() { Refusal::Full } else { Refusal::NoServer })
                    }
                }
            }
        };
        let mut g = self.lock();
        Ok(self.lease(&mut g, backend))
    }

    /// Whether another eligible server than those in `avoid` exists.
    pub fn has_alternative(&self, avoid: &[Backend]) -> bool {
        self.lock().sel.has_eligible_except(avoid)
    }

    /// Resolves when the pool's targets change (used by clients backing off after a refusal).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn status(&self) -> PoolStatus {
        let g = self.lock();
        PoolStatus {
            queued: g.sel.queue_len(),
            servers: g
                .sel
                .servers()
                .iter()
                .map(|s| ServerStatus {
                    member: s.backend.member.to_string(),
                    addr: s.backend.addr,
                    active: s.active,
                    state: s.state,
                })
                .collect(),
        }
    }

    pub fn metrics(&self) -> &ListenerMetrics {
        &self.metrics
    }
}

impl ServerLabels {
    pub fn of(listener: &str, b: &Backend) -> ServerLabels {
        ServerLabels { listener: listener.to_owned(), member: b.member.to_string(), addr: b.addr.to_string() }
    }
}
