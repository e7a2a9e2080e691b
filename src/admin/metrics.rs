//! Prometheus metrics, following Prometheus naming: `pgfront_…_total` counters, `_seconds`
//! histograms, labels `cluster`, `listener`, `member`. One registry per process; the data path
//! only touches atomics through handles taken once per listener or cluster.

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
use crate::vip::driver::{SharedVipStatus, VipStatus};
use crate::vip::fsm::State;

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
    etcd_up: Family<ClusterLabels, Gauge>,
    etcd_errors: Family<ClusterLabels, Counter>,
    key_errors: Family<ClusterLabels, Counter>,
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
            etcd_up: Family::default(),
            etcd_errors: Family::default(),
            key_errors: Family::default(),
        };
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
        r.register("pgfront_etcd_up", "1 while etcd answers for this cluster", m.etcd_up.clone());
        r.register("pgfront_etcd_errors", "etcd requests or watches that failed", m.etcd_errors.clone());
        r.register("pgfront_etcd_key_errors", "Patroni keys that could not be parsed", m.key_errors.clone());
        m
    }

    /// Exposes the state of the VIPs, read from their shared status at each scrape.
    pub fn register_vips(&mut self, vips: Vec<SharedVipStatus>) {
        if !vips.is_empty() {
            self.registry.register_collector(Box::new(VipCollector(vips)));
        }
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

    /// The process-wide count of known cancel keys (`proxy::cancel::CancelMap`).
    pub fn cancel_keys(&self) -> Gauge {
        self.cancel_keys.clone()
    }

    pub fn cluster(&self, name: &str) -> ClusterMetrics {
        let l = ClusterLabels { cluster: name.to_owned() };
        ClusterMetrics {
            primary_routable: self.primary_routable.get_or_create(&l).clone(),
            leader_changes: self.leader_changes.get_or_create(&l).clone(),
            routing_pause: self.routing_pause.get_or_create(&l).clone(),
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

/// Handles of one cluster's metrics.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub primary_routable: Gauge,
    pub leader_changes: Counter,
    pub routing_pause: Histogram,
    pub etcd_up: Gauge,
    pub etcd_errors: Counter,
    pub key_errors: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
    address: String,
}

/// `pgfront_vip_*`: one sample per VIP, read from the drivers' shared status.
#[derive(Debug)]
struct VipCollector(Vec<SharedVipStatus>);

impl Collector for VipCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snaps: Vec<VipStatus> = self.0.iter().filter_map(|s| s.lock().ok().map(|s| s.clone())).collect();
        let labels = |v: &VipStatus| VipLabels { vip: v.name.clone(), address: v.address.clone() };
        type Get = fn(&VipStatus) -> u64;
        let gauges: [(&str, &str, Get); 2] = [
            ("pgfront_vip_master", "1 while this host holds the VIP", |v| u64::from(v.state == State::Master)),
            ("pgfront_vip_priority", "Priority this host advertises (lowered by health ties)", |v| {
                u64::from(v.priority)
            }),
        ];
        for (name, help, get) in gauges {
            let mut d = encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
            for v in &snaps {
                let l = labels(v);
                ConstGauge::new(get(v) as i64).encode(d.encode_family(&l)?)?;
            }
        }
        let counters: [(&str, &str, Get); 3] = [
            ("pgfront_vip_transitions", "State changes of the VIP election", |v| v.transitions),
            ("pgfront_vip_garps_sent", "Gratuitous ARPs sent", |v| v.garps_sent),
            ("pgfront_vip_bad_packets", "VRRP packets rejected (checksum, TTL, version, authentication)", |v| {
                v.bad_packets
            }),
        ];
        for (name, help, get) in counters {
            let mut d = encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
            for v in &snaps {
                let l = labels(v);
                ConstCounter::new(get(v)).encode(d.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}
