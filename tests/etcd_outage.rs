//! etcd unreachable for longer than Patroni's ttl, with a client writing through pgfront every
//! 10 ms. A real etcd 3.4 (SIGSTOPped), a real 3-member Patroni 3.0 cluster (ttl 10 s,
//! retry_timeout 4 s) and pgfront with a check user.
//!
//! 1. `failsafe_mode` off: Patroni demotes its primary once it cannot reach etcd. pgfront,
//!    checking the primary directly, stops routing to it (check connection lost, then found
//!    read-only): no write may fail as read-only (SQLSTATE 25006). After etcd is back the
//!    cluster elects a leader and pgfront routes to it.
//! 2. `failsafe_mode` on: the primary keeps running; writes through pgfront never fail.
//!
//! One cluster for both, in this order (each scenario leaves it healthy for the next).

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "main";
const SCOPE: &str = "pgfront-outage";
/// Patroni's ttl in `Patroni::start`.
const TTL: Duration = Duration::from_secs(10);
/// How long etcd stays unreachable: longer than the ttl.
const OUTAGE: Duration = Duration::from_secs(15);

struct Env {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
    pg: Patroni,
    pf: Pgfront,
    rw: u16,
}

/// Resumes etcd when dropped, so a failing assertion never leaves it stopped.
struct Paused<'a>(&'a Etcd);

impl<'a> Paused<'a> {
    fn new(etcd: &'a Etcd) -> Self {
        etcd.pause();
        Paused(etcd)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

fn setup() -> Env {
    let rt = runtime();
    let etcd = Etcd::start();
    let pg = Patroni::start(&etcd, SCOPE, Dcs::Etcd3);
    let (rw, admin) = (free_port(), free_port());
    let config = cluster_config(admin, CLUSTER, SCOPE, &etcd.endpoint(), "check_user = \"postgres\"")
        + &listener_config(CLUSTER, "rw", rw, "primary", "90s");
    let pf = Pgfront::start(&config, admin);
    Env { rt, etcd, pg, pf, rw }
}

#[test]
fn etcd_outage_longer_than_patroni_ttl() {
    let env = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let l = leader(&env);
        env.pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(30));
        let (ok, _, err) = psql(env.rw, "CREATE TABLE pgfront_probe (id bigserial, at timestamptz DEFAULT now())");
        assert!(ok, "{err}");
        without_failsafe_the_demoted_primary_is_not_routed(&env);
        with_failsafe_writes_go_on(&env);
    }));
    if let Err(panic) = result {
        eprintln!("--- pgfront log (last 80 lines) ---\n{}", env.pf.proc.log_tail(80));
        eprintln!("{}", env.pg.log_tails(40));
        std::panic::resume_unwind(panic);
    }
}

fn leader(env: &Env) -> ClusterMember {
    wait_for("a Patroni leader", Duration::from_secs(60), || env.pg.leader())
}

fn cluster_status(env: &Env) -> Option<serde_json::Value> {
    let s = env.pf.status()?;
    s["clusters"].as_array()?.iter().find(|c| c["name"] == CLUSTER).cloned()
}

/// `SELECT pg_is_in_recovery()` straight on a member.
fn in_recovery(port: u16) -> Option<bool> {
    let (ok, out, _) = psql(port, "SELECT pg_is_in_recovery()");
    ok.then(|| out == "t")
}

/// Starts the writer and waits until its writes go through pgfront; returns it with its
/// start (the origin of `WriteStats::writes`).
fn start_writer(env: &Env, stop: &CancellationToken) -> (tokio::task::JoinHandle<WriteStats>, Instant) {
    let before = env.pf.metric("pgfront_listener_connections_total{listener=\"rw\"}");
    let start = Instant::now();
    let w =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(180)));
    wait_for("the writer's first connections through pgfront", Duration::from_secs(10), || {
        (env.pf.metric("pgfront_listener_connections_total{listener=\"rw\"}") >= before + 20.0).then_some(())
    });
    (w, start)
}

/// Like `wait_for`, but gives up with `None` after `limit`.
fn poll_until<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn print_stats(what: &str, st: &WriteStats) {
    eprintln!("{what}: {}", st.summary());
    for e in st.errors.iter().take(20) {
        eprintln!("  {e}");
    }
}

