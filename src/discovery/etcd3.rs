//! etcd v3 source: a prefix read, then a prefix watch from the next revision, plus a periodic
//! re-read. The re-read matters: Patroni refreshes its leader key by lease keep-alive, which
//! emits no event, and a stopped etcd keeps its TCP connections open, so a silent watch
//! proves nothing. Every error ends the session; the next one re-reads everything and
//! watches from that revision, so no change is lost.
//!
//! The re-read stays a full read: a digest (key count and newest `mod_revision`, `keys_only`)
//! instead was measured with 100 clusters (`benches/scale.rs`) and cut no CPU measurably, in
//! pgfront or in etcd: a unary request costs its round trip whatever it carries.
//!
//! Two sessions, on two members: a member that stops answering (SIGSTOP, a partition) keeps
//! its TCP connections open, and a session on it learns nothing until its re-read times out
//! (`resync_interval` + `etcd_timeout`, 2 to 3 s with the shipped settings). A whole Patroni
//! switchover fits in that: `tests/etcd_faults.rs` logs about 0.2 s from the failover key to
//! the old primary's shutdown, and a single session routed new clients to it meanwhile. With
//! several endpoints two sessions follow the cluster at once, each on its own member
//! (`Lanes`), and `Merge` passes on the newer of their views: one member lost or stopped
//! costs nothing, not even a pause. Only when neither session has the keys is etcd down.
//! The price: two watches and two re-reads per `resync_interval` per cluster instead of one
//! (`benches/scale.rs` gives each cluster one endpoint, so one session).
//!
//! Endpoints: a session talks to one endpoint, the next one in the configured order that the
//! other session does not use, after each failed session. etcd-client 0.21 given several
//! endpoints balances requests over all of them (tonic's balanced channel: tower's
//! power-of-two-choices, random), so a SIGSTOPped member, whose kernel still accepts
//! connections, keeps being picked at random; with one endpoint per session the choice is
//! deterministic and a dead member costs one session. Requests carry etcd's
//! `require_leader`, so a member cut off from the quorum fails them instead of serving a
//! watch that never fires.
//!
//! Revisions: etcd restored from a snapshot or re-created starts again at a lower revision,
//! and a watch from our revision would wait silently for revisions that come late or never.
//! A re-read or watch response whose header revision is lower than one already seen, and a
//! watch cancelled or compacted, end the session (`DiscoveryError::Resync`): the next one
//! re-reads and watches again; `Merge` takes a first read below the revisions it has seen
//! for the same sign.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::keys::KeyMap;
use super::{ClusterHealth, DiscoveryError, SourceEvent};
use crate::config::ClusterConfig;

/// Sessions following one cluster at once, when it has that many endpoints.
const SESSIONS: usize = 2;

pub async fn run(
    cfg: Arc<ClusterConfig>,
    tx: mpsc::Sender<SourceEvent>,
    health: Arc<ClusterHealth>,
    stop: CancellationToken,
) {
    let sessions = SESSIONS.min(cfg.endpoints.len()).max(1);
    let lanes = Arc::new(Mutex::new(Lanes::new(cfg.endpoints.len(), sessions)));
    let (lane_tx, mut lane_rx) = mpsc::channel(16);
    let mut tasks = JoinSet::new();
    let mut task_lane = HashMap::new();
    for lane in 0..sessions {
        let h = tasks.spawn(follow(lane, cfg.clone(), lane_tx.clone(), lanes.clone(), stop.clone()));
        task_lane.insert(h.id(), lane);
    }
    drop(lane_tx);
    let mut merge = Merge::new(sessions);
    // The lanes that have a view, as `health.etcd_sessions` last showed them.
    let mut live = Vec::new();
    loop {
        let ev = tokio::select! {
            ev = lane_rx.recv() => ev,
            // A lane ends only with `run`, unless it panicked: its view must not stand for ever.
            Some(Err(e)) = tasks.join_next_with_id() => {
                let lane = task_lane.get(&e.id()).copied().unwrap_or_default();
                error!(cluster = %cfg.name, lane, error = %e, "an etcd session task failed");
                Some(LaneEvent::Down { lane, error: DiscoveryError::WatchEnded { reason: format!("session task failed: {e}") } })
            }
            _ = stop.cancelled() => None,
        };
        let Some(ev) = ev else { break };
        let histories = merge.histories;
        let out = match ev {
            LaneEvent::Keys { lane, cluster_id, fresh, rev, keys } => {
                merge.keys(lane, cluster_id, fresh, rev, keys).map(SourceEvent::Keys)
            }
            LaneEvent::Ended { lane } => merge.ended(lane).1.map(SourceEvent::Keys),
            LaneEvent::Down { lane, error } => {
                match merge.down(lane) {
                    // The cluster task records it (`on_down`).
                    (Lost::All, _) => Some(SourceEvent::Down(error)),
                    (lost, promoted) => {
                        if let Ok(mut l) = health.last_error.lock() {
                            *l = Some(error.to_string());
                        }
                        if lost == Lost::One {
                            let other =
                                lanes.lock().map(|l| l.endpoints_except(lane, &cfg.endpoints)).unwrap_or_default();
                            warn!(cluster = %cfg.name, %error, following = %other, "an etcd session failed; the other one still follows the cluster");
                        } else {
                            debug!(cluster = %cfg.name, %error, "an etcd session failed again");
                        }
                        promoted.map(SourceEvent::Keys)
                    }
                }
            }
        };
        if merge.histories != histories {
            warn!(cluster = %cfg.name, "etcd's history went back (re-created or restored): following the new one");
        }
        let now_live = merge.live();
        if now_live != live {
            if let Ok(mut f) = health.etcd_sessions.lock() {
                *f = lanes.lock().map(|l| l.endpoints_of(&now_live, &cfg.endpoints)).unwrap_or_default();
            }
            live = now_live;
        }
        if let Some(out) = out {
            if tx.send(out).await.is_err() {
                break;
            }
        }
    }
    tasks.abort_all();
    if let Ok(mut f) = health.etcd_sessions.lock() {
        f.clear();
    }
}

