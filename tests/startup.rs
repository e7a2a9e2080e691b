//! A backend terminated during its startup is not shown to the client (issue 8: "no failed
//! connection attempt" during a `repmgr standby switchover`).
//!
//! When a primary shuts down for a switchover (repmgr's and Patroni's fast shutdown), it
//! terminates every backend, including those still starting: such a backend has authenticated
//! the client (trust), and the `AuthenticationOk` it queued goes out together with `FATAL 57P01
//! terminating connection due to administrator command`. pgfront reads a startup's answer until
//! the client has to speak (`ReadyForQuery`, or an authentication request), so that answer is a
//! failed connect: the client is placed again and never sees the error.
//!
//! Real PostgreSQL 15 (no Patroni: Patroni-format keys written by the test name it the leader),
//! real etcd. To catch backends in the middle of their startup, a session holds the database
//! `held` locked (`ALTER DATABASE held RENAME` in an open transaction): a new backend for `held`
//! authenticates the client, queues its `AuthenticationOk`, and waits for that lock inside its
//! initialisation. The test sends those backends SIGTERM, which is what `pg_terminate_backend`
//! and a fast shutdown send; each then writes `AuthenticationOk` and `FATAL 57P01` and exits.
//! The lock is released afterwards, and the clients placed again get in. Two clients:
//! tokio-postgres (a plain StartupMessage) and psql (libpq's `sslmode=prefer`: an `SSLRequest`
//! the server declines, then the startup).

mod common;

use std::process::Command;
use std::time::Duration;

use common::echo::put_keys;
use common::*;

const SCOPE: &str = "startup";

fn config(admin: u16, etcd: &str, rw: u16) -> String {
    // connect_timeout: placed again, a client waits for the lock before its server's first answer.
    cluster_config(admin, "main", SCOPE, etcd, "")
        + &listener_config("main", "rw", rw, "primary", "30s")
        + "connect_timeout = \"10s\"\n"
}

/// Client backends of the postmaster `postmaster`: children whose title names a TCP client
/// (`postgres: user db 127.0.0.1(port) …`).
fn client_backends(postmaster: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid …: the comm may hold spaces, so split after its ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(postmaster) && title.contains("127.0.0.1(") {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_backend_terminated_during_its_startup_is_retried_not_shown() {
    let etcd = Etcd::start();
    let pg = Postgres::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(put_keys(&etcd.endpoint(), SCOPE, pg.port, free_port()));
    let (admin, rw) = (free_port(), free_port());
    let pf = Pgfront::start(&config(admin, &etcd.endpoint(), rw), admin);
    pf.wait_primary("main", "pg1", Duration::from_secs(10));
    assert!(client_backends(pg.proc.pid()).is_empty(), "no client yet");

    let (ok, _, err) = psql(pg.port, "CREATE DATABASE held");
    assert!(ok, "CREATE DATABASE: {err}");
    let (locker, locker_pid) = rt.block_on(async {
        let c = pg_connect(pg.port).await.unwrap();
        c.batch_execute("BEGIN; ALTER DATABASE held RENAME TO held_renamed").await.unwrap();
        let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
        (c, pid)
    });

    // tokio-postgres: a plain StartupMessage.
    let plain = rt.spawn(async move {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1").port(rw).user("postgres").dbname("held").connect_timeout(Duration::from_secs(60));
        let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let row = client.query_one("SELECT pg_backend_pid()", &[]).await?;
        Ok::<i32, tokio_postgres::Error>(row.get(0))
    });
    // psql: SSLRequest (declined by the server), then the startup.
    let dir = temp_dir("pgfront-startup-");
    let mut cmd = Command::new(require("psql", "postgresql-client-15"));
    cmd.args(["-h", "127.0.0.1", "-p", &rw.to_string(), "-U", "postgres", "-d", "held", "-Atqc"])
        .arg("SELECT pg_backend_pid()")
        .env("PGSSLMODE", "prefer")
        .env("PGCONNECT_TIMEOUT", "60")
        .current_dir(dir.path());
    let libpq = std::thread::spawn(move || cmd.output().expect("psql"));

    // Both backends wait for the lock inside their startup: terminate them there.
    let starting = wait_for("two client backends waiting in their startup", Duration::from_secs(20), || {
        let b: Vec<i32> = client_backends(pg.proc.pid()).into_iter().filter(|p| *p != locker_pid).collect();
        (b.len() == 2).then_some(b)
    });
    for pid in &starting {
        unsafe {
            libc::kill(*pid, libc::SIGTERM);
        }
    }
    // The clients placed again wait for the lock too; released once both were terminated.
    wait_for("the terminated backends gone", Duration::from_secs(20), || {
        let alive = client_backends(pg.proc.pid());
        starting.iter().all(|p| !alive.contains(p)).then_some(())
    });
    rt.block_on(locker.batch_execute("ROLLBACK")).unwrap();

    let plain = rt.block_on(plain).unwrap();
    let logs = || {
        format!("pgfront:\n{}\nPostgreSQL:\n{}", pf.log(), std::fs::read_to_string(&pg.proc.log).unwrap_or_default())
    };
    let plain_pid = plain.unwrap_or_else(|e| panic!("tokio-postgres is served, never shown 57P01: {e}\n{}", logs()));
    let out = libpq.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "psql is served, never shown 57P01: {stderr}\n{}", logs());
    let psql_pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("psql printed its backend's pid");
    eprintln!("terminated during startup: {starting:?}; served by {plain_pid} and {psql_pid}");
    for pid in [plain_pid, psql_pid] {
        assert!(!starting.contains(&pid), "served by a new backend, not a terminated one");
    }
    // The terminations really happened during startup, and pgfront took them as failed connects.
    let log = std::fs::read_to_string(&pg.proc.log).unwrap_or_default();
    assert!(log.contains("terminating connection due to administrator command"), "PostgreSQL's log:\n{log}");
    let failed = pf.metric(r#"pgfront_backend_connect_errors_total{listener="rw"}"#);
    assert!(failed >= 2.0, "both terminated startups counted as failed connects: {failed}\n{}", logs());
    assert!(!stderr.contains("57P01") && !stderr.contains("terminating"), "{stderr}");
}
