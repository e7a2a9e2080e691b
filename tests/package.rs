//! The Debian package, built by `scripts/build-deb.sh` from the binary under test (no release
//! build here: too slow for the test suite), then checked the way dpkg and an administrator see
//! it: control fields and conffiles (`dpkg-deb -I`), file list with owners and modes
//! (`dpkg-deb -c`), the extracted example configuration accepted by the extracted binary, the
//! maintainer scripts parsed by `sh -n`, the unit checked by `systemd-analyze verify`.
//!
//! Then a real `dpkg -i`, `dpkg -r` and `dpkg -P` in a scratch root: a copy-on-write overlay of
//! this host's own root, mounted in a private mount namespace and entered with chroot, so the
//! maintainer scripts run for real (adduser, dpkg-statoverride) against a dpkg database that is
//! this host's as it is now, while nothing reaches the host: every write lands in a tmpfs that
//! disappears with the namespace. (`dpkg --root` would run the maintainer scripts chrooted into
//! an empty directory, where there is no shell, no adduser and no dpkg database.)

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{is_root, require};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn arch() -> String {
    run(Command::new("dpkg").arg("--print-architecture")).trim().to_owned()
}

fn build_deb(out: &Path) -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-deb.sh");
    let stdout = run(Command::new("sh").args([script, "--binary", env!("CARGO_BIN_EXE_pgfront"), "--out"]).arg(out));
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
    assert_eq!(deb, out.join(format!("pgfront_{VERSION}_{}.deb", arch())), "build-deb.sh printed {stdout:?}");
    assert!(deb.is_file());
    deb
}

/// `dpkg-deb -c` lines: path → (mode string, owner/group).
fn contents(deb: &Path) -> BTreeMap<String, (String, String)> {
    run(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "dpkg-deb -c line {l:?}");
            (f[5].trim_start_matches("./").trim_end_matches('/').to_owned(), (f[0].to_owned(), f[1].to_owned()))
        })
        .collect()
}

fn repo_units() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".service") || n.ends_with(".socket"))
        .collect();
    v.sort();
    v
}

#[test]
fn package_builds_and_verifies() {
    require("dpkg-deb", "dpkg");
    require("objdump", "binutils");
    let analyze = require("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(dir.path());

    // Control fields.
    let fields: BTreeMap<String, String> = run(Command::new("dpkg-deb").arg("-f").arg(&deb))
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let field = |k: &str| fields.get(k).map(String::as_str).unwrap_or_else(|| panic!("no {k} in {fields:?}"));
    assert_eq!(field("Package"), "pgfront");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), arch());
    assert!(field("Maintainer").contains('<'), "{}", field("Maintainer"));
    assert!(field("Installed-Size").parse::<u64>().is_ok_and(|kib| kib > 1000), "{}", field("Installed-Size"));
    let depends: Vec<&str> = field("Depends").split(", ").collect();
    assert!(depends.iter().any(|d| d.starts_with("libc6 (>= 2.")), "{depends:?}");
    assert!(depends.contains(&"adduser"), "postinst runs adduser: {depends:?}");
    assert!(field("Recommends").contains("systemd"));
    assert!(field("Suggests").contains("etcd-client"));
    assert_eq!(field("Section"), "database");
    assert!(!field("Description").is_empty());

    // Conffiles.
    let conffiles = run(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles"));
    assert_eq!(conffiles, "/etc/pgfront/agent.toml\n/etc/pgfront/pgfront.toml\n");

    // Files, owners and modes.
    let files = contents(&deb);
    let mut want: Vec<(String, &str)> = vec![
        ("usr/bin/pgfront".into(), "-rwxr-xr-x"),
        ("etc/pgfront/pgfront.toml".into(), "-rw-r--r--"),
        ("etc/pgfront/agent.toml".into(), "-rw-r--r--"),
        ("usr/share/doc/pgfront/README.md".into(), "-rw-r--r--"),
        ("usr/share/doc/pgfront/copyright".into(), "-rw-r--r--"),
        ("usr/share/doc/pgfront/changelog.gz".into(), "-rw-r--r--"),
        ("usr/share/doc/pgfront/nagios.md".into(), "-rw-r--r--"),
    ];
    let units = repo_units();
    assert!(units.contains(&"pgfront.service".to_owned()));
    want.extend(units.iter().map(|u| (format!("lib/systemd/system/{u}"), "-rw-r--r--")));
    for (path, mode) in &want {
        let got = files.get(path).unwrap_or_else(|| panic!("{path} missing from the package: {files:#?}"));
        assert_eq!(got.0, *mode, "{path}");
    }
    for (path, (mode, owner)) in &files {
        assert_eq!(owner, "root/root", "{path}");
        if mode.starts_with('d') {
            assert_eq!(mode, "drwxr-xr-x", "{path}");
        } else {
            assert!(
                ["usr/bin/", "etc/pgfront/", "lib/systemd/system/", "usr/share/doc/pgfront/"]
                    .iter()
                    .any(|p| path.starts_with(p)),
                "{path} is outside the package's directories"
            );
            assert!(mode.starts_with('-'), "{path}: {mode}");
        }
    }

    // Extracted: the files are the tree's, and the binary accepts the example configuration.
    let root = dir.path().join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    let same = |installed: &str, repo: &str| {
        let a = std::fs::read(root.join(installed)).unwrap();
        let b = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(repo)).unwrap();
        assert!(a == b, "{installed} differs from {repo}");
    };
    same("etc/pgfront/pgfront.toml", "config/pgfront.toml");
    same("etc/pgfront/agent.toml", "config/agent.toml");
    for u in &units {
        same(&format!("lib/systemd/system/{u}"), &format!("systemd/{u}"));
    }
    let conf = root.join("etc/pgfront/pgfront.toml");
    let out = run(Command::new(root.join("usr/bin/pgfront")).args(["config", "check", "-c"]).arg(&conf));
    assert!(out.contains(": OK ("), "{out}");
    let help = Command::new(root.join("usr/bin/pgfront")).args(["check", "--help"]).output().unwrap();
    assert_eq!(help.status.code(), Some(3), "the packaged binary has the Nagios plugin");

    // The maintainer scripts parse, and the md5sums match the files.
    let ctrl = dir.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl));
    for s in ["postinst", "prerm", "postrm"] {
        let p = ctrl.join(s);
        let body = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(body.starts_with("#!/bin/sh\n"), "{s}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o755, "{s}");
        run(Command::new("sh").arg("-n").arg(&p));
    }
    let md5 = run(Command::new("md5sum").arg("-c").arg(ctrl.join("md5sums")).current_dir(&root));
    assert!(md5.lines().count() >= 5 && md5.lines().all(|l| l.ends_with(": OK")), "{md5}");

    // systemd-analyze verify on the extracted units, whose /usr/bin/pgfront is the extracted
    // binary (verify checks that the Exec*= commands exist); any diagnostic about them fails.
    let verify_dir = dir.path().join("verify");
    std::fs::create_dir(&verify_dir).unwrap();
    let bin = root.join("usr/bin/pgfront");
    for u in &units {
        let unit = verify_dir.join(u);
        let body = std::fs::read_to_string(root.join("lib/systemd/system").join(u)).unwrap();
        std::fs::write(&unit, body.replace("/usr/bin/pgfront", bin.to_str().unwrap())).unwrap();
        let out = Command::new(&analyze).arg("verify").arg(&unit).output().unwrap();
        let diag: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains(u.as_str()) || l.contains("pgfront"))
            .map(str::to_owned)
            .collect();
        assert!(out.status.success() && diag.is_empty(), "systemd-analyze verify {u}:\n{}", text(&out));
    }
}

