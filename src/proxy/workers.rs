//! The data path's threads: one single-threaded tokio runtime per thread (`[process] threads`,
//! one per CPU by default), each running an accept loop of every listener and the sessions
//! that loop accepts.
//!
//! A session then lives on one thread from its accept to its close: its two sockets are
//! registered with that thread's epoll, and a readiness event runs the session on the thread
//! that received it. On a work-stealing runtime shared by every session, a wake-up could
//! schedule the session on another worker and wake that worker (a futex call per transaction,
//! measured with `cargo bench --bench datapath -- --figures syscalls`), and the session's state
//! crossed between cores. The control plane (etcd, the admin endpoint, VIPs, reloads) stays on
//! the process's main runtime; what crosses from it to the sessions (a drain, a kill, a new
//! session context) goes through the same `Arc`s and tokens as before.
//!
//! Every accept loop of a listener accepts from its own duplicate of the listening socket's
//! descriptor, registered with its thread's epoll: the kernel wakes the threads waiting on it,
//! the first to call `accept` takes the connection and the others find the queue empty. An
//! idle thread sleeps in `epoll_wait`, so it is usually the one that wakes first; a busy one
//! sees the event at its next poll. The threads' number is fixed for the life of the process;
//! a reload that changes it says so, and a restart or a binary upgrade applies it.

use std::future::Future;
use std::io;
use std::thread;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The data-path threads. Dropping it stops them: the runtimes drop what they still run.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` threads (at least one), each running a single-threaded runtime until `self`
    /// is dropped.
    pub(crate) fn start(n: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let until = stop.clone();
            let started = thread::Builder::new()
                .name(format!("pgfront-dp-{i}"))
                .spawn(move || rt.block_on(until.cancelled()));
            if let Err(e) = started {
                stop.cancel();
                return Err(e);
            }
        }
        Ok(Workers { handles, stop })
    }

    /// How many threads run.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task(i)` on every thread `i`; the handles, in thread order.
    pub(crate) fn spawn_each<F, Fut>(&self, mut task: F) -> Vec<JoinHandle<Fut::Output>>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        self.handles.iter().enumerate().map(|(i, h)| h.spawn(task(i))).collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Threads to start when `[process] threads` is not set: one per CPU this process may run on.
pub(crate) fn default_threads() -> usize {
    thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_runs_its_task_on_its_own_runtime() {
        let w = Workers::start(3).unwrap();
        assert_eq!(w.len(), 3);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let names: Vec<String> = rt.block_on(async {
            let tasks = w.spawn_each(|i| async move {
                // A task spawned from a worker's task stays on that worker.
                let inner = tokio::spawn(async { thread::current().name().unwrap().to_owned() }).await.unwrap();
                assert_eq!(inner, format!("pgfront-dp-{i}"));
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
}
