//! An etcd v3 client for one cluster's settings (credentials, TLS, timeouts), shared by the
//! parts that talk to etcd: discovery (`discovery::etcd3`) and the VIP election by lease
//! (`vip::lease`), the proxy's fencing registration (`discovery::fence`) and the node agent
//! (`agent::publish`, `agent::fence`). It sits low in the module map so that none imports another.
//!
//! Invariant: every etcd request these parts make goes through [`timed`], so none can hang past
//! its timeout whatever the state of the connection, and its error names the request.

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

/// One etcd request that failed or took too long, named by `what` ("lease grant", "put fence" …)
/// so that a log line says which step of a session broke.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("etcd: {what}: {source}")]
    Etcd { what: &'static str, source: etcd_client::Error },
    #[error("etcd: {what}: no answer within {timeout:?}")]
    Timeout { what: &'static str, timeout: Duration },
}

/// Runs the etcd request `f` under `timeout`: a request to a member that stopped answering
/// (SIGSTOP, partition) otherwise waits on TCP for minutes, and the session holding it cannot
/// notice that its lease is gone.
pub(crate) async fn timed<T>(
    what: &'static str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r.map_err(|source| CallError::Etcd { what, source }),
        Err(_) => Err(CallError::Timeout { what, timeout }),
    }
}
