//! Moves bytes both ways between a client and its server.
//!
//! Unlike `tokio::io::copy_bidirectional`, which keeps two 8 KiB buffers for the whole life of a
//! connection, each direction here takes a buffer only while bytes flow: it waits for
//! readiness with no buffer, reads and forwards until the socket would block, then frees the
//! buffer. An idle connection (the common case behind a connection-pooling application) costs
//! its task and two sockets, nothing more. `benches/idle_memory.rs` measures the difference;
//! throughput is checked by `benches/switchover.rs` (pgbench through pgfront).
//!
//! System calls: a small transaction costs one `recv` and one `send` per direction and nothing
//! more. A read that does not fill the buffer means the kernel had no more, so the direction goes
//! back to waiting for readiness instead of reading again until `EAGAIN` (that extra read was
//! half of a `pgbench -S` transaction's reads: 4.0 `recvfrom` per transaction before, 2.0
//! after; `benches/datapath.rs`, figure `syscalls`). Byte counters are updated once per wake-up
//! (and every `YIELD_EVERY` chunks of a long flow), not per read.
//!
//! Bulk flows (a `COPY ... TO STDOUT`, a `pg_dump`) go through a kernel pipe with `splice(2)`
//! instead: socket to pipe, pipe to socket, the bytes never copied into pgfront. A direction
//! switches when two reads in a row fill its buffer (the kernel held more than 32 KiB) once the
//! cancel-key scanner is done, keeps splicing while its bursts stay bulk, and goes back to
//! copying after a burst under 32 KiB. A direction holds a pipe during a burst only (an idle
//! pooled connection holds none); each data-path thread keeps a few empty ones for its next
//! bulk burst. At most `MAX_PIPES` pipes are open in the process (their descriptors are
//! reserved, `listener::RESERVED_FDS`); a flow that finds none, or only a pipe shrunk by the
//! user's pipe memory limit, is copied. What a burst spliced is counted as it is written, like
//! a copied one. HAProxy's `option splice-auto` does the same.
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

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::metrics::ByteCount;

pub(crate) use splice::MAX_PIPES;

/// Largest read per system call. Large enough for bulk COPY, small enough for the allocator's
/// fast paths.
const CHUNK: usize = 16 * 1024;
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
    // The last burst was bulk: splice this one from its start (`splice`).
    let mut bulk = false;
    loop {
        src.readable().await?;
        let mut burst = if bulk { Burst::Bulk } else { copy_burst(src, dst, &mut watch, &mut moved, true).await? };
        if let Burst::Bulk = burst {
            // A pipe for the burst only: between bursts (an idle pooled connection) the
            // direction holds none.
            burst = match splice::Pipe::take() {
                Some(k) => {
                    let (b, was_bulk) = splice_burst(src, dst, &k, &mut moved).await?;
                    k.give_back();
                    // Small messages again: copying is cheaper.
                    bulk = was_bulk;
                    b
                }
                // No pipe to be had: copy on.
                None => {
                    bulk = false;
                    copy_burst(src, dst, &mut watch, &mut moved, false).await?
                }
            };
        }
        moved.flush();
        if let Burst::Eof = burst {
            // EOF: pass the half-close on, unless the other direction has ended too: then
            // `pipe` returns now and closing `dst` sends the FIN. The peer may already be
            // gone: not an error.
            if !other_ended.swap(true, Ordering::Relaxed) {
                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
            }
            return Ok(());
        }
    }
}

/// How a burst (from a readiness event to the source running dry) ended.
enum Burst {
    Eof,
    /// The source has no more for now.
    Dry,
    /// `copy_burst` filled its buffer with the cancel-key scanner done: a bulk flow, the rest
    /// of it is for `splice_burst`.
    Bulk,
}

/// Reads and forwards through a buffer taken for the burst and freed after it. With
/// `may_splice`, returns `Bulk` after two reads in a row filled the buffer (the kernel held
/// more than 32 KiB: a message of a few tens of KiB, a large `Bind`, is not worth a pipe).
async fn copy_burst<C: ByteCount>(
    src: &TcpStream,
    dst: &TcpStream,
    watch: &mut Option<Watch<'_>>,
    moved: &mut Pending<'_, C>,
    may_splice: bool,
) -> io::Result<Burst> {
    let mut buf = Vec::with_capacity(CHUNK);
    let mut chunks = 0u32;
    let mut full = 0u32;
    loop {
        match read_some(src, &mut buf) {
            Ok(Read::Eof) => return Ok(Burst::Eof),
            Ok(Read::Data { more }) => {
                if let Some(w) = watch.as_mut() {
                    if !w(&buf) {
                        *watch = None;
                    }
                }
                write_all(dst, &buf, &mut moved.n).await?;
                if !more {
                    return Ok(Burst::Dry);
                }
                full += 1;
                if may_splice && full >= 2 && watch.is_none() {
                    return Ok(Burst::Bulk);
                }
                fair_turn(&mut chunks, 1, moved).await;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Dry),
            Err(e) => return Err(e),
        }
    }
}

