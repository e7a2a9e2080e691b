//! Resolution of member host names (`conn_url` naming a host rather than an IP).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

/// What a resolution yields: the first address of the host, if any.
pub(crate) type ResolveFuture = Pin<Box<dyn Future<Output = io::Result<Option<SocketAddr>>> + Send>>;

/// Resolves a host name. A trait so that tests can put a resolver that hangs (a DNS outage)
/// where the system's is.
pub(crate) trait Resolve: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture;
}

/// The system resolver (getaddrinfo on tokio's blocking pool).
pub(crate) struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> ResolveFuture {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.next()) })
    }
}
