//! Pure: what a cluster looks like and which members may take connections for each role.
//!
//! `ClusterState` is what Patroni's keys say; `ClusterView` adds what pgfront learned itself
//! (a leader confirmed primary by a direct check) and derives, for a listener role, the
//! servers that may take *new* connections (`eligible`) and the servers whose *existing*
//! connections may stay open (`keep`). Everything that is in neither is drained.
//!
//! The leader comes from Patroni's leader key, or, for a cluster whose roles come from
//! `pgfront agent` (`source = "agent"`), from `elect`: the single running node that claims
//! primary on the highest timeline. Two claimants on that timeline are a split brain: no
//! leader at all, never a guess.
//!
//! Invariants:
//! - a primary is eligible only when it holds the leader key (or is elected by `elect`), runs,
//!   and is known to run as a primary (its member entry, or a direct confirmation of this very
//!   leader);
//! - in a split brain no claimant takes new connections and none keeps its sessions;
//! - a member in maintenance (`pgfront agent drain`) takes no new connections, its sessions
//!   are kept;
//! - a fenced member (a `fence` request of `pgfront agent pre-promote`, while its key exists)
//!   is never a primary target: no new connections, its primary sessions are closed;
//! - while this proxy's fencing registration may have lapsed (`unregistered`, see
//!   `discovery::fence`) no member is a primary target and no primary session is kept:
//!   `pgfront agent pre-promote` no longer waits for a proxy whose registration is gone;
//! - while a manual switchover is pending (`failover` key) the current leader takes no new
//!   connections, but its open connections are kept: Patroni has not demoted it yet;
//! - a member that holds the leader key is never a replica;
//! - while etcd is unreachable the last keys are trusted only as far as a direct check of the
//!   primary allows: found read-only, it takes no new connections and its sessions are drained;
//!   check connection lost, it takes no new connections (its sessions are kept); no answer
//!   yet or found writable, it stays routed;
//! - after etcd is back the check's verdict (writable or read-only) still stands for a grace
//!   period (Patroni's ttl, ended by the cluster task through `handle_grace_over`), unless
//!   etcd names another leader, or, for a read-only verdict, Patroni rewrites the member's
//!   entry. The first reads after an outage show keys from before it: a demoted primary still
//!   named leader until etcd revokes the expired lease, then no leader at all until Patroni
//!   (a failsafe primary) takes the key again. Neither may route clients to a read-only server
//!   or drain a primary that runs writable.

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
    /// `pgfront agent drain`: no new connections, open ones kept (agent keys only).
    pub maintenance: bool,
    /// Bytes behind its upstream as the agent measured it (agent keys only); when absent the
    /// lag is computed from the WAL positions.
    pub lag_bytes: Option<u64>,
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

/// A fencing request (`<prefix>fence`, written by `pgfront agent pre-promote` before a
/// promotion): while it exists, no member but `new_primary` may be a primary target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fence {
    pub id: String,
    pub new_primary: String,
    /// `None`: every member other than `new_primary` is fenced.
    pub old_primary: Option<String>,
}

impl Fence {
    /// Whether `member` may not be a primary target while this fence holds.
    pub fn fences(&self, member: &str) -> bool {
        member != self.new_primary && self.old_primary.as_deref().is_none_or(|o| o == member)
    }
}

/// Who the agents' keys name as primary (`elect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    None,
    Leader(String),
    /// Two or more running members claim primary on the highest timeline (sorted names).
    SplitBrain(Vec<String>),
}

/// The topology rule for agent keys: the primary is the single running member that claims
/// primary on the highest timeline among the claimants (an unknown timeline ranks below any
/// known one). Members in maintenance count as claimants: a drained primary is still a
/// primary, so a second one beside it is a split brain, not a winner.
pub fn elect<'a>(members: impl IntoIterator<Item = &'a Member>) -> Election {
    let claimants: Vec<&Member> =
        members.into_iter().filter(|m| m.running() && m.role == MemberRole::Primary).collect();
    let Some(top) = claimants.iter().map(|m| m.timeline).max() else { return Election::None };
    let mut on_top: Vec<String> = claimants.iter().filter(|m| m.timeline == top).map(|m| m.name.clone()).collect();
    on_top.sort();
    match on_top.len() {
        1 => Election::Leader(on_top.remove(0)),
        _ => Election::SplitBrain(on_top),
    }
}

