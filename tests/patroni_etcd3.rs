//! pgfront in front of a real 3-member Patroni 3.0 cluster (PostgreSQL 15) that keeps its keys
//! in a real etcd 3.4 through the v3 API (Patroni's `etcd3:` section).
//!
//! One cluster is shared by the scenarios below, which run in order because each leaves the
//! cluster in the state the next one starts from: routing, replicas (leastconn, maxconn,
//! queueing, queue timeout), cancel requests through the replica listener, a hung primary
//! postmaster, a second pgfront with 256 file descriptors under a storm of clients, etcd
//! paused, planned switchover under writes, then two failovers.

mod common;

use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// A primary listener with a short queue timeout (3 s) and connect timeout (500 ms).
    rw_short: u16,
}

fn setup() -> Env {
    let rt = runtime();
    let etcd = Etcd::start();
    let pg = Patroni::start(&etcd, "pgfront-v3", Dcs::Etcd3);
    let (rw, ro, rw_short, admin) = (free_port(), free_port(), free_port(), free_port());
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

[[listener]]
name = "rw_short"
cluster = "{CLUSTER}"
bind = "127.0.0.1:{rw_short}"
role = "primary"
queue_timeout = "3s"
connect_timeout = "500ms"
"#,
        etcd = etcd.endpoint()
    );
    let pf = Pgfront::start(&config, admin);
    Env { rt, etcd, pg, pf, rw, ro, rw_short }
}

#[test]
fn pgfront_follows_patroni_over_etcd_v3() {
    let mut env = setup();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        routes_to_the_leader(&env);
        replicas_leastconn_maxconn_and_queue(&env);
        cancel_through_the_replica_listener(&env);
        hung_primary_postmaster(&env);
        fd_exhaustion(&env);
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

/// Defect 8: a cancel request arrives on a new connection, which leastconn would send to the
/// other replica (the one without the session). pgfront learns each session's key and sends
/// the cancel to the server that issued it.
fn cancel_through_the_replica_listener(env: &Env) {
    wait_for("two eligible replicas on the ro listener", Duration::from_secs(30), || {
        let s = env.pf.status()?;
        let ro = s["listeners"].as_array()?.iter().find(|l| l["name"] == "ro")?.clone();
        (ro["servers"].as_array()?.iter().filter(|s| s["state"] == "eligible").count() == 2).then_some(())
    });
    let routed_before = env.pf.metric("pgfront_cancel_requests_total{listener=\"ro\",route=\"known_key\"}");
    let mut slowest = Duration::ZERO;
    let mut ports = std::collections::BTreeSet::new();
    env.rt.block_on(async {
        for i in 0..20 {
            let c = pg_connect(env.ro).await.unwrap();
            let port = c.query_one("SELECT inet_server_port()", &[]).await.unwrap().get::<_, i32>(0) as u16;
            ports.insert(port);
            let token = c.cancel_token();
            let query = tokio::spawn(async move {
                let r = c.simple_query("SELECT pg_sleep(30)").await;
                (r.map(|_| ()), Instant::now())
            });
            // Cancel only once the query runs (a cancel reaching an idle session does nothing).
            let direct = pg_connect(port).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let n: i64 = direct
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if n == 1 {
                    break;
                }
                assert!(Instant::now() < deadline, "round {i}: the query never started");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let sent = Instant::now();
            token.cancel_query(tokio_postgres::NoTls).await.expect("the cancel request is accepted by pgfront");
            let (r, ended) = tokio::time::timeout(Duration::from_secs(40), query).await.expect("the query ends").unwrap();
            let e = r.expect_err(&format!("round {i}: the query on port {port} was cancelled"));
            assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "round {i}: {}", pg_err(&e));
            let took = ended.saturating_duration_since(sent);
            assert!(took < Duration::from_secs(10), "round {i}: cancelled promptly, not after the sleep ({took:?})");
            slowest = slowest.max(took);
        }
    });
    let routed = env.pf.metric("pgfront_cancel_requests_total{listener=\"ro\",route=\"known_key\"}") - routed_before;
    assert_eq!(routed, 20.0, "every cancel went straight to its session's server");
    assert_eq!(ports.len(), 2, "sessions ran on both replicas: {ports:?}");
    eprintln!("cancel through the replica listener: 20/20 cancelled (57014), slowest {slowest:?} after the request");
}

