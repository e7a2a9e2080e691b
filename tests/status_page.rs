//! The status page (`/`) in a real headless browser, Debian's `chromium`, in front of a real
//! 3-member Patroni 3.0 cluster over etcd 3.4: the page renders and its script runs without
//! errors (they are written into the page and read back from the dumped DOM; the browser's
//! console goes to a log that is checked too), it shows the current leader, and after a real
//! `patronictl switchover` it shows the new leader and the leader-change event with its
//! routing pause. `/events` and the new `/status` fields are checked on the way.
//!
//! The browser runs as a one-shot `chromium --headless --dump-dom` with a virtual time budget,
//! long enough for the page's script to refresh itself a few times (it fetches `/?part=main`
//! every 2 s of virtual time; the fetches themselves are real).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CLUSTER: &str = "main";

/// What one page load left: the DOM after the script ran, and the browser's log.
struct Dump {
    dom: String,
    log: String,
}

/// Loads `url` in headless chromium and returns the DOM once the virtual time budget is spent.
fn browse(url: &str, dir: &Path) -> Dump {
    let bin = require("chromium", "chromium");
    // A profile and a HOME of its own: chromium writes both, and as root it needs --no-sandbox.
    let run = tempfile::Builder::new().prefix("chromium-").tempdir_in(dir).unwrap();
    let (dom, log) = (run.path().join("dom.html"), run.path().join("chromium.log"));
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=390,844",
        "--virtual-time-budget=7000",
    ])
    .arg(format!("--user-data-dir={}", run.path().join("profile").display()))
    .args(["--dump-dom", url])
    .env("HOME", run.path())
    .current_dir(run.path());
    let mut p = Proc::spawn_split("chromium", cmd, Some(&dom), &log, false);
    let started = Instant::now();
    let status = wait_for("chromium to dump the page", Duration::from_secs(90), || p.child.try_wait().ok().flatten());
    let dump = Dump {
        dom: std::fs::read_to_string(&dom).unwrap_or_default(),
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    };
    eprintln!("chromium: {url} dumped in {:?} ({} bytes of DOM)", started.elapsed(), dump.dom.len());
    // To look at the pages: PGFRONT_PAGE_DUMP=<dir> keeps each dump there.
    if let Some(keep) = std::env::var_os("PGFRONT_PAGE_DUMP") {
        let n = std::fs::read_dir(&keep).map_or(0, |d| d.count());
        let _ = std::fs::write(Path::new(&keep).join(format!("page-{n}.html")), &dump.dom);
    }
    assert!(status.success() && dump.dom.contains("</html>"), "chromium failed ({status}):\n{}", dump.log);
    dump
}

impl Dump {
    /// Checks that the script ran, refreshed the page, and reported no error.
    fn assert_script_ran(&self) {
        let errors = self.dom.split("id=\"script-errors\"").nth(1).and_then(|r| r.split("</ul>").next()).unwrap_or("");
        assert!(!errors.contains("<li>"), "the page reported script errors: {errors}\n{}", self.dom);
        let refreshes = self
            .dom
            .split("data-refreshes=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|n| n.parse::<u32>().ok());
        assert!(refreshes.is_some_and(|n| n >= 1), "the page did not refresh itself:\n{}\n{}", self.dom, self.log);
        for bad in ["Uncaught", "Content Security Policy", "Refused to", "SyntaxError", "TypeError"] {
            let line = self.log.lines().find(|l| l.contains(bad));
            assert!(line.is_none(), "browser console: {}", line.unwrap_or_default());
        }
        assert!(self.dom.contains("live, updated"), "the script's status line:\n{}", self.dom);
    }

    /// The member the page highlights as leader (the row of class `leader`).
    fn leader(&self) -> Option<String> {
        let row = self.dom.split("<tr class=\"leader\" data-member=\"").nth(1)?;
        Some(row.split('"').next()?.to_owned())
    }

    fn primary(&self) -> Option<String> {
        let p = self.dom.split("data-primary=\"").nth(1)?;
        Some(p.split('"').next()?.to_owned())
    }
}

fn setup() -> (Etcd, Patroni, Pgfront) {
    let etcd = Etcd::start();
    let pg = Patroni::start(&etcd, "pgfront-page", Dcs::Etcd3);
    let (rw, ro, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[[cluster]]
name = "{CLUSTER}"
scope = "pgfront-page"
etcd_endpoints = ["{etcd}"]
etcd_timeout = "1s"
check_user = "postgres"

[[listener]]
name = "rw"
cluster = "{CLUSTER}"
bind = "127.0.0.1:{rw}"
role = "primary"

[[listener]]
name = "ro"
cluster = "{CLUSTER}"
bind = "127.0.0.1:{ro}"
role = "replica"
"#,
        etcd = etcd.endpoint()
    );
    let pf = Pgfront::start(&config, admin);
    (etcd, pg, pf)
}

/// The port of one of pgfront's listeners, from `/status`.
fn pf_port(pf: &Pgfront, listener: &str) -> u16 {
    let s = pf.status().expect("/status");
    let l = s["listeners"].as_array().unwrap().iter().find(|l| l["name"] == listener).unwrap().clone();
    l["bind"].as_str().and_then(|b| b.rsplit(':').next()).and_then(|p| p.parse().ok()).unwrap()
}

fn events(pf: &Pgfront, query: &str) -> Vec<serde_json::Value> {
    let (code, body) = http_get(&format!("http://127.0.0.1:{}/events{query}", pf.admin)).expect("/events answers");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap().as_array().cloned().unwrap_or_default()
}

#[test]
fn status_page_in_headless_chromium_before_and_after_a_switchover() {
    let (_etcd, pg, pf) = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&pg, &pf)));
    if let Err(e) = result {
        eprintln!("--- pgfront log (last 60 lines) ---\n{}", pf.proc.log_tail(60));
        eprintln!("{}", pg.log_tails(30));
        std::panic::resume_unwind(e);
    }
}

