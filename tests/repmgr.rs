//! pgfront routing a repmgr 5.3 cluster (PostgreSQL 15: a primary and two streaming replicas)
//! by the keys of `pgfront agent` (`source = "agent"`), one agent beside each node.
//!
//! One cluster is shared by the scenarios below, which run in order because each leaves the
//! cluster in the state the next one starts from: routing and the proxy's registration, an
//! agent's drain (sessions kept), an agent killed (its key expires), `repmgr standby
//! switchover` under writes every 10 ms, then standbys promoted by hand (a split brain).
//! See `common::repmgr` for how repmgr's ssh is run locally.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::{Agent, EtcdKv};
use common::repmgr::Repmgr;
use common::*;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "main";
const SCOPE: &str = "pgfront-repmgr";
/// The agents' lease ttl (the default): a killed agent's key is gone within it. Shorter ttls
/// let keys of live agents expire on a loaded machine (etcd answering keep-alives late).
const AGENT_TTL: u64 = 10;

struct Env {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
    rm: Repmgr,
    agents: Vec<Agent>,
    pf: Pgfront,
    rw: u16,
    ro: u16,
    /// A primary listener that gives up after 2 s (for "nothing is routed" checks).
    rw_short: u16,
}

fn setup() -> Env {
    let rt = runtime();
    let (etcd, rm, agents) = common::repmgr::with_agents(SCOPE, AGENT_TTL);
    let (rw, ro, rw_short, admin) = (free_port(), free_port(), free_port(), free_port());
    let config = cluster_config(admin, CLUSTER, SCOPE, &etcd.endpoint(), "source = \"agent\"")
        + &listener_config(CLUSTER, "rw", rw, "primary", "60s")
        + &listener_config(CLUSTER, "ro", ro, "replica", "5s")
        + &listener_config(CLUSTER, "rw_short", rw_short, "primary", "2s");
    let pf = Pgfront::start(&config, admin);
    Env { rt, etcd, rm, agents, pf, rw, ro, rw_short }
}

#[test]
fn pgfront_routes_a_repmgr_cluster_by_agent_keys() {
    let mut env = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        routes_by_agent_keys(&env);
        drain_keeps_sessions(&env);
        killed_agent_key_expires(&mut env);
        repmgr_switchover_under_writes(&env);
        source_switch_is_a_live_reload(&env);
        pre_promote_fences_the_old_primary(&env);
        hand_promotions_split_brain(&env);
    }));
    if let Err(panic) = result {
        eprintln!("--- pgfront log (last 80 lines) ---\n{}", env.pf.proc.log_tail(80));
        for a in &env.agents {
            let log = a.log();
            let v: Vec<&str> = log.lines().collect();
            eprintln!("--- agent {} (last 20 lines) ---\n{}", a.name, v[v.len().saturating_sub(20)..].join("\n"));
        }
        eprintln!("{}", env.rm.log_tails(30));
        std::panic::resume_unwind(panic);
    }
}

fn cluster_status(env: &Env) -> serde_json::Value {
    let s = env.pf.status().expect("pgfront /status");
    s["clusters"].as_array().unwrap().iter().find(|c| c["name"] == CLUSTER).unwrap().clone()
}

fn member_field(env: &Env, name: &str, field: &str) -> Option<serde_json::Value> {
    let c = cluster_status(env);
    c["members"].as_array()?.iter().find(|m| m["name"] == name).map(|m| m[field].clone())
}

fn port_of(env: &Env, name: &str) -> u16 {
    env.rm.node(name).port
}

/// The servers of `n` fresh connections through `port`.
fn servers(env: &Env, port: u16, n: usize) -> Vec<u16> {
    env.rt.block_on(async {
        let mut v = Vec::new();
        let mut held = Vec::new();
        for _ in 0..n {
            let c = pg_connect(port).await.expect("connect through pgfront");
            let row = c.query_one("SELECT inet_server_port()", &[]).await.unwrap();
            v.push(row.get::<_, i32>(0) as u16);
            // Held open so that leastconn spreads them.
            held.push(c);
        }
        v
    })
}

