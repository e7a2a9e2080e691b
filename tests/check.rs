//! `pgfront check` against a running proxy: real etcd holding Patroni-format keys that point at
//! TCP echo servers on loopback (the "databases"), the proxy under test, and the plugin run as a
//! Nagios would run it. Each state is produced for real (leader key deleted, replica keys
//! removed, a queue built behind `server_maxconn = 1`, etcd stopped with SIGSTOP), then checked:
//! exit code, status line, perfdata. Every output goes through `validate`, a small parser of the
//! monitoring-plugins output format. The `vip` check runs across two hosts in network
//! namespaces (one holder, two holders, none); what `/status` cannot produce yet (the reload
//! status) and the endpoint failures (timeout, HTTP error, foreign JSON) are served by a fake
//! admin endpoint.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------------------------------------
// The output validator

#[derive(Debug, Clone)]
struct PerfItem {
    label: String,
    value: f64,
    uom: String,
    warn: String,
    crit: String,
}

#[derive(Debug)]
struct PluginRun {
    code: i32,
    out: String,
    /// The status line's text, before ` | `.
    text: String,
    perf: Vec<PerfItem>,
}

impl PluginRun {
    fn perf(&self, label: &str) -> &PerfItem {
        self.perf.iter().find(|p| p.label == label).unwrap_or_else(|| panic!("no perfdata {label:?} in:\n{}", self.out))
    }
}

fn is_number(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let mut parts = s.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next();
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// `[@][start:][end]` as the monitoring-plugins guidelines write threshold ranges.
fn is_range(s: &str) -> bool {
    let s = s.strip_prefix('@').unwrap_or(s);
    if !s.contains(|c: char| c.is_ascii_digit() || c == '~') {
        return false;
    }
    match s.split_once(':') {
        None => is_number(s),
        Some((a, b)) => (a.is_empty() || a == "~" || is_number(a)) && (b.is_empty() || is_number(b)),
    }
}

const UOMS: [&str; 11] = ["", "s", "ms", "us", "%", "B", "KB", "MB", "GB", "TB", "c"];

/// Parses `'label'=value[UOM];[warn];[crit];[min];[max]` items separated by spaces.
fn parse_perfdata(s: &str) -> Result<Vec<PerfItem>, String> {
    let mut items = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(items);
        }
        if chars.next() != Some('\'') {
            return Err(format!("label not quoted in {s:?}"));
        }
        let mut label = String::new();
        loop {
            match chars.next() {
                Some('\'') if chars.peek() == Some(&'\'') => {
                    chars.next();
                    label.push('\'');
                }
                Some('\'') => break,
                Some(c) => label.push(c),
                None => return Err(format!("unterminated label in {s:?}")),
            }
        }
        if label.is_empty() || label.contains('=') {
            return Err(format!("bad label {label:?}"));
        }
        if chars.next() != Some('=') {
            return Err(format!("no '=' after label {label:?}"));
        }
        let rest: String = std::iter::from_fn(|| chars.next_if(|c| *c != ' ')).collect();
        let fields: Vec<&str> = rest.split(';').collect();
        if fields.len() > 5 {
            return Err(format!("{label}: more than 5 fields in {rest:?}"));
        }
        let v = fields[0];
        let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-')).unwrap_or(v.len());
        let (value, uom) = v.split_at(split);
        if !is_number(value) || !UOMS.contains(&uom) {
            return Err(format!("{label}: bad value/UOM {v:?}"));
        }
        let field = |i: usize| fields.get(i).copied().unwrap_or("");
        for (i, what) in [(1, "warn"), (2, "crit")] {
            if !field(i).is_empty() && !is_range(field(i)) {
                return Err(format!("{label}: bad {what} range {:?}", field(i)));
            }
        }
        for (i, what) in [(3, "min"), (4, "max")] {
            if !field(i).is_empty() && !is_number(field(i)) {
                return Err(format!("{label}: bad {what} {:?}", field(i)));
            }
        }
        items.push(PerfItem {
            label,
            value: value.parse().map_err(|_| format!("{value:?}"))?,
            uom: uom.into(),
            warn: field(1).into(),
            crit: field(2).into(),
        });
    }
}

