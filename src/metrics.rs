//! Prometheus metrics, following Prometheus naming: `pgfront_…_total` counters, `_seconds`
//! histograms, labels `cluster`, `listener`, `member`. One registry per process; the data path
//! only touches atomics through handles taken once per listener, cluster or server (a server's
//! handles are made when it joins a pool, so a session's setup clones one `Arc`).
//!
//! Every family is registered here, including those read at scrape time (`pgfront_server_state`
//! from the supervisor's view of the members, `process_*` from `/proc`, `pgfront_vip_*` from the
//! VIP drivers). `docs/metrics.md` lists them all with their HAProxy exporter equivalents.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::topology::Backend;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CancelLabels {
    pub listener: String,
    /// `known_key`: forwarded to the session's server; `unknown_key`: routed like a session.
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub listener: String,
    pub member: String,
    pub addr: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminClosedLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterReasonLabels {
    pub cluster: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControlLabels {
    pub action: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    profile: &'static str,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn wait_buckets() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn connect_buckets() -> Histogram {
    // 0.5 ms … ~16 s: a loopback connect is well under a millisecond, a hung server runs into
    // connect_timeout.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn session_buckets() -> Histogram {
    // 10 ms … ~11.6 h, ×4 per bucket: one-query sessions to pooled connections held all day.
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// The states `pgfront_server_state` knows, HAProxy's `haproxy_server_status` states in lower
/// case: every member has one sample per state, 1 for its current one.
pub const SERVER_STATES: [&str; 5] = ["up", "nolb", "drain", "maint", "down"];

/// One member's state at a scrape, for `pgfront_server_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberStateSample {
    pub cluster: String,
    pub member: String,
    /// One of [`SERVER_STATES`].
    pub state: &'static str,
}

/// What the supervisor gives to read the members' states at each scrape.
pub(crate) type MemberStates = Arc<dyn Fn() -> Vec<MemberStateSample> + Send + Sync>;

/// Every metric family of the process.
pub struct Metrics {
    pub registry: Registry,
    accepted: Family<ListenerLabels, Counter>,
    active: Family<ListenerLabels, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    connect_errors: Family<ListenerLabels, Counter>,
    drained: Family<ListenerLabels, Counter>,
    queue: Family<ListenerLabels, Gauge>,
    queue_wait: HistFamily<ListenerLabels>,
    bytes_from_clients: Family<ListenerLabels, Counter>,
    bytes_to_clients: Family<ListenerLabels, Counter>,
    bad_startup: Family<ListenerLabels, Counter>,
    cancels: Family<CancelLabels, Counter>,
    cancel_keys: Gauge,
    primary_routable: Family<ClusterLabels, Gauge>,
    leader_changes: Family<ClusterLabels, Counter>,
    routing_pause: HistFamily<ClusterLabels>,
    primary_unconfirmed: Family<ClusterReasonLabels, Counter>,
    split_brain: Family<ClusterLabels, Gauge>,
    split_brains: Family<ClusterLabels, Counter>,
    fence_active: Family<ClusterLabels, Gauge>,
    fence_acks: Family<ClusterLabels, Counter>,
    etcd_up: Family<ClusterLabels, Gauge>,
    etcd_errors: Family<ClusterLabels, Counter>,
    key_errors: Family<ClusterLabels, Counter>,
    config_reloads: Family<ReloadLabels, Counter>,
    /// `pgfront_config_reloads_total{result="ok"}`.
    pub config_reloads_ok: Counter,
    /// `pgfront_config_reloads_total{result="error"}`.
    pub config_reloads_error: Counter,
    admin_connections: Gauge,
    admin_closed: Family<AdminClosedLabels, Counter>,
    admin_control: Family<ControlLabels, Counter>,
    server: ServerFamilies,
}

/// The per-server families (labels `listener`, `member`, `addr`), shared by every listener's
/// handles.
#[derive(Clone)]
struct ServerFamilies {
    active: Family<ServerLabels, Gauge>,
    connections: Family<ServerLabels, Counter>,
    connect_errors: Family<ServerLabels, Counter>,
    closed: Family<ServerLabels, Counter>,
    sent_bytes: Family<ServerLabels, Counter>,
    received_bytes: Family<ServerLabels, Counter>,
    connect_time: HistFamily<ServerLabels>,
    session_duration: HistFamily<ServerLabels>,
}

impl ServerFamilies {
    fn new() -> ServerFamilies {
        ServerFamilies {
            active: Family::default(),
            connections: Family::default(),
            connect_errors: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            connect_time: Family::new_with_constructor(connect_buckets),
            session_duration: Family::new_with_constructor(session_buckets),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            accepted: Family::default(),
            active: Family::default(),
            refused: Family::default(),
            connect_errors: Family::default(),
            drained: Family::default(),
            queue: Family::default(),
            queue_wait: Family::new_with_constructor(wait_buckets),
            bytes_from_clients: Family::default(),
            bytes_to_clients: Family::default(),
            bad_startup: Family::default(),
            cancels: Family::default(),
            cancel_keys: Gauge::default(),
            primary_routable: Family::default(),
            leader_changes: Family::default(),
            routing_pause: Family::new_with_constructor(wait_buckets),
            primary_unconfirmed: Family::default(),
            split_brain: Family::default(),
            split_brains: Family::default(),
            fence_active: Family::default(),
            fence_acks: Family::default(),
            etcd_up: Family::default(),
            etcd_errors: Family::default(),
            key_errors: Family::default(),
            config_reloads: Family::default(),
            config_reloads_ok: Counter::default(),
            config_reloads_error: Counter::default(),
            admin_connections: Gauge::default(),
            admin_closed: Family::default(),
            admin_control: Family::default(),
            server: ServerFamilies::new(),
        };
        m.config_reloads_ok = m.config_reloads.get_or_create(&ReloadLabels { result: "ok" }).clone();
        m.config_reloads_error = m.config_reloads.get_or_create(&ReloadLabels { result: "error" }).clone();
        let r = &mut m.registry;
        r.register("pgfront_listener_connections", "Client connections accepted", m.accepted.clone());
        r.register("pgfront_listener_active_connections", "Client connections open", m.active.clone());
        r.register(
            "pgfront_listener_refused",
            "Clients answered with an ErrorResponse (reason: no_server, full, closed, no_descriptors)",
            m.refused.clone(),
        );
        r.register(
            "pgfront_backend_connect_errors",
            "Backend connects that failed (retried when time allows)",
            m.connect_errors.clone(),
        );
        r.register(
            "pgfront_drained_connections",
            "Connections closed because their server lost its role",
            m.drained.clone(),
        );
        r.register("pgfront_queue_length", "Clients waiting for a server", m.queue.clone());
        r.register("pgfront_queue_wait_seconds", "Time queued clients waited", m.queue_wait.clone());
        r.register("pgfront_client_received_bytes", "Bytes received from clients", m.bytes_from_clients.clone());
        r.register("pgfront_client_sent_bytes", "Bytes sent to clients", m.bytes_to_clients.clone());
        let f = &m.server;
        r.register("pgfront_server_active_connections", "Connections open to each server", f.active.clone());
        r.register(
            "pgfront_server_connections",
            "Sessions placed on each server (connect answered)",
            f.connections.clone(),
        );
        r.register(
            "pgfront_server_connect_errors",
            "Connects to each server that failed or were not answered in time",
            f.connect_errors.clone(),
        );
        r.register(
            "pgfront_server_closed_sessions",
            "Sessions pgfront closed on each server: its role lost, a drain with --kill, a fence, a split brain",
            f.closed.clone(),
        );
        r.register(
            "pgfront_server_sent_bytes",
            "Bytes sent to each server (client requests, startup packet included)",
            f.sent_bytes.clone(),
        );
        r.register(
            "pgfront_server_received_bytes",
            "Bytes received from each server and forwarded to its clients",
            f.received_bytes.clone(),
        );
        r.register(
            "pgfront_server_connect_seconds",
            "Time from the start of a successful connect to the server's first answer",
            f.connect_time.clone(),
        );
        r.register(
            "pgfront_server_session_duration_seconds",
            "Life of the sessions placed on each server, from the client's accept to its close",
            f.session_duration.clone(),
        );
        r.register(
            "pgfront_listener_bad_startup",
            "Clients closed because their first packet was not PostgreSQL or did not come in time",
            m.bad_startup.clone(),
        );
        r.register(
            "pgfront_cancel_requests",
            "Cancel requests (route: known_key, sent to the session's server; unknown_key, routed like a session)",
            m.cancels.clone(),
        );
        r.register("pgfront_cancel_keys", "Open sessions whose cancel key pgfront knows", m.cancel_keys.clone());
        r.register(
            "pgfront_cluster_primary_routable",
            "1 when a writable primary takes new connections",
            m.primary_routable.clone(),
        );
        r.register("pgfront_cluster_leader_changes", "Changes of the routable primary", m.leader_changes.clone());
        r.register(
            "pgfront_cluster_routing_pause_seconds",
            "How long primary routing was paused at each change",
            m.routing_pause.clone(),
        );
        r.register(
            "pgfront_cluster_primary_unconfirmed",
            "Times the primary stopped taking new connections while etcd was unreachable, by what its direct check found (reason: check_lost, read_only)",
            m.primary_unconfirmed.clone(),
        );
        r.register(
            "pgfront_cluster_split_brain",
            "1 while two or more nodes claim primary on the highest timeline (agent keys): none is routed",
            m.split_brain.clone(),
        );
        r.register(
            "pgfront_cluster_split_brains",
            "Times a split brain began (two or more nodes claiming primary on the highest timeline)",
            m.split_brains.clone(),
        );
        r.register(
            "pgfront_cluster_fence_active",
            "1 while a fencing request (pgfront agent pre-promote) is in force for this cluster",
            m.fence_active.clone(),
        );
        r.register(
            "pgfront_cluster_fence_acks",
            "Fencing requests this proxy acknowledged (after closing its primary sessions to the fenced nodes)",
            m.fence_acks.clone(),
        );
        r.register("pgfront_etcd_up", "1 while etcd answers for this cluster", m.etcd_up.clone());
        r.register("pgfront_etcd_errors", "etcd requests or watches that failed", m.etcd_errors.clone());
        r.register("pgfront_etcd_key_errors", "Patroni keys that could not be parsed", m.key_errors.clone());
        r.register(
            "pgfront_config_reloads",
            "Configuration reloads (SIGHUP): ok, or error (the running configuration was kept)",
            m.config_reloads.clone(),
        );
        r.register("pgfront_admin_connections", "Admin HTTP connections open", m.admin_connections.clone());
        r.register(
            "pgfront_admin_closed_connections",
            "Admin HTTP connections closed by pgfront (reason: peer_limit, header_timeout, lifetime, shutdown)",
            m.admin_closed.clone(),
        );
        // Every combination exists from the start: a dashboard's rate starts at 0, not at the
        // first request.
        for action in ["drain", "resume"] {
            for result in ["ok", "refused", "invalid"] {
                drop(m.admin_control.get_or_create(&ControlLabels { action, result }));
            }
        }
        let r = &mut m.registry;
        r.register(
            "pgfront_admin_control_requests",
            "Drain and resume requests on the admin endpoint (result: ok, refused, invalid)",
            m.admin_control.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION"), profile }).set(1);
        r.register("pgfront_build_info", "Always 1: the version of the running binary", build);
        r.register_collector(Box::new(ProcessCollector));
        m
    }

    /// Exposes `pgfront_server_state`, read from `states` at each scrape (registered once).
    pub(crate) fn register_server_states(&mut self, states: MemberStates) {
        self.registry.register_collector(Box::new(ServerStateCollector(states)));
    }

    /// Counts a drain or resume request: `result` is `ok`, `refused` (not allowed) or
    /// `invalid` (unknown member, bad method or query).
    pub(crate) fn admin_control(&self, action: &'static str, result: &'static str) {
        self.admin_control.get_or_create(&ControlLabels { action, result }).inc();
    }

    /// Exposes the state of the VIPs, read from their shared status at each scrape. The list
    /// follows reloads: the supervisor replaces its content.
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }

    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let l = ListenerLabels { listener: name.to_owned() };
        let refused = |reason| self.refused.get_or_create(&RefusedLabels { listener: name.to_owned(), reason }).clone();
        let cancel = |route| self.cancels.get_or_create(&CancelLabels { listener: name.to_owned(), route }).clone();
        ListenerMetrics {
            listener: name.to_owned(),
            accepted: self.accepted.get_or_create(&l).clone(),
            active: self.active.get_or_create(&l).clone(),
            refused_no_server: refused("no_server"),
            refused_full: refused("full"),
            refused_closed: refused("closed"),
            refused_no_descriptors: refused("no_descriptors"),
            bad_startup: self.bad_startup.get_or_create(&l).clone(),
            cancels_routed: cancel("known_key"),
            cancels_unrouted: cancel("unknown_key"),
            connect_errors: self.connect_errors.get_or_create(&l).clone(),
            drained: self.drained.get_or_create(&l).clone(),
            queue: self.queue.get_or_create(&l).clone(),
            queue_wait: self.queue_wait.get_or_create(&l).clone(),
            bytes_from_clients: self.bytes_from_clients.get_or_create(&l).clone(),
            bytes_to_clients: self.bytes_to_clients.get_or_create(&l).clone(),
            servers: self.server.clone(),
        }
    }

    pub fn admin(&self) -> AdminMetrics {
        let closed = |reason| self.admin_closed.get_or_create(&AdminClosedLabels { reason }).clone();
        AdminMetrics {
            connections: self.admin_connections.clone(),
            closed_peer_limit: closed("peer_limit"),
            closed_header_timeout: closed("header_timeout"),
            closed_lifetime: closed("lifetime"),
            closed_shutdown: closed("shutdown"),
        }
    }

    /// The process-wide count of known cancel keys (`proxy::cancel::CancelMap`).
    pub fn cancel_keys(&self) -> Gauge {
        self.cancel_keys.clone()
    }

    pub fn cluster(&self, name: &str) -> ClusterMetrics {
        let l = ClusterLabels { cluster: name.to_owned() };
        // One statement each: a family's guard holds its lock until the end of the statement.
        let unconfirmed = |reason| {
            self.primary_unconfirmed.get_or_create(&ClusterReasonLabels { cluster: name.to_owned(), reason }).clone()
        };
        let primary_check_lost = unconfirmed("check_lost");
        let primary_read_only = unconfirmed("read_only");
        ClusterMetrics {
            primary_routable: self.primary_routable.get_or_create(&l).clone(),
            leader_changes: self.leader_changes.get_or_create(&l).clone(),
            routing_pause: self.routing_pause.get_or_create(&l).clone(),
            primary_check_lost,
            primary_read_only,
            split_brain: self.split_brain.get_or_create(&l).clone(),
            split_brains: self.split_brains.get_or_create(&l).clone(),
            fence_active: self.fence_active.get_or_create(&l).clone(),
            fence_acks: self.fence_acks.get_or_create(&l).clone(),
            etcd_up: self.etcd_up.get_or_create(&l).clone(),
            etcd_errors: self.etcd_errors.get_or_create(&l).clone(),
            key_errors: self.key_errors.get_or_create(&l).clone(),
        }
    }
}

