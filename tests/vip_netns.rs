//! The floating VIP, tested on a private segment built in network namespaces (see
//! tests/common/netns.rs; nothing reaches the host's own interfaces): two pgfront instances
//! elect one holder, a crash or a clean stop moves the VIP and the client follows thanks to
//! the gratuitous ARP, preempt and nopreempt behave, garbage VRRP packets change nothing, and a
//! mixed pair pgfront + keepalived 2.2 elects whichever has the higher priority.
//!
//! Binary upgrade with the real binary (`binary_upgrades_*`): SIGUSR2 ten times in a row to the
//! pgfront on lb1 (the pid `/status` reports), with a keepalived or a pgfront peer on lb2 and a
//! client opening sessions on the VIP every 10 ms; the peer never takes the VIP.
//!
//! Reload and upgrade (issue 7) of the VIP instances themselves are also tested in-process: VIP
//! instances (`vip::driver::run_with`, `vip::lease::run_with`) run on threads that entered a
//! namespace with `setns` and build a current-thread runtime there, so every socket they open (raw VRRP, netlink, packet, etcd) is in that namespace. Each such thread is "a
//! pgfront process" for the purpose of the test: two in the same namespace are the old and the
//! new process of an upgrade.

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

mod inproc {
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use pgfront::config::{ClusterConfig, Config, VipConfig};
    use pgfront::events::Events;
    use pgfront::vip::driver::{self, SharedVipStatus};
    use pgfront::vip::fsm::State;
    use pgfront::vip::lease;
    use pgfront::vip::lifecycle::{decode_handover_state, handover_state, Start, VipRole, VipStop};
    use tokio::sync::watch;

    use super::common::netns::*;
    use super::common::*;

    pub fn parse(text: &str) -> Config {
        Config::parse(Path::new("test.toml"), text).unwrap()
    }

    pub fn vrrp_config(priority: u8) -> Arc<VipConfig> {
        let v = Vrrp { priority, version: 3, interval: "100ms", preempt: true };
        parse(&config_with("x", Some(&v), NO_TIES)).vips[0].clone()
    }

    pub fn logs() {
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info,pgfront::vip=debug").try_init();
    }

    /// One VIP instance running in-process in a namespace, as a pgfront process runs it: its
    /// config feed, its status, its stop.
    pub struct Instance {
        pub name: String,
        cfg: watch::Sender<Arc<VipConfig>>,
        pub status: SharedVipStatus,
        stop: VipStop,
        thread: Option<JoinHandle<Result<(), String>>>,
    }

    impl Instance {
        pub fn vrrp(seg: &Segment, n: &str, name: &str, cfg: Arc<VipConfig>, start: Start) -> Instance {
            Instance::spawn(seg, n, name, cfg, move |rx, status, stop| {
                Box::pin(async move {
                    driver::run_with(rx, status, Arc::new(|| true), stop, start, Events::default()).await
                })
            })
        }

        pub fn lease(
            seg: &Segment,
            n: &str,
            name: &str,
            cfg: Arc<VipConfig>,
            etcd: Arc<ClusterConfig>,
            start: Start,
        ) -> Instance {
            Instance::spawn(seg, n, name, cfg, move |rx, status, stop| {
                Box::pin(async move {
                    lease::run_with(rx, etcd, status, Arc::new(|| true), stop, start, Events::default()).await
                })
            })
        }

        #[allow(clippy::type_complexity)]
        fn spawn(
            seg: &Segment,
            n: &str,
            name: &str,
            cfg: Arc<VipConfig>,
            run: impl FnOnce(
                    watch::Receiver<Arc<VipConfig>>,
                    SharedVipStatus,
                    VipStop,
                ) -> std::pin::Pin<
                    Box<dyn std::future::Future<Output = Result<(), pgfront::vip::driver::VipError>>>,
                > + Send
                + 'static,
        ) -> Instance {
            let status = driver::initial_status(&cfg);
            let (tx, rx) = watch::channel(cfg);
            let stop = VipStop::new();
            let (st, sp) = (status.clone(), stop.clone());
            let thread = seg.spawn_in(n, move || {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
                rt.block_on(run(rx, st, sp)).map_err(|e| e.to_string())
            });
            Instance { name: name.to_owned(), cfg: tx, status, stop, thread: Some(thread) }
        }

        /// The configuration the instance runs (after reloads).
        pub fn config(&self) -> Arc<VipConfig> {
            self.cfg.borrow().clone()
        }

        pub fn state(&self) -> State {
            self.status.lock().unwrap().state
        }

        pub fn transitions(&self) -> u64 {
            self.status.lock().unwrap().transitions
        }

        pub fn priority(&self) -> u8 {
            self.status.lock().unwrap().priority
        }

        /// Reload: sends a changed config down the instance's feed.
        pub fn reconfigure(&self, f: impl FnOnce(&mut VipConfig)) {
            let mut c = (**self.cfg.borrow()).clone();
            f(&mut c);
            self.cfg.send(Arc::new(c)).expect("the instance is running");
        }

        pub fn wait_state(&self, want: State, limit: Duration) {
            wait_for(&format!("{} to be {want:?}", self.name), limit, || (self.state() == want).then_some(()));
        }

        /// The role this instance would hand to a successor, through the encoded state.
        pub fn role(&self) -> VipRole {
            let roles = decode_handover_state(&handover_state(std::slice::from_ref(&self.status))).unwrap();
            roles.into_iter().next().unwrap()
        }

        /// Stops the instance (hand-over or release) and waits for it to end.
        pub fn finish(mut self, hand_over: bool) {
            if hand_over {
                self.stop.hand_over();
            } else {
                self.stop.release();
            }
            let r = self.thread.take().unwrap().join().unwrap();
            assert!(r.is_ok(), "{}: {r:?}", self.name);
        }
    }