/// Checks a plugin output against the monitoring-plugins guidelines; panics with the output.
fn validate(out: &str, code: i32) -> PluginRun {
    let fail = |why: String| -> ! { panic!("bad plugin output ({why}), exit {code}:\n{out}") };
    let words = ["OK", "WARNING", "CRITICAL", "UNKNOWN"];
    if !(0..=3).contains(&code) {
        fail(format!("exit code {code} is not 0-3"));
    }
    let mut lines = out.lines();
    let first = lines.next().unwrap_or_else(|| fail("no output".into()));
    let (text, perf) = match first.split_once('|') {
        Some((t, p)) => (t.trim_end(), Some(p.trim())),
        None => (first, None),
    };
    if text.chars().count() > 80 {
        fail(format!("status line text has {} characters", text.chars().count()));
    }
    let rest = text.strip_prefix("PGFRONT ").unwrap_or_else(|| fail("no PGFRONT prefix".into()));
    let (head, message) = rest.split_once(" - ").unwrap_or_else(|| fail("no ' - '".into()));
    if message.trim().is_empty() {
        fail("empty message".into());
    }
    let mut head = head.split(' ').collect::<Vec<_>>();
    let word = head.pop().unwrap_or_default();
    if head.len() > 1 || head.iter().any(|w| !w.bytes().all(|b| b.is_ascii_uppercase())) {
        fail(format!("bad service name {head:?}"));
    }
    if words.get(code as usize) != Some(&word) {
        fail(format!("state word {word:?} does not match exit code {code}"));
    }
    let perf = match perf {
        Some(p) => parse_perfdata(p).unwrap_or_else(|e| fail(e)),
        None => Vec::new(),
    };
    for l in lines {
        if l.contains('|') {
            fail(format!("a '|' in a detail line: {l:?}"));
        }
    }
    PluginRun { code, out: out.to_owned(), text: text.to_owned(), perf }
}

