//! Pure: what a cluster looks like and which members may take connections for each role.
//!
//! `ClusterState` is what Patroni's keys say; `ClusterView` adds what pgfront learned itself
//! (a leader confirmed primary by a direct check) and derives, for a listener role, the
//! servers that may take *new* connections (`eligible`) and the servers whose *existing*
//! connections may stay open (`keep`). Everything that is in neither is drained.
//!
//! Invariants:
//! - a primary is eligible only when it holds the leader key, runs, and is known to run as a
//!   primary (its member entry, or a direct confirmation of this very leader);
//! - while a manual switchover is pending (`failover` key) the current leader takes no new
//!   connections, but its open connections are kept: Patroni has not demoted it yet;
//! - a member that holds the leader key is never a replica.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::config::Role;

/// A member's role as Patroni reports it; 3.0 writes `master`, later versions `primary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Primary,
    /// Promotion requested, not yet finished.
    Promoted,
    Replica,
    StandbyLeader,
    Demoted,
    Other,
}

impl MemberRole {
    pub fn parse(s: &str) -> MemberRole {
        match s {
            "master" | "primary" => MemberRole::Primary,
            "promoted" => MemberRole::Promoted,
            "replica" => MemberRole::Replica,
            "standby_leader" => MemberRole::StandbyLeader,
            "demoted" => MemberRole::Demoted,
            _ => MemberRole::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub name: String,
    /// Resolved address of `conn_url`; `None` until a host name is resolved.
    pub addr: Option<SocketAddr>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub api_url: Option<String>,
    pub role: MemberRole,
    pub state: String,
    pub timeline: Option<u64>,
    /// WAL position: written (primary) or received/replayed (replica).
    pub lsn: Option<u64>,
    pub noloadbalance: bool,
    pub nofailover: bool,
}

impl Member {
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// A pending manual failover or switchover (`patronictl switchover` writes it first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failover {
    pub leader: Option<String>,
    pub candidate: Option<String>,
    pub scheduled: bool,
}

/// What Patroni's keys say about one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterState {
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    pub failover: Option<Failover>,
    pub leader_optime: Option<u64>,
}

/// A server a listener can connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub member: Arc<str>,
    pub addr: SocketAddr,
}

impl Backend {
    fn of(m: &Member) -> Option<Backend> {
        m.addr.map(|addr| Backend { member: Arc::from(m.name.as_str()), addr })
    }
}

/// Where a listener may send connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Targets {
    pub eligible: Vec<Backend>,
    pub keep: Vec<Backend>,
}

/// Why the primary is, or is not, routable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrimaryStatus {
    Routable,
    NoLeader,
    /// The leader key names a member with no (usable) member entry.
    LeaderUnknown,
    LeaderNotRunning,
    /// The leader runs but has not been seen as a primary yet.
    Promoting,
    /// A manual switchover is pending: no new connections to the current leader.
    SwitchoverPending,
}

/// A cluster as pgfront routes it: Patroni's state plus pgfront's own confirmation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub state: ClusterState,
    /// A leader confirmed to run as primary by a direct check, ahead of its member entry.
    pub confirmed: Option<String>,
}

impl ClusterView {
    pub fn leader(&self) -> Option<&Member> {
        self.state.leader.as_ref().and_then(|l| self.state.members.get(l))
    }

    pub fn primary_status(&self) -> PrimaryStatus {
        let Some(name) = &self.state.leader else { return PrimaryStatus::NoLeader };
        let Some(m) = self.state.members.get(name).filter(|m| m.addr.is_some()) else {
            return PrimaryStatus::LeaderUnknown;
        };
        if !m.running() {
            return PrimaryStatus::LeaderNotRunning;
        }
        if self.switchover_pending(name) {
            return PrimaryStatus::SwitchoverPending;
        }
        if self.runs_as_primary(m) {
            PrimaryStatus::Routable
        } else {
            PrimaryStatus::Promoting
        }
    }

    /// The member that takes new primary connections, if any.
    pub fn primary(&self) -> Option<&Member> {
        (self.primary_status() == PrimaryStatus::Routable).then(|| self.leader()).flatten()
    }

    /// The leader, when it runs but is not yet known as a primary and its promotion can be
    /// confirmed by a direct check.
    pub fn awaiting_confirmation(&self) -> Option<&Member> {
        (self.primary_status() == PrimaryStatus::Promoting)
            .then(|| self.leader())
            .flatten()
            .filter(|m| matches!(m.role, MemberRole::Replica | MemberRole::Promoted))
    }

    fn runs_as_primary(&self, m: &Member) -> bool {
        m.role == MemberRole::Primary
            || (matches!(m.role, MemberRole::Replica | MemberRole::Promoted)
                && self.confirmed.as_deref() == Some(&m.name))
    }

    fn switchover_pending(&self, leader: &str) -> bool {
        self.state.failover.as_ref().is_some_and(|f| {
            !f.scheduled && f.leader.as_deref().is_none_or(|l| l == leader) && f.candidate.as_deref() != Some(leader)
        })
    }