/// Handles of one listener's metrics.
#[derive(Clone)]
pub struct ListenerMetrics {
    listener: String,
    pub accepted: Counter,
    pub active: Gauge,
    pub refused_no_server: Counter,
    pub refused_full: Counter,
    pub refused_closed: Counter,
    pub refused_no_descriptors: Counter,
    pub bad_startup: Counter,
    pub cancels_routed: Counter,
    pub cancels_unrouted: Counter,
    pub connect_errors: Counter,
    pub drained: Counter,
    pub queue: Gauge,
    pub queue_wait: Histogram,
    pub bytes_from_clients: Counter,
    pub bytes_to_clients: Counter,
    servers: ServerFamilies,
}

impl ListenerMetrics {
    pub fn server_active(&self, b: &Backend) -> Gauge {
        self.servers.active.get_or_create(&ServerLabels::of(&self.listener, b)).clone()
    }

    /// The handles of one server of this listener, made once when it joins the pool.
    pub fn server(&self, b: &Backend) -> Arc<ServerMetrics> {
        let l = ServerLabels::of(&self.listener, b);
        // One statement each: a family's guard holds its lock until the end of the statement.
        let connections = self.servers.connections.get_or_create(&l).clone();
        let connect_errors = self.servers.connect_errors.get_or_create(&l).clone();
        let closed = self.servers.closed.get_or_create(&l).clone();
        let sent_bytes = self.servers.sent_bytes.get_or_create(&l).clone();
        let received_bytes = self.servers.received_bytes.get_or_create(&l).clone();
        let connect_time = self.servers.connect_time.get_or_create(&l).clone();
        let session_duration = self.servers.session_duration.get_or_create(&l).clone();
        Arc::new(ServerMetrics {
            connections,
            connect_errors,
            closed,
            sent_bytes,
            received_bytes,
            connect_time,
            session_duration,
        })
    }
}

