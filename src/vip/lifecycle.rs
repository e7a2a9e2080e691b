//! How a VIP instance (VRRP or etcd lease) starts, follows its configuration and ends, for
//! reload and binary upgrade.
//!
//! - **Reload**: an instance follows a `watch` of its `VipConfig` ([`ConfigFeed`]) and applies a
//!   new one in place, keeping mastership, unless [`needs_restart`] says the change cannot be
//!   applied live (address, interface, VRID, version, election): the supervisor then stops the
//!   old instance (which releases the VIP) and starts a new one. An instance that is sent such
//!   a config anyway keeps running on its old one and logs an error.
//! - **Upgrade**: the old process encodes each instance's role ([`handover_state`]) into the
//!   opaque state of `crate::handover`; the new process decodes it ([`decode_handover_state`])
//!   and starts each instance with [`Start::TakeOver`] (a VRRP master carries on as master with
//!   the address left in place; an etcd holder keeps its lease alive and its key). Once the new
//!   process is ready the old one stops its instances with [`VipStop::hand_over`]: no priority-0
//!   advert, no address removed, no key deleted, no lease revoked. A new process that gives up
//!   before it is ready must stop its instances with `hand_over` too, so the old one, which
//!   keeps serving, keeps the VIP.
//!
//! The types and functions are `pub` (not `pub(crate)`) because the namespace tests
//! (tests/vip_netns.rs) run instances in-process through them, as the supervisor will.
//!
//! Invariants: a role is only taken over if it describes the same VIP as the new config
//! ([`VipRole::matches`]); otherwise the instance starts afresh and removes the address the old
//! role held (the old process leaves it in place on hand-over). Roles may be stale by the time
//! the old process stops (it may have lost or won mastership since it encoded them): VRRP
//! converges by its adverts within a master-down interval; the etcd election re-attaches to a
//! key whose value is its own, so the holder is always the one etcd says.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::driver::SharedVipStatus;
use super::fsm::State;
use super::packet::Version;
use crate::config::{Election, VipConfig};

/// The configuration an instance follows: a `watch` receiver that the supervisor updates on
/// reload, or a fixed configuration (which never changes).
pub trait ConfigFeed {
    fn into_receiver(self) -> watch::Receiver<Arc<VipConfig>>;
}

impl ConfigFeed for watch::Receiver<Arc<VipConfig>> {
    fn into_receiver(self) -> watch::Receiver<Arc<VipConfig>> {
        self
    }
}

impl ConfigFeed for Arc<VipConfig> {
    /// A closed channel: the instance reads the value once and never waits for another.
    fn into_receiver(self) -> watch::Receiver<Arc<VipConfig>> {
        watch::channel(self).1
    }
}

/// Whether going from `old` to `new` needs the instance restarted (a release and a new
/// election) rather than applied in place: the VIP's identity on the wire or on the host
/// changed. Everything else (priority, intervals, preempt, GARP settings, health ties, VRRP
/// password and peers, the lease TTL) is applied live.
#[allow(dead_code)] // Called by the supervisor on reload (issue 7), not wired yet.
pub(crate) fn needs_restart(old: &VipConfig, new: &VipConfig) -> bool {
    let election_changed = match (&old.election, &new.election) {
        (Election::Vrrp, Election::Vrrp) => old.vrid != new.vrid || old.version != new.version,
        (Election::Etcd { cluster: c1, key: k1, .. }, Election::Etcd { cluster: c2, key: k2, .. }) => {
            c1 != c2 || k1 != k2
        }
        _ => true,
    };
    election_changed
        || old.name != new.name
        || old.addr != new.addr
        || old.prefix != new.prefix
        || old.interface != new.interface
}

