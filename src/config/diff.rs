//! Pure: what a reload changes. `diff(old, new)` compares two resolved configurations section by
//! section, keyed by name, and says what to add, remove, change in place, or leave alone; the
//! supervisor applies it. Nothing here touches a socket.
//!
//! Invariants, checked by the property tests:
//! - `apply(old, &diff(old, new)) == new` (the diff loses nothing);
//! - an unchanged section never appears as a change, and `diff(c, c)` is empty;
//! - a listener whose `bind` is the same in both is never `rebound`: its socket is kept and only
//!   its settings change (`changed`); one whose bind moved is `rebound`, so the new address is
//!   bound before the old one is closed;
//! - a cluster whose only change is its `source` (Patroni's keys or the agents') is `resourced`,
//!   never `changed`: both kinds of keys live under the same prefix and the running discovery
//!   already mirrors them, so the switch is a re-parse of what it holds (no new etcd session, no
//!   gap in the view, no session closed); any other change restarts the cluster's discovery.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{AdminAuth, ClusterConfig, Config, ListenerConfig, ProcessConfig, VipConfig};

/// A configuration section with a unique name.
pub(crate) trait Named {
    fn name(&self) -> &str;
}

impl Named for ClusterConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for ListenerConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for VipConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Changes to one kind of section.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Changes<T> {
    pub added: Vec<Arc<T>>,
    pub removed: Vec<Arc<T>>,
    /// `(old, new)`, same name, different settings.
    pub changed: Vec<(Arc<T>, Arc<T>)>,
    /// The names in the new configuration's order, so that applying the diff keeps it.
    pub order: Vec<String>,
}

impl<T> Changes<T> {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Everything a reload changes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConfigDiff {
    /// `Some(new)` when the admin endpoint's address changed (`Some(None)`: switched off).
    pub admin: Option<Option<SocketAddr>>,
    /// `Some(new)` when the admin token or `require_token` changed.
    pub admin_auth: Option<AdminAuth>,
    /// `Some(new)` when a `[process]` setting changed.
    pub process: Option<ProcessConfig>,
    /// Clusters whose source only changed are in `resourced`, not in `clusters.changed`.
    pub clusters: Changes<ClusterConfig>,
    /// `(old, new)`: same cluster, only `source` differs — applied live by the running discovery.
    pub resourced: Vec<(Arc<ClusterConfig>, Arc<ClusterConfig>)>,
    /// Listeners whose bind is unchanged and whose settings changed are in `listeners.changed`;
    /// those whose bind moved are in `rebound` only.
    pub listeners: Changes<ListenerConfig>,
    /// `(old, new)`: same name, another address — bind the new one, then close the old one.
    pub rebound: Vec<(Arc<ListenerConfig>, Arc<ListenerConfig>)>,
    pub vips: Changes<VipConfig>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.admin.is_none()
            && self.admin_auth.is_none()
            && self.process.is_none()
            && self.clusters.is_empty()
            && self.resourced.is_empty()
            && self.listeners.is_empty()
            && self.rebound.is_empty()
            && self.vips.is_empty()
    }