    impl Drop for Instance {
        fn drop(&mut self) {
            self.stop.release();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// One advert seen: source, priority, advertised interval, when it was seen.
    type Seen = (IpAddr, u8, Duration, Instant);

    /// Every VRRP advert seen on the segment, from the client namespace.
    pub struct Sniffer {
        seen: Arc<Mutex<Vec<Seen>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Sniffer {
        pub fn start(seg: &Segment) -> Sniffer {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (s2, stop2) = (seen.clone(), stop.clone());
            let thread = seg.spawn_in("cli", move || {
                use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};
                let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(112))).unwrap();
                let me = format!("{SUBNET}.100").parse().unwrap();
                s.join_multicast_v4_n(&"224.0.0.18".parse().unwrap(), &InterfaceIndexOrAddress::Address(me)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut buf = [0u8; 1500];
                // Bounded by the stop flag and by a generous count.
                for _ in 0..1_000_000 {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(n) = (&s).read(&mut buf) else { continue };
                    let raw = &buf[..n];
                    if n < 20 {
                        continue;
                    }
                    let ihl = usize::from(raw[0] & 0x0f) * 4;
                    let src = IpAddr::from([raw[12], raw[13], raw[14], raw[15]]);
                    let dst = IpAddr::from([raw[16], raw[17], raw[18], raw[19]]);
                    if let Ok(a) = pgfront::vip::packet::decode(&raw[ihl.min(n)..], src, dst) {
                        s2.lock().unwrap().push((src, a.priority, a.interval(), Instant::now()));
                    }
                }
            });
            Sniffer { seen, stop, thread: Some(thread) }
        }

        pub fn mark(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        /// Waits until `n` adverts from `src` matching `f(priority, interval)` were seen since `mark`.
        pub fn wait(
            &self,
            what: &str,
            mark: usize,
            src: &str,
            n: usize,
            f: impl Fn(u8, Duration) -> bool,
            limit: Duration,
        ) {
            let src: IpAddr = src.parse().unwrap();
            wait_for(what, limit, || {
                let seen = self.seen.lock().unwrap();
                (seen[mark..].iter().filter(|(s, p, i, _)| *s == src && f(*p, *i)).count() >= n).then_some(())
            });
        }

        pub fn any_since(&self, mark: usize, f: impl Fn(IpAddr, u8, Duration) -> bool) -> bool {
            self.seen.lock().unwrap()[mark..].iter().any(|(s, p, i, _)| f(*s, *p, *i))
        }

        /// How many adverts since `mark` match `f(source, priority, interval)`.
        pub fn count_since(&self, mark: usize, f: impl Fn(IpAddr, u8, Duration) -> bool) -> usize {
            self.seen.lock().unwrap()[mark..].iter().filter(|(s, p, i, _)| f(*s, *p, *i)).count()
        }

        /// The longest silence between two adverts from `src` seen since `mark`, up to now
        /// (so a source that fell silent shows it): a figure, and what a backup's master-down
        /// timer measures.
        pub fn max_gap(&self, mark: usize, src: &str) -> Duration {
            let src: IpAddr = src.parse().unwrap();
            let seen = self.seen.lock().unwrap();
            let times: Vec<Instant> = seen[mark..].iter().filter(|(s, ..)| *s == src).map(|(.., t)| *t).collect();
            let mut gap = Duration::ZERO;
            for w in times.windows(2) {
                gap = gap.max(w[1] - w[0]);
            }
            times.last().map_or(gap, |t| gap.max(t.elapsed()))
        }
    }

    impl Drop for Sniffer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// `ip monitor address` in one namespace: every address added or deleted there, even for a
    /// moment, is in its log.
    pub struct AddrMonitor {
        proc: Proc,
    }

    impl AddrMonitor {
        pub fn start(seg: &Segment, n: &str, dir: &Path) -> AddrMonitor {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(["-n", &seg.ns(n), "monitor", "address"]);
            let proc = Proc::spawn(&format!("{n}-monitor"), cmd, &dir.join(format!("{n}-monitor.log")), false);
            // Ready once it reports a marker address on lo, added and deleted in turn until it
            // does (it may not have subscribed yet when the first event happens).
            let ip = |op: &str| {
                let out = std::process::Command::new("ip")
                    .args(["-n", &seg.ns(n), "addr", op, "10.255.255.1/32", "dev", "lo"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            };
            let m = AddrMonitor { proc };
            let mut present = false;
            wait_for(&format!("the address monitor in {n}"), Duration::from_secs(10), || {
                if m.log().contains("10.255.255.1/32") {
                    return Some(());
                }
                ip(if present { "del" } else { "add" });
                present = !present;
                None
            });
            if present {
                ip("del");
            }
            m
        }

        pub fn log(&self) -> String {
            std::fs::read_to_string(&self.proc.log).unwrap_or_default()
        }

        /// The events about the VIP since the monitor started.
        pub fn vip_events(&self) -> Vec<String> {
            self.log().lines().filter(|l| l.contains(&format!(" {VIP}/"))).map(str::to_owned).collect()
        }
    }

    /// A TCP service in namespace `n` that answers its name and closes: what the client reaches
    /// on the VIP.
    pub struct Responder {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    pub const PORT: u16 = 7100;

    impl Responder {
        pub fn start(seg: &Segment, n: &str) -> Responder {
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop2, name) = (stop.clone(), n.to_owned());
            let thread = seg.spawn_in(n, move || {
                let l = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
                l.set_nonblocking(true).unwrap();
                tx.send(()).unwrap();
                while !stop2.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.write_all(name.as_bytes());
                        }
                        // Polling the accept queue, not synchronising with anything.
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            });
            rx.recv_timeout(Duration::from_secs(10)).expect("responder bound");
            Responder { stop, thread: Some(thread) }
        }
    }

    impl Drop for Responder {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// A client in the client namespace connecting to the VIP every 10 ms, one connection at
    /// a time; records who answered (None: refused, timed out or closed without a word).
    pub struct Probe {
        results: Arc<Mutex<Vec<Option<String>>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Probe {
        pub fn start(seg: &Segment) -> Probe {
            let results = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (r2, stop2) = (results.clone(), stop.clone());
            let target: SocketAddr = format!("{VIP}:{PORT}").parse().unwrap();
            let thread = seg.spawn_in("cli", move || {
                // Bounded in count (and by the stop flag).
                for _ in 0..20_000 {
                    if stop2.load(Ordering::Relaxed) {
                        break;
                    }
                    let answer =
                        TcpStream::connect_timeout(&target, Duration::from_millis(300)).ok().and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
                            let mut b = String::new();
                            s.read_to_string(&mut b).ok()?;
                            (!b.is_empty()).then_some(b)
                        });
                    r2.lock().unwrap().push(answer);
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            Probe { results, stop, thread: Some(thread) }
        }

        pub fn count(&self) -> usize {
            self.results.lock().unwrap().len()
        }

        pub fn wait_count(&self, n: usize, limit: Duration) {
            wait_for(&format!("{n} client probes"), limit, || (self.count() >= n).then_some(()));
        }

        /// Waits for `n` probes or `limit`, whichever comes first: failed probes are slow (they
        /// time out), and the assertions that follow say what went wrong better than a timeout.
        pub fn wait_count_at_most(&self, n: usize, limit: Duration) {
            let end = Instant::now() + limit;
            while self.count() < n && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// (answered by `who`, anything else) since probe number `from`.
        pub fn tally(&self, from: usize, who: &str) -> (usize, Vec<(usize, Option<String>)>) {
            let r = self.results.lock().unwrap();
            let mut ok = 0;
            let mut other = Vec::new();
            for (i, a) in r.iter().enumerate().skip(from) {
                if a.as_deref() == Some(who) {
                    ok += 1;
                } else {
                    other.push((i, a.clone()));
                }
            }
            (ok, other)
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    pub fn count_lines(path: &Path, needle: &str) -> usize {
        std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| l.contains(needle)).count()
    }
}

/// Reload, VRRP: the master's priority lowered (still above the peer's) and its advert
/// interval changed, then the backup's priority raised below and then above the master's, all
/// through the instances' config feeds. Only the last change moves the VIP.
#[test]
fn vrrp_live_reconfiguration_keeps_mastership() {
    use inproc::*;
    use pgfront::vip::fsm::State;
    use pgfront::vip::lifecycle::Start;
    logs();
    let seg = Segment::new("f");
    let dir = tempfile::tempdir().unwrap();
    let (lb1_ip, lb2_ip) = (format!("{SUBNET}.11"), format!("{SUBNET}.12"));
    let a = Instance::vrrp(&seg, "lb1", "lb1", vrrp_config(150), Start::Fresh);
    a.wait_state(State::Master, Duration::from_secs(10));
    let b = Instance::vrrp(&seg, "lb2", "lb2", vrrp_config(100), Start::Fresh);
    b.wait_state(State::Backup, Duration::from_secs(10));
    let sniff = Sniffer::start(&seg);
    let mon2 = AddrMonitor::start(&seg, "lb2", dir.path());
    let m = sniff.mark();
    sniff.wait("lb1's adverts at 150", m, &lb1_ip, 3, |p, _| p == 150, Duration::from_secs(10));
    assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"));
    let (ta, tb) = (a.transitions(), b.transitions());

    // The master's priority lowered to 120, still above the backup's 100: advertised at once,
    // and nothing moves for 15 adverts (more than 3 master-down intervals).
    let m = sniff.mark();
    a.reconfigure(|c| c.priority = 120);
    sniff.wait("lb1's adverts at 120", m, &lb1_ip, 15, |p, _| p == 120, Duration::from_secs(10));
    assert_eq!((a.state(), a.transitions(), a.priority()), (State::Master, ta, 120));
    assert_eq!((b.state(), b.transitions()), (State::Backup, tb));

    // The master's interval doubled: the backup learns it from the next advert (VRRPv3) and
    // does not take over during the longer gaps.
    let m = sniff.mark();
    a.reconfigure(|c| c.advert_interval = Duration::from_millis(200));
    sniff.wait(
        "lb1's adverts every 200 ms",
        m,
        &lb1_ip,
        10,
        |p, i| p == 120 && i == Duration::from_millis(200),
        Duration::from_secs(10),
    );
    assert_eq!((a.state(), a.transitions()), (State::Master, ta));
    assert_eq!((b.state(), b.transitions()), (State::Backup, tb));

    // The backup raised to 110, below the master: it stays backup.
    let m = sniff.mark();
    b.reconfigure(|c| c.priority = 110);
    sniff.wait("10 more adverts from lb1", m, &lb1_ip, 10, |p, _| p == 120, Duration::from_secs(10));
    assert_eq!((b.state(), b.transitions(), b.priority()), (State::Backup, tb, 110));
    assert!(mon2.vip_events().is_empty(), "the VIP never appeared on lb2: {:?}", mon2.vip_events());
    assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"));
    assert!(!sniff.any_since(0, |s, _, _| s.to_string() == lb2_ip), "lb2 never advertised");

    // The backup raised to 130, above the master (preempt): it takes over, and the master,
    // hearing a higher priority, steps down.
    let m = sniff.mark();
    b.reconfigure(|c| c.priority = 130);
    b.wait_state(State::Master, Duration::from_secs(10));
    a.wait_state(State::Backup, Duration::from_secs(10));
    sniff.wait("lb2's adverts at 130", m, &lb2_ip, 3, |p, _| p == 130, Duration::from_secs(10));
    wait_for("the VIP on lb2 alone", Duration::from_secs(10), || {
        (seg.holds_vip("lb2") && !seg.holds_vip("lb1")).then_some(())
    });
    a.finish(false);
    b.finish(false);
}

/// Upgrade, VRRP: instance A (the old process, master) hands over to instance B (the new
/// process, same host, started from A's encoded role), then stops in hand-over mode, while a
/// keepalived peer of lower priority watches: keepalived never becomes master, the VIP is never
/// removed from lb1 nor added on lb2, and a client probing the VIP every 10 ms is always
/// answered by lb1. Then B releases normally and keepalived takes over (the watchers work).
#[test]
fn vrrp_upgrade_takeover_is_invisible_to_a_keepalived_peer() {
    use inproc::*;
    use pgfront::vip::fsm::State;
    use pgfront::vip::lifecycle::{decode_handover_state, handover_state, Start};
    logs();
    let seg = Segment::new("g");
    let dir = tempfile::tempdir().unwrap();
    let lb1_ip = format!("{SUBNET}.11");
    let _r1 = Responder::start(&seg, "lb1");
    let _r2 = Responder::start(&seg, "lb2");
    let a = Instance::vrrp(&seg, "lb1", "old", vrrp_config(150), Start::Fresh);
    a.wait_state(State::Master, Duration::from_secs(10));
    let ka = start_keepalived(&seg, dir.path(), "lb2", 100, 3, "0.1");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("keepalived to start as backup", Duration::from_secs(15), || {
            (count_lines(&ka.log, "Entering BACKUP STATE") > 0).then_some(())
        });
        let sniff = Sniffer::start(&seg);
        let m = sniff.mark();
        sniff.wait("20 adverts from the old instance", m, &lb1_ip, 20, |p, _| p == 150, Duration::from_secs(10));
        assert_eq!(count_lines(&ka.log, "Entering MASTER STATE"), 0, "keepalived follows pgfront's adverts");
        let mon1 = AddrMonitor::start(&seg, "lb1", dir.path());
        let mon2 = AddrMonitor::start(&seg, "lb2", dir.path());
        let probe = Probe::start(&seg);
        probe.wait_count(20, Duration::from_secs(10));
        let p0 = probe.count();

        // The hand-over: the old process encodes its roles, the new one starts from them.
        let state = handover_state(std::slice::from_ref(&a.status));
        let roles = decode_handover_state(&state).unwrap();
        assert!(roles[0].master);
        let b = Instance::vrrp(&seg, "lb1", "new", vrrp_config(150), Start::for_vip(&roles, "rw"));
        b.wait_state(State::Master, Duration::from_secs(10));
        a.finish(true);
        let stopped_at = probe.count();
        // Keepalived's master-down interval is 3 × 100 ms + skew: 200 probes (≥ 2 s) is far
        // beyond it.
        probe.wait_count_at_most(stopped_at + 200, Duration::from_secs(30));
        let m = sniff.mark();
        sniff.wait("adverts from the new instance", m, &lb1_ip, 5, |p, _| p == 150, Duration::from_secs(10));

        assert_eq!(count_lines(&ka.log, "Entering MASTER STATE"), 0, "keepalived never became master");
        assert!(!sniff.any_since(0, |_, p, _| p == 0), "no priority-0 advert was sent");
        let deleted: Vec<String> = mon1.vip_events().into_iter().filter(|l| l.starts_with("Deleted")).collect();
        assert!(deleted.is_empty(), "the VIP was never removed from lb1: {deleted:?}");
        assert!(mon2.vip_events().is_empty(), "the VIP never appeared on lb2: {:?}", mon2.vip_events());
        let (ok, other) = probe.tally(p0, "lb1");
        assert!(other.is_empty(), "every probe answered by lb1 ({ok} were), not: {other:?}");
        eprintln!("VRRP upgrade takeover: {ok} probes across the hand-over, all answered by lb1");
        assert_eq!((b.state(), b.transitions()), (State::Master, 1), "started as master, stayed");
        assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"));

        // A normal stop of the new instance: priority 0, keepalived takes over. Proves the
        // watchers above would have seen it.
        b.finish(false);
        wait_for("keepalived to take over", Duration::from_secs(10), || {
            (count_lines(&ka.log, "Entering MASTER STATE") > 0 && seg.holds_vip("lb2")).then_some(())
        });
        // `ip monitor` prints the event after the address is there: wait for its line.
        wait_for("the monitor to see the VIP on lb2", Duration::from_secs(10), || {
            mon2.vip_events().iter().any(|l| !l.starts_with("Deleted")).then_some(())
        });
    }));
    if let Err(e) = result {
        eprintln!("--- keepalived ---\n{}", ka.log_tail(40));
        std::panic::resume_unwind(e);
    }
}

/// Reload and upgrade, etcd lease election: a changed TTL moves the key to a new lease without
/// releasing the VIP; then the new instance carries on the old one's lease (same id)
/// and key (same value), keeps the lease alive after the old one stopped in hand-over mode,
/// and a peer on lb2 never takes the VIP; the client keeps reaching lb1. Then a normal stop
/// deletes the key and the peer takes over.
#[test]
fn etcd_lease_upgrade_takeover_keeps_lease_and_key() {
    use inproc::*;
    use pgfront::vip::fsm::State;
    use pgfront::vip::lifecycle::{decode_handover_state, handover_state, Start};
    logs();
    let seg = Segment::new("h");
    let dir = tempfile::tempdir().unwrap();
    let etcd_proc = start_etcd_in(&seg, dir.path());
    let endpoint = format!("http://{SUBNET}.100:2379");
    let config = parse(&format!(
        "[[cluster]]\nname = \"c\"\nscope = \"s\"\netcd_endpoints = [\"{endpoint}\"]\netcd_timeout = \"1s\"\n\
         [[listener]]\nname = \"l\"\ncluster = \"c\"\nbind = \"0.0.0.0:5432\"\n\
         [[vip]]\nname = \"rw\"\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\nelection = \"etcd\"\netcd_cluster = \"c\"\n\
         lease_ttl = \"3s\"\nhealth_weight = 0\n"
    ));
    let (vip, etcd) = (config.vips[0].clone(), config.clusters[0].clone());
    let _r1 = Responder::start(&seg, "lb1");
    let _r2 = Responder::start(&seg, "lb2");
    let a = Instance::lease(&seg, "lb1", "old", vip.clone(), etcd.clone(), Start::Fresh);
    a.wait_state(State::Master, Duration::from_secs(15));
    let peer = Instance::lease(&seg, "lb2", "peer", vip.clone(), etcd.clone(), Start::Fresh);
    peer.wait_state(State::Backup, Duration::from_secs(15));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mon1 = AddrMonitor::start(&seg, "lb1", dir.path());
        let mon2 = AddrMonitor::start(&seg, "lb2", dir.path());
        let probe = Probe::start(&seg);
        probe.wait_count(20, Duration::from_secs(10));
        let p0 = probe.count();
        // Reload: a longer lease TTL moves the key to a new lease of that TTL, live; the VIP
        // stays (the monitor on lb1 sees no deletion, checked below).
        let (value, first_lease, _) = key_info(&seg, &endpoint).expect("the key exists");
        a.reconfigure(|c| {
            if let pgfront::config::Election::Etcd { ttl, .. } = &mut c.election {
                *ttl = Duration::from_secs(6);
            }
        });
        wait_for("the key on a lease of the new TTL", Duration::from_secs(10), || {
            let (v, l, ttl) = key_info(&seg, &endpoint)?;
            assert_eq!(v, value, "the key stays ours");
            (l != first_lease && ttl > 3).then_some(())
        });
        assert_eq!((a.state(), a.transitions()), (State::Master, 2), "Initialize -> Backup -> Master, no more");
        let (value, lease_id, _) = key_info(&seg, &endpoint).expect("the key exists");
        let old_role = a.role();
        assert_eq!(old_role.lease.as_ref().map(|l| l.ttl()), Some(Duration::from_secs(6)));
        assert_eq!(old_role.lease.as_ref().map(|l| (l.id, l.value.as_str())), Some((lease_id, value.as_str())));

        // The hand-over.
        let roles = decode_handover_state(&handover_state(std::slice::from_ref(&a.status))).unwrap();
        // The new process reads the same (reloaded) configuration.
        let b = Instance::lease(&seg, "lb1", "new", a.config(), etcd.clone(), Start::for_vip(&roles, "rw"));
        b.wait_state(State::Master, Duration::from_secs(15));
        a.finish(true);
        let stopped_at = probe.count();
        assert_eq!(b.role().lease.map(|l| l.id), Some(lease_id), "the new instance keeps the same lease");

        // The new instance keeps the lease alive on its own: its remaining TTL is seen going
        // up again twice after the old one stopped (3 s TTL, keep-alive every second), and the
        // key never changes.
        let mut last = key_info(&seg, &endpoint).expect("the key exists").2;
        let mut refreshed = 0;
        wait_for("the lease to be kept alive by the new instance", Duration::from_secs(20), || {
            let (v, l, ttl) = key_info(&seg, &endpoint).expect("the key stays");
            assert_eq!((v.as_str(), l), (value.as_str(), lease_id), "same key value, same lease");
            if ttl > last {
                refreshed += 1;
            }
            last = ttl;
            (refreshed >= 2).then_some(())
        });
        // Reload on the new instance: back to 3 s. The key moves off the adopted lease (which
        // is not revoked, and expires on its own), the VIP stays.
        b.reconfigure(|c| {
            if let pgfront::config::Election::Etcd { ttl, .. } = &mut c.election {
                *ttl = Duration::from_secs(3);
            }
        });
        wait_for("the key on a new lease", Duration::from_secs(10), || {
            let (v, l, _) = key_info(&seg, &endpoint)?;
            assert_eq!(v, value, "the key stays ours");
            (l != lease_id).then_some(())
        });
        assert_eq!((b.state(), b.transitions()), (State::Master, 1));
        probe.wait_count_at_most(stopped_at + 100, Duration::from_secs(30));
        assert_eq!(peer.state(), State::Backup);
        let deleted: Vec<String> = mon1.vip_events().into_iter().filter(|l| l.starts_with("Deleted")).collect();
        assert!(deleted.is_empty(), "the VIP was never removed from lb1: {deleted:?}");
        assert!(mon2.vip_events().is_empty(), "the VIP never appeared on lb2: {:?}", mon2.vip_events());
        let (ok, other) = probe.tally(p0, "lb1");
        assert!(other.is_empty(), "every probe answered by lb1 ({ok} were), not: {other:?}");
        eprintln!("etcd lease upgrade takeover: {ok} probes across the hand-over, all answered by lb1");

        // A normal stop deletes the key: the peer takes over at once.
        b.finish(false);
        peer.wait_state(State::Master, Duration::from_secs(10));
        wait_for("the VIP on lb2 alone", Duration::from_secs(10), || {
            (seg.holds_vip("lb2") && !seg.holds_vip("lb1")).then_some(())
        });
        // `ip monitor` prints the event after the address is there: wait for its line.
        wait_for("the monitor to see the VIP on lb2", Duration::from_secs(10), || {
            mon2.vip_events().iter().any(|l| !l.starts_with("Deleted")).then_some(())
        });
    }));
    if let Err(e) = result {
        eprintln!("--- etcd ---\n{}", etcd_proc.log_tail(20));
        std::panic::resume_unwind(e);
    }
}

/// Upgrade, etcd lease election, with a lease TTL changed in the file between the two
/// processes: the new one moves the key to a lease of its TTL while the old one still runs,
/// and must leave the old one's lease alone (revoking it would delete the key under the old
/// process, which would then remove the shared address).
#[test]
fn etcd_lease_takeover_with_another_ttl_leaves_the_old_process_alone() {
    use inproc::*;
    use pgfront::vip::fsm::State;
    use pgfront::vip::lifecycle::{decode_handover_state, handover_state, Start};
    logs();
    let seg = Segment::new("i");
    let dir = tempfile::tempdir().unwrap();
    let etcd_proc = start_etcd_in(&seg, dir.path());
    let endpoint = format!("http://{SUBNET}.100:2379");
    let config = |ttl: &str| {
        parse(&format!(
            "[[cluster]]\nname = \"c\"\nscope = \"s\"\netcd_endpoints = [\"{endpoint}\"]\netcd_timeout = \"1s\"\n\
             [[listener]]\nname = \"l\"\ncluster = \"c\"\nbind = \"0.0.0.0:5432\"\n\
             [[vip]]\nname = \"rw\"\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\nelection = \"etcd\"\netcd_cluster = \"c\"\n\
             lease_ttl = \"{ttl}\"\nhealth_weight = 0\n"
        ))
    };
    let (old_cfg, new_cfg) = (config("3s"), config("6s"));
    let etcd = old_cfg.clusters[0].clone();
    let a = Instance::lease(&seg, "lb1", "old", old_cfg.vips[0].clone(), etcd.clone(), Start::Fresh);
    a.wait_state(State::Master, Duration::from_secs(15));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mon1 = AddrMonitor::start(&seg, "lb1", dir.path());
        let (value, old_lease, _) = key_info(&seg, &endpoint).expect("the key exists");
        let roles = decode_handover_state(&handover_state(std::slice::from_ref(&a.status))).unwrap();
        let b =
            Instance::lease(&seg, "lb1", "new", new_cfg.vips[0].clone(), etcd.clone(), Start::for_vip(&roles, "rw"));
        b.wait_state(State::Master, Duration::from_secs(15));
        wait_for("the key on the new instance's 6 s lease", Duration::from_secs(10), || {
            let (v, l, ttl) = key_info(&seg, &endpoint)?;
            assert_eq!(v, value, "the key stays ours");
            (l != old_lease && ttl > 3).then_some(())
        });
        // Both processes run: the old one still keeps its lease alive (seen refreshed twice),
        // so its session lives, and it still holds the VIP.
        let mut last = lease_ttl(&seg, &endpoint, old_lease);
        let mut refreshed = 0;
        wait_for("the old process to keep its lease alive", Duration::from_secs(10), || {
            let ttl = lease_ttl(&seg, &endpoint, old_lease);
            assert!(ttl > 0, "the old process's lease was revoked or expired");
            if ttl > last {
                refreshed += 1;
            }
            last = ttl;
            (refreshed >= 2).then_some(())
        });
        assert_eq!((a.state(), b.state()), (State::Master, State::Master));
        a.finish(true);
        let deleted: Vec<String> = mon1.vip_events().into_iter().filter(|l| l.starts_with("Deleted")).collect();
        assert!(deleted.is_empty(), "the VIP was never removed from lb1: {deleted:?}");
        assert!(seg.holds_vip("lb1"));
        b.finish(false);
    }));
    if let Err(e) = result {
        eprintln!("--- etcd ---\n{}", etcd_proc.log_tail(20));
        std::panic::resume_unwind(e);
    }
}

