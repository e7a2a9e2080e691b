//! The recent events of the process, in a bounded in-memory ring: leader changes with the
//! routing pause, drains, refusals by reason, VIP transitions, reloads, etcd lost and back.
//! The admin endpoint serves them (`/events`, and on the status page); nothing reads them on
//! the data path.
//!
//! Like `metrics`, this module sits at the bottom of the module map: every part records into
//! the one [`Events`] handle the supervisor gives it, and `admin` only serves the ring.
//!
//! Invariants:
//! - the ring holds at most its capacity ([`DEFAULT_EVENTS_CAPACITY`]); when full it drops the
//!   oldest refusal entry while refusals fill more than half of it, else the oldest entry, so
//!   a long flood of refusals cannot push the leader change that caused it out of sight;
//! - ids grow strictly from the oldest entry to the newest: an entry that changes (a refusal
//!   counted into it) takes a new id and moves to the newest place, so `since=<id>` sees it;
//! - refusals are coalesced: one entry per listener and reason per [`REFUSAL_WINDOW`], with a
//!   count and the time of the last one. A refusal costs one short lock and no allocation
//!   when it joins an entry; the lock is never held across an `.await` (it is a plain mutex
//!   taken for a scan of at most the capacity).
//!
//! The core, [`Ring`], is pure: time comes in as an argument. [`Events`] reads the clock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// Entries kept: enough for an incident's story (a switchover is 2 or 3 entries, a reload 1),
/// small enough to send whole to a status page every 2 seconds (about 50 KiB of JSON).
pub const DEFAULT_EVENTS_CAPACITY: usize = 256;

/// Refusals of one listener for one reason within this window (from the first one) are one
/// entry with a count. Clients refused by the thousand per second become one entry per 10 s.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// What happened. Serialized in snake_case: the `kind` field of `/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// New connections go to another primary (or to the first one seen); `pause_ms` is how
    /// long no primary was routable before it.
    LeaderChange,
    /// The routed primary stopped taking new connections (switchover, failover, check lost):
    /// clients are held in the queue.
    RoutingPaused,
    /// A server lost its role for a listener: its connections are closed after the grace.
    Drain,
    /// Clients refused with an ErrorResponse, coalesced (`count`, `last_ms`).
    Refused,
    /// A VIP changed state on this host (VRRP or etcd lease).
    Vip,
    /// A configuration reload was applied.
    Reload,
    /// A configuration reload was refused; the running configuration stands.
    ReloadFailed,
    /// etcd could not be read for a cluster.
    EtcdDown,
    /// etcd answers again (or for the first time) for a cluster.
    EtcdUp,
    /// While etcd is unreachable, what the direct check of the primary found.
    PrimaryCheck,
    /// An operator's action from the admin endpoint or the CLI (drain, resume).
    Admin,
}

/// One entry of the ring, as `/events` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Grows strictly with each new or changed entry (see the module doc).
    pub id: u64,
    /// When it happened (Unix milliseconds); for a coalesced refusal, the first one.
    pub at_ms: u64,
    pub kind: EventKind,
    pub cluster: Option<String>,
    pub listener: Option<String>,
    pub member: Option<String>,
    pub vip: Option<String>,
    /// Leader change: the primary before (None for the first one seen).
    pub old: Option<String>,
    /// Leader change: how long no primary was routable, in milliseconds.
    pub pause_ms: Option<u64>,
    /// Refusal: the reason, as in `pgfront_listener_refused_total{reason}`.
    pub reason: Option<&'static str>,
    /// How many occurrences this entry stands for (1 but for refusals).
    pub count: u64,
    /// Refusal: when the last one was counted.
    pub last_ms: Option<u64>,
    /// One line for humans, as the log says it.
    pub detail: String,
}

/// What a part records; the ring adds the id, the time and the count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewEvent {
    pub cluster: Option<String>,
    pub listener: Option<String>,
    pub member: Option<String>,
    pub vip: Option<String>,
    pub old: Option<String>,
    pub pause_ms: Option<u64>,
    pub detail: String,
}

impl NewEvent {
    /// An event about a cluster.
    pub fn cluster(cluster: &str, detail: impl Into<String>) -> NewEvent {
        NewEvent { cluster: Some(cluster.to_owned()), detail: detail.into(), ..NewEvent::default() }
    }

    /// An event about a listener.
    pub fn listener(listener: &str, detail: impl Into<String>) -> NewEvent {
        NewEvent { listener: Some(listener.to_owned()), detail: detail.into(), ..NewEvent::default() }
    }

    /// An event about a VIP.
    pub fn vip(vip: &str, detail: impl Into<String>) -> NewEvent {
        NewEvent { vip: Some(vip.to_owned()), detail: detail.into(), ..NewEvent::default() }
    }

