//! `pgfront agent pre-promote`: fencing before a promotion. It writes `<prefix>fence` (under a
//! lease of `hold`, so the request vanishes by itself) naming the node about to be promoted,
//! then waits until every proxy registered under `<prefix>proxies/` has written
//! `<prefix>fence-ack/<proxy_id>` with this fence's id: each proxy then sends no new connection
//! to any other node as primary and has closed its primary sessions there.
//!
//! Exit status, as Patroni's `pre_promote` (and a repmgr `promote_command` written as
//! `pgfront agent pre-promote ... && repmgr standby promote ...`) expects: 0 lets the promotion
//! go on (every proxy acknowledged, or none is registered, or `on_timeout = "proceed"`),
//! non-zero refuses it (1: some proxy did not acknowledge in time; 2: bad configuration or
//! arguments; 3: etcd unreachable under `refuse`). A refused fence is withdrawn (its lease
//! revoked), so the proxies route as before.
//!
//! The waiting is a pure core, [`FenceWait`]: registrations, acknowledgements and time in,
//! a [`Decision`] out. A proxy whose registration disappears is no longer waited for; one that
//! registers during the wait is. That rests on the proxy's side of the contract
//! (`discovery::fence`): a registration disappears only when the proxy stopped (it revokes its
//! lease once its sessions are closed) or when its lease expired, and a proxy routes no
//! primary connection and holds no primary session from 2 s (`LAPSE_MARGIN`) before its lease
//! can have expired (its keep-alive unanswered for about the TTL, `source = "agent"`) until it
//! is registered again and has read etcd. Under `source = "patroni"` a proxy cut off from etcd
//! keeps routing to the old primary while a direct check finds it writable: Patroni demotes a
//! primary that cannot renew its leader key, and the check sees it read-only.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use crate::config::agent::{AgentConfig, OnTimeout};
use crate::etcd::{timed, CallError};

/// The value of `<prefix>fence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    pub id: String,
    pub new_primary: String,
    /// `None`: every node other than `new_primary` is fenced.
    pub old_primary: Option<String>,
    pub requested_at_ms: u64,
}

/// The value of `<prefix>fence-ack/<proxy_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAck {
    pub id: String,
    #[serde(default)]
    pub closed_sessions: u64,
    #[serde(default)]
    pub at_ms: u64,
}

/// What the wait has come to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Some registered proxy has not acknowledged yet, and the deadline is ahead.
    Wait,
    /// Every registered proxy acknowledged (the list is theirs).
    AllAcked(Vec<String>),
    /// No proxy is registered: nothing to fence.
    NoProxies,
    /// The deadline passed; these registered proxies did not acknowledge.
    TimedOut { missing: Vec<String> },
}

/// The pure core of the wait.
#[derive(Debug)]
pub struct FenceWait {
    prefix: String,
    fence_id: String,
    deadline: Instant,
    /// proxy id → its registration (JSON, shown when it does not acknowledge).
    registered: BTreeMap<String, String>,
    /// proxy id → the fence id it acknowledged.
    acks: BTreeMap<String, String>,
}

impl FenceWait {
    /// `prefix`: the cluster's `<namespace><scope>/`.
    pub fn new(prefix: &str, fence_id: &str, deadline: Instant) -> FenceWait {
        FenceWait {
            prefix: prefix.to_owned(),
            fence_id: fence_id.to_owned(),
            deadline,
            registered: BTreeMap::new(),
            acks: BTreeMap::new(),
        }
    }

    /// A key was written (initial read or watch).
    pub fn handle_put(&mut self, key: &str, value: &[u8]) {
        let Some(rel) = key.strip_prefix(&self.prefix) else { return };
        if let Some(id) = rel.strip_prefix("proxies/").filter(|id| !id.is_empty() && !id.contains('/')) {
            self.registered.insert(id.to_owned(), String::from_utf8_lossy(value).into_owned());
        } else if let Some(id) = rel.strip_prefix("fence-ack/").filter(|id| !id.is_empty() && !id.contains('/')) {
            match serde_json::from_slice::<FenceAck>(value) {
                Ok(a) => {
                    self.acks.insert(id.to_owned(), a.id);
                }
                Err(_) => {
                    self.acks.remove(id);
                }
            }
        }
    }

