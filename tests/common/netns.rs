//! A private Ethernet segment in network namespaces, as ../shared/NETNS.md lays it out:
//!
//! ```text
//!  <id>-lb1  eth0 198.51.100.11/24 ── v-lb1 ┐
//!  <id>-lb2  eth0 198.51.100.12/24 ── v-lb2 ├─ br0 (in <id>-lan)
//!  <id>-cli  eth0 198.51.100.100/24 ─ v-cli ┘
//! ```
//! Nothing touches the host's own namespace: every address, packet and daemon lives in the
//! namespaces this guard creates, and `Drop` deletes them all, even after a failed assertion.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

pub const SUBNET: &str = "198.51.100";
pub const VIP: &str = "198.51.100.10";
/// The IPv6 VIP (documentation prefix, inside the namespaces only).
pub const VIP6: &str = "2001:db8::10";

pub struct Segment {
    pub id: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).current_dir("/").output().expect("ip (apt-get install iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Segment {
    /// Builds the segment. Needs root.
    pub fn new(tag: &str) -> Segment {
        assert!(super::is_root(), "network namespace tests need root");
        super::require("ip", "iproute2");
        // The full pid: no live process shares it, so a namespace of that name is a leftover
        // of a dead run, and is removed.
        let id = format!("pf{}{}", tag, std::process::id());
        let s = Segment { id: id.clone() };
        for n in ["lan", "lb1", "lb2", "cli"] {
            super::leftovers::record("netns", &s.ns(n));
            if std::path::Path::new("/var/run/netns").join(s.ns(n)).exists() {
                ip(&["netns", "del", &s.ns(n)]);
            }
            ip(&["netns", "add", &s.ns(n)]);
            ip(&["-n", &s.ns(n), "link", "set", "lo", "up"]);
        }
        for n in ["lb1", "lb2", "cli"] {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &s.ns(n),
                    "sysctl",
                    "-qw",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.ipv4.conf.all.arp_ignore=0",
                    "net.ipv4.conf.all.arp_accept=0",
                    // Link-local addresses usable at once (no ~1.5 s of duplicate address detection).
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "sysctl in {n}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let lan = s.ns("lan");
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"]);
        ip(&["-n", &lan, "link", "set", "br0", "up"]);
        for (n, host) in [("lb1", 11), ("lb2", 12), ("cli", 100)] {
            let v = format!("v-{n}");
            ip(&["-n", &lan, "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", &s.ns(n)]);
            ip(&["-n", &lan, "link", "set", &v, "master", "br0"]);
            ip(&["-n", &lan, "link", "set", &v, "up"]);
            ip(&["-n", &s.ns(n), "addr", "add", &format!("{SUBNET}.{host}/24"), "dev", "eth0"]);
            ip(&["-n", &s.ns(n), "link", "set", "eth0", "up"]);
        }
        s
    }

    pub fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.id)
    }

    /// Whether the namespace `n` has the VIP on its eth0.
    pub fn holds_vip(&self, n: &str) -> bool {
        self.holds(n, VIP)
    }

    /// Whether the namespace `n` has `addr` on its eth0.
    pub fn holds(&self, n: &str, addr: &str) -> bool {
        let out = Command::new("ip").args(["-n", &self.ns(n), "-o", "addr", "show", "dev", "eth0"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/"))
    }

    pub fn link(&self, n: &str, up: bool) {
        ip(&["-n", &self.ns("lan"), "link", "set", &format!("v-{n}"), if up { "up" } else { "down" }]);
    }

    /// A command run inside namespace `n`.
    pub fn cmd(&self, n: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(n), program]);
        c
    }

    /// Runs `f` on a thread that has entered namespace `n` (setns affects that thread only).
    pub fn run_in<T: Send + 'static>(&self, n: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(n, f).join().unwrap()
    }

    /// `run_in` without waiting: the thread (and every socket it, or a thread it starts,
    /// creates) lives in namespace `n`. For in-process daemons: a current-thread tokio runtime
    /// built on this thread keeps all its I/O there.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        n: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(n));
        std::thread::spawn(move || {
            let f_ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a namespace file we hold open; it changes this thread only.
            let r = unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        for n in ["cli", "lb1", "lb2", "lan"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).output();
        }
    }
}