/// What a running instance may apply of `new` in place: the names of the changed fields, or
/// `None` when there is nothing to apply or the change needs the instance restarted (logged:
/// the supervisor restarts it).
pub(crate) fn live_changes(old: &VipConfig, new: &VipConfig) -> Option<Vec<&'static str>> {
    let changed = changed_fields(old, new);
    if needs_restart(old, new) {
        tracing::error!(vip = %old.name, ?changed,
                        "this change needs the VIP instance restarted; the running instance keeps its configuration");
        return None;
    }
    (!changed.is_empty()).then_some(changed)
}

/// The names of the fields that differ, for the one log line a reload writes (never values:
/// `auth_pass` is a secret).
pub(crate) fn changed_fields(old: &VipConfig, new: &VipConfig) -> Vec<&'static str> {
    let ttl = |e: &Election| match e {
        Election::Etcd { ttl, .. } => Some(*ttl),
        Election::Vrrp => None,
    };
    let election_same_but_ttl = match (&old.election, &new.election) {
        (Election::Etcd { cluster: c1, key: k1, .. }, Election::Etcd { cluster: c2, key: k2, .. }) => {
            c1 == c2 && k1 == k2
        }
        (a, b) => a == b,
    };
    [
        ("name", old.name != new.name),
        ("election", !election_same_but_ttl),
        ("lease_ttl", election_same_but_ttl && ttl(&old.election) != ttl(&new.election)),
        ("address", old.addr != new.addr || old.prefix != new.prefix),
        ("interface", old.interface != new.interface),
        ("vrid", old.vrid != new.vrid),
        ("version", old.version != new.version),
        ("priority", old.priority != new.priority),
        ("advert_interval", old.advert_interval != new.advert_interval),
        ("preempt", old.preempt != new.preempt),
        ("preempt_delay", old.preempt_delay != new.preempt_delay),
        ("auth_pass", old.auth_pass != new.auth_pass),
        ("unicast_peers", old.unicast_peers != new.unicast_peers),
        ("garp_count", old.garp_count != new.garp_count),
        ("garp_interval", old.garp_interval != new.garp_interval),
        ("garp_refresh", old.garp_refresh != new.garp_refresh),
        ("health_weight", old.health_weight != new.health_weight),
        ("unhealthy_after", old.unhealthy_after != new.unhealthy_after),
        ("healthy_after", old.healthy_after != new.healthy_after),
    ]
    .into_iter()
    .filter_map(|(n, changed)| changed.then_some(n))
    .collect()
}

/// How an instance ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Normal stop: a VRRP master sends a priority-0 advert and removes the address; an etcd
    /// holder deletes its key, revokes its lease and removes the address. The peer takes over
    /// at once.
    Release,
    /// Binary upgrade: leave the address, the key and the lease as they are; the successor,
    /// started with [`Start::TakeOver`], carries on.
    HandOver,
}

const MODE_UNSET: u8 = 0;
const MODE_RELEASE: u8 = 1;
const MODE_HAND_OVER: u8 = 2;

/// Stops an instance, in one of the two [`StopMode`]s. Clones share the same stop, so one
/// `VipStop` can end every instance of a process. The first of `release` / `hand_over` wins.
#[derive(Debug, Clone, Default)]
pub struct VipStop {
    token: CancellationToken,
    mode: Arc<AtomicU8>,
}

impl VipStop {
    pub fn new() -> VipStop {
        VipStop::default()
    }