    /// A key was deleted (or its lease expired).
    pub fn handle_delete(&mut self, key: &str) {
        let Some(rel) = key.strip_prefix(&self.prefix) else { return };
        if let Some(id) = rel.strip_prefix("proxies/") {
            self.registered.remove(id);
        } else if let Some(id) = rel.strip_prefix("fence-ack/") {
            self.acks.remove(id);
        }
    }

    fn missing(&self) -> Vec<String> {
        self.registered.keys().filter(|id| self.acks.get(*id) != Some(&self.fence_id)).cloned().collect()
    }

    pub fn poll(&self, now: Instant) -> Decision {
        if self.registered.is_empty() {
            return Decision::NoProxies;
        }
        let missing = self.missing();
        if missing.is_empty() {
            return Decision::AllAcked(self.registered.keys().cloned().collect());
        }
        if now >= self.deadline {
            return Decision::TimedOut { missing };
        }
        Decision::Wait
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The registration a proxy wrote (to name its host and admin URL in messages).
    pub fn registration(&self, id: &str) -> Option<&str> {
        self.registered.get(id).map(String::as_str)
    }
}

/// Options of `pre-promote` (command-line values override the `[pre_promote]` section).
#[derive(Debug, Clone)]
pub struct PrePromoteArgs {
    pub timeout: Option<Duration>,
    pub on_timeout: Option<OnTimeout>,
    pub hold: Option<Duration>,
    pub new_primary: Option<String>,
    pub old_primary: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum FenceError {
    #[error(transparent)]
    Connect(#[from] crate::etcd::ConnectError),
    #[error(transparent)]
    Call(#[from] crate::etcd::CallError),
    #[error("etcd watch ended")]
    WatchEnded,
}

/// `pgfront agent pre-promote -c FILE [...]` (see the module doc for the exit status).
pub fn main_pre_promote(path: &Path, args: PrePromoteArgs) -> ExitCode {
    let cfg = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pre-promote: {e}");
            return ExitCode::from(2);
        }
    };
    let policy = args.on_timeout.unwrap_or(cfg.pre_promote.on_timeout);
    let hold = args.hold.unwrap_or(cfg.pre_promote.hold);
    if hold.as_secs() < 2 {
        eprintln!("pre-promote: --hold must be at least 2s (an etcd lease's unit is the second)");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pre-promote: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(pre_promote(&cfg, &args, policy, hold)) {
        Ok(code) => code,
        Err(e) => match policy {
            OnTimeout::Refuse => {
                eprintln!("pre-promote: {e}; promotion REFUSED (on_timeout = \"refuse\")");
                ExitCode::from(3)
            }
            OnTimeout::Proceed => {
                eprintln!("pre-promote: {e}; proxies NOT fenced, promotion proceeds (on_timeout = \"proceed\")");
                ExitCode::SUCCESS
            }
        },
    }
}

async fn pre_promote(
    cfg: &AgentConfig,
    args: &PrePromoteArgs,
    policy: OnTimeout,
    hold: Duration,
) -> Result<ExitCode, FenceError> {
    let started = Instant::now();
    let timeout = args.timeout.unwrap_or(cfg.pre_promote.timeout);
    let t = cfg.etcd.etcd_timeout;
    let prefix = cfg.prefix();
    let fence = FenceRequest {
        id: format!("{}-{}-{}", cfg.name, super::probe::unix_ms(), std::process::id()),
        new_primary: args.new_primary.clone().unwrap_or_else(|| cfg.name.clone()),
        old_primary: args.old_primary.clone(),
        requested_at_ms: super::probe::unix_ms(),
    };
    let mut client = crate::etcd::connect(&cfg.etcd, &cfg.etcd.endpoints).await?;
    let lease = timed("lease grant", t, client.lease_grant(hold.as_secs() as i64, None)).await?.id();
    let body = serde_json::to_string(&fence).unwrap_or_default();
    let fence_key = format!("{prefix}fence");
    timed("put fence", t, client.put(fence_key.as_str(), body, Some(PutOptions::new().with_lease(lease)))).await?;
    println!(
        "pre-promote: fence {} written ({fence_key}, new primary {}, fenced: {}, held {hold:?}); waiting up to {timeout:?} for the proxies",
        fence.id,
        fence.new_primary,
        fence.old_primary.as_deref().unwrap_or("every other node"),
    );
    let mut wait = FenceWait::new(&prefix, &fence.id, started + timeout);
    let decision = match wait_acks(&mut client, &prefix, &mut wait, t).await {
        Ok(d) => d,
        Err(e) => {
            if policy == OnTimeout::Refuse {
                // The promotion is refused: withdraw the fence, or the old primary stays
                // unroutable for the whole hold.
                match timed("lease revoke", t, client.lease_revoke(lease)).await {
                    Ok(_) => eprintln!("pre-promote: fence {} withdrawn", fence.id),
                    Err(r) => eprintln!("pre-promote: fence {} not withdrawn ({r}): it ends with its hold", fence.id),
                }
            }
            return Err(e);
        }
    };
    let took = started.elapsed();
    match decision {
        Decision::NoProxies => {
            println!(
                "pre-promote: no proxy is registered under {prefix}proxies/: nothing to fence; promotion proceeds"
            );
            Ok(ExitCode::SUCCESS)
        }
        Decision::AllAcked(ids) => {
            println!(
                "pre-promote: fence {} acknowledged by every proxy ({}: {}) in {:.0} ms; promotion proceeds",
                fence.id,
                ids.len(),
                ids.join(", "),
                took.as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Decision::TimedOut { .. } | Decision::Wait => {
            not_acknowledged(&wait, &fence, policy, timeout, &mut client, lease, t).await
        }
    }
}

/// Reads the registrations and acknowledgements, then follows them, until `wait` decides.
async fn wait_acks(
    client: &mut etcd_client::Client,
    prefix: &str,
    wait: &mut FenceWait,
    t: Duration,
) -> Result<Decision, FenceError> {
    let snapshot = timed("get", t, client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    for kv in snapshot.kvs() {
        wait.handle_put(&String::from_utf8_lossy(kv.key()), kv.value());
    }
    let rev = snapshot.header().map_or(0, |h| h.revision());
    let mut watch = None;
    let decision = loop {
        let d = wait.poll(Instant::now());
        if d != Decision::Wait {
            break d;
        }
        if watch.is_none() {
            let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
            watch = Some(timed("watch", t, client.watch(prefix, Some(opts))).await?);
        }
        let Some(stream) = watch.as_mut() else { break wait.poll(Instant::now()) };
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(resp)) => {
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key());
                        match ev.event_type() {
                            EventType::Put => wait.handle_put(&key, kv.value()),
                            EventType::Delete => wait.handle_delete(&key),
                        }
                    }
                }
                Ok(None) => return Err(FenceError::WatchEnded),
                Err(source) => return Err(CallError::Etcd { what: "watch", source }.into()),
            },
            _ = tokio::time::sleep_until(wait.deadline().into()) => {}
        }
    };
    Ok(decision)
}

/// The deadline passed with proxies missing: print them and apply the policy.
async fn not_acknowledged(
    wait: &FenceWait,
    fence: &FenceRequest,
    policy: OnTimeout,
    timeout: Duration,
    client: &mut etcd_client::Client,
    lease: i64,
    t: Duration,
) -> Result<ExitCode, FenceError> {
    let missing = wait.missing();
    for id in &missing {
        eprintln!(
            "pre-promote: proxy {id} did NOT acknowledge fence {} within {timeout:?} (registration: {})",
            fence.id,
            wait.registration(id).unwrap_or("?")
        );
    }
    match policy {
        OnTimeout::Refuse => {
            // Withdraw the fence: the promotion will not happen, the proxies route as before.
            let _ = timed("lease revoke", t, client.lease_revoke(lease)).await;
            eprintln!(
                "pre-promote: {} proxy(ies) did not acknowledge: promotion REFUSED (on_timeout = \"refuse\"); fence withdrawn",
                missing.len()
            );
            Ok(ExitCode::from(1))
        }
        OnTimeout::Proceed => {
            eprintln!(
                "pre-promote: {} proxy(ies) did not acknowledge: promotion proceeds (on_timeout = \"proceed\")",
                missing.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/service/main/";

    fn ack(id: &str) -> Vec<u8> {
        serde_json::to_vec(&FenceAck { id: id.into(), closed_sessions: 2, at_ms: 1 }).unwrap()
    }

    #[test]
    fn waits_for_every_registered_proxy() {
        let t0 = Instant::now();
        let mut w = FenceWait::new(P, "f1", t0 + Duration::from_secs(5));
        assert_eq!(w.poll(t0), Decision::NoProxies);
        w.handle_put("/service/main/proxies/lb1-10", b"{\"host\":\"lb1\"}");
        w.handle_put("/service/main/proxies/lb2-20", b"{}");
        w.handle_put("/service/other/proxies/lb3-30", b"{}");
        w.handle_put("/service/main/members/pg1", b"{}");
        assert_eq!(w.poll(t0), Decision::Wait);
        w.handle_put("/service/main/fence-ack/lb1-10", &ack("f1"));
        // An acknowledgement of an older fence does not count.
        w.handle_put("/service/main/fence-ack/lb2-20", &ack("f0"));
        assert_eq!(w.poll(t0 + Duration::from_secs(1)), Decision::Wait);
        assert_eq!(w.poll(t0 + Duration::from_secs(5)), Decision::TimedOut { missing: vec!["lb2-20".into()] });
        w.handle_put("/service/main/fence-ack/lb2-20", &ack("f1"));
        assert_eq!(w.poll(t0 + Duration::from_secs(6)), Decision::AllAcked(vec!["lb1-10".into(), "lb2-20".into()]));
        assert_eq!(w.registration("lb1-10"), Some("{\"host\":\"lb1\"}"));
    }

    #[test]
    fn dead_proxies_are_not_waited_for_and_late_ones_are() {
        let t0 = Instant::now();
        let mut w = FenceWait::new(P, "f1", t0 + Duration::from_secs(5));
        w.handle_put("/service/main/proxies/a", b"{}");
        w.handle_put("/service/main/proxies/b", b"{}");
        w.handle_put("/service/main/fence-ack/a", &ack("f1"));
        w.handle_delete("/service/main/proxies/b");
        assert_eq!(w.poll(t0), Decision::AllAcked(vec!["a".into()]));
        w.handle_put("/service/main/proxies/c", b"{}");
        assert_eq!(w.poll(t0), Decision::Wait);
        // A garbled or withdrawn acknowledgement does not count.
        w.handle_put("/service/main/fence-ack/c", b"garbage");
        assert_eq!(w.poll(t0), Decision::Wait);
        w.handle_put("/service/main/fence-ack/c", &ack("f1"));
        w.handle_delete("/service/main/fence-ack/c");
        assert_eq!(w.poll(t0 + Duration::from_secs(9)), Decision::TimedOut { missing: vec!["c".into()] });
    }

    #[test]
    fn fence_json_matches_the_contract() {
        let f = FenceRequest { id: "x".into(), new_primary: "pg2".into(), old_primary: None, requested_at_ms: 5 };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            serde_json::json!({"id": "x", "new_primary": "pg2", "old_primary": null, "requested_at_ms": 5})
        );
    }
}
