//! Pure: the keys `pgfront agent` writes under the cluster's prefix → a `ClusterState`, for a
//! cluster with `source = "agent"`; and the fencing request (`fence`), read for every source.
//!
//! The layout is the shared contract of the agent and the proxy (README, "Agent keys"):
//! `nodes/<name>` holds one JSON object per database host, attached to its agent's lease, so a
//! dead agent's entry vanishes within the lease's ttl and its node is no longer routable. The
//! leader is not a key: `topology::elect` derives it from the nodes' claims. Patroni's keys
//! under the same prefix are ignored here, and `nodes/` is ignored by Patroni's parser, so
//! both can coexist during a migration and the proxy's `source` picks one.
//!
//! A malformed node is skipped and reported, like a malformed Patroni member: it is then not
//! routable, never guessed.

use serde::Deserialize;

use super::keys::{parse_conn_url, KeyError, KeyMap};
use crate::topology::{elect, ClusterState, Election, Fence, Member, MemberRole};

/// The highest `version` of a node's JSON this proxy understands.
pub(crate) const NODE_VERSION: u64 = 1;

#[derive(Deserialize)]
struct RawNode {
    version: Option<u64>,
    conn_url: Option<String>,
    api_url: Option<String>,
    state: Option<String>,
    role: Option<String>,
    in_recovery: Option<bool>,
    timeline: Option<u64>,
    lsn: Option<u64>,
    lag_bytes: Option<u64>,
    #[serde(default)]
    maintenance: bool,
}

#[derive(Deserialize)]
struct RawFence {
    id: String,
    new_primary: String,
    old_primary: Option<String>,
}

/// Parses every `nodes/<name>` key and the `fence` key, and elects the leader by the nodes'
/// claims. Every other key is ignored.
pub(crate) fn parse_cluster(keys: &KeyMap) -> (ClusterState, Vec<KeyError>) {
    let mut state = ClusterState::default();
    let mut errors = Vec::new();
    for (key, raw) in keys {
        let Some(name) = key.strip_prefix("nodes/") else { continue };
        if name.is_empty() || name.contains('/') {
            continue;
        }
        let Ok(value) = std::str::from_utf8(raw) else {
            errors.push(KeyError::Utf8 { key: key.clone() });
            continue;
        };
        match parse_node(key, name, value) {
            Ok(m) => {
                state.members.insert(name.to_owned(), m);
            }
            Err(e) => errors.push(e),
        }
    }
    match elect(state.members.values()) {
        Election::None => {}
        Election::Leader(l) => state.leader = Some(l),
        Election::SplitBrain(names) => state.split_brain = names,
    }
    let (fence, fence_error) = parse_fence_key(keys);
    state.fence = fence;
    errors.extend(fence_error);
    (state, errors)
}

/// The `fence` key, if present and well-formed (a malformed one is reported and fences
/// nothing: the agent that wrote it waits for acknowledgements that never come, and its
/// timeout policy decides).
pub(crate) fn parse_fence_key(keys: &KeyMap) -> (Option<Fence>, Option<KeyError>) {
    let Some(raw) = keys.get("fence") else { return (None, None) };
    let bad = |reason: String| KeyError::Fence { key: "fence".to_owned(), reason };
    let value = match std::str::from_utf8(raw) {
        Ok(v) => v,
        Err(_) => return (None, Some(KeyError::Utf8 { key: "fence".to_owned() })),
    };
    match serde_json::from_str::<RawFence>(value) {
        Ok(f) if f.id.is_empty() || f.new_primary.is_empty() => {
            (None, Some(bad("id and new_primary must not be empty".to_owned())))
        }
        Ok(f) => (
            Some(Fence { id: f.id, new_primary: f.new_primary, old_primary: f.old_primary.filter(|o| !o.is_empty()) }),
            None,
        ),
        Err(e) => (None, Some(bad(e.to_string()))),
    }
}

