//! The repmgr → Patroni migration behind pgfront, as a DBA runs it (docs/migrate-from-repmgr.md),
//! while a client writes every 10 ms through pgfront's primary listener.
//!
//! From a repmgr 5.3 cluster (PostgreSQL 15: pg1 primary, pg2 and pg3 streaming replicas), one
//! `pgfront agent` beside each node and pgfront routing by the agents' keys (`source = "agent"`):
//! 1. `repmgr service pause` (no automatic failover by repmgrd from here on);
//! 2. Patroni 3.0 started over the RUNNING instances. Started on a replica first, it refuses
//!    and exits (PostgreSQL untouched). On the primary it takes the `initialize` and `leader`
//!    keys for the running primary; on the replicas it rewrites `primary_conninfo` /
//!    `primary_slot_name` and reloads (PostgreSQL 13+ needs no restart for either). Proven by
//!    each postmaster's start time, unchanged, and by the replicas streaming through Patroni's
//!    slots;
//! 3. pgfront's cluster switched to `source = "patroni"` by editing its file and SIGHUP;
//! 4. the agents stopped, repmgr unregistered and its extension dropped.
//!
//! The writer must see no failed connection, no session broken and no write refused as
//! read-only; the longest gap between two writes is printed. One cluster, one test.

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::agent::{Agent, EtcdKv};
use common::repmgr::Repmgr;
use common::*;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "main";
/// The etcd scope: the agents and Patroni write under the same `/service/<scope>/` prefix.
const SCOPE: &str = "pgfront-migrate";

/// Fields drop in this order: pgfront, agents, Patroni (it stops PostgreSQL), then repmgr's
/// guard (stops whatever postmaster is left), etcd last.
struct Env {
    pf: Pgfront,
    agents: Vec<Agent>,
    patroni: Option<Patroni>,
    rm: Repmgr,
    etcd: Etcd,
    rt: tokio::runtime::Runtime,
    admin: u16,
    rw: u16,
    ro: u16,
}

fn pgfront_config(admin: u16, rw: u16, ro: u16, etcd: &str, source: &str) -> String {
    cluster_config(admin, CLUSTER, SCOPE, etcd, &format!("source = \"{source}\""))
        + &listener_config(CLUSTER, "rw", rw, "primary", "60s")
        + &listener_config(CLUSTER, "ro", ro, "replica", "5s")
}

fn setup() -> Env {
    let rt = runtime();
    let (etcd, rm, agents) = common::repmgr::with_agents(SCOPE, 10);
    let (rw, ro, admin) = (free_port(), free_port(), free_port());
    let pf = Pgfront::start(&pgfront_config(admin, rw, ro, &etcd.endpoint(), "agent"), admin);
    Env { pf, agents, patroni: None, rm, etcd, rt, admin, rw, ro }
}

/// Patroni's configuration for an existing repmgr node: the same port, data directory and
/// socket directory as the running instance, and parameters equal to those it runs with (so
/// that nothing is left "pending restart"). `repmgr` stays in `shared_preload_libraries` until
/// the next planned restart. Replication as the existing superuser (trust on loopback here).
fn adoption_yml(name: &str, pg_port: u16, api_port: u16, etcd_port: u16, node_dir: &str, data: &str) -> String {
    format!(
        r#"scope: {SCOPE}
namespace: /service/
name: {name}
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
etcd3:
  hosts: 127.0.0.1:{etcd_port}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 2
    retry_timeout: 4
    maximum_lag_on_failover: 10485760
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_connections: 100
        max_wal_senders: 10
        max_replication_slots: 10
        wal_log_hints: "on"
        wal_keep_size: 256MB
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: {PGBIN}
  pgpass: {node_dir}/pgpass
  authentication:
    superuser: {{username: postgres, password: postgres}}
    replication: {{username: postgres, password: postgres}}
    rewind: {{username: postgres, password: postgres}}
  parameters:
    unix_socket_directories: {node_dir}
    shared_preload_libraries: repmgr
    fsync: "off"
    synchronous_commit: "off"
    shared_buffers: 16MB
"#
    )
}

