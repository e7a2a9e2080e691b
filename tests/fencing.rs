//! Fencing before promotion with a real Patroni 3.0 cluster: every member runs
//! `pgfront agent pre-promote` as Patroni's `pre_promote` command, and a pgfront proxy (Patroni's
//! keys) acknowledges the fence after closing its sessions to the old primary.
//!
//! Scenarios, in order on one cluster: a switchover under writes completes with the proxy's
//! acknowledgement (the time the fence adds is printed from Patroni's log), then a registered
//! proxy that never answers makes `pre-promote` refuse the promotion (`on_timeout = "refuse"`)
//! until its registration expires.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::agent::{Agent, EtcdKv};
use common::*;
use tokio_util::sync::CancellationToken;

const CLUSTER: &str = "main";
const SCOPE: &str = "pgfront-fence";

struct Env {
    rt: tokio::runtime::Runtime,
    etcd: Etcd,
    pg: Patroni,
    _agents: Vec<Agent>,
    pf: Pgfront,
    rw: u16,
}

fn setup() -> Env {
    let rt = runtime();
    let etcd = Etcd::start();
    let pg = Patroni::start_with_pre_promote(
        &[format!("127.0.0.1:{}", etcd.port)],
        SCOPE,
        Dcs::Etcd3,
        Some("{dir}/pgfront agent pre-promote -c {dir}/{name}-agent.toml"),
    );
    // The binary and the agents' files where Patroni (postgres) can read them; written before
    // any promotion (the first leader bootstraps without pre_promote).
    let bin = pg.dir.path().join("pgfront");
    fs::copy(pgfront_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let agents: Vec<Agent> =
        pg.members.iter().map(|m| Agent::start(&etcd.endpoint(), SCOPE, &m.name, m.pg_port, 10)).collect();
    for a in &agents {
        let conf = pg.dir.path().join(format!("{}-agent.toml", a.name));
        let text =
            fs::read_to_string(&a.config).unwrap() + "\n[pre_promote]\ntimeout = \"5s\"\non_timeout = \"refuse\"\n";
        fs::write(&conf, text).unwrap();
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (rw, admin) = (free_port(), free_port());
    let config = cluster_config(admin, CLUSTER, SCOPE, &etcd.endpoint(), "check_user = \"postgres\"")
        + &listener_config(CLUSTER, "rw", rw, "primary", "90s");
    let pf = Pgfront::start(&config, admin);
    Env { rt, etcd, pg, _agents: agents, pf, rw }
}

#[test]
fn patroni_pre_promote_fences_the_proxies() {
    let env = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        switchover_with_fencing(&env);
        silent_proxy_refuses_the_promotion(&env);
        stopped_proxy_revokes_its_registration(&env);
    }));
    if let Err(panic) = result {
        eprintln!("--- pgfront log (last 60 lines) ---\n{}", env.pf.proc.log_tail(60));
        eprintln!("{}", env.pg.log_tails(40));
        std::panic::resume_unwind(panic);
    }
}

fn proxy_id(env: &Env) -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_owned();
    format!("{host}-{}", env.pf.proc.pid())
}

fn patroni_logs(env: &Env) -> String {
    env.pg
        .members
        .iter()
        .map(|m| fs::read_to_string(env.pg.dir.path().join(format!("{}.log", m.name))).unwrap_or_default())
        .collect()
}

