//! The I/O around one VRRP instance: a raw IP-protocol-112 socket on the interface (multicast
//! joined, or unicast peers), the state machine's timers, and its actions carried out through
//! netlink (address) and pnet (gratuitous ARP).
//!
//! Received packets are checked as RFC 5798 §7.1 asks before the state machine sees them: TTL
//! 255, our VRID, a valid checksum, the same version, and for VRRPv2 the same password. A bad
//! packet is counted and logged at debug level, never fatal.
//!
//! On start a VIP found on the interface is removed (a crash may have left it); on stop a
//! master sends a priority-0 advertisement and removes it. Upgrade (see `super::lifecycle`):
//! an instance started with `Start::TakeOver` of a master role keeps the address and starts
//! as master, advertising at once; one stopped with `VipStop::hand_over` leaves the address
//! and sends no priority-0 advert. Reload: the instance follows its config feed and applies a
//! new config in place (`Vrrp::reconfigure`), without giving up mastership.

use std::net::{IpAddr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::fsm::{Action, FsmConfig, Heard, State, Vrrp};
use super::garp::{self, Announcer};
use super::health::Health;
use super::lifecycle::{self, ConfigFeed, LeaseRole, Start, StopMode, VipRole, VipStop};
use super::netlink::{self, Netlink};
use super::packet::{self, Advert, Version};
use crate::config::VipConfig;
use crate::events::{EventKind, Events, NewEvent};

#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("vip {name}: {reason}")]
    Setup { name: String, reason: String },
    #[error("vip {name}: {source}")]
    Netlink { name: String, source: netlink::NetlinkError },
    #[error("vip {name}: {source}")]
    Garp { name: String, source: garp::GarpError },
    #[error("vip {name}: raw VRRP socket: {source}")]
    Socket { name: String, source: std::io::Error },
}

/// What the admin endpoint shows of a VIP.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub interface: String,
    pub vrid: u8,
    pub version: Version,
    pub state: State,
    pub priority: u8,
    pub master_seen: Option<String>,
    pub transitions: u64,
    pub garps_sent: u64,
    pub bad_packets: u64,
    /// The configuration in force (for the hand-over of the role to a successor).
    #[serde(skip)]
    pub(crate) cfg: Arc<VipConfig>,
    /// etcd election: the lease in use, and the key's value that marks it as ours.
    #[serde(skip)]
    pub(crate) lease: Option<LeaseRole>,
}

pub type SharedVipStatus = Arc<Mutex<VipStatus>>;

pub fn initial_status(cfg: &VipConfig) -> SharedVipStatus {
    Arc::new(Mutex::new(VipStatus {
        name: cfg.name.clone(),
        address: format!("{}/{}", cfg.addr, cfg.prefix),
        interface: cfg.interface.clone(),
        vrid: cfg.vrid,
        version: cfg.version,
        state: State::Initialize,
        priority: cfg.priority,
        master_seen: None,
        transitions: 0,
        garps_sent: 0,
        bad_packets: 0,
        cfg: Arc::new(cfg.clone()),
        lease: None,
    }))
}

/// The interface's own address of the VIP's family (not the VIP): source of adverts and
/// tie-breaker between equal priorities. For IPv6 that is the link-local address (RFC 5798).
fn local_addr(cfg: &VipConfig) -> Option<IpAddr> {
    let iface = garp::interface(&cfg.interface)?;
    iface.ips.iter().map(|n| n.ip()).find(|ip| match (ip, cfg.addr) {
        (IpAddr::V4(_), IpAddr::V4(_)) => *ip != cfg.addr,
        (IpAddr::V6(a), IpAddr::V6(_)) => a.segments()[0] & 0xffc0 == 0xfe80,
        _ => false,
    })
}