/// Moves a burst with splice(2), socket to pipe to socket: the bytes never enter pgfront's
/// memory. Reads until the source would block: a splice that moved less than the pipe holds
/// does not mean the socket ran dry (the pipe has 16 slots, one per packet fragment). Returns
/// how the burst ended and whether it was still bulk (it moved at least `2 * CHUNK`).
async fn splice_burst<C: ByteCount>(
    src: &TcpStream,
    dst: &TcpStream,
    k: &splice::Pipe,
    moved: &mut Pending<'_, C>,
) -> io::Result<(Burst, bool)> {
    let (from, to) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut total = 0usize;
    let mut chunks = 0u32;
    loop {
        let bulk = total >= 2 * CHUNK;
        let got = match src.try_io(Interest::READABLE, || k.fill(from)) {
            Ok(0) => return Ok((Burst::Eof, bulk)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((Burst::Dry, bulk)),
            Err(e) => return Err(e),
        };
        total += got;
        let mut left = got;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || k.drain(to, left)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    moved.n += n as u64;
                    #[cfg(test)]
                    splice::SPLICED.with(|c| c.set(c.get() + n as u64));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
        // Charged per `CHUNK` moved, as the copy path is.
        fair_turn(&mut chunks, (got / CHUNK).max(1) as u32, moved).await;
    }
}

/// Fairness (see the module doc): a long flow never runs unboundedly without a yield. `n`: the
/// chunks just moved.
async fn fair_turn<C: ByteCount>(chunks: &mut u32, n: u32, moved: &mut Pending<'_, C>) {
    tokio::task::consume_budget().await;
    let before = *chunks;
    *chunks += n;
    if *chunks / YIELD_EVERY != before / YIELD_EVERY {
        // A long flow shows in the counters as it goes, not only when it pauses.
        moved.flush();
        tokio::task::yield_now().await;
    }
}

/// The kernel pipes that `splice_burst` moves bulk flows through.
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Pipes open at once in the process (two descriptors each, kept out of the sessions'
    /// descriptor budget by `listener::RESERVED_FDS`). A flow that finds none left is copied.
    pub(crate) const MAX_PIPES: usize = 32;
    static OPEN: AtomicUsize = AtomicUsize::new(0);
    /// Empty pipes kept by each thread between bursts, for its next bulk burst.
    const KEPT_PER_THREAD: usize = 4;
    /// A pipe smaller than this (the user's pipe memory is over `pipe-user-pages-soft`: the
    /// kernel gives one page) is not worth splicing through.
    const MIN_SIZE: usize = 4 * super::CHUNK;

    thread_local! {
        static KEPT: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// A pipe, empty between two bursts.
    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// Its capacity in bytes: what one `fill` asks for.
        size: usize,
    }

    impl Pipe {
        /// An empty pipe: one this thread kept, else a new one; `None` when `MAX_PIPES` are
        /// open or the kernel refuses one (or gives a small one).
        pub(super) fn take() -> Option<Pipe> {
            KEPT.with(|k| k.borrow_mut().pop()).or_else(Pipe::open)
        }

        /// Gives an empty pipe back: kept for the thread's next bulk burst, or closed.
        pub(super) fn give_back(self) {
            KEPT.with(|k| {
                let mut k = k.borrow_mut();
                if k.len() < KEPT_PER_THREAD {
                    k.push(self);
                }
            });
        }

        fn open() -> Option<Pipe> {
            if OPEN.fetch_add(1, Ordering::Relaxed) >= MAX_PIPES {
                OPEN.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            let mut fds: [libc::c_int; 2] = [-1, -1];
            // SAFETY: pipe2 writes two new descriptors into `fds` or fails and writes nothing.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                OPEN.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            // SAFETY: both descriptors were just created and belong to nobody else.
            let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: F_GETPIPE_SZ reads the pipe's capacity; the descriptor is open.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            let size = usize::try_from(size).unwrap_or(0);
            // Dropped (and counted out) if too small.
            let pipe = Pipe { read, write, size };
            (size >= MIN_SIZE).then_some(pipe)
        }

        /// Moves what socket `from` holds into the pipe, up to its capacity (it is empty).
        pub(super) fn fill(&self, from: RawFd) -> io::Result<usize> {
            splice(from, self.write.as_raw_fd(), self.size)
        }

        /// Moves up to `len` bytes from the pipe to socket `to`.
        pub(super) fn drain(&self, to: RawFd, len: usize) -> io::Result<usize> {
            splice(self.read.as_raw_fd(), to, len)
        }
    }

    impl Drop for Pipe {
        fn drop(&mut self) {
            OPEN.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: no offsets (each end is a socket or a pipe); both descriptors are open for
        // the call; nothing is read from or written to this process's memory.
        let n = unsafe {
            libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK)
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    #[cfg(test)]
    thread_local! {
        /// Bytes spliced by this thread (tests).
        pub(super) static SPLICED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
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
enum Read {
    Eof,
    /// `buf` holds the bytes read; `more`: the read filled the buffer, so the kernel may hold more.
    Data {
        more: bool,
    },
}

/// One `recv` into `buf` (cleared first). A read that does not fill the buffer means the kernel
/// had no more: the socket's readiness is then cleared as a `WouldBlock` would, so the caller
/// goes back to waiting for the next readiness event instead of spending a system call on a read
/// that would return `EAGAIN` (one per direction per round trip, half of a small transaction's
/// reads). This is safe with tokio's edge-triggered readiness: the clearing only applies to the
/// readiness event seen before the read (data that arrives after it sets readiness again), and
/// end of stream or an error is never cleared (`ScheduledIo` keeps the closed bits), so the next
/// wait returns at once and the next read sees it.
fn read_some(src: &TcpStream, buf: &mut Vec<u8>) -> io::Result<Read> {
    buf.clear();
    let cap = buf.capacity();
    let mut short = false;
    let r = src.try_io(Interest::READABLE, || match src.try_read_buf(buf) {
        Ok(n) if n > 0 && n < cap => {
            short = true;
            // Makes `try_io` clear the readiness it saw; the bytes are in `buf`.
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

/// Writes all of `data`, adding to `written` what the kernel took, as it takes it (a write
/// that fails or is dropped halfway has counted exactly what was sent).
async fn write_all(dst: &TcpStream, mut data: &[u8], written: &mut u64) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => {
                *written += n as u64;
                data = &data[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
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

    /// The splice tests share the process's pipe budget: one at a time.
    static PIPE_BUDGET: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A bulk flow is spliced (and every byte of it arrives, counted), small messages after it
    /// are copied.
    #[tokio::test]
    async fn a_bulk_flow_is_spliced_and_small_messages_after_it_are_not() {
        let _budget = PIPE_BUDGET.lock().unwrap_or_else(|e| e.into_inner());
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let (u2, d2) = (up.clone(), down.clone());
        let before = splice::SPLICED.with(|c| c.get());
        let task = tokio::spawn(async move { pipe(&a, &b, &u2, &d2).await });
        const BULK: usize = 32 << 20;
        let big: Vec<u8> = (0..BULK as u32).map(|i| (i % 253) as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
            // Then a few small round trips.
            for i in 0..10u8 {
                let mut q = [0u8; 3];
                server.read_exact(&mut q).await.unwrap();
                assert_eq!(q, [i; 3]);
                server.write_all(&[i; 5]).await.unwrap();
            }
            server
        });
        let mut got = vec![0u8; BULK];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == expect, "the bulk flow arrived changed");
        let spliced = splice::SPLICED.with(|c| c.get()) - before;
        assert!(spliced > (BULK / 2) as u64, "only {spliced} of {BULK} bytes were spliced");
        for i in 0..10u8 {
            client.write_all(&[i; 3]).await.unwrap();
            let mut r = [0u8; 5];
            client.read_exact(&mut r).await.unwrap();
            assert_eq!(r, [i; 5]);
        }
        let after_small = splice::SPLICED.with(|c| c.get()) - before;
        // At most the first small message, right after the bulk flow, goes through a pipe.
        assert!(after_small - spliced <= 5, "small messages were spliced: {}", after_small - spliced);
        drop(writer.await.unwrap());
        drop(client);
        task.await.unwrap().unwrap();
        assert_eq!((up.get(), down.get()), (30, BULK as u64 + 50));
    }

    /// With every pipe of the budget taken, a bulk flow is copied, whole.
    #[tokio::test]
    async fn a_bulk_flow_without_a_pipe_left_is_copied() {
        let _budget = PIPE_BUDGET.lock().unwrap_or_else(|e| e.into_inner());
        let held: Vec<splice::Pipe> = std::iter::from_fn(splice::Pipe::take).take(MAX_PIPES + 1).collect();
        assert!(held.len() <= MAX_PIPES, "more pipes than the budget");
        let before = splice::SPLICED.with(|c| c.get());
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let (up, down) = (Counter::default(), Counter::default());
        let (u2, d2) = (up.clone(), down.clone());
        let task = tokio::spawn(async move { pipe(&a, &b, &u2, &d2).await });
        let big: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 241) as u8).collect();
        let expect = big.clone();
        tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == expect, "the copied flow arrived changed");
        drop(client);
        task.await.unwrap().unwrap();
        assert_eq!(down.get(), 4 << 20);
        assert_eq!(splice::SPLICED.with(|c| c.get()), before, "spliced without a pipe");
        drop(held);
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
            let (b, mut server) = pair().await;
            let task = tokio::spawn(async move { pipe(&a, &b, &Counter::default(), &Counter::default()).await });
            let msgs = (i % 7) + 1;
            let writer = tokio::spawn(async move {
                for m in 0..msgs {
                    server.write_all(&[m as u8; 100]).await.unwrap();
                    if i % 2 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                server.shutdown().await.unwrap();
                server
            });
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
