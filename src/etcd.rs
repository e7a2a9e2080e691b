//! An etcd v3 client for one cluster's settings (credentials, TLS, timeouts), shared by the
//! parts that talk to etcd: discovery (`discovery::etcd3`) and the VIP election by lease
//! (`vip::lease`). It sits low in the module map so that neither imports the other.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::ClusterConfig;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd { endpoints: String, source: etcd_client::Error },
    #[error("etcd at {endpoints}: no answer within {timeout:?}")]
    Timeout { endpoints: String, timeout: Duration },
    #[error("etcd TLS: cannot read {path}: {reason}")]
    Tls { path: String, reason: String },
}

/// A client for `endpoints` (all of `cfg.endpoints`, or the one a session uses), with `cfg`'s
/// credentials, TLS files (read anew at each connect, so renewed files are picked up) and
/// timeouts; requests need an etcd leader (`require_leader`), so a member cut off from its
/// cluster answers with an error instead of stale data.
pub(crate) async fn connect(cfg: &ClusterConfig, endpoints: &[String]) -> Result<Client, ConnectError> {
    let mut opts = ConnectOptions::new()
        .with_timeout(cfg.etcd_timeout)
        .with_connect_timeout(cfg.etcd_timeout)
        .with_keep_alive(Duration::from_secs(2), cfg.etcd_timeout)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some(c) = &cfg.credentials {
        opts = opts.with_user(c.username.clone(), c.password.expose());
    }
    if let Some(t) = &cfg.tls {
        let mut tls = TlsOptions::new();
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ConnectError::Tls { path: p.display().to_string(), reason: e.to_string() })
        };
        if let Some(ca) = &t.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let Some((cert, key)) = &t.identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(tls);
    }
    let timeout = cfg.etcd_timeout;
    let named = || endpoints.join(",");
    match tokio::time::timeout(timeout, Client::connect(endpoints, Some(opts))).await {
        Ok(r) => r.map_err(|source| ConnectError::Etcd { endpoints: named(), source }),
        Err(_) => Err(ConnectError::Timeout { endpoints: named(), timeout }),
    }
}
