//! VIP election by an etcd lease, for sites without multicast or VRRP: the host that creates
//! the key `etcd_key` (with a lease of `lease_ttl`, kept alive every third of it) holds the VIP;
//! the others try to create it every 250 ms, so a dead holder is replaced about `lease_ttl`
//! after its last keep-alive. A lone surviving host can take the VIP.
//!
//! Documented behaviour when etcd is unreachable from the holder: it cannot prove it still owns
//! the key, so it removes the VIP itself once `lease_ttl - lease_ttl/4` has passed since the
//! last acknowledged keep-alive, before etcd can expire the lease and let another host take
//! it: there is a short gap, never two holders. A standby that cannot reach etcd never takes
//! the VIP. An unfit proxy (health ties, `health_weight > 0`) gives the key up.
//!
//! The key's value says who holds it: `host:pid:nonce`, made once per instance start (the
//! random nonce keeps two hosts apart even with equal host names and pids), and carried on by
//! the successors of an upgrade. An instance whose claim fails because the key exists with its
//! own value holds it already (the previous process handed it over, or an earlier session of
//! this one left it): it re-attaches the key to its current lease in one transaction, so etcd
//! stays the arbiter.
//!
//! Reload: health ties apply at once; a new `lease_ttl` at the next tick, by granting a lease
//! of the new TTL and moving the key to it (compare-and-put on our value) before revoking the
//! old one, so the VIP is held throughout. Upgrade: the new process keeps the old one's lease
//! alive and writes the same value, so it holds the same key; the old one, stopped with
//! `VipStop::hand_over`, neither deletes the key nor revokes the lease.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::driver::{role_to_take_over, Fitness, SharedVipStatus, VipAddress, VipError};
use super::fsm::State;
use super::health::Health;
use super::lifecycle::{self, ConfigFeed, LeaseRole, Start, StopMode, VipStop};
use crate::config::{ClusterConfig, Election, VipConfig};
use crate::events::{EventKind, Events, NewEvent};

const TICK: Duration = Duration::from_millis(250);

struct Holder {
    cfg: Arc<VipConfig>,
    key: String,
    /// The value that marks the key as ours.
    me: String,
    addr: VipAddress,
    status: SharedVipStatus,
    health: Health,
    /// The TTL of new leases (a reload may change it).
    ttl: Duration,
    /// The address is on the interface as handed over by the previous process, not yet
    /// confirmed by etcd: removed if the key turns out not to be ours.
    kept: bool,
    events: Events,
}

impl Holder {
    fn set_state(&self, to: State) -> bool {
        let Ok(mut s) = self.status.lock() else { return false };
        let changed = s.state != to;
        if changed {
            s.state = to;
            s.transitions += 1;
        }
        changed
    }

    fn set_lease(&self, lease: Option<LeaseRole>) {
        if let Ok(mut s) = self.status.lock() {
            s.lease = lease;
        }
    }

    async fn take(&mut self) {
        self.kept = false;
        self.addr.add().await;
        if self.set_state(State::Master) {
            info!(vip = %self.cfg.name, addr = %self.cfg.addr, "etcd lease election: this host holds the VIP");
            self.events.record(
                EventKind::Vip,
                NewEvent::vip(&self.cfg.name, format!("etcd lease: this host holds {} (master)", self.cfg.addr)),
            );
        }
        self.addr.announce();
    }

    async fn give_up(&mut self, why: &str) {
        self.kept = false;
        self.addr.remove().await;
        if self.set_state(State::Backup) {
            info!(vip = %self.cfg.name, addr = %self.cfg.addr, "etcd lease election: VIP released ({why})");
            self.events.record(
                EventKind::Vip,
                NewEvent::vip(&self.cfg.name, format!("etcd lease: {} released (backup): {why}", self.cfg.addr)),
            );
        }
    }

