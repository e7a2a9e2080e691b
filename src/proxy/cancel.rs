//! Routing of PostgreSQL cancel requests to the server that runs the session they name.
//!
//! A client cancels a query by opening a *new* connection and sending a `CancelRequest` with
//! the process id and secret key the server gave its session in `BackendKeyData`. Balanced like
//! any new connection, that request would reach whatever server leastconn picks — on a replica
//! listener usually not the one running the query, which then silently ignores it.
//!
//! So each session watches its server's first messages (`pgwire::KeyScanner`, fed from the
//! pipe until it is done: nothing per byte afterwards) and records key → server address in the
//! process-wide `CancelMap` for as long as the session lives (`Entry` removes it on drop). A
//! new connection whose first packet is a `CancelRequest` with a known key is forwarded
//! straight to that address — no pool slot, no queue — and closed; an unknown key takes the
//! normal route, as before.
//!
//! Invariants: a key is in the map only while its session is open; the secret never appears in
//! logs (`CancelKey`'s `Debug` shows the pid only). Keys of sessions that negotiated TLS or GSS
//! encryption cannot be seen: their cancels follow normal routing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::pgwire::{CancelKey, KeyScanner, Kind, Scanned};

/// Which server issued each open session's cancel key.
#[derive(Default)]
pub struct CancelMap {
    keys: Mutex<HashMap<CancelKey, (SocketAddr, u64)>>,
    next: AtomicU64,
    /// Number of keys known (`pgfront_cancel_keys`).
    size: Gauge,
}

impl CancelMap {
    pub fn new(size: Gauge) -> CancelMap {
        CancelMap { keys: Mutex::default(), next: AtomicU64::new(0), size }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, (SocketAddr, u64)>> {
        // The map stays consistent whatever panicked while holding it.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `key` belongs to a session on `server`, until the returned entry is dropped.
    pub fn insert(&self, key: CancelKey, server: SocketAddr) -> Entry<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut g = self.lock();
        g.insert(key.clone(), (server, id));
        self.size.set(g.len() as i64);
        Entry { map: self, key, id }
    }

    /// The server that issued `key` (process id and secret, as a `CancelRequest` carries them).
    pub fn lookup(&self, key: &[u8]) -> Option<SocketAddr> {
        self.lock().get(key).map(|(addr, _)| *addr)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A session's key in the map; removed on drop (unless a newer session took the same key).
pub struct Entry<'a> {
    map: &'a CancelMap,
    key: CancelKey,
    id: u64,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut g = self.map.lock();
        if g.get(&self.key).is_some_and(|(_, id)| *id == self.id) {
            g.remove(&self.key);
        }
        self.map.size.set(g.len() as i64);
    }
}

/// One session's side of it: scans the server's first bytes, then holds the entry. It lives
/// in the session's future for the whole session, so it is kept small (the server's address
/// is borrowed from the lease).
pub(crate) struct KeyWatch<'a> {
    map: &'a CancelMap,
    server: &'a SocketAddr,
    state: WatchState<'a>,
}

enum WatchState<'a> {
    Scanning(KeyScanner),
    Known(#[allow(dead_code)] Entry<'a>),
    Off,
}

impl<'a> KeyWatch<'a> {
    pub(crate) fn new(map: &'a CancelMap, server: &'a SocketAddr, first: Kind) -> KeyWatch<'a> {
        KeyWatch { map, server, state: WatchState::Scanning(KeyScanner::new(first)) }
    }

    /// Feeds server→client bytes; false once nothing more is needed.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> bool {
        let WatchState::Scanning(s) = &mut self.state else { return false };
        match s.feed(chunk) {
            Scanned::More => true,
            Scanned::Key(key) => {
                self.state = WatchState::Known(self.map.insert(key, *self.server));
                false
            }
            Scanned::NoKey(why) => {
                tracing::trace!(server = %self.server, ?why, "no cancel key seen");
                self.state = WatchState::Off;
                false
            }
        }
    }
}

/// Forwards a cancel request to the server that runs its session, within `limit`. The server
/// answers nothing and closes; pgfront closes the client the same way.
pub async fn forward(server: SocketAddr, request: &[u8], limit: Duration) -> std::io::Result<()> {
    let r = tokio::time::timeout(limit, async {
        let mut s = TcpStream::connect(server).await?;
        s.write_all(request).await?;
        s.shutdown().await
    })
    .await;
    r.unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel forward timed out")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_with_key(pid: u32) -> Vec<u8> {
        let mut out = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
        out.extend_from_slice(&[b'K', 0, 0, 0, 12]);
        out.extend_from_slice(&pid.to_be_bytes());
        out.extend_from_slice(&[1, 2, 3, 4]);
        out
    }

    #[test]
    fn a_key_lives_as_long_as_its_session() {
        let map = CancelMap::new(Gauge::default());
        let a: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let key = [0, 0, 0, 9, 1, 2, 3, 4];
        {
            let mut w = KeyWatch::new(&map, &a, Kind::Startup { version: 196608 });
            let hello = hello_with_key(9);
            assert!(w.feed(&hello[..7]), "needs more");
            assert!(!w.feed(&hello[7..]), "done once the key is seen");
            assert!(!w.feed(b"Z...."), "nothing more is scanned");
            assert_eq!(map.lookup(&key), Some(a));
            assert_eq!(map.size.get(), 1);
        }
        assert_eq!(map.lookup(&key), None, "removed when the session ends");
        assert_eq!(map.size.get(), 0);
    }

    #[test]
    fn an_old_entry_does_not_remove_a_newer_session_with_the_same_key() {
        let map = CancelMap::new(Gauge::default());
        let (a, b): (SocketAddr, SocketAddr) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let k = CancelKey::from_bytes(&[1; 8]);
        let old = map.insert(k.clone(), a);
        let new = map.insert(k, b);
        drop(old);
        assert_eq!(map.lookup(&[1; 8]), Some(b));
        drop(new);
        assert!(map.is_empty());
    }

    #[tokio::test]
    async fn forward_sends_the_request_and_closes() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let req = [0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 9, 1, 2, 3, 4];
        forward(addr, &req, Duration::from_secs(5)).await.unwrap();
        assert_eq!(server.await.unwrap(), req);
    }
}
