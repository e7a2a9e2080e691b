//! Configuration: the TOML file (`file`), resolved into the `Config` the daemon runs with.
//!
//! Two layers, as in sozu: `FileConfig` mirrors the file and rejects unknown fields; `Config`
//! has every default applied, every cross-reference checked and every secret file read, so the
//! rest of the program never sees a "maybe" value. An error names the file, the line and the
//! field, so `pgfront config check` can be run by a human or by a deployment pipeline.

pub mod agent;
#[allow(dead_code)] // applied by the reload supervisor (SIGHUP), which is being built on it
pub(crate) mod diff;
pub mod file;
mod secret;

pub use secret::Secret;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use file::{FileBalance, FileCluster, FileConfig, FileEtcdApi, FileListener, FileRole, FileSource, FileVip};

pub const DEFAULT_NAMESPACE: &str = "/service/";
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_CONFIRM_INTERVAL: Duration = Duration::from_millis(20);
pub const DEFAULT_CHECK_DATABASE: &str = "postgres";
pub const DEFAULT_SERVER_MAXCONN: u32 = 320;
pub const DEFAULT_LISTENER_MAXCONN: u32 = 4000;
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
pub const DEFAULT_BACKLOG: u32 = 1024;
pub const DEFAULT_VRRP_PRIORITY: u8 = 100;
pub const DEFAULT_VRRP_VERSION: u8 = 3;
/// Sub-second by default (VRRPv3): a dead holder is replaced in ~0.36 s.
pub const DEFAULT_ADVERT_INTERVAL_V3: Duration = Duration::from_millis(100);
pub const DEFAULT_ADVERT_INTERVAL_V2: Duration = Duration::from_secs(1);
pub const DEFAULT_GARP_COUNT: u32 = 3;
pub const DEFAULT_GARP_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_HEALTH_WEIGHT: u8 = 50;
pub const DEFAULT_UNHEALTHY_AFTER: Duration = Duration::from_secs(3);
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// A TOML error without a position (rare): toml's message, on one line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A TOML syntax or type error, on one line like every other error: the field is the key
    /// written on that line, qualified by its section (`listener[1].server_maxconn`). toml's
    /// snippet of the line is never shown: the line may hold a secret (see `Secret`).
    #[error("{path}:{line}: {field}: {reason} (column {column})")]
    Syntax { path: PathBuf, line: usize, column: usize, field: String, reason: String },
    #[error("{path}: {size} bytes or more: larger than any configuration ({limit} bytes at most)")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("{path}:{line}: {field}: {reason}")]
    Invalid { path: PathBuf, line: usize, field: String, reason: String },
}

/// The resolved configuration of `pgfront proxy`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub admin: Option<SocketAddr>,
    /// Who may use the admin endpoint's control routes.
    pub admin_auth: AdminAuth,
    pub process: ProcessConfig,
    pub clusters: Vec<Arc<ClusterConfig>>,
    pub listeners: Vec<Arc<ListenerConfig>>,
    pub vips: Vec<Arc<VipConfig>>,
}

/// `[admin] token` and `require_token`: who may drain and resume members. Read routes
/// (`/metrics`, `/status` …) are open to whoever reaches the port; the control routes are
/// allowed from a loopback peer, or from anywhere with `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAuth {
    pub token: Option<Secret>,
    /// Loopback peers must send the token too (a host where local users are not trusted, and
    /// the tests of the refusal).
    pub require_token: bool,
}

/// A shorter token is too easy to guess over the network.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// `[process]`: deadlines of the process as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessConfig {
    /// SIGTERM: how long open sessions may finish before they are closed.
    pub shutdown_timeout: Duration,
    /// A listener removed by a reload, and the old process after a binary upgrade: how long
    /// their sessions may run on before they are closed.
    pub drain_timeout: Duration,
    /// A binary upgrade: how long the new process has to report ready before the old one
    /// gives up on it and keeps serving.
    pub upgrade_timeout: Duration,
    /// Threads of the data path (`proxy::workers`); `None`: one per CPU. Read at start only.
    pub threads: Option<usize>,
}

