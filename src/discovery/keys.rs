//! Pure: Patroni's keys under `<namespace><scope>/` → a `ClusterState`.
//!
//! The same layout is used by etcd v3 and by v2 (there as a directory tree), so both sources
//! reduce what they read to a map of relative key → raw value and call `parse_cluster`.
//! A malformed value never stops parsing: the member or key is skipped and reported.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::topology::{ClusterState, Failover, Member, MemberRole};

/// Relative key (`leader`, `members/pg1`, …) → raw value.
pub type KeyMap = BTreeMap<String, Vec<u8>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key {key}: not valid JSON for a Patroni member: {reason}")]
    Member { key: String, reason: String },
    #[error("key {key}: conn_url {url:?} has no usable host and port")]
    ConnUrl { key: String, url: String },
    #[error("key {key}: value is not UTF-8")]
    Utf8 { key: String },
    #[error("key {key}: not a valid pgfront agent node: {reason}")]
    Node { key: String, reason: String },
    #[error("key {key}: not a valid fencing request: {reason}")]
    Fence { key: String, reason: String },
}

#[derive(Deserialize)]
struct RawMember {
    conn_url: Option<String>,
    api_url: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    state: Option<String>,
    timeline: Option<u64>,
    xlog_location: Option<u64>,
    replay_lsn: Option<u64>,
    #[serde(default)]
    tags: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct RawFailover {
    leader: Option<String>,
    member: Option<String>,
    scheduled_at: Option<String>,
}

#[derive(Deserialize)]
struct RawStatus {
    optime: Option<u64>,
}

/// The cluster's keys, parsed by the rules of its `source`.
pub fn parse(source: crate::config::Source, keys: &KeyMap) -> (ClusterState, Vec<KeyError>) {
    match source {
        crate::config::Source::Patroni => parse_cluster(keys),
        crate::config::Source::Agent => super::agent_keys::parse_cluster(keys),
    }
}

/// Parses every key Patroni keeps for one cluster. Unknown keys (`config`, `initialize`,
/// `history`, `sync` …) are ignored.
pub fn parse_cluster(keys: &KeyMap) -> (ClusterState, Vec<KeyError>) {
    let mut state = ClusterState::default();
    let mut errors = Vec::new();
    let mut optime_key = None;
    for (key, raw) in keys {
        let Ok(value) = std::str::from_utf8(raw) else {
            errors.push(KeyError::Utf8 { key: key.clone() });
            continue;
        };
        match key.as_str() {
            "leader" => {
                let v = value.trim();
                state.leader = (!v.is_empty()).then(|| v.to_owned());
            }
            "failover" => state.failover = parse_failover(value),
            "config" => state.ttl = parse_ttl(value),
            "status" => {
                if let Ok(RawStatus { optime: Some(o) }) = serde_json::from_str(value) {
                    optime_key = Some(o);
                }
            }
            "optime/leader" => {
                if optime_key.is_none() {
                    optime_key = value.trim().parse().ok();
                }
            }
            _ => {
                if let Some(name) = key.strip_prefix("members/") {
                    if name.is_empty() || name.contains('/') {
                        continue;
                    }
                    match parse_member(key, name, value) {
                        Ok(m) => {
                            state.members.insert(name.to_owned(), m);
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
    }
    state.leader_optime = optime_key;
    // A fencing request applies whatever decides the roles.
    let (fence, fence_error) = super::agent_keys::parse_fence_key(keys);
    state.fence = fence;
    errors.extend(fence_error);
    (state, errors)
}

fn parse_member(key: &str, name: &str, value: &str) -> Result<Member, KeyError> {
    let raw: RawMember =
        serde_json::from_str(value).map_err(|e| KeyError::Member { key: key.to_owned(), reason: e.to_string() })?;
    let conn = match &raw.conn_url {
        Some(url) => {
            Some(parse_conn_url(url).ok_or_else(|| KeyError::ConnUrl { key: key.to_owned(), url: url.clone() })?)
        }
        None => None,
    };
    let tag = |t: &str| raw.tags.get(t).is_some_and(truthy);
    Ok(Member {
        name: name.to_owned(),
        addr: conn.as_ref().and_then(|(h, p)| h.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, *p))),
        host: conn.as_ref().map(|(h, _)| h.clone()),
        port: conn.as_ref().map(|(_, p)| *p),
        api_url: raw.api_url,
        role: MemberRole::parse(raw.role.as_deref().unwrap_or("")),
        state: raw.state.unwrap_or_default(),
        timeline: raw.timeline,
        lsn: raw.replay_lsn.or(raw.xlog_location),
        noloadbalance: tag("noloadbalance"),
        nofailover: tag("nofailover"),
        maintenance: false,
        lag_bytes: None,
    })
}

/// Patroni writes tags as booleans, but strings such as "true" are seen in hand-written configs.
fn truthy(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "true" | "on" | "yes" | "1"),
        serde_json::Value::Number(n) => n.as_u64().is_some_and(|n| n != 0),
        _ => false,
    }
}

/// `postgres://user:pw@host:port/db?…` or `postgresql://…` → (host, port). IPv6 hosts are
/// written in brackets. The default port is 5432.
pub fn parse_conn_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://"))?;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 5432,
            None => return None,
        };
        (h.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().ok()?),
            None => (hostport.to_owned(), 5432),
        }
    };
    (!host.is_empty()).then_some((host, port))
}