fn without_failsafe_the_demoted_primary_is_not_routed(env: &Env) {
    env.pg.wait_healthy(Duration::from_secs(90));
    let old = leader(env);
    env.pf.wait_primary(CLUSTER, &old.name, Duration::from_secs(30));
    let unconfirmed = |env: &Env| {
        env.pf.metric("pgfront_cluster_primary_unconfirmed_total{cluster=\"main\",reason=\"read_only\"}")
            + env.pf.metric("pgfront_cluster_primary_unconfirmed_total{cluster=\"main\",reason=\"check_lost\"}")
    };
    let unconfirmed_before = unconfirmed(env);
    let stop = CancellationToken::new();
    let (writer, _) = start_writer(env, &stop);

    let t0 = Instant::now();
    let paused = Paused::new(&env.etcd);
    wait_for("pgfront to notice etcd is unreachable", Duration::from_secs(10), || {
        (cluster_status(env)?["etcd_up"] == false).then_some(())
    });
    eprintln!("etcd paused; pgfront noticed after {:?}", t0.elapsed());
    // Without failsafe_mode Patroni demotes its primary (after retry_timeout): PostgreSQL is
    // restarted read-only. pgfront must have stopped routing to it.
    wait_for("Patroni to demote its primary", OUTAGE, || (in_recovery(old.port) == Some(true)).then_some(()));
    eprintln!("{} demoted by Patroni {:?} after etcd stopped", old.name, t0.elapsed());
    // What pgfront reported (asserted at the end, after the writer's figures are printed).
    let reported = poll_until(Duration::from_secs(5), || {
        let c = cluster_status(env)?;
        let s = c["primary_status"].as_str()?.to_owned();
        (c["primary"].is_null() && (s == "read_only" || s == "unconfirmed")).then_some(s)
    });
    eprintln!("pgfront reports primary_status {reported:?} {:?} after etcd stopped", t0.elapsed());
    // Stay unreachable past the ttl: the leader key expires.
    std::thread::sleep(OUTAGE.saturating_sub(t0.elapsed()));
    assert!(t0.elapsed() > TTL);
    let routed_at_end = cluster_status(env).and_then(|s| s["primary"].as_str().map(str::to_owned));
    drop(paused);
    let t1 = Instant::now();

    env.pg.wait_healthy(Duration::from_secs(120));
    let new = leader(env);
    env.pf.wait_primary(CLUSTER, &new.name, Duration::from_secs(60));
    eprintln!("etcd resumed; pgfront routes to {} after {:?}", new.name, t1.elapsed());
    // Let the writer see the healed cluster.
    wait_for("a write on the new primary", Duration::from_secs(10), || {
        let (ok, out, _) = psql(new.port, "SELECT count(*) FROM pgfront_probe WHERE at > now() - interval '1 second'");
        (ok && out.parse::<u64>().is_ok_and(|n| n > 0)).then_some(())
    });
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    print_stats("etcd paused > ttl, failsafe_mode off", &st);
    assert_eq!(st.read_only, 0, "no write reached the demoted, read-only primary");
    assert!(reported.is_some(), "pgfront reported the primary unroutable while it was read-only");
    assert_eq!(routed_at_end, None, "no primary routed while it is read-only");
    assert!(unconfirmed(env) > unconfirmed_before, "the metric counted the unroutable primary");
    let log = env.pf.log();
    assert!(
        log.contains("primary found read-only by direct check")
            || log.contains("the primary check has no connection: no new connections"),
        "one log line for the transition"
    );
    let last = st.writes.last().expect("writes succeeded");
    assert_eq!(last.1, new.port, "writes continue on the new primary");
}

fn set_failsafe_mode(env: &Env) {
    let out = std::process::Command::new(require("patronictl", "patroni"))
        .args([
            "-c",
            env.pg.members[0].config.to_str().unwrap(),
            "edit-config",
            "--set",
            "failsafe_mode=true",
            "--force",
        ])
        .env("HOME", "/tmp")
        .output()
        .expect("patronictl");
    assert!(out.status.success(), "patronictl edit-config: {}", String::from_utf8_lossy(&out.stderr));
    wait_for("every member to run with failsafe_mode", Duration::from_secs(30), || {
        env.pg
            .members
            .iter()
            .all(|m| {
                http_get(&format!("http://127.0.0.1:{}/config", m.api_port)).is_some_and(|(s, body)| {
                    s == 200
                        && serde_json::from_str::<serde_json::Value>(&body)
                            .is_ok_and(|v| v["failsafe_mode"] == serde_json::Value::Bool(true))
                })
            })
            .then_some(())
    });
    // The leader publishes the failsafe topology on its next HA loop; every member reads it.
    wait_for("the failsafe topology in etcd", Duration::from_secs(30), || {
        env.pg
            .members
            .iter()
            .all(|m| {
                http_get(&format!("http://127.0.0.1:{}/failsafe", m.api_port))
                    .is_some_and(|(s, body)| s == 200 && env.pg.members.iter().all(|o| body.contains(&o.name)))
            })
            .then_some(())
    });
}

fn with_failsafe_writes_go_on(env: &Env) {
    env.pg.wait_healthy(Duration::from_secs(90));
    set_failsafe_mode(env);
    let l = leader(env);
    env.pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(30));
    let stop = CancellationToken::new();
    let (writer, started) = start_writer(env, &stop);

    let t0 = Instant::now();
    let paused = Paused::new(&env.etcd);
    wait_for("pgfront to notice etcd is unreachable", Duration::from_secs(10), || {
        (cluster_status(env)?["etcd_up"] == false).then_some(())
    });
    eprintln!("etcd paused; pgfront noticed after {:?}", t0.elapsed());
    std::thread::sleep(OUTAGE.saturating_sub(t0.elapsed()));
    assert!(t0.elapsed() > TTL);
    assert_eq!(in_recovery(l.port), Some(false), "with failsafe_mode the primary still runs as primary");
    let s = cluster_status(env).unwrap();
    assert_eq!(s["primary"].as_str(), Some(l.name.as_str()), "still routed: {s}");
    drop(paused);
    let t1 = Instant::now();

    wait_for("pgfront to read etcd again", Duration::from_secs(30), || {
        (cluster_status(env)?["etcd_up"] == true).then_some(())
    });
    env.pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(30));
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    print_stats("etcd paused > ttl, failsafe_mode on", &st);
    assert_eq!(st.failed(), 0, "no write fails while the failsafe primary runs");
    assert!(st.writes.iter().all(|w| w.1 == l.port));
    let during = st.writes.iter().filter(|w| started + w.0 > t0 + TTL && started + w.0 < t1).count();
    eprintln!("{during} writes succeeded between the ttl and the end of the outage");
    assert!(during > 0, "writes went on through the outage");
}
