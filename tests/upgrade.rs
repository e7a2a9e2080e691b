//! Binary upgrade under load (SIGUSR2): pgfront starts its own executable again and hands it the
//! listening sockets; the old process stops accepting once the new one is ready and lets its
//! sessions finish. Ten upgrades in a row while a bounded client loop opens a new connection
//! every millisecond and 200 long-lived sessions exchange a message every 100 ms: no refused or
//! broken connection, no broken session; every old process exits once its sessions have ended,
//! or at `drain_timeout`; a new binary that cannot start leaves the old one serving.
//!
//! Backends are echo servers behind Patroni-format keys in a real etcd (see `common::echo`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::echo::*;
use common::*;
use tokio_util::sync::CancellationToken;

const SCOPE: &str = "upgrade";

fn config(admin: u16, etcd: &str, rw: u16, drain_timeout: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[process]
drain_timeout = "{drain_timeout}"
upgrade_timeout = "20s"

[[cluster]]
name = "main"
scope = "{SCOPE}"
etcd_endpoints = ["{etcd}"]

[[listener]]
name = "rw"
cluster = "main"
bind = "127.0.0.1:{rw}"
role = "primary"
queue_timeout = "20s"
"#
    )
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn ten_upgrades_under_load_lose_nothing() {
    raise_fd_limit();
    let rt = runtime();
    let etcd = Etcd::start();
    let backends = CancellationToken::new();
    let _stop_backends = backends.clone().drop_guard();
    let (primary, replica) =
        rt.block_on(async { (echo_server(backends.clone()).await, echo_server(backends.clone()).await) });
    rt.block_on(put_keys(&etcd.endpoint(), SCOPE, primary, replica));
    let (admin, rw) = (free_port(), free_port());
    let pf = Pgfront::start(&config(admin, &etcd.endpoint(), rw, "30s"), admin);
    let pid = |pf: &Pgfront| pf.status().and_then(|s| s["pid"].as_u64()).map(|p| p as u32);

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("pgfront to route the primary", Duration::from_secs(20), || pf.primary("main").map(|_| ()));
        let stop = CancellationToken::new();
        let sessions = Arc::new(Counts::default());
        let long = long_lived(&rt, rw, 200, &stop, &sessions);
        let conns = Arc::new(Counts::default());
        let opener = opener(&rt, rw, &stop, &conns);

        let began = std::time::Instant::now();
        let mut old = Vec::new();
        let mut current = pid(&pf).expect("pid in /status");
        for i in 0..10 {
            // SIGUSR2 to the process that serves now: the first is our child, the others are
            // successors (same process group, stopped by the guard).
            unsafe { libc::kill(current as i32, libc::SIGUSR2) };
            let next = wait_for(&format!("upgrade {i}: a new pid in /status"), Duration::from_secs(30), || {
                pid(&pf).filter(|p| *p != current)
            });
            old.push(current);
            current = next;
            // Let the load run on the new process for a moment.
            std::thread::sleep(Duration::from_millis(300));
        }
        finish_load(&rt, "10 upgrades", began.elapsed(), &stop, opener, long, &conns, &sessions);
        // Every old process exits once its sessions have ended (long before drain_timeout).
        for p in &old {
            wait_for(&format!("old process {p} to exit"), Duration::from_secs(20), || (!alive(*p)).then_some(()));
        }
        assert!(alive(current), "the newest process serves");

        // A new binary that cannot start (its configuration is now invalid) leaves this one
        // serving, and says why.
        std::fs::write(&pf.config, "this is not TOML").unwrap();
        let log_before = pf.log().len();
        unsafe { libc::kill(current as i32, libc::SIGUSR2) };
        wait_for("the failed upgrade to be logged", Duration::from_secs(30), || {
            pf.log()[log_before..].contains("upgrade failed").then_some(())
        });
        assert_eq!(pid(&pf), Some(current), "the old process still serves");
        rt.block_on(async { handshake(rw).await }).expect("still served after a failed upgrade");

        // drain_timeout bounds the old process: a session left open is closed at the deadline.
        std::fs::write(&pf.config, config(admin, &etcd.endpoint(), rw, "1s")).unwrap();
        unsafe { libc::kill(current as i32, libc::SIGHUP) };
        wait_for("the reload with drain_timeout 1s", Duration::from_secs(10), || {
            (pf.status()?["config"]["revision"].as_u64()? >= 2).then_some(())
        });
        let held = rt.block_on(async { handshake(rw).await }).expect("a session to hold");
        unsafe { libc::kill(current as i32, libc::SIGUSR2) };
        let newest = wait_for("the last upgrade", Duration::from_secs(30), || pid(&pf).filter(|p| *p != current));
        wait_for("the old process to exit at its drain deadline", Duration::from_secs(15), || {
            (!alive(current)).then_some(())
        });
        drop(held);
        assert!(alive(newest));
        let log = pf.log();
        assert_eq!(log.matches("upgrade: the new process is ready").count(), 11, "11 upgrades:\n{log}");
        assert!(
            log.contains("upgrade: sessions still open after 1s: closing them"),
            "the deadline was reached:\n{log}"
        );
        assert_eq!(log.matches("upgrade: old process done").count(), 11, "every old process ended:\n{log}");
    }));
    if let Err(e) = result {
        eprintln!("--- pgfront log (last 80 lines) ---\n{}", pf.proc.log_tail(80));
        std::panic::resume_unwind(e);
    }
}
