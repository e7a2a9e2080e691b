//! Switchover, pgfront against the incumbents, in one run on one machine: a client writing
//! every 10 ms (a new connection per write) through each route while `patronictl switchover`
//! runs: pgfront; a multi-host connection string with `target_session_attrs=read-write` straight
//! to the members; HAProxy 2.6 as configured in production (`option httpchk OPTIONS /master`,
//! `inter 3s fall 3 rise 2`); HAProxy tuned (`inter 1s fall 1 rise 1 on-marked-down
//! shutdown-sessions`). Each round runs one switchover per route, the routes' order rotating
//! from round to round (the switchovers go back and forth between members); printed per route:
//! the longest write gap as median [min–max] over the rounds, and the failed attempts by kind
//! (connect / read-only / broken) as median [min–max] and in total.
//!
//! Needs root (Patroni runs as postgres) and Debian's etcd-server, patroni, postgresql-15,
//! haproxy. Run: `cargo bench --bench switchover` (5 rounds, about 8 minutes; `BENCH_ROUNDS`
//! to change). Throughput is `benches/datapath.rs`'s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::stats::{env_or, spread, BenchArgs};
use common::*;
use tokio_util::sync::CancellationToken;

fn haproxy(port: u16, pg: &Patroni, tuned: bool, dir: &std::path::Path) -> Proc {
    let bin = require("haproxy", "haproxy");
    let checks =
        if tuned { "inter 1s fall 1 rise 1 on-marked-down shutdown-sessions" } else { "inter 3s fall 3 rise 2" };
    let mut cfg = format!(
        "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 4s\n  timeout client 30m\n  timeout server 30m\n  timeout check 2s\n\
         listen pg_rw\n  bind 127.0.0.1:{port}\n  balance leastconn\n  option httpchk OPTIONS /master\n  http-check expect status 200\n\
         default-server {checks}\n"
    );
    for m in &pg.members {
        cfg.push_str(&format!("  server {} 127.0.0.1:{} maxconn 320 check port {}\n", m.name, m.pg_port, m.api_port));
    }
    let name = if tuned { "haproxy-tuned" } else { "haproxy-prod" };
    let path = dir.join(format!("{name}.cfg"));
    fs::write(&path, cfg).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["-db", "-f", path.to_str().unwrap()]);
    Proc::spawn(name, cmd, &dir.join(format!("{name}.log")), false)
}

/// Server port and recovery state of a fresh connection through `conninfo`.
async fn who(conninfo: &str) -> Option<(u16, bool)> {
    let (c, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(conn);
    let row = c.query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[]).await.ok()?;
    Some((row.get::<_, i32>(0) as u16, row.get(1)))
}

struct Route {
    name: &'static str,
    conninfo: String,
}

