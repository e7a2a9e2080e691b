//! An experiment (issue 10), built only with `--features uring-experiment`: a bare TCP relay on
//! io_uring, to learn whether moving pgfront's data path from epoll to io_uring would pay
//! before doing it. It is the upper bound of what io_uring can buy: no session setup, no
//! metrics, no draining — accept, connect, then copy both ways, as pgfront's pipe does once a
//! session is placed. `benches/datapath.rs` runs it as a route beside HAProxy and pgfront
//! (`PGFRONT_BENCH_URING=<binary>`).
//!
//! One thread per core, each with its own ring and `SO_REUSEPORT` listener, as pgfront's data
//! path threads. Each connection has two 16 KiB buffers (one per direction) and at most one
//! operation in flight per direction: a receive, then the send of what it read, then the
//! next receive; an end of stream is passed on (half-close). One `io_uring_enter` submits every operation queued since the last one and
//! waits for the next completion. The ring is set up for one issuer with deferred task work,
//! so completions run only when the thread asks for them.
//!
//! The accept is an io_uring operation too; the connect to the target is a blocking
//! `connect(2)` on the ring's thread (loopback: tens of microseconds), so the figures per
//! connection say little: per transaction is the question. Needs Linux 6.1 or later
//! (`IORING_SETUP_DEFER_TASKRUN`) with io_uring allowed (`kernel.io_uring_disabled` 0, no
//! seccomp filter refusing it). An error a thread cannot handle ends the process.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

const BUF: usize = 16 * 1024;
const ACCEPT: u64 = u64::MAX;