/// Asks whoever holds the VIP, from the client namespace, which host it is: an HTTP GET of
/// pgfront's `/status` (whose first listener is named after the host) or of keepalived's
/// stand-in. Returns the host name, or None if nobody answered within `limit`.
pub fn who_answers(port: u16, limit: Duration) -> Option<String> {
    who_answers_at(format!("{VIP}:{port}").parse().unwrap(), limit)
}

/// `who_answers` for any address (e.g. `[2001:db8::10]:7000`).
pub fn who_answers_at(addr: std::net::SocketAddr, limit: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.write_all(b"GET /status HTTP/1.0\r\n\r\n").ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    let body = b.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["listeners"][0]["name"].as_str().map(str::to_owned)
}

/// The admin port of every pgfront in the namespaces (each has its own stack).
pub const ADMIN: u16 = 7000;

pub struct Vrrp {
    pub priority: u8,
    pub version: u8,
    pub interval: &'static str,
    pub preempt: bool,
}

/// Health ties off: these namespaces have no etcd, so every proxy is "unfit" and equal
/// weights would only shift both priorities alike; the health test turns them on.
pub const NO_TIES: &str = "health_weight = 0\n";

pub fn config_with(host: &str, vrrp: Option<&Vrrp>, extra: &str) -> String {
    let mut c = format!(
        "[admin]\nlisten = \"0.0.0.0:{ADMIN}\"\n[[cluster]]\nname = \"c\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n\
         [[listener]]\nname = \"{host}\"\ncluster = \"c\"\nbind = \"0.0.0.0:5432\"\n"
    );
    if let Some(v) = vrrp {
        c.push_str(&format!(
            "[[vip]]\nname = \"rw\"\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\nvrid = 51\npriority = {}\nversion = {}\n\
             advert_interval = \"{}\"\npreempt = {}\n",
            v.priority, v.version, v.interval, v.preempt
        ));
        if v.version == 2 {
            c.push_str("auth_pass = \"secret\"\n");
        }
        c.push_str(extra);
    }
    c
}

/// pgfront running inside namespace `n` of `seg`.
pub fn start_pgfront(seg: &Segment, dir: &std::path::Path, n: &str, vrrp: Option<&Vrrp>) -> super::Proc {
    start_pgfront_with(seg, dir, n, vrrp, NO_TIES)
}

pub fn start_pgfront_with(
    seg: &Segment,
    dir: &std::path::Path,
    n: &str,
    vrrp: Option<&Vrrp>,
    extra: &str,
) -> super::Proc {
    let cfg = dir.join(format!("{n}.toml"));
    std::fs::write(&cfg, config_with(n, vrrp, extra)).unwrap();
    let mut cmd = seg.cmd(n, super::pgfront_bin().to_str().unwrap());
    cmd.args(["proxy", "-c", cfg.to_str().unwrap()]).env("RUST_LOG", "info,pgfront::vip=debug");
    super::Proc::spawn(n, cmd, &dir.join(format!("{n}.log")), false)
}

