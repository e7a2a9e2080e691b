//! pgfront against faults of a three-member etcd 3.4 cluster (one member per data centre, as in
//! production) under a real 3-member Patroni 3.0 cluster that keeps its keys in it (v3 API).
//!
//! One cluster is shared by the scenarios, which run in order; each one ends with etcd whole
//! again. In each, a client writes through pgfront every 10 ms (a new connection per write)
//! while the fault is injected and a `patronictl switchover` follows it; pgfront must route
//! to the new leader with no failed write:
//! 1. an etcd member pgfront's discovery reads from (a follower) is killed (SIGKILL), then
//!    restarted;
//! 2. a follower it reads from is stopped (SIGSTOP: its TCP connections stay open and nothing
//!    answers, as in a partition), then continued;
//! 3. the whole etcd cluster is re-created empty on the same ports (revisions go back, the
//!    watch revision pgfront had is meaningless); Patroni writes its keys again.
//!
//! pgfront follows etcd through two sessions on two members, so in 1 and 2 it must not even
//! find etcd unreachable: the other session sees the failover key at once.
//!
//! Two pgfront processes follow the same cluster: `pf` with the shipped settings, which the
//! client writes through, and `pf_watch` with a 60 s resync interval, so that only its watch
//! can tell it about a change: a watch stalled on the old cluster shows there.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "main";
const SCOPE: &str = "pgfront-faults";

struct Env {
    rt: tokio::runtime::Runtime,
    etcd: EtcdCluster,
    pg: Patroni,
    pf: Pgfront,
    pf_watch: Pgfront,
    rw: u16,
    /// Scenario outcomes that break pgfront's promise, asserted once all scenarios ran (each
    /// ends with etcd whole again), so that one run reports every scenario.
    failures: Vec<String>,
}

fn pgfront(etcd: &EtcdCluster, extra: &str) -> (Pgfront, u16) {
    let (rw, admin) = (free_port(), free_port());
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("\"{e}\"")).collect();
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[[cluster]]
name = "{CLUSTER}"
scope = "{SCOPE}"
etcd_endpoints = [{endpoints}]
etcd_timeout = "1s"
check_user = "postgres"
{extra}
[[listener]]
name = "rw"
cluster = "{CLUSTER}"
bind = "127.0.0.1:{rw}"
role = "primary"
queue_timeout = "40s"
"#,
        endpoints = endpoints.join(", ")
    );
    (Pgfront::start(&config, admin), rw)
}

fn setup() -> Env {
    let rt = runtime();
    let etcd = EtcdCluster::start();
    let pg = Patroni::start_with_hosts(&etcd.hosts(), SCOPE, Dcs::Etcd3);
    let (pf, rw) = pgfront(&etcd, "");
    let (pf_watch, _) = pgfront(&etcd, "resync_interval = \"60s\"\n");
    Env { rt, etcd, pg, pf, pf_watch, rw, failures: Vec::new() }
}

#[test]
fn pgfront_rides_out_etcd_faults() {
    let mut env = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let l = leader(&env);
        env.pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(20));
        let (ok, _, err) = psql(env.rw, "CREATE TABLE pgfront_probe (id bigserial, at timestamptz DEFAULT now())");
        assert!(ok, "{err}");
        member_killed(&mut env);
        member_stopped(&mut env);
        cluster_recreated(&mut env);
        assert!(env.failures.is_empty(), "failed scenarios:\n{}", env.failures.join("\n"));
    }));
    if let Err(e) = result {
        eprintln!("--- pgfront log (last 80 lines) ---\n{}", env.pf.proc.log_tail(80));
        eprintln!("--- pgfront (watch only) log (last 40 lines) ---\n{}", env.pf_watch.proc.log_tail(40));
        eprintln!("{}", env.pg.log_tails(40));
        for m in &env.etcd.members {
            if let Some(p) = &m.proc {
                eprintln!("--- etcd {} (last 15 lines) ---\n{}", m.name, p.log_tail(15));
            }
        }
        std::panic::resume_unwind(e);
    }
}

fn leader(env: &Env) -> ClusterMember {
    wait_for("a Patroni leader", Duration::from_secs(60), || env.pg.leader())
}

/// The etcd members pgfront (the one the client writes through) has a TCP connection to.
fn connected_members(env: &Env) -> Vec<usize> {
    let mut v: Vec<usize> =
        established_ports(env.pf.proc.pid()).into_iter().filter_map(|p| env.etcd.by_client_port(p)).collect();
    v.dedup();
    v
}

fn names(env: &Env, members: &[usize]) -> String {
    members.iter().map(|&i| env.etcd.members[i].name.as_str()).collect::<Vec<_>>().join(",")
}

