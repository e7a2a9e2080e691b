//! Prometheus metrics, following Prometheus naming: `pgfront_…_total` counters, `_seconds`
//! histograms, labels `cluster`, `listener`, `member`. One registry per process; the data path
//! only touches atomics through handles taken once per listener or cluster.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn wait_buckets() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

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
    server_active: Family<ServerLabels, Gauge>,
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
            server_active: Family::default(),
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
        r.register("pgfront_server_active_connections", "Connections open to each server", m.server_active.clone());
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
        m
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
            servers: self.server_active.clone(),
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
    servers: Family<ServerLabels, Gauge>,
}

impl ListenerMetrics {
    pub fn server_active(&self, b: &Backend) -> Gauge {
        self.servers.get_or_create(&ServerLabels::of(&self.listener, b)).clone()
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