fn scenario(pg: &Patroni, pf: &Pgfront) {
    let dir = temp_dir("pgfront-page-");
    let url = format!("http://127.0.0.1:{}/", pf.admin);
    let old = wait_for("a Patroni leader", Duration::from_secs(60), || pg.leader()).name;
    pf.wait_primary(CLUSTER, &old, Duration::from_secs(30));

    // /status: routable, nobody queued.
    let s = pf.status().unwrap();
    assert!(s["clusters"][0]["routing_paused_seconds"].is_null(), "{s:#}");
    let rw = s["listeners"].as_array().unwrap().iter().find(|l| l["name"] == "rw").unwrap().clone();
    assert!(rw["routing_paused_seconds"].is_null(), "{rw:#}");
    assert_eq!(rw["oldest_queued_wait_seconds"], 0.0, "{rw:#}");

    let before = browse(&url, dir.path());
    before.assert_script_ran();
    assert_eq!(before.leader().as_deref(), Some(old.as_str()), "leader row:\n{}", before.dom);
    assert_eq!(before.primary().as_deref(), Some(old.as_str()));
    assert!(
        before.dom.contains("data-kind=\"leader_change\""),
        "the first primary routed is an event:\n{}",
        before.dom
    );

    // A real switchover to a replica.
    let new = pg
        .cluster()
        .unwrap()
        .into_iter()
        .find(|m| m.role == "replica" && (m.state == "streaming" || m.state == "running"))
        .expect("a streaming replica")
        .name;
    let last_id = events(pf, "").first().and_then(|e| e["id"].as_u64()).unwrap_or(0);
    // Patroni refuses a candidate whose replication it has not seen catch up yet ("exceeds
    // maximum replication lag") just after the cluster formed: let WAL flow, and ask again.
    let port = pg.member(&new).pg_port;
    let (ok, _, err) = psql(pf_port(pf, "rw"), "CREATE TABLE page_probe (id int)");
    assert!(ok, "{err}");
    pg.wait_replicated(port, "page_probe");
    let mut attempts = 0;
    let out = wait_for("patronictl switchover to succeed", Duration::from_secs(90), || {
        attempts += 1;
        match pg.try_switchover(&old, &new) {
            Ok(out) => Some(out),
            // Each attempt takes patronictl about a second.
            Err(text) if attempts < 60 => {
                eprintln!("patronictl switchover refused, trying again: {}", text.lines().last().unwrap_or_default());
                None
            }
            Err(text) => panic!("patronictl switchover failed {attempts} times: {text}"),
        }
    });
    eprintln!("patronictl: {}", out.lines().last().unwrap_or_default());
    pf.wait_primary(CLUSTER, &new, Duration::from_secs(60));
    let s = pf.status().unwrap();
    assert!(s["clusters"][0]["routing_paused_seconds"].is_null(), "routable again: {s:#}");

    // /events: the leader change with its pause, newer than what was there before.
    let newer = events(pf, &format!("?since={last_id}"));
    assert!(newer.iter().all(|e| e["id"].as_u64() > Some(last_id)), "{newer:#?}");
    let change = newer
        .iter()
        .find(|e| e["kind"] == "leader_change" && e["member"] == new.as_str())
        .unwrap_or_else(|| panic!("no leader change to {new} in {newer:#?}"));
    assert_eq!(change["old"], old.as_str(), "{change:#}");
    assert_eq!(change["cluster"], CLUSTER);
    let pause = change["pause_ms"].as_u64().expect("the routing pause");
    assert!(
        change["detail"].as_str().unwrap().contains(&format!("{old} → {new}, routing paused {pause} ms")),
        "{change:#}"
    );
    assert!(newer.iter().any(|e| e["kind"] == "routing_paused" && e["member"] == old.as_str()), "{newer:#?}");
    let (code, body) = http_get(&format!("http://127.0.0.1:{}/events?since=x", pf.admin)).unwrap();
    assert_eq!(code, 400, "{body}");
    eprintln!("switchover {old} -> {new}: routing paused {pause} ms");

    let after = browse(&url, dir.path());
    after.assert_script_ran();
    assert_eq!(after.leader().as_deref(), Some(new.as_str()), "leader row after the switchover:\n{}", after.dom);
    assert_eq!(after.primary().as_deref(), Some(new.as_str()));
    let id = change["id"].as_u64().unwrap();
    let row = after
        .dom
        .split(&format!("data-kind=\"leader_change\" data-id=\"{id}\""))
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or_else(|| panic!("the leader-change event {id} is not on the page:\n{}", after.dom));
    assert!(row.contains(&format!("{old} → {new}, routing paused {pause} ms")), "{row}");
}