/// What a session reports to the merge.
#[derive(Debug)]
enum LaneEvent {
    /// The session's keys as of revision `rev` of etcd cluster `cluster_id`, after a change
    /// (`fresh`: its first read).
    Keys { lane: usize, cluster_id: u64, fresh: bool, rev: i64, keys: KeyMap },
    /// The session saw etcd's history go back or its watch compacted; the next one re-reads at once.
    Ended { lane: usize },
    /// The session failed; the next one starts after a backoff.
    Down { lane: usize, error: DiscoveryError },
}

/// The sessions of lane `lane`, one after the other, each on an endpoint no other lane uses.
async fn follow(
    lane: usize,
    cfg: Arc<ClusterConfig>,
    tx: mpsc::Sender<LaneEvent>,
    lanes: Arc<Mutex<Lanes>>,
    stop: CancellationToken,
) {
    super::supervise(
        tx.clone(),
        move |error| LaneEvent::Down { lane, error },
        stop,
        |_| {
            let i = lanes.lock().map_or(lane, |mut l| l.next(lane));
            let (cfg, tx) = (cfg.clone(), tx.clone());
            async move {
                let endpoint = cfg.endpoints.get(i).cloned().unwrap_or_default();
                let mut got_keys = false;
                let r = session(lane, &cfg, &endpoint, &tx, &mut got_keys).await;
                if matches!(r, Err(DiscoveryError::Resync { .. })) && tx.send(LaneEvent::Ended { lane }).await.is_err()
                {
                    return (Ok(()), got_keys);
                }
                (r, got_keys)
            }
        },
    )
    .await
}

/// Which endpoint each lane uses (pure).
#[derive(Debug)]
struct Lanes {
    endpoints: usize,
    at: Vec<Option<usize>>,
}

impl Lanes {
    fn new(endpoints: usize, lanes: usize) -> Lanes {
        Lanes { endpoints, at: vec![None; lanes] }
    }

    /// The endpoint of lane `lane`'s next session: lane `i` starts at endpoint `i`, then takes
    /// the next one in the configured order that no other lane uses (its own again if every
    /// other is taken).
    fn next(&mut self, lane: usize) -> usize {
        let n = self.endpoints.max(1);
        let start = self.at[lane].map_or(lane, |i| i + 1);
        let taken = |i: usize| self.at.iter().enumerate().any(|(l, at)| l != lane && *at == Some(i));
        let i = (0..n).map(|k| (start + k) % n).find(|&i| !taken(i)).unwrap_or(start % n);
        self.at[lane] = Some(i);
        i
    }

    fn endpoints_of(&self, lanes: &[usize], names: &[String]) -> Vec<String> {
        lanes.iter().filter_map(|&l| self.at[l]).filter_map(|i| names.get(i).cloned()).collect()
    }

    fn endpoints_except(&self, lane: usize, names: &[String]) -> String {
        let others: Vec<usize> = (0..self.at.len()).filter(|&l| l != lane).collect();
        self.endpoints_of(&others, names).join(",")
    }
}

/// What a lane's session going down changed.
#[derive(Debug, PartialEq, Eq)]
enum Lost {
    /// No lane has the keys any more: etcd is down.
    All,
    /// This lane had the keys; another one still has them.
    One,
    /// This lane had no keys (it never read them, or its last session failed too).
    Nothing,
}