/// Handles of one server of one listener.
#[derive(Debug)]
pub struct ServerMetrics {
    pub connections: Counter,
    pub connect_errors: Counter,
    /// Sessions closed by pgfront (drained, killed, fenced), not by either end.
    pub closed: Counter,
    /// Client to server.
    pub sent_bytes: Counter,
    /// Server to client.
    pub received_bytes: Counter,
    pub connect_time: Histogram,
    pub session_duration: Histogram,
}

/// Where a session's bytes are counted: something `proxy::pipe` adds to as bytes pass.
pub trait ByteCount: Sync {
    fn add(&self, n: u64);
}

impl ByteCount for Counter {
    fn add(&self, n: u64) {
        self.inc_by(n);
    }
}

/// One direction of a session, counted for its listener and its server at once.
pub(crate) struct Both<'a>(pub &'a Counter, pub &'a Counter);

impl ByteCount for Both<'_> {
    fn add(&self, n: u64) {
        self.0.inc_by(n);
        self.1.inc_by(n);
    }
}

/// `pgfront_server_state{cluster, member, state}`: one sample per member and state.
struct ServerStateCollector(MemberStates);

impl std::fmt::Debug for ServerStateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerStateCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerStateLabels {
    cluster: String,
    member: String,
    state: &'static str,
}

