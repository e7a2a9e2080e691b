//! `systemd-analyze verify` on `systemd/pgfront.service`, offline (no systemd as PID 1 needed),
//! through a copy of the unit whose `/usr/bin/pgfront` is this build's binary (verify checks that
//! every Exec*= command exists and is executable). `systemd-analyze` exits 0 even when it ignores
//! a line it cannot parse, so any diagnostic about the unit counts as a failure.
//!
//! Also pins the choices the daemon relies on (Type=notify, NotifyAccess=main, the reload pair,
//! the runtime directory of the hand-over socket, the VIP release after a stop).

use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = include_str!("../systemd/pgfront.service");
const AGENT_UNIT: &str = include_str!("../systemd/pgfront-agent.service");

fn systemd_analyze() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("systemd-analyze not found: apt-get install systemd (works without systemd as PID 1)")
    })
}

/// Verifies `text` as `pgfront.service`; returns the diagnostics (empty when clean).
fn verify(text: &str) -> Vec<String> {
    verify_as(text, "pgfront.service")
}

fn verify_as(text: &str, name: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join(name);
    std::fs::write(&unit, text.replace("/usr/bin/pgfront", env!("CARGO_BIN_EXE_pgfront"))).unwrap();
    let out = Command::new(systemd_analyze()).arg("verify").arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems: Vec<String> = stderr
        .lines()
        .filter(|l| l.contains(&*unit.to_string_lossy()) || l.contains("pgfront"))
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        problems.push(format!("systemd-analyze verify exited with {}: {stderr}", out.status));
    }
    // What systemd said about other units (none here) is shown, not judged.
    for l in stderr.lines().filter(|l| !problems.iter().any(|p| p.contains(*l))) {
        eprintln!("systemd-analyze (other unit): {l}");
    }
    problems
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let problems = verify(UNIT);
    assert!(problems.is_empty(), "systemd/pgfront.service:\n{}", problems.join("\n"));
}

#[test]
fn verify_reports_what_systemd_would_ignore() {
    // The check above must be able to fail: a value systemd 252 does not know (notify-reload
    // came in 253) is only a warning with exit code 0, and must still be reported.
    let broken = UNIT.replace("Type=notify\n", "Type=no-such-type\n");
    assert_ne!(broken, UNIT);
    let problems = verify(&broken);
    assert!(problems.iter().any(|p| p.contains("Type") || p.contains("service type")), "{problems:?}");
    // (systemd 252 checks ExecStart=, ExecStartPre= and ExecStopPost= commands, not ExecReload=.)
    let missing = UNIT.replace("ExecStopPost=/usr/bin/pgfront", "ExecStopPost=/nonexistent/pgfront");
    assert_ne!(missing, UNIT);
    assert!(!verify(&missing).is_empty(), "a missing executable is reported");
}

fn service_values(key: &str) -> Vec<&'static str> {
    service_values_of(UNIT, key)
}

fn service_values_of(unit: &'static str, key: &str) -> Vec<&'static str> {
    let mut in_service = false;
    let mut values = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service {
            if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                values.push(v);
            }
        }
    }
    values
}

#[test]
fn unit_keeps_the_reload_and_upgrade_contract() {
    assert_eq!(service_values("Type"), ["notify"]);
    assert_eq!(service_values("NotifyAccess"), ["main"], "the successor is made main by MAINPID= from the old one");
    assert_eq!(service_values("RuntimeDirectory"), ["pgfront"], "the hand-over socket lives in /run/pgfront");
    let reload = service_values("ExecReload");
    assert_eq!(reload.len(), 2, "{reload:?}");
    assert!(reload[0].contains("config check -c /etc/pgfront/pgfront.toml"), "check first: {reload:?}");
    assert_eq!(reload[1], "/bin/kill -HUP $MAINPID");
    assert!(service_values("ExecStopPost").iter().any(|v| v.contains("vip release")));
    let start = service_values("ExecStart");
    assert_eq!(
        start,
        ["/usr/bin/pgfront proxy -c /etc/pgfront/pgfront.toml"],
        "argv[0] is the path an upgrade replaces"
    );
    assert!(Path::new(env!("CARGO_BIN_EXE_pgfront")).is_file());
}

#[test]
fn agent_unit_passes_systemd_analyze_verify() {
    let problems = verify_as(AGENT_UNIT, "pgfront-agent.service");
    assert!(problems.is_empty(), "systemd/pgfront-agent.service:\n{}", problems.join("\n"));
    let broken = AGENT_UNIT.replace("ExecStart=/usr/bin/pgfront", "ExecStart=/nonexistent/pgfront");
    assert_ne!(broken, AGENT_UNIT);
    assert!(!verify_as(&broken, "pgfront-agent.service").is_empty(), "a missing executable is reported");
}

#[test]
fn agent_unit_keeps_its_contract() {
    let v = |k| service_values_of(AGENT_UNIT, k);
    assert_eq!(v("Type"), ["notify"], "the agent sends READY=1");
    assert_eq!(v("ExecStart"), ["/usr/bin/pgfront agent -c /etc/pgfront/agent.toml"]);
    assert_eq!(v("ExecStartPre"), ["/usr/bin/pgfront config check --agent -c /etc/pgfront/agent.toml"]);
    assert_eq!(v("KillSignal"), ["SIGTERM"], "SIGTERM revokes the lease: the key goes at once");
    // The state file's default directory (a drained node stays drained across restarts).
    assert_eq!(v("StateDirectory"), ["pgfront-agent"]);
    assert!(pgfront::config::agent::DEFAULT_AGENT_STATE_FILE.starts_with("/var/lib/pgfront-agent/"));
    assert_eq!(v("Restart"), ["always"]);
}
