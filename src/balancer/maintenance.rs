//! Operator maintenance of members (`pgfront drain pg2` / `pgfront resume pg2`): which members
//! of which cluster take no new connection on any listener, whatever their role, and whether
//! their open sessions are closed too (`kill`).
//!
//! One registry per process, owned by the supervisor: it outlives reloads (a reload never
//! resumes a member) and travels with a binary upgrade in the hand-over state (`saved`,
//! `restore`); a cluster removed by a reload, or moved to another Patroni scope, loses its
//! entries (`forget_cluster`). The admin endpoint writes it; every listener's follower reads its cluster's
//! entries and applies them to the targets the topology derives (`restrict`, pure) before its
//! pool sees them. Entries are keyed by names, not addresses: a member that restarts, changes
//! address or leaves etcd for a while is still in maintenance when it comes back.
//!
//! Invariants (tested below and in tests/drain.rs):
//! - a member in maintenance is never eligible for new connections, on any listener of its
//!   cluster; a primary listener whose primary is in maintenance holds its clients in the queue
//!   (then refuses them after `queue_timeout`), as during a switchover;
//! - without `kill`, its open sessions are kept exactly as long as the topology alone would
//!   keep them (a member that also loses its role is drained as usual);
//! - with `kill`, its open sessions are closed at once through the pools' drain tokens, also
//!   when it was already draining with its grace after losing its role;
//! - members in maintenance are left out before a read-only listener's fallback to the
//!   primary is decided: with every replica drained, it takes the primary (`targets`);
//! - `resume` makes the member what the topology says again, on every listener.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Role;
use crate::metrics::SERVER_STATES;
use crate::topology::{Backend, ClusterView, Member, MemberRole, Targets};

/// One member in maintenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// Its open sessions are closed too.
    pub kill: bool,
    /// When it was drained (Unix seconds).
    pub since: u64,
}

/// What a `drain` or `resume` changed, for the answer and the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Newly in maintenance.
    Drained,
    /// It was in maintenance with its sessions kept; they are closed now.
    Killed,
    /// Nothing to do: already in maintenance (with `kill` if asked).
    AlreadyDrained,
    Resumed,
    /// Nothing to do: it was not in maintenance.
    NotDrained,
}

impl Change {
    /// Whether the registry changed.
    pub(crate) fn changed(self) -> bool {
        matches!(self, Change::Drained | Change::Killed | Change::Resumed)
    }
}

/// A member in maintenance as the hand-over state carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Saved {
    pub cluster: String,
    pub member: String,
    pub kill: bool,
    pub since: u64,
}

/// The process's registry of members in maintenance.
pub struct Maintenance {
    /// cluster → member → entry.
    members: Mutex<BTreeMap<String, BTreeMap<String, Entry>>>,
    /// Bumped at every change: the followers wait on it.
    changed: watch::Sender<u64>,
}

impl Default for Maintenance {
    fn default() -> Self {
        Maintenance { members: Mutex::new(BTreeMap::new()), changed: watch::channel(0).0 }
    }
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance").field("members", &self.saved()).finish()
    }
}

impl Maintenance {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, Entry>>> {
        // Plain map updates cannot leave it inconsistent: recover from a poisoned lock.
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Puts `member` of `cluster` in maintenance at `now` (Unix seconds); `kill` also closes its
    /// sessions. A second drain never undoes a `kill`.
    pub(crate) fn drain(&self, cluster: &str, member: &str, kill: bool, now: u64) -> Change {
        let change = {
            let mut g = self.lock();
            let entries = g.entry(cluster.to_owned()).or_default();
            match entries.get_mut(member) {
                None => {
                    entries.insert(member.to_owned(), Entry { kill, since: now });
                    Change::Drained
                }
                Some(e) if kill && !e.kill => {
                    e.kill = true;
                    Change::Killed
                }
                Some(_) => Change::AlreadyDrained,
            }
        };
        if change.changed() {
            self.bump();
        }
        change
    }

    /// Takes `member` of `cluster` out of maintenance.
    pub(crate) fn resume(&self, cluster: &str, member: &str) -> Change {
        let change = {
            let mut g = self.lock();
            let removed = g.get_mut(cluster).and_then(|m| m.remove(member)).is_some();
            g.retain(|_, m| !m.is_empty());
            if removed {
                Change::Resumed
            } else {
                Change::NotDrained
            }
        };
        if change.changed() {
            self.bump();
        }
        change
    }