fn main() {
    if !BenchArgs::from_env().bench_requested() {
        println!("switchover bench: skipped (run it with `cargo bench --bench switchover`)");
        return;
    }
    let rt = runtime();
    let etcd = Etcd::start();
    let pg = Patroni::start(&etcd, "pgfront-bench", Dcs::Etcd3);
    let work = tempfile::tempdir().unwrap();
    let (pf_port, admin, hp_prod, hp_tuned) = (free_port(), free_port(), free_port(), free_port());
    let pf = Pgfront::start(
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[cluster]]\nname = \"bench\"\nscope = \"pgfront-bench\"\n\
             etcd_endpoints = [\"{}\"]\ncheck_user = \"postgres\"\n[[listener]]\nname = \"rw\"\ncluster = \"bench\"\n\
             bind = \"127.0.0.1:{pf_port}\"\nserver_maxconn = 320\n",
            etcd.endpoint()
        ),
        admin,
    );
    let _hp1 = haproxy(hp_prod, &pg, false, work.path());
    let _hp2 = haproxy(hp_tuned, &pg, true, work.path());
    let l = wait_for("leader", Duration::from_secs(60), || pg.leader());
    pf.wait_primary("bench", &l.name, Duration::from_secs(20));
    let (ok, _, err) = psql(l.port, "CREATE TABLE pgfront_probe (id bigserial, at timestamptz DEFAULT now())");
    assert!(ok, "{err}");

    let hosts = pg.members.iter().map(|_| "127.0.0.1").collect::<Vec<_>>().join(",");
    let ports = pg.members.iter().map(|m| m.pg_port.to_string()).collect::<Vec<_>>().join(",");
    let routes = [
        Route { name: "pgfront", conninfo: conninfo(pf_port) },
        Route {
            name: "multi-host read-write",
            conninfo: format!(
                "host={hosts} port={ports} user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=5"
            ),
        },
        Route { name: "HAProxy production", conninfo: conninfo(hp_prod) },
        Route { name: "HAProxy tuned", conninfo: conninfo(hp_tuned) },
    ];
    let rounds = env_or::<u64>("BENCH_ROUNDS", 5);
    let mut results: Vec<(&str, WriteStats)> = Vec::new();
    for round in 0..rounds as usize {
        for i in 0..routes.len() {
            let r = &routes[(i + round) % routes.len()];
            pg.wait_healthy(Duration::from_secs(60));
            let old = wait_for("leader", Duration::from_secs(60), || pg.leader());
            // Every route must reach the current leader before the switchover.
            wait_for(&format!("{} to reach {}", r.name, old.name), Duration::from_secs(60), || {
                rt.block_on(who(&r.conninfo)).filter(|w| *w == (old.port, false))
            });
            let new = pg.cluster().unwrap().into_iter().find(|m| m.role == "replica").unwrap();
            pg.wait_replicated(new.port, "pgfront_probe");
            let stop = CancellationToken::new();
            let writer = rt.spawn(write_loop(
                r.conninfo.clone(),
                Duration::from_millis(10),
                stop.clone(),
                Duration::from_secs(120),
            ));
            std::thread::sleep(Duration::from_secs(2));
            let t0 = Instant::now();
            pg.switchover(&old.name, &new.name);
            let patronictl = t0.elapsed();
            wait_for(&format!("{} to reach the new primary", r.name), Duration::from_secs(90), || {
                rt.block_on(who(&r.conninfo)).filter(|w| *w == (new.port, false))
            });
            std::thread::sleep(Duration::from_secs(2));
            stop.cancel();
            let st = rt.block_on(writer).unwrap();
            println!(
                "round {round} {:<22} {} -> {}: {} (patronictl took {:.2} s)",
                r.name,
                old.name,
                new.name,
                st.summary(),
                patronictl.as_secs_f64()
            );
            results.push((r.name, st));
        }
    }

    println!("\n== switchover: a client writing every 10 ms, one connection per write, {rounds} rounds");
    println!(
        "{:<24} {:>22} {:>14} {:>14} {:>14}   total failed (connect / read-only / broken)",
        "route", "longest gap, s", "connect", "read-only", "broken"
    );
    for r in &routes {
        let of = |f: &dyn Fn(&WriteStats) -> f64| -> Vec<f64> {
            results.iter().filter(|(n, _)| *n == r.name).map(|(_, st)| f(st)).collect()
        };
        let gaps = of(&|st| st.max_gap.as_secs_f64());
        let (c, ro, b) =
            (of(&|st| st.connect_failures as f64), of(&|st| st.read_only as f64), of(&|st| st.broken as f64));
        println!(
            "{:<24} {:>22} {:>14} {:>14} {:>14}   {} / {} / {}",
            r.name,
            spread(&gaps, 2),
            spread(&c, 0),
            spread(&ro, 0),
            spread(&b, 0),
            c.iter().sum::<f64>(),
            ro.iter().sum::<f64>(),
            b.iter().sum::<f64>()
        );
    }
    drop(pf);
}
