//! `/metrics` after known traffic, and the Grafana dashboard against what the process exposes.
//!
//! A real etcd 3.4 holds Patroni-format keys for TCP echo "databases" on loopback: pg1 the
//! leader, pg2 a replica whose port is closed (every connect to it fails). Known traffic goes
//! through pgfront: N sessions on the primary listener, each a PostgreSQL startup packet and a
//! payload echoed back, held open a known minimum time; one client on the replica listener
//! that cannot be served. The counters must equal the figures that traffic implies, byte for
//! byte.
//!
//! Then every query of `docs/grafana/pgfront.json` (panel `expr`s and template variable
//! queries) is parsed for the metric names it uses (`pgfront_*`, `process_*`), and each one must
//! be a sample name of the running process's `/metrics`. The configuration has a VIP on an
//! interface that does not exist, so that the `pgfront_vip_*` families are exposed: its driver
//! stops at once ("no address of its own"), nothing touches the host's interfaces.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use common::echo::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const SESSIONS: usize = 3;
const PAYLOAD: usize = 1000;
/// Each session is held open at least this long: a known lower bound of its duration.
const HOLD: Duration = Duration::from_millis(300);

fn config(admin: u16, etcd: &str, rw: u16, ro: u16) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:{admin}"

[[cluster]]
name = "main"
scope = "metrics"
etcd_endpoints = ["{etcd}"]

[[listener]]
name = "rw"
cluster = "main"
bind = "127.0.0.1:{rw}"
role = "primary"

[[listener]]
name = "ro"
cluster = "main"
bind = "127.0.0.1:{ro}"
role = "replica"
queue_timeout = "300ms"

[[vip]]
name = "vip-rw"
address = "192.0.2.10/24"
interface = "pgft-none0"
vrid = 51
"#
    )
}

/// The sample names of a Prometheus text exposition (`name` of `name{…} value`).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The metric names a PromQL expression uses: identifiers that start with `pgfront_` or
/// `process_` (every pgfront family does; no PromQL function, keyword or label of the dashboard
/// does), outside quoted strings.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut quoted = false;
    let mut word = String::new();
    let mut flush = |w: &mut String| {
        if w.starts_with("pgfront_") || w.starts_with("process_") {
            out.insert(w.clone());
        }
        w.clear();
    };
    for c in expr.chars() {
        if c == '"' {
            quoted = !quoted;
            flush(&mut word);
        } else if !quoted && (c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            word.push(c);
        } else {
            flush(&mut word);
        }
    }
    flush(&mut word);
    out
}

/// Every query of a dashboard: panel targets (rows included) and template variables.
fn queries(dash: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::String(s)) if s.contains('(') => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