/// What Patroni's keys (or the agents') say about one cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterState {
    pub leader: Option<String>,
    /// Agent keys: the members that claim primary together on the highest timeline (empty
    /// unless there are two or more; `leader` is then `None`).
    pub split_brain: Vec<String>,
    /// A fencing request in force.
    pub fence: Option<Fence>,
    pub members: BTreeMap<String, Member>,
    pub failover: Option<Failover>,
    pub leader_optime: Option<u64>,
    /// Patroni's `ttl` (seconds) from the `config` key: how long a leader key outlives its
    /// holder's last refresh.
    pub ttl: Option<u64>,
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
    /// Agent keys: two or more members claim primary on the highest timeline; none is routed.
    SplitBrain,
    /// The primary is in maintenance (`pgfront agent drain`): no new connections, sessions kept.
    Maintenance,
    /// A fencing request names the leader (a promotion elsewhere is under way): no new
    /// connections, its sessions are closed.
    Fenced,
    /// A manual switchover is pending: no new connections to the current leader.
    SwitchoverPending,
    /// This proxy's fencing registration may have expired in etcd (`source = "agent"`, its
    /// keep-alive unanswered for about the lease's TTL): a promotion may go ahead without its
    /// acknowledgement, so it routes no primary connection and closes its primary sessions
    /// until it is registered again and has read etcd.
    Unregistered,
    /// etcd is unreachable and the direct check of the primary lost its connection (or cannot
    /// make one): Patroni may be demoting it, so no new connections until a check answers.
    Unconfirmed,
    /// A direct check found the primary read-only: Patroni demoted it while etcd was
    /// unreachable. No new connections, and its sessions are drained.
    ReadOnly,
}

/// What a direct check of the routed primary said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    /// No answer yet: the last keys stand.
    Pending,
    Writable,
    ReadOnly,
    /// The check's connection was lost or could not be made.
    Lost,
}

/// A direct check of the member that was the routable primary when etcd became unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrimaryCheck {
    pub member: String,
    pub result: CheckResult,
    /// The member's entry when the check began: a read-only verdict outlives the outage only
    /// while etcd still shows this entry.
    #[serde(skip)]
    entry: Member,
}

/// A cluster as pgfront routes it: Patroni's state plus pgfront's own confirmation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub state: ClusterState,
    /// A leader confirmed to run as primary by a direct check, ahead of its member entry.
    pub confirmed: Option<String>,
    /// etcd could not be read at the last attempt: `state` is the last one known.
    pub etcd_down: bool,
    /// The direct check of the primary, while etcd is unreachable (and a read-only verdict
    /// after it; see the module docs).
    pub check: Option<PrimaryCheck>,
    /// This proxy's fencing registration may have lapsed (set by the cluster task, see
    /// `PrimaryStatus::Unregistered`): nothing is routed or kept for the primary role.
    pub unregistered: bool,
}

/// Two entries of a member are the same if etcd shows the same values (the address may have
/// been filled in by a lookup since).
fn same_entry(a: &Member, b: &Member) -> bool {
    Member { addr: None, ..a.clone() } == Member { addr: None, ..b.clone() }
}

impl ClusterView {
    pub fn leader(&self) -> Option<&Member> {
        self.state.leader.as_ref().and_then(|l| self.state.members.get(l))
    }

