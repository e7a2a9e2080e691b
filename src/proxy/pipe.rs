//! Moves bytes both ways between a client and its server.
//!
//! Unlike `tokio::io::copy_bidirectional`, which keeps two 8 KiB buffers for the whole life of a
//! connection, each direction here takes a buffer only while bytes flow: it waits for
//! readiness with no buffer, reads and forwards until the socket would block, then frees the
//! buffer. An idle connection (the common case behind a connection-pooling application) costs
//! its task and two sockets, nothing more. `benches/idle_memory.rs` measures the difference;
//! throughput is checked by `benches/switchover.rs` (pgbench through pgfront).
//!
//! Half-close is forwarded: EOF from one side shuts down writing to the other, and the other
//! direction goes on until it too ends.

use std::io;
use std::net::Shutdown;

use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::net::TcpStream;

/// Largest read per system call. Large enough for bulk COPY, small enough for the allocator's
/// fast paths.
const CHUNK: usize = 16 * 1024;

/// Pipes until both directions have ended (or either failed). Counts bytes as they pass:
/// `up` from client to server, `down` from server to client.
pub async fn pipe(client: &TcpStream, server: &TcpStream, up: &Counter, down: &Counter) -> io::Result<()> {
    tokio::try_join!(one_way(client, server, up), one_way(server, client, down))?;
    Ok(())
}

async fn one_way(src: &TcpStream, dst: &TcpStream, count: &Counter) -> io::Result<()> {
    loop {
        src.readable().await?;
        let mut buf = Vec::with_capacity(CHUNK);
        loop {
            buf.clear();
            match src.try_read_buf(&mut buf) {
                Ok(0) => {
                    // EOF: pass the half-close on. The peer may already be gone: not an error.
                    let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => {
                    write_all(dst, &buf[..n]).await?;
                    count.inc_by(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // `buf` is freed here: nothing is held while the connection is idle.
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// client <-> [a  pipe  b] <-> server, over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_and_forwards_half_close() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let (u2, d2) = (up.clone(), down.clone());
        let task = tokio::spawn(async move { pipe(&a, &b, &u2, &d2).await });

        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&big).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: client is done sending
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // ends because the half-close was forwarded
        assert_eq!(got, expect);
        server.write_all(b"bye").await.unwrap();
        drop(server);
        assert_eq!(writer.await.unwrap(), b"bye");
        task.await.unwrap().unwrap();
        assert_eq!((up.get(), down.get()), (1_000_000, 3));
    }

    #[tokio::test]
    async fn reset_ends_the_pipe_with_an_error_or_eof() {
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let task = tokio::spawn(async move { pipe(&a, &b, &Counter::default(), &Counter::default()).await });
        SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(server); // RST
        drop(client);
        // Either way the task ends: no leak.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await.expect("pipe ended");
    }
}