/// The most data-path threads `[process] threads` may ask for.
pub const MAX_THREADS: u32 = 256;

pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            threads: None,
        }
    }
}

/// The VRRP version of a `[[vip]]` (the codec in `vip::packet` speaks both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VrrpVersion {
    V2,
    V3,
}

/// How the holder of a VIP is elected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Election {
    Vrrp,
    /// A key under a lease in the etcd of `cluster`: the first host to create it holds the VIP.
    Etcd {
        cluster: String,
        key: String,
        ttl: Duration,
    },
}

pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

/// A floating address elected by VRRP or an etcd lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipConfig {
    pub name: String,
    pub election: Election,
    pub addr: std::net::IpAddr,
    pub prefix: u8,
    pub interface: String,
    pub vrid: u8,
    pub priority: u8,
    pub version: VrrpVersion,
    pub advert_interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// VRRPv2 simple-text password.
    pub auth_pass: Option<Secret>,
    /// Empty: multicast (224.0.0.18 / ff02::12).
    pub unicast_peers: Vec<std::net::IpAddr>,
    pub garp_count: u32,
    pub garp_interval: Duration,
    /// `None`: no periodic re-announcement while master.
    pub garp_refresh: Option<Duration>,
    /// Subtracted from the priority while the proxy is unfit (0: health ties off).
    pub health_weight: u8,
    pub unhealthy_after: Duration,
    pub healthy_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdApi {
    V3,
    V2,
}

/// Which keys under the cluster's prefix decide its members' roles. Both kinds live under the
/// same prefix and the same watch sees them, so switching is only a choice of parser (a live
/// reload, see `diff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Patroni's `leader` and `members/<name>` keys.
    #[default]
    Patroni,
    /// `pgfront agent`'s `nodes/<name>` keys (repmgr or any streaming-replication cluster);
    /// etcd v3 only, since agents and fencing need leases.
    Agent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
}

pub use crate::http::TlsFiles;

/// Credentials of an optional PostgreSQL check: used only to confirm, in milliseconds, that a
/// new leader has finished its promotion before Patroni writes so into its member key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgCheck {
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    pub scope: String,
    /// Always starts and ends with `/`.
    pub namespace: String,
    pub endpoints: Vec<String>,
    pub api: EtcdApi,
    pub source: Source,
    pub credentials: Option<Credentials>,
    pub tls: Option<TlsFiles>,
    pub etcd_timeout: Duration,
    pub resync_interval: Duration,
    pub confirm_interval: Duration,
    pub check: Option<PgCheck>,
}

impl ClusterConfig {
    /// The etcd key prefix under which Patroni keeps this cluster: `<namespace><scope>/`.
    pub fn prefix(&self) -> String {
        format!("{}{}/", self.namespace, self.scope)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The writable primary only.
    Primary,
    /// Running replicas within the lag limit.
    Replica,
    /// Replicas, or the primary when no replica is eligible.
    ReadOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    Leastconn,
    Roundrobin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub cluster: String,
    pub bind: SocketAddr,
    pub role: Role,
    pub balance: Balance,
    pub server_maxconn: u32,
    pub maxconn: u32,
    pub queue_timeout: Duration,
    pub connect_timeout: Duration,
    /// `None`: keepalive off.
    pub tcp_keepalive: Option<Duration>,
    pub max_replica_lag: Option<u64>,
    pub drain_grace: Duration,
    pub backlog: u32,
}

impl Config {
    /// Nothing at all: what the supervisor runs before the first configuration is applied, so
    /// that start-up is a reload from nothing.
    pub fn empty() -> Config {
        Config {
            admin: None,
            admin_auth: AdminAuth::default(),
            process: ProcessConfig::default(),
            clusters: Vec::new(),
            listeners: Vec::new(),
            vips: Vec::new(),
        }
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match read_bounded(path, MAX_CONFIG_SIZE) {
            Ok(Ok(text)) => text,
            Ok(Err(size)) => return Err(ConfigError::TooLarge { path: path.to_owned(), size, limit: MAX_CONFIG_SIZE }),
            Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
        };
        Self::parse(path, &text)
    }