    /// Forgets the members of `cluster`: it was removed, or now follows another Patroni
    /// cluster (whose members only share the names). Returns the names forgotten.
    pub(crate) fn forget_cluster(&self, cluster: &str) -> Vec<String> {
        let gone = self.lock().remove(cluster).map(|m| m.into_keys().collect::<Vec<_>>()).unwrap_or_default();
        if !gone.is_empty() {
            self.bump();
        }
        gone
    }

    /// The members of `cluster` in maintenance.
    pub(crate) fn cluster(&self, cluster: &str) -> BTreeMap<String, Entry> {
        self.lock().get(cluster).cloned().unwrap_or_default()
    }

    pub(crate) fn get(&self, cluster: &str, member: &str) -> Option<Entry> {
        self.lock().get(cluster).and_then(|m| m.get(member)).copied()
    }

    /// Changes whenever the registry does.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Every entry, for the hand-over state of a binary upgrade.
    pub(crate) fn saved(&self) -> Vec<Saved> {
        self.lock()
            .iter()
            .flat_map(|(c, m)| {
                m.iter().map(|(name, e)| Saved {
                    cluster: c.clone(),
                    member: name.clone(),
                    kill: e.kill,
                    since: e.since,
                })
            })
            .collect()
    }

    /// Takes over the entries of the process this one replaces.
    pub(crate) fn restore(&self, saved: &[Saved]) {
        if saved.is_empty() {
            return;
        }
        {
            let mut g = self.lock();
            for s in saved {
                g.entry(s.cluster.clone())
                    .or_default()
                    .insert(s.member.clone(), Entry { kill: s.kill, since: s.since });
            }
        }
        self.bump();
    }
}

/// Adds `saved` to the hand-over state of a binary upgrade (a JSON object that the VIPs
/// already write, `vip::lifecycle::handover_state`; their reader ignores this key, and an
/// older binary taking over simply starts with no member in maintenance).
pub(crate) fn add_to_handover_state(state: Vec<u8>, saved: Vec<Saved>) -> Vec<u8> {
    if saved.is_empty() {
        return state;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&state).unwrap_or_else(|_| serde_json::json!({}));
    match v.as_object_mut() {
        Some(o) => {
            o.insert("maintenance".into(), serde_json::to_value(saved).unwrap_or_default());
            serde_json::to_vec(&v).unwrap_or(state)
        }
        None => state,
    }
}

/// The members in maintenance the previous process handed over (none if it said nothing).
pub(crate) fn from_handover_state(state: &[u8]) -> Result<Vec<Saved>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Part {
        #[serde(default)]
        maintenance: Vec<Saved>,
    }
    if state.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice::<Part>(state).map(|p| p.maintenance)
}

/// Pure: what a listener of `role` (replica lag limit `max_lag`) is given from `view` with the
/// members in `maint` applied, and the backends whose sessions must be closed now. Drained
/// members are left out before the read-only fallback to the primary is decided, so a
/// read-only listener whose replicas are all drained is offered the primary (as with agent
/// maintenance); then `restrict`. `present`: the servers the listener's pool lists now.
pub(crate) fn targets(
    view: &ClusterView,
    role: Role,
    max_lag: Option<u64>,
    maint: &BTreeMap<String, Entry>,
    present: &[Backend],
) -> (Targets, Vec<Backend>) {
    let t = view.targets_without(role, max_lag, &|name| maint.contains_key(name));
    restrict(t, maint, present)
}

/// Pure: `targets` without the members in `maint`. A member in maintenance is never eligible;
/// without `kill` it stays in `keep` if the topology put it in either list (its sessions stay
/// open); with `kill` it leaves both. Returns the backends whose sessions must be closed now:
/// those of the lists, and those of `present` (the pool's servers: a member that already lost
/// its role is draining with its grace, in neither list) whose member has a `kill` entry.
pub(crate) fn restrict(
    targets: Targets,
    maint: &BTreeMap<String, Entry>,
    present: &[Backend],
) -> (Targets, Vec<Backend>) {
    if maint.is_empty() {
        return (targets, Vec::new());
    }
    let entry = |b: &Backend| maint.get(&*b.member).copied();
    let Targets { eligible, keep } = targets;
    let mut out = Targets { eligible: Vec::new(), keep: Vec::new() };
    let mut kill = Vec::new();
    for b in eligible.iter().chain(&keep).chain(present) {
        match entry(b) {
            Some(e) if e.kill && !kill.contains(b) => kill.push(b.clone()),
            Some(e) if !e.kill && !out.keep.contains(b) && (eligible.contains(b) || keep.contains(b)) => {
                out.keep.push(b.clone())
            }
            _ => {}
        }
    }
    out.eligible = eligible.into_iter().filter(|b| entry(b).is_none()).collect();
    for b in keep.into_iter().filter(|b| entry(b).is_none()) {
        if !out.keep.contains(&b) {
            out.keep.push(b);
        }
    }
    (out, kill)
}