/// The primary's postmaster SIGSTOPped: its kernel still completes TCP handshakes, but nothing
/// answers. A new client must not be piped to it: pgfront treats the missing answer as a failed
/// connect and holds or refuses the client as documented; other listeners keep working.
fn hung_primary_postmaster(env: &Env) {
    let l = leader(env);
    env.pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(20));
    let data_dir = &env.pg.member(&l.name).data_dir;
    let pid: i32 = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let open = env.rt.block_on(pg_connect(env.rw)).unwrap();
    let errors_before = env.pf.metric("pgfront_backend_connect_errors_total{listener=\"rw_short\"}");
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t0 = Instant::now();
    let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        env.rt.block_on(async {
            // Held on the 40 s listener: still waiting while the postmaster is stopped.
            let rw = env.rw;
            let held = tokio::spawn(async move {
                let r = whoami(rw).await;
                (r, Instant::now())
            });
            // Refused with 57P03 after the 3 s queue timeout on the short listener, not stuck.
            let r = tokio::time::timeout(Duration::from_secs(20), pg_connect(env.rw_short)).await;
            let refused_after = t0.elapsed();
            let e = r.expect("the client is not stuck on a server that never answers").expect_err("refused");
            assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW), "{}", pg_err(&e));
            // Other listeners and the sessions already open are unaffected.
            let (_, in_recovery) = whoami(env.ro).await.expect("the replica listener works meanwhile");
            assert!(in_recovery);
            open.simple_query("SELECT 1").await.expect("an open session keeps working (its backend runs)");
            assert!(!held.is_finished(), "the client on the primary listener is held while nothing answers");
            (held, refused_after)
        })
    }));
    let stopped = t0.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let (held, refused_after) = seen.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let resumed = Instant::now();
    let (r, served_at) = env.rt.block_on(held).unwrap();
    let (port, in_recovery) = r.expect("the held client is served once the postmaster runs again");
    assert_eq!((port, in_recovery), (l.port, false));
    assert!(served_at >= resumed, "served only after SIGCONT");
    let (port, _) = env.rt.block_on(whoami(env.rw)).unwrap();
    assert_eq!(port, l.port, "normal service after SIGCONT");
    let failed = env.pf.metric("pgfront_backend_connect_errors_total{listener=\"rw_short\"}") - errors_before;
    assert!(failed >= 2.0, "unanswered connects counted as failed and retried: {failed}");
    eprintln!(
        "hung postmaster ({stopped:?} stopped): rw_short client refused 57P03 after {refused_after:?} ({failed} unanswered \
         connects), rw client held and served {:?} after SIGCONT, replica listener unaffected",
        served_at - resumed
    );
}

/// The PostgreSQL outcome of one raw client of the storm.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Served,
    Refused(String),
    /// Connected (the kernel's backlog) but not answered before the release.
    Waiting,
    Failed(String),
}

fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

async fn read_message(s: &mut tokio::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let t = s.read_u8().await?;
    let len = s.read_u32().await? as usize;
    if !(4..=1 << 20).contains(&len) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("length {len}")));
    }
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await?;
    Ok((t, body))
}