#[test]
fn validator_rejects_what_nagios_would_misread() {
    let ok = "PGFRONT QUEUE OK - rw: 0 queued | 'rw_queued'=0;0;5;0 'x y'=1.5s;;@0:3;0;1\ndetail\n";
    let r = validate(ok, 0);
    assert_eq!((r.perf.len(), r.perf[1].label.as_str(), r.perf[1].uom.as_str()), (2, "x y", "s"));
    let long = format!("PGFRONT QUEUE OK - {}", "x".repeat(70));
    for (bad, code) in [
        ("PGFRONT QUEUE OK - x", 1),
        (long.as_str(), 0),
        ("QUEUE OK - x", 0),
        ("PGFRONT QUEUE OK - x | rw_queued=0", 0),
        ("PGFRONT QUEUE OK - x | 'rw'=0;5:1x", 0),
        ("PGFRONT QUEUE OK - x | 'rw'=0zz", 0),
        ("PGFRONT QUEUE OK - x | 'rw'=0;;;;;", 0),
        ("PGFRONT QUEUE OK - x\nmore | 'rw'=1", 0),
        ("PGFRONT QUEUE OK - x", 4),
    ] {
        let r = std::panic::catch_unwind(|| validate(bad, code));
        assert!(r.is_err(), "accepted: {bad:?} exit {code}");
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

fn run_check(args: &[&str]) -> PluginRun {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront")).arg("check").args(args).output().expect("pgfront check");
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    let code = out.status.code().expect("exit code");
    eprintln!("$ pgfront check {}\n{text}(exit {code})", args.join(" "));
    validate(&text, code)
}

/// A TCP echo server on loopback: the stand-in for a PostgreSQL member.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start() -> Echo {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Echo { port, stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A PostgreSQL StartupMessage (protocol 3.0, user "app"): pgfront may read it before it
/// connects; the echo server sends it back.
fn startup() -> Vec<u8> {
    let body = b"user\0app\0\0";
    let mut m = Vec::new();
    m.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
    m.extend_from_slice(&196608u32.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A client through a listener, connected to a member once its startup message came back.
fn client(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&startup()).unwrap();
    s
}

fn echoed(s: &mut TcpStream, limit: Duration) -> bool {
    let want = startup();
    let mut got = vec![0u8; want.len()];
    s.set_read_timeout(Some(limit)).unwrap();
    s.read_exact(&mut got).is_ok() && got == want
}

/// Patroni's keys, written with etcd's own client.
struct Keys {
    rt: tokio::runtime::Runtime,
    client: Mutex<etcd_client::Client>,
    prefix: String,
}

impl Keys {
    fn new(etcd: &Etcd, scope: &str) -> Keys {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = rt.block_on(etcd_client::Client::connect([etcd.endpoint()], None)).unwrap();
        Keys { rt, client: Mutex::new(client), prefix: format!("/service/{scope}/") }
    }

    fn put(&self, key: &str, value: &str) {
        let mut c = self.client.lock().unwrap();
        self.rt.block_on(c.put(format!("{}{key}", self.prefix), value, None)).unwrap();
    }

    fn delete(&self, key: &str) {
        let mut c = self.client.lock().unwrap();
        self.rt.block_on(c.delete(format!("{}{key}", self.prefix), None)).unwrap();
    }

    fn member(&self, name: &str, port: u16, role: &str) {
        self.put(
            &format!("members/{name}"),
            &format!(
                r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:1/patroni","state":"running","role":"{role}","version":"3.0.2","xlog_location":100,"timeline":1}}"#
            ),
        );
    }
}

fn cluster<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["clusters"].as_array().and_then(|a| a.iter().find(|c| c["name"] == name)).unwrap_or(&serde_json::Value::Null)
}

fn listener<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["listeners"].as_array().and_then(|a| a.iter().find(|l| l["name"] == name)).unwrap_or(&serde_json::Value::Null)
}

fn eligible(s: &serde_json::Value, l: &str) -> usize {
    listener(s, l)["servers"].as_array().map_or(0, |a| a.iter().filter(|x| x["state"] == "eligible").count())
}

fn wait_status(p: &Pgfront, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    wait_for(what, Duration::from_secs(20), || p.status().filter(|s| f(s)).map(|_| ()));
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn states_of_a_running_proxy() {
    let etcd = Etcd::start();
    let (pg1, pg2, pg3) = (Echo::start(), Echo::start(), Echo::start());
    let keys = Keys::new(&etcd, "chk");
    keys.member("pg1", pg1.port, "master");
    keys.member("pg2", pg2.port, "replica");
    keys.member("pg3", pg3.port, "replica");
    keys.put("leader", "pg1");

    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let p = Pgfront::start(
        &format!(
            r#"[admin]
listen = "127.0.0.1:{admin}"
[[cluster]]
name = "main"
scope = "chk"
etcd_endpoints = ["{etcd}"]
etcd_timeout = "500ms"
resync_interval = "200ms"
[[listener]]
name = "rw"
cluster = "main"
bind = "127.0.0.1:{rw}"
role = "primary"
server_maxconn = 1
queue_timeout = "60s"
[[listener]]
name = "ro"
cluster = "main"
bind = "127.0.0.1:{ro}"
role = "replica"
"#,
            etcd = etcd.endpoint()
        ),
        admin,
    );
    let url = format!("http://127.0.0.1:{admin}");
    let check = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--admin", url.as_str()]);
        run_check(&a)
    };
    p.wait_primary("main", "pg1", Duration::from_secs(20));
    wait_status(&p, "two eligible replicas", |s| eligible(s, "ro") == 2);

    // A routable primary.
    let r = check(&["primary"]);
    assert_eq!((r.code, r.text.as_str()), (0, "PGFRONT PRIMARY OK - main: pg1"), "{}", r.out);
    assert_eq!((r.perf("main_has_primary").value, r.perf("main_has_primary").crit.as_str()), (1.0, "@0"));
    let r = check(&["cluster_has_leader"]);
    assert_eq!(r.code, 0, "check_patroni's name works too");
    let r = check(&["etcd"]);
    assert_eq!((r.code, r.perf("main_etcd_up").value), (0, 1.0), "{}", r.out);
    let r = check(&["replicas", "-w", "2:", "-c", "1:"]);
    assert_eq!((r.code, r.text.as_str()), (0, "PGFRONT REPLICAS OK - ro: 2 replicas (pg2, pg3)"), "{}", r.out);
    let h = r.perf("ro_healthy_replica");
    assert_eq!((h.value, h.warn.as_str(), h.crit.as_str()), (2.0, "2:", "1:"));
    assert_eq!(r.perf("main_pg2_lag").uom, "B");
    let r = check(&["queue", "-w", "0", "-c", "5"]);
    assert_eq!((r.code, r.perf("rw_queued").value, r.perf("ro_queued").value), (0, 0.0, 0.0), "{}", r.out);

    // Replicas under the thresholds: one left is WARNING, none CRITICAL.
    keys.delete("members/pg3");
    wait_status(&p, "one eligible replica", |s| eligible(s, "ro") == 1);
    let r = check(&["replicas", "-w", "2:", "-c", "1:"]);
    assert_eq!((r.code, r.text.as_str()), (1, "PGFRONT REPLICAS WARNING - ro: 1 replica (pg2)"), "{}", r.out);
    keys.delete("members/pg2");
    wait_status(&p, "no eligible replica", |s| eligible(s, "ro") == 0);
    let r = check(&["replicas", "-w", "2:", "-c", "1:"]);
    assert_eq!((r.code, r.text.as_str()), (2, "PGFRONT REPLICAS CRITICAL - ro: 0 replicas"), "{}", r.out);
    keys.member("pg2", pg2.port, "replica");
    keys.member("pg3", pg3.port, "replica");
    wait_status(&p, "two eligible replicas again", |s| eligible(s, "ro") == 2);
    assert_eq!(check(&["replicas", "-c", "1:"]).code, 0);

    // A queue building behind server_maxconn = 1: one session holds the only slot, the next waits.
    let mut first = client(rw);
    assert!(echoed(&mut first, Duration::from_secs(10)), "the first client reaches pg1");
    let mut second = client(rw);
    wait_status(&p, "one client queued on rw", |s| listener(s, "rw")["queued"] == 1);
    let r = check(&["queue", "-w", "0", "-c", "5"]);
    assert_eq!((r.code, r.text.as_str()), (1, "PGFRONT QUEUE WARNING - rw: 1 queued"), "{}", r.out);
    assert_eq!(r.perf("rw_queued").value, 1.0);
    let wait = r.perf("rw_oldest_wait");
    assert!(wait.value >= 0.0 && wait.uom == "s", "{}", r.out);
    let r = check(&["queue", "-w", "0", "-c", "5", "--listener", "ro"]);
    assert_eq!(r.code, 0, "narrowed to ro: {}", r.out);
    let r = check(&["sessions", "-w", "80", "-c", "99"]);
    assert_eq!((r.code, r.text.as_str()), (2, "PGFRONT SESSIONS CRITICAL - rw/pg1 1/1 (100%)"), "{}", r.out);
    assert_eq!((r.perf("rw_pg1").value, r.perf("rw_pg1").uom.as_str()), (100.0, "%"));
    drop(first);
    assert!(echoed(&mut second, Duration::from_secs(10)), "the queued client gets the slot");
    wait_status(&p, "the queue drained", |s| listener(s, "rw")["queued"] == 0);
    assert_eq!(check(&["queue", "-w", "0", "-c", "5"]).code, 0);
    drop(second);

    // No leader: CRITICAL, and back to OK when the key returns.
    keys.delete("leader");
    wait_status(&p, "no primary", |s| cluster(s, "main")["primary"].is_null());
    let r = check(&["primary"]);
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.text.starts_with("PGFRONT PRIMARY CRITICAL - main: no primary (no leader"), "{}", r.out);
    assert_eq!(r.perf("main_has_primary").value, 0.0);
    let paused = r.perf("main_paused");
    assert!(paused.value >= 0.0 && paused.uom == "s" && r.text.contains(", paused "), "{}", r.out);
    keys.put("leader", "pg1");
    p.wait_primary("main", "pg1", Duration::from_secs(20));
    assert_eq!(check(&["primary"]).code, 0);

    // etcd stopped: CRITICAL once pgfront has noticed. The last topology would still route, but
    // only while a direct check confirms the primary: this fake member's Patroni API
    // (127.0.0.1:1) does not answer, so pgfront holds new connections and says why.
    etcd.pause();
    let noticed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_status(&p, "pgfront to see etcd down", |s| cluster(s, "main")["etcd_up"] == false);
        let r = check(&["etcd"]);
        assert_eq!(r.code, 2, "{}", r.out);
        assert!(r.text.starts_with("PGFRONT ETCD CRITICAL - main: etcd unreachable: "), "{}", r.out);
        assert_eq!(r.perf("main_etcd_up").value, 0.0);
        assert!(r.out.lines().count() >= 2, "the full error on a detail line: {}", r.out);
        let r = check(&["primary"]);
        assert_eq!(r.code, 2, "an unconfirmed primary is not routed while etcd is down: {}", r.out);
        assert!(r.text.contains("unconfirmed"), "{}", r.out);
    }));
    etcd.resume();
    if let Err(e) = noticed {
        std::panic::resume_unwind(e);
    }
    wait_status(&p, "pgfront to see etcd again", |s| cluster(s, "main")["etcd_up"] == true);
    assert_eq!(check(&["etcd"]).code, 0);

    // The configuration: OK, then a reload refused (the file is broken) is a WARNING.
    let r = check(&["config"]);
    assert_eq!(r.code, 0, "{}", r.out);
    assert!(r.text.starts_with("PGFRONT CONFIG OK - revision 1"), "{}", r.out);
    std::fs::write(&p.config, "this is not TOML").unwrap();
    p.proc.signal(libc::SIGHUP);
    wait_status(&p, "the refused reload", |s| s["config"]["last_error"].is_string());
    let r = check(&["config"]);
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.text.starts_with("PGFRONT CONFIG WARNING"), "{}", r.out);
    let r = check(&["config", "--failed-reload", "critical"]);
    assert_eq!(r.code, 2, "{}", r.out);
    let r = check(&["vip"]);
    assert_eq!(r.code, 3, "no VIP on this proxy: nothing to check: {}", r.out);

    // The proxy gone: UNKNOWN, not CRITICAL.
    drop(p);
    let r = check(&["primary"]);
    assert_eq!(r.code, 3, "{}", r.out);
    assert!(r.text.contains(&format!("127.0.0.1:{admin}: ")), "{}", r.out);
}

