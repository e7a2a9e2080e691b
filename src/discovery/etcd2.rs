//! etcd v2 source, for Patroni's `etcd:` section: a recursive GET of the cluster's directory,
//! then long-polls (`wait=true&recursive=true&waitIndex=N`) for each following change. A
//! long-poll is bounded by the resync interval, after which the directory is read again, so a
//! lost event or a silent etcd costs at most one interval. `401 event index cleared` (more
//! than 1000 changes missed) triggers an immediate re-read.
//!
//! Over `https://` (any `tls_*` set) the requests go through rustls with the cluster's CA and
//! optional client certificate; the TLS configuration is read from the files when a session
//! starts, so renewed certificates are used from the next reconnect, and files that became
//! unreadable after the config was checked end that session with a `Down` event and are tried
//! again after the backoff, never a panic. Basic-auth
//! credentials go in every request's header, in TLS when TLS is configured.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::client::legacy::Client;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::keys::KeyMap;
use super::{DiscoveryError, SourceEvent};
use crate::config::ClusterConfig;
use crate::http;

const ECODE_KEY_NOT_FOUND: u64 = 100;
const ECODE_EVENT_INDEX_CLEARED: u64 = 401;
/// v2 auth is on and the credentials are missing, wrong, or lack read on the prefix.
const ECODE_UNAUTHORIZED: u64 = 110;

#[derive(Debug, Deserialize)]
struct Node {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    dir: bool,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(rename = "modifiedIndex", default)]
    modified_index: u64,
}

#[derive(Debug, Deserialize)]
struct Reply {
    action: Option<String>,
    node: Option<Node>,
    #[serde(rename = "errorCode")]
    error_code: Option<u64>,
    message: Option<String>,
    index: Option<u64>,
}

/// Follows the cluster's keys until `stop`, over plain HTTP or, when `tls_*` is set, HTTPS.
pub async fn run(cfg: Arc<ClusterConfig>, tx: mpsc::Sender<SourceEvent>, stop: CancellationToken) {
    match cfg.tls.clone() {
        None => {
            let client = http::client();
            follow(cfg, tx, stop, move || Ok(client.clone())).await
        }
        Some(files) => {
            // Built anew for each session, as etcd3 does: a reconnect picks up renewed files.
            let endpoints = cfg.endpoints.join(",");
            let client = move || {
                let tls = http::tls_client_config(&files)
                    .map_err(|e| DiscoveryError::Etcd2 { endpoint: endpoints.clone(), reason: e.to_string() })?;
                Ok(http::https_client(tls))
            };
            follow(cfg, tx, stop, client).await
        }
    }
}

/// The sessions of `run`, with the HTTP client `client` gives (once per session).
async fn follow<C, F>(cfg: Arc<ClusterConfig>, tx: mpsc::Sender<SourceEvent>, stop: CancellationToken, mut client: F)
where
    C: Connect + Clone + Send + Sync + 'static,
    F: FnMut() -> Result<Client<C, Empty<Bytes>>, DiscoveryError>,
{
    let auth = cfg.credentials.as_ref().map(|c| http::basic_auth(&c.username, c.password.expose()));
    // Each new session tries the next endpoint.
    super::supervise(tx.clone(), SourceEvent::Down, stop, |attempt| {
        let base = cfg.endpoints[attempt % cfg.endpoints.len()].trim_end_matches('/').to_owned();
        let (cfg, client, auth, tx) = (cfg.clone(), client(), auth.clone(), tx.clone());
        async move {
            let client = match client {
                Ok(c) => c,
                Err(e) => return (Err(e), false),
            };
            let mut src =
                V2 { cfg: &cfg, client: &client, auth: auth.as_deref(), base: &base, tx: &tx, got_keys: false };
            let r = src.session().await;
            (r, src.got_keys)
        }
    })
    .await
}

struct V2<'a, C> {
    cfg: &'a ClusterConfig,
    client: &'a Client<C, Empty<Bytes>>,
    auth: Option<&'a str>,
    base: &'a str,
    tx: &'a mpsc::Sender<SourceEvent>,
    got_keys: bool,
}