    /// Normal stop (see [`StopMode::Release`]).
    pub fn release(&self) {
        let _ = self.mode.compare_exchange(MODE_UNSET, MODE_RELEASE, Ordering::SeqCst, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Upgrade stop (see [`StopMode::HandOver`]).
    pub fn hand_over(&self) {
        let _ = self.mode.compare_exchange(MODE_UNSET, MODE_HAND_OVER, Ordering::SeqCst, Ordering::SeqCst);
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    pub(crate) async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// How to stop; `Release` if the token was cancelled from outside.
    pub(crate) fn mode(&self) -> StopMode {
        match self.mode.load(Ordering::SeqCst) {
            MODE_HAND_OVER => StopMode::HandOver,
            _ => StopMode::Release,
        }
    }
}

impl From<CancellationToken> for VipStop {
    /// Cancelling `token` is a normal stop (`Release`).
    fn from(token: CancellationToken) -> VipStop {
        VipStop { token, mode: Arc::default() }
    }
}

/// How an instance starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// As a backup; a VIP left on the interface (by a crash) is removed first.
    Fresh,
    /// Carrying on the role of the previous process (binary upgrade).
    TakeOver(VipRole),
}

impl Start {
    /// The start for the VIP `name` given the roles handed over by the previous process.
    pub fn for_vip(roles: &[VipRole], name: &str) -> Start {
        roles.iter().find(|r| r.name == name).map_or(Start::Fresh, |r| Start::TakeOver(r.clone()))
    }
}

/// The role of one instance, as handed from a process to its successor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VipRole {
    pub name: String,
    /// VRRP master, or holder of the etcd key.
    pub master: bool,
    pub addr: IpAddr,
    pub prefix: u8,
    pub interface: String,
    /// `None` for an etcd election.
    pub vrrp: Option<(u8, Version)>,
    /// etcd election: the lease the old process kept alive (and its key, if it held it).
    pub lease: Option<LeaseRole>,
}

/// The etcd lease of an instance and the identity it writes into the key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseRole {
    pub id: i64,
    pub ttl_ms: u64,
    pub key: String,
    /// The value written into the key: whoever writes the same value holds it.
    pub value: String,
}

impl LeaseRole {
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

impl VipRole {
    /// Whether this role describes the VIP `cfg` configures (same address on the same
    /// interface, same election); a role that does not is not taken over.
    pub fn matches(&self, cfg: &VipConfig) -> bool {
        let election = match &cfg.election {
            Election::Vrrp => self.vrrp == Some((cfg.vrid, cfg.version)) && self.lease.is_none(),
            Election::Etcd { key, .. } => self.vrrp.is_none() && self.lease.as_ref().is_none_or(|l| &l.key == key),
        };
        election
            && self.name == cfg.name
            && self.addr == cfg.addr
            && self.prefix == cfg.prefix
            && self.interface == cfg.interface
    }

    fn of(cfg: &VipConfig, state: State, lease: Option<LeaseRole>) -> VipRole {
        VipRole {
            name: cfg.name.clone(),
            master: state == State::Master,
            addr: cfg.addr,
            prefix: cfg.prefix,
            interface: cfg.interface.clone(),
            vrrp: match cfg.election {
                Election::Vrrp => Some((cfg.vrid, cfg.version)),
                Election::Etcd { .. } => None,
            },
            lease,
        }
    }
}

/// Version of the encoded roles; a successor refuses (and starts afresh) another one.
const FORMAT: u32 = 1;
/// Bound on what `decode_handover_state` reads (far above any real config).
const MAX_STATE_LEN: usize = 256 * 1024;

#[derive(serde::Serialize, serde::Deserialize)]
struct Encoded {
    format: u32,
    vips: Vec<VipRole>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverStateError {
    #[error("VIP hand-over state of {0} bytes, at most {MAX_STATE_LEN}")]
    TooLarge(usize),
    #[error("VIP hand-over state: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("VIP hand-over state in format {found}, this version reads {FORMAT}")]
    Format { found: u32 },
}

/// The roles of the running instances, for the successor (the opaque `state` of
/// `crate::handover`). Read from the instances' shared status, so it reflects the moment of
/// the call.
pub fn handover_state(vips: &[SharedVipStatus]) -> Vec<u8> {
    let roles: Vec<VipRole> =
        vips.iter().filter_map(|s| s.lock().ok().map(|s| VipRole::of(&s.cfg, s.state, s.lease.clone()))).collect();
    encode_roles(roles)
}

fn encode_roles(vips: Vec<VipRole>) -> Vec<u8> {
    // Serialising plain structs of strings and numbers to a Vec cannot fail.
    serde_json::to_vec(&Encoded { format: FORMAT, vips }).unwrap_or_default()
}

/// Decodes what `handover_state` encoded. Empty input (a predecessor without VIPs, or
/// socket activation) is no roles.
pub fn decode_handover_state(bytes: &[u8]) -> Result<Vec<VipRole>, HandoverStateError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if bytes.len() > MAX_STATE_LEN {
        return Err(HandoverStateError::TooLarge(bytes.len()));
    }
    let e: Encoded = serde_json::from_slice(bytes)?;
    if e.format != FORMAT {
        return Err(HandoverStateError::Format { found: e.format });
    }
    Ok(e.vips)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;

