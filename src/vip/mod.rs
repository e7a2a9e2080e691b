//! The floating virtual IP: VRRP (interoperable with keepalived) or an etcd lease (`lease`)
//! elects which load-balancer host holds it.
//!
//! Pure cores: `packet` (VRRP v2/v3 codec), `fsm` (the RFC 5798 state machine) and `health`
//! (hysteresis of the proxy's fitness to hold the VIP).
//! I/O: `netlink` (add/remove the address), `garp` (gratuitous ARP / unsolicited neighbour
//! advertisement), `driver` (raw VRRP socket for IPv4 or IPv6, timers, and the glue that turns
//! the state machine's actions into I/O), `lease` (election by etcd lease instead of VRRP).
//! `lifecycle`: how an instance follows reloads and is handed over on a binary upgrade.

pub mod driver;
pub mod fsm;
pub mod garp;
pub mod health;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod netlink;
pub mod packet;