#[test]
fn known_traffic_gives_exact_counters_and_every_dashboard_query_uses_exposed_metrics() {
    let rt = runtime();
    let etcd = Etcd::start();
    let backends = CancellationToken::new();
    let _stop_backends = backends.clone().drop_guard();
    let primary = rt.block_on(echo_server(backends.clone()));
    let dead = free_port();
    rt.block_on(async {
        put_member(&etcd.endpoint(), "metrics", "pg1", primary, "master").await;
        put_member(&etcd.endpoint(), "metrics", "pg2", dead, "replica").await;
        put_leader(&etcd.endpoint(), "metrics", "pg1").await;
    });
    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let test_start = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    let pf = Pgfront::start(&config(admin, &etcd.endpoint(), rw, ro), admin);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("pgfront to route the primary", Duration::from_secs(20), || pf.primary("main").map(|_| ()));

        // Known traffic: SESSIONS sessions, each a startup packet and PAYLOAD bytes echoed back,
        // open for at least HOLD; then one client the replica listener cannot serve.
        let startup_len = startup().len();
        let began = Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..SESSIONS {
                tasks.push(tokio::spawn(async move {
                    let opened = Instant::now();
                    let mut s = handshake(rw).await.unwrap_or_else(|e| panic!("session {i}: {e}"));
                    let payload: Vec<u8> = (0..PAYLOAD).map(|b| (b % 251) as u8).collect();
                    s.write_all(&payload).await.unwrap();
                    let mut back = vec![0u8; PAYLOAD];
                    s.read_exact(&mut back).await.unwrap();
                    assert_eq!(back, payload);
                    tokio::time::sleep_until((opened + HOLD).into()).await;
                    s.shutdown().await.unwrap();
                    // pgfront passes the half-close on; the echo closes; EOF comes back.
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await.unwrap();
                    assert!(rest.is_empty());
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            // Refused after its queue timeout: pg2's port is closed.
            let mut c = tokio::net::TcpStream::connect(("127.0.0.1", ro)).await.unwrap();
            c.write_all(&startup()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await;
            assert_eq!(answer.first(), Some(&b'E'), "an ErrorResponse");
        });
        let traffic_took = began.elapsed();
        let server = format!("listener=\"rw\",member=\"pg1\",addr=\"127.0.0.1:{primary}\"");
        wait_for("every session to end", Duration::from_secs(10), || {
            (pf.metric(&format!("pgfront_server_session_duration_seconds_count{{{server}}}")) == SESSIONS as f64
                && pf.metric("pgfront_listener_active_connections{listener=\"rw\"}") == 0.0)
                .then_some(())
        });

        let text = pf.metrics();
        let m = |sample: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
                .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
        };
        let n = SESSIONS as f64;
        let bytes = (SESSIONS * (startup_len + PAYLOAD)) as f64;
        assert_eq!(m("pgfront_listener_connections_total{listener=\"rw\"}"), n);
        assert_eq!(m(&format!("pgfront_server_connections_total{{{server}}}")), n);
        assert_eq!(m("pgfront_client_received_bytes_total{listener=\"rw\"}"), bytes);
        assert_eq!(m("pgfront_client_sent_bytes_total{listener=\"rw\"}"), bytes);
        assert_eq!(m(&format!("pgfront_server_sent_bytes_total{{{server}}}")), bytes);
        assert_eq!(m(&format!("pgfront_server_received_bytes_total{{{server}}}")), bytes);
        assert_eq!(m(&format!("pgfront_server_connect_errors_total{{{server}}}")), 0.0);
        // Connect time: one observation per session, each within the test's own time.
        assert_eq!(m(&format!("pgfront_server_connect_seconds_count{{{server}}}")), n);
        let connect_sum = m(&format!("pgfront_server_connect_seconds_sum{{{server}}}"));
        assert!(connect_sum > 0.0 && connect_sum < traffic_took.as_secs_f64() * n, "{connect_sum}");
        assert_eq!(m(&format!("pgfront_server_connect_seconds_bucket{{le=\"+Inf\",{server}}}")), n);
        // Session duration: each at least HOLD (none in the buckets up to 0.16 s), at most the
        // whole traffic's time.
        assert_eq!(m(&format!("pgfront_server_session_duration_seconds_count{{{server}}}")), n);
        assert_eq!(m(&format!("pgfront_server_session_duration_seconds_bucket{{le=\"0.16\",{server}}}")), 0.0);
        let duration_sum = m(&format!("pgfront_server_session_duration_seconds_sum{{{server}}}"));
        assert!(duration_sum >= HOLD.as_secs_f64() * n, "{duration_sum}");
        assert!(duration_sum <= traffic_took.as_secs_f64() * n + 1.0, "{duration_sum}");
        // The replica listener's client: refused, after at least one failed connect to pg2.
        assert_eq!(m("pgfront_listener_refused_total{listener=\"ro\",reason=\"no_server\"}"), 1.0);
        let ro_server = format!("listener=\"ro\",member=\"pg2\",addr=\"127.0.0.1:{dead}\"");
        assert!(m(&format!("pgfront_server_connect_errors_total{{{ro_server}}}")) >= 1.0);
        assert_eq!(m(&format!("pgfront_server_connections_total{{{ro_server}}}")), 0.0);
        assert_eq!(m(&format!("pgfront_server_sent_bytes_total{{{ro_server}}}")), 0.0, "nothing forwarded to pg2");
        // Server state, build and process.
        assert_eq!(m("pgfront_server_state{cluster=\"main\",member=\"pg1\",state=\"up\"}"), 1.0);
        assert_eq!(m("pgfront_server_state{cluster=\"main\",member=\"pg2\",state=\"up\"}"), 1.0);
        assert_eq!(m("pgfront_server_state{cluster=\"main\",member=\"pg2\",state=\"down\"}"), 0.0);
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("pgfront_build_info{{version=\"{version}\",")) && l.ends_with(" 1")),
            "{text}"
        );
        let started = m("process_start_time_seconds");
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(started >= test_start - 2.0 && started <= now, "start {started}, test began {test_start}, now {now}");
        // CPU time counts in clock ticks (10 ms): a young, idle process may show 0.
        assert!(m("process_cpu_seconds_total") >= 0.0);
        for name in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds"] {
            assert!(m(name) > 0.0, "{name}");
        }
        assert_eq!(m("pgfront_vip_master{vip=\"vip-rw\",address=\"192.0.2.10/24\"}"), 0.0);

        // The dashboard: every metric name of every query is exposed.
        let exposed = sample_names(&text);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/pgfront.json");
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let qs = queries(&dash);
        assert!(qs.len() >= 30, "{} queries", qs.len());
        let mut used = BTreeSet::new();
        let mut missing = Vec::new();
        for q in &qs {
            let names = metric_names(q);
            assert!(!names.is_empty(), "a query that uses no pgfront metric: {q}");
            for name in names {
                if !exposed.contains(&name) {
                    missing.push(format!("{name} (in {q})"));
                }
                used.insert(name);
            }
        }
        assert!(missing.is_empty(), "dashboard metrics not exposed:\n{}", missing.join("\n"));
        // What the dashboard is for: each of these is shown.
        for needed in [
            "pgfront_listener_active_connections",
            "pgfront_queue_length",
            "pgfront_server_sent_bytes_total",
            "pgfront_client_received_bytes_total",
            "pgfront_server_connect_seconds_bucket",
            "pgfront_server_state",
            "pgfront_cluster_routing_pause_seconds_bucket",
            "pgfront_vip_master",
            "pgfront_config_reloads_total",
        ] {
            assert!(used.contains(needed), "the dashboard does not show {needed}");
        }
        eprintln!("{} dashboard queries use {} metric names, all exposed", qs.len(), used.len());
    }));
    if let Err(e) = result {
        eprintln!("--- pgfront log (last 60 lines) ---\n{}", pf.proc.log_tail(60));
        std::panic::resume_unwind(e);
    }
}

#[test]
fn metric_names_are_found_outside_strings_only() {
    let q = r#"histogram_quantile(0.99, sum by (le) (rate(pgfront_x_bucket{listener=~"pgfront_not"}[5m]))) and on (instance) pgfront_build_info"#;
    let names: Vec<String> = metric_names(q).into_iter().collect();
    assert_eq!(names, vec!["pgfront_build_info".to_owned(), "pgfront_x_bucket".to_owned()]);
    assert_eq!(
        sample_names("# HELP a b\nfoo_total{x=\"1\"} 3\nbar 1\n"),
        ["bar".to_owned(), "foo_total".to_owned()].into_iter().collect()
    );
}
