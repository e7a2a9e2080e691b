//! Session runtimes (opt-in): single-threaded tokio runtimes, each on a thread of its own, to
//! which the accept loops hand their new sessions in turn.
//!
//! Why: on tokio's work-stealing runtime, a readiness event that the I/O driver of one worker
//! delivers for a session often makes that worker wake another, parked one (a `futex` call) to
//! share the work, so a small transaction paid a cross-thread wake-up about one time in three.
//! A session there lives on one thread from accept to close: its two sockets are registered with
//! that thread's own epoll, its wake-ups never leave the thread, and a transaction costs its
//! reads, its writes and the thread's `epoll_wait`. `benches/datapath.rs` (figure `syscalls`)
//! counts them.
//!
//! Invariants: a session's sockets are moved to its runtime's reactor before the first poll
//! (`into_std` on the accepting runtime, `from_std` on the session's), never polled from
//! another runtime; sessions stay tracked by their listener's `TaskTracker` (drain, reload and
//! upgrade wait for them as before); everything they share with the rest of the process
//! (pool, cancel map, cancellation tokens) is runtime-agnostic. The runtimes live as long as the
//! process: a thread parked in `epoll_wait` with no session costs nothing.
//!
//! Opt-in, because it is not free per connection: `PGFRONT_SESSION_THREADS=N` (read once at
//! start-up; `N` runtimes, e.g. the number of CPUs) turns it on; unset or `0`, sessions run on the
//! main work-stealing runtime. Measured with `benches/datapath.rs` on a loaded 2-core machine,
//! 5 rounds: no `futex` per `pgbench -S` transaction any more (0.65 → 0, 5.9 → 5.5 system calls
//! per transaction) but no CPU per transaction gain that stands out of the noise, while each new
//! connection costs about 30 µs more CPU (48 → 77 µs in the connect/close loop: the socket leaves
//! one epoll for another and the session's thread must be woken). Accepting on each session
//! thread from its own `SO_REUSEPORT` socket would remove that hand-over; it is not done because
//! the listening sockets are what reload and upgrade hand over (`handover`).

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tracing::warn;

/// The session runtimes.
pub(crate) struct Shards {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Shards {
    /// Starts the runtimes `PGFRONT_SESSION_THREADS` asks for; `None` when it is unset or 0 (or a
    /// runtime cannot start: then sessions run on the main runtime, which works as well).
    pub(crate) fn from_env() -> Option<Shards> {
        let n = match std::env::var("PGFRONT_SESSION_THREADS") {
            Ok(v) => match v.trim().parse::<usize>() {
                Ok(n) => n,
                Err(_) => {
                    warn!(value = %v, "PGFRONT_SESSION_THREADS is not a number: sessions run on the main runtime");
                    0
                }
            },
            Err(_) => 0,
        };
        if n == 0 {
            return None;
        }
        match Shards::start(n) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot start the session threads: sessions run on the main runtime");
                None
            }
        }
    }

    fn start(n: usize) -> std::io::Result<Shards> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            // The thread drives every session spawned on its handle, for the life of the process.
            std::thread::Builder::new()
                .name(format!("pgfront-sessions-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        Ok(Shards { handles, next: AtomicUsize::new(0) })
    }

    /// The runtime for the next session, in turn.
    fn next(&self) -> &Handle {
        &self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()]
    }

    /// Runs `session` (given its socket, registered with the runtime it runs on) on the next
    /// runtime, as a task of `tracker`. The socket leaves the accepting runtime's reactor first;
    /// should that fail, the client is closed (as a failed accept would be).
    pub(crate) fn spawn<F, Fut>(&self, tracker: &tokio_util::task::TaskTracker, sock: TcpStream, session: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let std = match sock.into_std() {
            Ok(s) => s,
            Err(e) => return warn!(error = %e, "accepted socket: cannot move it to a session thread"),
        };
        tracker.spawn_on(
            async move {
                match TcpStream::from_std(std) {
                    Ok(sock) => session(sock).await,
                    Err(e) => warn!(error = %e, "accepted socket: cannot register it on its session thread"),
                }
            },
            self.next(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sockets accepted on one runtime are served on the session threads, in turn, tracked by the
    /// listener's tracker: each echo session reports the thread it ran on.
    #[tokio::test]
    async fn sessions_run_on_the_session_threads_in_turn_and_are_tracked() {
        let shards = Shards::start(2).unwrap();
        let tracker = tokio_util::task::TaskTracker::new();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let c = TcpStream::connect(addr).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            shards.spawn(&tracker, s, move |mut s| async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf).await;
                }
            });
            clients.push(c);
        }
        for c in &mut clients {
            c.write_all(b"ping").await.unwrap();
            let mut back = [0u8; 4];
            c.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"ping");
        }
        drop(tx);
        let mut threads = Vec::new();
        while let Some(t) = rx.recv().await {
            threads.push(t.unwrap_or_default());
        }
        threads.sort();
        assert_eq!(threads, ["pgfront-sessions-0", "pgfront-sessions-0", "pgfront-sessions-1", "pgfront-sessions-1"]);
        tracker.close();
        tokio::time::timeout(std::time::Duration::from_secs(10), tracker.wait())
            .await
            .expect("sessions tracked and ended");
    }
}
