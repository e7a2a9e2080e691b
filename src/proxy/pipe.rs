//! Moves bytes both ways between a client and its server.
//!
//! Unlike `tokio::io::copy_bidirectional`, which keeps two 8 KiB buffers for the whole life of a
//! connection, a session here owns no buffer while its peer keeps up: each direction reads into
//! its thread's buffer (`SCRATCH`, one per thread, never held across an `await`) and writes it
//! on at once. Only when the peer cannot take a whole chunk does the direction copy what is
//! left into a buffer of its own, and keep it for the rest of the burst (a bulk flow to a slow
//! client); it is freed when the source runs dry. An idle connection (the common case behind a
//! connection-pooling application) costs its task and two sockets, nothing more
//! (`benches/idle_memory.rs`), and a small transaction costs no allocation: a 16 KiB buffer
//! per wake-up and direction, allocated and freed, was glibc's `_int_malloc`, the first
//! user-space symbol of pgfront's profile under `pgbench -S -C`.
//!
//! System calls: a small transaction costs one `recv` and one `send` per direction and nothing
//! more. A read that does not fill the buffer means the kernel had no more, so the direction goes
//! back to waiting for readiness instead of reading again until `EAGAIN` (that extra read was
//! half of a `pgbench -S` transaction's reads: 4.0 `recvfrom` per transaction before, 2.0
//! after; `benches/datapath.rs`, figure `syscalls`). Byte counters are updated once per wake-up
//! (and every `YIELD_EVERY` chunks of a long flow), not per read.
//!
//! Half-close is forwarded: EOF from one side shuts down writing to the other, and the other
//! direction goes on until it too ends. The direction that ends last does not shut its peer
//! down: both sockets are closed when `pipe` returns, which sends the same FIN without a system
//! call (one `shutdown` per connection instead of two, as HAProxy does). So the caller must
//! close (drop) both sockets when `pipe` returns, which the session does.
//!
//! Fairness: a bulk flow (a large `COPY ... TO STDOUT`) whose source never runs dry and whose
//! sink never fills would never see `WouldBlock`, so the loop below would never return to the
//! scheduler and every other session of its worker would starve. Each chunk is therefore
//! charged to tokio's cooperative budget, and the task also yields after `YIELD_EVERY` chunks
//! (128 KiB): tokio's budget alone lets a task run 128 operations, 2 MiB here, per turn.
//! `benches/fairness.rs`, medians of 3 runs on a busy 2-core machine, p99 round trip of 100
//! small sessions beside one bulk flow: no yield 76 ms, budget alone 32 ms, budget and
//! `YIELD_EVERY` 8.9 ms on a current-thread runtime; 17 / 18 / 8.9 ms on a 2-worker one. The
//! bulk flow gets a fairer, smaller share of its worker in exchange (1270 / 880 / 330 MB/s and
//! 930 / 770 / 590 MB/s while the small sessions run).

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::metrics::ByteCount;

/// Largest read per system call, and the size of each thread's buffer: large enough for bulk
/// COPY.
pub(crate) const CHUNK: usize = 16 * 1024;
/// Chunks forwarded in a row before the task yields to the other sessions of its worker.
const YIELD_EVERY: u32 = 8;

/// Pipes until both directions have ended (or either failed). Counts bytes as they pass:
/// `up` from client to server, `down` from server to client.
pub async fn pipe(
    client: &TcpStream,
    server: &TcpStream,
    up: &impl ByteCount,
    down: &impl ByteCount,
) -> io::Result<()> {
    pipe_watching(client, server, up, down, None).await
}

/// A function shown the server's bytes before they are forwarded, until it returns false.
pub type Watch<'a> = &'a mut (dyn FnMut(&[u8]) -> bool + Send);

/// `pipe`, showing each chunk from the server to `watch` (the session's cancel-key scanner)
/// before forwarding it, until `watch` returns false; after that the data path is the same as
/// `pipe`'s.
pub async fn pipe_watching(
    client: &TcpStream,
    server: &TcpStream,
    up: &impl ByteCount,
    down: &impl ByteCount,
    watch: Option<Watch<'_>>,
) -> io::Result<()> {
    // Set by the first direction to end; the second one sees it and leaves the FIN to `close`.
    let ended = AtomicBool::new(false);
    tokio::try_join!(one_way(client, server, up, None, &ended), one_way(server, client, down, watch, &ended))?;
    Ok(())
}

