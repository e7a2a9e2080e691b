//! Drain and resume of members (`pgfront drain` / `pgfront resume`), run as an operator would:
//! the CLI against a running proxy. A real etcd 3.4 holds Patroni-format keys for three TCP echo
//! "databases" on loopback (pg1 the leader, pg2 and pg3 replicas); pgfront has a primary
//! listener `rw` and a replica listener `ro`, both with a 30 s `drain_grace`, so a kill that
//! waited for the grace would show. Sessions are real TCP sessions through pgfront that start
//! with a PostgreSQL startup packet; which member serves them is read from `/status`.
//!
//! What is under test is pgfront's handling of the member state, not PostgreSQL, hence echo
//! backends. The admin endpoint listens on loopback, where the control routes are open: there
//! the refusal is tested with `require_token = true`, which asks loopback peers for the token
//! too; a last test runs pgfront and the CLI on two hosts (network namespaces) for the refusal
//! of a remote peer without the token.

mod common;

use std::process::Command;
use std::time::Duration;

use common::echo::*;
use common::*;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "drain-test-token-0123456789";

struct Setup {
    rt: tokio::runtime::Runtime,
    _etcd: Etcd,
    /// etcd's client endpoint.
    ep: String,
    pf: Pgfront,
    admin: u16,
    rw: u16,
    ro: u16,
    _backends: tokio_util::sync::DropGuard,
}

fn config(admin: u16, etcd: &str, rw: u16, ro: u16, admin_extra: &str, extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"
{admin_extra}

[[cluster]]
name = "main"
scope = "main"
etcd_endpoints = ["{etcd}"]
etcd_timeout = "1s"

[[listener]]
name = "rw"
cluster = "main"
bind = "127.0.0.1:{rw}"
role = "primary"
queue_timeout = "20s"
drain_grace = "30s"

[[listener]]
name = "ro"
cluster = "main"
bind = "127.0.0.1:{ro}"
role = "replica"
queue_timeout = "20s"
drain_grace = "30s"
{extra}
"#
    )
}

/// etcd, three echo members, pgfront routing them: `admin_extra` goes in `[admin]`, `extra` at
/// the end of the file.
fn setup(admin_extra: &str, extra: &str) -> Setup {
    let rt = runtime();
    let etcd = Etcd::start();
    let backends = CancellationToken::new();
    let ports: Vec<u16> = rt.block_on(async {
        let mut p = Vec::new();
        for _ in 0..3 {
            p.push(echo_server(backends.clone()).await);
        }
        p
    });
    let ep = etcd.endpoint();
    rt.block_on(async {
        put_member(&ep, "main", "pg1", ports[0], "master").await;
        put_member(&ep, "main", "pg2", ports[1], "replica").await;
        put_member(&ep, "main", "pg3", ports[2], "replica").await;
        put_leader(&ep, "main", "pg1").await;
    });
    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let pf = Pgfront::start(&config(admin, &ep, rw, ro, admin_extra, extra), admin);
    wait_for("pgfront to route the primary", Duration::from_secs(20), || pf.primary("main").map(|_| ()));
    let s = Setup { rt, _etcd: etcd, ep, pf, admin, rw, ro, _backends: backends.drop_guard() };
    wait_for("both replicas in the ro pool", Duration::from_secs(20), || (s.servers("ro").len() == 2).then_some(()));
    s
}