impl Collector for ServerStateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = (self.0)();
        if samples.is_empty() {
            return Ok(());
        }
        let mut d = encoder.encode_descriptor(
            "pgfront_server_state",
            "1 for each member's current state: up, nolb (running, not load-balanced), drain (no new connections, sessions kept), maint (drained by an operator), down",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for s in &samples {
            for state in SERVER_STATES {
                let l = ServerStateLabels { cluster: s.cluster.clone(), member: s.member.clone(), state };
                ConstGauge::new(i64::from(s.state == state)).encode(d.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

/// The standard `process_*` metrics of Prometheus' client libraries, from `/proc/self` at each
/// scrape: five numbers from two small files do not justify a dependency.
#[derive(Debug)]
struct ProcessCollector;

/// What `ProcessCollector` reads; `None` where `/proc` could not be read.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ProcessStats {
    pub start_time_seconds: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Parses `/proc/self/stat` (fields after the command name, which may hold spaces and
/// parentheses) given the clock tick rate, the page size and the boot time (`btime`).
pub(crate) fn parse_proc_stat(stat: &str, ticks: f64, page: u64, btime: Option<u64>) -> ProcessStats {
    let mut out = ProcessStats::default();
    let Some((_, rest)) = stat.rsplit_once(')') else { return out };
    // rest starts with " state ppid …": field 3 (state) is index 0 here.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime 14, stime 15, starttime 22, vsize 23, rss 24 (1-based in proc(5)).
    if let (Some(u), Some(s)) = (num(11), num(12)) {
        out.cpu_seconds = Some((u + s) as f64 / ticks);
    }
    if let (Some(start), Some(btime)) = (num(19), btime) {
        out.start_time_seconds = Some(btime as f64 + start as f64 / ticks);
    }
    out.virtual_bytes = num(20);
    out.resident_bytes = num(21).map(|p| p * page);
    out
}

fn process_stats() -> ProcessStats {
    // SAFETY: sysconf reads a constant of the system.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let page = if page > 0 { page as u64 } else { 4096 };
    let btime = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok())));
    let mut st =
        std::fs::read_to_string("/proc/self/stat").map(|s| parse_proc_stat(&s, ticks, page, btime)).unwrap_or_default();
    st.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
        st.max_fds = Some(lim.rlim_cur);
    }
    st
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = process_stats();
        let gauges: [(&str, &str, Option<f64>); 5] = [
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                st.start_time_seconds,
            ),
            ("process_resident_memory_bytes", "Resident memory size in bytes", st.resident_bytes.map(|v| v as f64)),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", st.virtual_bytes.map(|v| v as f64)),
            ("process_open_fds", "Number of open file descriptors", st.open_fds.map(|v| v as f64)),
            ("process_max_fds", "Maximum number of open file descriptors (soft limit)", st.max_fds.map(|v| v as f64)),
        ];
        for (name, help, v) in gauges {
            if let Some(v) = v {
                let d = encoder.encode_descriptor(name, help, None, ConstGauge::new(0f64).metric_type())?;
                ConstGauge::new(v).encode(d)?;
            }
        }
        if let Some(cpu) = st.cpu_seconds {
            // Registered without the suffix: the encoder adds `_total` to counters.
            let d = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                ConstCounter::new(0f64).metric_type(),
            )?;
            ConstCounter::new(cpu).encode(d)?;
        }
        Ok(())
    }
}