/// `pg_postmaster_start_time()` of each node, by name.
fn start_times(env: &Env) -> Vec<(String, String)> {
    env.rm
        .nodes
        .iter()
        .map(|n| {
            let (ok, out, err) = psql(n.port, "SELECT pg_postmaster_start_time()");
            assert!(ok, "{}: {err}", n.name);
            (n.name.clone(), out)
        })
        .collect()
}

fn cluster_status(env: &Env) -> serde_json::Value {
    let s = env.pf.status().expect("pgfront /status");
    s["clusters"].as_array().unwrap().iter().find(|c| c["name"] == CLUSTER).unwrap().clone()
}

/// The replica members pgfront routes to (running, role replica), sorted.
fn routed_replicas(env: &Env) -> Vec<String> {
    let c = cluster_status(env);
    let mut v: Vec<String> = c["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["role"] == "replica" && m["state"] == "running")
                .filter_map(|m| m["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn repmgr_to_patroni_under_writes_through_pgfront() {
    let mut env = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| migrate(&mut env)));
    if let Err(panic) = result {
        eprintln!("--- pgfront log (last 60 lines) ---\n{}", env.pf.proc.log_tail(60));
        if let Some(p) = &env.patroni {
            eprintln!("{}", p.log_tails(40));
        }
        eprintln!("{}", env.rm.log_tails(30));
        std::panic::resume_unwind(panic);
    }
}

fn migrate(env: &mut Env) {
    // The starting point: pgfront routes pg1 by the agents' keys, both replicas routable.
    env.pf.wait_primary(CLUSTER, "pg1", Duration::from_secs(30));
    wait_for("both replicas routed by agent keys", Duration::from_secs(20), || {
        (routed_replicas(env) == ["pg2", "pg3"]).then_some(())
    });
    assert_eq!(cluster_status(env)["source"], "agent");
    let before = start_times(env);

    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(150)));
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.2} s] {what}", t0.elapsed().as_secs_f64());
    wait_for("the writer's first writes", Duration::from_secs(10), || {
        (env.rt.block_on(whoami(env.rw)).ok()? == (env.rm.node("pg1").port, false)).then_some(())
    });

    // 1. repmgrd paused (the guard runs no repmgrd; the pause flag is set on every node anyway,
    //    as a DBA would before a second manager appears).
    step("1. repmgr service pause");
    let out = env.rm.repmgr(env.rm.node("pg1"), &["service", "pause"]);
    eprintln!("$ repmgr service pause\n{out}");

    // 2. Patroni over the running instances: the primary's first, then the replicas'.
    step("2. Patroni configured on every node");
    let patroni_bin = require("patroni", "patroni");
    let dir = pg_tempdir();
    let mut members = Vec::new();
    for n in &env.rm.nodes {
        let api_port = free_port();
        let yml = adoption_yml(
            &n.name,
            n.port,
            api_port,
            env.etcd.port,
            &n.dir.display().to_string(),
            &n.data.display().to_string(),
        );
        let config = dir.path().join(format!("{}.yml", n.name));
        fs::write(&config, yml).unwrap();
        members.push(PgMember {
            name: n.name.clone(),
            pg_port: n.port,
            api_port,
            config,
            data_dir: n.data.clone(),
            proc: None,
        });
    }
    env.patroni = Some(Patroni { scope: SCOPE.to_owned(), dir, members });
    let spawn = |p: &mut Patroni, name: &str| {
        let log = p.dir.path().join(format!("{name}.log"));
        let m = p.member_mut(name);
        let mut cmd = Command::new(&patroni_bin);
        cmd.arg(&m.config);
        m.proc = Some(Proc::spawn(name, cmd, &log, true));
    };
    // Started on a replica first, Patroni refuses (no initialize key, PostgreSQL in recovery)
    // and exits, leaving PostgreSQL running: the order cannot be got wrong silently.
    spawn(env.patroni.as_mut().unwrap(), "pg2");
    {
        let m = env.patroni.as_mut().unwrap().member_mut("pg2");
        let mut proc = m.proc.take().unwrap();
        let status = wait_for("Patroni on the replica pg2 to refuse to start first", Duration::from_secs(30), || {
            proc.child.try_wait().ok().flatten()
        });
        let log = fs::read_to_string(&proc.log).unwrap_or_default();
        assert!(!status.success(), "{log}");
        assert!(log.contains("Please first start Patroni on the node running as primary"), "{log}");
        // Exited and reaped: nothing left to stop.
        std::mem::forget(proc);
    }
    assert_eq!(env.rm.in_recovery("pg2"), Some(true), "pg2 still runs as a replica");
    step("2. Patroni on the replica pg2 first: refused (\"first start Patroni on the node running as primary\")");
    step("2. Patroni on pg1 (the running primary)");
    spawn(env.patroni.as_mut().unwrap(), "pg1");
    let mut kv = EtcdKv::connect(&env.etcd.endpoint());
    wait_for("Patroni on pg1 to take the leader key", Duration::from_secs(60), || {
        (kv.get(&format!("/service/{SCOPE}/leader")).as_deref() == Some("pg1")).then_some(())
    });
    let init = kv.get(&format!("/service/{SCOPE}/initialize")).expect("the initialize key");
    let (_, sysid, _) = psql(env.rm.node("pg1").port, "SELECT system_identifier FROM pg_control_system()");
    assert_eq!(init, sysid, "Patroni initialized the cluster with the running primary's system id");
    step("2. Patroni on pg2 and pg3 (the running replicas)");
    spawn(env.patroni.as_mut().unwrap(), "pg2");
    spawn(env.patroni.as_mut().unwrap(), "pg3");
    env.patroni.as_ref().unwrap().wait_healthy(Duration::from_secs(90));
    // The replicas follow through Patroni's recovery settings: its slots (named after the
    // members) are the ones in use; repmgr's slots are dropped by Patroni once inactive.
    wait_for("pg2 and pg3 streaming through Patroni's slots", Duration::from_secs(60), || {
        let (ok, out, _) = psql(
            env.rm.node("pg1").port,
            "SELECT string_agg(slot_name || ':' || active, ',' ORDER BY slot_name) FROM pg_replication_slots",
        );
        (ok && out == "pg2:true,pg3:true").then_some(())
    });
    let after = start_times(env);
    assert_eq!(before, after, "Patroni adopted every running instance without restarting it");
    step("2. Patroni leads pg1 with pg2 and pg3 streaming; no postmaster restarted");

    // 3. pgfront from the agents' keys to Patroni's: an edit and a reload.
    step("3. pgfront: source = \"patroni\", SIGHUP");
    fs::write(&env.pf.config, pgfront_config(env.admin, env.rw, env.ro, &env.etcd.endpoint(), "patroni")).unwrap();
    env.pf.proc.signal(libc::SIGHUP);
    wait_for("pgfront to take roles from Patroni's keys", Duration::from_secs(10), || {
        (cluster_status(env)["source"] == "patroni").then_some(())
    });
    env.pf.wait_primary(CLUSTER, "pg1", Duration::from_secs(5));
    wait_for("both replicas routed by Patroni's keys", Duration::from_secs(20), || {
        (routed_replicas(env) == ["pg2", "pg3"]).then_some(())
    });
    assert!(env.pf.log().contains("cluster sources switched: main Agent -> Patroni"), "the reload is logged");

    // 4. The agents stopped (their keys go with their leases), repmgr unregistered and removed.
    step("4. agents stopped");
    for a in &mut env.agents {
        let status = a.signal_and_wait(libc::SIGTERM);
        assert!(status.success(), "agent {} exits cleanly on SIGTERM: {status}", a.name);
    }
    wait_for("the agents' node keys gone", Duration::from_secs(15), || {
        (0..3).all(|i| kv.get(&format!("/service/{SCOPE}/nodes/pg{}", i + 1)).is_none()).then_some(())
    });
    step("4. repmgr standby unregister (pg2, pg3), DROP EXTENSION repmgr");
    for name in ["pg2", "pg3"] {
        let out = env.rm.repmgr(env.rm.node(name), &["standby", "unregister"]);
        eprintln!("$ repmgr standby unregister ({name})\n{out}");
    }
    let (ok, _, err) =
        psql(env.rm.node("pg1").port, "DROP EXTENSION repmgr CASCADE; DROP SCHEMA IF EXISTS repmgr CASCADE");
    assert!(ok, "{err}");
    wait_for("the repmgr schema gone on every node", Duration::from_secs(20), || {
        env.rm
            .nodes
            .iter()
            .all(|n| psql(n.port, "SELECT to_regnamespace('repmgr') IS NULL") == (true, "t".into(), String::new()))
            .then_some(())
    });
    // Writes continue for a while under Patroni alone.
    let rows = |env: &Env| psql(env.rm.node("pg1").port, "SELECT count(*) FROM pgfront_probe").1.parse::<u64>().ok();
    let settled = rows(env).expect("row count");
    wait_for("writes under Patroni alone", Duration::from_secs(10), || (rows(env)? >= settled + 50).then_some(()));
    step("migration done");
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    eprintln!("repmgr -> Patroni migration through pgfront ({:.1} s): {}", t0.elapsed().as_secs_f64(), st.summary());
    for e in &st.errors {
        eprintln!("  {e}");
    }
    assert!(st.ok > 100, "the writer wrote throughout: {}", st.summary());
    assert_eq!(st.connect_failures, 0, "no connection attempt failed during the migration");
    assert_eq!(st.read_only, 0, "no write refused as read-only during the migration");
    assert_eq!(st.broken, 0, "no session broke during the migration");
    let pg1 = env.rm.node("pg1").port;
    assert!(st.writes.iter().all(|w| w.1 == pg1), "every write went to pg1 (no switchover in the migration)");
    let p = env.patroni.as_ref().unwrap();
    let leader = p.leader().expect("a Patroni leader");
    assert_eq!(leader.name, "pg1");
    assert!(!env.pf.log().contains("SPLIT BRAIN"));
    assert_eq!(after, start_times(env), "still no restart after the migration");
    for n in &env.rm.nodes {
        let (_, pending, _) = psql(n.port, "SELECT string_agg(name, ',') FROM pg_settings WHERE pending_restart");
        eprintln!("{}: settings pending a restart: [{pending}]", n.name);
    }

    // Patroni now manages the former repmgr nodes: an explicit switchover (outside the
    // migration) demotes the former repmgr primary and the other replica follows.
    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(90)));
    wait_for("the writer's first writes", Duration::from_secs(10), || (rows(env)? >= settled + 100).then_some(()));
    let t1 = Instant::now();
    let out = p.switchover("pg1", "pg2");
    env.pf.wait_primary(CLUSTER, "pg2", Duration::from_secs(30));
    eprintln!("patronictl switchover pg1 -> pg2 after the migration: pgfront routes to pg2 after {:?}", t1.elapsed());
    p.wait_healthy(Duration::from_secs(60));
    let pg2 = env.rm.node("pg2").port;
    wait_for("writes on pg2", Duration::from_secs(10), || {
        let (ok, out, _) = psql(pg2, "SELECT count(*) > 0 FROM pgfront_probe WHERE at > now() - interval '1 second'");
        (ok && out == "t").then_some(())
    });
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    eprintln!("Patroni switchover through pgfront after the migration: {}", st.summary());
    for e in &st.errors {
        eprintln!("  {e}");
    }
    assert!(out.contains("Successfully switched over"), "{out}");
    assert_eq!(st.connect_failures, 0, "no connection attempt fails during the switchover");
    assert_eq!(st.read_only, 0, "no write reaches a read-only server");
    assert!(st.broken <= 1, "at most the session open on the old primary at shutdown breaks");
    assert_eq!(st.writes.last().unwrap().1, pg2, "writes continue on the new primary");
    assert_eq!(env.rm.in_recovery("pg1"), Some(true), "the former repmgr primary is now a Patroni replica");
    assert!(env.rt.block_on(whoami(env.ro)).unwrap().1, "the replica listener reaches a replica");
}