impl Setup {
    /// `(member, active)` of each server of a listener's pool.
    fn servers(&self, listener: &str) -> Vec<(String, u64)> {
        let Some(st) = self.pf.status() else { return Vec::new() };
        let Some(l) = st["listeners"].as_array().and_then(|a| a.iter().find(|l| l["name"] == listener).cloned()) else {
            return Vec::new();
        };
        l["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["member"].as_str().unwrap_or("").to_owned(), s["active"].as_u64().unwrap_or(0)))
            .collect()
    }

    fn active(&self, listener: &str, member: &str) -> u64 {
        self.servers(listener).into_iter().find(|(m, _)| m == member).map_or(0, |(_, a)| a)
    }

    /// The `/status` entry of a member of cluster main.
    fn member(&self, name: &str) -> serde_json::Value {
        let st = self.pf.status().expect("status");
        let c = st["clusters"].as_array().unwrap().iter().find(|c| c["name"] == "main").unwrap().clone();
        c["members"].as_array().unwrap().iter().find(|m| m["name"] == name).cloned().expect("member")
    }

    /// Runs `pgfront <args> --admin …` with `token` in PGFRONT_ADMIN_TOKEN: (exit code, stdout, stderr).
    fn cli(&self, args: &[&str], token: Option<&str>) -> (i32, String, String) {
        let mut cmd = Command::new(pgfront_bin());
        cmd.args(args).args(["--admin", &format!("http://127.0.0.1:{}", self.admin)]).env_remove("PGFRONT_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("PGFRONT_ADMIN_TOKEN", t);
        }
        let out = cmd.output().expect("run pgfront");
        let r = (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!("pgfront {}: {r:?}", args.join(" "));
        r
    }

    /// `n` sessions through `port`, each checked with a handshake.
    fn sessions(&self, port: u16, n: usize) -> Vec<TcpStream> {
        self.rt.block_on(async {
            let mut v = Vec::new();
            for i in 0..n {
                v.push(handshake(port).await.unwrap_or_else(|e| panic!("session {i} through {port}: {e}")));
            }
            v
        })
    }

    /// How many of `sessions` still answer a round trip.
    fn answering(&self, sessions: &mut [TcpStream]) -> usize {
        self.rt.block_on(async {
            let mut ok = 0;
            for s in sessions.iter_mut() {
                if round_trip(s, b"ping").await {
                    ok += 1;
                }
            }
            ok
        })
    }

    fn run<T>(&self, name: &str, f: impl FnOnce(&Setup) -> T) -> T {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        match r {
            Ok(v) => v,
            Err(e) => {
                eprintln!("--- {name}: pgfront log (last 60 lines) ---\n{}", self.pf.proc.log_tail(60));
                std::panic::resume_unwind(e);
            }
        }
    }
}

#[test]
fn a_drained_member_keeps_its_sessions_takes_no_new_ones_and_comes_back_on_resume() {
    let s = setup("", "");
    s.run("drain", |s| {
        let mut old = s.sessions(s.ro, 4);
        wait_for("4 sessions in the ro pool", Duration::from_secs(10), || {
            (s.active("ro", "pg2") + s.active("ro", "pg3") == 4).then_some(())
        });
        let on_pg2 = s.active("ro", "pg2");
        assert!(on_pg2 > 0, "leastconn put sessions on pg2: {:?}", s.servers("ro"));

        let (code, out, err) = s.cli(&["drain", "pg2"], None);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("pg2 (cluster main) is in maintenance") && out.contains("sessions are kept"), "{out}");
        let m = s.member("pg2");
        assert_eq!((m["maintenance"].as_bool(), m["server_state"].as_str()), (Some(true), Some("maint")), "{m}");
        assert_eq!(s.pf.metric("pgfront_server_state{cluster=\"main\",member=\"pg2\",state=\"maint\"}"), 1.0);
        assert_eq!(s.pf.metric("pgfront_server_state{cluster=\"main\",member=\"pg2\",state=\"up\"}"), 0.0);
        assert_eq!(s.pf.metric("pgfront_server_state{cluster=\"main\",member=\"pg3\",state=\"up\"}"), 1.0);

        // Open sessions stay; new ones all go to pg3.
        assert_eq!(s.answering(&mut old), 4, "every open session still answers");
        let mut new = s.sessions(s.ro, 4);
        assert_eq!(s.active("ro", "pg2"), on_pg2, "no new session on the drained member");
        assert_eq!(s.active("ro", "pg3"), 4 - on_pg2 + 4);
        assert_eq!(s.answering(&mut new), 4);

        // Shown by `pgfront status` and in the log, on one line.
        let st = Command::new(pgfront_bin())
            .args(["status", "--admin", &format!("http://127.0.0.1:{}", s.admin)])
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&st.stdout);
        let line = table.lines().find(|l| l.trim_start().starts_with("pg2 ")).unwrap_or_default();
        assert!(line.contains("MAINTENANCE (drained, sessions kept)"), "{table}");
        assert_eq!(s.pf.log().matches("pg2 (cluster main) is in maintenance").count(), 1, "{}", s.pf.log());

        // A drained primary: its open session stays, a new client is held in the queue (as during
        // a switchover) until the resume.
        let mut primary = s.sessions(s.rw, 1);
        let (code, _, err) = s.cli(&["drain", "pg1"], None);
        assert_eq!(code, 0, "{err}");
        assert_eq!(s.answering(&mut primary), 1);
        let held = s.rt.spawn(handshake(s.rw));
        wait_for("a client held in the rw queue", Duration::from_secs(10), || {
            (s.pf.metric("pgfront_queue_length{listener=\"rw\"}") == 1.0).then_some(())
        });
        assert!(!held.is_finished(), "a client got through to a drained primary");
        let (code, out, err) = s.cli(&["resume", "pg1"], None);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("out of maintenance"), "{out}");
        let held = s.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), held).await });
        assert!(matches!(held, Ok(Ok(Ok(_)))), "the held client is served after the resume: {held:?}");

        // Resume pg2: it is up again and leastconn fills it first.
        let (code, _, err) = s.cli(&["resume", "pg2"], None);
        assert_eq!(code, 0, "{err}");
        assert_eq!(s.member("pg2")["server_state"], "up");
        assert_eq!(s.member("pg2")["maintenance"], false);
        let _more = s.sessions(s.ro, 2);
        assert_eq!(s.active("ro", "pg2"), on_pg2 + 2, "{:?}", s.servers("ro"));

        // Errors an operator can make.
        let (code, _, err) = s.cli(&["drain", "pg7"], None);
        assert_eq!(code, 1);
        assert!(err.contains("unknown member \"pg7\"") && err.contains("pg1, pg2, pg3"), "{err}");
        let (code, _, err) = s.cli(&["drain", "pg2", "--cluster", "nope"], None);
        assert_eq!(code, 1);
        assert!(err.contains("unknown cluster \"nope\""), "{err}");
        assert_eq!(s.pf.metric("pgfront_admin_control_requests_total{action=\"drain\",result=\"ok\"}"), 2.0);
        assert_eq!(s.pf.metric("pgfront_admin_control_requests_total{action=\"drain\",result=\"invalid\"}"), 2.0);
    });
}

