//! Adding and removing the virtual address through rtnetlink (no `ip` subprocess).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("interface {0:?} not found")]
    NoInterface(String),
    #[error("{op} {addr}/{prefix} on {ifname}: {source}")]
    Request { op: &'static str, addr: IpAddr, prefix: u8, ifname: String, source: rtnetlink::Error },
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

/// The index of a network interface, by name.
pub fn ifindex(name: &str) -> Result<u32, NetlinkError> {
    let c = std::ffi::CString::new(name).map_err(|_| NetlinkError::NoInterface(name.to_owned()))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string and has no other effect.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(NetlinkError::NoInterface(name.to_owned())),
        i => Ok(i),
    }
}

impl Netlink {
    /// Opens a netlink connection; its driver runs as a task of the current runtime.
    pub fn connect() -> Result<Netlink, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    async fn find(
        &self,
        index: u32,
        addr: IpAddr,
        prefix: u8,
    ) -> Result<Option<netlink_packet_route::address::AddressMessage>, rtnetlink::Error> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr)
            .set_prefix_length_filter(prefix)
            .execute()
            .try_next()
            .await
    }

    pub async fn has(&self, ifname: &str, addr: IpAddr, prefix: u8) -> Result<bool, NetlinkError> {
        let index = ifindex(ifname)?;
        self.find(index, addr, prefix).await.map(|m| m.is_some()).map_err(|source| NetlinkError::Request {
            op: "get",
            addr,
            prefix,
            ifname: ifname.to_owned(),
            source,
        })
    }

    /// Adds the address (replacing it if present, so a retry is harmless).
    pub async fn add(&self, ifname: &str, addr: IpAddr, prefix: u8) -> Result<(), NetlinkError> {
        let index = ifindex(ifname)?;
        let mut req = self.handle.address().add(index, addr, prefix).replace();
        if addr.is_ipv6() {
            // Usable at once: no duplicate address detection (~1.5 s of "tentative").
            req.message_mut().header.flags |= netlink_packet_route::address::AddressHeaderFlags::Nodad;
        }
        req.execute().await.map_err(|source| NetlinkError::Request {
            op: "add",
            addr,
            prefix,
            ifname: ifname.to_owned(),
            source,
        })
    }

    /// Removes the address if it is there. Returns whether it was.
    pub async fn del(&self, ifname: &str, addr: IpAddr, prefix: u8) -> Result<bool, NetlinkError> {
        let index = ifindex(ifname)?;
        let err = |source| NetlinkError::Request { op: "del", addr, prefix, ifname: ifname.to_owned(), source };
        match self.find(index, addr, prefix).await.map_err(err)? {
            Some(m) => self.handle.address().del(m).execute().await.map(|_| true).map_err(err),
            None => Ok(false),
        }
    }
}