/// The etcd members whose sessions give pgfront (the one the client writes through) the keys.
fn followed_members(env: &Env) -> Vec<usize> {
    let status = env.pf.status().unwrap_or_default();
    let sessions = status["clusters"][0]["etcd_sessions"].as_array().cloned().unwrap_or_default();
    let port = |e: &str| e.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse::<u16>().ok());
    sessions.iter().filter_map(|e| e.as_str().and_then(port)).filter_map(|p| env.etcd.by_client_port(p)).collect()
}

/// The member to hurt: one that a discovery session of pgfront reads from and that is not the
/// etcd leader (hurting the leader leaves etcd itself without one for an election, when no
/// session can read: an outage of all of etcd, which `tests/etcd_outage.rs` covers).
fn target(env: &Env) -> usize {
    let v = wait_for("pgfront following etcd through two sessions", Duration::from_secs(10), || {
        Some(followed_members(env)).filter(|v| v.len() == 2)
    });
    let i = wait_for("the etcd leader", Duration::from_secs(10), || {
        v.iter().copied().find(|&i| env.etcd.is_leader(i) == Some(false))
    });
    eprintln!(
        "pgfront follows etcd through {} (connected to {}); etcd leader: {}",
        names(env, &v),
        names(env, &connected_members(env)),
        names(env, &(0..env.etcd.members.len()).filter(|&i| env.etcd.is_leader(i) == Some(true)).collect::<Vec<_>>())
    );
    i
}

/// Rows in pgfront_probe, read on the member listening on `port`.
fn rows(port: u16) -> Option<u64> {
    let (ok, out, _) = psql(port, "SELECT count(*) FROM pgfront_probe");
    ok.then(|| out.parse().ok()).flatten()
}

/// Waits until `n` more rows than now were written on the primary at `port`.
fn wait_writes(port: u16, n: u64) {
    let base = wait_for("the row count", Duration::from_secs(10), || rows(port));
    wait_for(&format!("{n} writes on port {port}"), Duration::from_secs(30), || {
        rows(port).filter(|&c| c >= base + n).map(|_| ())
    });
}

/// Runs a writer through pgfront, injects `fault`, switches over, waits until both pgfront
/// processes route to the new leader and writes land there, then `repair`s. Prints what the
/// client saw and how long after `patronictl switchover` started pgfront routed to the new
/// leader. Returns what pgfront logged meanwhile.
fn switchover_after(env: &mut Env, label: &str, fault: impl FnOnce(&mut Env), repair: impl FnOnce(&mut Env)) -> String {
    env.pg.wait_healthy(Duration::from_secs(60));
    let old = leader(env);
    env.pf.wait_primary(CLUSTER, &old.name, Duration::from_secs(20));
    env.pf_watch.wait_primary(CLUSTER, &old.name, Duration::from_secs(20));
    let new = env.pg.cluster().unwrap().into_iter().find(|m| m.role == "replica").unwrap();
    env.pg.wait_replicated(new.port, "pgfront_probe");
    let (log_from, watch_log_from, pg_logs_from) = (env.pf.log().len(), env.pf_watch.log().len(), env.pg.log_lens());
    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(90)));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_writes(old.port, 20);
        fault(env);
        let t0 = Instant::now();
        eprintln!(
            "{label}: patronictl switchover at {}",
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
        );
        let (_, attempts) = env.pg.switchover_retrying(&old.name, &new.name, Duration::from_secs(60));
        if attempts > 1 {
            eprintln!("{label}: patronictl switchover succeeded at attempt {attempts}");
        }
        env.pf.wait_primary(CLUSTER, &new.name, Duration::from_secs(30));
        let follow = t0.elapsed();
        env.pf_watch.wait_primary(CLUSTER, &new.name, Duration::from_secs(30));
        let follow_watch_only = t0.elapsed();
        wait_writes(new.port, 20);
        (follow, follow_watch_only)
    }));
    stop.cancel();
    let stats = env.rt.block_on(writer).unwrap();
    eprintln!("{label}: {}", stats.summary());
    for e in stats.errors.iter().take(20) {
        eprintln!("  {e}");
    }
    for (who, log, from) in
        [("pgfront", env.pf.log(), log_from), ("pgfront (watch only)", env.pf_watch.log(), watch_log_from)]
    {
        eprintln!("{label}: {who} logged:");
        for l in log.get(from..).unwrap_or_default().lines() {
            eprintln!("  {l}");
        }
    }
    if stats.failed() > 0 {
        eprintln!("{label}: Patroni logged:\n{}", env.pg.logs_since(&pg_logs_from));
    }
    repair(env);
    let (follow, follow_watch_only) = outcome.unwrap_or_else(|e| std::panic::resume_unwind(e));
    eprintln!(
        "{label}: switchover {} -> {}: pgfront routes to the new leader {:.3} s after patronictl started \
         (watch-only pgfront: {:.3} s)",
        old.name,
        new.name,
        follow.as_secs_f64(),
        follow_watch_only.as_secs_f64()
    );
    if stats.failed() > 0 {
        env.failures.push(format!("{label}: {}", stats.summary()));
    }
    assert_eq!(stats.writes.last().map(|w| w.1), Some(new.port), "{label}: writes continue on the new leader");
    env.pf.log().get(log_from..).unwrap_or_default().to_owned()
}

