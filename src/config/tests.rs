use super::*;

const MINIMAL: &str = r#"
[[cluster]]
name = "main"
scope = "cluster-main-13"
etcd_endpoints = ["http://10.0.0.1:2379"]

[[listener]]
cluster = "main"
bind = "0.0.0.0:5432"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("test.toml"), text)
}

fn invalid(text: &str) -> (usize, String, String) {
    match parse(text) {
        Err(ConfigError::Invalid { line, field, reason, .. }) => (line, field, reason),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn defaults_match_the_production_setup() {
    let c = parse(MINIMAL).unwrap();
    let cl = &c.clusters[0];
    assert_eq!(cl.prefix(), "/service/cluster-main-13/");
    assert_eq!(cl.api, EtcdApi::V3);
    assert_eq!(cl.source, Source::Patroni);
    let l = &c.listeners[0];
    assert_eq!(l.name, "main-5432");
    assert_eq!(l.role, Role::Primary);
    assert_eq!(l.balance, Balance::Leastconn);
    assert_eq!(l.server_maxconn, 320);
    assert_eq!(l.drain_grace, Duration::ZERO);
    assert_eq!(l.tcp_keepalive, Some(DEFAULT_TCP_KEEPALIVE));
}

#[test]
fn agent_source_needs_etcd_v3() {
    let agent = MINIMAL.replace("etcd_endpoints", "source = \"agent\"\netcd_endpoints");
    assert_eq!(parse(&agent).unwrap().clusters[0].source, Source::Agent);
    let (line, field, reason) = invalid(&agent.replace("etcd_endpoints", "etcd_api = \"v2\"\netcd_endpoints"));
    assert_eq!((line, field.as_str()), (5, "cluster[0].source"));
    assert!(reason.contains("etcd_api = \"v3\""), "{reason}");
    let e = parse(&MINIMAL.replace("etcd_endpoints", "source = \"repmgr\"\netcd_endpoints")).unwrap_err().to_string();
    assert!(e.contains("cluster[0].source") && e.contains("unknown variant"), "{e}");
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgfront.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.clusters[0].scope, "cluster-main-13");
    assert_eq!(c.clusters[0].endpoints.len(), 3);
    assert_eq!(c.listeners[0].bind.port(), 5432);
    assert_eq!(c.listeners[0].server_maxconn, 320);
}

#[test]
fn unknown_field_names_line_and_field() {
    let text = MINIMAL.replace("bind = ", "maxconns = 3\nbind = ");
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("test.toml"), "{e}");
    assert!(e.starts_with("test.toml:9: listener[0].maxconns: unknown field `maxconns`"), "{e}");
    assert_eq!(e.lines().count(), 1, "one line: {e}");
}

#[test]
fn bad_duration_and_size_are_explained() {
    let e = parse(&MINIMAL.replace("bind = ", "queue_timeout = \"3 parsecs\"\nbind = ")).unwrap_err().to_string();
    assert!(e.contains("invalid duration \"3 parsecs\""), "{e}");
    assert!(e.starts_with("test.toml:9: listener[0].queue_timeout: "), "{e}");
    let e = parse(&MINIMAL.replace("bind = ", "role = \"replica\"\nmax_replica_lag = \"lots\"\nbind = "))
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid size \"lots\""), "{e}");
    let c = parse(&MINIMAL.replace("bind = ", "role = \"replica\"\nmax_replica_lag = \"16MiB\"\nbind = ")).unwrap();
    assert_eq!(c.listeners[0].max_replica_lag, Some(16 << 20));
}

#[test]
fn process_threads_default_to_none_and_are_bounded() {
    assert_eq!(parse(MINIMAL).unwrap().process.threads, None);
    let c = parse(&format!("[process]\nthreads = 3\n{MINIMAL}")).unwrap();
    assert_eq!(c.process.threads, Some(3));
    for bad in ["0", "257"] {
        let (line, field, reason) = invalid(&format!("[process]\nthreads = {bad}\n{MINIMAL}"));
        assert_eq!((line, field.as_str(), reason.as_str()), (2, "process.threads", "must be between 1 and 256"));
    }
}

#[test]
fn cross_references_are_checked_with_lines() {
    let (line, field, reason) = invalid(&MINIMAL.replace("cluster = \"main\"", "cluster = \"other\""));
    assert_eq!((line, field.as_str()), (8, "listener[0].cluster"));
    assert!(reason.contains("no [[cluster]] is named \"other\""));

    let two = format!("{MINIMAL}\n[[listener]]\ncluster = \"main\"\nbind = \"0.0.0.0:5432\"\nname = \"b\"\n");
    let (line, field, _) = invalid(&two);
    assert_eq!((line, field.as_str()), (13, "listener[1].bind"));

    let (_, field, _) = invalid(&MINIMAL.replace("bind = ", "server_maxconn = 0\nbind = "));
    assert_eq!(field, "listener[0].server_maxconn");
    let (_, field, _) = invalid(&MINIMAL.replace("bind = ", "max_replica_lag = 10\nbind = "));
    assert_eq!(field, "listener[0].max_replica_lag");
}