    /// etcd answered with `state`: Patroni's keys decide again, but for a verdict of the
    /// direct check that outlives the outage (see the module docs).
    pub fn handle_keys(&mut self, state: ClusterState) {
        if state.leader != self.state.leader {
            self.confirmed = None;
        }
        if std::mem::replace(&mut self.etcd_down, false) {
            // No answer, or no connection: etcd's keys decide.
            self.check =
                self.check.take().filter(|c| matches!(c.result, CheckResult::Writable | CheckResult::ReadOnly));
        }
        if self.check.as_ref().is_some_and(|c| {
            c.result == CheckResult::ReadOnly && state.members.get(&c.member).is_some_and(|m| !same_entry(m, &c.entry))
        }) {
            // Patroni rewrote the demoted member's entry: it is in charge again.
            self.check = None;
        }
        self.state = state;
        self.settle();
    }

    /// The grace period after etcd came back is over: Patroni's keys decide.
    pub fn handle_grace_over(&mut self) {
        if !self.etcd_down {
            self.check = None;
        }
    }

    /// A verdict of the direct check is standing while etcd answers (the cluster task runs
    /// the grace timer while this is true).
    pub fn in_grace(&self) -> bool {
        !self.etcd_down && self.check.is_some()
    }

    /// etcd could not be read: the routable primary, if any, is to be checked directly.
    pub fn handle_etcd_down(&mut self) {
        self.etcd_down = true;
        self.settle();
    }

    /// A direct check of `member` said `result`.
    pub fn handle_check(&mut self, member: &str, result: CheckResult) {
        if let Some(c) = self.check.as_mut().filter(|c| c.member == member) {
            c.result = result;
        }
    }

    /// A direct check found `member` promoted (see `awaiting_confirmation`).
    pub fn handle_confirmed(&mut self, member: &str) {
        if self.state.leader.as_deref() == Some(member) {
            self.confirmed = Some(member.to_owned());
            self.settle();
        }
    }

    /// The member to check directly, if any (its entry from before the outage when etcd no
    /// longer has one).
    pub fn check_target(&self) -> Option<&Member> {
        self.check.as_ref().map(|c| self.state.members.get(&c.member).unwrap_or(&c.entry))
    }

    fn settle(&mut self) {
        // A check ends when etcd names another leader.
        if self.check.as_ref().is_some_and(|c| self.state.leader.as_ref().is_some_and(|l| l != &c.member)) {
            self.check = None;
        }
        if self.etcd_down && self.check.is_none() && self.keys_status() == PrimaryStatus::Routable {
            if let Some(m) = self.leader() {
                self.check =
                    Some(PrimaryCheck { member: m.name.clone(), result: CheckResult::Pending, entry: m.clone() });
            }
        }
    }

    /// The direct check's verdict; it concerns the leader, or the last one when etcd names
    /// none (`settle` ends a check when etcd names another leader).
    fn verdict(&self) -> Option<CheckResult> {
        self.check.as_ref().map(|c| c.result)
    }

    pub fn primary_status(&self) -> PrimaryStatus {
        if self.unregistered {
            return PrimaryStatus::Unregistered;
        }
        match (self.keys_status(), self.verdict()) {
            (PrimaryStatus::Routable, Some(CheckResult::Lost)) => PrimaryStatus::Unconfirmed,
            (PrimaryStatus::Routable, Some(CheckResult::ReadOnly)) => PrimaryStatus::ReadOnly,
            // The leader key expired while etcd was unreachable; the primary runs writable
            // (failsafe_mode) and Patroni is about to take the key again.
            (PrimaryStatus::NoLeader | PrimaryStatus::LeaderUnknown, Some(CheckResult::Writable)) => {
                PrimaryStatus::Routable
            }
            (s, _) => s,
        }
    }

    /// The leader's entry, or the checked member's from before the outage when etcd has none.
    fn leader_or_checked(&self) -> Option<&Member> {
        self.leader().or_else(|| self.check.as_ref().map(|c| &c.entry))
    }