fn parse_node(key: &str, name: &str, value: &str) -> Result<Member, KeyError> {
    let bad = |reason: String| KeyError::Node { key: key.to_owned(), reason };
    let raw: RawNode = serde_json::from_str(value).map_err(|e| bad(e.to_string()))?;
    if let Some(v) = raw.version.filter(|v| *v > NODE_VERSION) {
        return Err(bad(format!("version {v} is newer than this proxy understands ({NODE_VERSION}): upgrade pgfront")));
    }
    let conn = match &raw.conn_url {
        Some(url) => {
            Some(parse_conn_url(url).ok_or_else(|| KeyError::ConnUrl { key: key.to_owned(), url: url.clone() })?)
        }
        None => None,
    };
    // A node that says it is primary while in recovery contradicts itself: it claims nothing.
    let role = match (raw.role.as_deref(), raw.in_recovery) {
        (Some("primary"), Some(true)) => MemberRole::Other,
        (Some("primary"), _) => MemberRole::Primary,
        (Some("replica"), _) => MemberRole::Replica,
        _ => MemberRole::Other,
    };
    Ok(Member {
        name: name.to_owned(),
        addr: conn.as_ref().and_then(|(h, p)| h.parse::<std::net::IpAddr>().ok().map(|ip| (ip, *p).into())),
        host: conn.as_ref().map(|(h, _)| h.clone()),
        port: conn.as_ref().map(|(_, p)| *p),
        api_url: raw.api_url,
        role,
        state: raw.state.unwrap_or_default(),
        timeline: raw.timeline,
        lsn: raw.lsn,
        noloadbalance: false,
        nofailover: false,
        maintenance: raw.maintenance,
        lag_bytes: raw.lag_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::topology::{ClusterView, PrimaryStatus};

    /// A node's JSON as in the contract; `extra` `maint` sets the maintenance flag.
    fn node(name: &str, port: u16, role: &str, tl: u64, extra: &str) -> (String, Vec<u8>) {
        let rec = role != "primary";
        let maint = extra == "maint";
        let extra = "";
        let v = format!(
            r#"{{"version":1,"name":"{name}","conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:8008/","state":"running","role":"{role}","in_recovery":{rec},"timeline":{tl},"lsn":5000,"receive_lsn":null,"replay_lsn":null,"lag_bytes":null,"upstream":null,"replication_state":null,"probe_ms":1.7,"probed_at_ms":1764490000000,"maintenance":{maint},"repmgr":{{"node_id":1,"type":"primary","upstream_node_id":null,"active":true}}{extra}}}"#
        );
        (format!("nodes/{name}"), v.into_bytes())
    }

    fn view(keys: &KeyMap) -> ClusterView {
        let (s, errs) = parse_cluster(keys);
        assert!(errs.is_empty(), "{errs:?}");
        let mut v = ClusterView::default();
        v.handle_keys(s);
        v
    }

    fn eligible(v: &ClusterView, role: Role) -> Vec<String> {
        v.targets(role, None).eligible.iter().map(|b| b.member.to_string()).collect()
    }

    fn kept(v: &ClusterView, role: Role) -> Vec<String> {
        v.targets(role, None).keep.iter().map(|b| b.member.to_string()).collect()
    }

    #[test]
    fn contract_example_parses() {
        let keys: KeyMap = [node("pg1", 5432, "primary", 3, ""), node("pg2", 5433, "replica", 3, "")].into();
        let (s, errs) = parse_cluster(&keys);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.leader.as_deref(), Some("pg1"));
        let pg1 = &s.members["pg1"];
        assert_eq!((pg1.role, pg1.timeline, pg1.lsn), (MemberRole::Primary, Some(3), Some(5000)));
        assert_eq!(pg1.addr, Some("127.0.0.1:5432".parse().unwrap()));
        assert_eq!(s.members["pg2"].role, MemberRole::Replica);
        let v = view(&keys);
        assert_eq!(v.primary_status(), PrimaryStatus::Routable);
        assert_eq!(eligible(&v, Role::Primary), ["pg1"]);
        assert_eq!(eligible(&v, Role::Replica), ["pg2"]);
    }

    #[test]
    fn patroni_keys_are_ignored_and_nodes_ignored_by_patroni() {
        let mut keys: KeyMap = [node("pg2", 5433, "replica", 1, "")].into();
        keys.insert("leader".into(), b"pg1".to_vec());
        keys.insert(
            "members/pg1".into(),
            br#"{"conn_url":"postgres://127.0.0.1:5432/postgres","role":"master","state":"running"}"#.to_vec(),
        );
        let (s, _) = parse_cluster(&keys);
        assert_eq!((s.leader, s.members.len()), (None, 1));
        let (p, _) = super::super::keys::parse_cluster(&keys);
        assert_eq!((p.leader.as_deref(), p.members.len()), (Some("pg1"), 1));
    }

    #[test]
    fn highest_timeline_wins_and_a_tie_is_split_brain() {
        // An old primary back on its old timeline beside the promoted one: the newer wins.
        let keys: KeyMap = [node("pg1", 5432, "primary", 1, ""), node("pg2", 5433, "primary", 2, "")].into();
        let v = view(&keys);
        assert_eq!(eligible(&v, Role::Primary), ["pg2"]);
        assert_eq!(kept(&v, Role::Primary), ["pg2"], "the stale primary's sessions are closed");
        // Two standbys promoted from the same timeline: no primary, nothing kept.
        let keys: KeyMap = [
            node("pg1", 5432, "primary", 1, ""),
            node("pg2", 5433, "primary", 2, ""),
            node("pg3", 5434, "primary", 2, ""),
        ]
        .into();
        let (s, _) = parse_cluster(&keys);
        assert_eq!((s.leader.as_ref(), s.split_brain.clone()), (None, vec!["pg2".to_owned(), "pg3".to_owned()]));
        let v = view(&keys);
        assert_eq!(v.primary_status(), PrimaryStatus::SplitBrain);
        assert!(eligible(&v, Role::Primary).is_empty() && kept(&v, Role::Primary).is_empty());
        assert!(!eligible(&v, Role::ReadOnly).iter().any(|m| m == "pg2" || m == "pg3"));
    }

    #[test]
    fn not_running_or_contradictory_nodes_claim_nothing() {
        let keys: KeyMap = [
            node("pg1", 5432, "primary", 2, "").0,
            node("pg2", 5433, "primary", 2, "").0,
            node("pg3", 5434, "primary", 2, "").0,
        ]
        .into_iter()
        .zip([
            node("pg1", 5432, "primary", 2, "").1,
            String::from_utf8(node("pg2", 5433, "primary", 2, "").1)
                .unwrap()
                .replace("\"running\"", "\"unreachable\"")
                .into_bytes(),
            String::from_utf8(node("pg3", 5434, "primary", 2, "").1)
                .unwrap()
                .replace("\"in_recovery\":false", "\"in_recovery\":true")
                .into_bytes(),
        ])
        .collect();
        let (s, errs) = parse_cluster(&keys);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.leader.as_deref(), Some("pg1"));
        assert_eq!(s.members["pg3"].role, MemberRole::Other);
    }

    #[test]
    fn maintenance_keeps_sessions_but_takes_no_new_connections() {
        let keys: KeyMap = [
            node("pg1", 5432, "primary", 1, "maint"),
            node("pg2", 5433, "replica", 1, "maint"),
            node("pg3", 5434, "replica", 1, ""),
        ]
        .into();
        let v = view(&keys);
        assert_eq!(v.primary_status(), PrimaryStatus::Maintenance);
        assert!(eligible(&v, Role::Primary).is_empty());
        assert_eq!(kept(&v, Role::Primary), ["pg1"]);
        assert_eq!(eligible(&v, Role::Replica), ["pg3"]);
        assert_eq!(kept(&v, Role::Replica), ["pg2", "pg3"]);
    }

    #[test]
    fn vanished_node_is_gone() {
        let mut keys: KeyMap = [node("pg1", 5432, "primary", 1, ""), node("pg2", 5433, "replica", 1, "")].into();
        keys.remove("nodes/pg1");
        let v = view(&keys);
        assert_eq!(v.primary_status(), PrimaryStatus::NoLeader);
        assert!(kept(&v, Role::Primary).is_empty());
        keys.remove("nodes/pg2");
        assert!(kept(&view(&keys), Role::Replica).is_empty());
    }

    #[test]
    fn fence_closes_the_old_primary_only() {
        let mut keys: KeyMap = [node("pg1", 5432, "primary", 1, ""), node("pg2", 5433, "replica", 1, "")].into();
        keys.insert(
            "fence".into(),
            br#"{"id":"f1","new_primary":"pg2","old_primary":"pg1","requested_at_ms":1}"#.to_vec(),
        );
        let v = view(&keys);
        assert_eq!(v.state.fence.as_ref().map(|f| f.id.as_str()), Some("f1"));
        assert_eq!(v.primary_status(), PrimaryStatus::Fenced);
        assert!(eligible(&v, Role::Primary).is_empty() && kept(&v, Role::Primary).is_empty());
        assert_eq!(eligible(&v, Role::Replica), ["pg2"]);
        // Promoted: pg2 is not fenced, pg1 (still claiming on the old timeline) loses anyway.
        keys.insert("nodes/pg2".into(), node("pg2", 5433, "primary", 2, "").1);
        assert_eq!(eligible(&view(&keys), Role::Primary), ["pg2"]);
        // old_primary null fences everyone but the new primary; a bad fence is reported.
        keys.insert("fence".into(), br#"{"id":"f2","new_primary":"pg3","old_primary":null}"#.to_vec());
        assert_eq!(view(&keys).primary_status(), PrimaryStatus::Fenced);
        keys.insert("fence".into(), br#"{"id":"","new_primary":"pg3"}"#.to_vec());
        let (s, errs) = parse_cluster(&keys);
        assert!(s.fence.is_none() && matches!(errs[..], [KeyError::Fence { .. }]), "{errs:?}");
    }

    #[test]
    fn newer_version_or_garbage_is_reported_and_not_routed() {
        let keys: KeyMap = [
            ("nodes/pg1".to_owned(), node("pg1", 5432, "primary", 1, "").1),
            (
                "nodes/pg2".to_owned(),
                String::from_utf8(node("pg2", 5433, "primary", 9, "").1)
                    .unwrap()
                    .replace("\"version\":1", "\"version\":2")
                    .into_bytes(),
            ),
            ("nodes/pg3".to_owned(), b"{not json".to_vec()),
        ]
        .into();
        let (s, errs) = parse_cluster(&keys);
        assert_eq!(s.leader.as_deref(), Some("pg1"));
        assert_eq!(errs.len(), 2);
        assert!(errs[0].to_string().contains("version 2"), "{}", errs[0]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_node() -> impl Strategy<Value = (bool, u8, Option<u64>, bool, bool)> {
            (any::<bool>(), 0u8..3, proptest::option::of(0u64..4), any::<bool>(), any::<bool>())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// The derivation: a routed primary is the only running, non-maintenance, unfenced
            /// claimant on the highest claimed timeline; a tie routes and keeps none of them.
            #[test]
            fn agent_primary_is_the_single_top_claimant(
                nodes in proptest::collection::vec(arb_node(), 0..5),
                fence in proptest::option::of((0usize..5, proptest::option::of(0usize..5))),
            ) {
                let mut keys = KeyMap::new();
                for (i, (running, role, tl, maint, rec)) in nodes.iter().enumerate() {
                    let role = ["primary", "replica", "unknown"][*role as usize];
                    let v = serde_json::json!({
                        "version": 1, "conn_url": format!("postgres://127.0.0.1:{}/postgres", 5000 + i),
                        "state": if *running { "running" } else { "unreachable" }, "role": role,
                        "in_recovery": *rec, "timeline": tl, "maintenance": maint, "lsn": 10,
                    });
                    keys.insert(format!("nodes/pg{i}"), v.to_string().into_bytes());
                }
                if let Some((n, o)) = fence {
                    let v = serde_json::json!({"id": "f", "new_primary": format!("pg{n}"), "old_primary": o.map(|o| format!("pg{o}"))});
                    keys.insert("fence".into(), v.to_string().into_bytes());
                }
                let (s, errs) = parse_cluster(&keys);
                prop_assert!(errs.is_empty());
                let claim = |m: &Member| m.running() && m.role == MemberRole::Primary;
                let top = s.members.values().filter(|m| claim(m)).map(|m| m.timeline).max();
                let on_top: Vec<&Member> = s.members.values().filter(|m| claim(m) && Some(m.timeline) == top).collect();
                let mut v = ClusterView::default();
                v.handle_keys(s.clone());
                let t = v.targets(Role::Primary, None);
                prop_assert!(t.eligible.len() <= 1);
                if let Some(b) = t.eligible.first() {
                    prop_assert_eq!(on_top.len(), 1);
                    let m = on_top[0];
                    prop_assert_eq!(&*b.member, m.name.as_str());
                    prop_assert!(!m.maintenance && !v.fenced(&m.name));
                } else if on_top.len() == 1 && !on_top[0].maintenance && !v.fenced(&on_top[0].name) {
                    prop_assert!(false, "a single top claimant must be routed: {:?}", on_top[0]);
                }
                if on_top.len() > 1 {
                    prop_assert_eq!(v.primary_status(), PrimaryStatus::SplitBrain);
                    prop_assert!(t.keep.is_empty());
                }
                for b in &t.keep {
                    prop_assert!(!v.fenced(&b.member));
                }
                for role in [Role::Replica, Role::ReadOnly] {
                    for b in v.targets(role, None).eligible {
                        let m = &s.members[&*b.member];
                        prop_assert!(m.running() && !m.maintenance);
                    }
                }
                prop_assert_eq!(parse_cluster(&keys), (s, errs));
            }

            #[test]
            fn any_node_value_never_panics(value in proptest::collection::vec(any::<u8>(), 0..200), text in ".{0,200}") {
                let keys: KeyMap = [("nodes/a".to_owned(), value.clone()), ("nodes/b".to_owned(), text.clone().into_bytes()),
                    ("fence".to_owned(), value)].into();
                let (s, errs) = parse_cluster(&keys);
                prop_assert!(s.members.len() + errs.len() <= 3);
            }
        }
    }
}