/// Handles of the admin endpoint's own metrics: an attack on it shows here.
#[derive(Clone)]
pub struct AdminMetrics {
    pub connections: Gauge,
    pub closed_peer_limit: Counter,
    pub closed_header_timeout: Counter,
    pub closed_lifetime: Counter,
    pub closed_shutdown: Counter,
}

/// Handles of one cluster's metrics.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub primary_routable: Gauge,
    pub leader_changes: Counter,
    pub routing_pause: Histogram,
    /// The primary's direct check lost its connection while etcd was unreachable.
    pub primary_check_lost: Counter,
    /// The primary's direct check found it read-only while etcd was unreachable.
    pub primary_read_only: Counter,
    /// 1 while nodes claim primary together (agent keys).
    pub split_brain: Gauge,
    pub split_brains: Counter,
    /// 1 while a fencing request is in force.
    pub fence_active: Gauge,
    pub fence_acks: Counter,
    pub etcd_up: Gauge,
    pub etcd_errors: Counter,
    pub key_errors: Counter,
}

/// `pgfront agent`'s metrics, served at `GET /metrics` on its health endpoint. The prober
/// counts and times its probes; the rest is set from the agent's shared state at each scrape
/// (`set_node`), so a scrape always shows the latest probe and etcd view.
pub(crate) struct AgentMetrics {
    registry: Registry,
    probes: Family<ProbeLabels, Counter>,
    probe_seconds: Histogram,
    postgres_up: Gauge,
    role: Family<RoleLabels, Gauge>,
    state: Family<StateLabels, Gauge>,
    timeline: Gauge,
    lag_bytes: Gauge<f64, std::sync::atomic::AtomicU64>,
    maintenance: Gauge,
    etcd_up: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// What one scrape shows of the node (from the last probe and the publisher's etcd view).
pub(crate) struct AgentNode<'a> {
    /// `running`, `starting`, `stopped`, `unreachable`; `None` before the first probe.
    pub state: Option<&'a str>,
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    pub lag_bytes: Option<u64>,
    pub maintenance: bool,
    pub etcd_up: bool,
}

