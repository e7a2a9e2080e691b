//! The data path's threads: one single-threaded tokio runtime per thread (`[process] threads`,
//! one per CPU by default), each running an accept loop of every listener and the sessions
//! that loop accepts.
//!
//! A session then lives on one thread from its accept to its close: its two sockets are
//! registered with that thread's epoll, and a readiness event runs the session on the thread
//! that received it. On one work-stealing runtime shared by every session, a wake-up could
//! schedule the session on another worker and wake that worker with a futex call, and the
//! session's state crossed between cores. The control plane (etcd, the admin endpoint, VIPs,
//! reloads) stays on the process's main runtime; what crosses from it to the sessions (a drain,
//! a kill, a new session context) goes through the same `Arc`s and tokens as before.
//!
//! Every accept loop of a listener accepts from its own duplicate of the listening socket's
//! descriptor, registered with its thread's epoll: the kernel wakes the threads waiting on it,
//! the first to call `accept` takes the connection and the others find the queue empty. An idle
//! thread sleeps in `epoll_wait`, so it is usually the one that wakes first.
//!
//! Sessions never move once started, so the threads are kept even at accept: a thread that
//! runs `BALANCE_SLACK` more sessions than the least loaded one hands a connection it accepted
//! to that one (`Thread::elsewhere`), which costs the connection two `epoll_ctl` and a wake-up
//! of the other thread. A burst of connections (an application pool starting) lands on whichever
//! thread woke first, and is spread this way.
//!
//! The number of threads is fixed for the life of the process; a reload that changes it says
//! so, and a restart or a binary upgrade applies it.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How many more sessions than the least loaded thread a thread may run before it hands the
/// connections it accepts over.
pub(crate) const BALANCE_SLACK: usize = 8;

/// Period of each of a thread's two `heartbeat` timers, which take turns: one of them always
/// expires within this, shorter than the timeouts a session's setup sets (its first packet's
/// 10 s, `connect_timeout`'s 3 s by default).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The data-path threads. Dropping it stops them: each runtime drops what it still runs.
pub(crate) struct Workers {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

struct Shared {
    handles: Vec<Handle>,
    /// Sessions open on each thread.
    load: Vec<Load>,
}

/// A counter on a cache line of its own: each thread writes its own.
#[repr(align(64))]
#[derive(Default)]
struct Load(AtomicUsize);

impl Workers {
    /// Starts `n` threads (at least one), each running a single-threaded runtime until `self`
    /// is dropped. On an error, the threads already started stop.
    pub(crate) fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            match start_one(i, stop.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        let load = (0..n).map(|_| Load::default()).collect();
        Ok(Workers { shared: Arc::new(Shared { handles, load }), stop })
    }

    /// How many threads run.
    pub(crate) fn len(&self) -> usize {
        self.shared.handles.len()
    }

    /// Sessions open on each thread, in thread order.
    #[cfg(test)]
    pub(crate) fn loads(&self) -> Vec<usize> {
        self.shared.load.iter().map(|l| l.0.load(Ordering::Relaxed)).collect()
    }

    /// Runs `task(thread)` on every thread; the handles, in thread order.
    pub(crate) fn spawn_each<F, Fut>(&self, mut task: F) -> Vec<JoinHandle<Fut::Output>>
    where
        F: FnMut(Thread) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        (0..self.len())
            .map(|index| self.shared.handles[index].spawn(task(Thread { index, shared: self.shared.clone() })))
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A thread that runs its runtime until `stop`. Its runtime is built on the thread itself: a
/// runtime that failed to start is never dropped inside another runtime.
///
/// Only the I/O and time drivers: sessions and accept loops use no signal or child process.
/// The signal driver would cost a descriptor per thread, and the process driver work on every
/// park (it tries to reap orphans, under a process-wide lock, each time the thread goes idle).
fn start_one(index: usize, stop: CancellationToken) -> io::Result<Handle> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    thread::Builder::new().name(format!("pgfront-dp-{index}")).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
            Ok(rt) => {
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = heartbeat(Duration::ZERO) => {}
                        _ = heartbeat(HEARTBEAT / 2) => {}
                    }
                });
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    })?;
    rx.recv().unwrap_or_else(|_| Err(io::Error::other("the thread ended before its runtime started")))
}

/// One of two timers, `HEARTBEAT / 2` apart, so that one is always pending and expires within
/// `HEARTBEAT`: then setting a session's timeouts does not wake the thread. tokio's timer driver
/// wakes its thread through the I/O driver (a `write` to its eventfd, then one more
/// `epoll_wait`) whenever a timer is set to expire before the earliest one the thread last went
/// to sleep for, and, with no timer pending, for any timer. A session's setup sets three or four
/// (its first packet's, its connect's, its answer's): 1.34 such writes per connection under
/// `pgbench -C`, 0.01 with the heartbeat (`benches/datapath.rs`, `syscalls-connect`). Two
/// timers, because one alone would itself be the earliest when it is set again after firing,
/// and wake the thread that way. Cost: a few timer wake-ups a second on an idle thread (each beat
/// wakes it once or twice: tokio's wheel moves a timer a second out down a level); timeouts
/// shorter than `HEARTBEAT` (a `connect_timeout` below 1 s) still wake it.
async fn heartbeat(offset: Duration) {
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + offset, HEARTBEAT);
    // `Skip` keeps each on its own schedule: after a stall (`Delay` would re-arm both from
    // the same instant) they would fire together and leave no timer pending between beats.
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        beat.tick().await;
    }
}

