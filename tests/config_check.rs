//! `pgfront config check`: exit 0 on a valid file; exit 1 with file, line and field otherwise.

use std::process::Command;

fn check(text: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgfront.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront")).args(["config", "check", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

const GOOD: &str = r#"[[cluster]]
name = "main"
scope = "cluster-main-13"
etcd_endpoints = ["http://127.0.0.1:2379"]

[[listener]]
cluster = "main"
bind = "127.0.0.1:5432"
"#;

#[test]
fn shipped_example_is_valid() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront"))
        .args(["config", "check", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgfront.toml")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (1 cluster(s), 2 listener(s), 1 vip(s))"));
}

#[test]
fn good_config_passes() {
    let (ok, out, err) = check(GOOD);
    assert!(ok, "{err}");
    assert!(out.contains("OK"));
}

#[test]
fn bad_configs_name_the_line_and_field() {
    let cases = [
        (GOOD.replace("bind = \"127.0.0.1:5432\"", "bind = \"127.0.0.1:99999\""), "FILE:8: listener[0].bind: "),
        (GOOD.replace("bind =", "server_maxconn = \"lots\"\nbind ="), "FILE:8: listener[0].server_maxconn: invalid type: string \"lots\", expected u32"),
        (format!("{GOOD}[[listener]]\ncluster = \"main\"\nbind = \"127.0.0.1:5433\"\nbacklog = -1\n"), "FILE:12: listener[1].backlog: "),
        (GOOD.replace("cluster = \"main\"", "cluster = \"mian\""), "FILE:7: listener[0].cluster: no [[cluster]] is named \"mian\""),
        (GOOD.replace("bind =", "server_maxconn = 0\nbind ="), "FILE:8: listener[0].server_maxconn: must be at least 1"),
        (GOOD.replace("bind =", "maxconnn = 5\nbind ="), "unknown field `maxconnn`"),
        (GOOD.replace("bind =", "queue_timeout = \"soon\"\nbind ="), "invalid duration \"soon\""),
        (GOOD.replace("[[listener]]", "[[listener]]\nrole = \"writer\""), "unknown variant `writer`"),
        (GOOD.replace("http://127.0.0.1:2379", "127.0.0.1:2379"), "FILE:4: cluster[0].etcd_endpoints"),
        (format!("{GOOD}[[vip]]\nname = \"v\"\naddress = \"10.0.0.10\"\ninterface = \"eth0\"\nvrid = 1\n"), "FILE:11: vip[0].address"),
        (format!("{GOOD}[[vip]]\nname = \"v\"\naddress = \"10.0.0.10/24\"\ninterface = \"eth0\"\nvrid = 1\nversion = 2\nadvert_interval = \"100ms\"\n"), "vip[0].advert_interval: VRRPv2 advertises whole seconds"),
        (format!("{GOOD}[[vip]]\nname = \"v\"\naddress = \"10.0.0.10/24\"\ninterface = \"eth0\"\nvrid = 1\nauth_pass = \"x\"\n"), "vip[0].auth_pass: authentication exists in VRRP version 2 only"),
        (format!("{GOOD}[[vip]]\nname = \"v\"\naddress = \"10.0.0.10/24\"\ninterface = \"eth0\"\nvrid = 1\nelection = \"etcd\"\n"), "vip[0].etcd_cluster: election = \"etcd\" needs the name of a [[cluster]]"),
        (format!("{GOOD}[[vip]]\nname = \"v\"\naddress = \"10.0.0.10/24\"\ninterface = \"eth0\"\nelection = \"raft\"\n"), "unknown variant `raft`"),
    ];
    for (text, want) in cases {
        let (ok, _, err) = check(&text);
        assert!(!ok, "accepted:\n{text}");
        assert!(err.contains(want), "expected {want:?} in:\n{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront"))
        .args(["config", "check", "-c"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn output_shows_no_password() {
    let with_pw = GOOD.replace("etcd_endpoints", "username = \"u\"\npassword = \"pw-Qx93\"\netcd_endpoints");
    let (ok, out, err) = check(&with_pw);
    assert!(ok, "{err}");
    assert!(!out.contains("pw-Qx93") && !err.contains("pw-Qx93"), "{out}{err}");
    for bad in [
        with_pw.replace("\"pw-Qx93\"", "pw-Qx93"),
        with_pw.replace("\"pw-Qx93\"", "\"pw-Qx93"),
        with_pw.replace("http://127.0.0.1:2379", "http://u:pw-Qx93@127.0.0.1:2379"),
    ] {
        let (ok, out, err) = check(&bad);
        assert!(!ok, "accepted:\n{bad}");
        assert!(err.contains("FILE"), "{err}");
        assert!(!out.contains("pw-Qx93") && !err.contains("pw-Qx93"), "{out}{err}");
    }
}

#[test]
fn status_errors_hide_the_admin_url_password() {
    // Nothing listens on port 1 of loopback: the request fails and names the URL.
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront"))
        .args(["status", "--admin", "http://op:pw-Qx93@127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("pw-Qx93"), "{err}");
}

#[test]
fn shipped_agent_config_passes_config_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.toml");
    for args in [&["config", "check", "-c", path][..], &["config", "check", "--agent", "-c", path][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_pgfront")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("OK (agent pg1, key /service/cluster-main-13/nodes/pg1"), "{stdout}");
    }
}

#[test]
fn agent_config_errors_name_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let good = "[node]\nname = \"pg1\"\nconn_url = \"postgres://127.0.0.1:5432/postgres\"\n\n\
                [cluster]\nscope = \"main\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n";
    for (text, expect) in [
        (good.replace("scope =", "ttl = \"1s\"\nscope ="), "FILE:6: cluster.ttl: whole seconds, at least 2s"),
        (good.replace("name =", "nmae = 1\nname ="), "FILE:2: node.nmae: unknown field `nmae`"),
        (format!("{good}\n[postgres]\npassword = 12345678\n"), "value not shown"),
    ] {
        std::fs::write(&path, &text).unwrap();
        let out =
            Command::new(env!("CARGO_BIN_EXE_pgfront")).args(["config", "check", "-c"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
        assert!(!out.status.success(), "{text}");
        assert!(stderr.contains(expect), "{text}\n=> {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("12345678"), "{stderr}");
    }
    std::fs::write(&path, good).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgfront")).args(["config", "check", "-c"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