async fn one_way<C: ByteCount>(
    src: &TcpStream,
    dst: &TcpStream,
    count: &C,
    mut watch: Option<Watch<'_>>,
    other_ended: &AtomicBool,
) -> io::Result<()> {
    // Counted once per wake-up, not per write: one atomic add on a shared counter instead of
    // many. What is written but not yet added is added when `moved` drops, so a session ended
    // from outside (a drain, a kill, a fence drop this future mid-flow) loses no byte.
    let mut moved = Pending { count, n: 0 };
    loop {
        src.readable().await?;
        // The burst's own buffer, from the first time `dst` cannot take a whole chunk at once.
        let mut own: Option<Vec<u8>> = None;
        let mut chunks = 0u32;
        let ended = loop {
            let read = match own.as_mut() {
                // A slow peer: read into the burst's buffer and wait until it is all written.
                Some(buf) => match read_shown(src, buf, &mut watch) {
                    Ok(Some(more)) => write_all(dst, buf, &mut moved.n).await.map(|()| Some(more)),
                    r => r,
                },
                // The common case: read into the thread's buffer, and the peer takes it all.
                None => match SCRATCH.with_borrow_mut(|buf| forward_now(src, dst, buf, &mut watch, &mut moved.n)) {
                    Ok(Some(Forwarded::All { more })) => Ok(Some(more)),
                    Ok(Some(Forwarded::Part { unsent, more })) => {
                        let r = write_all(dst, &unsent, &mut moved.n).await.map(|()| Some(more));
                        own = Some(unsent);
                        r
                    }
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                },
            };
            let more = match read {
                Ok(Some(more)) => more,
                Ok(None) => break true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) => return Err(e),
            };
            if !more {
                break false;
            }
            // Fairness (see the module doc): never run unboundedly without a yield.
            tokio::task::consume_budget().await;
            chunks += 1;
            if chunks % YIELD_EVERY == 0 {
                // A long flow shows in the counters as it goes, not only when it pauses.
                moved.flush();
                tokio::task::yield_now().await;
            }
        };
        moved.flush();
        if ended {
            // EOF: pass the half-close on, unless the other direction has ended too: then
            // `pipe` returns now and closing `dst` sends the FIN. The peer may already be
            // gone: not an error.
            if !other_ended.swap(true, Ordering::Relaxed) {
                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
            }
            return Ok(());
        }
        // `own`, if any, is freed here: nothing is held while the connection is idle.
    }
}

/// Bytes written to the peer and not yet added to the counter; added on `flush` and on drop.
struct Pending<'a, C: ByteCount> {
    count: &'a C,
    n: u64,
}

impl<C: ByteCount> Pending<'_, C> {
    fn flush(&mut self) {
        if self.n > 0 {
            self.count.add(std::mem::take(&mut self.n));
        }
    }
}

impl<C: ByteCount> Drop for Pending<'_, C> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What one read found.
pub(crate) enum Read {
    Eof,
    /// The bytes read were appended; `more`: the read filled the space it was given, so the
    /// kernel may hold more.
    Data {
        more: bool,
    },
}

/// One `recv` into `buf` (cleared first, up to its capacity), as `read_clearing` does it.
fn read_some(src: &TcpStream, buf: &mut Vec<u8>) -> io::Result<Read> {
    buf.clear();
    let cap = buf.capacity();
    read_clearing(src, cap, || src.try_read_buf(buf))
}