fn setsockopt_int(s: &Socket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: a plain int option on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn open_socket(cfg: &VipConfig, local: IpAddr) -> std::io::Result<Socket> {
    let index = netlink::ifindex(&cfg.interface).map_err(|e| std::io::Error::other(e.to_string()))?;
    let proto = Some(Protocol::from(i32::from(packet::IPPROTO_VRRP)));
    let s = match local {
        IpAddr::V4(local) => {
            let s = Socket::new(Domain::IPV4, Type::RAW, proto)?;
            s.set_ttl_v4(255)?;
            s.set_multicast_ttl_v4(255)?;
            s.set_multicast_loop_v4(false)?;
            s.set_multicast_if_v4(&local)?;
            s.join_multicast_v4_n(&packet::MCAST_V4, &InterfaceIndexOrAddress::Index(index))?;
            s
        }
        IpAddr::V6(_) => {
            let s = Socket::new(Domain::IPV6, Type::RAW, proto)?;
            s.set_unicast_hops_v6(255)?;
            s.set_multicast_hops_v6(255)?;
            s.set_multicast_loop_v6(false)?;
            s.set_multicast_if_v6(index)?;
            s.join_multicast_v6(&packet::MCAST_V6, index)?;
            // The kernel fills in (and checks) the VRRPv3 checksum at offset 6, over the
            // pseudo-header with whatever source it picks; hop limit and destination of each
            // received packet come as ancillary data.
            setsockopt_int(&s, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 6)?;
            setsockopt_int(&s, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)?;
            setsockopt_int(&s, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
            s
        }
    };
    // Bound to the device, not to an address: a raw socket bound to an address only receives
    // packets sent to that address, and adverts go to the multicast group.
    s.bind_device(Some(cfg.interface.as_bytes()))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// One IPv6 datagram with its source, destination and hop limit (from ancillary data).
fn recv_v6(s: &Socket, buf: &mut [u8]) -> std::io::Result<(usize, Ipv6Addr, Option<Ipv6Addr>, Option<u8>)> {
    // SAFETY: recvmsg into buffers we own, sized as we tell the kernel; the control messages
    // are read with read_unaligned through the CMSG_* helpers.
    unsafe {
        let mut src: libc::sockaddr_in6 = std::mem::zeroed();
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut control = [0u64; 32];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut src as *mut libc::sockaddr_in6).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(s.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut dst, mut hops) = (None, None);
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IPV6 {
                let data = libc::CMSG_DATA(c);
                if (*c).cmsg_type == libc::IPV6_HOPLIMIT {
                    hops = Some(std::ptr::read_unaligned(data as *const libc::c_int) as u8);
                } else if (*c).cmsg_type == libc::IPV6_PKTINFO {
                    let pi = std::ptr::read_unaligned(data as *const libc::in6_pktinfo);
                    dst = Some(Ipv6Addr::from(pi.ipi6_addr.s6_addr));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, Ipv6Addr::from(src.sin6_addr.s6_addr), dst, hops))
    }
}

struct Driver {
    cfg: Arc<VipConfig>,
    local: IpAddr,
    ifindex: u32,
    sock: AsyncFd<Socket>,
    addr: VipAddress,
    fsm: Vrrp,
    status: SharedVipStatus,
    auth: Option<[u8; 8]>,
    fitness: Fitness,
    health: Health,
    events: Events,
}

/// The address itself, the same whichever election holds it: added and removed through
/// netlink, announced by gratuitous ARP / unsolicited NA.
pub(crate) struct VipAddress {
    /// Follows reloads (GARP count, interval).
    pub(crate) cfg: Arc<VipConfig>,
    netlink: Netlink,
    announcer: Option<Announcer>,
    status: SharedVipStatus,
}

impl VipAddress {
    /// Opens netlink and the announcer, and removes the address if a crash left it on the
    /// interface: it is taken again only if this host is elected. With `keep` (taking over the
    /// role of a previous process that holds the VIP), the address stays where it is.
    pub(crate) async fn open(
        cfg: &Arc<VipConfig>,
        status: SharedVipStatus,
        keep: bool,
    ) -> Result<VipAddress, VipError> {
        let nl_err = |source| VipError::Netlink { name: cfg.name.clone(), source };
        let netlink = Netlink::connect().map_err(nl_err)?;
        if !keep && netlink.del(&cfg.interface, cfg.addr, cfg.prefix).await.map_err(nl_err)? {
            warn!(vip = %cfg.name, addr = %cfg.addr, interface = %cfg.interface,
                  "removed a VIP left on the interface (crash?); it is taken again only if elected");
        }
        let announcer = match Announcer::open(&cfg.interface) {
            Ok(a) => Some(a),
            Err(e) => {
                error!(vip = %cfg.name, error = %e, "address announcements unavailable; clients learn the VIP's MAC by ARP/ND only");
                None
            }
        };
        Ok(VipAddress { cfg: cfg.clone(), netlink, announcer, status })
    }

    pub(crate) async fn add(&mut self) {
        if let Err(e) = self.netlink.add(&self.cfg.interface, self.cfg.addr, self.cfg.prefix).await {
            error!(vip = %self.cfg.name, error = %e, "cannot add the VIP");
        }
    }

    pub(crate) async fn remove(&mut self) {
        if let Err(e) = self.netlink.del(&self.cfg.interface, self.cfg.addr, self.cfg.prefix).await {
            error!(vip = %self.cfg.name, error = %e, "cannot remove the VIP");
        }
    }

    /// One gratuitous ARP / unsolicited NA.
    pub(crate) fn announce_once(&mut self) {
        if let Some(a) = self.announcer.as_mut() {
            match a.announce(self.cfg.addr) {
                Ok(()) => {
                    if let Ok(mut s) = self.status.lock() {
                        s.garps_sent += 1;
                    }
                }
                Err(e) => warn!(vip = %self.cfg.name, error = %e, "address announcement"),
            }
        }
    }

    /// The takeover burst: one announcement at once, the others `garp_interval` apart so a
    /// lost frame is repeated, stopped if mastership ends meanwhile.
    pub(crate) fn announce(&mut self) {
        self.announce_once();
        let (n, every) = (self.cfg.garp_count.saturating_sub(1), self.cfg.garp_interval);
        if n == 0 {
            return;
        }
        let (cfg, status) = (self.cfg.clone(), self.status.clone());
        tokio::spawn(async move {
            let Ok(mut a) = Announcer::open(&cfg.interface) else { return };
            for _ in 0..n {
                tokio::time::sleep(every).await;
                if status.lock().map(|s| s.state != State::Master).unwrap_or(true) {
                    return;
                }
                if a.announce(cfg.addr).is_ok() {
                    if let Ok(mut s) = status.lock() {
                        s.garps_sent += 1;
                    }
                }
            }
        });
    }
}

/// Releases the VIP if it is configured on its interface (after a crash, or for
/// `pgfront vip release`). Returns whether it was there.
pub async fn release(cfg: &VipConfig) -> Result<bool, VipError> {
    let nl = Netlink::connect().map_err(|source| VipError::Netlink { name: cfg.name.clone(), source })?;
    nl.del(&cfg.interface, cfg.addr, cfg.prefix)
        .await
        .map_err(|source| VipError::Netlink { name: cfg.name.clone(), source })
}

/// The role handed over by the previous process, if it is this VIP's; a role for another VIP
/// (its address, VRID or election changed across the upgrade) is not taken over, and the
/// address it held, which the previous process leaves in place on hand-over, is removed.
pub(crate) async fn role_to_take_over(cfg: &VipConfig, start: Start) -> Option<VipRole> {
    let role = match start {
        Start::Fresh => return None,
        Start::TakeOver(role) if role.matches(cfg) => return Some(role),
        Start::TakeOver(role) => role,
    };
    warn!(vip = %cfg.name, old_addr = %role.addr, old_interface = %role.interface,
          "the VIP handed over by the previous process is configured differently now: starting afresh");
    if role.master
        && (role.addr, role.prefix, role.interface.as_str()) != (cfg.addr, cfg.prefix, cfg.interface.as_str())
    {
        match Netlink::connect() {
            Ok(nl) => match nl.del(&role.interface, role.addr, role.prefix).await {
                Ok(true) => info!(vip = %cfg.name, addr = %role.addr, "removed the address the previous process held"),
                Ok(false) => {}
                Err(e) => warn!(vip = %cfg.name, error = %e, "cannot remove the address the previous process held"),
            },
            Err(e) => warn!(vip = %cfg.name, error = %e, "cannot remove the address the previous process held"),
        }
    }
    None
}

/// Tells whether the proxy is fit to hold the VIP right now (before hysteresis).
pub type Fitness = Arc<dyn Fn() -> bool + Send + Sync>;

/// How often fitness is sampled.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

/// Runs one VRRP instance from a fresh start until `stop`; see `run_with`.
pub async fn run(
    cfg: impl ConfigFeed,
    status: SharedVipStatus,
    fitness: Fitness,
    stop: impl Into<VipStop>,
    events: Events,
) -> Result<(), VipError> {
    run_with(cfg, status, fitness, stop.into(), Start::Fresh, events).await
}

/// Runs one VRRP instance until `stop`, following `cfg` (reload): a fresh start begins as
/// backup; `Start::TakeOver` of a master role begins as master with the address left in place.
/// The way `stop` is given (`release` or `hand_over`) says whether to release the VIP.
/// Each state change is recorded in `events`.
pub async fn run_with(
    cfg: impl ConfigFeed,
    status: SharedVipStatus,
    fitness: Fitness,
    stop: VipStop,
    start: Start,
    events: Events,
) -> Result<(), VipError> {
    let mut feed = cfg.into_receiver();
    let cfg = feed.borrow_and_update().clone();
    let setup = |reason: String| VipError::Setup { name: cfg.name.clone(), reason };
    let Some(local) = local_addr(&cfg) else {
        return Err(setup(format!(
            "interface {} has no {} address of its own",
            cfg.interface,
            if cfg.addr.is_ipv4() { "IPv4" } else { "link-local IPv6" }
        )));
    };
    let ifindex =
        netlink::ifindex(&cfg.interface).map_err(|source| VipError::Netlink { name: cfg.name.clone(), source })?;
    let sock = open_socket(&cfg, local)
        .and_then(|s| {
            // SAFETY: the AsyncFd owns the socket, so its descriptor stays open (and is not
            // reused) for as long as it is registered.
            unsafe { AsyncFd::register(s) }.map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map_err(|source| VipError::Socket { name: cfg.name.clone(), source })?;
    let take_over = role_to_take_over(&cfg, start).await.is_some_and(|r| r.master);
    let addr = VipAddress::open(&cfg, status.clone(), take_over).await?;
    if let Ok(mut s) = status.lock() {
        s.cfg = cfg.clone();
    }
    let auth = cfg.auth_pass.as_ref().map(|p| packet::auth_bytes(p.expose()));
    let health = Health::new(cfg.unhealthy_after, cfg.healthy_after);
    let fsm = Vrrp::new(fsm_config(&cfg, local, &health));
    let mut d = Driver { cfg: cfg.clone(), local, ifindex, sock, addr, fsm, status, auth, fitness, health, events };
    info!(vip = %cfg.name, addr = %cfg.addr, interface = %cfg.interface, vrid = cfg.vrid, priority = cfg.priority,
          version = ?cfg.version, interval = ?cfg.advert_interval, local = %local, take_over, "VRRP instance starting");
    if take_over {
        d.fsm.handle_takeover(Instant::now());
    } else {
        d.fsm.handle_startup(Instant::now());
    }
    d.run(feed, stop).await
}

/// A state as the status page and `/status` write it.
pub(crate) fn state_name(s: State) -> &'static str {
    match s {
        State::Initialize => "initialize",
        State::Backup => "backup",
        State::Master => "master",
    }
}

/// The state machine's settings for `cfg`, with the priority lowered while unfit.
fn fsm_config(cfg: &VipConfig, local: IpAddr, health: &Health) -> FsmConfig {
    let priority = if cfg.health_weight > 0 && !health.healthy() {
        cfg.priority.saturating_sub(cfg.health_weight).max(1)
    } else {
        cfg.priority
    };
    FsmConfig {
        version: cfg.version,
        priority,
        interval: cfg.advert_interval,
        preempt: cfg.preempt,
        preempt_delay: cfg.preempt_delay,
        local_addr: local,
    }
}

fn refresh_timer(cfg: &VipConfig) -> Option<tokio::time::Interval> {
    cfg.garp_refresh.map(|p| tokio::time::interval_at(Instant::now() + p, p))
}

impl Driver {
    async fn run(&mut self, mut feed: watch::Receiver<Arc<VipConfig>>, stop: VipStop) -> Result<(), VipError> {
        let mut refresh = refresh_timer(&self.cfg);
        let mut feed_open = true;
        let mut health_tick = tokio::time::interval(HEALTH_EVERY);
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.act().await;
            let deadline = self.fsm.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => self.fsm.handle_timeout(Instant::now()),
                r = self.sock.readable() => {
                    let mut packets = Vec::new();
                    match r {
                        Ok(mut guard) => {
                            let mut buf = [0u8; 1500];
                            loop {
                                let r = match self.local {
                                    IpAddr::V4(_) => std::io::Read::read(&mut guard.get_inner(), &mut buf).map(|n| (buf[..n].to_vec(), None)),
                                    IpAddr::V6(_) => recv_v6(guard.get_inner(), &mut buf).map(|(n, src, dst, hops)| (buf[..n].to_vec(), Some((src, dst, hops)))),
                                };
                                match r {
                                    Ok(p) => packets.push(p),
                                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                        guard.clear_ready();
                                        break;
                                    }
                                    Err(e) => {
                                        warn!(vip = %self.cfg.name, error = %e, "VRRP receive");
                                        break;
                                    }
                                }
                            }
                        }
                        Err(e) => return Err(VipError::Socket { name: self.cfg.name.clone(), source: e }),
                    }
                    for (p, v6) in packets {
                        match v6 {
                            None => self.on_packet_v4(&p),
                            Some((src, dst, hops)) => {
                                let dst = dst.map_or(IpAddr::V6(packet::MCAST_V6), IpAddr::V6);
                                self.on_advert(&p, IpAddr::V6(src), dst, hops.unwrap_or(0));
                            }
                        }
                    }
                }
                _ = async { refresh.as_mut().unwrap().tick().await }, if refresh.is_some() && self.fsm.state() == State::Master => {
                    self.addr.announce_once();
                }
                r = feed.changed(), if feed_open => match r {
                    Ok(()) => {
                        let new = feed.borrow_and_update().clone();
                        let refresh_before = self.cfg.garp_refresh;
                        self.reconfigure(new);
                        if self.cfg.garp_refresh != refresh_before {
                            refresh = refresh_timer(&self.cfg);
                        }
                    }
                    // A fixed config, or the supervisor dropped the sender: nothing more to follow.
                    Err(_) => feed_open = false,
                },
                _ = health_tick.tick(), if self.cfg.health_weight > 0 => {
                    let now = Instant::now();
                    let was = self.health.healthy();
                    let fit = self.health.observe(now, (self.fitness)());
                    if fit != was {
                        let p = fsm_config(&self.cfg, self.local, &self.health).priority;
                        if fit {
                            info!(vip = %self.cfg.name, priority = p, "proxy healthy again: priority restored");
                        } else {
                            warn!(vip = %self.cfg.name, priority = p, "proxy unfit (no routable primary or etcd unreachable): priority lowered");
                        }
                        self.fsm.set_priority(now, p);
                    }
                }
                _ = stop.stopped() => {
                    let mode = stop.mode();
                    match mode {
                        StopMode::Release => self.fsm.handle_shutdown(Instant::now()),
                        StopMode::HandOver => self.fsm.handle_handover(Instant::now()),
                    }
                    self.act().await;
                    info!(vip = %self.cfg.name, ?mode, "VRRP instance stopped");
                    return Ok(());
                }
            }
        }
    }

    /// Reload: applies `new` in place, unless it changes what needs a restart.
    fn reconfigure(&mut self, new: Arc<VipConfig>) {
        let Some(changed) = lifecycle::live_changes(&self.cfg, &new) else { return };
        self.cfg = new;
        self.addr.cfg = self.cfg.clone();
        self.auth = self.cfg.auth_pass.as_ref().map(|p| packet::auth_bytes(p.expose()));
        if self.cfg.health_weight == 0 {
            // Ties off: forget any unfit verdict, so turning them on again starts from healthy.
            self.health = Health::new(self.cfg.unhealthy_after, self.cfg.healthy_after);
        } else {
            self.health.set_thresholds(self.cfg.unhealthy_after, self.cfg.healthy_after);
        }
        self.fsm.reconfigure(Instant::now(), fsm_config(&self.cfg, self.local, &self.health));
        if let Ok(mut s) = self.status.lock() {
            s.cfg = self.cfg.clone();
        }
        info!(vip = %self.cfg.name, ?changed, state = ?self.fsm.state(), priority = self.fsm.priority(),
              interval = ?self.cfg.advert_interval, "VRRP configuration applied in place");
    }

    fn bad(&mut self, why: String) {
        debug!(vip = %self.cfg.name, "ignoring VRRP packet: {why}");
        if let Ok(mut s) = self.status.lock() {
            s.bad_packets += 1;
        }
    }

    /// A raw IPv4 packet (header included): its addresses and TTL, then `on_advert`.
    fn on_packet_v4(&mut self, raw: &[u8]) {
        if raw.len() < 20 || raw[0] >> 4 != 4 {
            return self.bad("not IPv4".into());
        }
        let ihl = usize::from(raw[0] & 0x0f) * 4;
        if ihl < 20 || raw.len() < ihl {
            return self.bad("bad IP header length".into());
        }
        let src = IpAddr::from([raw[12], raw[13], raw[14], raw[15]]);
        let dst = IpAddr::from([raw[16], raw[17], raw[18], raw[19]]);
        self.on_advert(&raw[ihl..], src, dst, raw[8]);
    }

    /// RFC 5798 §7.1 checks on a VRRP payload, then the state machine.
    fn on_advert(&mut self, payload: &[u8], src: IpAddr, dst: IpAddr, ttl: u8) {
        if src == self.local {
            return;
        }
        if ttl != 255 {
            return self.bad(format!("TTL {ttl} from {src} (must be 255)"));
        }
        let a = match packet::decode(payload, src, dst) {
            Ok(a) => a,
            Err(e) => return self.bad(format!("from {src}: {e}")),
        };
        if a.vrid != self.cfg.vrid {
            return; // another virtual router on the segment
        }
        if a.version != self.cfg.version {
            return self.bad(format!("from {src}: version {:?}, we run {:?}", a.version, self.cfg.version));
        }
        if a.version == Version::V2 && a.auth != self.auth {
            return self.bad(format!("from {src}: authentication mismatch"));
        }
        if !a.addrs.contains(&self.cfg.addr) {
            debug!(vip = %self.cfg.name, %src, addrs = ?a.addrs, "advertisement lists other addresses than ours");
        }
        self.fsm.handle_advert(Instant::now(), Heard { src, priority: a.priority, interval: a.interval() });
    }

    fn send_advert(&self, priority: u8) {
        let a = Advert {
            version: self.cfg.version,
            vrid: self.cfg.vrid,
            priority,
            interval_cs: (self.cfg.advert_interval.as_millis() / 10).min(0x0fff) as u16,
            addrs: vec![self.cfg.addr],
            auth: self.auth,
        };
        let group = match self.local {
            IpAddr::V4(_) => IpAddr::V4(packet::MCAST_V4),
            IpAddr::V6(_) => IpAddr::V6(packet::MCAST_V6),
        };
        let dsts: Vec<IpAddr> =
            if self.cfg.unicast_peers.is_empty() { vec![group] } else { self.cfg.unicast_peers.clone() };
        for dst in dsts {
            let bytes = packet::encode(&a, self.local, dst);
            let to = match dst {
                IpAddr::V4(d) => SockAddr::from(SocketAddrV4::new(d, 0)),
                IpAddr::V6(d) => SockAddr::from(SocketAddrV6::new(d, 0, 0, self.ifindex)),
            };
            if let Err(e) = self.sock.get_ref().send_to(&bytes, &to) {
                warn!(vip = %self.cfg.name, %dst, error = %e, "VRRP send");
            }
        }
    }

    async fn act(&mut self) {
        while let Some(a) = self.fsm.poll_action() {
            match a {
                Action::SendAdvert { priority } => self.send_advert(priority),
                Action::AddAddresses => self.addr.add().await,
                Action::DelAddresses => self.addr.remove().await,
                Action::Announce => self.addr.announce(),
                Action::StateChanged { from, to } => {
                    info!(vip = %self.cfg.name, addr = %self.cfg.addr, from = ?from, to = ?to,
                          master_seen = ?self.fsm.master_seen, priority = self.fsm.priority(), "VRRP state change");
                    let seen = match self.fsm.master_seen {
                        Some((a, p)) => format!("; master seen: {a} (priority {p})"),
                        None => String::new(),
                    };
                    self.events.record(
                        EventKind::Vip,
                        NewEvent::vip(
                            &self.cfg.name,
                            format!(
                                "VRRP {} → {}: {} on {}, priority {}{seen}",
                                state_name(from),
                                state_name(to),
                                self.cfg.addr,
                                self.cfg.interface,
                                self.fsm.priority()
                            ),
                        ),
                    );
                }
            }
        }
        if let Ok(mut s) = self.status.lock() {
            s.state = self.fsm.state();
            s.priority = self.fsm.priority();
            s.transitions = self.fsm.transitions;
            s.master_seen = self.fsm.master_seen.map(|(a, p)| format!("{a} (priority {p})"));
        }
    }
}