    fn vips(extra: &str) -> Vec<Arc<VipConfig>> {
        let text = format!(
            "[[cluster]]\nname = \"c\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n\
             [[listener]]\nname = \"l\"\ncluster = \"c\"\nbind = \"127.0.0.1:5432\"\n\
             [[vip]]\nname = \"rw\"\naddress = \"198.51.100.10/24\"\ninterface = \"eth0\"\nvrid = 51\n\
             [[vip]]\nname = \"ro\"\naddress = \"198.51.100.20/24\"\ninterface = \"eth0\"\nelection = \"etcd\"\n\
             etcd_cluster = \"c\"\n{extra}"
        );
        Config::parse(std::path::Path::new("t.toml"), &text).unwrap().vips
    }

    #[test]
    fn live_changes_do_not_need_a_restart() {
        let v = vips("");
        let (rw, ro) = ((*v[0]).clone(), (*v[1]).clone());
        let live: Vec<fn(&mut VipConfig)> = vec![
            |c| c.priority = 17,
            |c| c.advert_interval = Duration::from_millis(300),
            |c| c.preempt = !c.preempt,
            |c| c.preempt_delay = Duration::from_secs(9),
            |c| c.garp_count = 9,
            |c| c.garp_interval = Duration::from_millis(7),
            |c| c.garp_refresh = Some(Duration::from_secs(7)),
            |c| c.health_weight = 3,
            |c| c.unhealthy_after = Duration::from_secs(7),
            |c| c.healthy_after = Duration::from_secs(7),
            |c| c.auth_pass = Some(crate::config::Secret::new("x")),
            |c| c.unicast_peers = vec!["198.51.100.12".parse().unwrap()],
        ];
        for (k, f) in live.iter().enumerate() {
            for base in [&rw, &ro] {
                let mut n = base.clone();
                f(&mut n);
                assert!(!needs_restart(base, &n), "change #{k} on {}", base.name);
            }
        }
        let mut n = ro.clone();
        if let Election::Etcd { ttl, .. } = &mut n.election {
            *ttl = Duration::from_secs(10);
        }
        assert!(!needs_restart(&ro, &n), "the lease TTL applies at the next lease");
        assert_eq!(changed_fields(&ro, &n), ["lease_ttl"]);
        let mut n = rw.clone();
        n.priority = 1;
        n.auth_pass = Some(crate::config::Secret::new("secret"));
        assert_eq!(changed_fields(&rw, &n), ["priority", "auth_pass"]);
        assert!(changed_fields(&rw, &rw).is_empty());
    }

    #[test]
    fn identity_changes_need_a_restart() {
        let v = vips("");
        let (rw, ro) = ((*v[0]).clone(), (*v[1]).clone());
        let restart: Vec<fn(&mut VipConfig)> =
            vec![|c| c.name = "other".into(), |c| c.addr = "198.51.100.99".parse().unwrap(), |c| c.prefix = 25, |c| {
                c.interface = "eth1".into()
            }];
        for (k, f) in restart.iter().enumerate() {
            for base in [&rw, &ro] {
                let mut n = base.clone();
                f(&mut n);
                assert!(needs_restart(base, &n), "change #{k} on {}", base.name);
            }
        }
        let mut n = rw.clone();
        n.vrid = 52;
        assert!(needs_restart(&rw, &n));
        let mut n = rw.clone();
        n.version = Version::V2;
        assert!(needs_restart(&rw, &n));
        assert!(needs_restart(&rw, &VipConfig { election: ro.election.clone(), ..rw.clone() }));
        assert!(needs_restart(&ro, &VipConfig { election: Election::Vrrp, ..ro.clone() }));
        for f in [|e: &mut Election| set_key(e, "/other"), |e: &mut Election| set_cluster(e, "d")] {
            let mut n = ro.clone();
            f(&mut n.election);
            assert!(needs_restart(&ro, &n));
        }
        assert!(!needs_restart(&rw, &rw.clone()) && !needs_restart(&ro, &ro.clone()));
    }