/// The remaining TTL of a lease, in seconds (-1: gone), asked from the client namespace.
fn lease_ttl(seg: &common::netns::Segment, endpoint: &str, id: i64) -> i64 {
    let endpoint = endpoint.to_owned();
    seg.run_in("cli", move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        rt.block_on(async move {
            let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
            Some(c.lease_time_to_live(id, None).await.ok()?.ttl())
        })
    })
    .expect("etcd answers")
}

/// What etcd says about the VIP's key, asked from the client namespace: (value, lease id,
/// remaining TTL of that lease in seconds).
fn key_info(seg: &common::netns::Segment, endpoint: &str) -> Option<(String, i64, i64)> {
    let endpoint = endpoint.to_owned();
    seg.run_in("cli", move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        rt.block_on(async move {
            let mut c = etcd_client::Client::connect([endpoint], None).await.ok()?;
            let r = c.get("/pgfront/vip/rw", None).await.ok()?;
            let kv = r.kvs().first()?;
            let ttl = c.lease_time_to_live(kv.lease(), None).await.ok()?.ttl();
            Some((kv.value_str().ok()?.to_owned(), kv.lease(), ttl))
        })
    })
}

/// Binary upgrades of the real pgfront (SIGUSR2) in a namespace: the helpers of the two tests
/// below.
mod binary {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use super::common::echo::startup;
    use super::common::netns::*;
    use super::common::*;