enum Wait {
    Event(Reply),
    Cleared,
}

impl<C: Connect + Clone + Send + Sync + 'static> V2<'_, C> {
    fn err(&self, reason: impl Into<String>) -> DiscoveryError {
        DiscoveryError::Etcd2 { endpoint: self.base.to_owned(), reason: reason.into() }
    }

    fn dir_url(&self) -> String {
        format!("{}/v2/keys{}", self.base, self.cfg.prefix().trim_end_matches('/'))
    }

    /// GET and parse; `None` when nothing came back within `timeout`.
    async fn fetch(&self, url: &str, timeout: Duration) -> Result<Option<(Reply, Option<u64>)>, DiscoveryError> {
        let resp = match http::get(self.client, url, self.auth, timeout).await {
            Ok(r) => r,
            Err(http::HttpError::Timeout { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e.to_string())),
        };
        let index = resp.headers.get("x-etcd-index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let reply: Reply = serde_json::from_slice(&resp.body)
            .map_err(|e| self.err(format!("HTTP {}: not an etcd v2 answer: {e}", resp.status)))?;
        Ok(Some((reply, index)))
    }

    /// Reads the whole directory; returns the keys and the etcd index to watch after.
    async fn read_all(&self) -> Result<(KeyMap, u64), DiscoveryError> {
        let timeout = self.cfg.etcd_timeout;
        let (reply, index) = self
            .fetch(&format!("{}?recursive=true", self.dir_url()), timeout)
            .await?
            .ok_or_else(|| self.err(format!("no answer within {timeout:?}")))?;
        let mut keys = KeyMap::new();
        match (reply.error_code, reply.node) {
            (Some(ECODE_KEY_NOT_FOUND), _) => {}
            (Some(ECODE_UNAUTHORIZED), _) => {
                return Err(self.err(format!(
                    "error {ECODE_UNAUTHORIZED}: {} (check username and password, and that the user may read {})",
                    reply.message.unwrap_or_default(),
                    self.cfg.prefix()
                )))
            }
            (Some(code), _) => return Err(self.err(format!("error {code}: {}", reply.message.unwrap_or_default()))),
            (None, Some(node)) => flatten(&node, &self.cfg.prefix(), &mut keys),
            (None, None) => return Err(self.err("answer without a node")),
        }
        let index = index.or(reply.index).ok_or_else(|| self.err("answer without X-Etcd-Index"))?;
        Ok((keys, index))
    }

    async fn wait(&self, index: u64) -> Result<Option<Wait>, DiscoveryError> {
        let url = format!("{}?wait=true&recursive=true&waitIndex={}", self.dir_url(), index + 1);
        // A long-poll is ended by us after one resync interval: that is no error.
        let Some((reply, _)) = self.fetch(&url, self.cfg.resync_interval).await? else { return Ok(None) };
        match reply.error_code {
            Some(ECODE_EVENT_INDEX_CLEARED) => Ok(Some(Wait::Cleared)),
            Some(code) => Err(self.err(format!("watch error {code}: {}", reply.message.unwrap_or_default()))),
            None => Ok(Some(Wait::Event(reply))),
        }
    }

    async fn session(&mut self) -> Result<(), DiscoveryError> {
        let prefix = self.cfg.prefix();
        loop {
            let (mut keys, mut index) = self.read_all().await?;
            self.got_keys = true;
            if self.tx.send(SourceEvent::Keys(keys.clone())).await.is_err() {
                return Ok(());
            }
            // Follow changes until the long-poll times out (then re-read) or history is lost.
            while let Some(Wait::Event(reply)) = self.wait(index).await? {
                let Some(node) = reply.node else { continue };
                index = index.max(node.modified_index);
                let Some(rel) = node.key.strip_prefix(&prefix).map(str::to_owned) else { continue };
                let before = keys.clone();
                match reply.action.as_deref() {
                    Some("delete" | "expire" | "compareAndDelete") => {
                        let dir = format!("{rel}/");
                        keys.retain(|k, _| k != &rel && !k.starts_with(&dir));
                    }
                    _ if node.dir => {}
                    _ => {
                        keys.insert(rel, node.value.unwrap_or_default().into_bytes());
                    }
                }
                if keys != before && self.tx.send(SourceEvent::Keys(keys.clone())).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn flatten(node: &Node, prefix: &str, out: &mut KeyMap) {
    if node.dir {
        for n in &node.nodes {
            flatten(n, prefix, out);
        }
    } else if let (Some(rel), Some(v)) = (node.key.strip_prefix(prefix), &node.value) {
        out.insert(rel.to_owned(), v.clone().into_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattens_patroni_directory() {
        let body = r#"{"action":"get","node":{"key":"/service/demo","dir":true,"nodes":[
            {"key":"/service/demo/members","dir":true,"nodes":[
                {"key":"/service/demo/members/pg1","value":"{\"role\":\"master\"}","modifiedIndex":7,"createdIndex":7}]},
            {"key":"/service/demo/leader","value":"pg1","ttl":10,"modifiedIndex":9,"createdIndex":5}]}}"#;
        let r: Reply = serde_json::from_str(body).unwrap();
        let mut keys = KeyMap::new();
        flatten(&r.node.unwrap(), "/service/demo/", &mut keys);
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["leader", "members/pg1"]);
        assert_eq!(keys["leader"], b"pg1");
    }

    /// TLS files that vanish after the config was checked: the session reports etcd down,
    /// naming the file, and the task keeps running (no panic).
    #[tokio::test]
    async fn unreadable_tls_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        // Any well-formed certificate will do for the config check; it is deleted right after.
        std::fs::write(&ca, TEST_CA).unwrap();
        let text = format!(
            "[[cluster]]\nname = \"c\"\nscope = \"s\"\netcd_endpoints = [\"https://127.0.0.1:9\"]\n\
             etcd_api = \"v2\"\ntls_ca = {ca:?}\n\n[[listener]]\ncluster = \"c\"\nbind = \"127.0.0.1:0\"\n"
        );
        let cfg = crate::config::Config::parse(std::path::Path::new("t.toml"), &text).unwrap().clusters[0].clone();
        std::fs::remove_file(&ca).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(cfg, tx, stop.clone()));
        match rx.recv().await {
            Some(SourceEvent::Down(e)) => assert!(e.to_string().contains("ca.pem: cannot read"), "{e}"),
            other => panic!("expected Down, got {other:?}"),
        }
        assert!(!task.is_finished());
        stop.cancel();
        task.await.unwrap();
    }

    /// A self-signed CA certificate (ECDSA P-256), for tests that need any parsable one.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBpDCCAUugAwIBAgIUVH9aNXDR3rXIoq9RU89261c0P6owCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUcGdmcm9udC11bml0LXRlc3QtY2EwIBcNMjYxMTMwMDUxMjA5
WhgPMjEyNjExMDYwNTEyMDlaMB8xHTAbBgNVBAMMFHBnZnJvbnQtdW5pdC10ZXN0
LWNhMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEIFlMH6QrXL6Fr6lTVWgZunzJ
zHJIqRF9tUIL7lGBJePU5ONvc/whohAamut5ZkXoftOQ7JW0uAtdISQ2whCE96Nj
MGEwHQYDVR0OBBYEFLOZ5Ife0CHB0tA9PmhRQwMRmzozMB8GA1UdIwQYMBaAFLOZ
5Ife0CHB0tA9PmhRQwMRmzozMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQD
AgIEMAoGCCqGSM49BAMCA0cAMEQCIHIg6oouOthtFARWiMG6l9r/7W5pJ0cJmtPc
lENURpEyAiBewYnv8pgUsOoQy3gBQw6NR+GqhdPHBoc+AwpZXxvUjQ==
-----END CERTIFICATE-----
";

    #[test]
    fn parses_errors() {
        let r: Reply = serde_json::from_str(
            r#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"x","index":2007}"#,
        )
        .unwrap();
        assert_eq!(r.error_code, Some(ECODE_EVENT_INDEX_CLEARED));
    }
}
