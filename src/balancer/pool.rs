//! The shell around `Selector` for one listener: queued clients parked on oneshot channels, a
//! RAII `Lease` per connection that gives its slot back on drop, and a drain token per server
//! that closes the connections of a server that lost its role.
//!
//! Who owns a slot (`Selector` counts it in `active` from the moment it is taken):
//! - a `Lease`, whose `Drop` gives it back; or
//! - between a grant to a queued client and that client's task running, a `Waiter::Granted`
//!   entry in the waiter table. It is created under the lock, in `dispatch`, and removed only
//!   by the `acquire` it belongs to: turned into a `Lease` when that task runs, or given back by
//!   its `WaitGuard` when the `acquire` future is dropped first (client gone, shutdown). A
//!   timeout settles under the same lock, so a grant that races it is used, never lost.
//!
//! So `active(s)` = leases on `s` + grants in transit to `s`, at all times, and a waiter entry
//! exists exactly as long as its `acquire` future.
//!
//! Drain: a server keeps one `ServerHandle` for as long as the selector lists it, Draining
//! included. Every slot carries the drain token its server had when the slot was granted, so a
//! drain reaches the grants in transit too, and a lease is never given a token that no drain
//! will cancel. A server that comes back from a drain gets a fresh token for new connections;
//! the ones opened before keep theirs, and a later drain (say with a shorter grace) reaches
//! them as well.
//!
//! The lock is a plain mutex held for a few hundred nanoseconds and never across an `.await`.
//! Nothing whose `Drop` takes the lock (a `Lease`) is ever dropped while it is held.
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

use crate::config::ListenerConfig;
use crate::metrics::{ListenerMetrics, ServerLabels, ServerMetrics};
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
    /// One entry per `acquire` that is waiting: still queued, or granted a slot it has not
    /// picked up yet.
    waiters: HashMap<WaiterId, Waiter>,
    /// One handle per server the selector lists.
    servers: HashMap<Backend, ServerHandle>,
    /// Sessions pgfront closed per member (`Lease::closed_by_pgfront`), kept after its servers
    /// leave the selector: a fenced primary is gone from it once its last session is closed.
    closed: HashMap<Arc<str>, u64>,
}

enum Waiter {
    /// In the selector's queue since the instant given; the sender wakes the client when it
    /// is granted.
    Queued(oneshot::Sender<()>, Instant),
    /// Granted, not picked up yet: this entry owns the slot.
    Granted(Grant),
}

/// A slot taken on a server, with the drain token the server had when it was taken.
struct Grant {
    backend: Backend,
    drain: CancellationToken,
    active: Gauge,
    server: Arc<ServerMetrics>,
}

/// Per-server handles, made once when the server appears so that a connection's setup only
/// clones two `Arc`s.
struct ServerHandle {
    /// Given to new slots on this server.
    drain: CancellationToken,
    active: Gauge,
    /// The server's byte counters and histograms.
    server: Arc<ServerMetrics>,
    /// `drain` is cancelled, or will be once the drain grace runs out.
    drained: bool,
    /// Tokens of connections opened before the server came back from a drain whose grace has
    /// not run out yet: a new drain must reach them too.
    older: Vec<CancellationToken>,
}

impl ServerHandle {
    fn new(metrics: &ListenerMetrics, b: &Backend) -> ServerHandle {
        ServerHandle {
            drain: CancellationToken::new(),
            active: metrics.server_active(b),
            server: metrics.server(b),
            drained: false,
            older: Vec::new(),
        }
    }

    /// Closes every connection on this server, now or at `at`.
    fn drain(&mut self, at: Option<Instant>) {
        self.drained = true;
        self.older.retain(|t| !t.is_cancelled());
        for token in self.older.iter().chain([&self.drain]) {
            match at {
                None => token.cancel(),
                Some(at) => {
                    let token = token.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep_until(at).await;
                        token.cancel();
                    });
                }
            }
        }
    }

    /// The server takes new connections again: they get a fresh token.
    fn revive(&mut self) {
        let old = std::mem::take(&mut self.drain);
        if !old.is_cancelled() {
            self.older.push(old);
        }
        self.older.retain(|t| !t.is_cancelled());
        self.drained = false;
    }
}

impl Inner {
    /// Takes the bookkeeping for a slot the selector just counted on `backend`.
    fn grant(&mut self, backend: Backend, metrics: &ListenerMetrics) -> Grant {
        // The selector only grants servers it lists, which all have a handle; be lenient anyway.
        let h = self.servers.entry(backend.clone()).or_insert_with(|| ServerHandle::new(metrics, &backend));
        h.active.inc();
        Grant { backend, drain: h.drain.clone(), active: h.active.clone(), server: h.server.clone() }
    }

    /// Gives back one slot on `backend`; forgets the server's handle once the selector has.
    fn release(&mut self, backend: &Backend, active: &Gauge) {
        active.dec();
        if self.sel.release(backend) {
            self.servers.remove(backend);
        }
    }

