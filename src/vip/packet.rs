//! Pure: VRRP advertisements, version 2 (RFC 3768, IPv4, optional simple-text authentication as
//! keepalived sends it) and version 3 (RFC 5798, IPv4 and IPv6, interval in centiseconds,
//! checksum over a pseudo-header). No sockets: the VRRP payload only, with the source and
//! destination addresses passed in for the v3 checksum.
//!
//! `decode` rejects anything malformed with a `DecodeError` and never panics, whatever the
//! bytes (property-tested).

use std::net::IpAddr;
use std::time::Duration;

/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;
/// Multicast group of VRRP over IPv4 (RFC 5798 §5.1.1.2).
pub const MCAST_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(224, 0, 0, 18);
/// Multicast group of VRRP over IPv6 (RFC 5798 §5.1.2.2).
pub const MCAST_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);

const HEADER: usize = 8;
const AUTH_LEN: usize = 8;
const AUTH_NONE: u8 = 0;
const AUTH_SIMPLE: u8 = 1;

pub use crate::config::VrrpVersion as Version;

/// One advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub version: Version,
    pub vrid: u8,
    /// 0: the master is leaving; 255: the address owner.
    pub priority: u8,
    /// Advertisement interval, in centiseconds (v2 carries whole seconds).
    pub interval_cs: u16,
    pub addrs: Vec<IpAddr>,
    /// VRRPv2 simple-text password (up to 8 bytes, zero padded), as keepalived's `auth_pass`.
    pub auth: Option<[u8; 8]>,
}

impl Advert {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.interval_cs) * 10)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {0} bytes is too short for VRRP")]
    TooShort(usize),
    #[error("unsupported VRRP version {0}")]
    Version(u8),
    #[error("VRRP type {0} is not an advertisement")]
    Type(u8),
    #[error("bad checksum {got:#06x}, expected {want:#06x}")]
    Checksum { got: u16, want: u16 },
    #[error("{count} addresses do not fit a {len}-byte packet")]
    Count { count: u8, len: usize },
    #[error("VRRPv2 over IPv6 does not exist")]
    V2OverIpv6,
    #[error("unknown VRRPv2 authentication type {0}")]
    AuthType(u8),
    #[error("advertisement interval 0")]
    ZeroInterval,
}

/// Turns keepalived's `auth_pass` into the 8 bytes on the wire (longer passwords are cut, as
/// keepalived does).
pub fn auth_bytes(pass: &str) -> [u8; 8] {
    let mut a = [0u8; 8];
    for (d, s) in a.iter_mut().zip(pass.bytes()) {
        *d = s;
    }
    a
}

/// The Internet checksum (RFC 1071) of `data` added to a running `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, len: usize) -> u32 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut sum = sum16(0, &s.octets());
            sum = sum16(sum, &d.octets());
            sum + u32::from(IPPROTO_VRRP) + len as u32
        }
        (s, d) => {
            let (s, d) = (to_v6(s), to_v6(d));
            let mut sum = sum16(0, &s.octets());
            sum = sum16(sum, &d.octets());
            sum + ((len as u32) >> 16) + (len as u32 & 0xffff) + u32::from(IPPROTO_VRRP)
        }
    }
}

fn to_v6(a: IpAddr) -> std::net::Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

fn checksum(version: Version, pkt: &[u8], src: IpAddr, dst: IpAddr) -> u16 {
    match version {
        Version::V2 => fold(sum16(0, pkt)),
        Version::V3 => fold(sum16(pseudo_sum(src, dst, pkt.len()), pkt)),
    }
}

/// Encodes `a` as sent from `src` to `dst` (both needed for the v3 checksum).
pub fn encode(a: &Advert, src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let mut p = Vec::with_capacity(HEADER + 16 * a.addrs.len() + AUTH_LEN);
    match a.version {
        Version::V2 => {
            p.extend_from_slice(&[0x21, a.vrid, a.priority, a.addrs.len() as u8]);
            p.push(if a.auth.is_some() { AUTH_SIMPLE } else { AUTH_NONE });
            p.push(((a.interval_cs + 50) / 100).clamp(1, 255) as u8);
        }
        Version::V3 => {
            p.extend_from_slice(&[0x31, a.vrid, a.priority, a.addrs.len() as u8]);
            p.extend_from_slice(&(a.interval_cs & 0x0fff).to_be_bytes());
        }
    }
    p.extend_from_slice(&[0, 0]);
    for addr in &a.addrs {
        match addr {
            IpAddr::V4(v) => p.extend_from_slice(&v.octets()),
            IpAddr::V6(v) => p.extend_from_slice(&v.octets()),
        }
    }
    if a.version == Version::V2 {
        p.extend_from_slice(&a.auth.unwrap_or([0; 8]));
    }
    let c = checksum(a.version, &p, src, dst);
    p[6..8].copy_from_slice(&c.to_be_bytes());
    p
}

