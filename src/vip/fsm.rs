//! Pure: the VRRP state machine of one virtual router (RFC 5798 §6.4, which RFC 3768 shares),
//! sans-IO as in quinn-proto: time comes in as an argument, what to do comes out as `Action`s
//! (`poll_action`), and `poll_timeout` says when to call `handle_timeout` next. A thin driver
//! (`super::driver`) does the sockets, netlink and ARP.
//!
//! ```text
//!            startup                 master-down timer fires
//! Initialize ───────► Backup ───────────────────────────────► Master
//!     ▲                 ▲  advert with higher priority (or    │
//!     │ shutdown        └── equal priority, higher address)◄──┘
//!     └──────────────── (Master sends a priority-0 advert first, and drops the address)
//! ```
//! Additions to the RFC, as keepalived has them: `preempt = false` (a backup never takes over
//! from a live master) and a `preempt_delay` after start-up; the priority can be changed at run
//! time (health ties), and is advertised at once.
//!
//! Lifecycle additions for reload and upgrade:
//! - `reconfigure` applies new priority / interval / preempt settings in place. A master stays
//!   master and advertises the new values at once: it steps down only if an advert it then hears
//!   says so (a preempting peer of higher priority takes over as the RFC has it). A backup
//!   re-arms its master-down timer from the same starting point with the new skew (and, for
//!   VRRPv2 or while no master has been heard, the new interval); it never transitions by itself.
//!   Version and local address are fixed for the life of an instance (a change means a restart).
//! - `handle_takeover` starts an instance directly as master (binary upgrade: the previous
//!   process held the role, the address is already there); `handle_handover` ends one without
//!   the priority-0 advert and without removing the address, for the successor to carry on.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::packet::Version;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Initialize,
    Backup,
    Master,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsmConfig {
    pub version: Version,
    /// 1..=254: pgfront never owns the address (255).
    pub priority: u8,
    pub interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// This router's own address on the segment: breaks ties between equal priorities.
    pub local_addr: IpAddr,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement with this priority.
    SendAdvert { priority: u8 },
    /// Add the virtual addresses to the interface.
    AddAddresses,
    /// Remove them.
    DelAddresses,
    /// Announce the addresses (gratuitous ARP / unsolicited NA).
    Announce,
    /// For logs and status.
    StateChanged { from: State, to: State },
}

/// A received advertisement, reduced to what the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    pub src: IpAddr,
    pub priority: u8,
    pub interval: Duration,
}

#[derive(Debug)]
pub struct Vrrp {
    cfg: FsmConfig,
    priority: u8,
    state: State,
    started: Option<Instant>,
    master_adver_interval: Duration,
    adver_timer: Option<Instant>,
    master_down_timer: Option<Instant>,
    /// What armed `master_down_timer`: from when, and whether only the skew was to run (the
    /// master left with a priority-0 advert). Lets `reconfigure` re-arm it with new values.
    down_armed: Option<(Instant, bool)>,
    actions: VecDeque<Action>,
    /// The master last heard from, and when.
    pub master_seen: Option<(IpAddr, u8)>,
    pub transitions: u64,
}

