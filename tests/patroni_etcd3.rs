//! pgfront in front of a real 3-member Patroni 3.0 cluster (PostgreSQL 15) that keeps its keys
//! in a real etcd 3.4 through the v3 API (Patroni's `etcd3:` section).
//!
//! One cluster is shared by the scenarios below, which run in order because each leaves the
//! cluster in the state the next one starts from: routing, replicas (leastconn, maxconn,
//! queueing, queue timeout), etcd paused, planned switchover under writes, then two failovers.

mod common;

use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "main";

struct Env {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
    pg: Patroni,
    pf: Pgfront,
    rw: u16,
    ro: u16,
}

fn setup() -> Env {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let etcd = Etcd::start();
    let pg = Patroni::start(&etcd, "pgfront-v3", Dcs::Etcd3);
    let (rw, ro, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[[cluster]]
name = "{CLUSTER}"
scope = "pgfront-v3"
etcd_endpoints = ["{etcd}"]
etcd_timeout = "1s"
check_user = "postgres"

[[listener]]
name = "rw"
cluster = "{CLUSTER}"
bind = "127.0.0.1:{rw}"
role = "primary"
queue_timeout = "40s"

[[listener]]
name = "ro"
cluster = "{CLUSTER}"
bind = "127.0.0.1:{ro}"
role = "replica"
server_maxconn = 2
queue_timeout = "1s"
"#,
        etcd = etcd.endpoint()
    );
    let pf = Pgfront::start(&config, admin);
    Env { rt, etcd, pg, pf, rw, ro }
}

#[test]
fn pgfront_follows_patroni_over_etcd_v3() {
    let mut env = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        routes_to_the_leader(&env);
        replicas_leastconn_maxconn_and_queue(&env);
        etcd_paused_keeps_last_topology(&env);
        switchover_under_writes(&env);
        failover_drains_a_primary_that_still_runs(&mut env);
        hard_failover(&mut env);
    }));
    if result.is_err() {
        eprintln!("--- pgfront log (last 60 lines) ---\n{}", env.pf.proc.log_tail(60));
        eprintln!("{}", env.pg.log_tails(40));
        std::panic::resume_unwind(result.unwrap_err());
    }
}

fn leader(env: &Env) -> ClusterMember {
    wait_for("a Patroni leader", Duration::from_secs(60), || env.pg.leader())
}

fn routes_to_the_leader(env: &Env) {
    let l = leader(env);
    env.pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(20));
    let (port, in_recovery) = env.rt.block_on(whoami(env.rw)).unwrap();
    assert_eq!((port, in_recovery), (l.port, false), "the primary listener reaches the leader");
    let (ok, _, err) = psql(env.rw, "CREATE TABLE pgfront_probe (id bigserial, at timestamptz DEFAULT now())");
    assert!(ok, "{err}");
    eprintln!("routing: primary listener -> {} (port {port})", l.name);
}

fn replicas_leastconn_maxconn_and_queue(env: &Env) {
    let l = leader(env);
    wait_for("two eligible replicas on the ro listener", Duration::from_secs(30), || {
        let s = env.pf.status()?;
        let ro = s["listeners"].as_array()?.iter().find(|l| l["name"] == "ro")?.clone();
        (ro["servers"].as_array()?.iter().filter(|s| s["state"] == "eligible").count() == 2).then_some(())
    });
    let ro = env.ro;
    env.rt.block_on(async {
        // Four sessions over two replicas with leastconn: two each, none on the leader.
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..4 {
            let c = pg_connect(env.ro).await.unwrap();
            let row = c.query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[]).await.unwrap();
            ports.push(row.get::<_, i32>(0) as u16);
            assert!(row.get::<_, bool>(1), "a replica listener session runs on a replica");
            held.push(c);
        }
        ports.sort();
        assert_ne!(ports[0], ports[3]);
        assert_eq!(ports[0], ports[1], "leastconn spreads 2+2: {ports:?}");
        assert_eq!(ports[2], ports[3], "leastconn spreads 2+2: {ports:?}");
        assert!(!ports.contains(&l.port), "no replica session on the leader");

        // A fifth waits in the queue (server_maxconn 2), and gets the slot one session frees.
        let fifth = tokio::spawn(async move {
            let c = pg_connect(ro).await?;
            let row = c.query_one("SELECT inet_server_port()", &[]).await?;
            Ok::<_, tokio_postgres::Error>((c, row.get::<_, i32>(0) as u16))
        });
        wait_for("one queued client", Duration::from_secs(10), || {
            let s = env.pf.status()?;
            (s["listeners"].as_array()?.iter().find(|l| l["name"] == "ro")?["queued"] == 1).then_some(())
        });
        let freed = held.remove(0);
        let freed_port = freed.query_one("SELECT inet_server_port()", &[]).await.unwrap().get::<_, i32>(0) as u16;
        drop(freed);
        let (c5, port5) = fifth.await.unwrap().expect("the queued client is served once a slot frees");
        assert_eq!(port5, freed_port, "the queued client takes the freed slot");
        held.push(c5);

        // All four slots busy: a sixth client times out in the queue (1 s) and psql prints
        // pgfront's PostgreSQL error, not a bare disconnect.
        let (ok, _, err) = tokio::task::spawn_blocking(move || psql(ro, "SELECT 1")).await.unwrap();
        assert!(!ok);
        assert!(err.contains("FATAL:  pgfront: too many connections"), "psql shows the ErrorResponse: {err}");
        eprintln!("queue timeout as psql shows it: {err}");
        drop(held);
    });
    assert_eq!(env.pf.metric("pgfront_listener_refused_total{listener=\"ro\",reason=\"full\"}"), 1.0);
}