/// Connects, starts a session, holds it until `release`; says how far it got.
async fn storm_client(port: u16, release: CancellationToken, served: Arc<AtomicUsize>) -> Seen {
    use tokio::io::AsyncWriteExt;
    let connect = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(("127.0.0.1", port)));
    let mut s = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Seen::Failed(format!("connect: {e}")),
        Err(_) => return Seen::Failed("connect timed out".into()),
    };
    if let Err(e) = s.write_all(&startup_packet("postgres")).await {
        return Seen::Failed(format!("send: {e}"));
    }
    let outcome = tokio::select! {
        r = async {
            loop {
                match read_message(&mut s).await {
                    Ok((b'Z', _)) => return Seen::Served,
                    Ok((b'E', body)) => {
                        let code = body.split(|b| *b == 0).find_map(|f| f.strip_prefix(b"C")).unwrap_or_default();
                        return Seen::Refused(String::from_utf8_lossy(code).into_owned());
                    }
                    Ok(_) => {}
                    Err(e) => return Seen::Failed(format!("read: {e}")),
                }
            }
        } => r,
        _ = release.cancelled() => Seen::Waiting,
    };
    if outcome == Seen::Served {
        served.fetch_add(1, Ordering::Relaxed);
        release.cancelled().await;
        let _ = s.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
    outcome
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A second pgfront on the same cluster, started with RLIMIT_NOFILE 256, and 1000 clients
/// arriving at once on its primary listener: the excess get 53300 or wait in the kernel backlog,
/// pgfront does not spin, its admin endpoint answers, and service recovers when they leave.
fn fd_exhaustion(env: &Env) {
    const CLIENTS: usize = 1000;
    const NOFILE: u64 = 256;
    let l = leader(env);
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::Builder::new().prefix("pgfront-fd-").tempdir().unwrap();
    let config = dir.path().join("pgfront.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[cluster]]\nname = \"{CLUSTER}\"\nscope = \"pgfront-v3\"\n\
             etcd_endpoints = [\"{}\"]\n[[listener]]\nname = \"rw\"\ncluster = \"{CLUSTER}\"\n\
             bind = \"127.0.0.1:{port}\"\nrole = \"primary\"\nqueue_timeout = \"30s\"\n",
            env.etcd.endpoint()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgfront"));
    cmd.args(["proxy", "-c", config.to_str().unwrap()]).env("RUST_LOG", "info");
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: NOFILE, rlim_max: NOFILE };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let proc = Proc::spawn("pgfront-nofile", cmd, &dir.path().join("pgfront.log"), false);
    let pf = Pgfront { proc, admin, dir, config };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the second pgfront's admin endpoint", Duration::from_secs(10), || pf.status());
        pf.wait_primary(CLUSTER, &l.name, Duration::from_secs(20));
        let pid = pf.proc.pid();
        let release = CancellationToken::new();
        let served = Arc::new(AtomicUsize::new(0));
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        let clients: Vec<_> =
            (0..CLIENTS).map(|_| env.rt.spawn(storm_client(port, release.clone(), served.clone()))).collect();
        wait_for("sessions to be served during the storm", Duration::from_secs(30), || {
            (served.load(Ordering::Relaxed) >= 50).then_some(())
        });
        // The storm goes on for a few seconds, the clients holding what they got; meanwhile
        // the admin endpoint should answer (descriptors are kept for it).
        let window = Instant::now() + Duration::from_secs(3);
        let mut admin_answers = 0;
        while Instant::now() < window {
            admin_answers += usize::from(pf.status().is_some());
            std::thread::sleep(Duration::from_millis(200));
        }
        let active = pf.metric("pgfront_listener_active_connections{listener=\"rw\"}");
        let (cpu, wall) = (cpu_seconds(pid) - cpu0, t0.elapsed().as_secs_f64());
        release.cancel();
        let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
        let mut unexpected = Vec::new();
        for c in clients {
            let s = env.rt.block_on(c).unwrap();
            let key = match &s {
                Seen::Served => "served".to_owned(),
                Seen::Refused(code) if code == "53300" => "refused 53300".to_owned(),
                Seen::Waiting => "waiting (backlog or queue)".to_owned(),
                other => {
                    unexpected.push(other.clone());
                    format!("{other:?}")
                }
            };
            *seen.entry(key).or_default() += 1;
        }
        eprintln!(
            "fd exhaustion (RLIMIT_NOFILE {NOFILE}, {CLIENTS} clients): {seen:?}; {active} sessions open at the end \
             of the storm; pgfront CPU {cpu:.2} s over {wall:.1} s; admin answered {admin_answers} polls"
        );
        assert!(unexpected.is_empty(), "clients saw only a session, 53300 or a wait: {unexpected:?}");
        assert!(cpu < wall, "pgfront does not spin: {cpu:.2} s CPU in {wall:.1} s");
        assert!(admin_answers > 0, "the admin endpoint answers during the storm");
        // Service recovers as soon as the clients leave.
        let t1 = Instant::now();
        let (p, in_recovery) = wait_for("a new session through the second pgfront", Duration::from_secs(30), || {
            env.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), whoami(port)).await.ok()?.ok() })
        });
        assert_eq!((p, in_recovery), (l.port, false));
        eprintln!("fd exhaustion: a new session served {:?} after the clients left", t1.elapsed());
        let log = pf.log();
        assert!(!log.contains("accept failed: out of resources"), "the accept loop never hit EMFILE");
    }));
    if result.is_err() {
        eprintln!("--- second pgfront log (last 40 lines) ---\n{}", pf.proc.log_tail(40));
    }
    drop(pf);
    result.unwrap_or_else(|e| std::panic::resume_unwind(e));
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
    // The session must be on the leader about to be crashed. Patroni may move the leadership
    // meanwhile (seen on a loaded machine: the previous leader's key expired just as this
    // scenario started): then start over with the new leader, three times at most.
    let mut attempt = 0;
    let (old, survivor, session) = loop {
        attempt += 1;
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
        let row = env.rt.block_on(session.query_one("SELECT inet_server_port()", &[])).unwrap();
        let on = row.get::<_, i32>(0) as u16;
        if on == old.port {
            break (old, survivor, session);
        }
        eprintln!("hard failover: the leader moved from {} before the crash (session on port {on}); again", old.name);
        assert!(attempt < 3, "the leader kept moving under the test");
    };
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