    /// The most advanced WAL position known: the reference for replica lag.
    fn reference_lsn(&self) -> Option<u64> {
        self.state.members.values().filter_map(|m| m.lsn).chain(self.state.leader_optime).max()
    }

    /// Bytes a member is behind the most advanced known position.
    pub fn lag(&self, m: &Member) -> Option<u64> {
        Some(self.reference_lsn()?.saturating_sub(m.lsn?))
    }

    fn replicas(&self) -> impl Iterator<Item = &Member> {
        let leader = self.state.leader.as_deref();
        self.state
            .members
            .values()
            .filter(move |m| m.role == MemberRole::Replica && m.running() && Some(m.name.as_str()) != leader)
    }

    /// The servers a listener of `role` may use; `max_lag` applies to replicas.
    pub fn targets(&self, role: Role, max_lag: Option<u64>) -> Targets {
        let primary_keep = || self.leader().filter(|m| m.running() && self.runs_as_primary(m)).and_then(Backend::of);
        let replicas = || {
            let eligible = self
                .replicas()
                .filter(|m| !m.noloadbalance)
                .filter(|m| max_lag.is_none_or(|max| self.lag(m).is_some_and(|lag| lag <= max)))
                .filter_map(Backend::of)
                .collect::<Vec<_>>();
            let keep = self.replicas().filter_map(Backend::of).collect::<Vec<_>>();
            (eligible, keep)
        };
        match role {
            Role::Primary => Targets {
                eligible: self.primary().and_then(Backend::of).into_iter().collect(),
                keep: primary_keep().into_iter().collect(),
            },
            Role::Replica => {
                let (eligible, keep) = replicas();
                Targets { eligible, keep }
            }
            Role::ReadOnly => {
                let (mut eligible, mut keep) = replicas();
                if eligible.is_empty() {
                    eligible.extend(self.primary().and_then(Backend::of));
                }
                keep.extend(primary_keep());
                Targets { eligible, keep }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(name: &str, port: u16, role: MemberRole, lsn: u64) -> Member {
        Member {
            name: name.into(),
            addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            host: Some("127.0.0.1".into()),
            port: Some(port),
            api_url: None,
            role,
            state: "running".into(),
            timeline: Some(1),
            lsn: Some(lsn),
            noloadbalance: false,
            nofailover: false,
        }
    }

    fn view(leader: Option<&str>, members: Vec<Member>) -> ClusterView {
        ClusterView {
            state: ClusterState {
                leader: leader.map(Into::into),
                members: members.into_iter().map(|m| (m.name.clone(), m)).collect(),
                failover: None,
                leader_optime: None,
            },
            confirmed: None,
        }
    }

    fn names(b: &[Backend]) -> Vec<&str> {
        b.iter().map(|b| &*b.member).collect()
    }

    fn three() -> ClusterView {
        view(
            Some("pg1"),
            vec![
                member("pg1", 1, MemberRole::Primary, 1000),
                member("pg2", 2, MemberRole::Replica, 990),
                member("pg3", 3, MemberRole::Replica, 500),
            ],
        )
    }

    #[test]
    fn steady_state() {
        let v = three();
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);
        let t = v.targets(Role::Primary, None);
        assert_eq!((names(&t.eligible), names(&t.keep)), (vec!["pg1"], vec!["pg1"]));
        let t = v.targets(Role::Replica, None);
        assert_eq!(names(&t.eligible), vec!["pg2", "pg3"]);
        let t = v.targets(Role::Replica, Some(100));
        assert_eq!((names(&t.eligible), names(&t.keep)), (vec!["pg2"], vec!["pg2", "pg3"]));
        assert_eq!(names(&v.targets(Role::ReadOnly, Some(0)).eligible), vec!["pg1"]);
    }

    #[test]
    fn new_leader_still_replica_is_held_until_confirmed() {
        let mut v = three();
        v.state.leader = Some("pg2".into());
        v.state.members.get_mut("pg1").unwrap().role = MemberRole::Demoted;
        assert_eq!(v.primary_status(), PrimaryStatus::Promoting);
        assert_eq!(v.awaiting_confirmation().map(|m| m.name.as_str()), Some("pg2"));
        let t = v.targets(Role::Primary, None);
        assert!(t.eligible.is_empty() && t.keep.is_empty(), "old primary drained, new not yet routable");
        // The leader is no replica any more, nor is the demoted old primary.
        assert_eq!(names(&v.targets(Role::Replica, None).eligible), vec!["pg3"]);
        v.confirmed = Some("pg2".into());
        assert_eq!(names(&v.targets(Role::Primary, None).eligible), vec!["pg2"]);
        // A confirmation of another member does not count.
        v.confirmed = Some("pg3".into());
        assert_eq!(v.primary_status(), PrimaryStatus::Promoting);
    }

    #[test]
    fn pending_switchover_holds_new_but_keeps_open_connections() {
        let mut v = three();
        v.state.failover =
            Some(Failover { leader: Some("pg1".into()), candidate: Some("pg2".into()), scheduled: false });
        assert_eq!(v.primary_status(), PrimaryStatus::SwitchoverPending);
        let t = v.targets(Role::Primary, None);
        assert_eq!((names(&t.eligible), names(&t.keep)), (vec![], vec!["pg1"]));
        // Once pg2 holds the key the stale failover key no longer matters.
        v.state.leader = Some("pg2".into());
        v.state.members.get_mut("pg2").unwrap().role = MemberRole::Primary;
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);
        // A scheduled switchover is not a signal yet.
        v.state.leader = Some("pg1".into());
        v.state.failover.as_mut().unwrap().scheduled = true;
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);
    }