/// One data-path thread, as its tasks see it.
#[derive(Clone)]
pub(crate) struct Thread {
    index: usize,
    shared: Arc<Shared>,
}

impl Thread {
    /// The thread's number, from 0.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// Counts a session on this thread while `session` runs.
    pub(crate) fn run<F: Future>(&self, session: F) -> impl Future<Output = F::Output> {
        let load = Counted::new(self.shared.clone(), self.index);
        // Not an async block: a block that awaits a future it captured holds it twice (as its
        // capture and as the future it awaits), which doubled every session's task (7.6 KB
        // instead of 4.4 per idle connection, `benches/idle_memory.rs`). `map` holds it once;
        // `load` is dropped with it, whether it ends or is dropped.
        session.map(move |out| {
            drop(load);
            out
        })
    }

    /// Another thread, when this one runs `BALANCE_SLACK` more sessions than the least loaded.
    pub(crate) fn elsewhere(&self) -> Option<Thread> {
        let load = |i: usize| self.shared.load[i].0.load(Ordering::Relaxed);
        let mine = load(self.index);
        let (least, min) = (0..self.shared.load.len()).map(|i| (i, load(i))).min_by_key(|&(_, l)| l)?;
        (mine > min + BALANCE_SLACK).then(|| Thread { index: least, shared: self.shared.clone() })
    }

    /// This thread's runtime.
    pub(crate) fn handle(&self) -> &Handle {
        &self.shared.handles[self.index]
    }
}

/// One session counted on a thread, from its creation (so that the next accept already sees
/// it) to its drop.
struct Counted {
    shared: Arc<Shared>,
    index: usize,
}

impl Counted {
    fn new(shared: Arc<Shared>, index: usize) -> Counted {
        shared.load[index].0.fetch_add(1, Ordering::Relaxed);
        Counted { shared, index }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.shared.load[self.index].0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Threads to start when `[process] threads` is not set: one per CPU this process may run on.
pub(crate) fn default_threads() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn each_thread_runs_its_task_on_its_own_runtime() {
        let w = Workers::start(3).unwrap();
        assert_eq!(w.len(), 3);
        let names: Vec<String> = block_on(async {
            let tasks = w.spawn_each(|t| async move {
                // A task spawned from a worker's task stays on that worker.
                let inner = tokio::spawn(async { thread::current().name().unwrap().to_owned() }).await.unwrap();
                assert_eq!(inner, format!("pgfront-dp-{}", t.index()));
                inner
            });
            futures_util::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect()
        });
        assert_eq!(names, ["pgfront-dp-0", "pgfront-dp-1", "pgfront-dp-2"]);
    }

    #[test]
    fn dropping_the_workers_stops_their_tasks() {
        let w = Workers::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let _ = w.spawn_each(move |_| {
            let tx = tx.clone();
            async move {
                // Dropped with the runtime: the sender goes with it.
                std::future::pending::<()>().await;
                drop(tx);
            }
        });
        drop(w);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "the worker's task outlived the workers"
        );
    }

    #[test]
    fn a_thread_over_the_slack_points_to_the_least_loaded_one() {
        let w = Workers::start(3).unwrap();
        let threads: Vec<Thread> = {
            let mut v = Vec::new();
            let _ = w.spawn_each(|t| {
                v.push(t);
                async {}
            });
            v
        };
        let hold = |t: &Thread, n: usize| -> Vec<Counted> {
            (0..n).map(|_| Counted::new(t.shared.clone(), t.index)).collect()
        };
        let _a = hold(&threads[0], BALANCE_SLACK + 3);
        let _b = hold(&threads[1], 2);
        let c = hold(&threads[2], 1);
        assert_eq!(threads[0].elsewhere().map(|t| t.index()), Some(2));
        assert!(threads[1].elsewhere().is_none(), "within the slack");
        drop(c);
        let _c = hold(&threads[2], 5);
        assert_eq!(threads[0].elsewhere().map(|t| t.index()), Some(1), "thread 1 is now the least loaded");
        // Counted while the session runs, not after.
        let done = block_on(threads[1].run(async { threads[1].shared.load[1].0.load(Ordering::Relaxed) }));
        assert_eq!(done, 3);
        assert_eq!(threads[1].shared.load[1].0.load(Ordering::Relaxed), 2);
    }
}