fn routes_by_agent_keys(env: &Env) {
    env.pf.wait_primary(CLUSTER, "pg1", Duration::from_secs(30));
    let (port, rec) = env.rt.block_on(whoami(env.rw)).unwrap();
    assert_eq!((port, rec), (port_of(env, "pg1"), false));
    wait_for("both replicas routable", Duration::from_secs(20), || {
        let c = cluster_status(env);
        let n = c["members"].as_array()?.iter().filter(|m| m["role"] == "replica" && m["state"] == "running").count();
        (n == 2).then_some(())
    });
    let mut seen = servers(env, env.ro, 4);
    seen.sort();
    seen.dedup();
    let mut replicas = vec![port_of(env, "pg2"), port_of(env, "pg3")];
    replicas.sort();
    assert_eq!(seen, replicas, "the replica listener uses both replicas, never the primary");
    // The proxy registered itself for fencing requests.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    let key = format!("/service/{SCOPE}/proxies/{host}-{}", env.pf.proc.pid());
    let mut kv = EtcdKv::connect(&env.etcd.endpoint());
    let reg = wait_for(&format!("{key} in etcd"), Duration::from_secs(10), || kv.get_json(&key));
    assert_eq!(reg["pid"], env.pf.proc.pid());
    assert_eq!(cluster_status(env)["source"], "agent");
}

fn drain_keeps_sessions(env: &Env) {
    // A replica in maintenance: no new connections, the open one keeps working.
    let session = env.rt.block_on(pg_connect(env.ro)).unwrap();
    let port = env.rt.block_on(session.query_one("SELECT inet_server_port()", &[])).unwrap().get::<_, i32>(0) as u16;
    let name = env.rm.nodes.iter().find(|n| n.port == port).unwrap().name.clone();
    let agent = env.agents.iter().find(|a| a.name == name).unwrap();
    let out = agent.cli(&["drain"]);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    wait_for(&format!("{name} in maintenance in pgfront"), Duration::from_secs(10), || {
        (member_field(env, &name, "maintenance")? == true).then_some(())
    });
    let other = if name == "pg2" { "pg3" } else { "pg2" };
    assert!(servers(env, env.ro, 4).iter().all(|p| *p == port_of(env, other)), "no new connection to {name}");
    env.rt.block_on(session.simple_query("SELECT 1")).expect("the session on the drained node is kept");
    let out = agent.cli(&["resume"]);
    assert!(out.status.success(), "resume: {}", String::from_utf8_lossy(&out.stderr));
    wait_for(&format!("{name} out of maintenance"), Duration::from_secs(10), || {
        (member_field(env, &name, "maintenance")? == false).then_some(())
    });

    // The primary in maintenance: no primary for new connections, its sessions kept.
    let rw = env.rt.block_on(pg_connect(env.rw)).unwrap();
    let pg1 = env.agents.iter().find(|a| a.name == "pg1").unwrap();
    assert!(pg1.cli(&["drain"]).status.success());
    wait_for("pgfront: primary in maintenance", Duration::from_secs(10), || {
        (cluster_status(env)["primary_status"] == "maintenance").then_some(())
    });
    assert!(env.pf.primary(CLUSTER).is_none());
    env.rt.block_on(rw.simple_query("INSERT INTO pgfront_probe DEFAULT VALUES")).expect("primary session kept");
    assert!(env.rt.block_on(whoami(env.rw_short)).is_err(), "no new connection to a primary in maintenance");
    assert!(pg1.cli(&["resume"]).status.success());
    env.pf.wait_primary(CLUSTER, "pg1", Duration::from_secs(10));
}

fn killed_agent_key_expires(env: &mut Env) {
    let i = env.agents.iter().position(|a| a.name == "pg3").unwrap();
    let session = env.rt.block_on(pg_connect(env.ro)).unwrap();
    let killed = Instant::now();
    env.agents[i].signal_and_wait(libc::SIGKILL);
    wait_for("pg3's key to expire and pg3 to leave pgfront's view", Duration::from_secs(AGENT_TTL * 4), || {
        member_field(env, "pg3", "name").is_none().then_some(())
    });
    eprintln!("agent of pg3 killed: gone from pgfront after {:?} (lease ttl {AGENT_TTL}s)", killed.elapsed());
    assert!(servers(env, env.ro, 4).iter().all(|p| *p == port_of(env, "pg2")), "no new connection to pg3");
    // A node without an agent is not routable: its sessions are closed like a lost member's.
    let _ = env.rt.block_on(session.simple_query("SELECT 1"));
    env.agents[i].restart();
    wait_for("pg3 back in pgfront's view", Duration::from_secs(15), || {
        (member_field(env, "pg3", "state")? == "running").then_some(())
    });
}

