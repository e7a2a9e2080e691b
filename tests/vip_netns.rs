//! The floating VIP, tested on a private segment built in network namespaces (see
//! tests/common/netns.rs; nothing reaches the host's own interfaces): two pgfront instances
//! elect one holder, a crash or a clean stop moves the VIP and the client follows thanks to
//! the gratuitous ARP, preempt and nopreempt behave, garbage VRRP packets change nothing, and a
//! mixed pair pgfront + keepalived 2.2 elects whichever has the higher priority.

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::*;
use common::*;

fn vip_status(seg: &Segment) -> Option<serde_json::Value> {
    seg.run_in("cli", || {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&format!("{VIP}:{ADMIN}").parse().unwrap(), Duration::from_secs(1))
                .ok()?;
        s.write_all(b"GET /status HTTP/1.0\r\n\r\n").ok()?;
        let mut b = String::new();
        s.read_to_string(&mut b).ok()?;
        serde_json::from_str::<serde_json::Value>(b.split_once("\r\n\r\n")?.1).ok().map(|v| v["vips"][0].clone())
    })
}

#[test]
fn pgfront_pair_elects_moves_and_hands_over() {
    let seg = Segment::new("a");
    let dir = tempfile::tempdir().unwrap();
    let v = |priority, preempt| Vrrp { priority, version: 3, interval: "100ms", preempt };
    let mut lb1 = start_pgfront(&seg, dir.path(), "lb1", Some(&v(150, true)));
    let mut lb2 = start_pgfront(&seg, dir.path(), "lb2", Some(&v(100, true)));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_holder(&seg, "lb1", "lb2", Duration::from_secs(10));

        // Crash of the holder: the whole process dies, its VIP stays configured (as after a
        // real crash); the backup takes over and its gratuitous ARP moves the client.
        let t = failover(&seg, "lb2", || lb1.signal_group(libc::SIGKILL));
        eprintln!("pgfront pair, VRRPv3 100 ms: holder SIGKILLed -> client served by the backup in {t:?}");
        assert!(seg.holds_vip("lb2"));
        assert!(seg.holds_vip("lb1"), "a crash leaves the address behind");
        let out = seg
            .cmd("lb1", env!("CARGO_BIN_EXE_pgfront"))
            .args(["vip", "release", "-c", dir.path().join("lb1.toml").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("removed 198.51.100.10/24 from eth0"));
        assert!(!seg.holds_vip("lb1"), "`pgfront vip release` removed it");

        // Restarted with the higher priority and preempt: it takes the VIP back.
        lb1.stop(Duration::from_secs(1));
        lb1 = start_pgfront(&seg, dir.path(), "lb1", Some(&v(150, true)));
        wait_holder(&seg, "lb1", "lb2", Duration::from_secs(10));

        // Clean stop: a priority-0 advert hands over at once.
        let t = failover(&seg, "lb2", || lb1.signal(libc::SIGTERM));
        eprintln!("pgfront pair, VRRPv3 100 ms: clean stop -> client served by the backup in {t:?}");
        wait_for("lb1 to exit", Duration::from_secs(40), || (!lb1.running()).then_some(()));
        assert!(!seg.holds_vip("lb1"), "a clean stop removes the address");

        // nopreempt: a higher-priority host that joins later leaves the master in place.
        lb1 = start_pgfront(&seg, dir.path(), "lb1", Some(&v(150, false)));
        std::thread::sleep(Duration::from_secs(2));
        assert!(seg.holds_vip("lb2") && !seg.holds_vip("lb1"), "nopreempt keeps the current master");

        // Garbage VRRP packets (random bytes, wrong checksums, wrong TTL) from the client
        // namespace change nothing, and are counted.
        let before = vip_status(&seg).unwrap();
        seg.run_in("cli", || {
            use socket2::{Domain, Protocol, SockAddr, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(112))).unwrap();
            s.set_multicast_ttl_v4(255).unwrap();
            s.set_ttl_v4(255).unwrap();
            let mut x: u64 = 0x9e3779b97f4a7c15;
            for i in 0..500u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = (x % 60) as usize;
                let mut p: Vec<u8> = (0..len).map(|k| (x >> (k % 8 * 8)) as u8 ^ k as u8).collect();
                if i % 3 == 0 && p.len() >= 8 {
                    p[0] = 0x31; // looks like VRRPv3 for vrid…
                    p[1] = 51; // …ours, with a high priority: only the checksum stops it
                    p[2] = 254;
                }
                let dst: std::net::SocketAddr =
                    if i % 2 == 0 { "224.0.0.18:0".parse().unwrap() } else { "198.51.100.12:0".parse().unwrap() };
                let _ = s.send_to(&p, &SockAddr::from(dst));
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        assert!(seg.holds_vip("lb2") && !seg.holds_vip("lb1"), "garbage changed nothing");
        let after = vip_status(&seg).unwrap();
        assert_eq!(after["state"], "master");
        assert_eq!(after["transitions"], before["transitions"]);
        assert!(
            after["bad_packets"].as_u64().unwrap() > before["bad_packets"].as_u64().unwrap(),
            "bad packets are counted: {after}"
        );
        assert!(lb1.running() && lb2.running(), "nobody crashed");
        let metrics = seg.run_in("cli", || http_get(&format!("http://{VIP}:{ADMIN}/metrics"))).unwrap().1;
        assert!(metrics.contains("pgfront_vip_master{vip=\"rw\",address=\"198.51.100.10/24\"} 1"), "{metrics}");
        assert!(metrics.contains("pgfront_vip_bad_packets_total{vip=\"rw\""), "{metrics}");
    }));
    if let Err(e) = result {
        eprintln!("--- lb1 ---\n{}\n--- lb2 ---\n{}", lb1.log_tail(30), lb2.log_tail(30));
        std::panic::resume_unwind(e);
    }
}

