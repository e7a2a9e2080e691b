//! Gratuitous ARP: tells the segment that the virtual IPv4 address now lives at this host's
//! MAC, so clients and routers update their neighbour entries at once. Frames are built with
//! pnet's packet types (pure, unit-tested) and sent on the interface through pnet's datalink
//! channel (AF_PACKET; needs CAP_NET_RAW).

use std::net::Ipv4Addr;

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

/// An open sender on one interface.
pub struct Announcer {
    ifname: String,
    mac: MacAddr,
    tx: Box<dyn DataLinkSender>,
}

pub fn interface(ifname: &str) -> Option<NetworkInterface> {
    datalink::interfaces().into_iter().find(|i| i.name == ifname)
}

impl Announcer {
    pub fn open(ifname: &str) -> Result<Announcer, GarpError> {
        let iface = interface(ifname).ok_or_else(|| GarpError::NoInterface(ifname.to_owned()))?;
        let mac = iface.mac.ok_or_else(|| GarpError::NoInterface(ifname.to_owned()))?;
        let cfg = datalink::Config { read_buffer_size: 2048, write_buffer_size: 2048, ..Default::default() };
        match datalink::channel(&iface, cfg) {
            Ok(Channel::Ethernet(tx, _rx)) => Ok(Announcer { ifname: ifname.to_owned(), mac, tx }),
            Ok(_) => Err(GarpError::Channel { ifname: ifname.to_owned(), source: std::io::Error::other("not an Ethernet channel") }),
            Err(source) => Err(GarpError::Channel { ifname: ifname.to_owned(), source }),
        }
    }

    /// Sends one gratuitous ARP for `ip`.
    pub fn announce(&mut self, ip: Ipv4Addr) -> Result<(), GarpError> {
        let f = frame(self.mac, ip);
        match self.tx.send_to(&f, None) {
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
}