fn repmgr_switchover_under_writes(env: &Env) {
    env.rm.wait_streaming("pg1", Duration::from_secs(60));
    env.pf.wait_primary(CLUSTER, "pg1", Duration::from_secs(10));
    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(120)));
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let out = env.rm.repmgr(env.rm.node("pg2"), &["standby", "switchover", "--siblings-follow"]);
    let took = t0.elapsed();
    env.pf.wait_primary(CLUSTER, "pg2", Duration::from_secs(30));
    eprintln!("repmgr standby switchover pg1 -> pg2 took {took:?}; pgfront routes to pg2 after {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    eprintln!("repmgr switchover through pgfront (agent keys): {}", st.summary());
    for e in &st.errors {
        eprintln!("  {e}");
    }
    assert!(out.contains("switchover was successful"), "{out}");
    // A client placed on the old primary an instant before repmgr's fast shutdown is
    // terminated by it (57P01) before its startup completes: pgfront reads the startup's
    // answer up to ReadyForQuery, so that client is placed again, never shown the error.
    assert_eq!(st.connect_failures, 0, "no connection attempt refused or failed during a repmgr switchover");
    assert_eq!(st.read_only, 0, "no write reaches a read-only server");
    assert!(st.broken <= 1, "at most the session open on the old primary at its shutdown is broken");
    assert_eq!(st.writes.last().unwrap().1, port_of(env, "pg2"), "writes continue on the new primary");
    assert!(st.writes.iter().any(|w| w.1 == port_of(env, "pg1")), "writes went to the old primary before");
    let log = env.pf.log();
    assert!(log.contains("primary takes no new connections; clients are held"), "routing paused, clients held");
    env.rm.wait_streaming("pg2", Duration::from_secs(60));
}

/// SIGHUP from `source = "agent"` to `source = "patroni"` and back, under writes every 10 ms
/// and with a session open: the keys Patroni would write over the running instances (written
/// here by hand, the same roles as the agents') take over without a failed write, the session
/// stays, and discovery is not restarted.
fn source_switch_is_a_live_reload(env: &Env) {
    env.pf.wait_primary(CLUSTER, "pg2", Duration::from_secs(10));
    let mut kv = EtcdKv::connect(&env.etcd.endpoint());
    let prefix = format!("/service/{SCOPE}/");
    kv.put(&format!("{prefix}leader"), "pg2");
    for n in &env.rm.nodes {
        let role = if n.name == "pg2" { "master" } else { "replica" };
        let v = format!(
            r#"{{"conn_url":"postgres://127.0.0.1:{}/postgres","api_url":"http://127.0.0.1:1/patroni","state":"running","role":"{role}","timeline":2}}"#,
            n.port
        );
        kv.put(&format!("{prefix}members/{}", n.name), &v);
    }
    let session = env.rt.block_on(pg_connect(env.rw)).unwrap();
    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(60)));
    let text = std::fs::read_to_string(&env.pf.config).unwrap();
    for (from, to) in [("agent", "patroni"), ("patroni", "agent")] {
        std::thread::sleep(Duration::from_millis(500));
        let reloads = env.pf.metric("pgfront_config_reloads_total{result=\"ok\"}");
        std::fs::write(&env.pf.config, text.replace("source = \"agent\"", &format!("source = \"{to}\""))).unwrap();
        env.pf.proc.signal(libc::SIGHUP);
        wait_for(&format!("source {from} -> {to}"), Duration::from_secs(10), || {
            (env.pf.metric("pgfront_config_reloads_total{result=\"ok\"}") > reloads
                && cluster_status(env)["source"] == to)
                .then_some(())
        });
        assert_eq!(env.pf.primary(CLUSTER).as_deref(), Some("pg2"));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    eprintln!("source switched agent -> patroni -> agent by SIGHUP under writes: {}", st.summary());
    for e in &st.errors {
        eprintln!("  {e}");
    }
    assert_eq!(st.failed(), 0, "no write fails across the source switches");
    env.rt
        .block_on(session.simple_query("INSERT INTO pgfront_probe DEFAULT VALUES"))
        .expect("the open session is kept");
    let log = env.pf.log();
    assert!(log.contains("cluster source switched live"), "applied live");
    assert!(!log.contains("discovery restarted"), "discovery not restarted");
    kv.delete(&format!("{prefix}leader"));
    for n in &env.rm.nodes {
        kv.delete(&format!("{prefix}members/{}", n.name));
    }
}