    fn set_key(e: &mut Election, k: &str) {
        if let Election::Etcd { key, .. } = e {
            *key = k.into();
        }
    }

    fn set_cluster(e: &mut Election, c: &str) {
        if let Election::Etcd { cluster, .. } = e {
            *cluster = c.into();
        }
    }

    #[test]
    fn roles_round_trip_and_match_their_config() {
        let v = vips("");
        let lease =
            LeaseRole { id: 0x1234_5678_9abc, ttl_ms: 3000, key: "/pgfront/vip/ro".into(), value: "h:1".into() };
        let roles = vec![VipRole::of(&v[0], State::Master, None), VipRole::of(&v[1], State::Backup, Some(lease))];
        let back = decode_handover_state(&encode_roles(roles.clone())).unwrap();
        assert_eq!(back, roles);
        assert!(back[0].master && !back[1].master);
        assert!(back[0].matches(&v[0]) && back[1].matches(&v[1]));
        assert!(!back[0].matches(&v[1]) && !back[1].matches(&v[0]));
        assert_eq!(Start::for_vip(&back, "ro"), Start::TakeOver(roles[1].clone()));
        assert_eq!(Start::for_vip(&back, "nope"), Start::Fresh);
        // A changed address, VRID or key is another VIP: not taken over.
        let changed = vips("etcd_key = \"/k2\"\n");
        assert!(!back[1].matches(&changed[1]));
        let mut other = (*v[0]).clone();
        other.vrid = 9;
        assert!(!back[0].matches(&other));
        other = (*v[0]).clone();
        other.addr = "198.51.100.11".parse().unwrap();
        assert!(!back[0].matches(&other));
        assert!(decode_handover_state(b"").unwrap().is_empty());
    }

    #[test]
    fn state_is_read_from_the_shared_status() {
        let v = vips("");
        let st: Vec<SharedVipStatus> = v.iter().map(|c| super::super::driver::initial_status(c)).collect();
        st[0].lock().unwrap().state = State::Master;
        let roles = decode_handover_state(&handover_state(&st)).unwrap();
        assert_eq!(
            roles.iter().map(|r| (r.name.as_str(), r.master)).collect::<Vec<_>>(),
            [("rw", true), ("ro", false)]
        );
    }

    #[test]
    fn bad_state_is_an_error() {
        assert!(matches!(decode_handover_state(b"{"), Err(HandoverStateError::Malformed(_))));
        assert!(matches!(
            decode_handover_state(br#"{"format":2,"vips":[]}"#),
            Err(HandoverStateError::Format { found: 2 })
        ));
        assert!(matches!(decode_handover_state(&vec![b' '; MAX_STATE_LEN + 1]), Err(HandoverStateError::TooLarge(_))));
    }

    #[test]
    fn stop_modes() {
        let s = VipStop::new();
        assert!(!s.is_stopped());
        let c = s.clone();
        c.hand_over();
        assert!(s.is_stopped());
        assert_eq!(s.mode(), StopMode::HandOver);
        s.release();
        assert_eq!(s.mode(), StopMode::HandOver, "the first stop wins");
        let t = CancellationToken::new();
        let s = VipStop::from(t.clone());
        t.cancel();
        assert!(s.is_stopped());
        assert_eq!(s.mode(), StopMode::Release);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_handover_state(&bytes);
        }
    }
}
