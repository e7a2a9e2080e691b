//! A repmgr 5.3 cluster of PostgreSQL 15 for the integration tests: a primary and two
//! streaming replicas on loopback, registered with repmgr (`primary register`, `standby clone`,
//! `standby register`), each node with its own `repmgr.conf`, everything run as `postgres`.
//!
//! SSH: `repmgr standby switchover` runs its commands on the demotion candidate (and on the
//! siblings, with `--siblings-follow`) through `ssh -o Batchmode=yes <ssh_options> <host> <cmd>`,
//! with no option to skip ssh (repmgr 5.3, sysutils.c `make_remote_command`). All nodes are on
//! this host, so the guard puts an `ssh` of its own first in repmgr's PATH: it drops the options
//! and the host and runs the command with `/bin/sh -c`, as sshd would run it on that host.
//! repmgr itself — its checks, the clean shutdown, the promotion, `node rejoin` and `standby
//! follow` — runs unchanged. No sshd, no key, nothing changed in the postgres user's home.
//!
//! PostgreSQL is started and stopped with `pg_ctl` (repmgr's `service_*_command`), so a
//! postmaster runs detached from the test process: each data dir is recorded in `leftovers`
//! and `Drop` stops them (fast, then SIGQUIT).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::agent::Agent;
use super::{free_port, is_root, leftovers, pg_tempdir, postgres_ids, psql, require, wait_for, Etcd, PGBIN};

/// The table the switchover tests and benches write to (`write_loop`), made on the primary.
pub const PROBE_TABLE: &str = "CREATE TABLE pgfront_probe (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())";

/// The stack of the repmgr tests and benches: etcd, the repmgr cluster, an agent beside each
/// node publishing under `scope` with a lease of `agent_ttl` seconds, and [`PROBE_TABLE`] on
/// pg1. Returned apart so that each caller keeps its own drop order.
pub fn with_agents(scope: &str, agent_ttl: u64) -> (Etcd, Repmgr, Vec<Agent>) {
    let etcd = Etcd::start();
    let rm = Repmgr::start();
    let agents = rm.nodes.iter().map(|n| Agent::start(&etcd.endpoint(), scope, &n.name, n.port, agent_ttl)).collect();
    let (ok, _, err) = psql(rm.node("pg1").port, PROBE_TABLE);
    assert!(ok, "{err}");
    (etcd, rm, agents)
}

pub struct RepmgrNode {
    pub id: u32,
    pub name: String,
    pub port: u16,
    pub dir: PathBuf,
    pub data: PathBuf,
    pub conf: PathBuf,
    pub log: PathBuf,
}

pub struct Repmgr {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<RepmgrNode>,
    /// Where the `ssh` stand-in lives (first in repmgr's PATH).
    bin: PathBuf,
}

