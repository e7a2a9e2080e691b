//! Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6): tell the segment that
//! the virtual address now lives at this host's MAC, so clients and routers update their
//! neighbour entries at once. Frames are built with pnet's packet types (pure, unit-tested) and
//! sent on the interface through pnet's datalink channel (AF_PACKET; needs CAP_NET_RAW).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pnet::packet::icmpv6::ndp::{MutableNeighborAdvertPacket, NdpOption, NdpOptionTypes, NeighborAdvertFlags};
use pnet::packet::icmpv6::{self, Icmpv6Packet, Icmpv6Types};
use pnet::packet::ip::IpNextHeaderProtocols;
use pnet::packet::ipv6::MutableIpv6Packet;

use pnet::datalink::{self, Channel, DataLinkSender, MacAddr, NetworkInterface};
use pnet::packet::arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket};
use pnet::packet::ethernet::{EtherTypes, MutableEthernetPacket};

#[derive(Debug, thiserror::Error)]
pub enum GarpError {
    #[error("interface {0:?} not found or has no MAC address")]
    NoInterface(String),
    #[error("interface {ifname}: cannot open a packet socket: {source}")]
    Channel { ifname: String, source: std::io::Error },
    #[error("interface {ifname}: send failed: {source}")]
    Send { ifname: String, source: std::io::Error },
}

const FRAME_LEN: usize = 42;

/// A gratuitous ARP request for `ip` from `mac`: broadcast, sender and target address both
/// `ip` (RFC 5227 §3, the form keepalived sends).
pub fn frame(mac: MacAddr, ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    let mut buf = [0u8; FRAME_LEN];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("42 bytes hold an Ethernet header");
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(mac);
        eth.set_ethertype(EtherTypes::Arp);
    }
    let mut arp = MutableArpPacket::new(&mut buf[14..]).expect("28 bytes hold an ARP packet");
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(ArpOperations::Request);
    arp.set_sender_hw_addr(mac);
    arp.set_sender_proto_addr(ip);
    arp.set_target_hw_addr(MacAddr::zero());
    arp.set_target_proto_addr(ip);
    buf
}

const NA_LEN: usize = 14 + 40 + 32;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// An unsolicited neighbour advertisement for `target` from `mac` (RFC 4861 §7.2.6): to all
/// nodes, override flag set, with the target link-layer address option; hop limit 255.
pub fn na_frame(mac: MacAddr, src: Ipv6Addr, target: Ipv6Addr) -> [u8; NA_LEN] {
    let mut buf = [0u8; NA_LEN];
    {
        let mut eth = MutableEthernetPacket::new(&mut buf).expect("room for Ethernet");
        eth.set_destination(MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        eth.set_source(mac);
        eth.set_ethertype(EtherTypes::Ipv6);
    }
    {
        let mut ip = MutableIpv6Packet::new(&mut buf[14..]).expect("room for IPv6");
        ip.set_version(6);
        ip.set_payload_length(32);
        ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip.set_hop_limit(255);
        ip.set_source(src);
        ip.set_destination(ALL_NODES);
    }
    {
        let mut na = MutableNeighborAdvertPacket::new(&mut buf[54..]).expect("room for the NA");
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_flags(NeighborAdvertFlags::Override);
        na.set_target_addr(target);
        na.set_options(&[NdpOption {
            option_type: NdpOptionTypes::TargetLLAddr,
            length: 1,
            data: mac.octets().to_vec(),
        }]);
    }
    let sum = icmpv6::checksum(&Icmpv6Packet::new(&buf[54..]).expect("an ICMPv6 packet"), &src, &ALL_NODES);
    buf[56..58].copy_from_slice(&sum.to_be_bytes());
    buf
}

/// An open sender on one interface.
pub struct Announcer {
    ifname: String,
    mac: MacAddr,
    /// The interface's link-local address: source of neighbour advertisements.
    link_local: Option<Ipv6Addr>,
    tx: Box<dyn DataLinkSender>,
}

pub fn interface(ifname: &str) -> Option<NetworkInterface> {
    datalink::interfaces().into_iter().find(|i| i.name == ifname)
}

impl Announcer {
    pub fn open(ifname: &str) -> Result<Announcer, GarpError> {
        let iface = interface(ifname).ok_or_else(|| GarpError::NoInterface(ifname.to_owned()))?;
        let mac = iface.mac.ok_or_else(|| GarpError::NoInterface(ifname.to_owned()))?;
        let link_local = iface.ips.iter().find_map(|n| match n.ip() {
            IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => Some(a),
            _ => None,
        });
        let cfg = datalink::Config { read_buffer_size: 2048, write_buffer_size: 2048, ..Default::default() };
        match datalink::channel(&iface, cfg) {
            Ok(Channel::Ethernet(tx, _rx)) => Ok(Announcer { ifname: ifname.to_owned(), mac, link_local, tx }),
            Ok(_) => Err(GarpError::Channel {
                ifname: ifname.to_owned(),
                source: std::io::Error::other("not an Ethernet channel"),
            }),
            Err(source) => Err(GarpError::Channel { ifname: ifname.to_owned(), source }),
        }
    }

    /// Sends one gratuitous ARP (IPv4) or unsolicited neighbour advertisement (IPv6) for `ip`.
    pub fn announce(&mut self, ip: IpAddr) -> Result<(), GarpError> {
        let arp;
        let na;
        let f: &[u8] = match ip {
            IpAddr::V4(v4) => {
                arp = frame(self.mac, v4);
                &arp
            }
            IpAddr::V6(v6) => {
                na = na_frame(self.mac, self.link_local.unwrap_or(v6), v6);
                &na
            }
        };
        match self.tx.send_to(f, None) {
            Some(Ok(())) => Ok(()),
            Some(Err(source)) => Err(GarpError::Send { ifname: self.ifname.clone(), source }),
            None => Err(GarpError::Send { ifname: self.ifname.clone(), source: std::io::Error::other("no buffer") }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_frame() {
        let f = frame(MacAddr::new(0x02, 0, 0, 0, 0, 0x11), Ipv4Addr::new(198, 51, 100, 10));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x11, 0x08, 0x06, // Ethernet, ARP
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01,                                // Ethernet/IPv4, request
            0x02, 0, 0, 0, 0, 0x11, 198, 51, 100, 10,                                // sender
            0, 0, 0, 0, 0, 0, 198, 51, 100, 10,                                      // target
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn neighbour_advertisement() {
        let mac = MacAddr::new(0x02, 0, 0, 0, 0, 0x11);
        let src: Ipv6Addr = "fe80::11".parse().unwrap();
        let target: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let f = na_frame(mac, src, target);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6);
        assert_eq!((f[20], f[21]), (58, 255), "ICMPv6, hop limit 255");
        assert_eq!(&f[22..38], &src.octets());
        assert_eq!(f[54], 136, "neighbour advertisement");
        assert_eq!(f[58], 0x20, "override, not solicited");
        assert_eq!(&f[62..78], &target.octets());
        assert_eq!(&f[78..80], &[2, 1], "target link-layer address option");
        assert_eq!(&f[80..86], &mac.octets());
        // The checksum verifies: the one's complement sum over pseudo-header and message is 0.
        let mut sum: u32 = 0;
        let mut add =
            |b: &[u8]| b.chunks(2).for_each(|c| sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])));
        add(&src.octets());
        add(&ALL_NODES.octets());
        add(&[0, 0, 0, 32, 0, 0, 0, 58]);
        add(&f[54..]);
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
