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
use std::time::Duration;

pub const SUBNET: &str = "198.51.100";
pub const VIP: &str = "198.51.100.10";

pub struct Segment {
    pub id: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (apt-get install iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Segment {
    /// Builds the segment. Needs root.
    pub fn new(tag: &str) -> Segment {
        assert!(super::is_root(), "network namespace tests need root");
        super::require("ip", "iproute2");
        let id = format!("pf{}{}", tag, std::process::id() % 100000);
        let s = Segment { id: id.clone() };
        for n in ["lan", "lb1", "lb2", "cli"] {
            ip(&["netns", "add", &s.ns(n)]);
            ip(&["-n", &s.ns(n), "link", "set", "lo", "up"]);
        }
        for n in ["lb1", "lb2", "cli"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &s.ns(n), "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.all.arp_ignore=0", "net.ipv4.conf.all.arp_accept=0"])
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
        let out = Command::new("ip").args(["-n", &self.ns(n), "-4", "-o", "addr", "show", "dev", "eth0"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains(&format!(" {VIP}/"))
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
        let path = format!("/var/run/netns/{}", self.ns(n));
        std::thread::spawn(move || {
            let f_ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a namespace file we hold open; it changes this thread only.
            let r = unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
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
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{VIP}:{port}").parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.write_all(b"GET /status HTTP/1.0\r\n\r\n").ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    let body = b.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["listeners"][0]["name"].as_str().map(str::to_owned)
}