/// One lane's keys.
#[derive(Debug)]
struct View {
    /// The keys include every change up to this revision.
    rev: i64,
    keys: KeyMap,
    /// A first read below the revision passed on last: either etcd's history went back
    /// (re-created with the same cluster id, or restored from a snapshot), or the read was
    /// served just before a change another lane has already reported. Not passed on while
    /// another lane has a view; followed when it is the only one left.
    behind: bool,
}

/// The cluster's keys from several sessions (pure). The view at the highest revision wins, and
/// the cluster task never gets a view older than one it had: a session on a stopped member
/// keeps its last view until it times out, and that view must not undo a failover key the
/// other session has seen. At the revision passed on last, only the lane passed from may
/// change the keys (a transaction's events can come in two watch responses).
///
/// etcd's history going back: a view from another cluster id (re-created) starts over at
/// once; a first read below the revisions seen is `behind` (see `View`). Either way the
/// revisions of the old history mean nothing, and `histories` counts the new starts.
#[derive(Debug)]
struct Merge {
    views: Vec<Option<View>>,
    cluster_id: Option<u64>,
    /// The keys the cluster task has; `None` after etcd was down (the next ones tell it etcd
    /// is back, even if equal).
    passed: Option<KeyMap>,
    passed_lane: Option<usize>,
    /// The revision of the keys passed on last: no older view is passed on.
    floor: i64,
    histories: u64,
}

impl Merge {
    fn new(lanes: usize) -> Merge {
        Merge {
            views: (0..lanes).map(|_| None).collect(),
            cluster_id: None,
            passed: None,
            passed_lane: None,
            floor: 0,
            histories: 0,
        }
    }

    /// Lane `lane` has `keys` at revision `rev` of etcd cluster `cluster_id` (`fresh`: its
    /// session's first read). Returns the keys to pass on, if they are news.
    fn keys(&mut self, lane: usize, cluster_id: u64, fresh: bool, rev: i64, keys: KeyMap) -> Option<KeyMap> {
        if self.cluster_id.is_some_and(|c| c != cluster_id) {
            self.start_over(None);
        }
        self.cluster_id = Some(cluster_id);
        let was_behind = self.views[lane].as_ref().is_some_and(|v| v.behind);
        let behind = rev < self.floor && (fresh || was_behind);
        self.views[lane] = Some(View { rev, keys, behind });
        if behind && !self.others_current(lane) {
            self.start_over(Some(lane));
        }
        self.pass(lane)
    }

    /// Lane `lane`'s session failed. Returns what that changed, and the keys to pass on if
    /// a `behind` view is left alone (followed, see `View`).
    fn down(&mut self, lane: usize) -> (Lost, Option<KeyMap>) {
        let (had, promoted) = self.ended(lane);
        if self.views.iter().any(Option::is_some) {
            return (if had { Lost::One } else { Lost::Nothing }, promoted);
        }
        self.passed = None;
        (Lost::All, None)
    }

    /// Lane `lane`'s session ended; the next one reads again. Returns whether it had a view,
    /// and the keys to pass on if a `behind` view is left alone.
    fn ended(&mut self, lane: usize) -> (bool, Option<KeyMap>) {
        let had = self.views[lane].take().is_some();
        if self.passed_lane == Some(lane) {
            self.passed_lane = None;
        }
        let lone = (0..self.views.len()).find(|&l| self.views[l].as_ref().is_some_and(|v| v.behind));
        match lone {
            Some(l) if !self.others_current(l) => {
                self.start_over(Some(l));
                (had, self.pass(l))
            }
            _ => (had, None),
        }
    }

    /// The lanes that have a view.
    fn live(&self) -> Vec<usize> {
        (0..self.views.len()).filter(|&l| self.views[l].is_some()).collect()
    }

    /// Whether a lane other than `lane` has a view that is not `behind`.
    fn others_current(&self, lane: usize) -> bool {
        self.views.iter().enumerate().any(|(l, v)| l != lane && v.as_ref().is_some_and(|v| !v.behind))
    }

    /// A new history: the views of other lanes than `keep` go, and so do the revisions seen.
    fn start_over(&mut self, keep: Option<usize>) {
        for (l, v) in self.views.iter_mut().enumerate() {
            match v {
                Some(v) if Some(l) == keep => v.behind = false,
                _ => *v = None,
            }
        }
        self.floor = 0;
        self.passed_lane = None;
        self.histories += 1;
    }