    /// What Patroni's keys (and a promotion confirmed by pgfront) say of the primary.
    fn keys_status(&self) -> PrimaryStatus {
        let Some(name) = &self.state.leader else {
            return if self.state.split_brain.is_empty() { PrimaryStatus::NoLeader } else { PrimaryStatus::SplitBrain };
        };
        let Some(m) = self.state.members.get(name).filter(|m| m.addr.is_some()) else {
            return PrimaryStatus::LeaderUnknown;
        };
        if !m.running() {
            return PrimaryStatus::LeaderNotRunning;
        }
        if self.fenced(name) {
            return PrimaryStatus::Fenced;
        }
        if m.maintenance {
            return PrimaryStatus::Maintenance;
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
        (self.primary_status() == PrimaryStatus::Routable)
            .then(|| self.leader_or_checked())
            .flatten()
            .filter(|m| !self.fenced(&m.name))
    }

    /// Whether a fencing request in force names `member`.
    pub fn fenced(&self, member: &str) -> bool {
        self.state.fence.as_ref().is_some_and(|f| f.fences(member))
    }

    /// The member whose open primary connections stay open, if any.
    fn kept_primary(&self) -> Option<&Member> {
        if self.unregistered {
            return None;
        }
        self.kept_primary_unfenced().filter(|m| !self.fenced(&m.name))
    }

    fn kept_primary_unfenced(&self) -> Option<&Member> {
        match (self.leader(), self.verdict()) {
            (_, Some(CheckResult::ReadOnly)) => None,
            (Some(m), _) => (m.running() && self.runs_as_primary(m)).then_some(m),
            (None, Some(CheckResult::Writable)) => self.leader_or_checked(),
            (None, _) => None,
        }
    }

    /// The leader, when it runs but is not yet known as a primary and its promotion can be
    /// confirmed by a direct check.
    pub fn awaiting_confirmation(&self) -> Option<&Member> {
        (self.keys_status() == PrimaryStatus::Promoting)
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
        m.lag_bytes.or_else(|| Some(self.reference_lsn()?.saturating_sub(m.lsn?)))
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
        self.targets_without(role, max_lag, &|_| false)
    }

    /// `targets`, with the members for which `out` is true (an operator's `pgfront drain`)
    /// never eligible: decided before the read-only fallback, so a read-only listener whose
    /// replicas are all drained falls back to the primary, as with agent maintenance. Their
    /// place in `keep` is left to the caller (`balancer::maintenance::restrict`).
    pub fn targets_without(&self, role: Role, max_lag: Option<u64>, out: &dyn Fn(&str) -> bool) -> Targets {
        let primary_keep = || self.kept_primary().and_then(Backend::of);
        let replicas = || {
            let eligible = self
                .replicas()
                .filter(|m| !m.noloadbalance && !m.maintenance && !out(&m.name))
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
                    eligible.extend(self.primary().filter(|m| !out(&m.name)).and_then(Backend::of));
                }
                keep.extend(primary_keep());
                Targets { eligible, keep }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn member(name: &str, port: u16, role: MemberRole, lsn: u64) -> Member {
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
            maintenance: false,
            lag_bytes: None,
        }
    }

    pub(crate) fn view(leader: Option<&str>, members: Vec<Member>) -> ClusterView {
        ClusterView {
            state: ClusterState {
                leader: leader.map(Into::into),
                split_brain: Vec::new(),
                fence: None,
                members: members.into_iter().map(|m| (m.name.clone(), m)).collect(),
                failover: None,
                leader_optime: None,
                ttl: None,
            },
            confirmed: None,
            etcd_down: false,
            check: None,
            unregistered: false,
        }
    }

    fn names(b: &[Backend]) -> Vec<&str> {
        b.iter().map(|b| &*b.member).collect()
    }

    /// pg1 primary (port 1), replicas pg2 (port 2, 10 bytes behind) and pg3 (port 3, 500).
    pub(crate) fn three() -> ClusterView {
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
    fn unregistered_proxy_routes_and_keeps_no_primary() {
        let mut v = three();
        v.unregistered = true;
        assert_eq!(v.primary_status(), PrimaryStatus::Unregistered);
        assert!(v.primary().is_none());
        assert_eq!((eligible_primary(&v), kept_primary(&v)), (vec![], vec![]) as (Vec<String>, Vec<String>));
        // Replicas are not concerned; a read-only listener loses the primary only.
        let ro = v.targets(Role::ReadOnly, Some(0));
        assert_eq!((names(&ro.eligible), names(&ro.keep)), (vec![], vec!["pg2", "pg3"]));
        assert_eq!(names(&v.targets(Role::Replica, None).eligible), vec!["pg2", "pg3"]);
        // Even with etcd down and a direct check finding it writable.
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::Writable);
        assert_eq!((eligible_primary(&v), kept_primary(&v)), (vec![], vec![]) as (Vec<String>, Vec<String>));
    }

    #[test]
    fn noloadbalance_replica_is_kept_but_not_eligible() {
        let mut v = three();
        v.state.members.get_mut("pg2").unwrap().noloadbalance = true;
        let t = v.targets(Role::Replica, None);
        assert_eq!((names(&t.eligible), names(&t.keep)), (vec!["pg3"], vec!["pg2", "pg3"]));
    }

    fn eligible_primary(v: &ClusterView) -> Vec<String> {
        v.targets(Role::Primary, None).eligible.iter().map(|b| b.member.to_string()).collect()
    }

    fn kept_primary(v: &ClusterView) -> Vec<String> {
        v.targets(Role::Primary, None).keep.iter().map(|b| b.member.to_string()).collect()
    }

    #[test]
    fn etcd_down_primary_follows_the_direct_check() {
        let mut v = three();
        v.handle_etcd_down();
        assert_eq!(v.check_target().map(|m| m.name.as_str()), Some("pg1"));
        assert_eq!(v.check.as_ref().map(|c| c.result), Some(CheckResult::Pending));
        // No answer yet: the last keys stand.
        assert_eq!((v.primary_status(), eligible_primary(&v)), (PrimaryStatus::Routable, vec!["pg1".to_string()]));
        v.handle_check("pg1", CheckResult::Writable);
        assert_eq!(eligible_primary(&v), ["pg1"]);
        // Check connection lost (Patroni restarts PostgreSQL to demote it): no new
        // connections, open sessions kept.
        v.handle_check("pg1", CheckResult::Lost);
        assert_eq!(v.primary_status(), PrimaryStatus::Unconfirmed);
        assert_eq!((eligible_primary(&v), kept_primary(&v)), (Vec::<String>::new(), vec!["pg1".to_string()]));
        assert!(v.primary().is_none());
        v.handle_check("pg1", CheckResult::Writable);
        assert_eq!(eligible_primary(&v), ["pg1"], "resumes when a check finds it writable");
        // Found read-only: drained like a demoted primary.
        v.handle_check("pg1", CheckResult::ReadOnly);
        assert_eq!(v.primary_status(), PrimaryStatus::ReadOnly);
        assert_eq!((eligible_primary(&v), kept_primary(&v)), (vec![], vec![]) as (Vec<String>, Vec<String>));
        // A read-only primary is no target of a read-only listener either.
        let ro = v.targets(Role::ReadOnly, Some(0));
        assert!(!ro.eligible.iter().chain(&ro.keep).any(|b| &*b.member == "pg1"));
        // Answers about another member do not count.
        v.handle_check("pg2", CheckResult::Writable);
        assert_eq!(v.primary_status(), PrimaryStatus::ReadOnly);
        // etcd down again (another failed attempt) changes nothing.
        v.handle_etcd_down();
        assert_eq!(v.primary_status(), PrimaryStatus::ReadOnly);
    }

    #[test]
    fn etcd_back_without_an_answer_lets_the_keys_decide() {
        for r in [CheckResult::Pending, CheckResult::Lost] {
            let mut v = three();
            v.handle_etcd_down();
            v.handle_check("pg1", r);
            v.handle_keys(three().state);
            assert_eq!((v.primary_status(), v.check.is_none(), v.etcd_down), (PrimaryStatus::Routable, true, false));
        }
    }

    #[test]
    fn read_only_verdict_outlives_stale_keys_for_the_grace_period() {
        // etcd answers with the very keys of before (the lease not revoked yet).
        let mut v = three();
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::ReadOnly);
        v.handle_keys(three().state);
        assert!(v.in_grace());
        assert_eq!(v.primary_status(), PrimaryStatus::ReadOnly);
        assert_eq!(kept_primary(&v), Vec::<String>::new(), "still drained");
        assert_eq!(v.check_target().map(|m| m.name.as_str()), Some("pg1"), "still checked");
        // The check goes on as during the outage.
        v.handle_check("pg1", CheckResult::Lost);
        assert_eq!(v.primary_status(), PrimaryStatus::Unconfirmed);
        v.handle_check("pg1", CheckResult::Writable);
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);
        v.handle_grace_over();
        assert_eq!((v.primary_status(), v.check.is_none(), v.in_grace()), (PrimaryStatus::Routable, true, false));