/// Decodes the VRRP payload of a packet received from `src` to `dst`.
pub fn decode(p: &[u8], src: IpAddr, dst: IpAddr) -> Result<Advert, DecodeError> {
    if p.len() < HEADER {
        return Err(DecodeError::TooShort(p.len()));
    }
    let version = match p[0] >> 4 {
        2 => Version::V2,
        3 => Version::V3,
        v => return Err(DecodeError::Version(v)),
    };
    if p[0] & 0x0f != 1 {
        return Err(DecodeError::Type(p[0] & 0x0f));
    }
    let ipv6 = src.is_ipv6();
    if ipv6 && version == Version::V2 {
        return Err(DecodeError::V2OverIpv6);
    }
    let count = p[3];
    let alen = if ipv6 { 16 } else { 4 };
    let need = HEADER + alen * usize::from(count) + if version == Version::V2 { AUTH_LEN } else { 0 };
    if p.len() < need {
        return Err(DecodeError::Count { count, len: p.len() });
    }
    // keepalived and RFC senders put nothing after the addresses (and v2 auth data); a longer
    // packet still checks over its whole length.
    let got = u16::from_be_bytes([p[6], p[7]]);
    let mut zeroed = p.to_vec();
    zeroed[6] = 0;
    zeroed[7] = 0;
    let want = checksum(version, &zeroed, src, dst);
    if got != want {
        return Err(DecodeError::Checksum { got, want });
    }
    let (interval_cs, auth) = match version {
        Version::V2 => {
            let auth = match p[4] {
                AUTH_NONE => None,
                AUTH_SIMPLE => {
                    let at = HEADER + alen * usize::from(count);
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&p[at..at + AUTH_LEN]);
                    Some(a)
                }
                t => return Err(DecodeError::AuthType(t)),
            };
            (u16::from(p[5]) * 100, auth)
        }
        Version::V3 => (u16::from_be_bytes([p[4], p[5]]) & 0x0fff, None),
    };
    if interval_cs == 0 {
        return Err(DecodeError::ZeroInterval);
    }
    let addrs = p[HEADER..HEADER + alen * usize::from(count)]
        .chunks_exact(alen)
        .map(|c| match c.len() {
            4 => IpAddr::from([c[0], c[1], c[2], c[3]]),
            _ => {
                let mut o = [0u8; 16];
                o.copy_from_slice(c);
                IpAddr::from(o)
            }
        })
        .collect();
    Ok(Advert { version, vrid: p[1], priority: p[2], interval_cs, addrs, auth })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A VRRPv2 advert laid out as keepalived 2.2 sends it: vrid 51, priority 100, advert_int 1,
    /// auth_pass "secret", VIP 198.51.100.10. The checksum 0x1340 was computed independently
    /// (RFC 1071, in Python); interoperation with a live keepalived is tested in tests/vip_netns.rs.
    const KEEPALIVED_V2: [u8; 20] =
        [0x21, 0x33, 0x64, 0x01, 0x01, 0x01, 0x13, 0x40, 198, 51, 100, 10, b's', b'e', b'c', b'r', b'e', b't', 0, 0];

    #[test]
    fn golden_v2_with_simple_auth() {
        let a = decode(&KEEPALIVED_V2, v4("198.51.100.11"), v4("224.0.0.18")).unwrap();
        assert_eq!(
            a,
            Advert {
                version: Version::V2,
                vrid: 51,
                priority: 100,
                interval_cs: 100,
                addrs: vec![v4("198.51.100.10")],
                auth: Some(auth_bytes("secret")),
            }
        );
        assert_eq!(encode(&a, v4("198.51.100.11"), v4("224.0.0.18")), KEEPALIVED_V2);
    }

    #[test]
    fn v3_checksum_covers_the_pseudo_header() {
        let a = Advert {
            version: Version::V3,
            vrid: 7,
            priority: 150,
            interval_cs: 10,
            addrs: vec![v4("203.0.113.10")],
            auth: None,
        };
        let p = encode(&a, v4("203.0.113.1"), v4("224.0.0.18"));
        assert_eq!(p.len(), 12);
        assert_eq!(&p[..6], &[0x31, 7, 150, 1, 0, 10]);
        assert_eq!(decode(&p, v4("203.0.113.1"), v4("224.0.0.18")).unwrap(), a);
        // The same bytes from another source fail the checksum.
        assert!(matches!(decode(&p, v4("203.0.113.2"), v4("224.0.0.18")), Err(DecodeError::Checksum { .. })));
        // Verifying the whole packet with the pseudo-header sums to zero.
        assert_eq!(fold(sum16(pseudo_sum(v4("203.0.113.1"), v4("224.0.0.18"), p.len()), &p)), 0);
    }

    #[test]
    fn v3_over_ipv6() {
        let src: IpAddr = "fe80::1".parse().unwrap();
        let a = Advert {
            version: Version::V3,
            vrid: 9,
            priority: 100,
            interval_cs: 100,
            addrs: vec!["2001:db8::10".parse().unwrap()],
            auth: None,
        };
        let p = encode(&a, src, IpAddr::V6(MCAST_V6));
        assert_eq!(p.len(), 24);
        assert_eq!(decode(&p, src, IpAddr::V6(MCAST_V6)).unwrap(), a);
    }

    #[test]
    fn malformed_packets_are_rejected() {
        let (s, d) = (v4("198.51.100.11"), v4("224.0.0.18"));
        assert_eq!(decode(&[0x21, 1, 2], s, d), Err(DecodeError::TooShort(3)));
        let mut p = KEEPALIVED_V2;
        p[0] = 0x41;
        assert_eq!(decode(&p, s, d), Err(DecodeError::Version(4)));
        let mut p = KEEPALIVED_V2;
        p[0] = 0x22;
        assert_eq!(decode(&p, s, d), Err(DecodeError::Type(2)));
        let mut p = KEEPALIVED_V2;
        p[9] ^= 1;
        assert!(matches!(decode(&p, s, d), Err(DecodeError::Checksum { .. })));
        let mut p = KEEPALIVED_V2.to_vec();
        p[3] = 9;
        assert!(matches!(decode(&p, s, d), Err(DecodeError::Count { count: 9, .. })));
        p.truncate(15);
        assert!(decode(&p, s, d).is_err());
    }

    fn arb_advert() -> impl Strategy<Value = (Advert, bool)> {
        (
            any::<bool>(),
            any::<u8>(),
            any::<u8>(),
            1u16..4096,
            proptest::collection::vec(any::<[u8; 4]>(), 0..8),
            proptest::option::of(any::<[u8; 8]>()),
        )
            .prop_map(|(v3, vrid, priority, iv, addrs, auth)| {
                let version = if v3 { Version::V3 } else { Version::V2 };
                let interval_cs = if v3 { iv } else { (iv % 255).max(1) * 100 };
                let addrs = addrs.into_iter().map(IpAddr::from).collect();
                (Advert { version, vrid, priority, interval_cs, addrs, auth: if v3 { None } else { auth } }, v3)
            })
    }

    proptest! {
        #[test]
        fn roundtrip((a, _) in arb_advert(), src in any::<[u8; 4]>()) {
            let (s, d) = (IpAddr::from(src), IpAddr::V4(MCAST_V4));
            let p = encode(&a, s, d);
            prop_assert_eq!(decode(&p, s, d).unwrap(), a);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80), v6 in any::<bool>()) {
            let (s, d) = if v6 { ("fe80::1".parse().unwrap(), IpAddr::V6(MCAST_V6)) } else { (v4("10.0.0.1"), IpAddr::V4(MCAST_V4)) };
            let _ = decode(&bytes, s, d);
        }

        #[test]
        fn any_flipped_bit_is_caught((a, _) in arb_advert(), bit in 0usize..96) {
            let (s, d) = (v4("198.51.100.1"), IpAddr::V4(MCAST_V4));
            let mut p = encode(&a, s, d);
            let bit = bit % (p.len() * 8);
            p[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&p, s, d) != Ok(a));
        }
    }
}
