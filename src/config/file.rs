//! The configuration file as written: these types mirror the TOML one to one, reject unknown
//! fields, and keep the byte span of every section so that validation can name the line.
//!
//! Nothing here has defaults applied or cross-references checked; `super::Config::from_file`
//! turns a `FileConfig` into the resolved form the daemon runs with.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use super::secret::Secret;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub admin: Option<Spanned<FileAdmin>>,
    pub process: Option<Spanned<FileProcess>>,
    #[serde(default, rename = "cluster")]
    pub clusters: Vec<Spanned<FileCluster>>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<FileListener>>,
    #[serde(default, rename = "vip")]
    pub vips: Vec<Spanned<FileVip>>,
}

/// `[[vip]]`: a floating address this host holds while it is the elected master.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVip {
    pub name: String,
    /// `"198.51.100.10/24"`.
    pub address: String,
    pub interface: String,
    pub election: Option<FileElection>,
    pub vrid: Option<u8>,
    pub priority: Option<u8>,
    pub version: Option<u8>,
    pub advert_interval: Option<HumanDuration>,
    pub preempt: Option<bool>,
    pub preempt_delay: Option<HumanDuration>,
    pub auth_pass: Option<Secret>,
    #[serde(default)]
    pub unicast_peers: Vec<std::net::IpAddr>,
    pub garp_count: Option<u32>,
    pub garp_interval: Option<HumanDuration>,
    pub garp_refresh: Option<HumanDuration>,
    pub etcd_cluster: Option<String>,
    pub etcd_key: Option<String>,
    pub lease_ttl: Option<HumanDuration>,
    pub health_weight: Option<u8>,
    pub unhealthy_after: Option<HumanDuration>,
    pub healthy_after: Option<HumanDuration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileElection {
    Vrrp,
    Etcd,
}

/// `[admin]`: the HTTP endpoint for metrics and status.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: SocketAddr,
    /// Bearer token that allows the control routes (drain, resume) from any address.
    pub token: Option<Secret>,
    /// Ask for the token from loopback clients too.
    pub require_token: Option<bool>,
}

/// `[process]`: how long sessions may outlive what served them; the data path's threads.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileProcess {
    pub shutdown_timeout: Option<HumanDuration>,
    pub drain_timeout: Option<HumanDuration>,
    pub upgrade_timeout: Option<HumanDuration>,
    pub threads: Option<u32>,
}

/// The etcd connection settings as written, shared by a proxy's `[[cluster]]` and an agent's
/// `[cluster]` (same names, same meaning, one validation: `Resolver::cluster`). Not a TOML table
/// of its own: [`etcd_section!`] writes these fields into each section's struct.
#[derive(Debug, Default)]
pub struct FileEtcd {
    pub etcd_endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub etcd_timeout: Option<HumanDuration>,
}

/// Declares a section struct holding the [`FileEtcd`] fields inline, where the markers
/// `@endpoints` (`etcd_endpoints`) and `@access` (credentials, TLS files, `etcd_timeout`) stand,
/// with `take_etcd`/`put_etcd` to move them as one [`FileEtcd`].
///
/// Why a macro and not `#[serde(flatten)] etcd: FileEtcd`: serde buffers a flattened struct,
/// so toml's errors lose their line (they point at the section header), `deny_unknown_fields`
/// no longer lists the expected fields, and `config check` would get worse. The markers keep
/// each section's field order, which is the order toml lists the expected fields in.
macro_rules! etcd_section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(pub $a:ident: $at:ty,)*
            @endpoints,
            $(pub $b:ident: $bt:ty,)*
            @access,
            $(pub $c:ident: $ct:ty,)*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(pub $a: $at,)*
            pub etcd_endpoints: Vec<String>,
            $(pub $b: $bt,)*
            pub username: Option<String>,
            pub password: Option<$crate::config::Secret>,
            pub password_file: Option<std::path::PathBuf>,
            pub tls_ca: Option<std::path::PathBuf>,
            pub tls_cert: Option<std::path::PathBuf>,
            pub tls_key: Option<std::path::PathBuf>,
            pub etcd_timeout: Option<$crate::config::file::HumanDuration>,
            $(pub $c: $ct,)*
        }

        impl $name {
            /// Moves the etcd settings out (left empty here).
            pub fn take_etcd(&mut self) -> $crate::config::file::FileEtcd {
                $crate::config::file::FileEtcd {
                    etcd_endpoints: std::mem::take(&mut self.etcd_endpoints),
                    username: self.username.take(),
                    password: self.password.take(),
                    password_file: self.password_file.take(),
                    tls_ca: self.tls_ca.take(),
                    tls_cert: self.tls_cert.take(),
                    tls_key: self.tls_key.take(),
                    etcd_timeout: self.etcd_timeout.take(),
                }
            }

            /// Sets the etcd settings from `e`.
            pub fn put_etcd(&mut self, e: $crate::config::file::FileEtcd) {
                self.etcd_endpoints = e.etcd_endpoints;
                self.username = e.username;
                self.password = e.password;
                self.password_file = e.password_file;
                self.tls_ca = e.tls_ca;
                self.tls_cert = e.tls_cert;
                self.tls_key = e.tls_key;
                self.etcd_timeout = e.etcd_timeout;
            }
        }
    };
}
pub(crate) use etcd_section;

