//! The configuration of `pgfront agent` (the node agent beside each PostgreSQL): the TOML file
//! (`FileAgentConfig`, unknown fields rejected) resolved into `AgentConfig`, with the same
//! two layers, the same `file:line: field: reason` errors and the same `Secret` handling as the
//! proxy's configuration.
//!
//! Invariant: the `[cluster]` section is validated by the very code that validates a proxy's
//! `[[cluster]]` (endpoints, credentials, TLS files), so an etcd setting a proxy accepts is one
//! the agent accepts and the other way round; its errors are named `cluster.<field>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::file::{etcd_section, FileCluster, HumanDuration};
use super::{parse_error, read_bounded, valid_name, ClusterConfig, ConfigError, Resolver, Secret, MAX_CONFIG_SIZE};

pub const DEFAULT_AGENT_PG_HOST: &str = "/var/run/postgresql";
pub const DEFAULT_AGENT_PG_PORT: u16 = 5432;
pub const DEFAULT_AGENT_PG_USER: &str = "postgres";
pub const DEFAULT_AGENT_PG_DATABASE: &str = "postgres";
/// A local PostgreSQL answers a connection in milliseconds; one that takes a second is not fit
/// to be routed to.
pub const DEFAULT_AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The whole probe (its one statement and the repmgr read), after the connection.
pub const DEFAULT_AGENT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_AGENT_INTERVAL: Duration = Duration::from_secs(1);
/// While a switchover looks under way (see `agent::probe::fast_mode`).
pub const DEFAULT_AGENT_FAST_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_AGENT_TTL: Duration = Duration::from_secs(10);
/// LSN and lag alone change the published key at most this often; role, state, timeline,
/// upstream and maintenance changes are published at once.
pub const DEFAULT_AGENT_LSN_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_AGENT_API_LISTEN: &str = "127.0.0.1:8008";
pub const DEFAULT_AGENT_STATE_FILE: &str = "/var/lib/pgfront-agent/state.json";
pub const DEFAULT_PRE_PROMOTE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_PRE_PROMOTE_HOLD: Duration = Duration::from_secs(60);

/// `agent.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAgentConfig {
    pub node: Spanned<FileNode>,
    pub postgres: Option<Spanned<FilePostgres>>,
    pub cluster: Spanned<FileAgentCluster>,
    pub api: Option<Spanned<FileApi>>,
    pub pre_promote: Option<Spanned<FilePrePromote>>,
}

/// `[node]`: who this node is and where proxies reach it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNode {
    pub name: String,
    pub conn_url: String,
    pub api_url: Option<String>,
    pub state_file: Option<PathBuf>,
}

/// `[postgres]`: how the agent reaches the local PostgreSQL to probe it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePostgres {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub database: Option<String>,
    pub connect_timeout: Option<HumanDuration>,
    pub probe_timeout: Option<HumanDuration>,
    pub interval: Option<HumanDuration>,
    pub fast_interval: Option<HumanDuration>,
    pub repmgr_node_name: Option<String>,
}

etcd_section! {
/// `[cluster]`: the etcd settings of a proxy's `[[cluster]]` (same names, same meaning) and the
/// lease of the published key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAgentCluster {
    pub scope: String,
    pub namespace: Option<String>,
    @endpoints,
    @access,
    pub ttl: Option<HumanDuration>,
    pub lsn_interval: Option<HumanDuration>,
}
}

/// `[api]`: the Patroni-compatible health endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApi {
    pub listen: Option<SocketAddr>,
}

/// `[pre_promote]`: defaults of `pgfront agent pre-promote`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePrePromote {
    pub timeout: Option<HumanDuration>,
    pub on_timeout: Option<OnTimeout>,
    pub hold: Option<HumanDuration>,
}

/// What `pre-promote` does when some proxy has not acknowledged the fence in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Exit non-zero: Patroni (or the repmgr promote command) does not promote.
    Refuse,
    /// Exit 0 with a warning: availability over fencing.
    Proceed,
}