    /// Reload: applies `new` in place, unless it changes what needs a restart.
    fn reconfigure(&mut self, new: Arc<VipConfig>) {
        let Some(changed) = lifecycle::live_changes(&self.cfg, &new) else { return };
        self.cfg = new;
        self.addr.cfg = self.cfg.clone();
        self.health.set_thresholds(self.cfg.unhealthy_after, self.cfg.healthy_after);
        if let Election::Etcd { ttl, .. } = &self.cfg.election {
            self.ttl = *ttl;
        }
        if let Ok(mut s) = self.status.lock() {
            s.cfg = self.cfg.clone();
        }
        info!(vip = %self.cfg.name, ?changed, "etcd lease election: configuration applied in place");
    }
}

/// Runs one etcd-lease election from a fresh start until `stop`; see `run_with`.
pub async fn run(
    cfg: impl ConfigFeed,
    etcd: Arc<ClusterConfig>,
    status: SharedVipStatus,
    fitness: Fitness,
    stop: impl Into<VipStop>,
    events: Events,
) -> Result<(), VipError> {
    run_with(cfg, etcd, status, fitness, stop.into(), Start::Fresh, events).await
}

/// Runs one etcd-lease election until `stop`, following `cfg` (reload). With
/// `Start::TakeOver`, the lease and key of the previous process are carried on (upgrade).
/// The way `stop` is given (`release` or `hand_over`) says whether to release the VIP.
/// Each change of holder is recorded in `events`.
pub async fn run_with(
    cfg: impl ConfigFeed,
    etcd: Arc<ClusterConfig>,
    status: SharedVipStatus,
    fitness: Fitness,
    stop: VipStop,
    start: Start,
    events: Events,
) -> Result<(), VipError> {
    let mut feed = cfg.into_receiver();
    let cfg = feed.borrow_and_update().clone();
    let Election::Etcd { key, ttl, .. } = cfg.election.clone() else {
        return Err(VipError::Setup { name: cfg.name.clone(), reason: "not an etcd-elected VIP".into() });
    };
    let role = role_to_take_over(&cfg, start).await;
    let adopt = role.as_ref().and_then(|r| r.lease.clone().map(|l| (l, r.master)));
    let kept = adopt.as_ref().is_some_and(|(_, master)| *master);
    let addr = VipAddress::open(&cfg, status.clone(), kept).await?;
    let me = adopt.as_ref().map_or_else(identity, |(l, _)| l.value.clone());
    let health = Health::new(cfg.unhealthy_after, cfg.healthy_after);
    if let Ok(mut s) = status.lock() {
        s.cfg = cfg.clone();
    }
    let mut h = Holder { cfg: cfg.clone(), key: key.clone(), me, addr, status, health, ttl, kept, events };
    let mut feed = Some(feed);
    if !kept {
        h.set_state(State::Backup);
    }
    info!(vip = %cfg.name, addr = %cfg.addr, %key, ?ttl, id = %h.me, take_over = adopt.is_some(), "etcd lease election starting");
    let mut adopt = adopt.map(|(l, _)| l);
    let mut backoff = Duration::from_millis(100);
    loop {
        // The session handles `stop` itself: on release it deletes the key and revokes the
        // lease, so the other host takes over at once instead of after the lease expires.
        let r = session(&mut h, &mut feed, &etcd, adopt.take(), &fitness, &stop).await;
        if stop.is_stopped() {
            if stop.mode() == StopMode::Release {
                h.give_up("stopping").await;
            }
            info!(vip = %cfg.name, mode = ?stop.mode(), "etcd lease election stopped");
            return Ok(());
        }
        if let Err(e) = r {
            warn!(vip = %cfg.name, error = %e, "etcd lease election: etcd unreachable");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.stopped() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// `host:pid:nonce`, unique to this instance start.
fn identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's random source; each one differs.
    let nonce = std::collections::hash_map::RandomState::new().build_hasher().finish();
    format!("{}:{}:{:016x}", hostname(), std::process::id(), nonce)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into our buffer.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn secs(ttl: Duration) -> i64 {
    ttl.as_secs().max(1) as i64
}

/// Creates the key under `lease` if absent; if it exists with our value, re-attaches it to
/// `lease` (it was ours already). Returns whether we hold it.
async fn claim(client: &mut etcd_client::Client, key: &str, me: &str, lease: i64) -> Result<bool, String> {
    let put = || TxnOp::put(key, me, Some(PutOptions::new().with_lease(lease)));
    let create = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([put()])
        .or_else([TxnOp::get(key, None)]);
    let r = client.txn(create).await.map_err(|e| e.to_string())?;
    if r.succeeded() {
        return Ok(true);
    }
    let ours = r.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().iter().find(|kv| kv.value() == me.as_bytes()).map(|kv| kv.lease()),
        _ => None,
    });
    match ours {
        None => return Ok(false),
        Some(l) if l == lease => return Ok(true),
        Some(_) => {}
    }
    let reattach = Txn::new().when([Compare::value(key, CompareOp::Equal, me)]).and_then([put()]);
    Ok(client.txn(reattach).await.map_err(|e| e.to_string())?.succeeded())
}

/// The next config from the supervisor; never, once the feed is closed.
async fn changed(feed: &mut Option<watch::Receiver<Arc<VipConfig>>>) -> Result<(), watch::error::RecvError> {
    match feed {
        Some(f) => f.changed().await,
        None => std::future::pending().await,
    }
}

async fn session(
    h: &mut Holder,
    feed: &mut Option<watch::Receiver<Arc<VipConfig>>>,
    etcd: &ClusterConfig,
    adopt: Option<LeaseRole>,
    fitness: &Fitness,
    stop: &VipStop,
) -> Result<(), String> {
    let r = session_inner(h, feed, etcd, adopt, fitness, stop).await;
    if r.is_err() && h.kept {
        // Could not confirm the handed-over key: do not keep an address etcd may give away.
        h.give_up("the handed-over key could not be confirmed").await;
    }
    r
}

async fn session_inner(
    h: &mut Holder,
    feed: &mut Option<watch::Receiver<Arc<VipConfig>>>,
    etcd: &ClusterConfig,
    adopt: Option<LeaseRole>,
    fitness: &Fitness,
    stop: &VipStop,
) -> Result<(), String> {
    let mut client = crate::etcd::connect(etcd, &etcd.endpoints).await.map_err(|e| e.to_string())?;
    // The lease handed over by the previous process if it still lives, else a new one.
    let adopted = match adopt {
        Some(l) => match client.lease_keep_alive(l.id).await {
            Ok(k) => {
                info!(vip = %h.cfg.name, lease = l.id, "etcd lease election: carrying on the previous process's lease");
                Some((l.id, l.ttl(), k))
            }
            Err(e) => {
                warn!(vip = %h.cfg.name, lease = l.id, error = %e, "etcd lease election: the handed-over lease is gone");
                None
            }
        },
        None => None,
    };
    // An adopted lease is never revoked by this process: the previous one may still rely on
    // it (until it stops); once the key has moved, the lease expires on its own.
    let mut lease_is_ours = adopted.is_none();
    let (mut lease, mut lease_ttl, (mut keeper, mut acks)) = match adopted {
        Some(a) => a,
        None => {
            let ttl = h.ttl;
            let id = client.lease_grant(secs(ttl), None).await.map_err(|e| e.to_string())?.id();
            (id, ttl, client.lease_keep_alive(id).await.map_err(|e| e.to_string())?)
        }
    };
    h.set_lease(Some(LeaseRole {
        id: lease,
        ttl_ms: lease_ttl.as_millis() as u64,
        key: h.key.clone(),
        value: h.me.clone(),
    }));
    let mut last_ack = Instant::now();
    let mut next_keepalive = Instant::now() + lease_ttl / 3;
    let mut holding = false;
    let mut tick = tokio::time::interval(TICK);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= last_ack + lease_ttl - lease_ttl / 4 {
                    break Err(format!("no keep-alive acknowledged for {:?}", now - last_ack));
                }
                if h.ttl != lease_ttl {
                    // Reload changed the TTL: move to a lease of the new TTL, key included.
                    let ttl = h.ttl;
                    let id = match client.lease_grant(secs(ttl), None).await {
                        Ok(g) => g.id(),
                        Err(e) => break Err(e.to_string()),
                    };
                    if holding {
                        let mv = Txn::new()
                            .when([Compare::value(h.key.as_str(), CompareOp::Equal, h.me.as_str())])
                            .and_then([TxnOp::put(h.key.as_str(), h.me.as_str(), Some(PutOptions::new().with_lease(id)))]);
                        match client.txn(mv).await {
                            Ok(r) if r.succeeded() => {}
                            Ok(_) => {
                                holding = false;
                                h.give_up("the key is no longer ours").await;
                            }
                            Err(e) => break Err(e.to_string()),
                        }
                    }
                    match client.lease_keep_alive(id).await {
                        Ok((k, a)) => (keeper, acks) = (k, a),
                        Err(e) => break Err(e.to_string()),
                    }
                    if lease_is_ours {
                        let _ = client.lease_revoke(lease).await;
                    }
                    lease_is_ours = true;
                    info!(vip = %h.cfg.name, old = lease, new = id, ?ttl, "etcd lease election: lease TTL changed");
                    (lease, lease_ttl, last_ack, next_keepalive) = (id, ttl, now, now + ttl / 3);
                    h.set_lease(Some(LeaseRole { id, ttl_ms: ttl.as_millis() as u64, key: h.key.clone(), value: h.me.clone() }));
                }
                if now >= next_keepalive {
                    if let Err(e) = keeper.keep_alive().await {
                        break Err(e.to_string());
                    }
                    next_keepalive = now + lease_ttl / 3;
                }
                let fit = h.cfg.health_weight == 0 || h.health.observe(now, fitness());
                if holding && !fit {
                    let del = Txn::new()
                        .when([Compare::value(h.key.as_str(), CompareOp::Equal, h.me.as_str())])
                        .and_then([TxnOp::delete(h.key.as_str(), None)]);
                    let _ = client.txn(del).await;
                    holding = false;
                    h.give_up("proxy unfit: no routable primary or etcd unreachable").await;
                } else if !holding && fit {
                    match claim(&mut client, &h.key, &h.me, lease).await {
                        Ok(true) => {
                            holding = true;
                            h.take().await;
                        }
                        Ok(false) => {
                            if h.kept {
                                h.give_up("the handed-over key is another host's").await;
                            }
                        }
                        Err(e) => break Err(e),
                    }
                } else if !holding && h.kept {
                    h.give_up("proxy unfit").await;
                }
            }
            ack = acks.message() => match ack {
                Ok(Some(a)) if a.ttl() > 0 => last_ack = Instant::now(),
                Ok(Some(_)) => break Err("lease expired".into()),
                Ok(None) => break Err("keep-alive stream closed".into()),
                Err(e) => break Err(e.to_string()),
            },
            r = changed(feed), if feed.is_some() => match r {
                Ok(()) => {
                    if let Some(new) = feed.as_mut().map(|f| f.borrow_and_update().clone()) {
                        h.reconfigure(new);
                    }
                }
                // A fixed config, or the supervisor dropped the sender: nothing more to follow.
                Err(_) => *feed = None,
            },
            _ = stop.stopped() => {
                if stop.mode() == StopMode::Release {
                    if holding {
                        let del = Txn::new()
                            .when([Compare::value(h.key.as_str(), CompareOp::Equal, h.me.as_str())])
                            .and_then([TxnOp::delete(h.key.as_str(), None)]);
                        let _ = client.txn(del).await;
                    }
                    if lease_is_ours {
                        let _ = client.lease_revoke(lease).await;
                    }
                }
                // Hand-over: the successor keeps this lease alive and the key with it.
                break Ok(());
            }
        }
    };
    if stop.is_stopped() && stop.mode() == StopMode::HandOver {
        return result;
    }
    if holding || result.is_err() {
        h.give_up(match &result {
            Ok(()) => "stopping",
            Err(_) => "cannot prove the lease is still ours",
        })
        .await;
    }
    result
}
