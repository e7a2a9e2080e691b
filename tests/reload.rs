//! Live reload under load (SIGHUP): a real etcd 3.4 holds Patroni-format keys that point at two TCP
//! echo servers on loopback (a "primary" and a "replica"), pgfront proxies to them, and the test
//! sends 50 SIGHUPs alternating two valid configurations — other limits and balance, a second
//! listener added then removed, a cluster endpoint list changed — and one invalid one, while a
//! bounded client loop opens new connections at ≥ 1000/s and 200 long-lived sessions exchange a
//! message every 100 ms. Nothing may fail: no refused or broken connection, no broken session;
//! the invalid file is rejected with its line and the old configuration keeps running.
//!
//! The backends are echo servers, not PostgreSQL, because what is under test is the proxy's
//! socket handling across reloads; each client speaks first with a real PostgreSQL startup packet
//! so that pgfront's own startup handling is exercised, and the echo answers it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::echo::*;
use common::*;
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "reload";

fn config(admin: u16, etcd: &[String], rw: u16, extra: &str, maxconn: u32, balance: &str) -> String {
    let endpoints: Vec<String> = etcd.iter().map(|e| format!("{e:?}")).collect();
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[[cluster]]
name = "main"
scope = "{SCOPE}"
etcd_endpoints = [{}]
etcd_timeout = "1s"

[[listener]]
name = "rw"
cluster = "main"
bind = "127.0.0.1:{rw}"
role = "primary"
server_maxconn = {maxconn}
balance = "{balance}"
queue_timeout = "20s"
{extra}
"#,
        endpoints.join(", ")
    )
}

fn raise_fd_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < 65536.min(l.rlim_max) {
            l.rlim_cur = 65536.min(l.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

#[test]
fn fifty_reloads_under_load_lose_nothing() {
    // Thousands of sockets in this process and in pgfront (which inherits the limit): the usual
    // soft limit of 1024 would make this a test of EMFILE instead.
    raise_fd_limit();
    let rt = runtime();
    let etcd = Etcd::start();
    let stop = CancellationToken::new();
    // The backends outlive the load: they stop with the test, after every client has finished.
    let backends = CancellationToken::new();
    let _stop_backends = backends.clone().drop_guard();
    let (primary, replica) =
        rt.block_on(async { (echo_server(backends.clone()).await, echo_server(backends.clone()).await) });
    rt.block_on(put_keys(&etcd.endpoint(), SCOPE, primary, replica));

    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let one = vec![etcd.endpoint()];
    // The same etcd under a second name: the cluster's endpoint list changes, its keys do not.
    let two = vec![etcd.endpoint(), etcd.endpoint().replace("127.0.0.1", "localhost")];
    let second = format!(
        "\n[[listener]]\nname = \"ro\"\ncluster = \"main\"\nbind = \"127.0.0.1:{ro}\"\nrole = \"replica\"\nserver_maxconn = 2000\n"
    );
    let config_a = config(admin, &one, rw, "", 2000, "leastconn");
    let config_b = config(admin, &two, rw, &second, 1500, "roundrobin");
    let invalid =
        config(admin, &one, rw, "", 2000, "leastconn").replace("server_maxconn = 2000", "server_maxconn = \"lots\"");
    let invalid_line = invalid.lines().position(|l| l.contains("\"lots\"")).unwrap() + 1;

    let pf = Pgfront::start(&config_a, admin);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("pgfront to route the primary", Duration::from_secs(20), || pf.primary("main").map(|_| ()));
        let revision = |pf: &Pgfront| pf.status().and_then(|s| s["config"]["revision"].as_u64()).unwrap_or(0);
        let start_rev = revision(&pf);

        // Load: 200 long-lived sessions, one message every 100 ms each, and a new connection
        // every millisecond.
        let sessions = Arc::new(Counts::default());
        let long = long_lived(&rt, rw, 200, &stop, &sessions);
        let conns = Arc::new(Counts::default());
        let opener = opener(&rt, rw, &stop, &conns);

        let began = std::time::Instant::now();
        let mut expected = start_rev;
        for i in 0..50 {
            let b = i % 2 == 0;
            std::fs::write(&pf.config, if b { &config_b } else { &config_a }).unwrap();
            pf.proc.signal(libc::SIGHUP);
            expected += 1;
            wait_for(&format!("revision {expected}"), Duration::from_secs(20), || {
                (revision(&pf) >= expected).then_some(())
            });
            // The second listener answers while configuration B runs, and is gone after A.
            let answered = rt.block_on(async { handshake(ro).await.is_ok() });
            assert_eq!(answered, b, "reload {i}: the replica listener should {}answer", if b { "" } else { "not " });
            if i == 24 {
                std::fs::write(&pf.config, &invalid).unwrap();
                let errors_before = pf.metric("pgfront_config_reloads_total{result=\"error\"}");
                pf.proc.signal(libc::SIGHUP);
                wait_for("the invalid configuration to be rejected", Duration::from_secs(20), || {
                    (pf.metric("pgfront_config_reloads_total{result=\"error\"}") > errors_before).then_some(())
                });
                let status = pf.status().unwrap();
                let err = status["config"]["last_error"].as_str().unwrap_or_default().to_owned();
                assert!(err.contains(&format!(":{invalid_line}: ")), "the error names line {invalid_line}: {err}");
                assert!(err.contains("server_maxconn"), "{err}");
                assert_eq!(revision(&pf), expected, "a rejected file does not change the revision");
                // The old configuration (B) still runs: its second listener answers.
                assert!(rt.block_on(async { handshake(ro).await.is_ok() }));
            }
        }
        finish_load(&rt, "50 reloads", began.elapsed(), &stop, opener, long, &conns, &sessions);
        assert!(pf.log().contains("reload"), "a reload line in the log");
    }));
    if let Err(e) = result {
        eprintln!("--- pgfront log (last 80 lines) ---\n{}", pf.proc.log_tail(80));
        std::panic::resume_unwind(e);
    }
}
