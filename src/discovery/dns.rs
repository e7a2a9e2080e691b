//! Resolution of member host names (`conn_url` naming a host rather than an IP), kept off the
//! routing path.
//!
//! The cluster task never waits for DNS: it fills member addresses from `DnsCache` at once and
//! starts the lookups that are due as separate tasks (concurrently, each bounded by
//! `DNS_TIMEOUT`); when one completes, the cache is updated and the view published again. So
//! a leader change is applied as fast with DNS down as with it up.
//!
//! Invariants of the cache (a pure core: time is passed in):
//! - an entry exists only for a host:port that a current member names (bounded by the
//!   member count); entries of hosts no longer named are dropped;
//! - the last good address is kept while refreshes fail: a DNS outage does not take a member
//!   that was reachable out of routing (Patroni rewrites the member key if it moves);
//! - at most one lookup per entry is in flight; the next one is due `DNS_TTL` after a success
//!   and `DNS_NEGATIVE_TTL` after a failure, so a failing DNS is asked at a bounded rate
//!   however often etcd sends events.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::topology::{ClusterState, Member};

/// How long a resolved address is used before it is looked up again.
pub(crate) const DNS_TTL: Duration = Duration::from_secs(60);
/// How long after a failed lookup the next one is started.
pub(crate) const DNS_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// A lookup that takes longer has failed.
pub(crate) const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// What a resolution yields: the first address of the host, if any.
pub(crate) type ResolveFuture = Pin<Box<dyn Future<Output = io::Result<Option<SocketAddr>>> + Send>>;

/// Resolves a host name. A trait so that tests can put a resolver that hangs (a DNS outage)
/// where the system's is.
pub(crate) trait Resolve: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture;
}

/// The system resolver (getaddrinfo on tokio's blocking pool).
pub(crate) struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.next()) })
    }
}

/// A member's host and port, as its `conn_url` names them.
pub(crate) type HostPort = (String, u16);

/// The host and port of a member whose `conn_url` names a host; members given by IP have
/// their address from the key itself and never reach the resolver.
fn named_by_host(m: &Member) -> Option<HostPort> {
    let host = m.host.as_ref()?;
    host.parse::<IpAddr>().is_err().then(|| (host.clone(), m.port.unwrap_or(5432)))
}

#[derive(Debug)]
struct Entry {
    /// The last good address.
    addr: Option<SocketAddr>,
    /// When the next lookup is due.
    due: Instant,
    in_flight: bool,
    /// The last lookup failed (for one log line per transition).
    failing: bool,
}

/// What a completed lookup changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The entry is gone (its host is no longer named) or nothing changed.
    Unchanged,
    /// A new or different address.
    Resolved(SocketAddr),
    /// The lookup failed for the first time after a success (or at first); the last good
    /// address, if any, stays in use.
    Failed { kept: Option<SocketAddr> },
    /// The lookup failed again.
    StillFailing,
}

/// Resolved member addresses with their lifetime; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct DnsCache {
    entries: HashMap<HostPort, Entry>,
}

impl DnsCache {
    /// Takes the members of a new state: forgets hosts no longer named, fills the addresses
    /// known, and returns the lookups to start now (marked in flight).
    pub(crate) fn handle_state(&mut self, now: Instant, state: &mut ClusterState) -> Vec<HostPort> {
        let named: Vec<HostPort> = state.members.values().filter_map(named_by_host).collect();
        self.entries.retain(|k, _| named.contains(k));
        for k in named {
            self.entries.entry(k).or_insert(Entry { addr: None, due: now, in_flight: false, failing: false });
        }
        self.fill(state);
        self.poll_due(now)
    }

    /// Sets the address of every member named by host from the cache.
    pub(crate) fn fill(&self, state: &mut ClusterState) {
        for m in state.members.values_mut() {
            if let Some(e) = named_by_host(m).and_then(|k| self.entries.get(&k)) {
                m.addr = e.addr;
            }
        }
    }

    /// The lookups due at `now` (marked in flight).
    pub(crate) fn poll_due(&mut self, now: Instant) -> Vec<HostPort> {
        let mut due = Vec::new();
        for (k, e) in &mut self.entries {
            if !e.in_flight && e.due <= now {
                e.in_flight = true;
                due.push(k.clone());
            }
        }
        due.sort();
        due
    }