#[test]
fn etcd_settings_are_checked() {
    let (_, field, _) = invalid(&MINIMAL.replace("http://10.0.0.1:2379", "10.0.0.1"));
    assert_eq!(field, "cluster[0].etcd_endpoints");
    let (_, field, _) = invalid(&MINIMAL.replace("scope = ", "username = \"root\"\nscope = "));
    assert_eq!(field, "cluster[0].password");
    let (_, field, reason) =
        invalid(&MINIMAL.replace("scope = ", "password_file = \"/nonexistent/pw\"\nusername = \"u\"\nscope = "));
    assert_eq!(field, "cluster[0].password_file");
    assert!(reason.contains("/nonexistent/pw"), "{reason}");
    let (_, field, _) = invalid(&MINIMAL.replace("scope = ", "etcd_api = \"v2\"\ntls_ca = \"/etc/hosts\"\nscope = "));
    assert_eq!(field, "cluster[0].tls_ca");
    let e = parse(&MINIMAL.replace("scope = ", "etcd_api = \"v4\"\nscope = ")).unwrap_err().to_string();
    assert!(e.contains("unknown variant `v4`"), "{e}");
}

#[test]
fn password_file_is_read_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let text = MINIMAL.replace("scope = ", &format!("username = \"u\"\npassword_file = {:?}\nscope = ", pw));
    let c = parse(&text).unwrap();
    assert_eq!(c.clusters[0].credentials, Some(Credentials { username: "u".into(), password: Secret::new("s3cret") }));
}

#[test]
fn empty_file_says_what_is_missing() {
    let (line, field, _) = invalid("");
    assert_eq!((line, field.as_str()), (1, "cluster"));
}

/// Every secret a configuration can hold, each a distinct word so a leak names its source.
const WITH_SECRETS: &str = r#"
[[cluster]]
name = "main"
scope = "cluster-main-13"
etcd_endpoints = ["http://10.0.0.1:2379"]
username = "pgfront"
password = "etcdpw-Zq81"
check_user = "pgfront_check"
check_password_file = "CHECK_FILE"

[[listener]]
cluster = "main"
bind = "0.0.0.0:5432"

[[vip]]
name = "v"
address = "10.0.0.10/24"
interface = "eth0"
vrid = 51
version = 2
auth_pass = "vrrp-K7x"
"#;

const SECRETS: [&str; 3] = ["etcdpw-Zq81", "checkpw-Ub52", "vrrp-K7x"];

fn with_secrets() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("check.pw");
    std::fs::write(&pw, "checkpw-Ub52\n").unwrap();
    let text = WITH_SECRETS.replace("CHECK_FILE", pw.to_str().unwrap());
    (dir, text)
}

fn assert_no_secret(what: &str, s: &str) {
    for secret in SECRETS {
        assert!(!s.contains(secret), "{what} shows {secret:?}:\n{s}");
    }
}

#[test]
fn debug_of_config_shows_no_secret() {
    let (_dir, text) = with_secrets();
    let c = parse(&text).unwrap();
    // The secrets are there, behind expose().
    assert_eq!(c.clusters[0].credentials.as_ref().unwrap().password.expose(), "etcdpw-Zq81");
    assert_eq!(c.clusters[0].check.as_ref().unwrap().password.as_ref().unwrap().expose(), "checkpw-Ub52");
    assert_eq!(c.vips[0].auth_pass.as_ref().unwrap().expose(), "vrrp-K7x");
    assert_no_secret("Debug of Config", &format!("{c:?}"));
    assert_no_secret("Debug of Config", &format!("{c:#?}"));
    let file: file::FileConfig = toml::from_str(&text).unwrap();
    assert_no_secret("Debug of FileConfig", &format!("{file:?}"));
}