    /// Hands free slots to queued clients, in order. The grant is parked in the waiter table,
    /// owned there until the client's `acquire` takes it or gives it back.
    fn dispatch(&mut self, metrics: &ListenerMetrics) {
        loop {
            let grants = self.sel.poll_grants();
            if grants.is_empty() {
                break;
            }
            for (id, b) in grants {
                let grant = self.grant(b, metrics);
                match self.waiters.get_mut(&id) {
                    Some(w @ Waiter::Queued(..)) => {
                        if let Waiter::Queued(tx, _) = std::mem::replace(w, Waiter::Granted(grant)) {
                            // The receiver outlives the waiter's guard, so this does not fail;
                            // if it did, the entry still owns the slot and the guard frees it.
                            let _ = tx.send(());
                        }
                    }
                    // A queued id always has a `Queued` entry (both change under this lock).
                    _ => self.release(&grant.backend, &grant.active),
                }
            }
        }
        metrics.queue.set(self.sel.queue_len() as i64);
    }
}

/// One listener's pool of servers: the selector, the clients waiting for it and the drain
/// tokens of its servers. Shared by the listener's sessions and its follower task.
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
    /// Cancelled when the server is drained (after the drain grace), including for leases
    /// granted before the drain and picked up after it.
    pub drain: CancellationToken,
    active: Gauge,
    /// The server's metric handles (bytes, connect time, session duration).
    pub server: Arc<ServerMetrics>,
}

impl Lease {
    /// Counts this session as closed by pgfront (its server drained, killed or fenced), per
    /// server (`pgfront_server_closed_sessions_total`) and per member (`PoolStatus::closed`).
    pub fn closed_by_pgfront(&self) {
        self.server.closed.inc();
        *self.pool.lock().closed.entry(self.backend.member.clone()).or_insert(0) += 1;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut g = self.pool.lock();
        g.release(&self.backend, &self.active);
        g.dispatch(&self.pool.metrics);
    }
}

/// Settles a waiter whose `acquire` future was dropped (client gone, shutdown): takes it out
/// of the queue, or gives back the slot it was granted.
struct WaitGuard<'a> {
    pool: &'a Pool,
    id: WaiterId,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut g = self.pool.lock();
        match g.waiters.remove(&self.id) {
            Some(Waiter::Queued(..)) => {
                g.sel.cancel(self.id);
            }
            Some(Waiter::Granted(grant)) => {
                g.release(&grant.backend, &grant.active);
                g.dispatch(&self.pool.metrics);
            }
            None => {}
        }
        self.pool.metrics.queue.set(g.sel.queue_len() as i64);
    }
}

/// A point-in-time view of a pool for the status endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStatus {
    pub queued: usize,
    /// Seconds the oldest queued client has waited (0 when nobody waits).
    pub oldest_queued_wait_seconds: f64,
    pub servers: Vec<ServerStatus>,
    /// Sessions pgfront has closed per member since it started (drained, killed, fenced),
    /// members that left the pool included.
    #[serde(rename = "closed_sessions")]
    pub closed: std::collections::BTreeMap<String, u64>,
}

/// One server of a pool as the status endpoint shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    pub member: String,
    pub addr: std::net::SocketAddr,
    pub active: u32,
    pub state: ServerState,
}