pub fn start_keepalived(
    seg: &Segment,
    dir: &std::path::Path,
    n: &str,
    priority: u8,
    version: u8,
    interval: &str,
) -> super::Proc {
    let bin = super::require("keepalived", "keepalived");
    let cfg = dir.join(format!("{n}-keepalived.conf"));
    let auth = if version == 2 { "  authentication {\n    auth_type PASS\n    auth_pass secret\n  }\n" } else { "" };
    std::fs::write(
        &cfg,
        format!(
            "global_defs {{\n  router_id {n}\n  vrrp_version {version}\n  script_user root\n  enable_script_security\n}}\n\
             vrrp_instance rw {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {priority}\n  advert_int {interval}\n{auth}\
               virtual_ipaddress {{\n    {VIP}/24 dev eth0\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let pid = |k: &str| dir.join(format!("{n}-{k}.pid")).to_str().unwrap().to_owned();
    // A SIGKILLed keepalived leaves its pid files; with the pid reused, the next one would
    // refuse to start ("daemon is already running").
    for k in ["main", "vrrp", "checkers"] {
        let _ = std::fs::remove_file(pid(k));
    }
    let mut cmd = seg.cmd(n, bin.to_str().unwrap());
    cmd.args([
        "-n",
        "-l",
        "-D",
        "-P",
        "-f",
        cfg.to_str().unwrap(),
        "-p",
        &pid("main"),
        "-r",
        &pid("vrrp"),
        "-c",
        &pid("checkers"),
    ]);
    super::Proc::spawn(&format!("{n}-keepalived"), cmd, &dir.join(format!("{n}-keepalived.log")), false)
}

/// Which host answers on the VIP, asked from the client namespace.
pub fn answers(seg: &Segment) -> Option<String> {
    seg.run_in("cli", || who_answers(ADMIN, Duration::from_millis(500)))
}

pub fn wait_holder(seg: &Segment, n: &str, other: &str, limit: Duration) {
    super::wait_for(&format!("{n} to hold the VIP alone"), limit, || {
        (seg.holds_vip(n) && !seg.holds_vip(other)).then_some(())
    });
    super::wait_for(&format!("the client to reach {n} on the VIP"), limit, || {
        (answers(seg).as_deref() == Some(n)).then_some(())
    });
}

/// Injects a failure, and returns how long until the client is served by `new`: a probe
/// starts a short connect every 10 ms without waiting for the previous one.
pub fn failover(seg: &Segment, new: &str, inject: impl FnOnce()) -> Duration {
    failover_at(seg, format!("{VIP}:{ADMIN}").parse().unwrap(), new, inject)
}

/// `failover`, probing `target` (the VIP and admin port) from the client namespace.
pub fn failover_at(seg: &Segment, target: std::net::SocketAddr, new: &str, inject: impl FnOnce()) -> Duration {
    let want = new.to_owned();
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let probe = {
        let path = format!("/var/run/netns/{}", seg.ns("cli"));
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(&path).unwrap();
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let t_inject = rx.recv().unwrap();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<Instant>();
            let end = t_inject + Duration::from_secs(15);
            while Instant::now() < end {
                if let Ok(t) = done_rx.try_recv() {
                    return Some(t - t_inject);
                }
                let (want, done_tx) = (want.clone(), done_tx.clone());
                // Threads inherit this thread's network namespace.
                std::thread::spawn(move || {
                    if who_answers_at(target, Duration::from_millis(300)).as_deref() == Some(want.as_str()) {
                        let _ = done_tx.send(Instant::now());
                    }
                });
                std::thread::sleep(Duration::from_millis(10));
            }
            done_rx.try_recv().ok().map(|t| t - t_inject)
        })
    };
    // A random offset within the advert interval (up to 1 s), as a real failure would fall.
    let jitter =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) % 1000;
    std::thread::sleep(Duration::from_millis(100 + u64::from(jitter)));
    let t = Instant::now();
    inject();
    tx.send(t).unwrap();
    probe.join().unwrap().unwrap_or_else(|| panic!("the client was not served by {new} within 15 s"))
}

/// etcd inside the client namespace, reachable from both LB hosts over the segment.
pub fn start_etcd_in(seg: &Segment, dir: &std::path::Path) -> super::Proc {
    let bin = super::require("etcd", "etcd-server");
    let mut cmd = seg.cmd("cli", bin.to_str().unwrap());
    let url = format!("http://{SUBNET}.100:2379");
    cmd.args([
        "--name",
        "seg",
        "--data-dir",
        dir.join("etcd").to_str().unwrap(),
        "--listen-client-urls",
        &url,
        "--advertise-client-urls",
        &url,
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        "seg=http://127.0.0.1:2380",
    ]);
    let p = super::Proc::spawn("etcd", cmd, &dir.join("etcd.log"), false);
    super::wait_for("etcd in the client namespace", Duration::from_secs(20), || {
        let health = format!("{url}/health");
        seg.run_in("cli", move || super::http_get(&health)).filter(|(s, _)| *s == 200).map(|_| ())
    });
    p
}