#[test]
fn config_errors_do_not_echo_secrets() {
    let (_dir, text) = with_secrets();
    let cases = [
        // a password of the wrong type: serde would quote it
        text.replace("\"etcdpw-Zq81\"", "4711"),
        // a syntax error on the password's line: toml would print the line
        text.replace("\"etcdpw-Zq81\"", "\"etcdpw-Zq81"),
        text.replace("password = \"etcdpw-Zq81\"", "password = etcdpw-Zq81"),
        // …or on a continuation line of the password, which does not name the key
        text.replace("\"etcdpw-Zq81\"", "\"\"\"\netcdpw-Zq81\"\"\" x"),
        // a misspelt key still holds a password
        text.replace("password = ", "passwd = "),
        // validation errors
        text.replace("auth_pass = \"vrrp-K7x\"", "auth_pass = \"vrrp-K7x-toolong\""),
        text.replace("version = 2", "version = 3"),
        text.replace("username = \"pgfront\"\n", ""),
        text.replace("http://10.0.0.1:2379", "http://root:etcdpw-Zq81@10.0.0.1:2379"),
    ];
    for case in cases {
        let e = parse(&case).expect_err(&case).to_string();
        assert!(e.contains("test.toml"), "{e}");
        let names_line =
            e.contains("at line ") || e.strip_prefix("test.toml:").is_some_and(|r| r.starts_with(char::is_numeric));
        assert!(names_line, "an error still names the line: {e}");
        assert_no_secret("config error", &e.replace("4711", ""));
        assert!(!e.contains("4711"), "{e}");
    }
    // A password under a key of the user's own, in a section without any other secret.
    let e = parse(&MINIMAL.replace("scope = ", "pwd = \"etcdpw-Zq81\"\nscope = ")).unwrap_err().to_string();
    assert!(e.contains("unknown field `pwd`") && e.starts_with("test.toml:4: cluster[0].pwd: "), "{e}");
    // The fields written by `etcd_section!` stand where they always stood in the list.
    let fields = "`name`, `scope`, `namespace`, `etcd_endpoints`, `etcd_api`, `source`, `username`, `password`, \
                  `password_file`, `tls_ca`, `tls_cert`, `tls_key`, `etcd_timeout`, `resync_interval`";
    assert!(e.contains(fields), "{e}");
    assert_no_secret("config error", &e);
    // A syntax error names its line and key like any other error, on one line.
    let e = parse(&MINIMAL.replace("bind = \"0.0.0.0:5432\"", "bind = 0.0.0.0:5432")).unwrap_err().to_string();
    assert!(e.contains(".bind: ") && e.lines().count() == 1, "{e}");
}

#[test]
fn endpoint_userinfo_is_refused_and_redacted() {
    let (_, field, reason) = invalid(&MINIMAL.replace("http://10.0.0.1:2379", "https://u:pw@10.0.0.1:2379"));
    assert_eq!(field, "cluster[0].etcd_endpoints");
    assert!(reason.contains("\"https://***@10.0.0.1:2379\""), "{reason}");
    assert_eq!(redact_userinfo("http://a:b@h:1/p?x=@"), "http://***@h:1/p?x=@");
    assert_eq!(redact_userinfo("http://h:1/p@q"), "http://h:1/p@q");
    assert_eq!(redact_userinfo("u@h"), "***@h");
}

#[test]
fn oversized_files_are_refused_without_reading_them_whole() {
    let text = MINIMAL.replace("scope = ", "username = \"u\"\npassword_file = \"/dev/zero\"\nscope = ");
    let (_, field, reason) = invalid(&text);
    assert_eq!(field, "cluster[0].password_file");
    assert!(reason.contains("larger than"), "{reason}");
    let e = Config::load(Path::new("/dev/zero")).unwrap_err();
    assert!(matches!(e, ConfigError::TooLarge { .. }), "{e}");
}

#[test]
fn admin_token_is_checked_and_never_shown() {
    let base = "[[cluster]]\nname = \"main\"\nscope = \"s\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n\
                [[listener]]\ncluster = \"main\"\nbind = \"127.0.0.1:5432\"\n";
    let with = |admin: &str| format!("[admin]\nlisten = \"127.0.0.1:7000\"\n{admin}\n{base}");
    let c = Config::parse(Path::new("t.toml"), &with("token = \"tok-0123456789abcdef\"")).unwrap();
    assert_eq!(c.admin_auth.token.as_ref().map(|t| t.expose()), Some("tok-0123456789abcdef"));
    assert!(!c.admin_auth.require_token);
    assert!(!format!("{c:?}").contains("tok-0123456789abcdef"));
    let e = Config::parse(Path::new("t.toml"), &with("token = \"short-Xy9\"")).unwrap_err().to_string();
    assert!(e.contains("admin.token") && e.contains("at least 16"), "{e}");
    assert!(!e.contains("short-Xy9"), "{e}");
    let e = Config::parse(Path::new("t.toml"), &with("require_token = true")).unwrap_err().to_string();
    assert!(e.contains("admin.require_token: needs admin.token"), "{e}");
    let c = Config::parse(Path::new("t.toml"), &with("token = \"tok-0123456789abcdef\"\nrequire_token = true"));
    assert!(c.unwrap().admin_auth.require_token);
}