    /// Parses and validates `text`, naming `path` in errors. Secret files named in the text are
    /// read relative to the working directory.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| parse_error(path, text, e))?;
        Resolver { path, text }.resolve(file)
    }
}

/// A configuration file is a few KiB; anything much larger is a mistake (a wrong path such as a
/// log file or `/dev/zero`), refused before it is read into memory.
pub const MAX_CONFIG_SIZE: u64 = 1 << 20;
/// A password file holds one line.
pub const MAX_SECRET_FILE_SIZE: u64 = 64 << 10;

/// Reads at most `limit` bytes of `path` as UTF-8; `Ok(Err(n))` when the file holds more
/// (`n` is the number of bytes read, `limit + 1`). Works on pipes and devices, whose
/// metadata gives no size.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Result<String, u64>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Ok(Err(buf.len() as u64));
    }
    String::from_utf8(buf).map(Ok).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

fn parse_error(path: &Path, text: &str, e: toml::de::Error) -> ConfigError {
    let reason = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return ConfigError::Parse { path: path.to_owned(), message: reason };
    };
    let start = floor_char_boundary(text, span.start);
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[..line_start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let field = field_at(&text[..line_start], &text[line_start..line_end]);
    ConfigError::Syntax { path: path.to_owned(), line, column, field, reason }
}

/// The field a line of the file sets, named as validation errors name it: `key` at the top,
/// `section.key` in a table, `section[i].key` in the i-th element of an array of tables.
/// `before`: the text up to the line.
fn field_at(before: &str, line: &str) -> String {
    let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches('"')).filter(|k| !k.is_empty());
    let header = line
        .trim_start()
        .starts_with('[')
        .then_some(line)
        .or_else(|| before.lines().rev().find(|l| l.trim_start().starts_with('[')));
    let section = header.map(|h| {
        let name = h.trim().trim_start_matches('[').split(']').next().unwrap_or_default().trim().to_owned();
        if h.trim_start().starts_with("[[") {
            let marker = format!("[[{name}]]");
            let index = before.lines().filter(|l| l.trim().replace(' ', "") == marker).count();
            // The header of the error's own section is in `before` unless the error is on it.
            let index = if line.trim_start().starts_with('[') { index } else { index.saturating_sub(1) };
            format!("{name}[{index}]")
        } else {
            name
        }
    });
    match (section, key) {
        (Some(s), Some(k)) => format!("{s}.{k}"),
        (Some(s), None) => s,
        (None, Some(k)) => k.to_owned(),
        (None, None) => "file".to_owned(),
    }
}

/// The largest char boundary at or below `i` (`str::floor_char_boundary` is unstable).
fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `url` with any `user:password@` replaced by `***@`, for messages and logs.
pub fn redact_userinfo(url: &str) -> std::borrow::Cow<'_, str> {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]).into(),
        None => url.into(),
    }
}