impl Vrrp {
    pub fn new(cfg: FsmConfig) -> Vrrp {
        let priority = cfg.priority.clamp(1, 254);
        Vrrp {
            master_adver_interval: cfg.interval,
            cfg,
            priority,
            state: State::Initialize,
            started: None,
            adver_timer: None,
            master_down_timer: None,
            down_armed: None,
            actions: VecDeque::new(),
            master_seen: None,
            transitions: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// RFC 5798: ((256 - Priority) * Master_Adver_Interval) / 256. VRRPv2: (256 - Priority) / 256 s.
    fn skew(&self) -> Duration {
        let base = match self.cfg.version {
            Version::V2 => Duration::from_secs(1),
            Version::V3 => self.master_adver_interval,
        };
        base * (256 - u32::from(self.priority)) / 256
    }

    /// 3 × Master_Adver_Interval + Skew_Time.
    pub fn master_down_interval(&self) -> Duration {
        self.master_adver_interval * 3 + self.skew()
    }

    /// The configuration in force (the advertised priority may differ: see `priority`).
    pub fn config(&self) -> &FsmConfig {
        &self.cfg
    }

    /// Arms the master-down timer at `from`: the full interval, or the skew only.
    fn arm_down(&mut self, from: Instant, skew_only: bool) {
        self.down_armed = Some((from, skew_only));
        self.master_down_timer = Some(from + if skew_only { self.skew() } else { self.master_down_interval() });
    }

    fn go(&mut self, to: State) {
        if self.state != to {
            self.actions.push_back(Action::StateChanged { from: self.state, to });
            self.state = to;
            self.transitions += 1;
        }
    }

    fn become_master(&mut self, now: Instant) {
        self.actions.push_back(Action::AddAddresses);
        self.actions.push_back(Action::SendAdvert { priority: self.priority });
        self.actions.push_back(Action::Announce);
        self.adver_timer = Some(now + self.cfg.interval);
        self.master_down_timer = None;
        self.down_armed = None;
        self.master_seen = None;
        self.go(State::Master);
    }

    fn become_backup(&mut self, now: Instant, interval: Duration) {
        if self.state == State::Master {
            self.actions.push_back(Action::DelAddresses);
        }
        self.adver_timer = None;
        if self.cfg.version == Version::V3 {
            self.master_adver_interval = interval;
        }
        self.arm_down(now, false);
        self.go(State::Backup);
    }

    pub fn handle_startup(&mut self, now: Instant) {
        if self.state != State::Initialize {
            return;
        }
        self.started = Some(now);
        self.master_adver_interval = self.cfg.interval;
        self.become_backup(now, self.cfg.interval);
    }

    /// Binary upgrade, new side: the previous process was master and the address is still on
    /// the interface; carry on as master at once (advertise now, so the peer's master-down
    /// timer never runs out). The address is added again (idempotent) in case the previous
    /// process lost it meanwhile, and announced (a repeated gratuitous ARP is harmless).
    pub fn handle_takeover(&mut self, now: Instant) {
        if self.state != State::Initialize {
            return;
        }
        self.started = Some(now);
        self.master_adver_interval = self.cfg.interval;
        self.become_master(now);
    }

    /// Clean stop: a master hands over at once with a priority-0 advertisement.
    pub fn handle_shutdown(&mut self, _now: Instant) {
        if self.state == State::Master {
            self.actions.push_back(Action::SendAdvert { priority: 0 });
            self.actions.push_back(Action::DelAddresses);
        }
        self.stop_timers();
        self.go(State::Initialize);
    }

    /// Binary upgrade, old side: stop without a priority-0 advert and without removing the
    /// address; the successor (started with `handle_takeover`) keeps advertising.
    pub fn handle_handover(&mut self, _now: Instant) {
        self.stop_timers();
        self.go(State::Initialize);
    }

    fn stop_timers(&mut self) {
        self.adver_timer = None;
        self.master_down_timer = None;
        self.down_armed = None;
    }

    /// Reload: applies new settings without a transition of its own (see the module docs).
    /// `version` and `local_addr` of `cfg` are ignored: they are fixed for this instance.
    /// `cfg.priority` is the priority to advertise (health ties already subtracted).
    pub fn reconfigure(&mut self, now: Instant, cfg: FsmConfig) {
        let cfg = FsmConfig { version: self.cfg.version, local_addr: self.cfg.local_addr, ..cfg };
        let priority = cfg.priority.clamp(1, 254);
        if cfg == self.cfg && priority == self.priority {
            return;
        }
        let interval_changed = cfg.interval != self.cfg.interval;
        let advertised_changed = interval_changed || priority != self.priority;
        self.cfg = cfg;
        self.priority = priority;
        match self.state {
            State::Initialize => self.master_adver_interval = self.cfg.interval,
            State::Master => {
                // A master's Master_Adver_Interval is its own; backups learn the new one (v3)
                // from the advert sent now, before their timers could run out on the old one.
                self.master_adver_interval = self.cfg.interval;
                if advertised_changed {
                    self.actions.push_back(Action::SendAdvert { priority });
                    self.adver_timer = Some(now + self.cfg.interval);
                }
            }
            State::Backup => {
                // VRRPv3 learns Master_Adver_Interval from the master's adverts; VRRPv2 (and a
                // v3 backup that has heard no master yet) uses its own.
                if self.cfg.version == Version::V2 || self.master_seen.is_none() {
                    self.master_adver_interval = self.cfg.interval;
                }
                if let Some((from, skew_only)) = self.down_armed {
                    self.arm_down(from, skew_only);
                }
            }
        }
    }

    fn in_preempt_delay(&self, now: Instant) -> bool {
        self.started.is_some_and(|s| now < s + self.cfg.preempt_delay)
    }

    /// An advertisement for our virtual router arrived (already validated by the driver).
    pub fn handle_advert(&mut self, now: Instant, h: Heard) {
        match self.state {
            State::Initialize => {}
            State::Backup => {
                if h.priority == 0 {
                    // The master is leaving: take over after the skew only.
                    self.arm_down(now, true);
                    self.master_seen = None;
                } else if !self.cfg.preempt || h.priority >= self.priority || self.in_preempt_delay(now) {
                    if self.cfg.version == Version::V3 {
                        self.master_adver_interval = h.interval;
                    }
                    self.arm_down(now, false);
                    self.master_seen = Some((h.src, h.priority));
                }
                // else: a lower-priority master and we preempt: let the timer run out.
            }
            State::Master => {
                if h.priority == 0 {
                    self.actions.push_back(Action::SendAdvert { priority: self.priority });
                    self.adver_timer = Some(now + self.cfg.interval);
                } else if h.priority > self.priority || (h.priority == self.priority && h.src > self.cfg.local_addr) {
                    self.master_seen = Some((h.src, h.priority));
                    self.become_backup(now, h.interval);
                }
                // else: we win; our next advertisement tells the other router.
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Backup if self.master_down_timer.is_some_and(|t| now >= t) => self.become_master(now),
            State::Master if self.adver_timer.is_some_and(|t| now >= t) => {
                self.actions.push_back(Action::SendAdvert { priority: self.priority });
                self.adver_timer = Some(now + self.cfg.interval);
            }
            _ => {}
        }
    }

    /// Changes the advertised priority (health ties). A master advertises it at once, so a
    /// preempting backup of higher priority takes over within one interval.
    pub fn set_priority(&mut self, now: Instant, priority: u8) {
        let p = priority.clamp(1, 254);
        if p == self.priority {
            return;
        }
        self.priority = p;
        if self.state == State::Master {
            self.actions.push_back(Action::SendAdvert { priority: p });
            self.adver_timer = Some(now + self.cfg.interval);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Initialize => None,
            State::Backup => self.master_down_timer,
            State::Master => self.adver_timer,
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(priority: u8, addr: &str, preempt: bool) -> FsmConfig {
        FsmConfig {
            version: Version::V3,
            priority,
            interval: 100 * MS,
            preempt,
            preempt_delay: Duration::ZERO,
            local_addr: addr.parse().unwrap(),
        }
    }

    fn drain(v: &mut Vrrp) -> Vec<Action> {
        std::iter::from_fn(|| v.poll_action()).collect()
    }

    fn heard(src: &str, priority: u8) -> Heard {
        Heard { src: src.parse().unwrap(), priority, interval: 100 * MS }
    }

    #[test]
    fn lone_router_becomes_master_after_master_down_interval() {
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
        v.handle_startup(t0);
        assert_eq!(drain(&mut v), vec![Action::StateChanged { from: State::Initialize, to: State::Backup }]);
        // 3 × 100 ms + (256-100)/256 × 100 ms = 360.9 ms
        let down = v.poll_timeout().unwrap();
        assert_eq!(down - t0, v.master_down_interval());
        assert!(v.master_down_interval() > 360 * MS && v.master_down_interval() < 361 * MS);
        v.handle_timeout(down - MS);
        assert_eq!(v.state(), State::Backup);
        v.handle_timeout(down);
        assert_eq!(
            drain(&mut v),
            vec![
                Action::AddAddresses,
                Action::SendAdvert { priority: 100 },
                Action::Announce,
                Action::StateChanged { from: State::Backup, to: State::Master },
            ]
        );
        assert_eq!(v.poll_timeout(), Some(down + 100 * MS));
        v.handle_timeout(down + 100 * MS);
        assert_eq!(drain(&mut v), vec![Action::SendAdvert { priority: 100 }]);
    }

    #[test]
    fn v2_skew_is_in_seconds() {
        let mut c = cfg(100, "10.0.0.1", true);
        c.version = Version::V2;
        c.interval = Duration::from_secs(1);
        let v = Vrrp::new(c);
        assert_eq!(v.master_down_interval(), Duration::from_secs(3) + Duration::from_secs(1) * 156 / 256);
    }

    #[test]
    fn master_yields_to_higher_priority_and_to_equal_priority_with_higher_address() {
        for (p, src, yields) in
            [(150, "10.0.0.2", true), (100, "10.0.0.2", true), (100, "10.0.0.0", false), (50, "10.0.0.9", false)]
        {
            let t0 = Instant::now();
            let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
            v.handle_startup(t0);
            v.handle_timeout(v.poll_timeout().unwrap());
            drain(&mut v);
            v.handle_advert(t0 + Duration::from_secs(1), heard(src, p));
            let a = drain(&mut v);
            if yields {
                assert_eq!(
                    a,
                    vec![Action::DelAddresses, Action::StateChanged { from: State::Master, to: State::Backup }],
                    "{p} {src}"
                );
            } else {
                assert!(a.is_empty(), "{p} {src}: {a:?}");
                assert_eq!(v.state(), State::Master);
            }
        }
    }

    #[test]
    fn priority_zero_makes_backup_take_over_after_skew() {
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
        v.handle_startup(t0);
        v.handle_advert(t0 + 50 * MS, heard("10.0.0.2", 200));
        v.handle_advert(t0 + 80 * MS, heard("10.0.0.2", 0));
        let t = v.poll_timeout().unwrap();
        assert_eq!(t - (t0 + 80 * MS), 100 * MS * 156 / 256);
        v.handle_timeout(t);
        assert_eq!(v.state(), State::Master);
    }

    #[test]
    fn preempt_and_nopreempt() {
        // Preempting backup of higher priority ignores a lower master: its timer runs out.
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(200, "10.0.0.1", true));
        v.handle_startup(t0);
        let down = v.poll_timeout().unwrap();
        v.handle_advert(t0 + 100 * MS, heard("10.0.0.2", 100));
        assert_eq!(v.poll_timeout(), Some(down), "a lower master does not reset the timer");
        // Without preempt the lower master keeps the address.
        let mut v = Vrrp::new(cfg(200, "10.0.0.1", false));
        v.handle_startup(t0);
        v.handle_advert(t0 + 100 * MS, heard("10.0.0.2", 100));
        assert!(v.poll_timeout().unwrap() > down);
        // With a preempt delay, preemption waits for it.
        let mut c = cfg(200, "10.0.0.1", true);
        c.preempt_delay = Duration::from_secs(10);
        let mut v = Vrrp::new(c);
        v.handle_startup(t0);
        v.handle_advert(t0 + 100 * MS, heard("10.0.0.2", 100));
        assert!(v.poll_timeout().unwrap() > down);
        let last_in_delay = t0 + 9900 * MS;
        v.handle_advert(last_in_delay, heard("10.0.0.2", 100));
        assert_eq!(
            v.poll_timeout(),
            Some(last_in_delay + v.master_down_interval()),
            "within the delay the lower master is followed"
        );
        v.handle_advert(t0 + 10_050 * MS, heard("10.0.0.2", 100));
        assert_eq!(v.poll_timeout(), Some(last_in_delay + v.master_down_interval()), "after the delay, preempt");
    }

    #[test]
    fn clean_stop_sends_priority_zero_and_drops_address() {
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
        v.handle_startup(t0);
        v.handle_timeout(v.poll_timeout().unwrap());
        drain(&mut v);
        v.handle_shutdown(t0 + Duration::from_secs(1));
        assert_eq!(
            drain(&mut v),
            vec![
                Action::SendAdvert { priority: 0 },
                Action::DelAddresses,
                Action::StateChanged { from: State::Master, to: State::Initialize },
            ]
        );
        assert_eq!(v.poll_timeout(), None);
    }

    #[test]
    fn lowered_priority_is_advertised_at_once() {
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(150, "10.0.0.1", true));
        v.handle_startup(t0);
        v.handle_timeout(v.poll_timeout().unwrap());
        drain(&mut v);
        v.set_priority(t0 + Duration::from_secs(1), 50);
        assert_eq!(drain(&mut v), vec![Action::SendAdvert { priority: 50 }]);
        v.handle_advert(t0 + Duration::from_secs(1), heard("10.0.0.0", 100));
        assert_eq!(v.state(), State::Backup);
    }

    fn master(p: u8, addr: &str, t0: Instant) -> Vrrp {
        let mut v = Vrrp::new(cfg(p, addr, true));
        v.handle_startup(t0);
        v.handle_timeout(v.poll_timeout().unwrap());
        drain(&mut v);
        assert_eq!(v.state(), State::Master);
        v
    }

    #[test]
    fn master_keeps_mastership_when_its_priority_is_lowered_above_the_peer() {
        let t0 = Instant::now();
        let mut v = master(150, "10.0.0.1", t0);
        let t = t0 + Duration::from_secs(1);
        v.reconfigure(t, cfg(120, "10.0.0.1", true));
        assert_eq!(drain(&mut v), vec![Action::SendAdvert { priority: 120 }], "advertised at once, no transition");
        assert_eq!(v.poll_timeout(), Some(t + 100 * MS));
        v.handle_advert(t + 10 * MS, heard("10.0.0.2", 100));
        assert!(drain(&mut v).is_empty());
        assert_eq!((v.state(), v.priority(), v.transitions), (State::Master, 120, 2), "no new transition");
    }

    #[test]
    fn master_lowered_below_a_preempting_peer_steps_down_only_when_it_hears_it() {
        let t0 = Instant::now();
        let mut v = master(150, "10.0.0.1", t0);
        let t = t0 + Duration::from_secs(1);
        v.reconfigure(t, cfg(50, "10.0.0.1", true));
        assert_eq!(drain(&mut v), vec![Action::SendAdvert { priority: 50 }]);
        assert_eq!(v.state(), State::Master, "a master never steps down by itself");
        v.handle_timeout(t + 100 * MS);
        assert_eq!(drain(&mut v), vec![Action::SendAdvert { priority: 50 }]);
        // The peer (100, preempting) has let its timer run out and advertises.
        v.handle_advert(t + 400 * MS, heard("10.0.0.2", 100));
        assert_eq!(
            drain(&mut v),
            vec![Action::DelAddresses, Action::StateChanged { from: State::Master, to: State::Backup }]
        );
    }

    #[test]
    fn master_advertises_a_new_interval_at_once() {
        let t0 = Instant::now();
        let mut v = master(150, "10.0.0.1", t0);
        let t = t0 + Duration::from_secs(1) + 30 * MS;
        let mut c = cfg(150, "10.0.0.1", true);
        c.interval = Duration::from_secs(1);
        v.reconfigure(t, c);
        assert_eq!(drain(&mut v), vec![Action::SendAdvert { priority: 150 }]);
        assert_eq!(v.poll_timeout(), Some(t + Duration::from_secs(1)));
        // Preempt settings alone change nothing on the wire.
        let mut c = cfg(150, "10.0.0.1", false);
        c.interval = Duration::from_secs(1);
        c.preempt_delay = Duration::from_secs(5);
        v.reconfigure(t + 10 * MS, c);
        assert!(drain(&mut v).is_empty());
        assert_eq!(v.poll_timeout(), Some(t + Duration::from_secs(1)));
    }

    #[test]
    fn unchanged_config_does_nothing_and_version_and_address_stay() {
        let t0 = Instant::now();
        let mut v = master(150, "10.0.0.1", t0);
        let timer = v.poll_timeout();
        v.reconfigure(t0 + 50 * MS, cfg(150, "10.0.0.1", true));
        assert!(drain(&mut v).is_empty());
        assert_eq!(v.poll_timeout(), timer);
        let mut c = cfg(150, "10.0.0.9", true);
        c.version = Version::V2;
        v.reconfigure(t0 + 60 * MS, c);
        assert!(drain(&mut v).is_empty());
        assert_eq!((v.config().version, v.config().local_addr), (Version::V3, "10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn backup_re_arms_its_master_down_timer_with_the_new_skew() {
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
        v.handle_startup(t0);
        let heard_at = t0 + 50 * MS;
        v.handle_advert(heard_at, heard("10.0.0.2", 200));
        drain(&mut v);
        assert_eq!(v.poll_timeout(), Some(heard_at + 300 * MS + 100 * MS * 156 / 256));
        v.reconfigure(heard_at + 20 * MS, cfg(180, "10.0.0.1", true));
        assert!(drain(&mut v).is_empty(), "a backup sends nothing");
        assert_eq!(v.poll_timeout(), Some(heard_at + 300 * MS + 100 * MS * 76 / 256), "same start, new skew");
        // Its own interval is not used while it follows a v3 master (which advertises 100 ms).
        let mut c = cfg(180, "10.0.0.1", true);
        c.interval = Duration::from_secs(1);
        v.reconfigure(heard_at + 30 * MS, c);
        assert_eq!(v.poll_timeout(), Some(heard_at + 300 * MS + 100 * MS * 76 / 256));
        assert_eq!(v.state(), State::Backup);
        // The master keeps advertising at its higher priority: the backup stays.
        v.handle_advert(heard_at + 100 * MS, heard("10.0.0.2", 200));
        v.handle_timeout(heard_at + 200 * MS);
        assert_eq!(v.state(), State::Backup);
    }

    #[test]
    fn backup_uses_the_new_interval_in_v2_and_before_hearing_a_master() {
        let t0 = Instant::now();
        // v3, nothing heard yet: the new interval sets the master-down time.
        let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
        v.handle_startup(t0);
        let mut c = cfg(100, "10.0.0.1", true);
        c.interval = Duration::from_secs(1);
        v.reconfigure(t0 + 10 * MS, c.clone());
        assert_eq!(v.poll_timeout(), Some(t0 + Duration::from_secs(3) + Duration::from_secs(1) * 156 / 256));
        // v2: the interval is always the configured one.
        let mut c2 = cfg(100, "10.0.0.1", true);
        c2.version = Version::V2;
        c2.interval = Duration::from_secs(1);
        let mut v = Vrrp::new(c2.clone());
        v.handle_startup(t0);
        let heard_at = t0 + 500 * MS;
        v.handle_advert(heard_at, Heard { interval: Duration::from_secs(1), ..heard("10.0.0.2", 200) });
        c2.interval = Duration::from_secs(2);
        v.reconfigure(heard_at + 10 * MS, c2);
        assert_eq!(v.poll_timeout(), Some(heard_at + Duration::from_secs(6) + Duration::from_secs(1) * 156 / 256));
    }

    #[test]
    fn backup_raised_above_the_master_preempts_within_master_down_interval() {
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
        v.handle_startup(t0);
        v.handle_advert(t0 + 50 * MS, heard("10.0.0.2", 150));
        drain(&mut v);
        let t = t0 + 60 * MS;
        v.reconfigure(t, cfg(200, "10.0.0.1", true));
        assert!(drain(&mut v).is_empty());
        // The lower master's adverts no longer reset the timer.
        let mut now = t;
        while v.state() == State::Backup {
            now += 100 * MS;
            v.handle_advert(now, heard("10.0.0.2", 150));
            v.handle_timeout(now);
            assert!(now < t + Duration::from_secs(1), "no takeover");
        }
        assert!(drain(&mut v).contains(&Action::StateChanged { from: State::Backup, to: State::Master }));
        // And with preempt turned off at the same time, it would have stayed backup.
        let mut v = Vrrp::new(cfg(100, "10.0.0.1", true));
        v.handle_startup(t0);
        v.handle_advert(t0 + 50 * MS, heard("10.0.0.2", 150));
        v.reconfigure(t, cfg(200, "10.0.0.1", false));
        for k in 1..20u32 {
            v.handle_advert(t + 100 * MS * k, heard("10.0.0.2", 150));
            v.handle_timeout(t + 100 * MS * k);
        }
        assert_eq!(v.state(), State::Backup);
    }

    #[test]
    fn takeover_starts_as_master_and_advertises_at_once() {
        let t0 = Instant::now();
        let mut v = Vrrp::new(cfg(150, "10.0.0.1", true));
        v.handle_takeover(t0);
        assert_eq!(
            drain(&mut v),
            vec![
                Action::AddAddresses,
                Action::SendAdvert { priority: 150 },
                Action::Announce,
                Action::StateChanged { from: State::Initialize, to: State::Master },
            ]
        );
        assert_eq!(v.poll_timeout(), Some(t0 + 100 * MS));
        // A higher-priority peer still wins, as against any master.
        v.handle_advert(t0 + 10 * MS, heard("10.0.0.2", 200));
        assert_eq!(v.state(), State::Backup);
    }

    #[test]
    fn handover_stop_sends_nothing_and_keeps_the_address() {
        let t0 = Instant::now();
        let mut v = master(150, "10.0.0.1", t0);
        v.handle_handover(t0 + Duration::from_secs(1));
        assert_eq!(drain(&mut v), vec![Action::StateChanged { from: State::Master, to: State::Initialize }]);
        assert_eq!(v.poll_timeout(), None);
    }

    /// A change of configuration, applied to one router at a given time.
    #[derive(Debug, Clone)]
    struct Reconf {
        at_ms: u64,
        which: bool,
        priority: u8,
        interval_ms: u64,
        preempt: bool,
    }

    /// Two routers joined by a perfect link, in virtual time, with kills and reconfigurations
    /// injected: once adverts have had time to cross, at most one is master (and one if any
    /// is alive), and with preemption the higher priority ends up master. Returns how many
    /// state changes each router made.
    fn simulate(
        p1: u8,
        p2: u8,
        preempt: bool,
        kills: &[(u64, bool)],
        reconfs: &[Reconf],
    ) -> Result<[u64; 2], TestCaseError> {
        let t0 = Instant::now();
        let mut r = [Vrrp::new(cfg(p1, "10.0.0.1", preempt)), Vrrp::new(cfg(p2, "10.0.0.2", preempt))];
        let addrs = ["10.0.0.1", "10.0.0.2"];
        let mut alive = [true, true];
        let mut changes = [0u64; 2];
        r[0].handle_startup(t0);
        r[1].handle_startup(t0 + 7 * MS);
        let mut now = t0;
        let end = t0 + Duration::from_secs(25);
        let mut last_change = t0;
        let mut applied = vec![false; reconfs.len()];
        // Long enough for any master-down interval in play (intervals up to 400 ms).
        let settle = Duration::from_secs(2);
        while now < end {
            for &(at, which) in kills {
                let i = usize::from(which);
                if now >= t0 + Duration::from_millis(at) && alive[i] {
                    alive[i] = false;
                    r[i].handle_shutdown(now);
                }
            }
            for (k, c) in reconfs.iter().enumerate() {
                if !applied[k] && now >= t0 + Duration::from_millis(c.at_ms) {
                    applied[k] = true;
                    let i = usize::from(c.which);
                    let mut n = cfg(c.priority, addrs[i], c.preempt);
                    n.interval = Duration::from_millis(c.interval_ms);
                    r[i].reconfigure(now, n);
                    last_change = last_change.max(now);
                }
            }
            for i in 0..2 {
                if alive[i] {
                    r[i].handle_timeout(now);
                }
                while let Some(a) = r[i].poll_action() {
                    match a {
                        Action::SendAdvert { priority } if alive[1 - i] => {
                            let h = Heard { interval: r[i].config().interval, ..heard(addrs[i], priority) };
                            r[1 - i].handle_advert(now, h)
                        }
                        Action::StateChanged { .. } => {
                            last_change = now;
                            changes[i] += 1;
                        }
                        _ => {}
                    }
                }
            }
            let masters = (0..2).filter(|&i| alive[i] && r[i].state() == State::Master).count();
            if now > last_change + settle {
                prop_assert!(masters <= 1, "two masters at {:?}", now - t0);
                let live: Vec<usize> = (0..2).filter(|&i| alive[i]).collect();
                prop_assert_eq!(masters, usize::from(!live.is_empty()), "no master at {:?}", now - t0);
            }
            now += 10 * MS;
        }
        let live: Vec<usize> = (0..2).filter(|&i| alive[i]).collect();
        // With equal priorities the first master stays (a backup accepts `>=`, RFC 5798 §6.4.2).
        let (q1, q2) = (r[0].priority(), r[1].priority());
        let all_preempt = r.iter().all(|v| v.config().preempt);
        if live.len() == 2 && all_preempt && q1 != q2 {
            let winner = if q1 > q2 { 0 } else { 1 };
            prop_assert_eq!(r[winner].state(), State::Master, "priorities {} {}", q1, q2);
        }
        Ok(changes)
    }

    fn reconf() -> impl Strategy<Value = Reconf> {
        (0u64..15000, any::<bool>(), 1u8..=254, prop::sample::select(vec![50u64, 100, 200, 400]), any::<bool>())
            .prop_map(|(at_ms, which, priority, interval_ms, preempt)| Reconf {
                at_ms,
                which,
                priority,
                interval_ms,
                preempt,
            })
    }

    proptest! {
        #[test]
        fn one_master_eventually(p1 in 1u8..=254, p2 in 1u8..=254, preempt in any::<bool>(),
                                 kills in proptest::collection::vec((0u64..15000, any::<bool>()), 0..2)) {
            simulate(p1, p2, preempt, &kills, &[])?;
        }

        /// Any reconfigurations, with or without kills: never two masters once settled.
        #[test]
        fn reconfiguration_never_yields_two_masters(p1 in 1u8..=254, p2 in 1u8..=254, preempt in any::<bool>(),
                                 kills in proptest::collection::vec((0u64..15000, any::<bool>()), 0..2),
                                 reconfs in proptest::collection::vec(reconf(), 0..4)) {
            simulate(p1, p2, preempt, &kills, &reconfs)?;
        }

        /// Reconfigurations that keep the master's priority above the backup's (any intervals,
        /// preempt on or off, on either router) cause no transition at all: mastership is kept.
        #[test]
        fn reconfiguration_keeps_mastership(hi in 2u8..=254, lo_frac in 0.0f64..1.0,
                                 reconfs in proptest::collection::vec(reconf(), 1..4)) {
            let lo = 1 + ((f64::from(hi - 1) * lo_frac) as u8).min(hi - 2);
            let mut reconfs = reconfs;
            // Router 0 (the master) stays in (lo, 254], router 1 in [1, lo]; reconfigure after
            // the election (which takes at most 1 s here).
            for c in reconfs.iter_mut() {
                c.at_ms = 1500 + c.at_ms;
                c.priority = if c.which { 1 + c.priority % lo } else { lo + 1 + c.priority % (255 - lo - 1) };
            }
            let changes = simulate(hi, lo, true, &[], &reconfs)?;
            prop_assert_eq!(changes, [2, 1], "startup -> backup -> master, startup -> backup only");
        }
    }
}
