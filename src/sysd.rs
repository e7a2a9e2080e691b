//! Notifications to systemd (`Type=notify`): start-up finished, reloading, stopping, a status
//! line, and the new main pid after a binary upgrade. A thin layer over sd-notify that never
//! fails the caller: without `NOTIFY_SOCKET` (not run by systemd) every call is a no-op, and a
//! send error is logged, not returned, because a proxy must not stop serving over its status.
//!
//! systemd's rules these calls follow (see `systemd/pgfront.service`, `NotifyAccess=main`):
//! - only the main pid is heard. After a hand-over the *old* process, still the main pid, sends
//!   [`mainpid`] with the successor's pid; from then on only the successor is heard, and the old
//!   one, draining, must not send [`stopping`] (it would be ignored with a warning; with
//!   `NotifyAccess=all` it would stop the whole service);
//! - a successor is heard only once the old process's `MAINPID=` has been processed: it reports
//!   READY to the old process over the hand-over socket (`handover::Ready`), not to systemd, and
//!   a `STATUS=` it sends before that is dropped (systemd logs a warning);
//! - [`reloading`] carries `MONOTONIC_USEC`, which `Type=notify-reload` (systemd 253+) requires;
//!   the reload ends with [`ready`].
//!
//! The calls are short, synchronous sends of one datagram to a local socket; they can be made
//! from async code.

use std::io;

use sd_notify::NotifyState;
use tracing::warn;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Start-up (or a reload) is finished: systemd considers the service started (or reloaded).
pub(crate) fn ready() {
    log(send(&[NotifyState::Ready]), "READY=1");
}

/// A reload has begun (SIGHUP); end it with [`ready`]. `MONOTONIC_USEC` is the time the reload
/// request was taken, so systemd 253+ can tell this reload from an earlier one.
pub(crate) fn reloading() {
    let now = match NotifyState::monotonic_usec_now() {
        Ok(now) => now,
        Err(e) => {
            warn!(error = %e, "systemd notification RELOADING=1 not sent: cannot read CLOCK_MONOTONIC");
            return;
        }
    };
    log(send(&[NotifyState::Reloading, now]), "RELOADING=1");
}

/// The service is stopping (SIGTERM). Not to be sent by a process that handed over to a
/// successor (it is no longer the service).
pub(crate) fn stopping() {
    log(send(&[NotifyState::Stopping]), "STOPPING=1");
}

/// One line shown by `systemctl status`, e.g. "2 listeners, primary pg2, VIP master". Line breaks
/// become spaces, so a status can never smuggle in another assignment such as `STOPPING=1`.
pub(crate) fn status(line: &str) {
    let line = one_line(line);
    log(send(&[NotifyState::Status(&line)]), "STATUS=");
}

/// Makes `pid` the service's main pid; sent by the current main pid once its successor is ready.
pub(crate) fn mainpid(pid: u32) {
    log(send(&[NotifyState::MainPid(pid)]), "MAINPID=");
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// Sends one datagram; `Ok(false)` when there is no `NOTIFY_SOCKET` to send it to.
fn send(states: &[NotifyState<'_>]) -> io::Result<bool> {
    if !matches!(std::env::var_os(NOTIFY_SOCKET), Some(s) if !s.is_empty()) {
        return Ok(false);
    }
    sd_notify::notify(states).map(|()| true)
}

fn log(r: io::Result<bool>, what: &str) {
    if let Err(e) = r {
        warn!(error = %e, "systemd notification {what} not sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    const CHILD_MODE: &str = "PGFRONT_TEST_SYSD_MODE";

    /// Runs `child_notifies` in a child process with `env` (the environment is process-wide, so
    /// tests never change their own).
    fn run_child(mode: &str, env: &[(&str, &std::ffi::OsStr)], remove_notify_socket: bool) {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["--exact", "sysd::tests::child_notifies", "--ignored", "--test-threads=1", "--nocapture"])
            .env(CHILD_MODE, mode)
            .envs(env.iter().copied());
        if remove_notify_socket {
            cmd.env_remove(NOTIFY_SOCKET);
        }
        let out = cmd.output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "child ({mode}) failed:\n{text}");
        assert!(text.contains("1 passed"), "child ({mode}) did not run its test:\n{text}");
    }

    fn monotonic_usec() -> i128 {
        match NotifyState::monotonic_usec_now().unwrap() {
            NotifyState::MonotonicUsec(u) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn notifications_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let before = monotonic_usec();
        run_child("send", &[(NOTIFY_SOCKET, path.as_os_str())], false);
        let after = monotonic_usec();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..7 {
            let n = sock.recv(&mut buf).unwrap();
            got.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        // The first one comes from `send` itself, the others from the public calls.
        let got = &got[1..];
        assert_eq!(got[0], "READY=1\n");
        assert_eq!(got[1], "STATUS=2 listeners, primary pg2, VIP master\n");
        let usec: i128 = got[2]
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("{:?}", got[2]))
            .parse()
            .unwrap();
        assert!(before <= usec && usec <= after, "MONOTONIC_USEC {usec} not within [{before}, {after}]");
        assert_eq!(got[3], "STATUS=bad STOPPING=1\n", "a status is one line");
        assert_eq!(got[4], "MAINPID=4242\n");
        assert_eq!(got[5], "STOPPING=1\n");
        sock.set_nonblocking(true).unwrap();
        assert!(sock.recv(&mut buf).is_err(), "nothing more was sent");
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_errors_are_not_fatal() {
        run_child("absent", &[], true);
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nobody-listens");
        run_child("broken", &[(NOTIFY_SOCKET, missing.as_os_str())], false);
    }

    /// Not a test on its own: the child side of the tests above (does nothing without them).
    #[test]
    #[ignore = "run by the tests above in a child process"]
    fn child_notifies() {
        let Ok(mode) = std::env::var(CHILD_MODE) else { return };
        match mode.as_str() {
            "send" => {
                assert!(send(&[NotifyState::Ready]).unwrap(), "NOTIFY_SOCKET set: sent");
                ready();
                status("2 listeners, primary pg2, VIP master");
                reloading();
                status("bad\nSTOPPING=1");
                mainpid(4242);
                stopping();
            }
            "absent" => {
                assert!(!send(&[NotifyState::Ready]).unwrap(), "no NOTIFY_SOCKET: nothing sent");
                ready();
                reloading();
                stopping();
                status("x");
                mainpid(1);
            }
            "broken" => {
                assert!(send(&[NotifyState::Ready]).is_err(), "a socket nobody listens on is an error");
                // ...that the public calls log and survive.
                ready();
                reloading();
                stopping();
                status("x");
                mainpid(1);
            }
            other => panic!("unknown mode {other}"),
        }
    }
}