    #[test]
    fn failover_without_leader_field_holds_the_current_leader() {
        let mut v = three();
        v.state.failover = Some(Failover { leader: None, candidate: Some("pg3".into()), scheduled: false });
        assert_eq!(v.primary_status(), PrimaryStatus::SwitchoverPending);
    }

    #[test]
    fn leader_gone_or_stopped() {
        let mut v = three();
        v.state.leader = None;
        assert_eq!(v.primary_status(), PrimaryStatus::NoLeader);
        assert!(v.targets(Role::Primary, None).keep.is_empty());
        let mut v = three();
        v.state.members.get_mut("pg1").unwrap().state = "stopping".into();
        assert_eq!(v.primary_status(), PrimaryStatus::LeaderNotRunning);
        assert!(v.targets(Role::Primary, None).keep.is_empty());
        let mut v = three();
        v.state.members.remove("pg1");
        assert_eq!(v.primary_status(), PrimaryStatus::LeaderUnknown);
    }

    #[test]
    fn noloadbalance_replica_is_kept_but_not_eligible() {
        let mut v = three();
        v.state.members.get_mut("pg2").unwrap().noloadbalance = true;
        let t = v.targets(Role::Replica, None);
        assert_eq!((names(&t.eligible), names(&t.keep)), (vec!["pg3"], vec!["pg2", "pg3"]));
    }

    fn arb_role() -> impl Strategy<Value = MemberRole> {
        prop_oneof![
            Just(MemberRole::Primary),
            Just(MemberRole::Promoted),
            Just(MemberRole::Replica),
            Just(MemberRole::Demoted),
            Just(MemberRole::StandbyLeader),
            Just(MemberRole::Other),
        ]
    }

    prop_compose! {
        fn arb_view()(
            ms in proptest::collection::vec((arb_role(), any::<bool>(), any::<bool>(), 0u64..2000), 0..5),
            leader in proptest::option::of(0usize..6),
            failover in proptest::option::of((proptest::option::of(0usize..6), proptest::option::of(0usize..6), any::<bool>())),
            confirmed in proptest::option::of(0usize..6),
        ) -> ClusterView {
            let name = |i: usize| format!("pg{i}");
            let members = ms.iter().enumerate().map(|(i, (role, running, nolb, lsn))| {
                let mut m = member(&name(i), 5000 + i as u16, *role, *lsn);
                if !running { m.state = "stopped".into(); }
                m.noloadbalance = *nolb;
                m
            }).collect();
            let mut v = view(leader.map(name).as_deref(), members);
            v.state.failover = failover.map(|(l, c, s)| Failover { leader: l.map(name), candidate: c.map(name), scheduled: s });
            v.confirmed = confirmed.map(name);
            v
        }
    }

    proptest! {
        #[test]
        fn primary_targets_are_safe(v in arb_view(), lag in proptest::option::of(0u64..3000)) {
            let t = v.targets(Role::Primary, None);
            prop_assert!(t.eligible.len() <= 1);
            if let Some(b) = t.eligible.first() {
                // Only the leader, running, seen or confirmed as primary.
                prop_assert_eq!(Some(&*b.member), v.state.leader.as_deref());
                let m = &v.state.members[&*b.member];
                prop_assert!(m.running());
                prop_assert!(m.role == MemberRole::Primary || v.confirmed.as_deref() == Some(&m.name));
                prop_assert!(t.keep.contains(b), "an eligible primary is also kept");
            }
            for role in [Role::Replica, Role::ReadOnly] {
                let t = v.targets(role, lag);
                for b in &t.eligible {
                    let m = &v.state.members[&*b.member];
                    prop_assert!(m.running());
                    let is_primary = Some(&*b.member) == v.primary().map(|p| p.name.as_str());
                    if role == Role::Replica || !is_primary {
                        prop_assert_eq!(m.role, MemberRole::Replica);
                        prop_assert!(Some(&*b.member) != v.state.leader.as_deref());
                        prop_assert!(!m.noloadbalance);
                        if let Some(max) = lag { prop_assert!(v.lag(m).unwrap() <= max); }
                    }
                    prop_assert!(t.keep.contains(b));
                }
            }
        }
    }
}
