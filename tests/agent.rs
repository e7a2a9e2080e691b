//! `pgfront agent` beside a real Patroni 3.0 cluster of PostgreSQL 15 (one cluster for the whole
//! binary, one etcd): the published keys of a primary and a streaming replica, the health
//! endpoints compared answer by answer with the Patroni member of the same node, drain/resume
//! (and that a drained node stays drained across a restart), the lease (SIGTERM removes the key
//! at once, SIGKILL within the TTL), and `pre-promote` against fake proxy registrations.

mod common;

use std::time::{Duration, Instant};

use common::agent::{http_status, Agent, EtcdKv};
use common::{wait_for, Dcs, Etcd, Patroni};

const SCOPE: &str = "agent-test";
const TTL: u64 = 3;

#[test]
fn agent_beside_patroni() {
    let etcd = Etcd::start();
    let cluster = Patroni::start(&etcd, SCOPE, Dcs::Etcd3);
    let leader = cluster.leader().expect("a leader").name;
    let replica = cluster.members.iter().find(|m| m.name != leader).unwrap().name.clone();
    let (lm, rm) = (cluster.member(&leader), cluster.member(&replica));
    let mut kv = EtcdKv::connect(&etcd.endpoint());
    let mut primary = Agent::start(&etcd.endpoint(), SCOPE, &leader, lm.pg_port, TTL);
    let since = Instant::now();
    let mut standby = Agent::start(&etcd.endpoint(), SCOPE, &replica, rm.pg_port, TTL);

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        published_keys(&mut kv, &leader, &replica, lm.api_port);
        repmgr_view(&mut kv, &cluster, &leader, &replica);
        health_matches_patroni(&primary, lm.api_port, "primary");
        health_matches_patroni(&standby, rm.api_port, "replica");
        metrics_of_the_nodes(&primary, &standby);
        drain_and_resume(&mut kv, &mut standby);
        lease_ends_with_the_agent(&mut kv, &mut standby);
        hung_server_is_a_failed_probe(&mut kv, &standby, rm.pg_port);
        etcd_outage(&replica, rm.pg_port);
        pre_promote(&mut kv, &primary);
        patroni_pre_promote(&mut kv, &cluster, &etcd.endpoint(), &leader, &replica);
    }));
    if let Err(e) = result {
        eprintln!("--- agent {leader} ---\n{}", primary.log());
        eprintln!("--- agent {replica} ---\n{}", standby.log());
        eprintln!("{}", cluster.log_tails(30));
        std::panic::resume_unwind(e);
    }
    // Figures, not assertions: how often the key of an agent that ran the whole test (two
    // switchovers included) was written, its last probe time, and its memory.
    let writes = kv.version(&key(&leader)).unwrap_or(0);
    let probe_ms = kv.get_json(&key(&leader)).map(|v| v["probe_ms"].clone());
    let rss = std::fs::read_to_string(format!("/proc/{}/status", primary.proc.as_ref().unwrap().pid()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("VmRSS: ?")
        .split_whitespace()
        .skip(1)
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!(
        "agent {leader}: {writes} writes of its key in {:.0?} (probe every 200 ms, 50 ms when fast; lsn_interval 1s), last probe_ms {probe_ms:?}, RSS {rss}",
        since.elapsed()
    );
    primary.signal_and_wait(libc::SIGTERM);
    standby.signal_and_wait(libc::SIGTERM);
}

fn key(name: &str) -> String {
    format!("/service/{SCOPE}/nodes/{name}")
}

/// (a) The published JSON of the primary and of the streaming replica.
fn published_keys(kv: &mut EtcdKv, leader: &str, replica: &str, leader_api: u16) {
    // A probe may fail on a loaded machine (1 s timeout): wait for a running one.
    let p = wait_for("the primary's key", Duration::from_secs(15), || {
        kv.get_json(&key(leader)).filter(|p| p["state"] == "running")
    });
    let patroni: serde_json::Value = serde_json::from_str(
        &common::http_get(&format!("http://127.0.0.1:{leader_api}/patroni")).expect("Patroni /patroni").1,
    )
    .unwrap();
    assert_eq!(p["version"], 1, "{p}");
    assert_eq!(p["name"], leader, "{p}");
    assert_eq!(p["state"], "running", "{p}");
    assert_eq!(p["role"], "primary", "{p}");
    assert_eq!(p["in_recovery"], false, "{p}");
    assert_eq!(p["timeline"], patroni["timeline"], "agent {p}\npatroni {patroni}");
    assert!(p["lsn"].as_u64().is_some_and(|l| l > 0), "{p}");
    for k in ["receive_lsn", "replay_lsn", "lag_bytes", "upstream", "replication_state", "repmgr"] {
        assert!(p[k].is_null(), "{k} on the primary: {p}");
    }
    assert_eq!(p["maintenance"], false);
    assert!(p["conn_url"].as_str().unwrap().starts_with("postgres://127.0.0.1:"), "{p}");
    assert!(p["api_url"].as_str().unwrap().starts_with("http://127.0.0.1:"), "{p}");
    assert!(p["probe_ms"].as_f64().is_some() && p["probed_at_ms"].as_u64().is_some(), "{p}");

    // The replica's lag needs the primary's key, and its WAL receiver may still be starting
    // (Patroni just formed the cluster): poll until both are known.
    let r = wait_for("the replica's key with its lag, streaming", Duration::from_secs(30), || {
        kv.get_json(&key(replica))
            .filter(|r| r["lag_bytes"].is_u64() && r["state"] == "running" && r["replication_state"] == "streaming")
    });
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["role"], "replica", "{r}");
    assert_eq!(r["in_recovery"], true, "{r}");
    assert_eq!(r["timeline"], p["timeline"], "{r}");
    assert_eq!(r["replication_state"], "streaming", "{r}");
    assert_eq!(r["upstream"], "127.0.0.1", "the WAL sender's host: {r}");
    assert!(r["receive_lsn"].as_u64().is_some_and(|l| l > 0), "{r}");
    assert_eq!(r["lsn"], r["replay_lsn"], "{r}");
    assert!(r["repmgr"].is_null(), "{r}");
}

