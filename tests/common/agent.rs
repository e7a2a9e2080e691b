//! A `pgfront agent` guard for the integration tests (the agent beside one PostgreSQL), and the
//! small etcd and HTTP helpers its tests read keys and health answers with.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use super::{free_port, pgfront_bin, temp_dir, wait_for, Proc};

/// `pgfront agent` for the node `name` whose PostgreSQL listens on 127.0.0.1:`pg_port`.
pub struct Agent {
    pub name: String,
    pub api_port: u16,
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
    restarts: u32,
}

impl Agent {
    /// Writes the configuration (etcd `endpoint`, `scope`, lease `ttl_secs`) and starts the agent;
    /// waits for its health endpoint.
    pub fn start(endpoint: &str, scope: &str, name: &str, pg_port: u16, ttl_secs: u64) -> Agent {
        let dir = temp_dir("pgfront-agent-");
        let api_port = free_port();
        let config = dir.path().join("agent.toml");
        let text = format!(
            r#"[node]
name = "{name}"
conn_url = "postgres://127.0.0.1:{pg_port}/postgres"
state_file = "{state}"

[postgres]
host = "127.0.0.1"
port = {pg_port}
user = "postgres"
password = "postgres"
interval = "200ms"
fast_interval = "50ms"

[cluster]
scope = "{scope}"
etcd_endpoints = ["{endpoint}"]
ttl = "{ttl_secs}s"
lsn_interval = "1s"

[api]
listen = "127.0.0.1:{api_port}"
"#,
            state = dir.path().join("state/state.json").display(),
        );
        fs::write(&config, text).unwrap();
        let mut a = Agent { name: name.to_owned(), api_port, config, dir, proc: None, restarts: 0 };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(pgfront_bin());
        cmd.args(["agent", "-c", self.config.to_str().unwrap()])
            .env("RUST_LOG", std::env::var("PGFRONT_TEST_LOG").unwrap_or_else(|_| "info".into()));
        let log = self.dir.path().join(format!("agent.{}.log", self.restarts));
        self.restarts += 1;
        self.proc = Some(Proc::spawn(&format!("agent-{}", self.name), cmd, &log, false));
        let port = self.api_port;
        wait_for(&format!("agent {} health endpoint", self.name), Duration::from_secs(10), || {
            http_status("GET", port, "/agent").filter(|s| *s == 200)
        });
    }

    /// Starts the agent again after `kill` / `terminate`.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "agent {} still runs", self.name);
        self.spawn();
    }

    /// Sends `sig` to the agent and waits for it to exit; returns its exit status.
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut p = self.proc.take().expect("agent not running");
        p.signal(sig);
        let status = wait_for(&format!("agent {} to exit", self.name), Duration::from_secs(15), || {
            p.child.try_wait().ok().flatten()
        });
        std::mem::forget(p);
        status
    }

    /// `pgfront agent <args> -c <config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(pgfront_bin())
            .arg("agent")
            .args(args)
            .args(["-c", self.config.to_str().unwrap()])
            .current_dir(self.dir.path())
            .output()
            .expect("pgfront agent")
    }

    pub fn log(&self) -> String {
        let mut out = String::new();
        for i in 0..self.restarts {
            out.push_str(&fs::read_to_string(self.dir.path().join(format!("agent.{i}.log"))).unwrap_or_default());
        }
        out
    }
}

/// The status code of `METHOD path` on 127.0.0.1:`port` (HTTP/1.0, as HAProxy's checks), or None
/// when nothing answers.
pub fn http_status(method: &str, port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A blocking etcd v3 client for assertions.
pub struct EtcdKv {
    rt: tokio::runtime::Runtime,
    client: etcd_client::Client,
}

impl EtcdKv {
    pub fn connect(endpoint: &str) -> EtcdKv {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = rt.block_on(etcd_client::Client::connect([endpoint], None)).unwrap();
        EtcdKv { rt, client }
    }

    pub fn get(&mut self, key: &str) -> Option<String> {
        let r = self.rt.block_on(self.client.get(key, None)).ok()?;
        r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// How many times `key` was written since it was created.
    pub fn version(&mut self, key: &str) -> Option<i64> {
        let r = self.rt.block_on(self.client.get(key, None)).ok()?;
        r.kvs().first().map(|kv| kv.version())
    }

    pub fn get_json(&mut self, key: &str) -> Option<serde_json::Value> {
        self.get(key).and_then(|s| serde_json::from_str(&s).ok())
    }

    /// Puts `key` under a new lease of `ttl_secs`; returns the lease.
    pub fn put_leased(&mut self, key: &str, value: &str, ttl_secs: i64) -> i64 {
        let lease = self.rt.block_on(self.client.lease_grant(ttl_secs, None)).unwrap().id();
        let opts = etcd_client::PutOptions::new().with_lease(lease);
        self.rt.block_on(self.client.put(key, value, Some(opts))).unwrap();
        lease
    }

    pub fn put(&mut self, key: &str, value: &str) {
        self.rt.block_on(self.client.put(key, value, None)).unwrap();
    }

    pub fn revoke(&mut self, lease: i64) {
        let _ = self.rt.block_on(self.client.lease_revoke(lease));
    }

    pub fn delete(&mut self, key: &str) {
        let _ = self.rt.block_on(self.client.delete(key, None));
    }
}