    /// When the next lookup falls due, if any is waiting.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.entries.values().filter(|e| !e.in_flight).map(|e| e.due).min()
    }

    /// Records a completed lookup (`None`: failed, timed out, or no address).
    pub(crate) fn handle_result(&mut self, now: Instant, key: &HostPort, addr: Option<SocketAddr>) -> Outcome {
        let Some(e) = self.entries.get_mut(key) else { return Outcome::Unchanged };
        e.in_flight = false;
        match addr {
            Some(a) => {
                e.due = now + DNS_TTL;
                e.failing = false;
                if e.addr.replace(a) == Some(a) {
                    Outcome::Unchanged
                } else {
                    Outcome::Resolved(a)
                }
            }
            None => {
                e.due = now + DNS_NEGATIVE_TTL;
                if std::mem::replace(&mut e.failing, true) {
                    Outcome::StillFailing
                } else {
                    Outcome::Failed { kept: e.addr }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::MemberRole;

    fn state(hosts: &[(&str, &str)]) -> ClusterState {
        let mut s = ClusterState::default();
        for (name, host) in hosts {
            let ip = host.parse::<std::net::IpAddr>().ok();
            s.members.insert(
                name.to_string(),
                Member {
                    name: name.to_string(),
                    addr: ip.map(|ip| SocketAddr::new(ip, 5432)),
                    host: Some(host.to_string()),
                    port: Some(5432),
                    api_url: None,
                    role: MemberRole::Replica,
                    state: "running".into(),
                    timeline: None,
                    lsn: None,
                    noloadbalance: false,
                    nofailover: false,
                    maintenance: false,
                    lag_bytes: None,
                },
            );
        }
        s
    }

    fn hp(h: &str) -> HostPort {
        (h.to_owned(), 5432)
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lifecycle_positive_negative_and_last_good_kept() {
        let t0 = Instant::now();
        let mut c = DnsCache::default();
        let mut s = state(&[("pg1", "db1"), ("pg2", "10.0.0.2")]);
        // Only the member named by host is looked up; nothing known yet.
        assert_eq!(c.handle_state(t0, &mut s), vec![hp("db1")]);
        assert_eq!(s.members["pg1"].addr, None);
        assert_eq!(s.members["pg2"].addr, Some(a("10.0.0.2:5432")));
        // In flight: another event starts no second lookup.
        assert!(c.handle_state(t0, &mut s).is_empty());
        assert_eq!(c.poll_timeout(), None);
        assert_eq!(c.handle_result(t0, &hp("db1"), Some(a("10.0.0.1:5432"))), Outcome::Resolved(a("10.0.0.1:5432")));
        c.fill(&mut s);
        assert_eq!(s.members["pg1"].addr, Some(a("10.0.0.1:5432")));
        assert_eq!(c.poll_timeout(), Some(t0 + DNS_TTL));
        assert!(c.poll_due(t0 + DNS_TTL - Duration::from_millis(1)).is_empty());
        // Refresh due; it fails: the last good address stays, the next try is after the
        // negative TTL, and only the first failure is reported as such.
        let t1 = t0 + DNS_TTL;
        assert_eq!(c.poll_due(t1), vec![hp("db1")]);
        assert_eq!(c.handle_result(t1, &hp("db1"), None), Outcome::Failed { kept: Some(a("10.0.0.1:5432")) });
        let mut s2 = state(&[("pg1", "db1"), ("pg2", "10.0.0.2")]);
        assert!(c.handle_state(t1, &mut s2).is_empty(), "negative cache: no lookup on every event");
        assert_eq!(s2.members["pg1"].addr, Some(a("10.0.0.1:5432")), "last good address kept");
        assert_eq!(c.poll_timeout(), Some(t1 + DNS_NEGATIVE_TTL));
        let t2 = t1 + DNS_NEGATIVE_TTL;
        assert_eq!(c.poll_due(t2), vec![hp("db1")]);
        assert_eq!(c.handle_result(t2, &hp("db1"), None), Outcome::StillFailing);
        assert_eq!(c.poll_due(t2 + DNS_NEGATIVE_TTL), vec![hp("db1")]);
        assert_eq!(
            c.handle_result(t2 + DNS_NEGATIVE_TTL, &hp("db1"), Some(a("10.0.0.9:5432"))),
            Outcome::Resolved(a("10.0.0.9:5432"))
        );
    }

    #[test]
    fn hosts_no_longer_named_are_forgotten() {
        let t0 = Instant::now();
        let mut c = DnsCache::default();
        let mut s = state(&[("pg1", "db1"), ("pg2", "db2")]);
        assert_eq!(c.handle_state(t0, &mut s), vec![hp("db1"), hp("db2")]);
        let mut s = state(&[("pg1", "db1")]);
        c.handle_state(t0, &mut s);
        assert_eq!(c.entries.len(), 1);
        // A late answer for the forgotten host changes nothing.
        assert_eq!(c.handle_result(t0, &hp("db2"), Some(a("10.0.0.2:5432"))), Outcome::Unchanged);
        assert_eq!(c.entries.len(), 1);
    }
}