#[test]
fn kill_closes_the_sessions_of_a_drained_member_at_once() {
    let s = setup("", "");
    s.run("kill", |s| {
        let mut sessions = s.sessions(s.ro, 6);
        wait_for("6 sessions in the ro pool", Duration::from_secs(10), || {
            (s.active("ro", "pg2") + s.active("ro", "pg3") == 6).then_some(())
        });
        let on_pg2 = s.active("ro", "pg2");
        assert!(on_pg2 > 0);
        let (code, _, err) = s.cli(&["drain", "pg2"], None);
        assert_eq!(code, 0, "{err}");
        assert_eq!(s.answering(&mut sessions), 6, "without --kill every session stays");

        let started = std::time::Instant::now();
        let (code, out, err) = s.cli(&["drain", "pg2", "--kill"], None);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("closed now"), "{out}");
        // drain_grace is 30 s: a kill does not wait for it.
        wait_for("pg2's sessions closed", Duration::from_secs(10), || (s.active("ro", "pg2") == 0).then_some(()));
        eprintln!("--kill closed {on_pg2} sessions in {:?}", started.elapsed());
        assert_eq!(s.answering(&mut sessions), 6 - on_pg2 as usize, "exactly pg2's sessions were closed");
        assert_eq!(s.pf.metric("pgfront_drained_connections_total{listener=\"ro\"}"), on_pg2 as f64);
        let m = s.member("pg2");
        assert_eq!((m["maintenance_kill"].as_bool(), m["server_state"].as_str()), (Some(true), Some("maint")), "{m}");
        let _new = s.sessions(s.ro, 2);
        assert_eq!(s.active("ro", "pg2"), 0, "still drained after the kill");

        let (code, _, err) = s.cli(&["resume", "pg2"], None);
        assert_eq!(code, 0, "{err}");
        let _back = s.sessions(s.ro, 1);
        assert_eq!(s.active("ro", "pg2"), 1, "resumed: leastconn sends the next session to pg2");
    });
}