impl Repmgr {
    /// Builds and starts pg1 (primary), pg2 and pg3 (streaming replicas of pg1), all registered.
    pub fn start() -> Repmgr {
        assert!(is_root(), "the repmgr tests run as root (they run PostgreSQL and repmgr as the postgres user)");
        require(&format!("{PGBIN}/postgres"), "postgresql-15");
        require(&format!("{PGBIN}/repmgr"), "postgresql-15-repmgr repmgr");
        let dir = pg_tempdir();
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let ssh = bin.join("ssh");
        fs::write(
            &ssh,
            "#!/bin/sh\n# repmgr's remote commands, run on this host (every node is local): options and host dropped.\n\
             while [ $# -gt 0 ]; do\n  case \"$1\" in\n    -o|-p|-i|-l|-F|-E|-J) shift 2 ;;\n    -*) shift ;;\n    *) break ;;\n  esac\ndone\n\
             shift\ncd \"$HOME\" 2>/dev/null || cd /\nexec /bin/sh -c \"$*\"\n",
        )
        .unwrap();
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o755)).unwrap();
        let mut nodes = Vec::new();
        for id in 1..=3u32 {
            let name = format!("pg{id}");
            let ndir = dir.path().join(&name);
            fs::create_dir_all(&ndir).unwrap();
            let ndir = ndir.canonicalize().unwrap();
            fs::set_permissions(&ndir, fs::Permissions::from_mode(0o700)).unwrap();
            let data = ndir.join("data");
            leftovers::record("postmaster", &data.display().to_string());
            let node = RepmgrNode {
                id,
                port: free_port(),
                conf: ndir.join("repmgr.conf"),
                log: ndir.join("postgres.log"),
                data,
                dir: ndir,
                name,
            };
            let ctl = format!("{PGBIN}/pg_ctl");
            let conf = node_conf(id, &node.name, node.port, &node.data)
                + &format!(
                    "repmgr_bindir='{PGBIN}'\n\
                 use_replication_slots=yes\nssh_options='-q'\nlog_level='INFO'\n\
                 service_start_command='{ctl} -w -t 60 -D {data} -l {log} start'\n\
                 service_stop_command='{ctl} -w -t 60 -D {data} -m fast stop'\n\
                 service_restart_command='{ctl} -w -t 60 -D {data} -l {log} -m fast restart'\n\
                 service_reload_command='{ctl} -D {data} reload'\n\
                 service_promote_command='{ctl} -w -D {data} promote'\n\
                 shutdown_check_timeout=30\nstandby_reconnect_timeout=30\nnode_rejoin_timeout=30\n\
                 promote_check_timeout=30\n",
                    data = node.data.display(),
                    log = node.log.display(),
                );
            fs::write(&node.conf, conf).unwrap();
            nodes.push(node);
        }
        let (uid, gid) = postgres_ids();
        for n in &nodes {
            std::os::unix::fs::chown(&n.dir, Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(&n.conf, Some(uid), Some(gid)).unwrap();
        }
        std::os::unix::fs::chown(&bin, Some(uid), Some(gid)).unwrap();
        let r = Repmgr { dir, nodes, bin };
        // The primary.
        let p = &r.nodes[0];
        r.must(r.postgres_cmd(&format!("{PGBIN}/initdb")).args([
            "-D",
            p.data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]));
        fs::write(
            p.data.join("postgresql.auto.conf"),
            format!(
                "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nwal_level = replica\n\
                 max_wal_senders = 10\nmax_replication_slots = 10\nhot_standby = on\nwal_log_hints = on\n\
                 shared_preload_libraries = 'repmgr'\nfsync = off\nsynchronous_commit = off\nshared_buffers = 16MB\n\
                 max_connections = 100\nwal_keep_size = 256MB\n",
                p.port,
                p.dir.display()
            ),
        )
        .unwrap();
        fs::write(
            p.data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        std::os::unix::fs::chown(p.data.join("postgresql.auto.conf"), Some(uid), Some(gid)).unwrap();
        std::os::unix::fs::chown(p.data.join("pg_hba.conf"), Some(uid), Some(gid)).unwrap();
        r.pg_ctl(p, "start");
        r.repmgr(p, &["primary", "register"]);
        // The replicas: clone (pg_basebackup through repmgr), then per-node port and socket.
        for n in &r.nodes[1..] {
            r.repmgr(
                n,
                &["-h", "127.0.0.1", "-p", &p.port.to_string(), "-U", "postgres", "-d", "postgres", "standby", "clone"],
            );
            let auto = n.data.join("postgresql.auto.conf");
            let text = fs::read_to_string(&auto).unwrap_or_default();
            let text: String = text
                .lines()
                .filter(|l| !l.starts_with("port =") && !l.starts_with("unix_socket_directories ="))
                .map(|l| format!("{l}\n"))
                .collect();
            fs::write(&auto, format!("{text}port = {}\nunix_socket_directories = '{}'\n", n.port, n.dir.display()))
                .unwrap();
            r.pg_ctl(n, "start");
            r.repmgr(n, &["standby", "register"]);
        }
        r.wait_streaming("pg1", Duration::from_secs(60));
        r
    }

    pub fn node(&self, name: &str) -> &RepmgrNode {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// A command run as postgres, with the `ssh` stand-in first in its PATH.
    fn postgres_cmd(&self, program: &str) -> Command {
        postgres_command(program, self.dir.path(), Some(&self.bin))
    }

    fn must(&self, cmd: &mut Command) -> Output {
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn pg_ctl(&self, n: &RepmgrNode, action: &str) {
        let mut c = self.postgres_cmd(&format!("{PGBIN}/pg_ctl"));
        c.args(["-w", "-t", "60", "-D", n.data.to_str().unwrap(), "-l", n.log.to_str().unwrap()]);
        if action == "stop" {
            c.args(["-m", "fast"]);
        }
        c.arg(action);
        self.must(&mut c);
    }

    /// `repmgr -f <node's repmgr.conf> <args>`, as postgres; panics with its output on failure.
    pub fn repmgr(&self, n: &RepmgrNode, args: &[&str]) -> String {
        let out = self.try_repmgr(n, args);
        out.unwrap_or_else(|e| panic!("repmgr {args:?} on {}: {e}", n.name))
    }

    pub fn try_repmgr(&self, n: &RepmgrNode, args: &[&str]) -> Result<String, String> {
        run_repmgr(&n.conf, args, self.dir.path(), Some(&self.bin))
    }

    /// `pg_is_in_recovery()` of a node; None when it does not answer.
    pub fn in_recovery(&self, name: &str) -> Option<bool> {
        let (ok, out, _) = psql(self.node(name).port, "SELECT pg_is_in_recovery()");
        ok.then(|| out == "t")
    }

    /// Waits until `primary` is writable and both other nodes stream from it.
    pub fn wait_streaming(&self, primary: &str, limit: Duration) {
        let port = self.node(primary).port;
        wait_for(&format!("{primary} primary with 2 streaming replicas"), limit, || {
            let (ok, out, _) = psql(
                port,
                "SELECT pg_is_in_recovery()::text || ':' || (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming')",
            );
            (ok && out == "false:2").then_some(())
        });
    }

    /// The last lines of every node's PostgreSQL log, for a failing test's output.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let s = fs::read_to_string(&n.log).unwrap_or_default();
            let v: Vec<&str> = s.lines().collect();
            out.push_str(&format!(
                "--- {} (last {lines} lines) ---\n{}\n",
                n.name,
                v[v.len().saturating_sub(lines)..].join("\n")
            ));
        }
        out
    }
}