/// Patroni's dynamic configuration (`config` key) holds `ttl` as a number (or, written by
/// hand, a string).
fn parse_ttl(value: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct RawConfig {
        ttl: Option<serde_json::Value>,
    }
    match serde_json::from_str::<RawConfig>(value).ok()?.ttl? {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Patroni writes the `failover` key as JSON (`{"leader": .., "member": .., "scheduled_at": ..}`),
/// older versions as `leader:member`, and clears it by writing `{}` or deleting it.
fn parse_failover(value: &str) -> Option<Failover> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let f = match serde_json::from_str::<RawFailover>(value) {
        Ok(raw) => Failover { leader: raw.leader, candidate: raw.member, scheduled: raw.scheduled_at.is_some() },
        Err(_) if !value.starts_with('{') => {
            let mut parts = value.splitn(2, ':').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
            Failover { leader: parts.next(), candidate: parts.next(), scheduled: false }
        }
        Err(_) => return None,
    };
    let nonempty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    (nonempty(&f.leader) || nonempty(&f.candidate)).then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn km(pairs: &[(&str, &str)]) -> KeyMap {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn parses_patroni_3_0_keys() {
        let keys = km(&[
            ("leader", "pg1"),
            ("config", r#"{"ttl":10}"#),
            ("status", r#"{"optime":67109000,"slots":{"pg2":67109000}}"#),
            (
                "members/pg1",
                r#"{"conn_url":"postgres://127.0.0.1:5441/postgres","api_url":"http://127.0.0.1:8441/patroni","state":"running","role":"master","version":"3.0.2","xlog_location":67109000,"timeline":1}"#,
            ),
            (
                "members/pg2",
                r#"{"conn_url":"postgres://127.0.0.1:5442/postgres","api_url":"http://127.0.0.1:8442/patroni","state":"running","role":"replica","version":"3.0.2","xlog_location":67108000,"timeline":1,"tags":{"noloadbalance":true}}"#,
            ),
        ]);
        let (s, errs) = parse_cluster(&keys);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.leader.as_deref(), Some("pg1"));
        assert_eq!(s.leader_optime, Some(67109000));
        assert_eq!(s.ttl, Some(10));
        let pg1 = &s.members["pg1"];
        assert_eq!(pg1.role, MemberRole::Primary);
        assert_eq!(pg1.addr, Some("127.0.0.1:5441".parse().unwrap()));
        assert_eq!(pg1.state, "running");
        let pg2 = &s.members["pg2"];
        assert_eq!(pg2.role, MemberRole::Replica);
        assert!(pg2.noloadbalance);
        assert_eq!(pg2.lsn, Some(67108000));
    }

    #[test]
    fn bad_member_is_reported_and_skipped() {
        let keys =
            km(&[("leader", "pg1"), ("members/pg1", "{not json"), ("members/pg2", r#"{"conn_url":"mysql://x"}"#)]);
        let (s, errs) = parse_cluster(&keys);
        assert!(s.members.is_empty());
        assert_eq!(errs.len(), 2);
        assert!(matches!(errs[0], KeyError::Member { .. }));
        assert!(matches!(errs[1], KeyError::ConnUrl { .. }));
    }

    #[test]
    fn conn_urls() {
        assert_eq!(parse_conn_url("postgres://10.0.0.1:5433/postgres"), Some(("10.0.0.1".into(), 5433)));
        assert_eq!(
            parse_conn_url("postgresql://u:p@db-01.example:6432/x?sslmode=require"),
            Some(("db-01.example".into(), 6432))
        );
        assert_eq!(parse_conn_url("postgres://[::1]:5433/postgres"), Some(("::1".into(), 5433)));
        assert_eq!(parse_conn_url("postgres://[::1]/postgres"), Some(("::1".into(), 5432)));
        assert_eq!(parse_conn_url("postgres://host/postgres"), Some(("host".into(), 5432)));
        assert_eq!(parse_conn_url("postgres://:5432/"), None);
        assert_eq!(parse_conn_url("postgres://h:99999/"), None);
        assert_eq!(parse_conn_url("http://h:1/"), None);
    }

    #[test]
    fn ttl_forms() {
        assert_eq!(parse_ttl(r#"{"ttl":30,"loop_wait":10}"#), Some(30));
        assert_eq!(parse_ttl(r#"{"ttl":"20"}"#), Some(20));
        assert_eq!(parse_ttl(r#"{"ttl":12.5}"#), Some(12));
        assert_eq!(parse_ttl(r#"{"ttl":-1}"#), None);
        assert_eq!(parse_ttl(r#"{"loop_wait":10}"#), None);
        assert_eq!(parse_ttl("garbage"), None);
    }

    #[test]
    fn failover_forms() {
        assert_eq!(parse_failover("{}"), None);
        assert_eq!(parse_failover(""), None);
        let f = parse_failover(r#"{"leader":"pg1","member":"pg2"}"#).unwrap();
        assert_eq!((f.leader.as_deref(), f.candidate.as_deref(), f.scheduled), (Some("pg1"), Some("pg2"), false));
        let f = parse_failover(r#"{"member":"pg2","scheduled_at":"2026-01-01T00:00:00+00:00"}"#).unwrap();
        assert!(f.scheduled && f.leader.is_none());
        let f = parse_failover("pg1:pg3").unwrap();
        assert_eq!((f.leader.as_deref(), f.candidate.as_deref()), (Some("pg1"), Some("pg3")));
    }

    /// serde_json's recursion limit turns hostile nesting into an error, not a stack overflow.
    #[test]
    fn deeply_nested_values_are_rejected_without_overflow() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let obj = format!(r#"{{"tags":{}{}}}"#, r#"{"a":"#.repeat(50_000), "}".repeat(50_001));
        let keys = km(&[("members/pg1", &deep), ("members/pg2", &obj), ("failover", &obj), ("status", &deep)]);
        let (s, errs) = parse_cluster(&keys);
        assert!(s.members.is_empty() && s.failover.is_none() && s.leader_optime.is_none());
        assert_eq!(errs.len(), 2);
    }

    #[test]
    fn roles_of_every_patroni_version() {
        for (s, r) in [
            ("master", MemberRole::Primary),
            ("primary", MemberRole::Primary),
            ("promoted", MemberRole::Promoted),
            ("replica", MemberRole::Replica),
            ("standby_leader", MemberRole::StandbyLeader),
            ("demoted", MemberRole::Demoted),
            ("uninitialized", MemberRole::Other),
        ] {
            assert_eq!(MemberRole::parse(s), r, "{s}");
        }
    }

    mod fuzz {
        //! Hostile input: whatever bytes etcd holds under the cluster's prefix, parsing never
        //! panics, and what it yields is bounded by what it was given.
        use super::*;
        use proptest::prelude::*;

        /// Member JSON close to Patroni's, with every field of any JSON type or missing.
        fn arb_json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::Bool),
                any::<i64>().prop_map(|n| serde_json::json!(n)),
                any::<u64>().prop_map(|n| serde_json::json!(n)),
                any::<f64>().prop_map(|n| serde_json::json!(n)),
                ".{0,40}".prop_map(serde_json::Value::String),
                prop_oneof![
                    Just("postgres://127.0.0.1:5432/postgres"),
                    Just("postgresql://u:p@[::1]:99999/x"),
                    Just("postgres://@:/"),
                    Just("postgres://[::1"),
                    Just("master"),
                    Just("replica"),
                    Just("running"),
                ]
                .prop_map(|s| serde_json::Value::String(s.into())),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                    proptest::collection::btree_map(".{0,8}", inner, 0..6)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn arb_member_json() -> impl Strategy<Value = String> {
            let fields = ["conn_url", "api_url", "role", "state", "timeline", "xlog_location", "replay_lsn", "tags"];
            proptest::collection::vec((proptest::sample::select(fields.to_vec()), arb_json_value()), 0..10).prop_map(
                |fs| {
                    let m: serde_json::Map<String, serde_json::Value> =
                        fs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                    serde_json::Value::Object(m).to_string()
                },
            )
        }

        /// Raw values: arbitrary bytes, arbitrary text, or JSON that nearly fits.
        fn arb_value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                ".{0,200}".prop_map(String::into_bytes),
                arb_member_json().prop_map(String::into_bytes),
            ]
        }

        fn arb_key() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::sample::select(vec![
                    "leader",
                    "failover",
                    "status",
                    "optime/leader",
                    "config",
                    "members/",
                    "members/pg1",
                    "members/pg2",
                    "members/a/b",
                ])
                .prop_map(str::to_owned),
                ".{0,30}",
                ".{0,30}".prop_map(|s| format!("members/{s}")),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn member_json_never_panics(name in ".{1,20}", value in arb_value()) {
                let text = String::from_utf8_lossy(&value);
                if let Ok(m) = parse_member("members/x", &name, &text) {
                    prop_assert_eq!(&m.name, &name);
                    // A host comes only with a port, never empty.
                    prop_assert_eq!(m.host.is_some(), m.port.is_some());
                    prop_assert!(m.host.as_ref().is_none_or(|h| !h.is_empty()));
                }
            }

            #[test]
            fn conn_url_never_panics(url in ".{0,80}") {
                if let Some((host, _)) = parse_conn_url(&url) {
                    prop_assert!(!host.is_empty() && url.contains(host.as_str()));
                }
            }

            #[test]
            fn leader_and_failover_never_panic(value in arb_value()) {
                let text = String::from_utf8_lossy(&value).into_owned();
                let _ = parse_failover(&text);
                let keys: KeyMap = [("leader".to_string(), value.clone()), ("failover".to_string(), value)].into();
                let (s, _) = parse_cluster(&keys);
                if let Some(l) = &s.leader {
                    prop_assert!(!l.is_empty() && text.contains(l.as_str()));
                }
            }

            #[test]
            fn parse_cluster_over_any_keys(keys in proptest::collection::btree_map(arb_key(), arb_value(), 0..12)) {
                let (s, errors) = parse_cluster(&keys);
                // Every member comes from one key, every error names one key.
                prop_assert!(s.members.len() + errors.len() <= keys.len());
                for name in s.members.keys() {
                    let key = format!("members/{name}");
                    prop_assert!(keys.contains_key(&key));
                }
                // Parsing is a function of the keys.
                prop_assert_eq!(parse_cluster(&keys), (s, errors));
            }
        }
    }
}