    /// The keys to pass on after lane `lane` reported, if they are news.
    fn pass(&mut self, lane: usize) -> Option<KeyMap> {
        let current = |l: usize| self.views[l].as_ref().filter(|v| !v.behind);
        let newest = (0..self.views.len()).filter_map(|l| current(l).map(|v| v.rev)).max()?;
        let at_newest = |l: usize| current(l).is_some_and(|v| v.rev == newest);
        let pick = if newest > self.floor || self.passed.is_none() {
            if at_newest(lane) {
                lane
            } else {
                (0..self.views.len()).find(|&l| at_newest(l))?
            }
        } else if newest == self.floor && self.passed_lane.is_none_or(|l| l == lane) && at_newest(lane) {
            lane
        } else {
            return None;
        };
        self.floor = newest;
        self.passed_lane = Some(pick);
        let keys = &self.views[pick].as_ref()?.keys;
        if self.passed.as_ref() == Some(keys) {
            return None;
        }
        self.passed = Some(keys.clone());
        Some(keys.clone())
    }
}

/// A client for `endpoints` of `cfg`'s etcd (one session's endpoint, see `run`).
async fn connect_to(cfg: &ClusterConfig, endpoints: &[String]) -> Result<Client, DiscoveryError> {
    crate::etcd::connect(cfg, endpoints).await.map_err(|e| match e {
        crate::etcd::ConnectError::Etcd { endpoints, source } => DiscoveryError::Etcd3 { endpoints, source },
        crate::etcd::ConnectError::Timeout { endpoints, timeout } => DiscoveryError::Timeout { endpoints, timeout },
        e @ crate::etcd::ConnectError::Tls { .. } => DiscoveryError::WatchEnded { reason: e.to_string() },
    })
}

/// Reads every key under the prefix; returns them with the revision they were read at and the
/// etcd cluster's id.
async fn read_all(
    client: &mut Client,
    cfg: &ClusterConfig,
    endpoint: &str,
) -> Result<(KeyMap, i64, u64), DiscoveryError> {
    let prefix = cfg.prefix();
    let timeout = cfg.etcd_timeout;
    let resp = tokio::time::timeout(timeout, client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| DiscoveryError::Timeout { endpoints: endpoint.to_owned(), timeout })?
        .map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoint.to_owned(), source })?;
    let (rev, cluster_id) = resp.header().map_or((0, 0), |h| (h.revision(), h.cluster_id()));
    let keys = resp.kvs().iter().filter_map(|kv| Some((relative(kv.key(), &prefix)?, kv.value().to_vec()))).collect();
    Ok((keys, rev, cluster_id))
}

fn relative(key: &[u8], prefix: &str) -> Option<String> {
    let k = std::str::from_utf8(key).ok()?;
    k.strip_prefix(prefix).map(str::to_owned)
}

/// One change reported by a watch: `value` is `None` for a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub mod_revision: i64,
}

/// What a watch response says besides its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct WatchHead {
    pub canceled: bool,
    pub compact_revision: i64,
    /// The header's revision (0 when absent).
    pub revision: i64,
    pub cancel_reason: String,
}

/// Pure: the cluster's keys as one session sees them, the revision they are current at, and
/// the highest revision etcd has shown. Any sign that etcd's history went back or that the
/// watch lost events is an error: the session ends and the next one re-reads.
#[derive(Debug)]
pub(crate) struct Mirror {
    prefix: String,
    keys: KeyMap,
    /// The revision of the last full read: watch events at or before it are in it already.
    /// Not the last event's revision: the events of one transaction share their revision.
    base: i64,
    /// The keys include every change up to this revision.
    rev: i64,
    /// The highest header revision seen in this session.
    seen: i64,
}

impl Mirror {
    pub(crate) fn new(prefix: String, keys: KeyMap, rev: i64) -> Mirror {
        Mirror { prefix, keys, base: rev, rev, seen: rev }
    }

    pub(crate) fn keys(&self) -> &KeyMap {
        &self.keys
    }

    /// The revision to watch from.
    pub(crate) fn next_revision(&self) -> i64 {
        self.rev + 1
    }

    fn went_back(&mut self, revision: i64, what: &str) -> Result<(), String> {
        if revision > 0 && revision < self.seen {
            return Err(format!(
                "{what} at revision {revision}, below revision {} seen before: etcd was restored or re-created",
                self.seen
            ));
        }
        self.seen = self.seen.max(revision);
        Ok(())
    }

    /// A full re-read at `rev`: true if the keys changed.
    pub(crate) fn handle_read(&mut self, keys: KeyMap, rev: i64) -> Result<bool, String> {
        self.went_back(rev, "re-read")?;
        self.rev = self.rev.max(rev);
        self.base = self.base.max(rev);
        if keys == self.keys {
            return Ok(false);
        }
        self.keys = keys;
        Ok(true)
    }