/// The lines of a `repmgr.conf` that name a node (`id`, `name`), its PostgreSQL on loopback
/// `port` and its data directory; a cluster run by repmgr adds its service commands.
pub fn node_conf(id: u32, name: &str, port: u16, data: &Path) -> String {
    format!(
        "node_id={id}\nnode_name='{name}'\n\
         conninfo='host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2'\n\
         data_directory='{}'\npg_bindir='{PGBIN}'\n",
        data.display()
    )
}

/// `program` to run as postgres in `dir` (also its HOME, so postgres must be able to enter
/// it), PostgreSQL's binaries in its PATH after `bin_first`, libpq's PGPORT/PGHOST removed.
pub fn postgres_command(program: &str, dir: &Path, bin_first: Option<&Path>) -> Command {
    let mut c = Command::new(program);
    let (uid, gid) = postgres_ids();
    let first = bin_first.map(|b| format!("{}:", b.display())).unwrap_or_default();
    let path = format!("{first}{PGBIN}:/usr/local/bin:/usr/bin:/bin");
    c.uid(uid).gid(gid).env("HOME", dir).env("USER", "postgres").env("PATH", path);
    c.env_remove("PGPORT").env_remove("PGHOST").current_dir(dir);
    c
}

/// `repmgr -f conf args` as postgres (see [`postgres_command`]): its output, or its exit
/// status and output.
pub fn run_repmgr(conf: &Path, args: &[&str], dir: &Path, bin_first: Option<&Path>) -> Result<String, String> {
    let out = postgres_command(&format!("{PGBIN}/repmgr"), dir, bin_first)
        .args(["-f", conf.to_str().unwrap()])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("exit {}:\n{text}", out.status))
    }
}

impl Drop for Repmgr {
    fn drop(&mut self) {
        leftovers::hold_if_stopping();
        for n in &self.nodes {
            if n.data.join("postmaster.pid").exists() {
                let _ = self
                    .postgres_cmd(&format!("{PGBIN}/pg_ctl"))
                    .args(["-w", "-t", "20", "-D", n.data.to_str().unwrap(), "-m", "fast", "stop"])
                    .output();
            }
            if let Some(pid) = fs::read_to_string(n.data.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            {
                unsafe {
                    if libc::kill(pid, 0) == 0 {
                        libc::kill(pid, libc::SIGQUIT);
                    }
                }
            }
        }
    }
}