/// One `recv` of at most `want` bytes, done by `recv`. A read that does not fill the space
/// means the kernel had no more: the socket's readiness is then cleared as a `WouldBlock` would,
/// so the caller goes back to waiting for the next readiness event instead of spending a system
/// call on a read that would return `EAGAIN` (one per direction per round trip, half of a small
/// transaction's reads; during a session's setup, a peek or a read at each step). This is safe
/// with tokio's edge-triggered readiness: the clearing only applies to the readiness event seen
/// before the read (data that arrives after it sets readiness again), and end of stream or an
/// error is never cleared (`ScheduledIo` keeps the closed bits), so the next wait returns at
/// once and the next read sees it. `WouldBlock`: there was nothing to read after all.
fn read_clearing(src: &TcpStream, want: usize, recv: impl FnOnce() -> io::Result<usize>) -> io::Result<Read> {
    debug_assert!(want > 0, "a read into no space looks like the end of the stream");
    let mut short = false;
    let r = src.try_io(Interest::READABLE, || match recv() {
        Ok(n) if n > 0 && n < want => {
            short = true;
            // Makes `try_io` clear the readiness it saw; the bytes are in the caller's buffer.
            Err(io::ErrorKind::WouldBlock.into())
        }
        r => r,
    });
    match r {
        Ok(0) => Ok(Read::Eof),
        Ok(_) => Ok(Read::Data { more: true }),
        Err(_) if short => Ok(Read::Data { more: false }),
        Err(e) => Err(e),
    }
}

/// A socket read as `AsyncRead` during a session's setup (its first packets, the server's
/// answers): one `recv` per `poll_read`, and a short one clears the socket's readiness
/// (`read_clearing`), so the next step (a wait for the client to leave, the pipe's first read)
/// does not begin with a `recv` or a peek that returns `EAGAIN`. tokio's own `TcpStream` keeps
/// the readiness until a read returns `EAGAIN`.
pub(crate) struct Reader<'a>(pub(crate) &'a TcpStream);