/// How the agent connects to the local PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPostgres {
    /// A host name, an address, or a socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    pub connect_timeout: Duration,
    pub probe_timeout: Duration,
    pub interval: Duration,
    pub fast_interval: Duration,
    /// This node's `node_name` in `repmgr.nodes`.
    pub repmgr_node_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrePromoteConfig {
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
    pub hold: Duration,
}

/// The resolved configuration of `pgfront agent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub name: String,
    pub conn_url: String,
    pub api_url: String,
    pub state_file: PathBuf,
    pub postgres: AgentPostgres,
    /// etcd: the same type a proxy's cluster resolves to (`name` is the node name).
    pub etcd: ClusterConfig,
    pub ttl: Duration,
    pub lsn_interval: Duration,
    pub api_listen: SocketAddr,
    pub pre_promote: PrePromoteConfig,
}

impl AgentConfig {
    /// `<namespace><scope>/`: Patroni's prefix, where agent, proxy and fence keys live.
    pub fn prefix(&self) -> String {
        self.etcd.prefix()
    }

    /// This node's key: `<prefix>nodes/<name>`.
    pub fn node_key(&self) -> String {
        format!("{}nodes/{}", self.prefix(), self.name)
    }

    /// The URL `drain`/`resume` use to reach the running agent: its listen address, with an
    /// unspecified address (`0.0.0.0`, `::`) replaced by loopback.
    pub fn local_api(&self) -> String {
        let mut a = self.api_listen;
        if a.ip().is_unspecified() {
            a.set_ip(if a.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        format!("http://{a}")
    }

    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = match read_bounded(path, MAX_CONFIG_SIZE) {
            Ok(Ok(text)) => text,
            Ok(Err(size)) => return Err(ConfigError::TooLarge { path: path.to_owned(), size, limit: MAX_CONFIG_SIZE }),
            Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
        };
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let file: FileAgentConfig = toml::from_str(text).map_err(|e| parse_error(path, text, e))?;
        resolve(&Resolver { path, text }, file)
    }
}

/// Whether `text` is an agent configuration (it has a `[node]` table and no `[[listener]]`), so
/// that `pgfront config check` validates either kind of file without being told.
pub fn looks_like_agent(text: &str) -> bool {
    match toml::from_str::<toml::Table>(text) {
        Ok(t) => t.contains_key("node") && !t.contains_key("listener"),
        Err(_) => false,
    }
}

fn resolve(r: &Resolver<'_>, f: FileAgentConfig) -> Result<AgentConfig, ConfigError> {
    let node_span = f.node.span();
    let node = f.node.into_inner();
    let bad_node = |field: &str, reason: String| r.err(node_span.clone(), format!("node.{field}"), reason);
    if !valid_name(&node.name) {
        return Err(bad_node("name", format!("{:?}: use letters, digits, '-', '_' or '.'", node.name)));
    }
    if !(node.conn_url.starts_with("postgres://") || node.conn_url.starts_with("postgresql://")) {
        return Err(bad_node("conn_url", format!("{:?}: write postgres://HOST:PORT/DATABASE", node.conn_url)));
    }
    if super::redact_userinfo(&node.conn_url) != node.conn_url.as_str() {
        return Err(bad_node("conn_url", "no user:password@ here: the URL is published in etcd".into()));
    }

    let cspan = f.cluster.span();
    let mut c = f.cluster.into_inner();
    // A proxy's cluster with this node's name and every proxy-only setting at its default.
    let etcd = c.take_etcd();
    let mut as_proxy =
        FileCluster { name: node.name.clone(), scope: c.scope, namespace: c.namespace, ..Default::default() };
    as_proxy.put_etcd(etcd);
    let etcd = r.cluster("cluster", cspan.clone(), as_proxy)?;
    let (ttl, lsn_interval) = (c.ttl, c.lsn_interval);
    let ttl = ttl.map_or(DEFAULT_AGENT_TTL, |d| d.0);
    if ttl.subsec_nanos() != 0 || ttl.as_secs() < 2 {
        return Err(r.err(cspan.clone(), "cluster.ttl", "whole seconds, at least 2s (an etcd lease's unit)"));
    }
    let lsn_interval = lsn_interval.map_or(DEFAULT_AGENT_LSN_INTERVAL, |d| d.0);
    if lsn_interval.is_zero() {
        return Err(r.err(cspan, "cluster.lsn_interval", "must be greater than 0"));
    }

    let postgres = match f.postgres {
        None => AgentPostgres {
            host: DEFAULT_AGENT_PG_HOST.into(),
            port: DEFAULT_AGENT_PG_PORT,
            user: DEFAULT_AGENT_PG_USER.into(),
            password: None,
            database: DEFAULT_AGENT_PG_DATABASE.into(),
            connect_timeout: DEFAULT_AGENT_CONNECT_TIMEOUT,
            probe_timeout: DEFAULT_AGENT_PROBE_TIMEOUT,
            interval: DEFAULT_AGENT_INTERVAL,
            fast_interval: DEFAULT_AGENT_FAST_INTERVAL,
            repmgr_node_name: node.name.clone(),
        },
        Some(p) => {
            let span = p.span();
            let p = p.into_inner();
            let bad = |field: &str, reason: String| r.err(span.clone(), format!("postgres.{field}"), reason);
            let password = match (p.password, p.password_file) {
                (Some(_), Some(_)) => {
                    return Err(bad("password_file", "set password or password_file, not both".into()))
                }
                (Some(p), None) => Some(p),
                (None, Some(file)) => Some(r.read_secret(span.clone(), "postgres.password_file", &file)?),
                (None, None) => None,
            };
            let d = |v: Option<HumanDuration>, d: Duration| v.map_or(d, |v| v.0);
            let pg = AgentPostgres {
                host: p.host.unwrap_or_else(|| DEFAULT_AGENT_PG_HOST.into()),
                port: p.port.unwrap_or(DEFAULT_AGENT_PG_PORT),
                user: p.user.unwrap_or_else(|| DEFAULT_AGENT_PG_USER.into()),
                password,
                database: p.database.unwrap_or_else(|| DEFAULT_AGENT_PG_DATABASE.into()),
                connect_timeout: d(p.connect_timeout, DEFAULT_AGENT_CONNECT_TIMEOUT),
                probe_timeout: d(p.probe_timeout, DEFAULT_AGENT_PROBE_TIMEOUT),
                interval: d(p.interval, DEFAULT_AGENT_INTERVAL),
                fast_interval: d(p.fast_interval, DEFAULT_AGENT_FAST_INTERVAL),
                repmgr_node_name: p.repmgr_node_name.unwrap_or_else(|| node.name.clone()),
            };
            for (name, v) in [
                ("connect_timeout", pg.connect_timeout),
                ("probe_timeout", pg.probe_timeout),
                ("interval", pg.interval),
                ("fast_interval", pg.fast_interval),
            ] {
                if v.is_zero() {
                    return Err(bad(name, "must be greater than 0".into()));
                }
            }
            if pg.fast_interval > pg.interval {
                return Err(bad("fast_interval", format!("longer than interval ({:?})", pg.interval)));
            }
            if pg.host.is_empty() {
                return Err(bad("host", "a host name, an address or a socket directory".into()));
            }
            pg
        }
    };

    let api_listen = match f.api.as_ref().and_then(|a| a.get_ref().listen) {
        Some(a) => a,
        None => DEFAULT_AGENT_API_LISTEN.parse().map_err(|_| r.err(0..0, "api.listen", "bad default"))?,
    };
    let api_url = match node.api_url {
        Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
            return Err(bad_node("api_url", format!("{u:?}: write http://HOST:PORT/")));
        }
        Some(u) => u,
        None => format!("http://{api_listen}/"),
    };