    /// A client in the client namespace that opens a short session with pgfront's primary
    /// listener on the VIP (port 5432) every 10 ms, one at a time: TCP connect, a PostgreSQL
    /// startup packet, and its echo from the backend pgfront routed it to. Records every outcome:
    /// `Ok(time taken)`, or `Err` starting with "connect:" (nothing accepted it) or "session:"
    /// (accepted, not served).
    pub struct ServiceProbe {
        results: Arc<Mutex<Vec<Result<Duration, String>>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    fn session(target: SocketAddr) -> Result<Duration, String> {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(1)).map_err(|e| format!("connect: {e}"))?;
        let mut served = || -> std::io::Result<bool> {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            let p = startup();
            s.write_all(&p)?;
            let mut back = vec![0u8; p.len()];
            s.read_exact(&mut back)?;
            Ok(back == p)
        };
        match served() {
            Ok(true) => Ok(t.elapsed()),
            Ok(false) => Err("session: the echo differs (an ErrorResponse?)".into()),
            Err(e) => Err(format!("session: {e}")),
        }
    }

    impl ServiceProbe {
        pub fn start(seg: &Segment) -> ServiceProbe {
            let results = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (r2, stop2) = (results.clone(), stop.clone());
            let target: SocketAddr = format!("{VIP}:5432").parse().unwrap();
            let thread = seg.spawn_in("cli", move || {
                // Bounded in count and time (and by the stop flag).
                let end = Instant::now() + Duration::from_secs(600);
                for _ in 0..60_000 {
                    if stop2.load(Ordering::Relaxed) || Instant::now() > end {
                        break;
                    }
                    let r = session(target);
                    r2.lock().unwrap().push(r);
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            ServiceProbe { results, stop, thread: Some(thread) }
        }

        pub fn count(&self) -> usize {
            self.results.lock().unwrap().len()
        }

        /// Waits until `n` sessions in a row were served (pgfront routes the primary).
        pub fn wait_served(&self, n: usize, limit: Duration) {
            wait_for(&format!("{n} sessions in a row served through the VIP"), limit, || {
                let r = self.results.lock().unwrap();
                (r.len() >= n && r[r.len() - n..].iter().all(Result::is_ok)).then_some(())
            });
        }

        /// Waits for `n` more probes or `limit`, whichever comes first (a failing probe is slow;
        /// the tally says what went wrong better than a timeout).
        pub fn wait_more(&self, n: usize, limit: Duration) {
            let (want, end) = (self.count() + n, Instant::now() + limit);
            while self.count() < want && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        /// Stops the probe; returns (served, failed with their index, longest served session)
        /// for the probes from number `from` on.
        pub fn finish(mut self, from: usize) -> (usize, Vec<(usize, String)>, Duration) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            let r = self.results.lock().unwrap();
            let (mut ok, mut failed, mut longest) = (0, Vec::new(), Duration::ZERO);
            for (i, x) in r.iter().enumerate().skip(from) {
                match x {
                    Ok(d) => {
                        ok += 1;
                        longest = longest.max(*d);
                    }
                    Err(e) => failed.push((i, e.clone())),
                }
            }
            (ok, failed, longest)
        }
    }

    impl Drop for ServiceProbe {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// The pid that pgfront in namespace `n` reports in `/status`.
    pub fn pid(seg: &Segment, n: &str) -> Option<u32> {
        local_status(seg, n)?["pid"].as_u64().map(|p| p as u32)
    }

    /// Whether a process exists (a zombie, exited but not reaped, counts as gone).
    pub fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    }

    /// One binary upgrade of the pgfront in namespace `n` whose pid is `current`: SIGUSR2, a new
    /// pid in `/status`, the old process gone. Returns the new pid.
    pub fn upgrade(seg: &Segment, n: &str, current: u32, i: usize) -> u32 {
        // SAFETY: a signal to a process this test started (or one of its successors).
        unsafe { libc::kill(current as i32, libc::SIGUSR2) };
        let next = wait_for(&format!("upgrade {i}: a new pid in /status"), Duration::from_secs(30), || {
            pid(seg, n).filter(|p| *p != current)
        });
        wait_for(&format!("upgrade {i}: the old process {current} to exit"), Duration::from_secs(30), || {
            (!alive(current)).then_some(())
        });
        next
    }

    /// The first VIP in `/status` of the pgfront in namespace `n`.
    pub fn local_vip(seg: &Segment, n: &str) -> Option<serde_json::Value> {
        local_status(seg, n).map(|s| s["vips"][0].clone())
    }
}

/// Binary upgrade with the real binary, VRRP (issue 7, item 2): pgfront on lb1 (VRRPv3, 100 ms
/// adverts, priority 150, health ties at their default so a new process that came up unfit
/// would drop to keepalived's priority and lose the tie) routes its primary listener to an echo
/// backend through an etcd on lb1's loopback; keepalived on lb2 (priority 100) is its backup.
/// Ten SIGUSR2 in a row, each to the pid `/status` reports: keepalived never becomes master, no
/// priority-0 advert, the VIP never leaves lb1 nor appears on lb2, and every session a client
/// opens on the VIP every 10 ms is served. Then SIGTERM: keepalived takes over (the watchers
/// work).
#[test]
fn binary_upgrades_keep_the_vrrp_vip_from_a_keepalived_peer() {
    use binary::*;
    use inproc::{count_lines, AddrMonitor, Sniffer};
    let seg = Segment::new("j");
    let dir = tempfile::tempdir().unwrap();
    let lb1_ip = format!("{SUBNET}.11");
    let etcd = start_etcd_loopback(&seg, dir.path(), "lb1");
    let _backends = EchoBackends::start(&seg, "lb1", "lb1", "http://127.0.0.1:2379", "s");
    let v = Vrrp { priority: 150, version: 3, interval: "100ms", preempt: true };
    let lb1 = start_pgfront_with(&seg, dir.path(), "lb1", Some(&v), "[process]\ndrain_timeout = \"10s\"\n");
    let mut ka: Option<Proc> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_holder(&seg, "lb1", "lb2", Duration::from_secs(15));
        let probe = ServiceProbe::start(&seg);
        probe.wait_served(20, Duration::from_secs(20));
        let vip = local_vip(&seg, "lb1").unwrap();
        assert_eq!((vip["state"].as_str(), vip["priority"].as_u64()), (Some("master"), Some(150)), "fit: {vip}");
        let k = start_keepalived(&seg, dir.path(), "lb2", 100, 3, "0.1");
        let ka_log = k.log.clone();
        ka = Some(k);
        wait_for("keepalived to start as backup", Duration::from_secs(15), || {
            (count_lines(&ka_log, "Entering BACKUP STATE") > 0).then_some(())
        });
        let sniff = Sniffer::start(&seg);
        let m = sniff.mark();
        sniff.wait("20 adverts from lb1", m, &lb1_ip, 20, |p, _| p == 150, Duration::from_secs(10));
        assert_eq!(count_lines(&ka_log, "Entering MASTER STATE"), 0, "keepalived follows pgfront's adverts");
        let mon1 = AddrMonitor::start(&seg, "lb1", dir.path());
        let mon2 = AddrMonitor::start(&seg, "lb2", dir.path());

        let p0 = probe.count();
        let m0 = sniff.mark();
        let began = std::time::Instant::now();
        let mut current = pid(&seg, "lb1").expect("pid in /status");
        let mut gaps = Vec::new();
        for i in 0..10 {
            let m = sniff.mark();
            current = upgrade(&seg, "lb1", current, i);
            // The new process advertises on its own once the old one is gone.
            let m2 = sniff.mark();
            sniff.wait(
                &format!("upgrade {i}: adverts from the new process"),
                m2,
                &lb1_ip,
                5,
                |p, _| p == 150,
                Duration::from_secs(10),
            );
            gaps.push(sniff.max_gap(m, &lb1_ip));
        }
        let storm = began.elapsed();
        // 100 more probes (≥ 1 s: more than 3 of keepalived's master-down intervals) after the
        // last hand-over.
        probe.wait_more(100, Duration::from_secs(30));
        let (ok, failed, longest) = probe.finish(p0);
        let m_end = sniff.mark();
        let adverts = sniff.count_since(m0, |s, p, _| s.to_string() == lb1_ip && p == 150);
        let gap = gaps.iter().max().copied().unwrap_or_default();
        eprintln!(
            "10 binary upgrades (VRRPv3 100 ms, keepalived backup) in {:.1} s: {ok} client sessions on the VIP served, {} failed (longest {longest:?}); {adverts} adverts from lb1, longest silence per upgrade {:?} (max {gap:?})",
            storm.as_secs_f64(),
            failed.len(),
            gaps
        );
        assert!(failed.is_empty(), "every client session on the VIP was served: {:?}", &failed[..failed.len().min(20)]);
        assert_eq!(count_lines(&ka_log, "Entering MASTER STATE"), 0, "keepalived never became master");
        assert!(!sniff.any_since(0, |_, p, _| p == 0), "no priority-0 advert was sent");
        assert!(!sniff.any_since(0, |s, _, _| s.to_string() != lb1_ip), "only lb1 advertised");
        let deleted: Vec<String> = mon1.vip_events().into_iter().filter(|l| l.starts_with("Deleted")).collect();
        assert!(deleted.is_empty(), "the VIP was never removed from lb1: {deleted:?}");
        assert!(mon2.vip_events().is_empty(), "the VIP never appeared on lb2: {:?}", mon2.vip_events());
        assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"));
        let vip = local_vip(&seg, "lb1").unwrap();
        assert_eq!((vip["state"].as_str(), vip["priority"].as_u64()), (Some("master"), Some(150)), "{vip}");
        let log = std::fs::read_to_string(&lb1.log).unwrap_or_default();
        assert_eq!(log.matches("upgrade: the new process is ready").count(), 10, "10 upgrades");
        assert_eq!(log.matches("upgrade: old process done").count(), 10, "every old process ended");

        // A clean stop of the newest process: its priority-0 advert hands the VIP to keepalived
        // at once. Proves the watchers above would have seen a hand-over gone wrong.
        // SAFETY: a signal to the process this test's pgfront became.
        unsafe { libc::kill(current as i32, libc::SIGTERM) };
        wait_for("keepalived to take over", Duration::from_secs(10), || {
            (count_lines(&ka_log, "Entering MASTER STATE") > 0 && seg.holds_vip("lb2")).then_some(())
        });
        wait_for("the last pgfront to exit", Duration::from_secs(30), || (!alive(current)).then_some(()));
        assert!(!seg.holds_vip("lb1"), "a clean stop removes the address");
        assert!(
            sniff.any_since(m_end, |s, p, _| s.to_string() == lb1_ip && p == 0),
            "the sniffer sees the priority-0 advert"
        );
        assert!(mon1.vip_events().iter().any(|l| l.starts_with("Deleted")), "the monitor sees the VIP leave lb1");
        // `ip monitor` prints the event after the address is there: wait for its line.
        wait_for("the monitor to see the VIP on lb2", Duration::from_secs(10), || {
            mon2.vip_events().iter().any(|l| !l.starts_with("Deleted")).then_some(())
        });
    }));
    if let Err(e) = result {
        eprintln!("--- lb1 (all processes) ---\n{}", lb1.log_tail(80));
        if let Some(ka) = &ka {
            eprintln!("--- keepalived ---\n{}", ka.log_tail(40));
        }
        eprintln!("--- etcd ---\n{}", etcd.log_tail(10));
        std::panic::resume_unwind(e);
    }
}