fn etcd_paused_keeps_last_topology(env: &Env) {
    let l = leader(env);
    // Patroni demotes its leader after retry_timeout (4 s) without etcd: keep the pause short.
    env.etcd.pause();
    let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("pgfront to notice etcd is unreachable", Duration::from_secs(10), || {
            let s = env.pf.status()?;
            (s["clusters"][0]["etcd_up"] == false).then_some(())
        });
        env.rt.block_on(whoami(env.rw))
    }));
    env.etcd.resume();
    let (port, in_recovery) = seen.unwrap().expect("routing continues while etcd is unreachable");
    assert_eq!((port, in_recovery), (l.port, false));
    wait_for("pgfront to read etcd again", Duration::from_secs(20), || {
        let s = env.pf.status()?;
        (s["clusters"][0]["etcd_up"] == true).then_some(())
    });
    assert!(env.pf.log().contains("etcd unreachable; routing stays on the last known topology"));
    // That updates flow again is shown by the switchover that follows.
}

fn switchover_under_writes(env: &Env) {
    env.pg.wait_healthy(Duration::from_secs(60));
    let old = leader(env);
    let cluster = env.pg.cluster().unwrap();
    let new = cluster.iter().find(|m| m.role == "replica").unwrap().clone();
    env.pg.wait_replicated(new.port, "pgfront_probe");
    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(60)));
    std::thread::sleep(Duration::from_secs(1));
    let t0 = std::time::Instant::now();
    env.pg.switchover(&old.name, &new.name);
    env.pf.wait_primary(CLUSTER, &new.name, Duration::from_secs(30));
    eprintln!(
        "switchover {} -> {}: pgfront routes to the new primary {:?} after patronictl started",
        old.name,
        new.name,
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    eprintln!("switchover through pgfront: {}", st.summary());
    for e in &st.errors {
        eprintln!("  {e}");
    }
    assert_eq!(st.connect_failures, 0, "no connection attempt fails during a switchover");
    assert_eq!(st.read_only, 0, "no write reaches a read-only server");
    assert!(st.broken <= 1, "at most the session open on the old primary at shutdown breaks");
    let last = st.writes.last().unwrap();
    assert_eq!(last.1, new.port, "writes continue on the new primary");
    assert!(st.writes.iter().any(|w| w.1 == old.port), "writes went to the old primary before");
    let log = env.pf.log();
    assert!(log.contains("primary takes no new connections"), "the failover key paused routing");
    assert!(
        log.contains(&format!("old=\"{}\" new={} paused_ms=", old.name, new.name))
            || log.contains(&format!("old={} new={}", old.name, new.name))
    );
}

fn failover_drains_a_primary_that_still_runs(env: &mut Env) {
    env.pg.wait_healthy(Duration::from_secs(60));
    let old = leader(env);
    env.pf.wait_primary(CLUSTER, &old.name, Duration::from_secs(10));
    let session = env.rt.block_on(pg_connect(env.rw)).unwrap();
    // Kill Patroni only: its PostgreSQL keeps running as a writable primary. After the
    // leader key expires another member is promoted; pgfront must close the sessions it still
    // has to the old primary (split brain otherwise) and send new ones to the new leader.
    let m = env.pg.member_mut(&old.name);
    let mut patroni = m.proc.take().unwrap();
    patroni.signal_group(libc::SIGKILL);
    patroni.stop(Duration::from_secs(1));
    let new = wait_for("a new leader after the old one's key expires", Duration::from_secs(60), || {
        env.pg.leader().filter(|l| l.name != old.name)
    });
    env.pf.wait_primary(CLUSTER, &new.name, Duration::from_secs(30));
    let r =
        env.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), session.simple_query("SELECT 1")).await });
    assert!(matches!(r, Ok(Err(_))), "the session on the demoted primary was closed by pgfront: {r:?}");
    let (port, rec) =
        env.rt.block_on(whoami(old.port)).expect("the old PostgreSQL still runs (so pgfront closed the session)");
    assert_eq!((port, rec), (old.port, false));
    let (port, rec) = env.rt.block_on(whoami(env.rw)).unwrap();
    assert_eq!((port, rec), (new.port, false), "new sessions reach the new leader");
    assert!(env.pf.metric("pgfront_drained_connections_total{listener=\"rw\"}") >= 1.0);
    env.pg.member_mut(&old.name).crash();
    eprintln!("failover with the old primary still running: session closed, new sessions on {}", new.name);
}

fn hard_failover(env: &mut Env) {
    let old = leader(env);
    env.pf.wait_primary(CLUSTER, &old.name, Duration::from_secs(10));
    let survivor = env.pg.members.iter().find(|m| m.name != old.name && m.proc.is_some()).unwrap().name.clone();
    wait_for("the survivor to stream from the leader", Duration::from_secs(60), || {
        env.pg
            .cluster()?
            .iter()
            .find(|m| m.name == survivor && (m.state == "streaming" || m.state == "running"))
            .map(|_| ())
    });
    let session = env.rt.block_on(pg_connect(env.rw)).unwrap();
    env.pg.member_mut(&old.name).crash();
    let t0 = std::time::Instant::now();
    // A client that connects right after the crash is held until the new primary is up.
    let held = env.rt.spawn(whoami(env.rw));
    let r =
        env.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), session.simple_query("SELECT 1")).await });
    assert!(matches!(r, Ok(Err(_))), "the session on the dead leader is closed: {r:?}");
    env.pf.wait_primary(CLUSTER, &survivor, Duration::from_secs(60));
    let (port, rec) = env.rt.block_on(held).unwrap().expect("the client held during the failover is served");
    assert_eq!((port, rec), (env.pg.member(&survivor).pg_port, false));
    eprintln!("hard failover: held client served by {survivor} {:?} after the crash", t0.elapsed());
}