struct Resolver<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Resolver<'_> {
    /// An error about `field` (e.g. `listener[0].bind`) of the section at `span`: the line is
    /// the field's own when it is written in the section, else the section's header.
    fn err(&self, span: std::ops::Range<usize>, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        let field = field.into();
        let start = span.start.min(self.text.len());
        // toml spans an array-of-tables element by its header only: the section runs to the
        // next header.
        let after = span.end.clamp(start, self.text.len());
        let end = self.text[after..].find("\n[").map_or(self.text.len(), |i| after + i + 1);
        let key = field.rsplit('.').next().unwrap_or_default();
        let mut offset = start;
        for l in self.text[start..end].split_inclusive('\n') {
            let t = l.trim_start();
            if t.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')) {
                offset += l.len() - t.len();
                break;
            }
            offset += l.len();
        }
        let at = if offset >= end { start } else { offset };
        let line = self.text[..at].matches('\n').count() + 1;
        ConfigError::Invalid { path: self.path.to_owned(), line, field, reason: reason.into() }
    }

    fn read_secret(&self, span: std::ops::Range<usize>, field: &str, file: &Path) -> Result<Secret, ConfigError> {
        let s = read_bounded(file, MAX_SECRET_FILE_SIZE)
            .map_err(|e| self.err(span.clone(), field, format!("cannot read {}: {e}", file.display())))?
            .map_err(|_| {
                let reason = format!("{} is larger than {MAX_SECRET_FILE_SIZE} bytes", file.display());
                self.err(span.clone(), field, reason)
            })?;
        let s = Secret::new(s.trim_end_matches(['\n', '\r']));
        if s.expose().is_empty() {
            return Err(self.err(span, field, format!("{} is empty", file.display())));
        }
        Ok(s)
    }

    fn resolve(&self, file: FileConfig) -> Result<Config, ConfigError> {
        if file.clusters.is_empty() {
            return Err(self.err(0..0, "cluster", "at least one [[cluster]] section is required"));
        }
        if file.listeners.is_empty() {
            return Err(self.err(0..0, "listener", "at least one [[listener]] section is required"));
        }
        let mut clusters = Vec::new();
        let mut names = HashSet::new();
        for (i, c) in file.clusters.into_iter().enumerate() {
            let span = c.span();
            let c = self.cluster(&format!("cluster[{i}]"), span.clone(), c.into_inner())?;
            if !names.insert(c.name.clone()) {
                return Err(self.err(
                    span,
                    format!("cluster[{i}].name"),
                    format!("duplicate cluster name {:?}", c.name),
                ));
            }
            clusters.push(Arc::new(c));
        }
        let mut listeners = Vec::new();
        let mut lnames = HashSet::new();
        let mut binds = HashSet::new();
        for (i, l) in file.listeners.into_iter().enumerate() {
            let span = l.span();
            let l = self.listener(i, span.clone(), l.into_inner(), &names)?;
            if !lnames.insert(l.name.clone()) {
                return Err(self.err(
                    span,
                    format!("listener[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                ));
            }
            if !binds.insert(l.bind) {
                return Err(self.err(
                    span,
                    format!("listener[{i}].bind"),
                    format!("{} is bound by another listener", l.bind),
                ));
            }
            listeners.push(Arc::new(l));
        }
        let mut vips = Vec::new();
        let mut vnames = HashSet::new();
        for (i, v) in file.vips.into_iter().enumerate() {
            let span = v.span();
            let v = self.vip(i, span.clone(), v.into_inner(), &names)?;
            if !vnames.insert(v.name.clone()) {
                return Err(self.err(span, format!("vip[{i}].name"), format!("duplicate vip name {:?}", v.name)));
            }
            if v.election == Election::Vrrp
                && vips.iter().any(|o: &Arc<VipConfig>| {
                    o.election == Election::Vrrp
                        && o.interface == v.interface
                        && o.vrid == v.vrid
                        && o.addr.is_ipv4() == v.addr.is_ipv4()
                })
            {
                return Err(self.err(
                    span,
                    format!("vip[{i}].vrid"),
                    format!("vrid {} is used twice on {}", v.vrid, v.interface),
                ));
            }
            vips.push(Arc::new(v));
        }
        let process = match file.process {
            None => ProcessConfig::default(),
            Some(p) => {
                let span = p.span();
                let p = p.into_inner();
                let d = |v: Option<file::HumanDuration>, default: Duration| v.map_or(default, |d| d.0);
                let process = ProcessConfig {
                    shutdown_timeout: d(p.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT),
                    drain_timeout: d(p.drain_timeout, DEFAULT_DRAIN_TIMEOUT),
                    upgrade_timeout: d(p.upgrade_timeout, DEFAULT_UPGRADE_TIMEOUT),
                    threads: p.threads.map(|n| n as usize),
                };
                if process.upgrade_timeout.is_zero() {
                    return Err(self.err(span, "process.upgrade_timeout", "must be greater than 0"));
                }
                if p.threads.is_some_and(|n| n == 0 || n > MAX_THREADS) {
                    return Err(self.err(span, "process.threads", format!("must be between 1 and {MAX_THREADS}")));
                }
                process
            }
        };
        let (admin, admin_auth) = match file.admin {
            None => (None, AdminAuth::default()),
            Some(a) => {
                let span = a.span();
                let a = a.into_inner();
                if let Some(t) = &a.token {
                    let t = t.expose();
                    if t.chars().count() < MIN_ADMIN_TOKEN_LEN || t.chars().any(|c| c.is_whitespace() || c.is_control())
                    {
                        return Err(self.err(
                            span,
                            "admin.token",
                            format!(
                                "must be at least {MIN_ADMIN_TOKEN_LEN} characters without spaces (value not shown); \
                                 e.g. the output of `openssl rand -hex 24`"
                            ),
                        ));
                    }
                }
                let require_token = a.require_token.unwrap_or(false);
                if require_token && a.token.is_none() {
                    return Err(self.err(span, "admin.require_token", "needs admin.token"));
                }
                (Some(a.listen), AdminAuth { token: a.token, require_token })
            }
        };
        Ok(Config { admin, admin_auth, process, clusters, listeners, vips })
    }

    /// Validates a proxy's `[[cluster]]`, and an agent's `[cluster]` made into one (so both accept
    /// the same etcd settings); errors name `<section>.<field>` (`cluster[0].tls_ca`, `cluster.tls_ca`).
    fn cluster(
        &self,
        section: &str,
        span: std::ops::Range<usize>,
        c: FileCluster,
    ) -> Result<ClusterConfig, ConfigError> {
        let f = |name: &str| format!("{section}.{name}");
        let bad = |name: &str, reason: String| self.err(span.clone(), f(name), reason);
        if !valid_name(&c.name) {
            return Err(bad("name", format!("{:?}: use letters, digits, '-', '_' or '.'", c.name)));
        }
        if c.scope.is_empty() || c.scope.contains('/') {
            return Err(bad("scope", format!("{:?}: Patroni's scope is one non-empty path segment", c.scope)));
        }
        let mut namespace = c.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        if !namespace.starts_with('/') {
            namespace.insert(0, '/');
        }
        if !namespace.ends_with('/') {
            namespace.push('/');
        }
        if c.etcd_endpoints.is_empty() {
            return Err(bad("etcd_endpoints", "at least one endpoint is required".into()));
        }
        for e in &c.etcd_endpoints {
            if redact_userinfo(e) != e.as_str() {
                // The URL would be printed in every etcd error, log line and /status.
                return Err(bad(
                    "etcd_endpoints",
                    format!("{:?}: no user:password@ in endpoints; use username and password_file", redact_userinfo(e)),
                ));
            }
            let rest = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://"));
            let ok = rest.is_some_and(|r| {
                r.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.trim_end_matches('/').parse::<u16>().is_ok())
            });
            if !ok {
                return Err(bad("etcd_endpoints", format!("{e:?}: write http://HOST:PORT or https://HOST:PORT")));
            }
        }
        let api = match c.etcd_api.unwrap_or(FileEtcdApi::V3) {
            FileEtcdApi::V3 => EtcdApi::V3,
            FileEtcdApi::V2 => EtcdApi::V2,
        };
        let source = match c.source.unwrap_or(FileSource::Patroni) {
            FileSource::Patroni => Source::Patroni,
            FileSource::Agent => Source::Agent,
        };
        if source == Source::Agent && api == EtcdApi::V2 {
            return Err(bad(
                "source",
                "\"agent\" needs etcd_api = \"v3\": agents publish their keys under leases, and fencing needs them"
                    .into(),
            ));
        }
        let password = match (c.password, c.password_file) {
            (Some(_), Some(_)) => return Err(bad("password_file", "set password or password_file, not both".into())),
            (Some(p), None) => Some(p),
            (None, Some(file)) => Some(self.read_secret(span.clone(), &f("password_file"), &file)?),
            (None, None) => None,
        };
        let credentials = match (c.username, password) {
            (Some(username), Some(password)) => Some(Credentials { username, password }),
            (None, None) => None,
            (Some(_), None) => return Err(bad("password", "username is set but no password or password_file".into())),
            (None, Some(_)) => return Err(bad("username", "a password is set but no username".into())),
        };
        let identity = match (c.tls_cert, c.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(bad("tls_cert", "tls_cert and tls_key go together".into())),
        };
        let tls = (c.tls_ca.is_some() || identity.is_some()).then(|| TlsFiles { ca: c.tls_ca, identity });
        // TLS (v3 and v2): https:// endpoints need tls_ca, since neither client trusts the
        // system roots; the files are parsed here, as the client will, so a bad file is an
        // error at load time and not at the first connection.
        if !tls.as_ref().is_some_and(|t| t.ca.is_some()) && c.etcd_endpoints.iter().any(|e| e.starts_with("https://")) {
            return Err(bad("tls_ca", "https:// endpoints need tls_ca, the CA that signed etcd's certificates".into()));
        }
        if let Some(t) = &tls {
            if let Err(e) = crate::http::tls_client_config(t) {
                return Err(bad(e.field(), e.to_string()));
            }
            if c.etcd_endpoints.iter().any(|e| e.starts_with("http://")) {
                return Err(bad("etcd_endpoints", "TLS is configured: use https:// endpoints".into()));
            }
        }
        let check_password = match (c.check_password, c.check_password_file) {
            (Some(_), Some(_)) => {
                return Err(bad("check_password_file", "set check_password or check_password_file, not both".into()))
            }
            (Some(p), None) => Some(p),
            (None, Some(file)) => Some(self.read_secret(span.clone(), &f("check_password_file"), &file)?),
            (None, None) => None,
        };
        let check = match c.check_user {
            Some(user) => Some(PgCheck {
                user,
                password: check_password,
                database: c.check_database.unwrap_or_else(|| DEFAULT_CHECK_DATABASE.to_owned()),
            }),
            None if check_password.is_some() || c.check_database.is_some() => {
                return Err(bad("check_user", "check_password/check_database are set but check_user is not".into()))
            }
            None => None,
        };
        let dur = |v: Option<file::HumanDuration>, d: Duration| v.map_or(d, |v| v.0);
        let etcd_timeout = dur(c.etcd_timeout, DEFAULT_ETCD_TIMEOUT);
        let resync_interval = dur(c.resync_interval, DEFAULT_RESYNC_INTERVAL);
        let confirm_interval = dur(c.confirm_interval, DEFAULT_CONFIRM_INTERVAL);
        for (name, d) in [
            ("etcd_timeout", etcd_timeout),
            ("resync_interval", resync_interval),
            ("confirm_interval", confirm_interval),
        ] {
            if d.is_zero() {
                return Err(bad(name, "must be greater than 0".into()));
            }
        }
        Ok(ClusterConfig {
            name: c.name,
            scope: c.scope,
            namespace,
            endpoints: c.etcd_endpoints,
            api,
            source,
            credentials,
            tls,
            etcd_timeout,
            resync_interval,
            confirm_interval,
            check,
        })
    }

    fn listener(
        &self,
        i: usize,
        span: std::ops::Range<usize>,
        l: FileListener,
        clusters: &HashSet<String>,
    ) -> Result<ListenerConfig, ConfigError> {
        let bad = |name: &str, reason: String| self.err(span.clone(), format!("listener[{i}].{name}"), reason);
        if !clusters.contains(&l.cluster) {
            return Err(bad("cluster", format!("no [[cluster]] is named {:?}", l.cluster)));
        }
        let role = match l.role.unwrap_or(FileRole::Primary) {
            FileRole::Primary => Role::Primary,
            FileRole::Replica => Role::Replica,
            FileRole::ReadOnly => Role::ReadOnly,
        };
        let balance = match l.balance.unwrap_or(FileBalance::Leastconn) {
            FileBalance::Leastconn => Balance::Leastconn,
            FileBalance::Roundrobin => Balance::Roundrobin,
        };
        let name = match l.name {
            Some(n) if !valid_name(&n) => {
                return Err(bad("name", format!("{n:?}: use letters, digits, '-', '_' or '.'")))
            }
            Some(n) => n,
            None => format!("{}-{}", l.cluster, l.bind.port()),
        };
        let server_maxconn = l.server_maxconn.unwrap_or(DEFAULT_SERVER_MAXCONN);
        let maxconn = l.maxconn.unwrap_or(DEFAULT_LISTENER_MAXCONN);
        if server_maxconn == 0 {
            return Err(bad("server_maxconn", "must be at least 1".into()));
        }
        if maxconn == 0 {
            return Err(bad("maxconn", "must be at least 1".into()));
        }
        if l.max_replica_lag.is_some() && role == Role::Primary {
            return Err(bad("max_replica_lag", "applies to role = \"replica\" or \"read-only\" only".into()));
        }
        let connect_timeout = l.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0);
        if connect_timeout.is_zero() {
            return Err(bad("connect_timeout", "must be greater than 0".into()));
        }
        let backlog = l.backlog.unwrap_or(DEFAULT_BACKLOG);
        if backlog == 0 || backlog > i32::MAX as u32 {
            return Err(bad("backlog", "must be between 1 and 2147483647".into()));
        }
        Ok(ListenerConfig {
            name,
            cluster: l.cluster,
            bind: l.bind,
            role,
            balance,
            server_maxconn,
            maxconn,
            queue_timeout: l.queue_timeout.map_or(DEFAULT_QUEUE_TIMEOUT, |d| d.0),
            connect_timeout,
            tcp_keepalive: match l.tcp_keepalive {
                None => Some(DEFAULT_TCP_KEEPALIVE),
                Some(d) if d.0.is_zero() => None,
                Some(d) => Some(d.0),
            },
            max_replica_lag: l.max_replica_lag.map(|s| s.0),
            drain_grace: l.drain_grace.map_or(Duration::ZERO, |d| d.0),
            backlog,
        })
    }
}