#[test]
fn mixed_pair_with_keepalived_elects_the_higher_priority() {
    let seg = Segment::new("b");
    let dir = tempfile::tempdir().unwrap();
    // lb2 runs keepalived for the VIP and pgfront (no VIP) to answer the client.
    let _lb2_proxy = start_pgfront(&seg, dir.path(), "lb2", None);
    let mut ka = start_keepalived(&seg, dir.path(), "lb2", 200, 2, "1");
    let lb1 = start_pgfront(
        &seg,
        dir.path(),
        "lb1",
        Some(&Vrrp { priority: 100, version: 2, interval: "1s", preempt: true }),
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // keepalived has the higher priority: it holds the VIP; pgfront follows as backup.
        wait_holder(&seg, "lb2", "lb1", Duration::from_secs(15));
        std::thread::sleep(Duration::from_secs(3));
        assert!(!seg.holds_vip("lb1"), "pgfront accepts keepalived's adverts (VRRPv2 with auth)");
        // keepalived dies: pgfront takes over.
        let t = failover(&seg, "lb1", || ka.signal_group(libc::SIGKILL));
        eprintln!("mixed pair, VRRPv2 1 s: keepalived SIGKILLed -> pgfront serves the client in {t:?}");
        ka.stop(Duration::from_secs(1));
        let _ = Command::new("ip")
            .args(["-n", &seg.ns("lb2"), "addr", "del", &format!("{VIP}/24"), "dev", "eth0"])
            .output();
        // keepalived comes back with a lower priority: pgfront stays master and keepalived
        // accepts pgfront's adverts.
        ka = start_keepalived(&seg, dir.path(), "lb2", 50, 2, "1");
        std::thread::sleep(Duration::from_secs(5));
        assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"), "keepalived accepts pgfront's adverts as master");
        // pgfront stops cleanly: keepalived takes over at once on the priority-0 advert.
        let t = failover(&seg, "lb2", || lb1.signal(libc::SIGTERM));
        eprintln!("mixed pair, VRRPv2 1 s: pgfront clean stop -> keepalived serves the client in {t:?}");
    }));
    if let Err(e) = result {
        eprintln!("--- lb1 ---\n{}\n--- keepalived ---\n{}", lb1.log_tail(30), ka.log_tail(30));
        std::panic::resume_unwind(e);
    }
}

#[test]
fn unfit_proxy_lowers_its_priority_and_hands_over() {
    let seg = Segment::new("c");
    let dir = tempfile::tempdir().unwrap();
    let v = |priority| Vrrp { priority, version: 3, interval: "100ms", preempt: true };
    // lb1 has the higher priority but no etcd (so no routable primary): after 1 s of that,
    // its priority drops by 100 and lb2, whose ties are off, preempts.
    let lb1 =
        start_pgfront_with(&seg, dir.path(), "lb1", Some(&v(150)), "health_weight = 100\nunhealthy_after = \"1s\"\n");
    let lb2 = start_pgfront(&seg, dir.path(), "lb2", Some(&v(100)));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_holder(&seg, "lb2", "lb1", Duration::from_secs(15));
        let log = std::fs::read_to_string(&lb1.log).unwrap();
        assert!(log.contains("priority lowered"), "{log}");
        assert!(log.contains("from=Master to=Backup"), "lb1 was master before it stood down: {log}");
    }));
    if let Err(e) = result {
        eprintln!("--- lb1 ---\n{}\n--- lb2 ---\n{}", lb1.log_tail(30), lb2.log_tail(30));
        std::panic::resume_unwind(e);
    }
}