const AGENT_ROLES: [&str; 3] = ["primary", "replica", "unknown"];
const AGENT_STATES: [&str; 4] = ["running", "starting", "stopped", "unreachable"];

impl AgentMetrics {
    pub(crate) fn new() -> AgentMetrics {
        let mut r = Registry::default();
        let probes: Family<ProbeLabels, Counter> = Family::default();
        for result in ["ok", "failed"] {
            drop(probes.get_or_create(&ProbeLabels { result }));
        }
        r.register("pgfront_agent_probes", "Probes of the local PostgreSQL (result: ok, failed)", probes.clone());
        // 0.5 ms .. 8 s: a probe is a few milliseconds; a hung server hits the timeout.
        let probe_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 15));
        r.register("pgfront_agent_probe_duration_seconds", "Time each probe took", probe_seconds.clone());
        let postgres_up = Gauge::default();
        r.register("pgfront_agent_postgres_up", "1 when the last probe ran its statement", postgres_up.clone());
        let role: Family<RoleLabels, Gauge> = Family::default();
        r.register(
            "pgfront_agent_role",
            "1 for the node's role in the last probe (primary, replica, unknown), 0 for the others",
            role.clone(),
        );
        let state: Family<StateLabels, Gauge> = Family::default();
        r.register(
            "pgfront_agent_state",
            "1 for the node's state in the last probe (running, starting, stopped, unreachable)",
            state.clone(),
        );
        let timeline = Gauge::default();
        r.register("pgfront_agent_timeline", "The node's timeline (0 when unknown)", timeline.clone());
        let lag_bytes = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        r.register(
            "pgfront_agent_replication_lag_bytes",
            "A replica's replay lag behind the primary's published LSN (NaN when unknown, e.g. on a primary)",
            lag_bytes.clone(),
        );
        let maintenance = Gauge::default();
        r.register(
            "pgfront_agent_maintenance",
            "1 while the node is drained (`pgfront agent drain`)",
            maintenance.clone(),
        );
        let etcd_up = Gauge::default();
        r.register(
            "pgfront_agent_etcd_up",
            "1 while etcd answered within the lease TTL (the node's key is kept alive)",
            etcd_up.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION"), profile }).set(1);
        r.register("pgfront_build_info", "Always 1: the version of the running binary", build);
        r.register_collector(Box::new(ProcessCollector));
        let m = AgentMetrics {
            registry: r,
            probes,
            probe_seconds,
            postgres_up,
            role,
            state,
            timeline,
            lag_bytes,
            maintenance,
            etcd_up,
        };
        m.set_node(&AgentNode {
            state: None,
            in_recovery: None,
            timeline: None,
            lag_bytes: None,
            maintenance: false,
            etcd_up: false,
        });
        m
    }

    /// Counts one probe and its duration.
    pub(crate) fn probed(&self, ok: bool, took: std::time::Duration) {
        self.probes.get_or_create(&ProbeLabels { result: if ok { "ok" } else { "failed" } }).inc();
        self.probe_seconds.observe(took.as_secs_f64());
    }

    /// Sets the node's gauges (each scrape, before encoding).
    pub(crate) fn set_node(&self, n: &AgentNode<'_>) {
        self.postgres_up.set(i64::from(n.state == Some("running")));
        let role = match n.in_recovery {
            Some(false) => "primary",
            Some(true) => "replica",
            None => "unknown",
        };
        for r in AGENT_ROLES {
            self.role.get_or_create(&RoleLabels { role: r }).set(i64::from(r == role));
        }
        for s in AGENT_STATES {
            self.state.get_or_create(&StateLabels { state: s }).set(i64::from(Some(s) == n.state));
        }
        self.timeline.set(n.timeline.map_or(0, i64::from));
        self.lag_bytes.set(n.lag_bytes.map_or(f64::NAN, |l| l as f64));
        self.maintenance.set(i64::from(n.maintenance));
        self.etcd_up.set(i64::from(n.etcd_up));
    }

    pub(crate) fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_metrics_show_the_node_and_count_probes() {
        let m = AgentMetrics::new();
        m.probed(true, std::time::Duration::from_millis(2));
        m.probed(false, std::time::Duration::from_secs(1));
        m.set_node(&AgentNode {
            state: Some("running"),
            in_recovery: Some(true),
            timeline: Some(3),
            lag_bytes: Some(4096),
            maintenance: true,
            etcd_up: true,
        });
        let text = m.encode();
        for line in [
            "pgfront_agent_probes_total{result=\"ok\"} 1",
            "pgfront_agent_probes_total{result=\"failed\"} 1",
            "pgfront_agent_probe_duration_seconds_count 2",
            "pgfront_agent_postgres_up 1",
            "pgfront_agent_role{role=\"replica\"} 1",
            "pgfront_agent_role{role=\"primary\"} 0",
            "pgfront_agent_state{state=\"running\"} 1",
            "pgfront_agent_state{state=\"stopped\"} 0",
            "pgfront_agent_timeline 3",
            "pgfront_agent_replication_lag_bytes 4096",
            "pgfront_agent_maintenance 1",
            "pgfront_agent_etcd_up 1",
            "pgfront_build_info{",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        m.set_node(&AgentNode {
            state: Some("stopped"),
            in_recovery: None,
            timeline: None,
            lag_bytes: None,
            maintenance: false,
            etcd_up: false,
        });
        let text = m.encode();
        for line in [
            "pgfront_agent_postgres_up 0",
            "pgfront_agent_role{role=\"unknown\"} 1",
            "pgfront_agent_state{state=\"stopped\"} 1",
            "pgfront_agent_state{state=\"running\"} 0",
            "pgfront_agent_replication_lag_bytes NaN",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // proc(5): pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss
        let stat = "42 (pg front) x)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 123456789 300 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_proc_stat(stat, 100.0, 4096, Some(1_700_000_000));
        assert_eq!(st.cpu_seconds, Some(3.0));
        assert_eq!(st.start_time_seconds, Some(1_700_000_010.0));
        assert_eq!(st.virtual_bytes, Some(123_456_789));
        assert_eq!(st.resident_bytes, Some(300 * 4096));
        assert_eq!(parse_proc_stat("garbage", 100.0, 4096, None), ProcessStats::default());
    }

    #[test]
    fn the_process_collector_reads_this_process() {
        let st = process_stats();
        assert!(st.start_time_seconds.is_some_and(|s| s > 1.0e9), "{st:?}");
        assert!(st.open_fds.is_some_and(|n| n > 0), "{st:?}");
        let text = Metrics::new().encode();
        assert!(text.contains("\nprocess_start_time_seconds "), "{text}");
        assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
        assert!(text.contains(&format!("pgfront_build_info{{version=\"{}\"", env!("CARGO_PKG_VERSION"))), "{text}");
    }
}