    /// The same, about a member too.
    pub fn member(mut self, member: &str) -> NewEvent {
        self.member = Some(member.to_owned());
        self
    }
}

/// The pure ring: every method takes the time.
#[derive(Debug)]
pub struct Ring {
    capacity: usize,
    entries: VecDeque<Event>,
    next_id: u64,
    refusals: usize,
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        let capacity = capacity.max(2);
        Ring { capacity, entries: VecDeque::with_capacity(capacity), next_id: 1, refusals: 0 }
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Makes room for one entry (see the module doc for which one goes).
    fn evict(&mut self) {
        if self.entries.len() < self.capacity {
            return;
        }
        let victim = if self.refusals * 2 > self.capacity {
            self.entries.iter().position(|e| e.kind == EventKind::Refused).unwrap_or(0)
        } else {
            0
        };
        if let Some(e) = self.entries.remove(victim) {
            if e.kind == EventKind::Refused {
                self.refusals -= 1;
            }
        }
    }

    fn push(&mut self, e: Event) {
        self.evict();
        if e.kind == EventKind::Refused {
            self.refusals += 1;
        }
        self.entries.push_back(e);
    }

    /// Records an event that happened at `now_ms` (Unix milliseconds).
    pub fn handle_event(&mut self, now_ms: u64, kind: EventKind, e: NewEvent) {
        let id = self.take_id();
        self.push(Event {
            id,
            at_ms: now_ms,
            kind,
            cluster: e.cluster,
            listener: e.listener,
            member: e.member,
            vip: e.vip,
            old: e.old,
            pause_ms: e.pause_ms,
            reason: None,
            count: 1,
            last_ms: None,
            detail: e.detail,
        });
    }

    /// Counts one refused client of `listener`: into the entry of the same listener and reason
    /// opened less than [`REFUSAL_WINDOW`] ago (which moves to the newest place), else into a
    /// new entry whose detail `detail()` writes.
    pub fn handle_refusal(
        &mut self,
        now_ms: u64,
        listener: &str,
        reason: &'static str,
        detail: impl FnOnce() -> String,
    ) {
        let window = REFUSAL_WINDOW.as_millis() as u64;
        let open = self.entries.iter().rposition(|e| {
            e.kind == EventKind::Refused
                && e.reason == Some(reason)
                && e.listener.as_deref() == Some(listener)
                // Either way: a clock set back does not hold an entry open.
                && now_ms.abs_diff(e.at_ms) < window
        });
        if let Some(i) = open {
            let id = self.take_id();
            let last = self.entries.len() - 1;
            if i != last {
                if let Some(e) = self.entries.remove(i) {
                    self.entries.push_back(e);
                }
            }
            if let Some(e) = self.entries.back_mut() {
                e.id = id;
                e.count += 1;
                e.last_ms = Some(now_ms);
            }
            return;
        }
        let id = self.take_id();
        self.push(Event {
            id,
            at_ms: now_ms,
            kind: EventKind::Refused,
            cluster: None,
            listener: Some(listener.to_owned()),
            member: None,
            vip: None,
            old: None,
            pause_ms: None,
            reason: Some(reason),
            count: 1,
            last_ms: Some(now_ms),
            detail: detail(),
        });
    }