pub fn start_lease_host(seg: &Segment, dir: &std::path::Path, n: &str) -> super::Proc {
    let cfg = dir.join(format!("{n}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[admin]\nlisten = \"0.0.0.0:{ADMIN}\"\n[[cluster]]\nname = \"c\"\nscope = \"s\"\netcd_endpoints = [\"http://{SUBNET}.100:2379\"]\n\
             etcd_timeout = \"1s\"\n[[listener]]\nname = \"{n}\"\ncluster = \"c\"\nbind = \"0.0.0.0:5432\"\n\
             [[vip]]\nname = \"rw\"\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\nelection = \"etcd\"\netcd_cluster = \"c\"\n\
             lease_ttl = \"3s\"\nhealth_weight = 0\n"
        ),
    )
    .unwrap();
    let mut cmd = seg.cmd(n, super::pgfront_bin().to_str().unwrap());
    cmd.args(["proxy", "-c", cfg.to_str().unwrap()]);
    super::Proc::spawn(n, cmd, &dir.join(format!("{n}.log")), false)
}

/// etcd inside namespace `n`, on that namespace's loopback only (`http://127.0.0.1:2379` there):
/// the discovery of a pgfront in the same namespace, out of reach of every other one.
pub fn start_etcd_loopback(seg: &Segment, dir: &std::path::Path, n: &str) -> super::Proc {
    let bin = super::require("etcd", "etcd-server");
    let mut cmd = seg.cmd(n, bin.to_str().unwrap());
    let url = "http://127.0.0.1:2379";
    cmd.args([
        "--name",
        n,
        "--data-dir",
        dir.join(format!("etcd-{n}")).to_str().unwrap(),
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-advertise-peer-urls",
        "http://127.0.0.1:2380",
        "--initial-cluster",
        &format!("{n}=http://127.0.0.1:2380"),
    ]);
    let p = super::Proc::spawn(&format!("{n}-etcd"), cmd, &dir.join(format!("{n}-etcd.log")), false);
    super::wait_for(&format!("etcd on the loopback of {n}"), Duration::from_secs(20), || {
        seg.run_in(n, move || super::http_get(&format!("{url}/health"))).filter(|(s, _)| *s == 200).map(|_| ())
    });
    p
}

/// Two echo "databases" (see `super::echo`) on the loopback of namespace `n`, published as the
/// primary and the replica of Patroni scope `scope` in the etcd at `etcd` (reached from namespace
/// `etcd_ns`): a pgfront in `n` routes its primary listener to them. They stop on drop.
pub struct EchoBackends {
    pub primary: u16,
    pub replica: u16,
    stop: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoBackends {
    pub fn start(seg: &Segment, n: &str, etcd_ns: &str, etcd: &str, scope: &str) -> EchoBackends {
        let stop = tokio_util::sync::CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = stop.clone();
        let thread = seg.spawn_in(n, move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let ports = (super::echo::echo_server(s2.clone()).await, super::echo::echo_server(s2.clone()).await);
                let _ = tx.send(ports);
                s2.cancelled().await;
            });
        });
        let (primary, replica) = rx.recv_timeout(Duration::from_secs(10)).expect("echo backends bound");
        let (etcd, scope) = (etcd.to_owned(), scope.to_owned());
        seg.run_in(etcd_ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(super::echo::put_keys(&etcd, &scope, primary, replica));
        });
        EchoBackends { primary, replica, stop, thread: Some(thread) }
    }
}

impl Drop for EchoBackends {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// pgfront's `/status` in namespace `n`, asked on that namespace's loopback (admin port).
pub fn local_status(seg: &Segment, n: &str) -> Option<serde_json::Value> {
    let (code, body) = seg.run_in(n, || super::http_get(&format!("http://127.0.0.1:{ADMIN}/status")))?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}