impl tokio::io::AsyncRead for Reader<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let s = self.0;
        if buf.remaining() == 0 {
            return std::task::Poll::Ready(Ok(()));
        }
        loop {
            std::task::ready!(s.poll_read_ready(cx))?;
            let space = buf.initialize_unfilled();
            let (want, mut n) = (space.len(), 0);
            let r = read_clearing(s, want, || {
                let r = s.try_read(space);
                if let Ok(k) = r {
                    n = k;
                }
                r
            });
            match r {
                Ok(_) => {
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

thread_local! {
    /// The thread's read buffer (see the module doc). Borrowed only between two awaits.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(CHUNK));
}

/// One read into `buf` (`read_some`), shown to `watch`: `Some(more)` with bytes, `None` at the
/// end of the stream, `WouldBlock` when the socket had nothing after all.
fn read_shown(src: &TcpStream, buf: &mut Vec<u8>, watch: &mut Option<Watch<'_>>) -> io::Result<Option<bool>> {
    match read_some(src, buf)? {
        Read::Eof => Ok(None),
        Read::Data { more } => {
            if let Some(w) = watch.as_mut() {
                if !w(buf) {
                    *watch = None;
                }
            }
            Ok(Some(more))
        }
    }
}

/// What `forward_now` did with the bytes it read.
enum Forwarded {
    /// `dst` took them all.
    All { more: bool },
    /// `dst` was full: what it did not take, in a buffer of its own.
    Part { unsent: Vec<u8>, more: bool },
}

/// One read into `buf` (`read_shown`: `None` at the end of the stream) and as much of it written
/// to `dst` as it takes without waiting.
fn forward_now(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut Vec<u8>,
    watch: &mut Option<Watch<'_>>,
    written: &mut u64,
) -> io::Result<Option<Forwarded>> {
    let Some(more) = read_shown(src, buf, watch)? else { return Ok(None) };
    let mut data = &buf[..];
    if write_now(dst, &mut data, written)? {
        return Ok(Some(Forwarded::All { more }));
    }
    let mut unsent = Vec::with_capacity(CHUNK);
    unsent.extend_from_slice(data);
    Ok(Some(Forwarded::Part { unsent, more }))
}

/// Writes as much of `data` as `dst` takes without waiting, advancing `data` and adding to
/// `written` what the kernel took, as it takes it (a write that fails or is dropped halfway has
/// counted exactly what was sent). `Ok(false)`: `dst` is full, `data` holds the rest.
fn write_now(dst: &TcpStream, data: &mut &[u8], written: &mut u64) -> io::Result<bool> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => {
                *written += n as u64;
                *data = &data[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes all of `data` (`write_now`, waiting whenever `dst` is full).
async fn write_all(dst: &TcpStream, mut data: &[u8], written: &mut u64) -> io::Result<()> {
    while !write_now(dst, &mut data, written)? {
        dst.writable().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// client <-> [a  pipe  b] <-> server, over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Writes `msgs` messages of `size` bytes (message m filled with m), yielding between them
    /// or not, then half-closes; returns the socket.
    fn small_writes_then_eof(
        mut s: TcpStream,
        msgs: u32,
        size: usize,
        yielding: bool,
    ) -> tokio::task::JoinHandle<TcpStream> {
        tokio::spawn(async move {
            for m in 0..msgs {
                s.write_all(&vec![m as u8; size]).await.unwrap();
                if yielding {
                    tokio::task::yield_now().await;
                }
            }
            s.shutdown().await.unwrap();
            s
        })
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

    /// Defect 4: a bulk flow must not starve the other sessions of its worker. The bulk flow is
    /// a TCP connection piped into itself (each end's incoming bytes are written back to the
    /// other end, seeded with 64 KiB each way): its source never runs dry and its sink never
    /// fills, so a pipe that loops until `WouldBlock` never returns to the scheduler. On the
    /// same current-thread runtime an echo session must still complete its round trips; a
    /// watchdog thread fails the test (and ends the bulk flow) if it does not in time.
    #[test]
    fn a_bulk_flow_does_not_starve_other_sessions() {
        use std::io::Write;
        const ROUND_TRIPS: usize = 50;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (q, _) = l.accept().unwrap();
        for s in [&p, &q] {
            let s = SockRef::from(s);
            s.set_recv_buffer_size(1 << 20).unwrap();
            s.set_send_buffer_size(1 << 20).unwrap();
        }
        (&p).write_all(&[1u8; 64 * 1024]).unwrap();
        (&q).write_all(&[2u8; 64 * 1024]).unwrap();
        let watchdog_handle = p.try_clone().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                p.set_nonblocking(true).unwrap();
                q.set_nonblocking(true).unwrap();
                let (p, q) = (TcpStream::from_std(p).unwrap(), TcpStream::from_std(q).unwrap());
                let moved = Counter::default();
                let m = moved.clone();
                tokio::spawn(async move { pipe(&p, &q, &m, &Counter::default()).await });
                tokio::task::yield_now().await; // the bulk flow is running from here on

                let (mut client, a) = pair().await;
                let (b, mut server) = pair().await;
                tokio::spawn(async move { pipe(&a, &b, &Counter::default(), &Counter::default()).await });
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = server.read(&mut buf).await {
                        if server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let start = moved.get();
                for i in 0..ROUND_TRIPS {
                    let msg = (i as u32).to_be_bytes();
                    client.write_all(&msg).await.unwrap();
                    let mut back = [0u8; 4];
                    client.read_exact(&mut back).await.unwrap();
                    assert_eq!(back, msg);
                }
                let _ = done_tx.send(moved.get() - start);
            });
        });
        let result = done_rx.recv_timeout(std::time::Duration::from_secs(30));
        // Either way, end the bulk flow so the runtime thread finishes.
        let _ = watchdog_handle.shutdown(Shutdown::Both);
        let moved = result.expect("the echo session was starved by the bulk flow");
        runtime.join().unwrap();
        assert!(moved > 0, "the bulk flow ran while the echo session did its round trips");
    }

    /// A read that does not fill the buffer clears the socket's readiness (see `read_some`): an
    /// end of stream that arrived with the last bytes, before that read, must still be seen, and
    /// bytes that arrive after it must wake the pipe again. Small messages then a half-close, many
    /// times, each within a deadline; on a multi-thread runtime so that the writer races the pipe.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_reads_miss_neither_later_bytes_nor_the_end_of_stream() {
        for i in 0..200u32 {
            let (mut client, a) = pair().await;
            let (b, server) = pair().await;
            let task = tokio::spawn(async move { pipe(&a, &b, &Counter::default(), &Counter::default()).await });
            let msgs = (i % 7) + 1;
            let writer = small_writes_then_eof(server, msgs, 100, i % 2 == 0);
            let mut got = Vec::new();
            tokio::time::timeout(std::time::Duration::from_secs(10), client.read_to_end(&mut got))
                .await
                .unwrap_or_else(|_| panic!("round {i}: the end of stream was not forwarded"))
                .unwrap();
            assert_eq!(got.len(), 100 * msgs as usize, "round {i}");
            drop(client);
            drop(writer.await.unwrap());
            tokio::time::timeout(std::time::Duration::from_secs(10), task).await.expect("pipe ended").unwrap().ok();
        }
    }

    /// `Reader` (a session's setup reads) clears the readiness after a short read, as the pipe
    /// does: bytes that arrive after that read, and an end of stream that came with the last
    /// bytes, must still be read. Small writes then a half-close, many times, each within a
    /// deadline; on a multi-thread runtime so that the writer races the reader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_misses_neither_later_bytes_nor_the_end_of_stream() {
        for i in 0..200u32 {
            let (tx, rx) = pair().await;
            let msgs = (i % 5) + 1;
            let writer = small_writes_then_eof(tx, msgs, 10, i % 2 == 0);
            let mut got = Vec::new();
            let read_all = async {
                loop {
                    got.reserve(1024);
                    if Reader(&rx).read_buf(&mut got).await? == 0 {
                        return io::Result::Ok(());
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), read_all)
                .await
                .unwrap_or_else(|_| panic!("round {i}: later bytes or the end of stream were missed"))
                .unwrap();
            let expect: Vec<u8> = (0..msgs).flat_map(|m| [m as u8; 10]).collect();
            assert_eq!(got, expect, "round {i}");
            drop(writer.await.unwrap());
        }
    }

    /// A session ended from outside (a drain or a kill drops the pipe mid-flow) has counted
    /// exactly the bytes its server received: none written but uncounted, none counted unsent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pipe_dropped_mid_flow_has_counted_exactly_what_was_sent() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let (u2, d2) = (up.clone(), down.clone());
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            // Bounded: 64 MiB at most; the pipe is dropped long before.
            for _ in 0..1024 {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let task = tokio::spawn(async move { pipe(&a, &b, &u2, &d2).await });
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        while got < 3 * 1024 * 1024 + 12345 {
            let want = (3 * 1024 * 1024 + 12345 - got).min(buf.len());
            got += server.read(&mut buf[..want]).await.unwrap();
        }
        // Dropped while blocked on a full socket, halfway through a burst of chunks.
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        // The pipe's sockets are closed: what it wrote is all in `server`'s queue, then EOF.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), server.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => got += n,
                Ok(Err(_)) => break,
                Err(_) => panic!("no end of stream after the pipe was dropped"),
            }
        }
        writer.abort();
        assert_eq!(up.get(), got as u64, "bytes counted vs bytes the server received");
        assert_eq!(down.get(), 0);
    }

    /// Two sessions on one thread share its read buffer; each peer takes bytes more slowly than
    /// they come, so every chunk is only partly written at once and the rest goes through the
    /// direction's own buffer. Each server must get exactly its client's bytes, in order, and
    /// the counters exactly what was sent.
    #[tokio::test]
    async fn sessions_with_slow_peers_on_one_thread_get_their_own_bytes_in_order() {
        const LEN: usize = 512 * 1024;
        let mut servers = Vec::new();
        for seed in [3u32, 7] {
            let (mut client, a) = pair().await;
            let (b, mut server) = pair().await;
            SockRef::from(&b).set_send_buffer_size(8192).unwrap();
            SockRef::from(&server).set_recv_buffer_size(8192).unwrap();
            let up = Counter::default();
            let u2 = up.clone();
            let pattern = move |i: usize| (i as u32).wrapping_mul(seed).wrapping_add(seed) as u8;
            tokio::spawn(async move { pipe(&a, &b, &u2, &Counter::default()).await });
            tokio::spawn(async move {
                let data: Vec<u8> = (0..LEN).map(pattern).collect();
                client.write_all(&data).await.unwrap();
                client.shutdown().await.unwrap();
                // Kept open until the server has read everything.
                let _ = client.read(&mut [0u8; 1]).await;
            });
            servers.push(tokio::spawn(async move {
                let mut got = Vec::with_capacity(LEN);
                let mut buf = [0u8; 4096];
                loop {
                    let n = server.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.len() % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                assert!(got.len() == LEN && got.iter().enumerate().all(|(i, b)| *b == pattern(i)), "seed {seed}");
                up
            }));
        }
        for s in servers {
            let up = tokio::time::timeout(Duration::from_secs(60), s).await.expect("bytes delivered").unwrap();
            assert_eq!(up.get(), LEN as u64);
        }
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
