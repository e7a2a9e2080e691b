//! etcd v3 source: a prefix read, then a prefix watch from the next revision, plus a periodic
//! re-read. The re-read matters: Patroni refreshes its leader key by lease keep-alive, which
//! emits no event, and a stopped etcd keeps its TCP connections open, so a silent watch
//! proves nothing. Every error ends the session; the next one re-reads everything and
//! watches from that revision, so no change is lost.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::keys::KeyMap;
use super::{DiscoveryError, SourceEvent};
use crate::config::ClusterConfig;

pub async fn run(cfg: Arc<ClusterConfig>, tx: mpsc::Sender<SourceEvent>, stop: CancellationToken) {
    super::supervise(tx.clone(), stop, |_| {
        let (cfg, tx) = (cfg.clone(), tx.clone());
        async move {
            let mut got_keys = false;
            let r = session(&cfg, &tx, &mut got_keys).await;
            (r, got_keys)
        }
    })
    .await
}

fn endpoints(cfg: &ClusterConfig) -> String {
    cfg.endpoints.join(",")
}

/// A client for `cfg`'s etcd: credentials, TLS, and every request bounded by `etcd_timeout`.
pub(crate) async fn connect(cfg: &ClusterConfig) -> Result<Client, DiscoveryError> {
    let mut opts = ConnectOptions::new()
        .with_timeout(cfg.etcd_timeout)
        .with_connect_timeout(cfg.etcd_timeout)
        .with_keep_alive(Duration::from_secs(2), cfg.etcd_timeout)
        .with_keep_alive_while_idle(true);
    if let Some(c) = &cfg.credentials {
        opts = opts.with_user(c.username.clone(), c.password.expose());
    }
    if let Some(t) = &cfg.tls {
        let mut tls = TlsOptions::new();
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| DiscoveryError::WatchEnded { reason: format!("cannot read {}: {e}", p.display()) })
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
    match tokio::time::timeout(timeout, Client::connect(&cfg.endpoints, Some(opts))).await {
        Ok(r) => r.map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoints(cfg), source }),
        Err(_) => Err(DiscoveryError::Timeout { endpoints: endpoints(cfg), timeout }),
    }
}

/// Reads every key under the prefix; returns them with the revision they were read at.
async fn read_all(client: &mut Client, cfg: &ClusterConfig, prefix: &str) -> Result<(KeyMap, i64), DiscoveryError> {
    let timeout = cfg.etcd_timeout;
    let resp = tokio::time::timeout(timeout, client.get(prefix, Some(GetOptions::new().with_prefix())))
        .await
        .map_err(|_| DiscoveryError::Timeout { endpoints: endpoints(cfg), timeout })?
        .map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoints(cfg), source })?;
    let rev = resp.header().map_or(0, |h| h.revision());
    let keys = resp.kvs().iter().filter_map(|kv| Some((relative(kv.key(), prefix)?, kv.value().to_vec()))).collect();
    Ok((keys, rev))
}

fn relative(key: &[u8], prefix: &str) -> Option<String> {
    let k = std::str::from_utf8(key).ok()?;
    k.strip_prefix(prefix).map(str::to_owned)
}

async fn session(
    cfg: &ClusterConfig,
    tx: &mpsc::Sender<SourceEvent>,
    got_keys: &mut bool,
) -> Result<(), DiscoveryError> {
    let prefix = cfg.prefix();
    let mut client = connect(cfg).await?;
    let (mut keys, mut rev) = read_all(&mut client, cfg, &prefix).await?;
    *got_keys = true;
    if tx.send(SourceEvent::Keys(keys.clone())).await.is_err() {
        return Ok(());
    }
    let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
    let timeout = cfg.etcd_timeout;
    let mut watch = tokio::time::timeout(timeout, client.watch(prefix.as_str(), Some(opts)))
        .await
        .map_err(|_| DiscoveryError::Timeout { endpoints: endpoints(cfg), timeout })?
        .map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoints(cfg), source })?;
    let mut resync = tokio::time::interval(cfg.resync_interval);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    loop {
        let changed = tokio::select! {
            msg = watch.message() => {
                let resp = msg
                    .map_err(|source| DiscoveryError::Etcd3 { endpoints: endpoints(cfg), source })?
                    .ok_or_else(|| DiscoveryError::WatchEnded { reason: "stream closed by etcd".into() })?;
                if resp.canceled() {
                    return Err(DiscoveryError::WatchEnded {
                        reason: format!("cancelled (compacted at {}): {}", resp.compact_revision(), resp.cancel_reason()),
                    });
                }
                let mut changed = false;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    // Events at or before the revision of our last full read are already in it.
                    if kv.mod_revision() <= rev {
                        continue;
                    }
                    let Some(k) = relative(kv.key(), &prefix) else { continue };
                    changed = true;
                    rev = rev.max(kv.mod_revision());
                    match ev.event_type() {
                        EventType::Put => keys.insert(k, kv.value().to_vec()),
                        EventType::Delete => keys.remove(&k),
                    };
                }
                changed
            }
            _ = resync.tick() => {
                let (fresh, r) = read_all(&mut client, cfg, &prefix).await?;
                rev = rev.max(r);
                if fresh != keys {
                    keys = fresh;
                    true
                } else {
                    false
                }
            }
        };
        if changed && tx.send(SourceEvent::Keys(keys.clone())).await.is_err() {
            return Ok(());
        }
    }
}