/// `pgfront agent pre-promote` on pg3 naming pg2 (the primary): the proxy closes its primary
/// session to pg2, routes nothing there and acknowledges; the fence lifts when its key expires.
fn pre_promote_fences_the_old_primary(env: &Env) {
    env.pf.wait_primary(CLUSTER, "pg2", Duration::from_secs(10));
    let on_pg2 = env.rt.block_on(pg_connect(env.rw)).unwrap();
    let pg3 = env.agents.iter().find(|a| a.name == "pg3").unwrap();
    let t0 = Instant::now();
    let out = pg3.cli(&["pre-promote", "--old-primary", "pg2", "--hold", "3s", "--timeout", "10s"]);
    let took = t0.elapsed();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("$ pgfront agent pre-promote (took {took:?})\n{text}");
    assert!(out.status.success(), "every proxy acknowledged: {text}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    let me = format!("{host}-{}", env.pf.proc.pid());
    assert!(text.contains(&me), "{text}");
    let mut kv = EtcdKv::connect(&env.etcd.endpoint());
    let ack = kv.get_json(&format!("/service/{SCOPE}/fence-ack/{me}")).expect("the ack key");
    // `closed_sessions` counts what the proxy closed on pg2 for the fence, also when the kill
    // ran before the fencing task first looked: at least the session opened above.
    eprintln!("fence ack: {ack}");
    assert!(ack["closed_sessions"].as_u64().is_some_and(|n| n >= 1), "{ack}");
    let r =
        env.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), on_pg2.simple_query("SELECT 1")).await });
    assert!(matches!(r, Ok(Err(_))), "the primary session to the fenced pg2 was closed before the ack: {r:?}");
    let c = cluster_status(env);
    if c["fence"].is_object() {
        assert_eq!(c["primary_status"], "fenced");
        assert!(env.rt.block_on(whoami(env.rw_short)).is_err() || env.pf.primary(CLUSTER).as_deref() == Some("pg2"));
    }
    // The fence key's lease (3 s) expires: pg2 is routed again, the ack is removed.
    env.pf.wait_primary(CLUSTER, "pg2", Duration::from_secs(15));
    wait_for("the ack removed after the fence", Duration::from_secs(10), || {
        kv.get(&format!("/service/{SCOPE}/fence-ack/{me}")).is_none().then_some(())
    });
    let log = env.pf.log();
    assert!(log.contains("fencing request acknowledged"), "logged");
}

fn hand_promotions_split_brain(env: &Env) {
    env.pf.wait_primary(CLUSTER, "pg2", Duration::from_secs(10));
    let on_pg2 = env.rt.block_on(pg_connect(env.rw)).unwrap();
    // One standby promoted by hand, the old primary left running: the higher timeline wins and
    // the sessions on the other are closed.
    env.rm.pg_ctl(env.rm.node("pg3"), "promote");
    env.pf.wait_primary(CLUSTER, "pg3", Duration::from_secs(20));
    let r =
        env.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), on_pg2.simple_query("SELECT 1")).await });
    assert!(matches!(r, Ok(Err(_))), "the session on the lower-timeline primary pg2 was closed: {r:?}");
    // A second standby promoted from the same timeline: two primaries on the highest timeline.
    let on_pg3 = env.rt.block_on(pg_connect(env.rw)).unwrap();
    env.rm.pg_ctl(env.rm.node("pg1"), "promote");
    wait_for("pgfront to report a split brain", Duration::from_secs(20), || {
        let c = cluster_status(env);
        (c["primary_status"] == "split_brain").then_some(c)
    });
    let c = cluster_status(env);
    assert_eq!(c["split_brain"], serde_json::json!(["pg1", "pg3"]));
    assert!(c["primary"].is_null());
    let r =
        env.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), on_pg3.simple_query("SELECT 1")).await });
    assert!(matches!(r, Ok(Err(_))), "sessions on either claimant are closed: {r:?}");
    let err = env.rt.block_on(whoami(env.rw_short)).expect_err("no new connection to either claimant");
    eprintln!("split brain: a new primary connection gets: {}", pg_err(&err));
    assert_eq!(env.pf.metric(&format!("pgfront_cluster_split_brain{{cluster=\"{CLUSTER}\"}}")), 1.0);
    assert!(env.pf.log().contains("SPLIT BRAIN"), "one log line");
    let out = Command::new(pgfront_bin())
        .args(["check", "primary", "--admin", &format!("http://127.0.0.1:{}", env.pf.admin)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("$ pgfront check primary\n{text}");
    assert_eq!(out.status.code(), Some(2), "CRITICAL");
    assert!(text.contains("SPLIT BRAIN: pg1, pg3"), "{text}");
    let out = Command::new(pgfront_bin())
        .args(["status", "--admin", &format!("http://127.0.0.1:{}", env.pf.admin)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("$ pgfront status\n{text}");
    assert!(text.contains("SPLIT BRAIN: pg1, pg3 all claim primary"), "{text}");
    assert!(text.contains("NO PRIMARY ROUTED"), "{text}");
    assert!(text.contains("recent events"), "{text}");
}