/// (b) Every route × GET/HEAD/OPTIONS: the agent answers with the status code of the Patroni
/// member of the same node.
fn health_matches_patroni(agent: &Agent, patroni_api: u16, role: &str) {
    let paths = [
        "/",
        "/primary",
        "/master",
        "/leader",
        "/read-write",
        "/standby-leader",
        "/replica",
        "/replica?lag=100MB",
        "/replica?lag=junk",
        "/read-only",
        "/health",
        "/liveness",
        "/readiness",
        "/patroni",
        "/async",
        "/sync",
        "/read-only-sync",
        "/replica?tag_nofailover=true",
        "/nonexistent",
    ];
    // On a loaded machine one probe (agent) or loop (Patroni) may be late: compare whole tables
    // until one matches, and show the last difference if none does.
    let mut last = Vec::new();
    let compare = || {
        let mut table = Vec::new();
        let mut diffs = Vec::new();
        for path in paths {
            for method in ["GET", "HEAD", "OPTIONS"] {
                let a = http_status(method, agent.api_port, path);
                let p = http_status(method, patroni_api, path);
                table.push(format!("{role:8} {method:7} {path:30} patroni {p:?} agent {a:?}"));
                if a != p || a.is_none() {
                    diffs.push(format!("{method} {path}: patroni {p:?}, agent {a:?}"));
                }
            }
        }
        (table, diffs)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let table = loop {
        let (table, diffs) = compare();
        if diffs.is_empty() {
            break table;
        }
        assert!(
            Instant::now() < deadline,
            "the agent of the {role} answers differently from Patroni:\n{}\nprevious round:\n{}",
            diffs.join("\n"),
            last.join("\n")
        );
        last = diffs;
    };
    eprintln!("{}", table.join("\n"));
    let expect = if role == "primary" { (200, 503) } else { (503, 200) };
    assert_eq!(
        (http_status("GET", agent.api_port, "/primary"), http_status("GET", agent.api_port, "/replica")),
        (Some(expect.0), Some(expect.1))
    );
}

/// A sample's value in the agent's `/metrics`.
fn agent_metric(agent: &Agent, sample: &str) -> Option<f64> {
    let (_, text) = common::http_get(&format!("http://127.0.0.1:{}/metrics", agent.api_port))?;
    text.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `GET /metrics`: each node's role, state, timeline and etcd link as its probe and publisher
/// see them; the replica's lag once the primary's position is published.
fn metrics_of_the_nodes(primary: &Agent, standby: &Agent) {
    for (agent, role) in [(primary, "primary"), (standby, "replica")] {
        let m = |s: &str| agent_metric(agent, s);
        assert_eq!(m(&format!("pgfront_agent_role{{role=\"{role}\"}}")), Some(1.0), "{}", agent.name);
        assert_eq!(m("pgfront_agent_role{role=\"unknown\"}"), Some(0.0));
        assert_eq!(m("pgfront_agent_postgres_up"), Some(1.0));
        assert_eq!(m("pgfront_agent_state{state=\"running\"}"), Some(1.0));
        assert_eq!(m("pgfront_agent_etcd_up"), Some(1.0));
        assert_eq!(m("pgfront_agent_maintenance"), Some(0.0));
        assert!(m("pgfront_agent_timeline").is_some_and(|t| t >= 1.0), "a timeline");
        assert!(m("pgfront_agent_probes_total{result=\"ok\"}").is_some_and(|n| n >= 1.0), "probes counted");
        assert!(m("pgfront_agent_probe_duration_seconds_count").is_some_and(|n| n >= 1.0), "probes timed");
        assert!(m("process_resident_memory_bytes").is_some_and(|b| b > 0.0));
    }
    assert!(
        agent_metric(primary, "pgfront_agent_replication_lag_bytes").is_some_and(f64::is_nan),
        "no lag on a primary"
    );
    let lag = wait_for("the replica's lag in its metrics", Duration::from_secs(10), || {
        agent_metric(standby, "pgfront_agent_replication_lag_bytes").filter(|l| !l.is_nan())
    });
    assert!(lag >= 0.0, "{lag}");
}

/// `drain` sets maintenance in the key (and `/replica` answers 503), `resume` clears it; a node
/// drained when its agent stops is drained when it starts again.
fn drain_and_resume(kv: &mut EtcdKv, agent: &mut Agent) {
    let out = agent.cli(&["drain"]);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("published"), "{}", String::from_utf8_lossy(&out.stdout));
    // `drain` returns once etcd has it: no polling needed.
    assert_eq!(kv.get_json(&key(&agent.name)).unwrap()["maintenance"], true);
    assert_eq!(http_status("GET", agent.api_port, "/replica"), Some(503));
    assert_eq!(agent_metric(agent, "pgfront_agent_maintenance"), Some(1.0));
    wait_for("/health 200 on a drained node", Duration::from_secs(10), || {
        (http_status("GET", agent.api_port, "/health") == Some(200)).then_some(())
    });

    agent.signal_and_wait(libc::SIGTERM);
    agent.restart();
    let v = wait_for("the restarted agent's key", Duration::from_secs(10), || kv.get_json(&key(&agent.name)));
    assert_eq!(v["maintenance"], true, "a drained node stays drained across a restart: {v}");

    let out = agent.cli(&["resume"]);
    assert!(out.status.success(), "resume: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(kv.get_json(&key(&agent.name)).unwrap()["maintenance"], false);
    wait_for("/replica 200 after resume", Duration::from_secs(10), || {
        (http_status("GET", agent.api_port, "/replica") == Some(200)).then_some(())
    });
}

/// SIGTERM: the key is gone when the agent has exited. SIGKILL: gone within the TTL.
fn lease_ends_with_the_agent(kv: &mut EtcdKv, agent: &mut Agent) {
    let k = key(&agent.name);
    assert!(kv.get(&k).is_some());
    let status = agent.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "agent exit on SIGTERM: {status}");
    assert_eq!(kv.get(&k), None, "the key must be gone as soon as the agent has exited");

    agent.restart();
    wait_for("the key after restart", Duration::from_secs(10), || kv.get(&k));
    let killed = Instant::now();
    agent.signal_and_wait(libc::SIGKILL);
    // etcd expires the lease TTL after the last keep-alive (plus its own tick, longer on a
    // loaded machine): the figure is printed, the limit is generous.
    wait_for("the key of a killed agent to expire", Duration::from_secs(3 * TTL + 5), || {
        kv.get(&k).is_none().then_some(())
    });
    eprintln!("key of the SIGKILLed agent gone after {:?} (ttl {TTL}s)", killed.elapsed());
    agent.restart();
}

/// (c) pre-promote: a fake proxy that acknowledges → 0; one that never does → 1 under
/// `refuse` (and the fence withdrawn), 0 under `proceed`; no proxy at all → 0.
fn pre_promote(kv: &mut EtcdKv, agent: &Agent) {
    let prefix = format!("/service/{SCOPE}/");
    let fence_key = format!("{prefix}fence");

    // Nobody registered.
    let out = agent.cli(&["pre-promote", "--timeout", "2s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no proxy is registered"));
    kv.delete(&fence_key);

    // A proxy that acknowledges what it sees.
    let reg = kv.put_leased(&format!("{prefix}proxies/fake-1"), r#"{"id":"fake-1","host":"lb1","pid":1}"#, 30);
    let child = std::process::Command::new(common::pgfront_bin())
        .args(["agent", "pre-promote", "--timeout", "20s", "-c", agent.config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let fence = wait_for("the fence request", Duration::from_secs(10), || kv.get_json(&fence_key));
    assert_eq!(fence["new_primary"], agent.name.as_str(), "{fence}");
    assert!(fence["old_primary"].is_null(), "{fence}");
    assert!(fence["requested_at_ms"].is_u64(), "{fence}");
    let id = fence["id"].as_str().unwrap().to_owned();
    kv.put(&format!("{prefix}fence-ack/fake-1"), &format!(r#"{{"id":"{id}","closed_sessions":0,"at_ms":1}}"#));
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "all acknowledged, yet: {text}");
    assert!(text.contains("acknowledged by every proxy (1: fake-1)"), "{text}");
    assert!(kv.get(&fence_key).is_some(), "the fence stays for its hold time after a promotion goes on");

    // A second proxy that never acknowledges.
    let reg2 = kv.put_leased(&format!("{prefix}proxies/fake-2"), r#"{"id":"fake-2","host":"lb2","pid":2}"#, 30);
    let out = agent.cli(&["pre-promote", "--timeout", "1s", "--on-timeout", "refuse"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "refuse: {text}");
    assert!(text.contains("proxy fake-2 did NOT acknowledge"), "{text}");
    assert!(text.contains("proxy fake-1 did NOT acknowledge"), "an ack of an older fence does not count: {text}");
    assert_eq!(kv.get(&fence_key), None, "a refused fence is withdrawn");

    let out = agent.cli(&["pre-promote", "--timeout", "1s", "--on-timeout", "proceed"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "proceed: {text}");
    assert!(text.contains("proxy fake-2 did NOT acknowledge") && text.contains("proceeds"), "{text}");

    kv.revoke(reg);
    kv.revoke(reg2);
    kv.delete(&format!("{prefix}fence-ack/fake-1"));
}

/// Sends SIGCONT to a stopped process when dropped, so a failing test leaves no stopped backend
/// that would hold up PostgreSQL's shutdown.
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

/// A backend that stops answering (SIGSTOP) makes the probe fail within its timeout
/// (`unreachable`), and the agent reconnects: the node is `running` again in etcd.
fn hung_server_is_a_failed_probe(kv: &mut EtcdKv, agent: &Agent, pg_port: u16) {
    let (ok, pid, err) =
        common::psql(pg_port, "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgfront-agent' LIMIT 1");
    assert!(ok, "{err}");
    let pid: i32 = pid.parse().unwrap_or_else(|_| panic!("no agent backend: {pid:?}"));
    let stopped = Stopped(pid);
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let started = Instant::now();
    wait_for("the agent to count the hung probe as failed", Duration::from_secs(10), || {
        agent.log().contains("probe took longer than").then_some(())
    });
    eprintln!("hung backend detected after {:?} (probe_timeout 1s)", started.elapsed());
    assert!(http_status("GET", agent.api_port, "/health").is_some(), "the health endpoint answers during a hung probe");
    let v = wait_for("the agent to reconnect", Duration::from_secs(10), || {
        kv.get_json(&key(&agent.name)).filter(|v| v["state"] == "running")
    });
    assert_eq!(v["role"], "replica", "{v}");
    drop(stopped);
    wait_for("/replica 200 after the reconnection", Duration::from_secs(10), || {
        (http_status("GET", agent.api_port, "/replica") == Some(200)).then_some(())
    });
}

/// etcd stops answering (SIGSTOP): probing and the health endpoint go on; `drain` is saved and
/// reported as not yet published; once etcd answers again, the agent publishes with a new lease,
/// drained.
fn etcd_outage(name: &str, pg_port: u16) {
    let etcd = Etcd::start();
    let mut kv = EtcdKv::connect(&etcd.endpoint());
    let mut agent = Agent::start(&etcd.endpoint(), SCOPE, name, pg_port, TTL);
    wait_for("the key in the second etcd", Duration::from_secs(10), || kv.get_json(&key(name)));
    etcd.pause();
    let paused = Instant::now();
    wait_for("the agent to notice the outage", Duration::from_secs(15), || {
        agent.log().contains("cannot publish this node").then_some(())
    });
    assert!(http_status("GET", agent.api_port, "/health").is_some(), "health answers during the outage");
    let out = agent.cli(&["drain"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "drain during the outage: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("NOT yet in etcd"), "{stdout}");
    assert_eq!(http_status("GET", agent.api_port, "/replica"), Some(503), "drained locally at once");
    etcd.resume();
    eprintln!("etcd paused for {:?}", paused.elapsed());
    let v = wait_for("the key back after the outage, drained", Duration::from_secs(20), || {
        kv.get_json(&key(name)).filter(|v| v["maintenance"] == true)
    });
    assert_eq!(v["state"], "running", "{v}");
    // The agent logs the publication after etcd answered it: the line may trail the key.
    wait_for("a new session after the outage", Duration::from_secs(10), || {
        (agent.log().matches("etcd: node published").count() >= 2).then_some(())
    });
    agent.signal_and_wait(libc::SIGTERM);
    assert_eq!(kv.get(&key(name)), None);
}

/// Waits until the agent key of `name` says primary on a timeline above `above`; returns it.
fn wait_agent_primary(kv: &mut EtcdKv, name: &str, above: u64) -> u64 {
    let v = wait_for(&format!("{name}'s key to say primary on a new timeline"), Duration::from_secs(30), || {
        kv.get_json(&key(name)).filter(|v| v["role"] == "primary" && v["timeline"].as_u64() > Some(above))
    });
    v["timeline"].as_u64().unwrap()
}

/// Patroni with `pre_promote: pgfront agent pre-promote ...`: a switchover waits for the (fake)
/// proxy's acknowledgement and completes; with a proxy that never acknowledges and
/// `on_timeout = "refuse"`, Patroni does not promote until that proxy is gone. Also: the agents'
/// keys follow both switchovers (new primary on the new timeline).
fn patroni_pre_promote(kv: &mut EtcdKv, cluster: &Patroni, endpoint: &str, leader: &str, replica: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    let prefix = format!("/service/{SCOPE}/");
    let tl0 = kv.get_json(&key(leader)).unwrap()["timeline"].as_u64().unwrap();

    // Baseline: a switchover without fencing.
    let t = Instant::now();
    cluster.switchover(leader, replica);
    let plain = t.elapsed();
    let tl1 = wait_agent_primary(kv, replica, tl0);
    cluster.wait_healthy(Duration::from_secs(60));

    // Every member runs pre-promote with its own agent configuration; a tag shows that Patroni
    // has re-read its file. Patroni runs as postgres: the binary goes where it can reach it (a
    // clone in a 0700 directory cannot be entered).
    let bin = cluster.dir.path().join("pgfront");
    std::fs::copy(common::pgfront_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for m in &cluster.members {
        let conf = cluster.dir.path().join(format!("{}-agent.toml", m.name));
        std::fs::write(
            &conf,
            format!(
                "[node]\nname = \"{}\"\nconn_url = \"postgres://127.0.0.1:{}/postgres\"\n\n\
                 [cluster]\nscope = \"{SCOPE}\"\netcd_endpoints = [\"{endpoint}\"]\n\n\
                 [pre_promote]\ntimeout = \"3s\"\non_timeout = \"refuse\"\nhold = \"10s\"\n",
                m.name, m.pg_port
            ),
        )
        .unwrap();
        let yml = std::fs::read_to_string(&m.config).unwrap();
        let cmd = format!("{} agent pre-promote -c {}", bin.display(), conf.display());
        let yml = yml.replacen("postgresql:\n  listen:", &format!("postgresql:\n  pre_promote: {cmd}\n  listen:"), 1);
        std::fs::write(&m.config, format!("{yml}tags:\n  pgfront_fence: \"on\"\n")).unwrap();
        m.proc.as_ref().unwrap().signal(libc::SIGHUP);
    }
    for m in &cluster.members {
        wait_for(&format!("{} to reload its configuration", m.name), Duration::from_secs(20), || {
            let (_, body) = common::http_get(&format!("http://127.0.0.1:{}/patroni", m.api_port))?;
            body.contains("pgfront_fence").then_some(())
        });
    }

    // A proxy that acknowledges every fence it sees.
    let reg = kv.put_leased(&format!("{prefix}proxies/fake-lb"), r#"{"id":"fake-lb","host":"lb","pid":1}"#, 120);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let acker = {
        let (stop, endpoint, prefix) = (stop.clone(), endpoint.to_owned(), prefix.clone());
        std::thread::spawn(move || {
            let mut kv = EtcdKv::connect(&endpoint);
            let mut acked = String::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Some(f) = kv.get_json(&format!("{prefix}fence")) {
                    let id = f["id"].as_str().unwrap_or_default().to_owned();
                    if id != acked {
                        kv.put(
                            &format!("{prefix}fence-ack/fake-lb"),
                            &format!(r#"{{"id":"{id}","closed_sessions":0}}"#),
                        );
                        let _ = tx.send(f);
                        acked = id;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let t = Instant::now();
    cluster.switchover(replica, leader);
    let fenced = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    acker.join().unwrap();
    let fences: Vec<serde_json::Value> = rx.try_iter().collect();
    assert!(fences.iter().any(|f| f["new_primary"] == leader), "no fence for {leader}: {fences:?}");
    let tl2 = wait_agent_primary(kv, leader, tl1);
    let log = std::fs::read_to_string(cluster.dir.path().join(format!("{leader}.log"))).unwrap_or_default();
    let line = log.lines().find(|l| l.contains("acknowledged by every proxy")).unwrap_or("?").to_owned();
    assert!(log.contains("exited with 0"), "Patroni ran pre-promote: {}", cluster.log_tails(40));
    eprintln!("switchover without fencing {plain:?}, with fencing {fenced:?} (timelines {tl0} -> {tl1} -> {tl2})");
    eprintln!("pre-promote said: {line}");
    cluster.wait_healthy(Duration::from_secs(60));
    kv.revoke(reg);

    // A proxy that never acknowledges: the promotion is refused while it is registered.
    let reg = kv.put_leased(&format!("{prefix}proxies/dead-lb"), r#"{"id":"dead-lb","host":"lb2","pid":2}"#, 120);
    let out = cluster.try_switchover(leader, replica);
    wait_for("Patroni to refuse the promotion", Duration::from_secs(60), || {
        let logs = cluster.log_tails(400);
        logs.contains("exited with 1").then_some(())
    });
    let primaries =
        cluster.members.iter().filter(|m| common::psql(m.pg_port, "SELECT pg_is_in_recovery()").1 == "f").count();
    let said = out.unwrap_or_else(|e| e);
    let verdict = said.lines().find(|l| l.contains("witch")).unwrap_or("?");
    eprintln!("switchover with a proxy that never acknowledges: patronictl said {verdict:?}");
    assert_eq!(primaries, 0, "no member may be promoted while a registered proxy has not acknowledged");
    kv.revoke(reg);
    cluster.wait_healthy(Duration::from_secs(90));
}

/// `repmgr primary register` / `standby register` (repmgr 5.3, on the Patroni-run instances, as
/// during a migration): the keys carry repmgr's view, and the replica's upstream is repmgr's
/// name of the primary.
fn repmgr_view(kv: &mut EtcdKv, cluster: &Patroni, leader: &str, replica: &str) {
    common::require(&format!("{}/repmgr", common::PGBIN), "postgresql-15-repmgr repmgr");
    let register = |name: &str, id: u32, what: &[&str]| {
        let m = cluster.member(name);
        let conf = cluster.dir.path().join(format!("{name}-repmgr.conf"));
        std::fs::write(&conf, common::repmgr::node_conf(id, name, m.pg_port, &m.data_dir)).unwrap();
        if let Err(e) = common::repmgr::run_repmgr(&conf, what, cluster.dir.path(), None) {
            panic!("repmgr {what:?} on {name}: {e}");
        }
    };
    register(leader, 1, &["primary", "register"]);
    // `standby register` finds the primary through the standby's own copy of repmgr.nodes:
    // wait until the standby has replayed the primary's registration.
    let replica_port = cluster.member(replica).pg_port;
    wait_for("the primary's repmgr registration replayed on the standby", Duration::from_secs(30), || {
        common::psql(replica_port, "SELECT count(*) FROM repmgr.nodes").1.eq("1").then_some(())
    });
    register(replica, 2, &["standby", "register", "--upstream-node-id", "1"]);
    let p = wait_for("repmgr's view in the primary's key", Duration::from_secs(15), || {
        kv.get_json(&key(leader)).filter(|v| v["repmgr"].is_object())
    });
    assert_eq!(
        p["repmgr"],
        serde_json::json!({"node_id": 1, "type": "primary", "upstream_node_id": null, "active": true}),
        "{p}"
    );
    let r = wait_for("repmgr's view in the replica's key", Duration::from_secs(15), || {
        kv.get_json(&key(replica)).filter(|v| v["repmgr"].is_object())
    });
    assert_eq!(
        r["repmgr"],
        serde_json::json!({"node_id": 2, "type": "standby", "upstream_node_id": 1, "active": true}),
        "{r}"
    );
    assert_eq!(r["upstream"], leader, "repmgr's name of the upstream: {r}");
}
