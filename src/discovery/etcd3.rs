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
//! Endpoints: a session talks to one endpoint, the next one in the configured order after
//! each failed session. etcd-client 0.21 given several endpoints balances requests over all
//! of them (tonic's balanced channel: tower's power-of-two-choices, random), so a SIGSTOPped
//! member, whose kernel still accepts connections, keeps being picked at random; with one
//! endpoint per session the choice is deterministic and a dead member costs one session.
//! Requests carry etcd's `require_leader`, so a member cut off from the quorum fails them
//! instead of serving a watch that never fires.
//!
//! Revisions: etcd restored from a snapshot or re-created starts again at a lower revision,
//! and a watch from our revision would wait silently for revisions that come late or never.
//! A re-read or watch response whose header revision is lower than one already seen, and a
//! watch cancelled or compacted, end the session (`DiscoveryError::Resync`): the next one
//! re-reads and watches again.

use std::sync::Arc;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::keys::KeyMap;
use super::{DiscoveryError, SourceEvent};
use crate::config::ClusterConfig;

pub async fn run(cfg: Arc<ClusterConfig>, tx: mpsc::Sender<SourceEvent>, stop: CancellationToken) {
    super::supervise(tx.clone(), stop, |attempt| {
        let (cfg, tx) = (cfg.clone(), tx.clone());
        let endpoint = endpoint_for(&cfg.endpoints, attempt).to_owned();
        async move {
            let mut got_keys = false;
            let r = session(&cfg, &endpoint, &tx, &mut got_keys).await;
            (r, got_keys)
        }
    })
    .await
}

/// The endpoint of session `attempt`: after each failed session the next one, in the
/// configured order.
fn endpoint_for(endpoints: &[String], attempt: usize) -> &str {
    endpoints.get(attempt % endpoints.len().max(1)).map_or("", String::as_str)
}

/// A client for `endpoints` of `cfg`'s etcd (one session's endpoint, see `run`).
async fn connect_to(cfg: &ClusterConfig, endpoints: &[String]) -> Result<Client, DiscoveryError> {
    crate::etcd::connect(cfg, endpoints).await.map_err(|e| match e {
        crate::etcd::ConnectError::Etcd { endpoints, source } => DiscoveryError::Etcd3 { endpoints, source },
        crate::etcd::ConnectError::Timeout { endpoints, timeout } => DiscoveryError::Timeout { endpoints, timeout },
        e @ crate::etcd::ConnectError::Tls { .. } => DiscoveryError::WatchEnded { reason: e.to_string() },
    })
}

/// Reads every key under the prefix; returns them with the revision they were read at.
async fn read_all(client: &mut Client, cfg: &ClusterConfig, endpoint: &str) -> Result<(KeyMap, i64), DiscoveryError> {
    let prefix = cfg.prefix();
    let timeout = cfg.etcd_timeout;
    let resp = tokio::time::timeout(timeout, client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| DiscoveryError::Timeout { endpoints: endpoint.to_owned(), timeout })?
        .map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoint.to_owned(), source })?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let keys = resp.kvs().iter().filter_map(|kv| Some((relative(kv.key(), &prefix)?, kv.value().to_vec()))).collect();
    Ok((keys, rev))
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

async fn session(
    cfg: &ClusterConfig,
    endpoint: &str,
    tx: &mpsc::Sender<SourceEvent>,
    got_keys: &mut bool,
) -> Result<(), DiscoveryError> {
    let prefix = cfg.prefix();
    let mut client = connect_to(cfg, &[endpoint.to_owned()]).await?;
    let (keys, rev) = read_all(&mut client, cfg, endpoint).await?;
    *got_keys = true;
    let mut mirror = Mirror::new(prefix.clone(), keys, rev);
    if tx.send(SourceEvent::Keys(mirror.keys().clone())).await.is_err() {
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
                let (fresh, r) = read_all(&mut client, cfg, endpoint).await?;
                mirror.handle_read(fresh, r).map_err(resync)?
            }
        };
        if changed && tx.send(SourceEvent::Keys(mirror.keys().clone())).await.is_err() {
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
    fn endpoints_rotate_per_session() {
        let eps: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let order: Vec<&str> = (0..7).map(|i| endpoint_for(&eps, i)).collect();
        assert_eq!(order, ["a", "b", "c", "a", "b", "c", "a"]);
        assert_eq!(endpoint_for(&[], 3), "");
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
}