#[test]
fn a_drain_survives_a_reload_and_the_token_is_required_when_configured() {
    // A second cluster with a member named pg2 too: the short form must ask which one.
    let other = r#"
[[cluster]]
name = "other"
scope = "other"
etcd_endpoints = ["ETCD"]
etcd_timeout = "1s"
"#;
    let token_line = format!("token = \"{TOKEN}\"");
    let s = setup(&token_line, "");
    s.run("reload", |s| {
        let text = std::fs::read_to_string(&s.pf.config).unwrap();
        let other = other.replace("ETCD", &s.ep);
        s.rt.block_on(put_member(&s.ep, "other", "pg2", 9, "replica"));
        // From loopback, without a token: allowed (require_token is off).
        let (code, _, err) = s.cli(&["drain", "pg3"], None);
        assert_eq!(code, 0, "{err}");
        // But not from a web page open on this host (a browser's POST carries Origin).
        let page = raw(s.admin, "POST", "/members/main/pg3/resume", "Origin: http://page.example\r\n");
        assert!(page.starts_with("HTTP/1.1 403") && page.contains("Origin"), "{page}");
        assert_eq!(s.member("pg3")["maintenance"], true, "a refused resume changes nothing");

        // Reload: the token becomes required, a cluster is added. pg3 stays drained.
        let revision = |s: &Setup| s.pf.status().and_then(|v| v["config"]["revision"].as_u64()).unwrap_or(0);
        let before = revision(s);
        let strict = format!("{text}\n{other}").replace(&token_line, &format!("{token_line}\nrequire_token = true"));
        assert!(strict.contains("require_token = true"));
        std::fs::write(&s.pf.config, strict).unwrap();
        s.pf.proc.signal(libc::SIGHUP);
        wait_for("the reload", Duration::from_secs(20), || (revision(s) > before).then_some(()));
        assert_eq!(s.pf.status().unwrap()["config"]["last_error"], serde_json::Value::Null);
        let m = s.member("pg3");
        assert_eq!((m["maintenance"].as_bool(), m["server_state"].as_str()), (Some(true), Some("maint")), "{m}");
        let _new = s.sessions(s.ro, 3);
        assert_eq!(s.active("ro", "pg3"), 0, "no session on pg3 after the reload: {:?}", s.servers("ro"));
        assert_eq!(s.active("ro", "pg2"), 3);

        // Refused without the token, or with a wrong one; GET is not a control request.
        let (code, _, err) = s.cli(&["resume", "pg3"], None);
        assert_eq!(code, 1);
        assert!(err.contains("refused") && err.contains("require_token") && err.contains("--token"), "{err}");
        let (code, _, err) = s.cli(&["resume", "pg3", "--token", "drain-test-token-wrong-0000"], None);
        assert_eq!(code, 1);
        assert!(err.contains("wrong admin token"), "{err}");
        assert_eq!(s.member("pg3")["maintenance"], true, "a refused resume changes nothing");
        let head = raw_get(s.admin, "/members/main/pg3/resume");
        assert!(head.starts_with("HTTP/1.1 405") && head.to_ascii_lowercase().contains("allow: post"), "{head}");
        // The web page's, and the two above.
        assert_eq!(s.pf.metric("pgfront_admin_control_requests_total{action=\"resume\",result=\"refused\"}"), 3.0);

        // With the token: a member in two clusters needs --cluster.
        let (code, _, err) = s.cli(&["drain", "pg2"], Some(TOKEN));
        assert_eq!(code, 1);
        assert!(err.contains("main, other") && err.contains("--cluster"), "{err}");
        let (code, out, err) = s.cli(&["resume", "pg3", "--cluster", "main"], Some(TOKEN));
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("pg3 (cluster main) is out of maintenance"), "{out}");
        assert_eq!(s.member("pg3")["maintenance"], false);
        // On the proxy's host, `-c` takes the address and the token from its configuration.
        for action in ["drain", "resume"] {
            let out = Command::new(pgfront_bin())
                .args([action, "pg3", "--cluster", "main", "-c", s.pf.config.to_str().unwrap()])
                .env_remove("PGFRONT_ADMIN_TOKEN")
                .output()
                .unwrap();
            assert!(out.status.success(), "{action} -c: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert_eq!(s.pf.metric("pgfront_admin_control_requests_total{action=\"resume\",result=\"ok\"}"), 2.0);
        assert!(!s.pf.log().contains(TOKEN), "the token is never logged");
    });
}

/// A GET with the raw answer (status line and headers included).
fn raw_get(port: u16, path: &str) -> String {
    raw(port, "GET", path, "")
}