/// Relays every `(listen, target)` pair on `threads` threads until the process is killed; a
/// thread that fails ends the process (its connections' buffers may still be in the kernel's
/// hands, so they are not freed).
pub fn run(routes: &[(SocketAddr, SocketAddr)], threads: usize) -> std::io::Result<()> {
    available()?;
    let mut per_thread = Vec::new();
    for _ in 0..threads.max(1) {
        let listeners = routes
            .iter()
            .map(|&(listen, target)| Ok((reuseport_listener(listen)?, target)))
            .collect::<std::io::Result<Vec<_>>>()?;
        per_thread.push(listeners);
    }
    // Each ring is created on its thread: a single-issuer ring belongs to the thread that made it.
    let handles: Vec<_> = per_thread
        .into_iter()
        .map(|listeners| {
            std::thread::spawn(move || {
                let e = match Ring::new(listeners) {
                    Ok(mut r) => {
                        let e = r.run().unwrap_err();
                        std::mem::forget(r);
                        e
                    }
                    Err(e) => e,
                };
                eprintln!("uring relay: {e}");
                std::process::exit(1);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Whether this kernel lets this process set up a ring as `Ring` does.
pub fn available() -> std::io::Result<()> {
    IoUring::<squeue::Entry>::builder().setup_single_issuer().setup_defer_taskrun().build(8).map(drop)
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// One direction of a connection: read from `from`, write to `to`.
struct Half {
    buf: Box<[u8]>,
    /// Bytes read and not yet sent: `buf[sent..len]`.
    len: usize,
    sent: usize,
    busy: bool,
    /// Its reader sent FIN, passed on as a shutdown of the writer's sending side.
    done: bool,
}

struct Conn {
    fds: [RawFd; 2],
    halves: [Half; 2],
    closing: bool,
}

struct Ring {
    ring: IoUring,
    listeners: Vec<(TcpListener, SocketAddr)>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
}

/// `user_data`: connection index, direction (0: client to server) and whether it is the send.
fn tag(conn: usize, dir: usize, send: bool) -> u64 {
    ((conn as u64) << 2) | ((dir as u64) << 1) | u64::from(send)
}

impl Ring {
    fn new(listeners: Vec<(TcpListener, SocketAddr)>) -> std::io::Result<Ring> {
        let ring = IoUring::builder().setup_single_issuer().setup_defer_taskrun().build(1024)?;
        Ok(Ring { ring, listeners, conns: Vec::new(), free: Vec::new() })
    }

    fn push(&mut self, e: squeue::Entry) -> std::io::Result<()> {
        // SAFETY: every buffer an entry points to lives in `self.conns` (boxed, not moved)
        // until the entry's completion has been reaped: a connection is freed only when none
        // of its operations is in flight.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn accept(&mut self, i: usize) -> std::io::Result<()> {
        let fd = self.listeners[i].0.as_raw_fd();
        let e = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut()).build();
        self.push(e.user_data(ACCEPT - i as u64))
    }

    /// Runs until an error it cannot handle (returned).
    fn run(&mut self) -> std::io::Result<()> {
        for i in 0..self.listeners.len() {
            self.accept(i)?;
        }
        let mut done = Vec::with_capacity(256);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            done.clear();
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(data, res) in &done {
                if data > ACCEPT - self.listeners.len() as u64 {
                    let i = (ACCEPT - data) as usize;
                    if res >= 0 {
                        self.open(res, self.listeners[i].1)?;
                    } else if -res != libc::ECONNABORTED && -res != libc::EINTR {
                        // Out of descriptors or memory: the client stays in the backlog and
                        // an accept again at once would fail again; the ring waits a little.
                        eprintln!("uring relay: accept: {}", std::io::Error::from_raw_os_error(-res));
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    self.accept(i)?;
                } else {
                    self.complete((data >> 2) as usize, ((data >> 1) & 1) as usize, data & 1 == 1, res)?;
                }
            }
        }
    }

    /// A client was accepted as `fd`: connect to `target` and start both directions.
    fn open(&mut self, fd: RawFd, target: SocketAddr) -> std::io::Result<()> {
        let server = match TcpStream::connect(target) {
            Ok(s) => s,
            Err(_) => {
                // SAFETY: `fd` was just accepted and is owned by nobody else.
                unsafe { libc::close(fd) };
                return Ok(());
            }
        };
        let _ = server.set_nodelay(true);
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a pointer to an int that outlives the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let half = || Half { buf: vec![0; BUF].into_boxed_slice(), len: 0, sent: 0, busy: false, done: false };
        let conn = Conn { fds: [fd, server.into_raw_fd()], halves: [half(), half()], closing: false };
        let i = match self.free.pop() {
            Some(i) => {
                self.conns[i] = Some(conn);
                i
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.recv(i, 0)?;
        self.recv(i, 1)
    }

    fn recv(&mut self, i: usize, dir: usize) -> std::io::Result<()> {
        let Some(c) = self.conns[i].as_mut() else { return Ok(()) };
        let h = &mut c.halves[dir];
        h.busy = true;
        let e = opcode::Recv::new(types::Fd(c.fds[dir]), h.buf.as_mut_ptr(), BUF as u32).build();
        self.push(e.user_data(tag(i, dir, false)))
    }

    fn send(&mut self, i: usize, dir: usize) -> std::io::Result<()> {
        let Some(c) = self.conns[i].as_mut() else { return Ok(()) };
        let h = &mut c.halves[dir];
        h.busy = true;
        let rest = &h.buf[h.sent..h.len];
        let e = opcode::Send::new(types::Fd(c.fds[1 - dir]), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.push(e.user_data(tag(i, dir, true)))
    }

    fn complete(&mut self, i: usize, dir: usize, was_send: bool, res: i32) -> std::io::Result<()> {
        let Some(c) = self.conns[i].as_mut() else { return Ok(()) };
        let h = &mut c.halves[dir];
        h.busy = false;
        if res == 0 && !was_send && !c.closing {
            // End of stream one way: passed on, the other way goes on (half-close).
            h.done = true;
            // SAFETY: the connection's own socket, still open.
            unsafe { libc::shutdown(c.fds[1 - dir], libc::SHUT_WR) };
            if c.halves.iter().all(|h| h.done) {
                return self.close(i);
            }
            return Ok(());
        }
        if res <= 0 || c.closing {
            return self.close(i);
        }
        if was_send {
            h.sent += res as usize;
            if h.sent < h.len {
                return self.send(i, dir);
            }
            self.recv(i, dir)
        } else {
            (h.len, h.sent) = (res as usize, 0);
            self.send(i, dir)
        }
    }

    /// Ends a connection: both sockets are shut down so that what is in flight completes; the
    /// slot is freed once nothing is.
    fn close(&mut self, i: usize) -> std::io::Result<()> {
        let Some(c) = self.conns[i].as_mut() else { return Ok(()) };
        if !c.closing {
            c.closing = true;
            for fd in c.fds {
                // SAFETY: the connection's own sockets, still open.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        if c.halves.iter().any(|h| h.busy) {
            return Ok(());
        }
        for fd in c.fds {
            // SAFETY: nothing is in flight on them any more.
            unsafe { libc::close(fd) };
        }
        self.conns[i] = None;
        self.free.push(i);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Bytes both ways through the relay, in pieces and whole, on several connections at once.
    #[test]
    fn relays_both_ways_until_either_side_closes() {
        if let Err(e) = available() {
            panic!("io_uring is not available here ({e}): it needs Linux 6.1 or later, sysctl kernel.io_uring_disabled=0 and no seccomp filter refusing it");
        }
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in echo.incoming() {
                let mut c = c.unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0; 4096];
                    while let Ok(n @ 1..) = c.read(&mut buf) {
                        c.write_all(&buf[..n]).unwrap();
                    }
                });
            }
        });
        let listen = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        std::thread::spawn(move || run(&[(listen, target)], 2));
        let clients: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = (0..100)
                        .find_map(|_| {
                            TcpStream::connect(listen).ok().or_else(|| {
                                std::thread::sleep(std::time::Duration::from_millis(20));
                                None
                            })
                        })
                        .expect("relay listening");
                    let data: Vec<u8> = (0..200_000u32).map(|b| (b * 7 + i) as u8).collect();
                    let mut w = c.try_clone().unwrap();
                    let sent = data.clone();
                    let writer = std::thread::spawn(move || {
                        for piece in sent.chunks(10_000) {
                            w.write_all(piece).unwrap();
                        }
                        w.shutdown(std::net::Shutdown::Write).unwrap();
                    });
                    let mut got = Vec::new();
                    c.read_to_end(&mut got).unwrap();
                    writer.join().unwrap();
                    assert_eq!(got.len(), data.len());
                    assert!(got == data, "connection {i}: bytes differ");
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
    }
}