        // Then the lease is revoked (no leader), then the member takes the key again with the
        // same entry: still read-only until a check finds it writable.
        let mut v = three();
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::ReadOnly);
        let mut gone = three().state;
        gone.leader = None;
        gone.members.remove("pg1");
        v.handle_keys(gone);
        assert_eq!(v.primary_status(), PrimaryStatus::NoLeader);
        assert_eq!((eligible_primary(&v), kept_primary(&v)), (vec![], vec![]) as (Vec<String>, Vec<String>));
        v.handle_keys(three().state);
        assert_eq!(v.primary_status(), PrimaryStatus::ReadOnly);
        v.handle_check("pg1", CheckResult::Writable);
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);

        // Patroni rewrites the demoted member's entry: the keys decide.
        let mut v = three();
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::ReadOnly);
        let mut fresh = three().state;
        fresh.members.get_mut("pg1").unwrap().role = MemberRole::Replica;
        v.handle_keys(fresh);
        assert_eq!((v.primary_status(), v.check.is_none()), (PrimaryStatus::Promoting, true));
        v.handle_confirmed("pg1");
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);

        // An address filled in by a lookup is no change of the entry.
        let mut v = three();
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::ReadOnly);
        let mut s = three().state;
        s.members.get_mut("pg1").unwrap().addr = Some(SocketAddr::from(([10, 0, 0, 1], 5432)));
        v.handle_keys(s);
        assert_eq!(v.primary_status(), PrimaryStatus::ReadOnly);

        // etcd names another leader: the verdict on the old one no longer matters.
        let mut v = three();
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::ReadOnly);
        let mut other = three().state;
        other.leader = Some("pg2".into());
        other.members.get_mut("pg2").unwrap().role = MemberRole::Primary;
        v.handle_keys(other);
        assert_eq!((v.check.is_none(), eligible_primary(&v)), (true, vec!["pg2".to_string()]));
    }

    #[test]
    fn failsafe_primary_stays_routed_while_its_expired_leader_key_is_retaken() {
        let mut v = three();
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::Writable);
        // etcd is back without the leader key nor pg1's member key (their lease expired).
        let mut gone = three().state;
        gone.leader = None;
        gone.members.remove("pg1");
        v.handle_keys(gone);
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);
        assert_eq!((eligible_primary(&v), kept_primary(&v)), (vec!["pg1".to_string()], vec!["pg1".to_string()]));
        assert_eq!(v.check_target().map(|m| m.name.as_str()), Some("pg1"), "checked on its old entry");
        // Found read-only meanwhile: drained.
        let mut w = v.clone();
        w.handle_check("pg1", CheckResult::ReadOnly);
        assert_eq!((eligible_primary(&w), kept_primary(&w)), (vec![], vec![]) as (Vec<String>, Vec<String>));
        // Patroni takes the key again: routable by the keys; the grace ends.
        v.handle_keys(three().state);
        assert_eq!(eligible_primary(&v), ["pg1"]);
        v.handle_grace_over();
        assert_eq!((eligible_primary(&v), v.check.is_none()), (vec!["pg1".to_string()], true));
        // Without the key after the grace, no primary.
        let mut v = three();
        v.handle_etcd_down();
        v.handle_check("pg1", CheckResult::Writable);
        let mut gone = three().state;
        gone.leader = None;
        v.handle_keys(gone);
        v.handle_grace_over();
        assert_eq!((v.primary_status(), kept_primary(&v)), (PrimaryStatus::NoLeader, Vec::<String>::new()));
    }

    #[test]
    fn check_starts_only_for_a_routable_primary() {
        let mut v = three();
        v.state.leader = Some("pg2".into());
        v.handle_etcd_down();
        assert!(v.check.is_none(), "nothing routed: nothing to check");
        assert_eq!(v.awaiting_confirmation().map(|m| m.name.as_str()), Some("pg2"));
        // A promotion confirmed during the outage makes it routable, and checked.
        v.handle_confirmed("pg2");
        assert_eq!(v.check_target().map(|m| m.name.as_str()), Some("pg2"));
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);
        // With etcd up there is no check at all.
        let mut v = three();
        v.handle_check("pg1", CheckResult::ReadOnly);
        assert_eq!((v.primary_status(), v.check.is_none()), (PrimaryStatus::Routable, true));
    }

    fn arb_check() -> impl Strategy<Value = CheckResult> {
        prop_oneof![
            Just(CheckResult::Pending),
            Just(CheckResult::Writable),
            Just(CheckResult::ReadOnly),
            Just(CheckResult::Lost),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Keys(Box<ClusterView>),
        Down,
        Check(usize, CheckResult),
        Confirmed(usize),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            arb_view().prop_map(|v| Op::Keys(Box::new(v))),
            Just(Op::Down),
            (0usize..6, arb_check()).prop_map(|(i, r)| Op::Check(i, r)),
            (0usize..6).prop_map(Op::Confirmed),
        ]
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
        /// Whatever etcd and the checks say in whatever order: a primary a check found
        /// read-only is neither routed nor kept, one whose check is lost is not routed, and
        /// with etcd down a routable primary is always being checked.
        #[test]
        fn direct_checks_override_stale_keys(ops in proptest::collection::vec(arb_op(), 1..30)) {
            let mut v = ClusterView::default();
            for op in ops {
                match op {
                    Op::Keys(k) => v.handle_keys(k.state),
                    Op::Down => v.handle_etcd_down(),
                    Op::Check(i, r) => v.handle_check(&format!("pg{i}"), r),
                    Op::Confirmed(i) => v.handle_confirmed(&format!("pg{i}")),
                }
                let leader_verdict = v.check.as_ref().map(|c| c.result);
                match leader_verdict {
                    Some(CheckResult::ReadOnly) => {
                        prop_assert!(eligible_primary(&v).is_empty() && kept_primary(&v).is_empty());
                        prop_assert!(v.primary().is_none());
                    }
                    Some(CheckResult::Lost) => prop_assert!(eligible_primary(&v).is_empty()),
                    _ => {}
                }
                if v.etcd_down && v.primary().is_some() {
                    prop_assert_eq!(v.check_target().map(|m| &m.name), v.primary().map(|m| &m.name));
                }
                // A check concerns the leader, or the last one while etcd names none.
                if let (Some(c), Some(l)) = (&v.check, &v.state.leader) {
                    prop_assert_eq!(&c.member, l);
                }
                // Only the leader is routed, or, without one, a member a check finds writable.
                if let Some(p) = v.primary() {
                    match &v.state.leader {
                        Some(l) => prop_assert_eq!(&p.name, l),
                        None => prop_assert_eq!(leader_verdict, Some(CheckResult::Writable)),
                    }
                }
            }
        }

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
