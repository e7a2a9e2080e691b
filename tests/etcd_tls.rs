//! pgfront against a real etcd 3.4 with TLS and authentication: certificates made by the test
//! with the `openssl` CLI (a CA, a server certificate for IP 127.0.0.1, a client certificate),
//! Patroni-format keys written with `etcdctl`, members that are TCP echo servers on loopback.
//!
//! Each scenario checks that pgfront routes the leader named in etcd, that a connection through
//! the primary listener reaches that member's echo server, and that a leader change is
//! followed; the negative clusters (wrong password, no client certificate) must log a clear
//! error, route nothing, report `pgfront_etcd_up 0`, not panic and not log a password.
//!
//! | test | etcd | clusters in one pgfront |
//! |---|---|---|
//! | `v3_and_v2_over_tls_with_a_ca` | server-only TLS | v3 + CA, v2 + CA |
//! | `client_certificates_v3_and_v2` | `--client-cert-auth` | v3 + cert, v2 + cert, v2 without cert (refused) |
//! | `v3_username_password` | v3 auth enabled | right password, wrong password |
//! | `v2_basic_auth_over_tls` | TLS + v2 auth enabled | right password, wrong password |
//! | `tls_files_are_checked_at_load` | – | `pgfront config check` on bad PEM files |

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const ROUTE_LIMIT: Duration = Duration::from_secs(20);

/// Runs `cmd`, panicking with its output unless it succeeds.
fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test PKI: one CA, a server certificate for 127.0.0.1, a client certificate (CN=pgfront),
/// and a second CA that signed nothing etcd uses. ECDSA P-256, valid two days.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let openssl = require("openssl", "openssl");
        let dir = tempfile::Builder::new().prefix("pgfront-pki-").tempdir().unwrap();
        let d = dir.path();
        // Every argument is free of spaces: each command is written as one line.
        let ssl = |what: &str, line: String| {
            run(&format!("openssl {what}"), Command::new(&openssl).current_dir(d).args(line.split_whitespace()));
        };
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        for ca in ["ca", "other-ca"] {
            ssl(
                ca,
                format!(
                    "req -x509 {ec} -keyout {ca}.key -out {ca}.pem -days 2 -subj /CN=pgfront-test-{ca} \
                     -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
                ),
            );
        }
        // The server certificate is also a client one: with --client-cert-auth etcd 3.4's own gRPC
        // gateway dials etcd with it.
        for (name, cn, ext, serial) in [
            ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n", 2),
            ("client", "pgfront", "extendedKeyUsage=clientAuth\n", 3),
        ] {
            std::fs::write(d.join(format!("{name}.ext")), format!("basicConstraints=CA:FALSE\n{ext}")).unwrap();
            ssl(name, format!("req {ec} -keyout {name}.key -out {name}.csr -subj /CN={cn}"));
            ssl(
                name,
                format!(
                    "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -set_serial {serial} -days 2 \
                     -out {name}.pem -extfile {name}.ext"
                ),
            );
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `tls_*` lines of a `[[cluster]]`, with or without the client certificate.
    fn toml(&self, client_cert: bool) -> String {
        let mut s = format!("tls_ca = {:?}\n", self.path("ca.pem"));
        if client_cert {
            s += &format!("tls_cert = {:?}\ntls_key = {:?}\n", self.path("client.pem"), self.path("client.key"));
        }
        s
    }
}

/// `etcdctl` for one API version, with the TLS and user flags of that version.
struct Ctl {
    api: u8,
    args: Vec<String>,
}

impl Ctl {
    fn new(api: u8, endpoint: &str, pki: Option<&Pki>, user: Option<&str>) -> Ctl {
        let mut args = vec![format!("--endpoints={endpoint}")];
        if let Some(p) = pki {
            let (ca, cert, key) =
                if api == 3 { ("cacert", "cert", "key") } else { ("ca-file", "cert-file", "key-file") };
            args.push(format!("--{ca}={}", p.path("ca.pem").display()));
            args.push(format!("--{cert}={}", p.path("client.pem").display()));
            args.push(format!("--{key}={}", p.path("client.key").display()));
        }
        if let Some(u) = user {
            args.push(if api == 3 { format!("--user={u}") } else { format!("--username={u}") });
        }
        Ctl { api, args }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(require("etcdctl", "etcd-client"));
        cmd.env("ETCDCTL_API", self.api.to_string()).args(&self.args).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        run(&format!("etcdctl (API {}) {}", self.api, args.join(" ")), &mut self.command(args))
    }