#[test]
fn etcd_lease_election_moves_the_vip() {
    let seg = Segment::new("d");
    let dir = tempfile::tempdir().unwrap();
    let _etcd = start_etcd_in(&seg, dir.path());
    let mut lb1 = start_lease_host(&seg, dir.path(), "lb1");
    let mut lb2 = Proc::spawn("placeholder", Command::new("true"), &dir.path().join("none.log"), false);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_holder(&seg, "lb1", "lb2", Duration::from_secs(15));
        lb2 = start_lease_host(&seg, dir.path(), "lb2");
        std::thread::sleep(Duration::from_secs(2));
        assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"), "the first holder keeps the VIP");

        // Holder killed: the other takes over once the lease (3 s) expires.
        let t = failover(&seg, "lb2", || lb1.signal_group(libc::SIGKILL));
        eprintln!("etcd lease 3 s: holder SIGKILLed -> client served by the other host in {t:?}");
        assert!(t >= Duration::from_secs(1), "not before the lease could expire: {t:?}");
        let _ = Command::new("ip")
            .args(["-n", &seg.ns("lb1"), "addr", "del", &format!("{VIP}/24"), "dev", "eth0"])
            .output();
        lb1.stop(Duration::from_secs(1));
        lb1 = start_lease_host(&seg, dir.path(), "lb1");
        std::thread::sleep(Duration::from_secs(1));
        assert!(seg.holds_vip("lb2") && !seg.holds_vip("lb1"));

        // etcd unreachable from the holder: it removes the VIP itself before its lease can
        // expire, and the other host takes over: a short gap, never two holders.
        seg.link("lb2", false);
        wait_for("lb2 to drop the VIP without etcd", Duration::from_secs(10), || (!seg.holds_vip("lb2")).then_some(()));
        wait_for("lb1 to take over", Duration::from_secs(10), || seg.holds_vip("lb1").then_some(()));
        seg.link("lb2", true);
        std::thread::sleep(Duration::from_secs(2));
        assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"), "one holder after the partition heals");
        wait_for("the client to reach lb1", Duration::from_secs(10), || {
            (answers(&seg).as_deref() == Some("lb1")).then_some(())
        });

        // A clean stop releases key and VIP at once.
        let t = failover(&seg, "lb2", || lb1.signal(libc::SIGTERM));
        eprintln!("etcd lease: clean stop -> client served by the other host in {t:?}");
    }));
    if let Err(e) = result {
        eprintln!("--- lb1 ---\n{}\n--- lb2 ---\n{}", lb1.log_tail(30), lb2.log_tail(30));
        std::panic::resume_unwind(e);
    }
}

#[test]
fn ipv6_vip_moves_with_unsolicited_neighbour_advertisements() {
    let seg = Segment::new("e");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("ip")
        .args(["-n", &seg.ns("cli"), "addr", "add", "2001:db8::100/64", "dev", "eth0", "nodad"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let host = |n: &str, priority: u8| {
        let cfg = dir.path().join(format!("{n}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[admin]\nlisten = \"[::]:{ADMIN}\"\n[[cluster]]\nname = \"c\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n\
                 [[listener]]\nname = \"{n}\"\ncluster = \"c\"\nbind = \"[::]:5432\"\n\
                 [[vip]]\nname = \"rw6\"\naddress = \"{VIP6}/64\"\ninterface = \"eth0\"\nvrid = 61\npriority = {priority}\n\
                 version = 3\nadvert_interval = \"100ms\"\nhealth_weight = 0\n"
            ),
        )
        .unwrap();
        let mut cmd = seg.cmd(n, env!("CARGO_BIN_EXE_pgfront"));
        cmd.args(["proxy", "-c", cfg.to_str().unwrap()]).env("RUST_LOG", "info,pgfront::vip=debug");
        Proc::spawn(n, cmd, &dir.path().join(format!("{n}.log")), false)
    };
    let lb1 = host("lb1", 150);
    let lb2 = host("lb2", 100);
    let target: std::net::SocketAddr = format!("[{VIP6}]:{ADMIN}").parse().unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("lb1 to hold the IPv6 VIP alone", Duration::from_secs(10), || {
            (seg.holds("lb1", VIP6) && !seg.holds("lb2", VIP6)).then_some(())
        });
        wait_for("the client to reach lb1 over IPv6", Duration::from_secs(10), || {
            (seg.run_in("cli", move || who_answers_at(target, Duration::from_millis(500))).as_deref() == Some("lb1"))
                .then_some(())
        });
        std::thread::sleep(Duration::from_secs(1));
        assert!(!seg.holds("lb2", VIP6), "lb2 follows lb1's VRRPv3-over-IPv6 adverts");
        let t = failover_at(&seg, target, "lb2", || lb1.signal_group(libc::SIGKILL));
        eprintln!("IPv6 pgfront pair, VRRPv3 100 ms: holder SIGKILLed -> client served by the backup in {t:?}");
        assert!(seg.holds("lb2", VIP6));
    }));
    if let Err(e) = result {
        eprintln!("--- lb1 ---\n{}\n--- lb2 ---\n{}", lb1.log_tail(30), lb2.log_tail(30));
        std::panic::resume_unwind(e);
    }
}
