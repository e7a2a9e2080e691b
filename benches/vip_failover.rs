//! VIP failover time, from the failure to the client being served by the new holder, as the
//! median of several runs: keepalived pair, pgfront pair, and a mixed pair (keepalived holds,
//! pgfront takes over), at VRRPv2 1 s and VRRPv3 100 ms, for SIGKILL of the holder (whole
//! process group), its link going down, and a clean stop. All inside network namespaces
//! (tests/common/netns.rs); needs root, iproute2 and keepalived.
//!
//! Run: `cargo bench --bench vip_failover` (BENCH_RUNS, default 5).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::netns::*;
use common::stats::{env_or, median, BenchArgs};
use common::Proc;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pair {
    Keepalived,
    Pgfront,
    /// keepalived holds the VIP, pgfront is the backup that takes over.
    Mixed,
    /// pgfront's etcd-lease election (lease_ttl 3 s; etcd in the client namespace).
    EtcdLease,
}

#[derive(Clone, Copy, Debug)]
enum Failure {
    Kill,
    LinkDown,
    CleanStop,
}

struct Host {
    vrrp: Proc,
    /// pgfront without a VIP, so the client can ask who answers (keepalived hosts only).
    _proxy: Option<Proc>,
}

fn start(seg: &Segment, dir: &std::path::Path, n: &str, keepalived: bool, priority: u8, v3: bool) -> Host {
    if keepalived {
        let proxy = start_pgfront(seg, dir, n, None);
        let vrrp = start_keepalived(seg, dir, n, priority, if v3 { 3 } else { 2 }, if v3 { "0.1" } else { "1" });
        Host { vrrp, _proxy: Some(proxy) }
    } else {
        let v = Vrrp {
            priority,
            version: if v3 { 3 } else { 2 },
            interval: if v3 { "100ms" } else { "1s" },
            preempt: true,
        };
        Host { vrrp: start_pgfront(seg, dir, n, Some(&v)), _proxy: None }
    }
}

fn one_run(seg: &Segment, dir: &std::path::Path, pair: Pair, v3: bool, failure: Failure) -> Duration {
    let (mut lb1, lb2) = if pair == Pair::EtcdLease {
        let lb1 = Host { vrrp: start_lease_host(seg, dir, "lb1"), _proxy: None };
        wait_holder(seg, "lb1", "lb2", Duration::from_secs(20));
        (lb1, Host { vrrp: start_lease_host(seg, dir, "lb2"), _proxy: None })
    } else {
        let (ka1, ka2) = match pair {
            Pair::Keepalived => (true, true),
            Pair::Pgfront => (false, false),
            _ => (true, false),
        };
        (start(seg, dir, "lb1", ka1, 150, v3), start(seg, dir, "lb2", ka2, 100, v3))
    };
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_holder(seg, "lb1", "lb2", Duration::from_secs(20))
    })) {
        eprintln!("--- lb1 ---\n{}\n--- lb2 ---\n{}", lb1.vrrp.log_tail(40), lb2.vrrp.log_tail(40));
        std::panic::resume_unwind(e);
    }
    // Let the backup settle on the master's adverts.
    std::thread::sleep(Duration::from_millis(if v3 { 500 } else { 2500 }));
    let t = failover(seg, "lb2", || match failure {
        Failure::Kill => lb1.vrrp.signal_group(libc::SIGKILL),
        Failure::LinkDown => seg.link("lb1", false),
        Failure::CleanStop => lb1.vrrp.signal(libc::SIGTERM),
    });
    seg.link("lb1", true);
    lb1.vrrp.stop(Duration::from_secs(5));
    drop(lb1);
    drop(lb2);
    for n in ["lb1", "lb2"] {
        let _ = std::process::Command::new("ip")
            .args(["-n", &seg.ns(n), "addr", "del", &format!("{VIP}/24"), "dev", "eth0"])
            .output();
    }
    t
}

fn main() {
    if !BenchArgs::from_env().bench_requested() {
        println!("vip_failover bench: skipped (run it with `cargo bench --bench vip_failover`)");
        return;
    }
    let runs: usize = env_or("BENCH_RUNS", 5);
    let seg = Segment::new("bench");
    let dir = tempfile::tempdir().unwrap();
    let _etcd = start_etcd_in(&seg, dir.path());
    let mut rows = Vec::new();
    let only_vrrp = std::env::var("BENCH_ONLY_VRRP").is_ok();
    for failure in [Failure::Kill, Failure::LinkDown, Failure::CleanStop].into_iter().filter(|_| !only_vrrp) {
        let times: Vec<Duration> =
            (0..runs).map(|_| one_run(&seg, dir.path(), Pair::EtcdLease, true, failure)).collect();
        let m = median(&times.iter().map(Duration::as_secs_f64).collect::<Vec<_>>());
        println!(
            "etcd-lease {:<10} median {:>7.3} s  runs {:?}",
            format!("{failure:?}"),
            m,
            times.iter().map(|t| (t.as_secs_f64() * 1000.0).round() / 1000.0).collect::<Vec<_>>()
        );
        rows.push((true, Pair::EtcdLease, failure, m));
    }
    for v3 in [true, false] {
        for pair in [Pair::Keepalived, Pair::Pgfront, Pair::Mixed] {
            for failure in [Failure::Kill, Failure::LinkDown, Failure::CleanStop] {
                let times: Vec<Duration> = (0..runs).map(|_| one_run(&seg, dir.path(), pair, v3, failure)).collect();
                let m = median(&times.iter().map(Duration::as_secs_f64).collect::<Vec<_>>());
                println!(
                    "{:<4} {:<11} {:<10} median {:>7.3} s  runs {:?}",
                    if v3 { "v3" } else { "v2" },
                    format!("{pair:?}"),
                    format!("{failure:?}"),
                    m,
                    times.iter().map(|t| (t.as_secs_f64() * 1000.0).round() / 1000.0).collect::<Vec<_>>()
                );
                rows.push((v3, pair, failure, m));
            }
        }
    }
    println!("\n== VIP failover: failure -> client served by the new holder, median of {runs}");
    println!("{:<22} {:<10} {:>12} {:>12} {:>12}", "advert", "failure", "keepalived", "pgfront", "mixed");
    for v3 in [false, true] {
        for failure in [Failure::Kill, Failure::LinkDown, Failure::CleanStop] {
            let get = |p: Pair| {
                rows.iter().find(|r| r.0 == v3 && r.1 == p && format!("{:?}", r.2) == format!("{failure:?}")).unwrap().3
            };
            println!(
                "{:<22} {:<10} {:>10.3} s {:>10.3} s {:>10.3} s",
                if v3 { "100 ms (VRRPv3)" } else { "1 s (VRRPv2)" },
                format!("{failure:?}"),
                get(Pair::Keepalived),
                get(Pair::Pgfront),
                get(Pair::Mixed)
            );
        }
    }
    for failure in [Failure::Kill, Failure::LinkDown, Failure::CleanStop] {
        let m =
            rows.iter().find(|r| r.1 == Pair::EtcdLease && format!("{:?}", r.2) == format!("{failure:?}")).unwrap().3;
        println!(
            "{:<22} {:<10} {:>10.3} s (pgfront, etcd lease, lease_ttl 3 s)",
            "etcd lease",
            format!("{failure:?}"),
            m
        );
    }
}
