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

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::driver::{Fitness, SharedVipStatus, VipAddress, VipError};
use super::fsm::State;
use super::health::Health;
use crate::config::{ClusterConfig, Election, VipConfig};
use crate::discovery::etcd3;

const TICK: Duration = Duration::from_millis(250);

struct Holder {
    cfg: Arc<VipConfig>,
    addr: VipAddress,
    status: SharedVipStatus,
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

    async fn take(&mut self) {
        self.addr.add().await;
        if self.set_state(State::Master) {
            info!(vip = %self.cfg.name, addr = %self.cfg.addr, "etcd lease election: this host holds the VIP");
        }
        self.addr.announce();
    }

    async fn give_up(&mut self, why: &str) {
        self.addr.remove().await;
        if self.set_state(State::Backup) {
            info!(vip = %self.cfg.name, addr = %self.cfg.addr, "etcd lease election: VIP released ({why})");
        }
    }
}

pub async fn run(
    cfg: Arc<VipConfig>,
    etcd: Arc<ClusterConfig>,
    status: SharedVipStatus,
    fitness: Fitness,
    stop: CancellationToken,
) -> Result<(), VipError> {
    let Election::Etcd { key, ttl, .. } = cfg.election.clone() else {
        return Err(VipError::Setup { name: cfg.name.clone(), reason: "not an etcd-elected VIP".into() });
    };
    let addr = VipAddress::open(&cfg, status.clone()).await?;
    let mut h = Holder { cfg: cfg.clone(), addr, status };
    h.set_state(State::Backup);
    let me = format!("{}:{}", hostname(), std::process::id());
    let mut health = Health::new(cfg.unhealthy_after, cfg.healthy_after);
    info!(vip = %cfg.name, addr = %cfg.addr, %key, ?ttl, id = %me, "etcd lease election starting");
    let mut backoff = Duration::from_millis(100);
    loop {
        // The session handles `stop` itself: it deletes the key and revokes the lease, so the
        // other host takes over at once instead of after the lease expires.
        let r = session(&mut h, &etcd, &key, ttl, &me, &fitness, &mut health, &stop).await;
        if stop.is_cancelled() {
            h.give_up("stopping").await;
            return Ok(());
        }
        if let Err(e) = r {
            warn!(vip = %cfg.name, error = %e, "etcd lease election: etcd unreachable");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
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

#[allow(clippy::too_many_arguments)]
async fn session(
    h: &mut Holder,
    etcd: &ClusterConfig,
    key: &str,
    ttl: Duration,
    me: &str,
    fitness: &Fitness,
    health: &mut Health,
    stop: &CancellationToken,
) -> Result<(), String> {
    let mut client = etcd3::connect(etcd).await.map_err(|e| e.to_string())?;
    let lease = client.lease_grant(ttl.as_secs() as i64, None).await.map_err(|e| e.to_string())?.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
    let mut last_ack = Instant::now();
    let mut next_keepalive = Instant::now() + ttl / 3;
    let deadline_margin = ttl / 4;
    let mut holding = false;
    let mut tick = tokio::time::interval(TICK);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= last_ack + ttl - deadline_margin {
                    break Err(format!("no keep-alive acknowledged for {:?}", now - last_ack));
                }
                if now >= next_keepalive {
                    if let Err(e) = keeper.keep_alive().await {
                        break Err(e.to_string());
                    }
                    next_keepalive = now + ttl / 3;
                }
                let fit = h.cfg.health_weight == 0 || health.observe(now, fitness());
                if holding && !fit {
                    let del = Txn::new()
                        .when([Compare::value(key, CompareOp::Equal, me)])
                        .and_then([TxnOp::delete(key, None)]);
                    let _ = client.txn(del).await;
                    holding = false;
                    h.give_up("proxy unfit: no routable primary or etcd unreachable").await;
                } else if !holding && fit {
                    let claim = Txn::new()
                        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key, me, Some(PutOptions::new().with_lease(lease)))]);
                    match client.txn(claim).await {
                        Ok(r) if r.succeeded() => {
                            holding = true;
                            h.take().await;
                        }
                        Ok(_) => {}
                        Err(e) => break Err(e.to_string()),
                    }
                }
            }
            ack = acks.message() => match ack {
                Ok(Some(a)) if a.ttl() > 0 => last_ack = Instant::now(),
                Ok(Some(_)) => break Err("lease expired".into()),
                Ok(None) => break Err("keep-alive stream closed".into()),
                Err(e) => break Err(e.to_string()),
            },
            _ = stop.cancelled() => {
                if holding {
                    let del = Txn::new().when([Compare::value(key, CompareOp::Equal, me)]).and_then([TxnOp::delete(key, None)]);
                    let _ = client.txn(del).await;
                }
                let _ = client.lease_revoke(lease).await;
                break Ok(());
            }
        }
    };
    if holding || result.is_err() {
        h.give_up(match &result {
            Ok(()) => "stopping",
            Err(_) => "cannot prove the lease is still ours",
        })
        .await;
    }
    result
}