/// The output of a script run in the scratch root, cut at `== <step> rc=<code>` markers.
fn steps(out: &str) -> BTreeMap<String, (i32, String)> {
    let mut map = BTreeMap::new();
    let mut cur: Option<(String, i32, String)> = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("== ") {
            if let Some((name, rc)) = rest.rsplit_once(" rc=") {
                if let Some((n, rc, body)) = cur.take() {
                    map.insert(n, (rc, body));
                }
                cur = Some((name.to_owned(), rc.parse().unwrap_or(-1), String::new()));
                continue;
            }
        }
        if let Some((_, _, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((n, rc, body)) = cur {
        map.insert(n, (rc, body));
    }
    map
}

/// `dpkg -i`, upgrade over a locally edited conffile, `dpkg -r`, `dpkg -P`, in an overlay of
/// this host's root (see the module comment); the host's dpkg database, users and files are
/// untouched.
#[test]
fn package_installs_upgrades_and_purges_in_a_scratch_root() {
    assert!(is_root(), "installing in a scratch root needs root (mount namespaces, chroot)");
    require("unshare", "util-linux");
    require("dpkg-deb", "dpkg");
    require("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(&dir.path().join("out"));
    let name = deb.file_name().unwrap().to_str().unwrap().to_owned();
    let script = format!(
        r#"
set -e
cd "{dir}"
mkdir -p t m
mount -t tmpfs tmpfs t
mkdir t/upper t/work
mount -t overlay overlay -o lowerdir=/,upperdir=t/upper,workdir=t/work m
mount --bind /dev m/dev
mount -t proc proc m/proc
mkdir -p m/tmp/pgfront-pkg
cp "{deb}" m/tmp/pgfront-pkg/
set +e
step() {{
    name=$1; shift
    out=$(chroot m env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C sh -c "$*" 2>&1)
    rc=$?; echo "== $name rc=$rc"; echo "$out"
}}
P=/tmp/pgfront-pkg/{name}
step host_user_before "getent passwd pgfront"
step install "dpkg -i $P"
step user "getent passwd pgfront"
step modes "stat -c '%U:%G %a %n' /etc/pgfront /etc/pgfront/pgfront.toml /etc/pgfront/agent.toml /usr/bin/pgfront /lib/systemd/system/pgfront.service"
step status "dpkg-query -W -f '\${{Status}} \${{Version}}' pgfront"
step dpkg_verify "dpkg -V pgfront"
step config_check "pgfront config check -c /etc/pgfront/pgfront.toml"
step agent_config_check_as_postgres "setpriv --reuid postgres --regid postgres --groups pgfront pgfront config check -c /etc/pgfront/agent.toml"
step config_check_as_pgfront "setpriv --reuid pgfront --regid pgfront --init-groups pgfront config check -c /etc/pgfront/pgfront.toml"
step unit_verify "systemd-analyze verify /lib/systemd/system/pgfront.service"
step edit "echo '# local edit' >> /etc/pgfront/pgfront.toml"
step upgrade "dpkg -i --force-confold $P"
step edit_kept "tail -n 1 /etc/pgfront/pgfront.toml; stat -c '%U:%G %a' /etc/pgfront/pgfront.toml"
step remove "dpkg -r pgfront"
step after_remove "test ! -e /usr/bin/pgfront && test ! -e /lib/systemd/system/pgfront.service && tail -n 1 /etc/pgfront/pgfront.toml"
step purge "dpkg -P pgfront"
step after_purge "test ! -e /etc/pgfront && ! dpkg-statoverride --list | grep pgfront && getent passwd pgfront >/dev/null"
"#,
        dir = dir.path().display(),
        deb = deb.display(),
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let all = text(&out);
    eprintln!("{all}");
    assert!(
        out.status.success(),
        "could not set up the scratch root (overlayfs over / in a private mount namespace):\n{all}"
    );
    let s = steps(&all);
    let step = |name: &str| s.get(name).cloned().unwrap_or_else(|| panic!("step {name} did not run:\n{all}"));
    let ok = |name: &str| {
        let (rc, body) = step(name);
        assert_eq!(rc, 0, "step {name} failed:\n{body}");
        body
    };
    assert_ne!(
        step("host_user_before").0,
        0,
        "a pgfront user exists already: the install could not show it creates one"
    );
    ok("install");
    let user = ok("user");
    assert!(user.contains(":/nonexistent:/usr/sbin/nologin"), "{user}");
    assert_eq!(
        ok("modes"),
        "root:pgfront 750 /etc/pgfront\nroot:pgfront 640 /etc/pgfront/pgfront.toml\nroot:pgfront 640 /etc/pgfront/agent.toml\n\
         root:root 755 /usr/bin/pgfront\nroot:root 644 /lib/systemd/system/pgfront.service\n"
    );
    assert_eq!(ok("status").trim(), format!("install ok installed {VERSION}"));
    assert_eq!(ok("dpkg_verify").trim(), "", "dpkg -V reports changed files");
    assert!(ok("config_check").contains(": OK ("));
    assert!(ok("agent_config_check_as_postgres").contains(": OK ("), "the agent's user reads its configuration");
    assert!(ok("config_check_as_pgfront").contains(": OK ("), "the daemon's user reads its configuration");
    assert_eq!(ok("unit_verify").trim(), "", "systemd-analyze verify on the installed unit");
    ok("edit");
    ok("upgrade");
    assert_eq!(ok("edit_kept"), "# local edit\nroot:pgfront 640\n", "a local edit survives an upgrade");
    ok("remove");
    assert_eq!(ok("after_remove").trim(), "# local edit", "dpkg -r keeps the configuration");
    ok("purge");
    ok("after_purge");
}

#[test]
fn build_script_refuses_bad_input() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-deb.sh");
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (vec!["--binary", "/nonexistent/pgfront"], "no executable at /nonexistent/pgfront"),
        (vec!["--frobnicate"], "unknown argument: --frobnicate"),
    ] {
        let out = Command::new("sh").arg(script).args(&args).arg("--out").arg(dir.path()).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "not a program").unwrap();
    let out = Command::new("sh").arg(script).arg("--binary").arg(&plain).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("no executable at"), "{}", text(&out));
    let out = Command::new("sh").args([script, "--binary"]).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("--binary needs a path"), "{}", text(&out));
    // An executable that is not an ELF program.
    let not_x86 = dir.path().join("script");
    std::fs::write(&not_x86, "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&not_x86, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out =
        Command::new("sh").arg(script).arg("--binary").arg(&not_x86).arg("--out").arg(dir.path()).output().unwrap();
    assert!(!out.status.success(), "a shell script was packaged as the binary: {}", text(&out));
    assert!(text(&out).contains("is not an ELF executable"), "{}", text(&out));
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "deb")))
            .count(),
        0
    );
    let help = run(Command::new("sh").arg(script).arg("--help"));
    assert!(help.contains("--binary PATH") && help.contains("--out DIR"), "{help}");
}