/// A member's state for `/status` and `pgfront_server_state`, as HAProxy names its servers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Runs, and takes new connections for its role (replicas: within each listener's lag limit).
    Up,
    /// A running replica tagged `noloadbalance`: no replica traffic.
    Nolb,
    /// Runs, takes no new connections for now, its sessions are kept: the leader during a
    /// pending switchover, while its promotion is unconfirmed, or while etcd is unreachable
    /// and its direct check lost its connection.
    Drain,
    /// In maintenance (`pgfront drain`).
    Maint,
    /// Not running, no usable address, demoted, or a leader found read-only.
    Down,
}

impl MemberState {
    /// The `state` label; one of `metrics::SERVER_STATES`.
    pub fn label(self) -> &'static str {
        let i = match self {
            MemberState::Up => 0,
            MemberState::Nolb => 1,
            MemberState::Drain => 2,
            MemberState::Maint => 3,
            MemberState::Down => 4,
        };
        SERVER_STATES[i]
    }
}

/// Pure: the state of member `m` of `view`, `maint` its maintenance entry.
pub(crate) fn member_state(view: &ClusterView, m: &Member, maint: Option<Entry>) -> MemberState {
    // Drained here (`pgfront drain`) or by its agent (`pgfront agent drain`).
    if maint.is_some() || m.maintenance {
        return MemberState::Maint;
    }
    if !m.running() || m.addr.is_none() {
        return MemberState::Down;
    }
    let leader = view.state.leader.as_deref() == Some(m.name.as_str());
    if leader {
        return match view.primary() {
            Some(p) if p.name == m.name => MemberState::Up,
            _ => match view.primary_status() {
                crate::topology::PrimaryStatus::ReadOnly => MemberState::Down,
                _ => MemberState::Drain,
            },
        };
    }
    match m.role {
        MemberRole::Replica if m.noloadbalance => MemberState::Nolb,
        MemberRole::Replica => MemberState::Up,
        _ => MemberState::Down,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn b(name: &str, port: u16) -> Backend {
        Backend { member: Arc::from(name), addr: ([127, 0, 0, 1], port).into() }
    }

    fn maint(entries: &[(&str, bool)]) -> BTreeMap<String, Entry> {
        entries.iter().map(|(n, kill)| (n.to_string(), Entry { kill: *kill, since: 1 })).collect()
    }

    #[test]
    fn restrict_keeps_sessions_without_kill_and_closes_them_with_it() {
        let t = Targets { eligible: vec![b("pg2", 2), b("pg3", 3)], keep: vec![b("pg2", 2), b("pg3", 3)] };
        let (r, kill) = restrict(t.clone(), &maint(&[("pg2", false)]), &[]);
        assert_eq!(r.eligible, vec![b("pg3", 3)]);
        assert_eq!(r.keep, vec![b("pg2", 2), b("pg3", 3)]);
        assert!(kill.is_empty());
        let (r, kill) = restrict(t.clone(), &maint(&[("pg2", true)]), &[]);
        assert_eq!(r.eligible, vec![b("pg3", 3)]);
        assert_eq!(r.keep, vec![b("pg3", 3)]);
        assert_eq!(kill, vec![b("pg2", 2)]);
        assert_eq!(restrict(t.clone(), &BTreeMap::new(), &[]), (t, Vec::new()));
    }

    #[test]
    fn a_drained_member_that_loses_its_role_is_not_kept() {
        // pg1 is in neither list (it lost its role): maintenance does not keep it.
        let t = Targets { eligible: vec![b("pg2", 2)], keep: vec![b("pg2", 2)] };
        let (r, kill) = restrict(t.clone(), &maint(&[("pg1", false)]), &[b("pg1", 1)]);
        assert_eq!(r.eligible, vec![b("pg2", 2)]);
        assert_eq!(r.keep, vec![b("pg2", 2)]);
        assert!(kill.is_empty());
    }

    #[test]
    fn a_kill_reaches_a_member_already_draining() {
        // pg1 lost its role earlier and drains with its grace: in neither list, still in the pool.
        let t = Targets { eligible: vec![b("pg2", 2)], keep: vec![b("pg2", 2)] };
        let present = [b("pg1", 1), b("pg2", 2)];
        let (r, kill) = restrict(t, &maint(&[("pg1", true)]), &present);
        assert_eq!(kill, vec![b("pg1", 1)]);
        assert_eq!((r.eligible, r.keep), (vec![b("pg2", 2)], vec![b("pg2", 2)]));
    }

    #[test]
    fn a_read_only_listener_falls_back_to_the_primary_when_every_replica_is_drained() {
        let v = crate::topology::tests::three();
        for kill in [false, true] {
            let m = maint(&[("pg2", kill), ("pg3", kill)]);
            let (t, _) = targets(&v, Role::ReadOnly, None, &m, &[]);
            assert_eq!(t.eligible, vec![b("pg1", 1)], "kill = {kill}");
            // A replica listener has no fallback.
            let (t, _) = targets(&v, Role::Replica, None, &m, &[]);
            assert!(t.eligible.is_empty());
        }
        // One replica left: it takes the connections, the primary does not.
        let (t, _) = targets(&v, Role::ReadOnly, None, &maint(&[("pg2", false)]), &[]);
        assert_eq!(t.eligible, vec![b("pg3", 3)]);
        // The primary drained too: nothing to fall back to.
        let (t, _) = targets(&v, Role::ReadOnly, None, &maint(&[("pg1", false), ("pg2", false), ("pg3", false)]), &[]);
        assert!(t.eligible.is_empty());
    }

    #[test]
    fn registry_changes_and_survives_a_round_trip() {
        let m = Maintenance::default();
        let mut rx = m.subscribe();
        assert_eq!(m.drain("main", "pg2", false, 10), Change::Drained);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(m.drain("main", "pg2", false, 11), Change::AlreadyDrained);
        assert!(!rx.has_changed().unwrap(), "no change, no wake-up");
        assert_eq!(m.drain("main", "pg2", true, 12), Change::Killed);
        assert_eq!(m.drain("main", "pg2", false, 13), Change::AlreadyDrained, "a drain never undoes a kill");
        assert_eq!(m.get("main", "pg2"), Some(Entry { kill: true, since: 10 }));
        let copy = Maintenance::default();
        copy.restore(&m.saved());
        assert_eq!(copy.cluster("main"), m.cluster("main"));
        copy.drain("other", "pg1", false, 1);
        assert_eq!(copy.forget_cluster("main"), vec!["pg2".to_owned()]);
        assert_eq!(copy.forget_cluster("main"), Vec::<String>::new());
        assert!(copy.get("other", "pg1").is_some());
        assert_eq!(m.resume("main", "pg2"), Change::Resumed);
        assert_eq!(m.resume("main", "pg2"), Change::NotDrained);
        assert!(m.saved().is_empty());
        assert_eq!(m.get("other", "pg2"), None);
    }

    #[test]
    fn the_hand_over_state_carries_the_entries_beside_the_vip_roles() {
        let vips = br#"{"format":1,"vips":[]}"#.to_vec();
        let saved = vec![Saved { cluster: "main".into(), member: "pg2".into(), kill: false, since: 5 }];
        let state = add_to_handover_state(vips.clone(), saved.clone());
        assert_eq!(from_handover_state(&state).unwrap(), saved);
        assert!(
            crate::vip::lifecycle::decode_handover_state(&state).unwrap().is_empty(),
            "the VIP reader still reads it"
        );
        assert_eq!(from_handover_state(&vips).unwrap(), vec![], "from a process without maintenance");
        assert_eq!(from_handover_state(b"").unwrap(), vec![]);
        assert_eq!(add_to_handover_state(vips.clone(), vec![]), vips);
    }

    #[test]
    fn every_state_has_its_label() {
        let all = [MemberState::Up, MemberState::Nolb, MemberState::Drain, MemberState::Maint, MemberState::Down];
        let labels: Vec<_> = all.iter().map(|s| s.label()).collect();
        assert_eq!(labels, SERVER_STATES.to_vec());
        for s in all {
            assert_eq!(serde_json::to_value(s).unwrap(), s.label());
        }
    }
}