    /// The entries with an id above `since` (all without it), newest first.
    pub fn list(&self, since: Option<u64>) -> Vec<Event> {
        let since = since.unwrap_or(0);
        self.entries.iter().rev().take_while(|e| e.id > since).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The process's ring, shared by every part that records and by the admin endpoint. Clones
/// share the ring.
#[derive(Debug, Clone)]
pub struct Events {
    ring: Arc<Mutex<Ring>>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new(DEFAULT_EVENTS_CAPACITY)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Events {
    pub fn new(capacity: usize) -> Events {
        Events { ring: Arc::new(Mutex::new(Ring::new(capacity))) }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // Nothing panics while holding it; a poisoned ring is still a consistent ring.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event that happens now.
    pub fn record(&self, kind: EventKind, e: NewEvent) {
        let now = unix_ms();
        self.lock().handle_event(now, kind, e);
    }

    /// Counts a refused client (coalesced, see [`Ring::handle_refusal`]); `detail` runs only
    /// when a new entry is opened.
    pub fn refused(&self, listener: &str, reason: &'static str, detail: impl FnOnce() -> String) {
        let now = unix_ms();
        self.lock().handle_refusal(now, listener, reason, detail);
    }

    /// Newest first; only the entries newer than `since` when given.
    pub fn list(&self, since: Option<u64>) -> Vec<Event> {
        self.lock().list(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: &Ring) -> Vec<u64> {
        r.list(None).iter().map(|e| e.id).collect()
    }

    #[test]
    fn newest_first_and_since() {
        let mut r = Ring::new(8);
        for i in 0..5 {
            r.handle_event(1000 + i, EventKind::Reload, NewEvent { detail: format!("r{i}"), ..NewEvent::default() });
        }
        let all = r.list(None);
        assert_eq!(all.iter().map(|e| e.detail.as_str()).collect::<Vec<_>>(), ["r4", "r3", "r2", "r1", "r0"]);
        assert_eq!(ids(&r), [5, 4, 3, 2, 1]);
        assert_eq!(r.list(Some(3)).iter().map(|e| e.id).collect::<Vec<_>>(), [5, 4]);
        assert!(r.list(Some(5)).is_empty());
        assert_eq!(r.list(Some(0)).len(), 5);
    }

    #[test]
    fn bounded_and_oldest_dropped() {
        let mut r = Ring::new(4);
        for i in 0..10 {
            r.handle_event(i, EventKind::Vip, NewEvent::vip("v", format!("{i}")));
        }
        assert_eq!(r.len(), 4);
        assert_eq!(ids(&r), [10, 9, 8, 7]);
    }

    #[test]
    fn refusals_coalesce_per_listener_and_reason_within_the_window() {
        let mut r = Ring::new(16);
        let w = REFUSAL_WINDOW.as_millis() as u64;
        for t in 0..1000 {
            r.handle_refusal(t, "rw", "no_server", || "no primary".into());
        }
        r.handle_refusal(500, "rw", "full", || "full".into());
        r.handle_refusal(501, "ro", "no_server", || "no replica".into());
        // Back to the first entry: it moves to the newest place with a new id.
        r.handle_refusal(999, "rw", "no_server", || unreachable!("joins the open entry"));
        let all = r.list(None);
        assert_eq!(all.len(), 3, "{all:#?}");
        assert_eq!(
            (all[0].listener.as_deref(), all[0].reason, all[0].count, all[0].at_ms, all[0].last_ms),
            (Some("rw"), Some("no_server"), 1001, 0, Some(999))
        );
        assert!(all[0].id > all[1].id && all[1].id > all[2].id);
        // A poller that saw everything up to the previous id sees the changed entry.
        assert_eq!(r.list(Some(all[1].id)).len(), 1);
        // After the window, a new entry.
        r.handle_refusal(w, "rw", "no_server", || "again".into());
        let all = r.list(None);
        assert_eq!((all.len(), all[0].count, all[0].detail.as_str()), (4, 1, "again"));
    }

    #[test]
    fn a_flood_of_refusals_keeps_the_other_events() {
        let mut r = Ring::new(8);
        r.handle_event(0, EventKind::LeaderChange, NewEvent::cluster("main", "pg1 → pg2"));
        r.handle_event(1, EventKind::Reload, NewEvent::default());
        // One new refusal entry per window, for a long time, from two listeners.
        let w = REFUSAL_WINDOW.as_millis() as u64;
        for i in 0..100 {
            r.handle_refusal(2 + i * w, "rw", "no_server", String::new);
            r.handle_refusal(2 + i * w, "ro", "full", String::new);
        }
        assert_eq!(r.len(), 8);
        let kinds: Vec<EventKind> = r.list(None).iter().map(|e| e.kind).collect();
        assert_eq!(kinds.iter().filter(|k| **k == EventKind::Refused).count(), 6, "{kinds:?}");
        assert!(kinds.contains(&EventKind::LeaderChange) && kinds.contains(&EventKind::Reload), "{kinds:?}");
        // Ids still grow from the oldest to the newest.
        let ids = ids(&r);
        assert!(ids.windows(2).all(|p| p[0] > p[1]), "{ids:?}");
        // Other events still push the oldest out once refusals are the minority.
        for i in 0..8 {
            r.handle_event(10_000_000 + i, EventKind::Vip, NewEvent::vip("v", ""));
        }
        assert!(r.list(None).iter().all(|e| e.kind == EventKind::Vip));
    }

    #[test]
    fn the_shell_records_with_the_clock() {
        let ev = Events::new(4);
        ev.record(EventKind::EtcdDown, NewEvent::cluster("main", "etcd unreachable").member("pg1"));
        ev.refused("rw", "closed", || "shutting down".into());
        ev.refused("rw", "closed", || unreachable!());
        let all = ev.list(None);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].kind, all[0].count), (EventKind::Refused, 2));
        assert_eq!((all[1].kind, all[1].member.as_deref()), (EventKind::EtcdDown, Some("pg1")));
        assert!(all[1].at_ms > 1_600_000_000_000);
        let json = serde_json::to_string(&all[1]).unwrap();
        assert!(json.contains("\"kind\":\"etcd_down\""), "{json}");
    }
}