impl Resolver<'_> {
    fn vip(
        &self,
        i: usize,
        span: std::ops::Range<usize>,
        v: FileVip,
        clusters: &HashSet<String>,
    ) -> Result<VipConfig, ConfigError> {
        use VrrpVersion as Version;
        let bad = |name: &str, reason: String| self.err(span.clone(), format!("vip[{i}].{name}"), reason);
        if !valid_name(&v.name) {
            return Err(bad("name", format!("{:?}: use letters, digits, '-', '_' or '.'", v.name)));
        }
        let (addr, prefix) = v
            .address
            .split_once('/')
            .and_then(|(a, p)| Some((a.parse::<std::net::IpAddr>().ok()?, p.parse::<u8>().ok()?)))
            .filter(|(a, p)| *p <= if a.is_ipv4() { 32 } else { 128 })
            .ok_or_else(|| {
                bad("address", format!("{:?}: write ADDRESS/PREFIX, e.g. \"198.51.100.10/24\"", v.address))
            })?;
        if v.interface.is_empty() || v.interface.len() > 15 {
            return Err(bad("interface", format!("{:?} is not an interface name", v.interface)));
        }
        let election = match v.election.unwrap_or(file::FileElection::Vrrp) {
            file::FileElection::Vrrp => Election::Vrrp,
            file::FileElection::Etcd => {
                let cluster = v.etcd_cluster.clone().ok_or_else(|| {
                    bad("etcd_cluster", "election = \"etcd\" needs the name of a [[cluster]] whose etcd to use".into())
                })?;
                if !clusters.contains(&cluster) {
                    return Err(bad("etcd_cluster", format!("no [[cluster]] is named {cluster:?}")));
                }
                let ttl = v.lease_ttl.map_or(DEFAULT_LEASE_TTL, |d| d.0);
                if ttl.subsec_nanos() != 0 || ttl.as_secs() < 2 {
                    return Err(bad("lease_ttl", "whole seconds, at least 2s".into()));
                }
                let key = v.etcd_key.clone().unwrap_or_else(|| format!("/pgfront/vip/{}", v.name));
                Election::Etcd { cluster, key, ttl }
            }
        };
        let vrid = match (&election, v.vrid) {
            (Election::Vrrp, None | Some(0)) => return Err(bad("vrid", "VRRP needs a vrid between 1 and 255".into())),
            (_, vrid) => vrid.unwrap_or(0),
        };
        let priority = v.priority.unwrap_or(DEFAULT_VRRP_PRIORITY);
        if !(1..=254).contains(&priority) {
            return Err(bad("priority", "must be between 1 and 254 (255 is the address owner's)".into()));
        }
        let version = match v.version.unwrap_or(DEFAULT_VRRP_VERSION) {
            2 => Version::V2,
            3 => Version::V3,
            n => return Err(bad("version", format!("{n}: VRRP version is 2 or 3"))),
        };
        if version == Version::V2 && addr.is_ipv6() {
            return Err(bad("version", "IPv6 needs VRRP version 3".into()));
        }
        let advert_interval = v.advert_interval.map(|d| d.0).unwrap_or(match version {
            Version::V2 => DEFAULT_ADVERT_INTERVAL_V2,
            Version::V3 => DEFAULT_ADVERT_INTERVAL_V3,
        });
        match version {
            Version::V2 if advert_interval.subsec_nanos() != 0 || !(1..=255).contains(&advert_interval.as_secs()) => {
                return Err(bad(
                    "advert_interval",
                    "VRRPv2 advertises whole seconds, 1s to 255s (use version = 3 below a second)".into(),
                ));
            }
            Version::V3
                if advert_interval.as_millis() % 10 != 0 || !(10..=40950).contains(&advert_interval.as_millis()) =>
            {
                return Err(bad("advert_interval", "VRRPv3 advertises in centiseconds, 10ms to 40.95s".into()));
            }
            _ => {}
        }
        if let Some(p) = &v.auth_pass {
            if version != Version::V2 {
                return Err(bad("auth_pass", "authentication exists in VRRP version 2 only".into()));
            }
            if p.expose().is_empty() || p.expose().len() > 8 {
                return Err(bad("auth_pass", "1 to 8 characters (keepalived uses the first 8)".into()));
            }
        }
        if let Some(p) = v.unicast_peers.iter().find(|p| p.is_ipv4() != addr.is_ipv4()) {
            return Err(bad("unicast_peers", format!("{p} is not of the address family of {addr}")));
        }
        Ok(VipConfig {
            name: v.name,
            election,
            addr,
            prefix,
            interface: v.interface,
            vrid,
            priority,
            version,
            advert_interval,
            preempt: v.preempt.unwrap_or(true),
            preempt_delay: v.preempt_delay.map_or(Duration::ZERO, |d| d.0),
            auth_pass: v.auth_pass,
            unicast_peers: v.unicast_peers,
            garp_count: v.garp_count.unwrap_or(DEFAULT_GARP_COUNT),
            garp_interval: v.garp_interval.map_or(DEFAULT_GARP_INTERVAL, |d| d.0),
            garp_refresh: v.garp_refresh.map(|d| d.0).filter(|d| !d.is_zero()),
            health_weight: v.health_weight.unwrap_or(DEFAULT_HEALTH_WEIGHT),
            unhealthy_after: v.unhealthy_after.map_or(DEFAULT_UNHEALTHY_AFTER, |d| d.0),
            healthy_after: v.healthy_after.map_or(DEFAULT_HEALTHY_AFTER, |d| d.0),
        })
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