fn switchover_with_fencing(env: &Env) {
    let old = env.pg.leader().expect("a leader");
    env.pf.wait_primary(CLUSTER, &old.name, Duration::from_secs(30));
    let mut kv = EtcdKv::connect(&env.etcd.endpoint());
    let me = proxy_id(env);
    wait_for("the proxy's registration", Duration::from_secs(10), || kv.get(&format!("/service/{SCOPE}/proxies/{me}")));
    let (ok, _, err) = psql(old.port, "CREATE TABLE pgfront_probe (id bigserial PRIMARY KEY)");
    assert!(ok, "{err}");
    let new = env.pg.cluster().unwrap().into_iter().find(|m| m.role == "replica").unwrap();
    env.pg.wait_replicated(new.port, "pgfront_probe");
    let stop = CancellationToken::new();
    let writer =
        env.rt.spawn(write_loop(conninfo(env.rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(120)));
    std::thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    env.pg.switchover(&old.name, &new.name);
    env.pf.wait_primary(CLUSTER, &new.name, Duration::from_secs(30));
    eprintln!(
        "Patroni switchover {} -> {} with pre_promote fencing: pgfront routes to the new primary after {:?}",
        old.name,
        new.name,
        t0.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.cancel();
    let st = env.rt.block_on(writer).unwrap();
    eprintln!("switchover through pgfront with fencing: {}", st.summary());
    for e in &st.errors {
        eprintln!("  {e}");
    }
    let logs = patroni_logs(env);
    let line = logs
        .lines()
        .find(|l| l.contains("acknowledged by every proxy"))
        .unwrap_or_else(|| panic!("pre-promote ran and every proxy acknowledged:\n{}", env.pg.log_tails(30)));
    eprintln!("pre_promote: {line}");
    assert!(line.contains(&me), "{line}");
    let ack = kv.get_json(&format!("/service/{SCOPE}/fence-ack/{me}")).expect("the ack is there while the fence holds");
    assert!(ack["id"].is_string());
    assert_eq!(st.connect_failures, 0, "no connection attempt fails");
    assert_eq!(st.read_only, 0, "no write reaches a read-only server");
    assert!(env.pf.log().contains("fencing request acknowledged"));
}

fn silent_proxy_refuses_the_promotion(env: &Env) {
    env.pg.wait_healthy(Duration::from_secs(60));
    let old = env.pg.leader().expect("a leader");
    env.pf.wait_primary(CLUSTER, &old.name, Duration::from_secs(30));
    let mut kv = EtcdKv::connect(&env.etcd.endpoint());
    // A proxy that registered and then hangs: it never acknowledges.
    let ghost = kv.put_leased(
        &format!("/service/{SCOPE}/proxies/ghost-1"),
        r#"{"id":"ghost-1","host":"ghost","pid":1,"admin":null}"#,
        120,
    );
    let candidate = env.pg.cluster().unwrap().into_iter().find(|m| m.role == "replica").unwrap();
    let t0 = Instant::now();
    let r = env.pg.try_switchover(&old.name, &candidate.name);
    eprintln!(
        "switchover with a silent proxy registered ({:?}): {}",
        t0.elapsed(),
        match &r {
            Ok(t) | Err(t) => t.lines().last().unwrap_or(""),
        }
    );
    wait_for("pre-promote to refuse for lack of ghost-1's acknowledgement", Duration::from_secs(60), || {
        patroni_logs(env).contains("ghost-1 did NOT acknowledge").then_some(())
    });
    assert_ne!(
        env.pf.primary(CLUSTER).as_deref(),
        Some(candidate.name.as_str()),
        "the candidate was not promoted while ghost-1 is silent"
    );
    // The silent proxy's registration goes: promotions proceed again.
    kv.revoke(ghost);
    env.pg.wait_healthy(Duration::from_secs(90));
    // Members may take and release the lock a few times (each pre-promote refused until now):
    // wait until pgfront routes to the leader Patroni settles on.
    let leader = wait_for("pgfront to route to Patroni's leader", Duration::from_secs(60), || {
        let l = env.pg.leader()?;
        (env.pf.primary(CLUSTER).as_deref() == Some(l.name.as_str())).then_some(l)
    });
    eprintln!("after ghost-1 went: {} is the primary, {:?} after the switchover request", leader.name, t0.elapsed());
}

/// Review item 6: a stopped proxy revokes its registration at once, so a pre-promote right
/// after a restart does not wait (and refuse) for the old process's id until its TTL.
fn stopped_proxy_revokes_its_registration(env: &Env) {
    let mut kv = EtcdKv::connect(&env.etcd.endpoint());
    let key = format!("/service/{SCOPE}/proxies/{}", proxy_id(env));
    wait_for("the proxy's registration", Duration::from_secs(10), || kv.get(&key));
    env.pf.proc.signal(libc::SIGTERM);
    // Well under the registration's 10 s lease: only a revocation removes it this soon.
    wait_for("the registration revoked on stop", Duration::from_secs(4), || kv.get(&key).is_none().then_some(()));
}
