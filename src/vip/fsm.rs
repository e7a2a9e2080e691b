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
        self.master_down_timer = Some(now + self.master_down_interval());
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

    /// Clean stop: a master hands over at once with a priority-0 advertisement.
    pub fn handle_shutdown(&mut self, _now: Instant) {
        if self.state == State::Master {
            self.actions.push_back(Action::SendAdvert { priority: 0 });
            self.actions.push_back(Action::DelAddresses);
        }
        self.adver_timer = None;
        self.master_down_timer = None;
        self.go(State::Initialize);
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
                    self.master_down_timer = Some(now + self.skew());
                    self.master_seen = None;
                } else if !self.cfg.preempt || h.priority >= self.priority || self.in_preempt_delay(now) {
                    if self.cfg.version == Version::V3 {
                        self.master_adver_interval = h.interval;
                    }
                    self.master_down_timer = Some(now + self.master_down_interval());
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

    /// Two routers joined by a perfect link, in virtual time: whatever happens, at most one is
    /// master once adverts have had time to cross, and the higher priority wins.
    fn simulate(p1: u8, p2: u8, preempt: bool, kills: &[(u64, bool)]) -> Result<(), TestCaseError> {
        let t0 = Instant::now();
        let mut r = [Vrrp::new(cfg(p1, "10.0.0.1", preempt)), Vrrp::new(cfg(p2, "10.0.0.2", preempt))];
        let addrs = ["10.0.0.1", "10.0.0.2"];
        let mut alive = [true, true];
        r[0].handle_startup(t0);
        r[1].handle_startup(t0 + 7 * MS);
        let mut now = t0;
        let end = t0 + Duration::from_secs(20);
        let mut last_change = t0;
        while now < end {
            for &(at, which) in kills {
                let i = usize::from(which);
                if now >= t0 + Duration::from_millis(at) && alive[i] {
                    alive[i] = false;
                    r[i].handle_shutdown(now);
                }
            }
            for i in 0..2 {
                if alive[i] {
                    r[i].handle_timeout(now);
                }
                while let Some(a) = r[i].poll_action() {
                    match a {
                        Action::SendAdvert { priority } if alive[1 - i] => {
                            r[1 - i].handle_advert(now, heard(addrs[i], priority))
                        }
                        Action::StateChanged { .. } => last_change = now,
                        _ => {}
                    }
                }
            }
            let masters = (0..2).filter(|&i| alive[i] && r[i].state() == State::Master).count();
            if now > last_change + Duration::from_secs(1) {
                prop_assert!(masters <= 1, "two masters at {:?}", now - t0);
                let live: Vec<usize> = (0..2).filter(|&i| alive[i]).collect();
                prop_assert_eq!(masters, usize::from(!live.is_empty()), "no master at {:?}", now - t0);
            }
            now += 10 * MS;
        }
        let live: Vec<usize> = (0..2).filter(|&i| alive[i]).collect();
        // With equal priorities the first master stays (a backup accepts `>=`, RFC 5798 §6.4.2).
        if live.len() == 2 && preempt && p1 != p2 {
            let winner = if p1 > p2 { 0 } else { 1 };
            prop_assert_eq!(r[winner].state(), State::Master);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn one_master_eventually(p1 in 1u8..=254, p2 in 1u8..=254, preempt in any::<bool>(),
                                 kills in proptest::collection::vec((0u64..15000, any::<bool>()), 0..2)) {
            simulate(p1, p2, preempt, &kills)?;
        }
    }
}
