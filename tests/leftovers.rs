//! The test suite cleans up after itself when a test process is killed (tests/common,
//! `leftovers`): a helper test process starts etcd (a direct child, as etcd, Patroni and
//! pgfront are) and a PostgreSQL postmaster in a session of its own (as Patroni starts it),
//! then is killed.
//! - SIGTERM: it stops both and removes its temp dirs before it dies.
//! - SIGKILL: etcd dies with it (PR_SET_PDEATHSIG); the postmaster survives, and the sweep
//!   the next test process runs first stops it, by the PID in its data dir.
//!
//! Needs root (PostgreSQL runs as the postgres user), etcd-server and postgresql-15.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const HELPER: &str = "helper_starts_etcd_and_a_postmaster";
const HELPER_ENV: &str = "PGFRONT_LEFTOVERS_HELPER";

/// Run only as the helper process (ignored in a normal run): starts the processes, reports
/// them on stdout, and waits until its stdin closes (or it is killed).
#[test]
#[ignore = "the helper process of the other tests in this file"]
fn helper_starts_etcd_and_a_postmaster() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let etcd = Etcd::start();
    let dir = pg_tempdir();
    let data = dir.path().canonicalize().unwrap().join("data");
    let (uid, gid) = postgres_ids();
    let initdb = Command::new(format!("{PGBIN}/initdb"))
        .args(["-N", "-A", "trust", "-D", data.to_str().unwrap()])
        .uid(uid)
        .gid(gid)
        .current_dir(dir.path())
        .output()
        .expect("initdb");
    assert!(initdb.status.success(), "initdb: {}", String::from_utf8_lossy(&initdb.stderr));
    leftovers::record("postmaster", &data.display().to_string());
    // `setsid -f`: the postmaster in a new session, not a child of this process, like
    // Patroni's postmasters.
    let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
    let st = Command::new(require("setsid", "util-linux"))
        .arg("-f")
        .arg(format!("{PGBIN}/postgres"))
        .args(["-D", data.to_str().unwrap(), "-c", "listen_addresses=", "-c"])
        .arg(format!("unix_socket_directories={}", dir.path().display()))
        .args(["-c", "shared_buffers=16MB", "-c", "fsync=off"])
        .uid(uid)
        .gid(gid)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .expect("setsid");
    assert!(st.success());
    let pm = wait_for("the postmaster ready", Duration::from_secs(30), || {
        let pid = std::fs::read_to_string(data.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = pid.lines().collect();
        (lines.get(7).map(|l| l.trim()) == Some("ready")).then(|| lines[0].trim().parse::<i32>().ok()).flatten()
    });
    let ids = |pid: i32| format!("{pid} {}", leftovers::start_time(pid).unwrap());
    // On lines of their own: libtest's "test ... " has no newline yet.
    println!("\nhelper: etcd {}", ids(etcd.proc.pid()));
    println!("helper: postmaster {}", ids(pm));
    println!("helper: dir {}", etcd.dir.path().display());
    println!("helper: dir {}", dir.path().display());
    println!("helper: READY");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    // Not killed after all: stop the postmaster before its data dir goes with `dir`.
    let t = leftovers::start_time(pm);
    // SAFETY: kill(2) on the postmaster this process started.
    unsafe { libc::kill(pm, libc::SIGQUIT) };
    wait_for("the postmaster to stop", Duration::from_secs(15), || (leftovers::start_time(pm) != t).then_some(()));
}

struct Helper {
    child: std::process::Child,
    etcd: (i32, u64),
    postmaster: (i32, u64),
    dirs: Vec<PathBuf>,
}

impl Helper {
    fn start() -> Helper {
        assert!(is_root(), "needs root: PostgreSQL runs as the postgres user");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", HELPER, "--ignored", "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .current_dir("/")
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (mut etcd, mut postmaster, mut dirs) = (None, None, Vec::new());
        for line in out.lines() {
            let line = line.unwrap();
            let Some(line) = line.strip_prefix("helper: ") else { continue };
            let ids = |s: &str| {
                let (p, t) = s.split_once(' ').unwrap();
                (p.parse().unwrap(), t.parse().unwrap())
            };
            match line.split_once(' ') {
                Some(("etcd", r)) => etcd = Some(ids(r)),
                Some(("postmaster", r)) => postmaster = Some(ids(r)),
                Some(("dir", d)) => dirs.push(PathBuf::from(d)),
                _ if line == "READY" => break,
                _ => {}
            }
        }
        let (Some(etcd), Some(postmaster)) = (etcd, postmaster) else {
            panic!("the helper process ended before it was ready: {:?}", child.wait());
        };
        Helper { child, etcd, postmaster, dirs }
    }

    fn kill(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.child.wait().unwrap()
    }

    fn record(&self) -> PathBuf {
        let pid = self.child.id() as i32;
        let start = std::fs::read_dir(leftovers::DIR)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(&format!("reg-{pid}-")));
        Path::new(leftovers::DIR).join(start.unwrap_or_default())
    }
}

fn alive((pid, start): (i32, u64)) -> bool {
    leftovers::start_time(pid) == Some(start)
}

fn wait_gone(what: &str, p: (i32, u64)) {
    wait_for(&format!("{what} ({}) to be gone", p.0), Duration::from_secs(15), || (!alive(p)).then_some(()));
}

#[test]
fn sigterm_stops_what_the_test_process_started() {
    let mut h = Helper::start();
    assert!(h.record().is_file(), "the helper keeps a record in {}", leftovers::DIR);
    let record = h.record();
    let st = h.kill(libc::SIGTERM);
    assert_eq!(st.signal(), Some(libc::SIGTERM), "the test process still dies of SIGTERM: {st:?}");
    wait_gone("etcd", h.etcd);
    wait_gone("the postmaster", h.postmaster);
    for d in &h.dirs {
        assert!(!d.exists(), "{} removed", d.display());
    }
    assert!(!record.exists(), "the record is gone with the test process");
}

#[test]
fn after_sigkill_the_next_test_process_stops_the_postmaster() {
    let mut h = Helper::start();
    let record = h.record();
    let st = h.kill(libc::SIGKILL);
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    wait_gone("etcd (PR_SET_PDEATHSIG)", h.etcd);
    // Not a child: only the record can find it.
    assert!(alive(h.postmaster), "the postmaster outlives a SIGKILLed test process");
    assert!(record.is_file());
    // What the first guard of the next test process does.
    let done = leftovers::sweep();
    assert!(
        done.iter().any(|l| l.contains(&format!("stopped the postmaster {}", h.postmaster.0))),
        "the sweep stopped the postmaster: {done:?}"
    );
    wait_gone("the postmaster", h.postmaster);
    for d in &h.dirs {
        assert!(!d.exists(), "{} removed", d.display());
    }
    assert!(!record.exists());
}