/// The Raft term of etcd, as a member other than `victim` reports it.
fn term(env: &Env, victim: usize) -> Option<u64> {
    (0..env.etcd.members.len()).filter(|&i| i != victim).find_map(|i| env.etcd.raft_term(i))
}

/// One member of the two pgfront reads from was hurt: the other session must have kept etcd
/// reachable for pgfront all along, unless etcd itself held an election meanwhile (its term
/// changed: no member could answer a read until it had a leader again).
fn check_etcd_stayed_up(env: &mut Env, label: &str, log: &str, terms: (Option<u64>, Option<u64>)) {
    let Some(l) = log.lines().find(|l| l.contains("etcd unreachable")) else { return };
    match terms {
        (Some(a), Some(b)) if a == b => {
            env.failures.push(format!("{label}: pgfront found etcd unreachable with one follower hurt: {l}"))
        }
        _ => eprintln!("{label}: etcd elected a leader meanwhile (term {terms:?}): etcd was unreachable for a moment"),
    }
}

fn member_killed(env: &mut Env) {
    let victim = target(env);
    let name = env.etcd.members[victim].name.clone();
    let label = format!("etcd {name} killed");
    let (mut before, mut after) = (None, None);
    let log = switchover_after(
        env,
        &label,
        |env| {
            before = term(env, victim);
            env.etcd.kill(victim);
            eprintln!("etcd {name} killed (SIGKILL)");
        },
        |env| {
            after = term(env, victim);
            eprintln!("after the kill pgfront is connected to etcd {}", names(env, &connected_members(env)));
            env.etcd.restart(victim);
            env.etcd.wait_healthy(Duration::from_secs(30));
        },
    );
    check_etcd_stayed_up(env, &label, &log, (before, after));
}

fn member_stopped(env: &mut Env) {
    let victim = target(env);
    let name = env.etcd.members[victim].name.clone();
    let label = format!("etcd {name} stopped");
    let (mut before, mut after) = (None, None);
    let log = switchover_after(
        env,
        &label,
        |env| {
            before = term(env, victim);
            env.etcd.pause(victim);
            eprintln!("etcd {name} stopped (SIGSTOP)");
        },
        |env| {
            after = term(env, victim);
            eprintln!("while it is stopped pgfront is connected to etcd {}", names(env, &connected_members(env)));
            env.etcd.resume(victim);
            env.etcd.wait_healthy(Duration::from_secs(30));
        },
    );
    check_etcd_stayed_up(env, &label, &log, (before, after));
}

fn cluster_recreated(env: &mut Env) {
    env.pg.wait_healthy(Duration::from_secs(60));
    let before = wait_for("etcd status", Duration::from_secs(10), || env.etcd.status(0));
    let l = leader(env);
    // What a client sees while etcd is gone and comes back empty (reported, not asserted:
    // Patroni itself demotes its leader when it cannot reach etcd for retry_timeout).
    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(120)));
    wait_writes(l.port, 20);
    let t0 = Instant::now();
    env.etcd.recreate();
    env.etcd.wait_healthy(Duration::from_secs(30));
    let etcd_back = t0.elapsed();
    env.pg.wait_healthy(Duration::from_secs(90));
    let patroni_back = t0.elapsed();
    let after = wait_for("etcd status", Duration::from_secs(10), || env.etcd.status(0));
    let l = leader(env);
    env.pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(30));
    env.pf_watch.wait_primary(CLUSTER, &l.name, Duration::from_secs(30));
    wait_writes(l.port, 20);
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    eprintln!(
        "etcd re-created: cluster id {:x} -> {:x}, revision {} -> {}; etcd healthy after {:.1} s, Patroni's \
         cluster after {:.1} s, leader {}",
        before.0,
        after.0,
        before.1,
        after.1,
        etcd_back.as_secs_f64(),
        patroni_back.as_secs_f64(),
        l.name
    );
    eprintln!("etcd re-created (during): {}", st.summary());
    for e in st.errors.iter().take(10) {
        eprintln!("  {e}");
    }
    assert_ne!(before.0, after.0, "a new etcd cluster");
    assert!(after.1 < before.1, "revisions went back ({} -> {})", before.1, after.1);
    // The watches pgfront had are on a cluster that is gone: it must follow the next change.
    switchover_after(env, "after etcd re-created", |_| {}, |_| {});
}