    /// A watch response: true if the keys changed.
    pub(crate) fn handle_watch(&mut self, head: &WatchHead, changes: &[Change]) -> Result<bool, String> {
        if head.canceled || head.compact_revision > 0 {
            return Err(format!(
                "watch cancelled (compacted at revision {}): {}",
                head.compact_revision,
                if head.cancel_reason.is_empty() { "no reason given" } else { &head.cancel_reason }
            ));
        }
        self.went_back(head.revision, "watch response")?;
        let mut changed = false;
        for c in changes {
            // Changes at or before the revision of our last full read are already in it.
            if c.mod_revision <= self.base {
                continue;
            }
            let Some(k) = relative(&c.key, &self.prefix) else { continue };
            self.rev = self.rev.max(c.mod_revision);
            changed |= match &c.value {
                Some(v) => self.keys.insert(k, v.clone()).as_ref() != Some(v),
                None => self.keys.remove(&k).is_some(),
            };
        }
        Ok(changed)
    }
}

fn watch_parts(resp: &etcd_client::WatchResponse) -> (WatchHead, Vec<Change>) {
    let head = WatchHead {
        canceled: resp.canceled(),
        compact_revision: resp.compact_revision(),
        revision: resp.header().map_or(0, |h| h.revision()),
        cancel_reason: resp.cancel_reason().to_owned(),
    };
    let changes = resp
        .events()
        .iter()
        .filter_map(|ev| {
            let kv = ev.kv()?;
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value().to_vec()),
                EventType::Delete => None,
            };
            Some(Change { key: kv.key().to_vec(), value, mod_revision: kv.mod_revision() })
        })
        .collect();
    (head, changes)
}