/// Binary upgrade with the real binary, etcd lease election: pgfront on lb1 holds the VIP's key
/// in an etcd in the client namespace, pgfront on lb2 waits for it. Ten SIGUSR2 in a row: the
/// key keeps its value and its lease (each new process keeps that lease alive once the old one
/// is gone), lb2 stays backup and never gets the VIP, lb1 never loses it, and every session a
/// client opens on the VIP every 10 ms is served. Then SIGTERM deletes the key and lb2 takes over.
#[test]
fn binary_upgrades_keep_the_etcd_lease_and_key() {
    use binary::*;
    use inproc::AddrMonitor;
    let seg = Segment::new("k");
    let dir = tempfile::tempdir().unwrap();
    let etcd = start_etcd_in(&seg, dir.path());
    let endpoint = format!("http://{SUBNET}.100:2379");
    // The backends live on lb1's loopback: only lb1's pgfront can route to them.
    let _backends = EchoBackends::start(&seg, "lb1", "cli", &endpoint, "s");
    let lb1 = start_lease_host(&seg, dir.path(), "lb1");
    let mut lb2: Option<Proc> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_holder(&seg, "lb1", "lb2", Duration::from_secs(15));
        lb2 = Some(start_lease_host(&seg, dir.path(), "lb2"));
        let backup = wait_for("lb2 to be backup", Duration::from_secs(15), || {
            local_vip(&seg, "lb2").filter(|v| v["state"] == "backup")
        });
        let mon1 = AddrMonitor::start(&seg, "lb1", dir.path());
        let mon2 = AddrMonitor::start(&seg, "lb2", dir.path());
        let probe = ServiceProbe::start(&seg);
        probe.wait_served(20, Duration::from_secs(20));
        let p0 = probe.count();
        let (value, lease, _) = key_info(&seg, &endpoint).expect("the key exists");

        let began = std::time::Instant::now();
        let mut current = pid(&seg, "lb1").expect("pid in /status");
        for i in 0..10 {
            current = upgrade(&seg, "lb1", current, i);
            // The new process alone keeps the lease alive: its remaining TTL goes up again.
            let mut last = lease_ttl(&seg, &endpoint, lease);
            wait_for(&format!("upgrade {i}: the lease kept alive by the new process"), Duration::from_secs(10), || {
                let (v, l, ttl) = key_info(&seg, &endpoint).expect("the key stays");
                assert_eq!((v.as_str(), l), (value.as_str(), lease), "upgrade {i}: same key value, same lease");
                let up = ttl > last;
                last = ttl;
                up.then_some(())
            });
        }
        let storm = began.elapsed();
        probe.wait_more(100, Duration::from_secs(30));
        let (ok, failed, longest) = probe.finish(p0);
        eprintln!(
            "10 binary upgrades (etcd lease 3 s, pgfront peer) in {:.1} s: {ok} client sessions on the VIP served, {} failed (longest {longest:?}); key kept on lease {lease:x}",
            storm.as_secs_f64(),
            failed.len()
        );
        assert!(failed.is_empty(), "every client session on the VIP was served: {:?}", &failed[..failed.len().min(20)]);
        let peer = local_vip(&seg, "lb2").unwrap();
        assert_eq!(peer["state"], "backup", "{peer}");
        assert_eq!(peer["transitions"], backup["transitions"], "lb2 never moved: {peer}");
        let deleted: Vec<String> = mon1.vip_events().into_iter().filter(|l| l.starts_with("Deleted")).collect();
        assert!(deleted.is_empty(), "the VIP was never removed from lb1: {deleted:?}");
        assert!(mon2.vip_events().is_empty(), "the VIP never appeared on lb2: {:?}", mon2.vip_events());
        assert!(seg.holds_vip("lb1") && !seg.holds_vip("lb2"));
        assert_eq!(local_vip(&seg, "lb1").unwrap()["state"], "master");

        // A clean stop deletes the key: lb2 takes over.
        // SAFETY: a signal to the process this test's pgfront became.
        unsafe { libc::kill(current as i32, libc::SIGTERM) };
        wait_for("the VIP on lb2 alone", Duration::from_secs(10), || {
            (seg.holds_vip("lb2") && !seg.holds_vip("lb1")).then_some(())
        });
        wait_for("the last pgfront to exit", Duration::from_secs(30), || (!alive(current)).then_some(()));
        let (v, l, _) = key_info(&seg, &endpoint).expect("lb2's key");
        assert!(v != value && l != lease, "the key is lb2's now");
        // `ip monitor` prints the event after the address is there: wait for its line.
        wait_for("the monitor to see the VIP on lb2", Duration::from_secs(10), || {
            mon2.vip_events().iter().any(|l| !l.starts_with("Deleted")).then_some(())
        });
    }));
    if let Err(e) = result {
        eprintln!("--- lb1 (all processes) ---\n{}", lb1.log_tail(80));
        if let Some(lb2) = &lb2 {
            eprintln!("--- lb2 ---\n{}", lb2.log_tail(30));
        }
        eprintln!("--- etcd ---\n{}", etcd.log_tail(10));
        std::panic::resume_unwind(e);
    }
}