/// One HTTP/1.1 request with `headers` (each ending in CRLF) added: the whole answer.
fn raw(port: u16, method: &str, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "{method} {path} HTTP/1.1\r\nHost: pgfront\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

#[test]
fn a_drain_survives_a_binary_upgrade() {
    let s = setup("", "");
    s.run("upgrade", |s| {
        let pid = |s: &Setup| s.pf.status().and_then(|v| v["pid"].as_u64());
        let old = pid(s).expect("pid in /status");
        let (code, _, err) = s.cli(&["drain", "pg2", "--kill"], None);
        assert_eq!(code, 0, "{err}");
        // SAFETY: a signal to the pgfront this test started.
        unsafe { libc::kill(old as i32, libc::SIGUSR2) };
        wait_for("the new process", Duration::from_secs(30), || pid(s).filter(|p| *p != old));
        // The new process reads etcd on its own: wait for its view to list pg2.
        let m = wait_for("pg2 in the new process's view", Duration::from_secs(20), || {
            let st = s.pf.status()?;
            let members = st["clusters"][0]["members"].as_array()?.clone();
            members.into_iter().find(|m| m["name"] == "pg2")
        });
        assert_eq!((m["maintenance"].as_bool(), m["maintenance_kill"].as_bool()), (Some(true), Some(true)), "{m}");
        wait_for("pg3 in the new process's ro pool", Duration::from_secs(20), || {
            s.servers("ro").iter().any(|(m, _)| m == "pg3").then_some(())
        });
        let _new = s.sessions(s.ro, 3);
        assert_eq!(s.active("ro", "pg2"), 0, "the new process keeps pg2 drained: {:?}", s.servers("ro"));
        assert_eq!(s.active("ro", "pg3"), 3);
        assert!(s.pf.log().contains("upgrade: member stays in maintenance"), "{}", s.pf.log());
    });
}

/// The refusal as it happens in production: a peer on another host (network namespaces, a
/// private segment; nothing on the host's interfaces). Authorization is checked before the
/// member is looked up, so with a valid token the answer is "unknown member" (this pgfront has
/// no etcd), which shows the request got past the check.
#[test]
fn a_drain_from_another_host_needs_the_token() {
    let seg = common::netns::Segment::new("dr");
    let dir = temp_dir("pgfront-drain-netns-");
    let cfg = dir.path().join("lb1.toml");
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"0.0.0.0:7000\"\ntoken = \"{TOKEN}\"\n\
             [[cluster]]\nname = \"main\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:9\"]\netcd_timeout = \"1s\"\n\
             [[listener]]\nname = \"rw\"\ncluster = \"main\"\nbind = \"0.0.0.0:5432\"\n"
        ),
    )
    .unwrap();
    let mut cmd = seg.cmd("lb1", pgfront_bin().to_str().unwrap());
    cmd.args(["proxy", "-c", cfg.to_str().unwrap()]);
    let pf = Proc::spawn("lb1", cmd, &dir.path().join("lb1.log"), false);
    let drain = |ns: &str, admin: &str, token: Option<&str>| {
        let mut c = seg.cmd(ns, pgfront_bin().to_str().unwrap());
        c.args(["drain", "pg2", "--admin", admin]).env_remove("PGFRONT_ADMIN_TOKEN");
        if let Some(t) = token {
            c.args(["--token", t]);
        }
        let out = c.output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let remote = format!("http://{}.11:7000", common::netns::SUBNET);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (code, err) = wait_for("the admin endpoint from the client host", Duration::from_secs(10), || {
            let r = drain("cli", &remote, None);
            (r.0 != 3).then_some(r)
        });
        assert_eq!(code, 1);
        assert!(err.contains("refused: not a loopback address") && err.contains("--token"), "{err}");
        let (code, err) = drain("cli", &remote, Some("drain-test-token-wrong-0000"));
        assert_eq!(code, 1);
        assert!(err.contains("wrong admin token"), "{err}");
        let (code, err) = drain("cli", &remote, Some(TOKEN));
        assert_eq!(code, 1);
        assert!(err.contains("unknown member \"pg2\""), "past the check with the token: {err}");
        // On the proxy's own host, loopback needs no token.
        let (code, err) = drain("lb1", "http://127.0.0.1:7000", None);
        assert_eq!(code, 1);
        assert!(err.contains("unknown member \"pg2\""), "loopback is allowed: {err}");
        let log = std::fs::read_to_string(&pf.log).unwrap_or_default();
        assert_eq!(log.matches("admin: drain refused").count(), 2, "{log}");
        assert!(!log.contains(TOKEN), "the token is never logged");
    }));
    if let Err(e) = result {
        eprintln!("--- pgfront log ---\n{}", pf.log_tail(40));
        std::panic::resume_unwind(e);
    }
}