/// One session of lane `lane` on `endpoint`: the keys, then every change, to the merge.
async fn session(
    lane: usize,
    cfg: &ClusterConfig,
    endpoint: &str,
    tx: &mpsc::Sender<LaneEvent>,
    got_keys: &mut bool,
) -> Result<(), DiscoveryError> {
    let prefix = cfg.prefix();
    let mut client = connect_to(cfg, &[endpoint.to_owned()]).await?;
    let (keys, rev, cluster_id) = read_all(&mut client, cfg, endpoint).await?;
    *got_keys = true;
    let mut mirror = Mirror::new(prefix.clone(), keys, rev);
    let report = |mirror: &Mirror, fresh: bool| LaneEvent::Keys {
        lane,
        cluster_id,
        fresh,
        rev: mirror.rev,
        keys: mirror.keys().clone(),
    };
    if tx.send(report(&mirror, true)).await.is_err() {
        return Ok(());
    }
    let resync = |reason: String| DiscoveryError::Resync { endpoint: endpoint.to_owned(), reason };
    let opts = WatchOptions::new().with_prefix().with_start_revision(mirror.next_revision());
    let timeout = cfg.etcd_timeout;
    let mut watch = tokio::time::timeout(timeout, client.watch(prefix.as_str(), Some(opts)))
        .await
        .map_err(|_| DiscoveryError::Timeout { endpoints: endpoint.to_owned(), timeout })?
        .map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoint.to_owned(), source })?;
    let mut resync_tick = tokio::time::interval(cfg.resync_interval);
    resync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync_tick.tick().await;
    loop {
        let changed = tokio::select! {
            msg = watch.message() => {
                let resp = msg
                    .map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoint.to_owned(), source })?
                    .ok_or_else(|| DiscoveryError::WatchEnded { reason: "stream closed by etcd".into() })?;
                let (head, changes) = watch_parts(&resp);
                mirror.handle_watch(&head, &changes).map_err(resync)?
            }
            _ = resync_tick.tick() => {
                let (fresh, r, _) = read_all(&mut client, cfg, endpoint).await?;
                mirror.handle_read(fresh, r).map_err(resync)?
            }
        };
        if changed && tx.send(report(&mirror, false)).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/service/s/";

    fn put(k: &str, v: &str, rev: i64) -> Change {
        Change { key: format!("{P}{k}").into_bytes(), value: Some(v.as_bytes().to_vec()), mod_revision: rev }
    }

    fn del(k: &str, rev: i64) -> Change {
        Change { key: format!("{P}{k}").into_bytes(), value: None, mod_revision: rev }
    }

    fn km(pairs: &[(&str, &str)]) -> KeyMap {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    fn head(revision: i64) -> WatchHead {
        WatchHead { revision, ..Default::default() }
    }

    #[test]
    fn lanes_take_the_next_endpoint_no_other_lane_uses() {
        let mut l = Lanes::new(3, 2);
        assert_eq!((l.next(0), l.next(1)), (0, 1));
        // Lane 0's session failed: endpoint 1 is lane 1's, so 2.
        assert_eq!(l.next(0), 2);
        assert_eq!(l.next(0), 0);
        assert_eq!(l.next(1), 2);
        assert_eq!(l.next(0), 1);
        // Two endpoints: a failed lane tries its own again, not the other lane's.
        let mut l = Lanes::new(2, 2);
        assert_eq!((l.next(0), l.next(1)), (0, 1));
        assert_eq!((l.next(0), l.next(0), l.next(1)), (0, 0, 1));
        // One endpoint, one lane.
        let mut l = Lanes::new(1, 1);
        assert_eq!((l.next(0), l.next(0)), (0, 0));
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut l = Lanes::new(3, 2);
        l.next(0);
        l.next(1);
        assert_eq!(l.endpoints_of(&[0, 1], &names), ["a", "b"]);
        assert_eq!(l.endpoints_except(1, &names), "a");
    }

    const ID: u64 = 7;

    #[test]
    fn merge_passes_the_newest_view_and_never_an_older_one() {
        let (a, b, c) =
            (km(&[("leader", "pg1")]), km(&[("leader", "pg1"), ("failover", "pg2")]), km(&[("leader", "pg2")]));
        let mut m = Merge::new(2);
        assert_eq!(m.keys(0, ID, true, 10, a.clone()), Some(a.clone()));
        // The other lane's first read, at the same revision: nothing new.
        assert_eq!(m.keys(1, ID, true, 10, a.clone()), None);
        // Lane 0's member stops; lane 1 sees the failover key.
        assert_eq!(m.keys(1, ID, false, 11, b.clone()), Some(b.clone()));
        // Lane 1's session fails: lane 0's view (revision 10) stays, but is not passed on,
        // now or when lane 0 reports it again.
        assert_eq!(m.down(1), (Lost::One, None));
        assert_eq!(m.keys(0, ID, false, 10, a.clone()), None);
        assert_eq!(m.live(), [0]);
        // Lane 1 reads again elsewhere, at the current revision.
        assert_eq!(m.keys(1, ID, true, 12, c.clone()), Some(c.clone()));
        // Lane 0 times out; a second failure of the same lane changes nothing.
        assert_eq!(m.down(0), (Lost::One, None));
        assert_eq!(m.down(0), (Lost::Nothing, None));
        // Both down: etcd is down, and the next keys are passed on even if equal.
        assert_eq!(m.down(1), (Lost::All, None));
        assert!(m.live().is_empty());
        assert_eq!(m.keys(0, ID, true, 12, c.clone()), Some(c));
        assert_eq!(m.histories, 0);
    }

    #[test]
    fn merge_lets_only_the_lane_passed_from_change_the_keys_at_its_revision() {
        let (a, half, whole) =
            (km(&[("leader", "pg1")]), km(&[("leader", "pg2")]), km(&[("leader", "pg2"), ("members/pg2", "p")]));
        let mut m = Merge::new(2);
        m.keys(0, ID, true, 10, a.clone());
        m.keys(1, ID, true, 10, a);
        // A transaction's events in two responses of lane 0's watch.
        assert_eq!(m.keys(0, ID, false, 11, half.clone()), Some(half.clone()));
        assert_eq!(m.keys(0, ID, false, 11, whole.clone()), Some(whole.clone()));
        // Lane 1, behind, has half of it at the same revision: not passed on.
        assert_eq!(m.keys(1, ID, false, 11, half), None);
        assert_eq!(m.keys(1, ID, false, 11, whole), None);
    }

    #[test]
    fn merge_holds_a_first_read_that_raced_a_newer_change() {
        // Lane 0 reconnects; its first read was served at 10, just before the failover key
        // (11) that lane 1 reported first: it must not undo it.
        let (a, b) = (km(&[("leader", "pg1")]), km(&[("leader", "pg1"), ("failover", "pg2")]));
        let mut m = Merge::new(2);
        m.keys(0, ID, true, 10, a.clone());
        m.keys(1, ID, true, 10, a.clone());
        assert_eq!(m.down(0), (Lost::One, None));
        assert_eq!(m.keys(1, ID, false, 11, b.clone()), Some(b.clone()));
        assert_eq!(m.keys(0, ID, true, 10, a), None);
        // Its watch catches up.
        assert_eq!(m.keys(0, ID, false, 11, b.clone()), None);
        // Now lane 1 goes: lane 0 is current, nothing changes.
        assert_eq!(m.down(1), (Lost::One, None));
        assert_eq!(m.histories, 0);
    }

    #[test]
    fn merge_follows_a_new_history() {
        let (old, new) = (km(&[("leader", "pg1")]), km(&[("leader", "pg2")]));
        // Re-created: another cluster id, followed at once.
        let mut m = Merge::new(2);
        m.keys(0, ID, true, 100, old.clone());
        m.keys(1, ID, true, 100, old.clone());
        assert_eq!(m.keys(0, ID + 1, true, 9, new.clone()), Some(new.clone()));
        assert_eq!((m.live(), m.histories), (vec![0], 1));
        assert_eq!(m.keys(0, ID + 1, false, 10, new.clone()), None);
        // Restored with the same cluster id: a first read below the revisions seen is held
        // while lane 1 still has the old history, followed once lane 1's session fails...
        let mut m = Merge::new(2);
        m.keys(0, ID, true, 100, old.clone());
        m.keys(1, ID, true, 100, old.clone());
        assert_eq!(m.down(0), (Lost::One, None));
        assert_eq!(m.keys(0, ID, true, 9, new.clone()), None);
        assert_eq!(m.down(1), (Lost::One, Some(new.clone())));
        assert_eq!(m.histories, 1);
        // ... and later changes of the new history pass.
        let newer = km(&[("leader", "pg3")]);
        assert_eq!(m.keys(0, ID, false, 10, newer.clone()), Some(newer));
        // ... or ends (its re-read saw the revision go back), and at once when it is alone.
        let mut m = Merge::new(2);
        m.keys(0, ID, true, 100, old.clone());
        m.keys(1, ID, true, 100, old.clone());
        assert_eq!(m.ended(1), (true, None));
        assert_eq!(m.down(0), (Lost::All, None));
        assert_eq!(m.keys(0, ID, true, 9, new.clone()), Some(new));
        // A view that is merely late (a watch event below the floor) is never followed.
        let mut m = Merge::new(2);
        m.keys(0, ID, true, 100, km(&[("leader", "pg2")]));
        assert_eq!(m.keys(1, ID, false, 50, old), None);
        assert_eq!(m.down(0), (Lost::One, None));
        assert_eq!(m.histories, 0);
    }

    #[test]
    fn watch_events_apply_after_the_read_revision() {
        let mut m = Mirror::new(P.into(), km(&[("leader", "pg1")]), 10);
        assert_eq!(m.next_revision(), 11);
        // An event already in the read is skipped; later ones apply.
        assert_eq!(m.handle_watch(&head(12), &[put("leader", "pg0", 9), put("leader", "pg2", 12)]), Ok(true));
        assert_eq!(m.keys(), &km(&[("leader", "pg2")]));
        assert_eq!(m.handle_watch(&head(13), &[del("leader", 13), put("other/x", "1", 13)]), Ok(true));
        assert_eq!(m.keys().get("leader"), None);
        // A key outside the prefix is ignored; a progress response changes nothing.
        let outside = Change { key: b"/elsewhere/x".to_vec(), value: Some(b"1".to_vec()), mod_revision: 14 };
        assert_eq!(m.handle_watch(&head(14), &[outside]), Ok(false));
        assert_eq!(m.handle_watch(&head(14), &[]), Ok(false));
        // A re-read at a later revision replaces the keys; equal keys are no change.
        let same = m.keys().clone();
        assert_eq!(m.handle_read(same, 20), Ok(false));
        assert_eq!(m.handle_read(km(&[("leader", "pg3")]), 21), Ok(true));
        // Events the re-read already contains are skipped.
        assert_eq!(m.handle_watch(&head(21), &[put("leader", "pg9", 21)]), Ok(false));
    }

    #[test]
    fn events_of_one_transaction_all_apply() {
        // A transaction writes the leader key and two member keys at one revision: every event
        // applies, not just the first (Patroni's keys as `etcdctl txn` or a tool would write them).
        let mut m = Mirror::new(P.into(), km(&[("leader", "pg1"), ("members/pg1", "p"), ("members/pg2", "r")]), 10);
        let txn = [put("leader", "pg2", 11), put("members/pg1", "r", 11), put("members/pg2", "p", 11)];
        assert_eq!(m.handle_watch(&head(11), &txn), Ok(true));
        assert_eq!(m.keys(), &km(&[("leader", "pg2"), ("members/pg1", "r"), ("members/pg2", "p")]));
        // Events split over two responses at the same revision apply too.
        let mut m = Mirror::new(P.into(), km(&[("leader", "pg1")]), 10);
        assert_eq!(m.handle_watch(&head(12), &[put("leader", "pg2", 12)]), Ok(true));
        assert_eq!(m.handle_watch(&head(12), &[put("members/pg2", "p", 12)]), Ok(true));
        assert_eq!(m.keys().len(), 2);
    }

    #[test]
    fn revision_going_back_ends_the_session() {
        let mut m = Mirror::new(P.into(), km(&[("leader", "pg1")]), 100);
        // etcd restored from an older snapshot: the re-read is at a lower revision.
        let e = m.handle_read(km(&[("leader", "pg1")]), 40).unwrap_err();
        assert!(e.contains("revision 40") && e.contains("100"), "{e}");
        // The same through a watch response header.
        let mut m = Mirror::new(P.into(), KeyMap::new(), 100);
        assert!(m.handle_watch(&head(101), &[put("leader", "pg1", 101)]).is_ok());
        assert!(m.handle_watch(&head(5), &[]).is_err());
        // A header without a revision (0) is no evidence.
        let mut m = Mirror::new(P.into(), KeyMap::new(), 100);
        assert_eq!(m.handle_watch(&head(0), &[]), Ok(false));
        // Nor is a re-read at the same revision.
        assert_eq!(m.handle_read(KeyMap::new(), 100), Ok(false));
    }

    #[test]
    fn cancelled_or_compacted_watch_ends_the_session() {
        let mut m = Mirror::new(P.into(), KeyMap::new(), 100);
        let compacted = WatchHead { compact_revision: 150, revision: 200, ..Default::default() };
        let e = m.handle_watch(&compacted, &[]).unwrap_err();
        assert!(e.contains("compacted at revision 150"), "{e}");
        let cancelled = WatchHead { canceled: true, cancel_reason: "no leader".into(), ..Default::default() };
        assert!(m.handle_watch(&cancelled, &[]).unwrap_err().contains("no leader"));
        // Even with events in the same response: nothing is applied.
        let mut m = Mirror::new(P.into(), KeyMap::new(), 100);
        assert!(m.handle_watch(&compacted, &[put("leader", "pg1", 160)]).is_err());
        assert!(m.keys().is_empty());
    }

    mod merge_properties {
        use super::*;
        use proptest::prelude::*;

        /// The keys of one history at revision `rev` (every revision changes them).
        fn at(rev: i64) -> KeyMap {
            km(&[("leader", &rev.to_string())])
        }

        /// A step of two lanes following one history whose revision only grows: a lane's watch
        /// delivers later revisions, its session fails, or a new session reads at a revision
        /// at least the newest any lane has reported (no race: see the unit tests for that).
        #[derive(Debug, Clone)]
        enum Step {
            Watch { lane: usize, ahead: i64 },
            Down { lane: usize },
            Read { lane: usize, ahead: i64 },
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (0..2usize, 1..4i64).prop_map(|(lane, ahead)| Step::Watch { lane, ahead }),
                (0..2usize).prop_map(|lane| Step::Down { lane }),
                (0..2usize, 0..4i64).prop_map(|(lane, ahead)| Step::Read { lane, ahead }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// The keys passed on never go back to an older revision, always include the newest
            /// revision a lane has reported, and etcd is down exactly when no lane has a view.
            #[test]
            fn passed_keys_never_go_back(steps in proptest::collection::vec(step(), 1..60)) {
                let mut m = Merge::new(2);
                let mut lane_rev: [Option<i64>; 2] = [None, None];
                let (mut newest, mut passed) = (0i64, 0i64);
                for s in steps {
                    let out = match s {
                        Step::Watch { lane, ahead } => match lane_rev[lane] {
                            Some(r) => {
                                let r = r + ahead;
                                lane_rev[lane] = Some(r);
                                m.keys(lane, ID, false, r, at(r))
                            }
                            None => None,
                        },
                        Step::Read { lane, ahead } => {
                            let r = newest.max(lane_rev.iter().flatten().copied().max().unwrap_or(0)) + ahead;
                            lane_rev[lane] = Some(r);
                            m.keys(lane, ID, true, r, at(r))
                        }
                        Step::Down { lane } => {
                            let had = lane_rev[lane].take().is_some();
                            let (lost, promoted) = m.down(lane);
                            prop_assert!(promoted.is_none());
                            prop_assert_eq!(lost == Lost::All, lane_rev.iter().all(Option::is_none));
                            prop_assert_eq!(lost == Lost::Nothing, !had && lane_rev.iter().any(Option::is_some));
                            None
                        }
                    };
                    if let Some(k) = out {
                        let r: i64 = String::from_utf8(k["leader"].clone()).unwrap().parse().unwrap();
                        prop_assert!(r >= passed, "passed {} after {}", r, passed);
                        passed = r;
                    }
                    newest = newest.max(lane_rev.iter().flatten().copied().max().unwrap_or(0));
                    if lane_rev.iter().any(Option::is_some) {
                        prop_assert_eq!(passed, newest, "the newest revision reported is passed on");
                    }
                }
                prop_assert_eq!(m.histories, 0);
            }
        }
    }
}
