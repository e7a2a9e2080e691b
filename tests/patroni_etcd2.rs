//! pgfront following Patroni 3.0 through etcd's v2 API (Patroni's `etcd:` section; etcd 3.4
//! run with --enable-v2=true): routing to the leader, and a planned switchover under writes.

mod common;

use std::time::Duration;

use common::*;
use tokio_util::sync::CancellationToken;

#[test]
fn pgfront_follows_patroni_over_etcd_v2() {
    let rt = runtime();
    let etcd = Etcd::start();
    let pg = Patroni::start(&etcd, "pgfront-v2", Dcs::Etcd2);
    let (rw, admin) = (free_port(), free_port());
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[[cluster]]
name = "legacy"
scope = "pgfront-v2"
etcd_endpoints = ["{}"]
etcd_api = "v2"
check_user = "postgres"

[[listener]]
name = "rw"
cluster = "legacy"
bind = "127.0.0.1:{rw}"
"#,
        etcd.endpoint()
    );
    let pf = Pgfront::start(&config, admin);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Patroni's keys are only in the v2 store: the v3 API would see none.
        let l = wait_for("a Patroni leader", Duration::from_secs(60), || pg.leader());
        pf.wait_primary("legacy", &l.name, Duration::from_secs(20));
        let (port, rec) = rt.block_on(whoami(rw)).unwrap();
        assert_eq!((port, rec), (l.port, false));
        let (ok, _, err) = psql(rw, "CREATE TABLE pgfront_probe (id bigserial, at timestamptz DEFAULT now())");
        assert!(ok, "{err}");

        let new = pg.cluster().unwrap().into_iter().find(|m| m.role == "replica").unwrap();
        pg.wait_replicated(new.port, "pgfront_probe");
        let stop = CancellationToken::new();
        let writer =
            rt.spawn(write_loop(conninfo(rw), Duration::from_millis(10), stop.clone(), Duration::from_secs(60)));
        std::thread::sleep(Duration::from_secs(1));
        pg.switchover(&l.name, &new.name);
        pf.wait_primary("legacy", &new.name, Duration::from_secs(30));
        std::thread::sleep(Duration::from_secs(1));
        stop.cancel();
        let st = rt.block_on(writer).unwrap();
        eprintln!("switchover through pgfront (etcd v2): {}", st.summary());
        for e in &st.errors {
            eprintln!("  {e}");
        }
        assert_eq!(st.connect_failures, 0);
        assert_eq!(st.read_only, 0);
        assert_eq!(st.writes.last().unwrap().1, new.port);
    }));
    if let Err(e) = result {
        eprintln!("--- pgfront log ---\n{}", pf.proc.log_tail(60));
        eprintln!("{}", pg.log_tails(40));
        std::panic::resume_unwind(e);
    }
}