    let pre_promote = match f.pre_promote {
        None => PrePromoteConfig {
            timeout: DEFAULT_PRE_PROMOTE_TIMEOUT,
            on_timeout: OnTimeout::Refuse,
            hold: DEFAULT_PRE_PROMOTE_HOLD,
        },
        Some(p) => {
            let span = p.span();
            let p = p.into_inner();
            let pp = PrePromoteConfig {
                timeout: p.timeout.map_or(DEFAULT_PRE_PROMOTE_TIMEOUT, |d| d.0),
                on_timeout: p.on_timeout.unwrap_or(OnTimeout::Refuse),
                hold: p.hold.map_or(DEFAULT_PRE_PROMOTE_HOLD, |d| d.0),
            };
            if pp.hold.subsec_nanos() != 0 || pp.hold.as_secs() < 2 {
                return Err(r.err(span, "pre_promote.hold", "whole seconds, at least 2s (an etcd lease's unit)"));
            }
            pp
        }
    };

    Ok(AgentConfig {
        state_file: node.state_file.unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_STATE_FILE)),
        name: node.name,
        conn_url: node.conn_url,
        api_url,
        postgres,
        etcd,
        ttl,
        lsn_interval,
        api_listen,
        pre_promote,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[node]
name = "pg1"
conn_url = "postgres://10.0.0.11:5432/postgres"

[cluster]
scope = "main"
etcd_endpoints = ["http://10.0.0.1:2379"]
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("agent.toml"), text)
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.node_key(), "/service/main/nodes/pg1");
        assert_eq!(c.ttl, DEFAULT_AGENT_TTL);
        assert_eq!(c.api_url, "http://127.0.0.1:8008/");
        assert_eq!(c.local_api(), "http://127.0.0.1:8008");
        assert_eq!(c.postgres.host, "/var/run/postgresql");
        assert_eq!(c.postgres.repmgr_node_name, "pg1");
        assert_eq!(c.pre_promote.on_timeout, OnTimeout::Refuse);
        assert!(looks_like_agent(MINIMAL));
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(looks_like_agent(&text));
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.name, "pg1");
        assert_eq!(c.etcd.endpoints.len(), 3);
        let proxy = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgfront.toml")).unwrap();
        assert!(!looks_like_agent(&proxy));
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = parse(&MINIMAL.replace("scope = ", "ttl = \"1500ms\"\nscope = ")).unwrap_err().to_string();
        assert_eq!(e, "agent.toml:7: cluster.ttl: whole seconds, at least 2s (an etcd lease's unit)");
        let e = parse(&MINIMAL.replace("http://10.0.0.1:2379", "10.0.0.1")).unwrap_err().to_string();
        assert!(e.starts_with("agent.toml:8: cluster.etcd_endpoints: "), "{e}");
        let e = parse(&MINIMAL.replace("name = ", "nmae = \"x\"\nname = ")).unwrap_err().to_string();
        assert!(e.starts_with("agent.toml:3: node.nmae: unknown field"), "{e}");
        let e = parse(&format!("{MINIMAL}\n[postgres]\ninterval = \"50ms\"\n")).unwrap_err().to_string();
        assert!(e.starts_with("agent.toml:") && e.contains("postgres.fast_interval"), "{e}");
        let e = parse(&MINIMAL.replace("10.0.0.11", "u:pw@10.0.0.11")).unwrap_err().to_string();
        assert!(e.contains("node.conn_url") && !e.contains("pw@"), "{e}");
    }

    /// The shared etcd fields (`etcd_section!`) keep toml's line and the section's own field
    /// list; validation names them `cluster.<field>`; proxy-only settings stay unknown here.
    #[test]
    fn etcd_fields_keep_lines_and_names() {
        let e = parse(&format!("{MINIMAL}etcd_timeout = \"soon\"\n")).unwrap_err().to_string();
        assert!(e.starts_with("agent.toml:9:") && e.contains("cluster.etcd_timeout: invalid duration"), "{e}");
        let e = parse(&format!("{MINIMAL}etcd_api = \"v3\"\n")).unwrap_err().to_string();
        assert!(e.starts_with("agent.toml:9:") && e.contains("cluster.etcd_api: unknown field `etcd_api`"), "{e}");
        assert!(e.contains("`scope`, `namespace`, `etcd_endpoints`, `username`"), "{e}");
        let e = parse(&format!("{MINIMAL}username = \"pgfront\"\n")).unwrap_err().to_string();
        assert_eq!(e, "agent.toml:6: cluster.password: username is set but no password or password_file");
    }

    #[test]
    fn password_is_hidden() {
        let text = format!("{MINIMAL}\n[postgres]\npassword = 123\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(!e.contains("123") && e.contains("value not shown"), "{e}");
        let c = parse(&format!("{MINIMAL}\n[postgres]\npassword = \"hunter2\"\n")).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