etcd_section! {
/// `[[cluster]]`: one Patroni cluster and the etcd that holds its keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub name: String,
    pub scope: String,
    pub namespace: Option<String>,
    @endpoints,
    pub etcd_api: Option<FileEtcdApi>,
    pub source: Option<FileSource>,
    @access,
    pub resync_interval: Option<HumanDuration>,
    pub confirm_interval: Option<HumanDuration>,
    pub check_user: Option<String>,
    pub check_password: Option<Secret>,
    pub check_password_file: Option<PathBuf>,
    pub check_database: Option<String>,
}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FileEtcdApi {
    #[serde(rename = "v3")]
    V3,
    #[serde(rename = "v2")]
    V2,
}

/// Which keys decide the roles of a cluster's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileSource {
    Patroni,
    Agent,
}

/// `[[listener]]`: one port clients connect to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub name: Option<String>,
    pub cluster: String,
    pub bind: SocketAddr,
    pub role: Option<FileRole>,
    pub balance: Option<FileBalance>,
    pub server_maxconn: Option<u32>,
    pub maxconn: Option<u32>,
    pub queue_timeout: Option<HumanDuration>,
    pub connect_timeout: Option<HumanDuration>,
    pub tcp_keepalive: Option<HumanDuration>,
    pub max_replica_lag: Option<HumanSize>,
    pub drain_grace: Option<HumanDuration>,
    pub backlog: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileRole {
    Primary,
    Replica,
    ReadOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileBalance {
    Leastconn,
    Roundrobin,
}

/// A duration written the human way: `"3s"`, `"250ms"`, `"1m 30s"`, or `"0s"`; at most
/// [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// The longest duration a setting accepts. Timers add durations to `Instant`s, which panics on
/// overflow: `queue_timeout = "500000000000y"` (humantime accepts up to 2^64 s) would take
/// down every client task. A year is longer than any sane timeout or grace.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration such as "3s", "250ms" or "1m""#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HumanDuration, E> {
                let d = humantime::parse_duration(s)
                    .map_err(|e| E::custom(format!("invalid duration {s:?}: {e} (write e.g. \"3s\", \"250ms\")")))?;
                if d > MAX_DURATION {
                    return Err(E::custom(format!("duration {s:?} is longer than a year")));
                }
                Ok(HumanDuration(d))
            }
        }
        d.deserialize_str(V)
    }
}

/// A size in bytes: an integer, or a string such as `"16MB"` or `"1MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = HumanSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size in bytes such as 1048576 or "16MB""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanSize, E> {
                u64::try_from(v).map(HumanSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanSize, E> {
                Ok(HumanSize(v))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<HumanSize, E> {
                s.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|b| HumanSize(b.as_u64()))
                    .map_err(|e| E::custom(format!("invalid size {s:?}: {e} (write e.g. \"16MB\")")))
            }
        }
        d.deserialize_any(V)
    }
}
