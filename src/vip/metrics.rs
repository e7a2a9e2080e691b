//! `pgfront_vip_*`: the VIPs' own metric families, read from their shared status at each
//! scrape. Registered once (`metrics::Metrics::register_collector`); the supervisor replaces the
//! list's content when a reload adds or removes a VIP.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::driver::{SharedVipStatus, VipStatus};
use super::fsm::State;

/// The collector over `vips`.
pub fn collector(vips: Arc<Mutex<Vec<SharedVipStatus>>>) -> Box<dyn Collector> {
    Box::new(VipCollector(vips))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
    address: String,
}

/// `pgfront_vip_*`: one sample per VIP, read from the drivers' shared status.
#[derive(Debug)]
struct VipCollector(Arc<Mutex<Vec<SharedVipStatus>>>);

impl Collector for VipCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let list: Vec<SharedVipStatus> = self.0.lock().map(|l| l.clone()).unwrap_or_default();
        if list.is_empty() {
            return Ok(());
        }
        let snaps: Vec<VipStatus> = list.iter().filter_map(|s| s.lock().ok().map(|s| s.clone())).collect();
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