#[test]
fn endpoint_failures_and_bad_arguments_are_unknown() {
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let r = run_check(&["primary", "--admin", &nobody]);
    assert_eq!(r.code, 3, "{}", r.out);
    assert!(r.text.starts_with("PGFRONT PRIMARY UNKNOWN - "), "{}", r.out);
    assert!(r.out.to_lowercase().contains("connection refused"), "{}", r.out);

    let fake = FakeAdmin::start();
    let url = fake.url();
    fake.reply(500, "oops");
    let r = run_check(&["primary", "--admin", &url]);
    assert_eq!(r.code, 3, "{}", r.out);
    assert!(r.text.contains("HTTP 500"), "{}", r.out);
    fake.reply(200, r#"{"hello": "world"}"#);
    let r = run_check(&["etcd", "--admin", &url]);
    assert_eq!(r.code, 3, "{}", r.out);
    assert!(r.text.contains("not a pgfront /status"), "{}", r.out);
    fake.silent();
    let r = run_check(&["etcd", "--admin", &url, "--timeout", "1"]);
    assert_eq!(r.code, 3, "{}", r.out);
    assert!(r.text.contains("no answer within 1s"), "{}", r.out);

    fake.reply(200, r#"{"clusters": [], "listeners": []}"#);
    for args in [
        &["nosuch"][..],
        &[],
        &["queue"],
        &["queue", "-w", "5:1"],
        &["primary", "-c", "1"],
        &["primary", "--bogus"],
        &["primary", "--timeout", "never"],
    ] {
        let mut a = args.to_vec();
        a.extend(["--admin", &url]);
        let r = run_check(&a);
        assert_eq!(r.code, 3, "{args:?}: {}", r.out);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront")).args(["check", "--help"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--peers") && help.contains("@5:10"), "{help}");
}

/// The reload status as the proxy will report it, and `vip --peers` through the I/O shell:
/// served by fake admin endpoints.
#[test]
fn config_and_peers_through_fake_endpoints() {
    let local = FakeAdmin::start();
    let body = |config: &str, vip_state: &str| {
        format!(
            r#"{{"version":"0.1.0","clusters":[],"listeners":[],{config}"vips":[{{"name":"rw","address":"10.0.0.10/24","interface":"eth0","vrid":51,"version":"V3","state":"{vip_state}","priority":150,"master_seen":null,"transitions":1,"garps_sent":3,"bad_packets":0}}]}}"#
        )
    };
    local.reply(
        200,
        &body(r#""config":{"revision":4,"loaded_at":"2024-05-01T10:00:00Z","last_error":null},"#, "master"),
    );
    let r = run_check(&["config", "--admin", &local.url()]);
    assert_eq!((r.code, r.text.as_str()), (0, "PGFRONT CONFIG OK - revision 4, last reload ok"), "{}", r.out);
    local.reply(
        200,
        &body(r#""config":{"revision":4,"loaded_at":"2024-05-01T10:00:00Z","last_error":"FILE:7: listener[0].cluster: no [[cluster]] is named \"mian\""},"#, "master"),
    );
    let r = run_check(&["config", "--admin", &local.url()]);
    assert_eq!(r.code, 1, "{}", r.out);
    assert!(r.text.starts_with("PGFRONT CONFIG WARNING - reload failed: FILE:7"), "{}", r.out);
    assert!(r.out.contains("is named \"mian\""), "the whole error on a detail line: {}", r.out);
    let r = run_check(&["config", "--admin", &local.url(), "--failed-reload", "critical"]);
    assert_eq!(r.code, 2, "{}", r.out);

    let peer = FakeAdmin::start();
    peer.reply(200, &body("", "backup"));
    let r = run_check(&["vip", "--admin", &local.url(), "--peers", &peer.url()]);
    assert_eq!((r.code, r.text.as_str()), (0, "PGFRONT VIP OK - rw on this host"), "{}", r.out);
    assert_eq!(r.perf("rw_holders").value, 1.0);
    peer.reply(200, &body("", "master"));
    let r = run_check(&["vip", "--admin", &local.url(), "--peers", &peer.url()]);
    assert_eq!(r.code, 2, "{}", r.out);
    assert_eq!(r.perf("rw_holders").value, 2.0);
    peer.silent();
    let r = run_check(&["vip", "--admin", &local.url(), "--peers", &peer.url(), "--timeout", "1"]);
    assert_eq!(r.code, 1, "a silent peer is a WARNING: {}", r.out);
    assert!(r.text.contains("unanswered"), "{}", r.out);
}

/// `vip --peers` across two real pgfront hosts in network namespaces (VRRP between them):
/// one holder, two holders (a second VRRP group for the same address), none (etcd-lease
/// election with the etcd unreachable).
#[test]
fn vip_holders_across_hosts() {
    use common::netns::*;
    let seg = Segment::new("ck");
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2) = (format!("http://{SUBNET}.11:{ADMIN}"), format!("http://{SUBNET}.12:{ADMIN}"));
    let check_from_cli = |admin: &str, peer: &str| {
        let out = seg
            .cmd("cli", env!("CARGO_BIN_EXE_pgfront"))
            .args(["check", "vip", "--admin", admin, "--peers", peer, "--timeout", "3"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        eprintln!("$ pgfront check vip --admin {admin} --peers {peer}\n{text}");
        validate(&text, out.status.code().unwrap())
    };
    let wait_admin = |n: &str| {
        let url = format!("{}/status", if n == "lb1" { &a1 } else { &a2 });
        wait_for(&format!("{n} admin endpoint"), Duration::from_secs(10), || {
            let u = url.clone();
            seg.run_in("cli", move || http_get(&u)).filter(|(s, _)| *s == 200).map(|_| ())
        });
    };
    let vrrp = |priority| Vrrp { priority, version: 3, interval: "100ms", preempt: true };
    let start_with_vrid = |n: &str, priority: u8, vrid: u8| {
        let cfg = dir.path().join(format!("{n}.toml"));
        let text = config_with(n, Some(&vrrp(priority)), NO_TIES).replace("vrid = 51", &format!("vrid = {vrid}"));
        std::fs::write(&cfg, text).unwrap();
        let mut cmd = seg.cmd(n, env!("CARGO_BIN_EXE_pgfront"));
        cmd.args(["proxy", "-c", cfg.to_str().unwrap()]);
        Proc::spawn(n, cmd, &dir.path().join(format!("{n}.log")), false)
    };

    // One holder.
    let mut lb1 = start_with_vrid("lb1", 150, 51);
    let mut lb2 = start_with_vrid("lb2", 100, 51);
    wait_holder(&seg, "lb1", "lb2", Duration::from_secs(10));
    wait_admin("lb2");
    let r = check_from_cli(&a1, &a2);
    assert_eq!((r.code, r.text.as_str()), (0, "PGFRONT VIP OK - rw on this host"), "{}", r.out);
    let r = check_from_cli(&a2, &a1);
    assert_eq!(
        (r.code, r.text.as_str()),
        (0, format!("PGFRONT VIP OK - rw on {SUBNET}.11:{ADMIN}").as_str()),
        "{}",
        r.out
    );

    // Two holders: lb2 restarted in another VRRP group for the same address never hears lb1.
    lb2.stop(Duration::from_secs(40));
    let mut lb2b = start_with_vrid("lb2", 100, 52);
    wait_for("both hosts to hold the VIP", Duration::from_secs(10), || {
        (seg.holds_vip("lb1") && seg.holds_vip("lb2")).then_some(())
    });
    wait_admin("lb2");
    let r = check_from_cli(&a1, &a2);
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.text.starts_with("PGFRONT VIP CRITICAL - rw held by 2 hosts"), "{}", r.out);
    assert_eq!(r.perf("rw_holders").value, 2.0);
    lb1.stop(Duration::from_secs(40));
    lb2b.stop(Duration::from_secs(40));

    // No holder: etcd-lease election, and the etcd they would elect through is not there.
    let _h1 = start_lease_host(&seg, dir.path(), "lb1");
    let _h2 = start_lease_host(&seg, dir.path(), "lb2");
    wait_admin("lb1");
    wait_admin("lb2");
    let r = check_from_cli(&a1, &a2);
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.text.starts_with("PGFRONT VIP CRITICAL - rw held by no host"), "{}", r.out);
    assert_eq!(r.perf("rw_holders").value, 0.0);
}

/// An HTTP endpoint answering every request with a fixed reply, or never answering.
struct FakeAdmin {
    port: u16,
    reply: Arc<Mutex<Option<(u16, String)>>>,
    stop: Arc<AtomicBool>,
}

impl FakeAdmin {
    fn start() -> FakeAdmin {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let reply: Arc<Mutex<Option<(u16, String)>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (reply.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let (r, st) = (r.clone(), st.clone());
                std::thread::spawn(move || {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    c.set_read_timeout(Some(Duration::from_millis(100))).ok();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                            Err(_) if st.load(Ordering::Relaxed) => return,
                            Err(_) => {}
                        }
                    }
                    let Some((status, body)) = r.lock().unwrap().clone() else {
                        // Silent: hold the connection without a byte until the client leaves.
                        c.set_read_timeout(None).ok();
                        let _ = c.read(&mut buf);
                        return;
                    };
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        FakeAdmin { port, reply, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn reply(&self, status: u16, body: &str) {
        *self.reply.lock().unwrap() = Some((status, body.to_owned()));
    }

    fn silent(&self) {
        *self.reply.lock().unwrap() = None;
    }
}

impl Drop for FakeAdmin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