    /// One line for the reload log: what changed, by name.
    pub fn summary(&self) -> String {
        fn names<T: Named>(v: &[Arc<T>]) -> String {
            v.iter().map(|x| x.name()).collect::<Vec<_>>().join(",")
        }
        fn pairs<T: Named>(v: &[(Arc<T>, Arc<T>)]) -> String {
            v.iter().map(|(_, x)| x.name()).collect::<Vec<_>>().join(",")
        }
        let mut parts = Vec::new();
        let mut section = |kind: &str, c_added: String, c_removed: String, c_changed: String| {
            for (what, list) in [("added", c_added), ("removed", c_removed), ("changed", c_changed)] {
                if !list.is_empty() {
                    parts.push(format!("{kind}s {what}: {list}"));
                }
            }
        };
        section("cluster", names(&self.clusters.added), names(&self.clusters.removed), pairs(&self.clusters.changed));
        section(
            "listener",
            names(&self.listeners.added),
            names(&self.listeners.removed),
            pairs(&self.listeners.changed),
        );
        section("vip", names(&self.vips.added), names(&self.vips.removed), pairs(&self.vips.changed));
        if !self.resourced.is_empty() {
            let r: Vec<String> =
                self.resourced.iter().map(|(o, n)| format!("{} {:?} -> {:?}", n.name, o.source, n.source)).collect();
            parts.push(format!("cluster sources switched: {}", r.join(", ")));
        }
        if !self.rebound.is_empty() {
            let r: Vec<String> =
                self.rebound.iter().map(|(o, n)| format!("{} {} -> {}", n.name, o.bind, n.bind)).collect();
            parts.push(format!("listeners rebound: {}", r.join(", ")));
        }
        if self.process.is_some() {
            parts.push("[process] changed".to_owned());
        }
        if let Some(a) = &self.admin {
            parts.push(format!("admin: {}", a.map_or("off".to_owned(), |a| a.to_string())));
        }
        if self.admin_auth.is_some() {
            parts.push("admin token changed".to_owned());
        }
        if parts.is_empty() {
            "nothing changed".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

fn changes<T: Named + PartialEq>(old: &[Arc<T>], new: &[Arc<T>]) -> Changes<T> {
    let find = |v: &[Arc<T>], name: &str| v.iter().find(|x| x.name() == name).cloned();
    let mut c = Changes { added: Vec::new(), removed: Vec::new(), changed: Vec::new(), order: Vec::new() };
    for n in new {
        c.order.push(n.name().to_owned());
        match find(old, n.name()) {
            None => c.added.push(n.clone()),
            Some(o) if *o != **n => c.changed.push((o, n.clone())),
            Some(_) => {}
        }
    }
    c.removed = old.iter().filter(|o| find(new, o.name()).is_none()).cloned().collect();
    c
}

/// What turns `old` into `new`.
pub(crate) fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut listeners = changes(&old.listeners, &new.listeners);
    let (rebound, changed) = listeners.changed.into_iter().partition(|(o, n)| o.bind != n.bind);
    listeners.changed = changed;
    let mut clusters = changes(&old.clusters, &new.clusters);
    let (resourced, changed) = clusters.changed.into_iter().partition(|(o, n)| source_only(o, n));
    clusters.changed = changed;
    ConfigDiff {
        admin: (old.admin != new.admin).then_some(new.admin),
        admin_auth: (old.admin_auth != new.admin_auth).then(|| new.admin_auth.clone()),
        process: (old.process != new.process).then_some(new.process),
        clusters,
        resourced,
        listeners,
        rebound,
        vips: changes(&old.vips, &new.vips),
    }
}

/// The two differ in their `source` and nothing else.
pub(crate) fn source_only(old: &ClusterConfig, new: &ClusterConfig) -> bool {
    old.source != new.source && ClusterConfig { source: new.source, ..old.clone() } == *new
}

fn apply_changes<T: Named>(old: &[Arc<T>], c: &Changes<T>, extra: &[(Arc<T>, Arc<T>)]) -> Vec<Arc<T>> {
    c.order
        .iter()
        .filter_map(|name| {
            let newer = c.added.iter().find(|x| x.name() == name).cloned();
            let changed = c.changed.iter().chain(extra).find(|(_, x)| x.name() == name).map(|(_, x)| x.clone());
            newer.or(changed).or_else(|| old.iter().find(|x| x.name() == name).cloned())
        })
        .collect()
}

/// `old` with `d` applied: what the supervisor's state must equal after a reload.
pub(crate) fn apply(old: &Config, d: &ConfigDiff) -> Config {
    Config {
        admin: d.admin.unwrap_or(old.admin),
        admin_auth: d.admin_auth.clone().unwrap_or_else(|| old.admin_auth.clone()),
        process: d.process.unwrap_or(old.process),
        clusters: apply_changes(&old.clusters, &d.clusters, &d.resourced),
        listeners: apply_changes(&old.listeners, &d.listeners, &d.rebound),
        vips: apply_changes(&old.vips, &d.vips, &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            r#"
[admin]
listen = "127.0.0.1:7000"

[[cluster]]
name = "main"
scope = "main-13"
etcd_endpoints = ["http://127.0.0.1:2379"]

[[cluster]]
name = "other"
scope = "other-15"
etcd_endpoints = ["http://127.0.0.1:2379"]
{extra}
"#
        );
        Config::parse(Path::new("test.toml"), &text).unwrap()
    }

    /// A pool of listener sections a property test draws from: two names, two binds, two limits.
    fn listener(name: &str, port: u16, cluster: &str, maxconn: u32, role: &str) -> String {
        format!(
            "[[listener]]\nname = \"{name}\"\ncluster = \"{cluster}\"\nbind = \"127.0.0.1:{port}\"\nrole = \"{role}\"\nserver_maxconn = {maxconn}\n"
        )
    }

    #[test]
    fn same_config_is_no_change() {
        let c = config(&listener("rw", 5432, "main", 320, "primary"));
        let d = diff(&c, &c);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.summary(), "nothing changed");
    }

    #[test]
    fn settings_change_keeps_the_socket_and_a_moved_bind_rebinds() {
        let a = config(&format!(
            "{}{}",
            listener("rw", 5432, "main", 320, "primary"),
            listener("ro", 5433, "main", 320, "replica")
        ));
        let b = config(&format!(
            "{}{}{}",
            listener("rw", 5432, "other", 100, "primary"),
            listener("ro", 6433, "main", 320, "replica"),
            listener("new", 5434, "main", 320, "read-only")
        ));
        let d = diff(&a, &b);
        assert_eq!(d.listeners.changed.len(), 1);
        assert_eq!(d.listeners.changed[0].1.name, "rw");
        assert_eq!(d.listeners.changed[0].1.server_maxconn, 100);
        assert_eq!(d.rebound.len(), 1);
        assert_eq!((d.rebound[0].0.bind.port(), d.rebound[0].1.bind.port()), (5433, 6433));
        assert_eq!(d.listeners.added.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["new"]);
        assert!(d.listeners.removed.is_empty());
        assert!(d.clusters.is_empty());
        assert_eq!(
            d.summary(),
            "listeners added: new; listeners changed: rw; listeners rebound: ro 127.0.0.1:5433 -> 127.0.0.1:6433"
        );
        assert_eq!(apply(&a, &d), b);
    }

    #[test]
    fn removed_cluster_and_admin_off() {
        let a = config(&listener("rw", 5432, "main", 320, "primary"));
        let text = r#"
[[cluster]]
name = "main"
scope = "main-13"
etcd_endpoints = ["http://127.0.0.1:2380"]

[[listener]]
name = "rw"
cluster = "main"
bind = "127.0.0.1:5432"
role = "primary"
server_maxconn = 320
"#;
        let b = Config::parse(Path::new("b.toml"), text).unwrap();
        let d = diff(&a, &b);
        assert_eq!(d.admin, Some(None));
        assert_eq!(d.clusters.removed.len(), 1);
        assert_eq!(d.clusters.changed.len(), 1, "endpoint list changed");
        assert!(d.listeners.is_empty() && d.rebound.is_empty());
        assert_eq!(apply(&a, &d), b);
    }

    #[test]
    fn source_switch_is_live_and_other_changes_restart() {
        let a = config(&listener("rw", 5432, "main", 320, "primary"));
        let text = |source: &str, port: u16| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:7000\"\n[[cluster]]\nname = \"main\"\nscope = \"main-13\"\n\
                 source = \"{source}\"\netcd_endpoints = [\"http://127.0.0.1:{port}\"]\n\
                 [[cluster]]\nname = \"other\"\nscope = \"other-15\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n{}",
                listener("rw", 5432, "main", 320, "primary")
            )
        };
        let b = Config::parse(Path::new("b.toml"), &text("agent", 2379)).unwrap();
        let d = diff(&a, &b);
        assert!(d.clusters.is_empty(), "{d:?}");
        assert_eq!(d.resourced.len(), 1);
        assert_eq!(d.summary(), "cluster sources switched: main Patroni -> Agent");
        assert_eq!(apply(&a, &d), b);
        // Back again: the same.
        assert_eq!(diff(&b, &a).resourced.len(), 1);
        // Source and endpoints together: a restart (from the last view, same prefix).
        let c = Config::parse(Path::new("c.toml"), &text("agent", 2380)).unwrap();
        let d = diff(&a, &c);
        assert!(d.resourced.is_empty());
        assert_eq!(d.clusters.changed.len(), 1);
        assert_eq!(apply(&a, &d), c);
    }

    /// A configuration drawn from a small space, so that two draws often share sections.
    fn arb_config() -> impl Strategy<Value = Config> {
        let l = (0..3usize, prop::bool::ANY, prop::bool::ANY, 0..2usize, prop::bool::ANY);
        (prop::collection::vec(l, 1..4), prop::bool::ANY, prop::bool::ANY, prop::bool::ANY).prop_map(
            |(ls, admin, endpoint, agent)| {
                let mut text = String::new();
                if endpoint {
                    text.push_str("[process]\ndrain_timeout = \"10s\"\n");
                }
                if admin {
                    text.push_str("[admin]\nlisten = \"127.0.0.1:7000\"\n");
                }
                let port = if endpoint { 2379 } else { 2380 };
                let source = if agent { "agent" } else { "patroni" };
                text.push_str(&format!(
                    "[[cluster]]\nname = \"main\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:{port}\"]\n\
                 [[cluster]]\nname = \"other\"\nscope = \"t\"\nsource = \"{source}\"\n\
                 etcd_endpoints = [\"http://127.0.0.1:2379\"]\n"
                ));
                let mut seen = std::collections::HashSet::new();
                for (n, moved, limit, cluster, replica) in ls {
                    if !seen.insert(n) {
                        continue;
                    }
                    let name = ["a", "b", "c"][n];
                    let port = 5000 + n as u16 * 10 + u16::from(moved);
                    let maxconn = if limit { 320 } else { 10 };
                    let role = if replica { "replica" } else { "primary" };
                    text.push_str(&listener(name, port, ["main", "other"][cluster], maxconn, role));
                }
                Config::parse(Path::new("p.toml"), &text).unwrap()
            },
        )
    }

    proptest! {
        #[test]
        fn apply_of_diff_gives_the_new_config(a in arb_config(), b in arb_config()) {
            let d = diff(&a, &b);
            prop_assert_eq!(apply(&a, &d), b.clone());
            for (o, n) in &d.listeners.changed {
                prop_assert_eq!(o.bind, n.bind);
                prop_assert_ne!(o, n);
            }
            for (o, n) in &d.rebound {
                prop_assert_ne!(o.bind, n.bind);
            }
            // A source switch alone never restarts discovery; a restart is never a source switch alone.
            for (o, n) in &d.resourced {
                prop_assert!(source_only(o, n));
            }
            for (o, n) in &d.clusters.changed {
                prop_assert!(!source_only(o, n));
                prop_assert_ne!(o, n);
            }
            // A listener kept with the same bind and settings appears nowhere.
            for l in &b.listeners {
                if a.listeners.contains(l) {
                    prop_assert!(!d.listeners.added.contains(l));
                    prop_assert!(!d.listeners.changed.iter().any(|(_, n)| n == l));
                    prop_assert!(!d.rebound.iter().any(|(_, n)| n == l));
                }
            }
            prop_assert!(diff(&b, &b).is_empty());
        }
    }
}