impl Pool {
    /// An empty pool: servers arrive with the first `apply`.
    pub fn new(cfg: &ListenerConfig, metrics: ListenerMetrics) -> Arc<Pool> {
        Arc::new(Pool {
            name: Arc::from(cfg.name.as_str()),
            inner: Mutex::new(Inner {
                sel: Selector::new(cfg.balance, cfg.server_maxconn),
                waiters: HashMap::new(),
                servers: HashMap::new(),
                closed: HashMap::new(),
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

    /// Applies a reloaded listener's balance and per-server limit to new connections; queued
    /// clients keep their place and get the room a higher limit makes at once.
    pub fn reconfigure(&self, cfg: &ListenerConfig) {
        let mut g = self.lock();
        g.sel.reconfigure(cfg.balance, cfg.server_maxconn);
        g.dispatch(&self.metrics);
    }

    /// Applies new targets, grants waiting clients, and drains servers that lost their role
    /// (their connections are closed after `grace`). Returns the drained servers.
    pub fn apply(&self, targets: &Targets, grace: Duration) -> Vec<Backend> {
        self.apply_killing(targets, grace, &[])
    }

    /// `apply`, and the connections of the servers in `kill` (in neither list of `targets`:
    /// members an operator drained with `--kill`, fenced members, split-brain claimants) are
    /// closed now, without the grace, even if they were already draining.
    pub(crate) fn apply_killing(&self, targets: &Targets, grace: Duration, kill: &[Backend]) -> Vec<Backend> {
        let mut g = self.lock();
        let update = g.sel.update(&targets.eligible, &targets.keep);
        // The grace counts from now, not from when a timer task first runs.
        let at = (!grace.is_zero()).then(|| Instant::now() + grace);
        for b in &update.drained {
            if let Some(h) = g.servers.get_mut(b) {
                h.drain(if kill.contains(b) { None } else { at });
            }
        }
        for b in kill.iter().filter(|b| !update.drained.contains(b)) {
            if let Some(h) = g.servers.get_mut(b) {
                if h.older.iter().chain([&h.drain]).any(|t| !t.is_cancelled()) {
                    h.drain(None);
                }
            }
        }
        let Inner { sel, servers, .. } = &mut *g;
        // Handles live exactly as long as the selector lists their server.
        servers.retain(|b, _| sel.servers().iter().any(|s| &s.backend == b));
        for s in sel.servers() {
            match servers.get_mut(&s.backend) {
                Some(h) if h.drained && s.state == ServerState::Eligible => h.revive(),
                Some(_) => {}
                None => {
                    servers.insert(s.backend.clone(), ServerHandle::new(&self.metrics, &s.backend));
                }
            }
        }
        g.dispatch(&self.metrics);
        drop(g);
        self.generation.send_modify(|n| *n += 1);
        update.drained
    }

    fn lease(self: &Arc<Self>, grant: Grant) -> Lease {
        Lease {
            pool: self.clone(),
            backend: grant.backend,
            drain: grant.drain,
            active: grant.active,
            server: grant.server,
        }
    }

    /// A server for a new connection, waiting in the queue until `deadline` if none has room.
    /// `avoid`: servers that just refused this client.
    ///
    /// Cancel-safe: dropping the future at any point gives back whatever it holds (its place
    /// in the queue, or a slot granted to it and not yet picked up).
    pub async fn acquire(self: &Arc<Self>, avoid: &[Backend], deadline: Instant) -> Result<Lease, Refusal> {
        let (id, mut rx) = {
            let mut g = self.lock();
            match g.sel.acquire(avoid) {
                Acquire::Granted(b) => {
                    let grant = g.grant(b, &self.metrics);
                    return Ok(self.lease(grant));
                }
                Acquire::Queued(id) => {
                    let (tx, rx) = oneshot::channel();
                    g.waiters.insert(id, Waiter::Queued(tx, Instant::now()));
                    self.metrics.queue.set(g.sel.queue_len() as i64);
                    (id, rx)
                }
            }
        };
        // Declared after `rx`, so dropped before it: a grant is never left in a dead channel.
        let mut guard = WaitGuard { pool: self, id, armed: true };
        let started = Instant::now();
        let woken = tokio::time::timeout_at(deadline, &mut rx).await;
        self.metrics.queue_wait.observe(started.elapsed().as_secs_f64());
        // Woken, timed out or closed: settle under the lock, where no grant can slip in.
        let mut g = self.lock();
        guard.armed = false;
        match g.waiters.remove(&id) {
            // Also when granted just as the timeout fired: the slot is ours, use it.
            Some(Waiter::Granted(grant)) => Ok(self.lease(grant)),
            Some(Waiter::Queued(..)) => {
                g.sel.cancel(id);
                self.metrics.queue.set(g.sel.queue_len() as i64);
                Err(match woken {
                    Ok(_) => Refusal::Closed,
                    Err(_) if g.sel.has_eligible() => Refusal::Full,
                    Err(_) => Refusal::NoServer,
                })
            }
            None => Err(Refusal::Closed),
        }
    }

    /// The servers the pool lists now, draining ones included: what a `kill` may reach.
    pub(crate) fn backends(&self) -> Vec<Backend> {
        self.lock().sel.servers().iter().map(|s| s.backend.clone()).collect()
    }

    /// Whether another eligible server than those in `avoid` exists.
    pub fn has_alternative(&self, avoid: &[Backend]) -> bool {
        self.lock().sel.has_eligible_except(avoid)
    }

    /// Resolves when the pool's targets change (used by clients backing off after a refusal).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Queue length and per-server counts, read under the lock so they agree with each other.
    pub fn status(&self) -> PoolStatus {
        let g = self.lock();
        let oldest = match g.sel.oldest_waiter().and_then(|id| g.waiters.get(&id)) {
            Some(Waiter::Queued(_, since)) => since.elapsed().as_secs_f64(),
            _ => 0.0,
        };
        PoolStatus {
            queued: g.sel.queue_len(),
            oldest_queued_wait_seconds: oldest,
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
            closed: g.closed.iter().map(|(m, n)| (m.to_string(), *n)).collect(),
        }
    }

    /// The listener's metric handles, shared with its sessions.
    pub fn metrics(&self) -> &ListenerMetrics {
        &self.metrics
    }
}

impl ServerLabels {
    pub fn of(listener: &str, b: &Backend) -> ServerLabels {
        ServerLabels { listener: listener.to_owned(), member: b.member.to_string(), addr: b.addr.to_string() }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