    fn put(&self, key: &str, value: &str) {
        let verb = if self.api == 3 { "put" } else { "set" };
        // `--` so that a value is never taken for a flag.
        self.run(&[verb, "--", key, value]);
    }
}

/// etcd 3.4 serving clients over https://127.0.0.1 with the test PKI's server certificate; the
/// v2 API on; client certificates required when `client_cert_auth`.
struct TlsEtcd {
    proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsEtcd {
    fn start(pki: &Pki, client_cert_auth: bool) -> TlsEtcd {
        let bin = require("etcd", "etcd-server");
        let dir = tempfile::Builder::new().prefix("pgfront-etcd-tls-").tempdir().unwrap();
        let (port, peer) = (free_port(), free_port());
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "tls", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &format!("https://127.0.0.1:{port}")])
            .args(["--advertise-client-urls", &format!("https://127.0.0.1:{port}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("tls=http://127.0.0.1:{peer}")])
            .arg("--cert-file")
            .arg(pki.path("server.pem"))
            .arg("--key-file")
            .arg(pki.path("server.key"))
            .arg("--enable-v2=true");
        if client_cert_auth {
            cmd.arg("--client-cert-auth").arg("--trusted-ca-file").arg(pki.path("ca.pem"));
        }
        let proc = Proc::spawn("etcd", cmd, &dir.path().join("etcd.log"), false);
        let e = TlsEtcd { proc, port, _dir: dir };
        let ctl = e.ctl(3, pki, None);
        wait_for("etcd (TLS) health", Duration::from_secs(20), || {
            ctl.command(&["endpoint", "health"]).output().ok().filter(|o| o.status.success()).map(|_| ())
        });
        e
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn ctl(&self, api: u8, pki: &Pki, user: Option<&str>) -> Ctl {
        Ctl::new(api, &self.endpoint(), Some(pki), user)
    }
}

/// A TCP echo server standing in for a PostgreSQL member; counts the connections it accepted.
struct Echo {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Echo {
    fn start() -> Echo {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                n.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(k) = s.read(&mut buf) {
                        if k == 0 || s.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Echo { port, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Patroni 3.0's member JSON for a member at `port`.
fn member_json(port: u16, role: &str) -> String {
    format!(
        r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:{}/patroni","state":"running","role":"{role}","version":"3.0.2","xlog_location":123,"timeline":1}}"#,
        port + 1
    )
}

/// One Patroni cluster as the test plays it: two members (echo servers), its keys written
/// through `ctl`, its `[[cluster]]` section and a primary listener.
struct Scope {
    name: String,
    ctl: Ctl,
    a: Echo,
    b: Echo,
    listen: u16,
    toml: String,
}

impl Scope {
    /// `settings`: the endpoint, API, TLS and credential lines of its `[[cluster]]`.
    fn new(name: &str, ctl: Ctl, settings: &str) -> Scope {
        let listen = free_port();
        let toml = format!(
            "[[cluster]]\nname = \"{name}\"\nscope = \"{name}\"\n{settings}resync_interval = \"1s\"\n\n\
             [[listener]]\nname = \"{name}-rw\"\ncluster = \"{name}\"\nbind = \"127.0.0.1:{listen}\"\n\
             role = \"primary\"\nqueue_timeout = \"1s\"\n\n"
        );
        Scope { name: name.to_owned(), ctl, a: Echo::start(), b: Echo::start(), listen, toml }
    }

    fn key(&self, rel: &str) -> String {
        format!("/service/{}/{rel}", self.name)
    }

    /// pg1 (echo a) leads, pg2 (echo b) replicates.
    fn write_initial_keys(&self) {
        self.ctl.put(&self.key("members/pg1"), &member_json(self.a.port, "master"));
        self.ctl.put(&self.key("members/pg2"), &member_json(self.b.port, "replica"));
        self.ctl.put(&self.key("leader"), "pg1");
    }

    /// A switchover as Patroni writes it: the new leader's member key, then the leader key.
    fn switch_to_pg2(&self) {
        self.ctl.put(&self.key("members/pg1"), &member_json(self.a.port, "replica"));
        self.ctl.put(&self.key("members/pg2"), &member_json(self.b.port, "master"));
        self.ctl.put(&self.key("leader"), "pg2");
    }

    /// The whole positive scenario: pg1 routed and reached, then pg2 after the switch.
    fn check_follows_leader(&self, pf: &Pgfront) {
        pf.wait_primary(&self.name, "pg1", ROUTE_LIMIT);
        round_trip(self.listen, &self.a);
        self.switch_to_pg2();
        pf.wait_primary(&self.name, "pg2", ROUTE_LIMIT);
        round_trip(self.listen, &self.b);
    }
}

/// A PostgreSQL StartupMessage (protocol 3.0, user postgres): what a real client sends first.
fn startup_message() -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&body);
    m
}

/// Connects through the listener at `port`: the bytes sent come back, and `to` accepted the
/// connection.
fn round_trip(port: u16, to: &Echo) {
    let before = to.accepted();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let msg = startup_message();
    s.write_all(&msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap_or_else(|e| panic!("no echo through 127.0.0.1:{port}: {e}"));
    assert_eq!(back, msg);
    assert_eq!(to.accepted(), before + 1, "the connection did not reach the expected member");
}

/// A listener of a cluster pgfront cannot read: the client gets no member's echo, only
/// pgfront's ErrorResponse (or a close) after the queue timeout, and neither member is reached.
fn routes_nothing(s: &Scope) {
    let before = (s.a.accepted(), s.b.accepted());
    let mut c = TcpStream::connect(("127.0.0.1", s.listen)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(&startup_message()).unwrap();
    let mut buf = [0u8; 1];
    match c.read(&mut buf) {
        Ok(0) => {}
        Ok(_) => assert_eq!(buf[0], b'E', "expected a PostgreSQL ErrorResponse"),
        Err(e) => panic!("no answer from pgfront on {}: {e}", s.listen),
    }
    assert_eq!((s.a.accepted(), s.b.accepted()), before, "{}: a member was reached", s.name);
}

/// The value of `pgfront_etcd_up` for `cluster`, if exported.
fn etcd_up(pf: &Pgfront, cluster: &str) -> Option<f64> {
    let sample = format!("pgfront_etcd_up{{cluster=\"{cluster}\"}}");
    pf.metrics().lines().find_map(|l| l.strip_prefix(&sample).and_then(|v| v.trim().parse().ok()))
}

/// The negative scenario for `s`: an error naming `expect` logged, nothing routed, etcd down
/// in the metrics, no panic, and none of `secrets` in the log.
fn check_refused(pf: &mut Pgfront, s: &Scope, expect: &str, secrets: &[&str]) {
    wait_for(&format!("pgfront to log {expect:?} for {}", s.name), ROUTE_LIMIT, || {
        pf.log().lines().any(|l| l.contains(&format!("cluster={}", s.name)) && l.contains(expect)).then_some(())
    });
    assert_eq!(pf.primary(&s.name), None);
    assert_eq!(etcd_up(pf, &s.name), Some(0.0));
    routes_nothing(s);
    let log = pf.log();
    assert!(pf.proc.running(), "pgfront exited:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    for secret in secrets {
        assert!(!log.contains(secret), "a password is in pgfront's log:\n{log}");
    }
    let line = log.lines().find(|l| l.contains(&format!("cluster={}", s.name)) && l.contains(expect));
    eprintln!("{}: {}", s.name, line.unwrap_or_default());
}

fn pgfront_with(admin: u16, scopes: &[&Scope]) -> Pgfront {
    let mut text = format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n");
    for s in scopes {
        text += &s.toml;
    }
    Pgfront::start(&text, admin)
}

/// Runs `f`; on failure prints the logs of pgfront and etcd before failing.
fn with_logs(pgfront_log: &Path, etcd_log: &Path, f: impl FnOnce()) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    if let Err(e) = r {
        eprintln!("--- pgfront log ---\n{}", std::fs::read_to_string(pgfront_log).unwrap_or_default());
        let etcd = std::fs::read_to_string(etcd_log).unwrap_or_default();
        let tail: Vec<&str> = etcd.lines().rev().take(30).collect();
        eprintln!("--- etcd log (last lines) ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        std::panic::resume_unwind(e);
    }
}

#[test]
fn v3_and_v2_over_tls_with_a_ca() {
    let pki = Pki::new();
    let etcd = TlsEtcd::start(&pki, false);
    let ep = etcd.endpoint();
    let v3 = Scope::new("tls3", etcd.ctl(3, &pki, None), &format!("etcd_endpoints = [\"{ep}\"]\n{}", pki.toml(false)));
    let v2 = Scope::new(
        "tls2",
        etcd.ctl(2, &pki, None),
        &format!("etcd_endpoints = [\"{ep}\"]\netcd_api = \"v2\"\n{}", pki.toml(false)),
    );
    v3.write_initial_keys();
    v2.write_initial_keys();
    let pf = pgfront_with(free_port(), &[&v3, &v2]);
    with_logs(&pf.proc.log.clone(), &etcd.proc.log, || {
        v3.check_follows_leader(&pf);
        v2.check_follows_leader(&pf);
        assert_eq!(etcd_up(&pf, "tls3"), Some(1.0));
        assert_eq!(etcd_up(&pf, "tls2"), Some(1.0));
    });
}

#[test]
fn client_certificates_v3_and_v2() {
    let pki = Pki::new();
    let etcd = TlsEtcd::start(&pki, true);
    let ep = etcd.endpoint();
    let v3 = Scope::new("cert3", etcd.ctl(3, &pki, None), &format!("etcd_endpoints = [\"{ep}\"]\n{}", pki.toml(true)));
    let v2 = Scope::new(
        "cert2",
        etcd.ctl(2, &pki, None),
        &format!("etcd_endpoints = [\"{ep}\"]\netcd_api = \"v2\"\n{}", pki.toml(true)),
    );
    // The same etcd without a client certificate: etcd must refuse the handshake.
    let nocert = Scope::new(
        "nocert2",
        etcd.ctl(2, &pki, None),
        &format!("etcd_endpoints = [\"{ep}\"]\netcd_api = \"v2\"\n{}", pki.toml(false)),
    );
    // A CA that did not sign etcd's certificate: pgfront must refuse etcd.
    let wrong_ca = Scope::new(
        "otherca2",
        etcd.ctl(2, &pki, None),
        &format!(
            "etcd_endpoints = [\"{ep}\"]\netcd_api = \"v2\"\ntls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}\n",
            pki.path("other-ca.pem"),
            pki.path("client.pem"),
            pki.path("client.key")
        ),
    );
    for s in [&v3, &v2, &nocert, &wrong_ca] {
        s.write_initial_keys();
    }
    let mut pf = pgfront_with(free_port(), &[&v3, &v2, &nocert, &wrong_ca]);
    with_logs(&pf.proc.log.clone(), &etcd.proc.log, || {
        v3.check_follows_leader(&pf);
        v2.check_follows_leader(&pf);
        check_refused(&mut pf, &nocert, "fatal alert: BadCertificate", &[]);
        check_refused(&mut pf, &wrong_ca, "invalid peer certificate", &[]);
    });
}

#[test]
fn v3_username_password() {
    const ROOT_PW: &str = "Root-Secret-7f3a";
    const GOOD_PW: &str = "Good-Secret-91c2";
    const BAD_PW: &str = "Wrong-Secret-55e8";
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let admin = Ctl::new(3, &ep, None, None);
    admin.run(&["user", "add", &format!("root:{ROOT_PW}")]);
    admin.run(&["role", "add", "pgfront-ro"]);
    admin.run(&["role", "grant-permission", "pgfront-ro", "--prefix=true", "read", "/service/"]);
    admin.run(&["user", "add", &format!("pgfront:{GOOD_PW}")]);
    admin.run(&["user", "grant-role", "pgfront", "pgfront-ro"]);
    admin.run(&["auth", "enable"]);
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("etcd.password");
    std::fs::write(&pw_file, format!("{GOOD_PW}\n")).unwrap();
    let root = format!("root:{ROOT_PW}");
    let good = Scope::new(
        "auth3",
        Ctl::new(3, &ep, None, Some(&root)),
        &format!("etcd_endpoints = [\"{ep}\"]\nusername = \"pgfront\"\npassword_file = {pw_file:?}\n"),
    );
    let bad = Scope::new(
        "badpw3",
        Ctl::new(3, &ep, None, Some(&root)),
        &format!("etcd_endpoints = [\"{ep}\"]\nusername = \"pgfront\"\npassword = \"{BAD_PW}\"\n"),
    );
    good.write_initial_keys();
    bad.write_initial_keys();
    // Without credentials etcd now refuses to read.
    let anon = Ctl::new(3, &ep, None, None).command(&["get", "--prefix", "/service/"]).output().unwrap();
    assert!(!anon.status.success(), "etcd auth is not enabled");
    let mut pf = pgfront_with(free_port(), &[&good, &bad]);
    with_logs(&pf.proc.log.clone(), &etcd.proc.log, || {
        good.check_follows_leader(&pf);
        check_refused(&mut pf, &bad, "authentication failed", &[ROOT_PW, GOOD_PW, BAD_PW]);
        assert_eq!(etcd_up(&pf, "auth3"), Some(1.0));
    });
}

#[test]
fn v2_basic_auth_over_tls() {
    const ROOT_PW: &str = "Root-Secret-2b7d";
    const GOOD_PW: &str = "Good-Secret-c410";
    const BAD_PW: &str = "Wrong-Secret-6a9e";
    let pki = Pki::new();
    let etcd = TlsEtcd::start(&pki, false);
    let ep = etcd.endpoint();
    // etcd v2 auth (separate from v3's): root, then `auth enable`, then the guest role (which
    // keeps full access after `auth enable`) loses it, and pgfront gets read on /service/*.
    let setup = etcd.ctl(2, &pki, None);
    setup.run(&["user", "add", &format!("root:{ROOT_PW}")]);
    setup.run(&["auth", "enable"]);
    let root = format!("root:{ROOT_PW}");
    let admin = etcd.ctl(2, &pki, Some(&root));
    admin.run(&["role", "revoke", "guest", "--path", "/*", "--readwrite"]);
    admin.run(&["role", "add", "pgfront-ro"]);
    admin.run(&["role", "grant", "pgfront-ro", "--path", "/service/*", "--read"]);
    admin.run(&["user", "add", &format!("pgfront:{GOOD_PW}")]);
    admin.run(&["user", "grant", "pgfront", "--roles", "pgfront-ro"]);
    let good = Scope::new(
        "auth2",
        etcd.ctl(2, &pki, Some(&root)),
        &format!(
            "etcd_endpoints = [\"{ep}\"]\netcd_api = \"v2\"\n{}username = \"pgfront\"\npassword = \"{GOOD_PW}\"\n",
            pki.toml(false)
        ),
    );
    let bad = Scope::new(
        "badpw2",
        etcd.ctl(2, &pki, Some(&root)),
        &format!(
            "etcd_endpoints = [\"{ep}\"]\netcd_api = \"v2\"\n{}username = \"pgfront\"\npassword = \"{BAD_PW}\"\n",
            pki.toml(false)
        ),
    );
    good.write_initial_keys();
    bad.write_initial_keys();
    let anon = etcd.ctl(2, &pki, None).command(&["get", "/service/auth2/leader"]).output().unwrap();
    assert!(!anon.status.success(), "etcd v2 auth does not refuse anonymous reads");
    let mut pf = pgfront_with(free_port(), &[&good, &bad]);
    with_logs(&pf.proc.log.clone(), &etcd.proc.log, || {
        good.check_follows_leader(&pf);
        check_refused(&mut pf, &bad, "requires user authentication", &[ROOT_PW, GOOD_PW, BAD_PW]);
        assert_eq!(etcd_up(&pf, "auth2"), Some(1.0));
    });
}

/// `pgfront config check` on a cluster with TLS lines `tls`: (success, stderr).
fn config_check(dir: &Path, endpoint: &str, tls: &str) -> (bool, String) {
    let path = dir.join("pgfront.toml");
    let text = format!(
        "[[cluster]]\nname = \"main\"\nscope = \"s\"\netcd_endpoints = [\"{endpoint}\"]\netcd_api = \"v2\"\n{tls}\n\
         [[listener]]\ncluster = \"main\"\nbind = \"127.0.0.1:5432\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront")).args(["config", "check", "-c"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (out.status.success(), err)
}

#[test]
fn tls_files_are_checked_at_load() {
    let pki = Pki::new();
    let d = pki.dir.path();
    std::fs::write(d.join("garbage.pem"), "not PEM at all\n").unwrap();
    std::fs::write(d.join("broken.pem"), "-----BEGIN CERTIFICATE-----\n%%%\n").unwrap();
    let https = "https://127.0.0.1:2379";
    let p = |n: &str| pki.path(n).display().to_string();
    let ok = format!("tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}\n", p("ca.pem"), p("client.pem"), p("client.key"));
    let (good, err) = config_check(d, https, &ok);
    assert!(good, "{err}");
    let cases = [
        // (tls lines, endpoint, expected in the error)
        (
            format!("tls_ca = {:?}\n", p("absent.pem")),
            https,
            "FILE:6: cluster[0].tls_ca: ".to_owned() + &p("absent.pem") + ": cannot read",
        ),
        (
            format!("tls_ca = {:?}\n", p("garbage.pem")),
            https,
            "FILE:6: cluster[0].tls_ca: ".to_owned() + &p("garbage.pem") + ": no PEM certificate",
        ),
        (
            format!("tls_ca = {:?}\n", p("broken.pem")),
            https,
            "cluster[0].tls_ca: ".to_owned() + &p("broken.pem") + ": not valid PEM",
        ),
        (
            ok.replace(&p("client.pem"), &p("garbage.pem")),
            https,
            "FILE:7: cluster[0].tls_cert: ".to_owned() + &p("garbage.pem"),
        ),
        (
            ok.replace(&p("client.key"), &p("client.pem")),
            https,
            "FILE:8: cluster[0].tls_key: ".to_owned() + &p("client.pem") + ": no unencrypted PEM private key",
        ),
        // The server's key with the client's certificate.
        (
            ok.replace(&p("client.key"), &p("server.key")),
            https,
            "cluster[0].tls_key: ".to_owned()
                + &p("client.pem")
                + " and "
                + &p("server.key")
                + ": not a usable certificate and key pair",
        ),
        (
            format!("tls_cert = {:?}\n", p("client.pem")),
            https,
            "cluster[0].tls_cert: tls_cert and tls_key go together".to_owned(),
        ),
        (String::new(), https, "FILE:1: cluster[0].tls_ca: https:// endpoints need tls_ca".to_owned()),
        (
            format!("tls_cert = {:?}\ntls_key = {:?}\n", p("client.pem"), p("client.key")),
            https,
            "cluster[0].tls_ca: https:// endpoints need tls_ca".to_owned(),
        ),
        (
            ok.clone(),
            "http://127.0.0.1:2379",
            "cluster[0].etcd_endpoints: TLS is configured: use https:// endpoints".to_owned(),
        ),
    ];
    for (tls, endpoint, want) in cases {
        let (good, err) = config_check(d, endpoint, &tls);
        assert!(!good, "accepted:\n{tls}");
        assert!(err.contains(&want), "expected {want:?} in:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
