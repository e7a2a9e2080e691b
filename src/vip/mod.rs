//! The floating virtual IP: VRRP (interoperable with keepalived) elects which load-balancer
//! host holds it.
//!
//! Pure cores: `packet` (VRRP v2/v3 codec) and `fsm` (the RFC 5798 state machine).
//! I/O: `netlink` (add/remove the address), `garp` (gratuitous ARP), `driver` (raw VRRP
//! socket, timers, and the glue that turns the state machine's actions into I/O).

pub mod driver;
pub mod fsm;
pub mod garp;
pub mod netlink;
pub mod packet;
