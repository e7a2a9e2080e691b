//! etcd v2 source, for Patroni's `etcd:` section: a recursive GET of the cluster's directory,
//! then long-polls (`wait=true&recursive=true&waitIndex=N`) for each following change. A
//! long-poll is bounded by the resync interval, after which the directory is read again, so a
//! lost event or a silent etcd costs at most one interval. `401 event index cleared` (more
//! than 1000 changes missed) triggers an immediate re-read.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::http::{self, HttpClient};
use super::keys::KeyMap;
use super::{DiscoveryError, SourceEvent};
use crate::config::ClusterConfig;

const ECODE_KEY_NOT_FOUND: u64 = 100;
const ECODE_EVENT_INDEX_CLEARED: u64 = 401;

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

pub async fn run(cfg: Arc<ClusterConfig>, tx: mpsc::Sender<SourceEvent>, stop: CancellationToken) {
    let client = http::client();
    let auth = cfg.credentials.as_ref().map(|c| http::basic_auth(&c.username, c.password.expose()));
    // Each new session tries the next endpoint.
    super::supervise(tx.clone(), stop, |attempt| {
        let base = cfg.endpoints[attempt % cfg.endpoints.len()].trim_end_matches('/').to_owned();
        let (cfg, client, auth, tx) = (cfg.clone(), client.clone(), auth.clone(), tx.clone());
        async move {
            let mut src =
                V2 { cfg: &cfg, client: &client, auth: auth.as_deref(), base: &base, tx: &tx, got_keys: false };
            let r = src.session().await;
            (r, src.got_keys)
        }
    })
    .await
}

struct V2<'a> {
    cfg: &'a ClusterConfig,
    client: &'a HttpClient,
    auth: Option<&'a str>,
    base: &'a str,
    tx: &'a mpsc::Sender<SourceEvent>,
    got_keys: bool,
}

enum Wait {
    Event(Reply),
    Cleared,
}

impl V2<'_> {
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

    #[test]
    fn parses_errors() {
        let r: Reply = serde_json::from_str(
            r#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"x","index":2007}"#,
        )
        .unwrap();
        assert_eq!(r.error_code, Some(ECODE_EVENT_INDEX_CLEARED));
    }
}
