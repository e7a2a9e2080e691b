//! Runs a future until another one interrupts it, polling the interrupting one only when it was
//! woken.
//!
//! A session's pipe wakes about twice per transaction; what ends a session from outside (its
//! server's drain token, its listener's kill token) fires once in its life, if ever. Polling a
//! `CancellationToken::cancelled()` takes the token's lock and its `Notify`'s lock, both shared
//! by every session of that server or listener on every worker thread: beside the pipe in a
//! `select!`, four locks that the worker threads contend for on every wake-up of every
//! session. `interruptible` polls the interrupting future once at the start and then only after
//! its own waker fired.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Polls `work` to completion (`Ok`) unless `interrupt` completes first (`Err`, and `work` is
/// dropped). `interrupt` is polled first, and then only on its own wake-ups.
pub(crate) fn interruptible<W: Future, I: Future>(work: W, interrupt: I) -> Interruptible<W, I> {
    let flag = Arc::new(Flag { woken: AtomicBool::new(true), task: AtomicWaker::new() });
    let waker = Waker::from(flag.clone());
    Interruptible { work, interrupt, flag, waker }
}

pin_project_lite::pin_project! {
    /// `interruptible`'s future: a struct, not an `async fn`, which would hold `work` twice (as
    /// its argument and pinned), and so the pipe twice in every idle session's task.
    pub(crate) struct Interruptible<W, I> {
        #[pin]
        work: W,
        #[pin]
        interrupt: I,
        flag: Arc<Flag>,
        waker: Waker,
    }
}

impl<W: Future, I: Future> Future for Interruptible<W, I> {
    type Output = Result<W::Output, I::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake-up after the read wakes this task again.
        this.flag.task.register(cx.waker());
        if this.flag.woken.load(Ordering::Relaxed) && this.flag.woken.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(v) = this.interrupt.poll(&mut Context::from_waker(this.waker)) {
                return Poll::Ready(Err(v));
            }
        }
        this.work.poll(cx).map(Ok)
    }
}

/// The waker given to the interrupting future: marks it for polling and wakes the task.
pub(crate) struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    /// A future that counts its polls and never ends.
    struct Counted<'a>(&'a AtomicUsize);

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(self: std::pin::Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_interrupt_is_polled_once_then_only_when_it_wakes() {
        let polls = AtomicUsize::new(0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let token = CancellationToken::new();
        let work = async {
            let mut sum = 0;
            while let Some(v) = rx.recv().await {
                sum += v;
            }
            sum
        };
        let interrupt = async {
            tokio::select! {
                biased;
                _ = token.cancelled() => {}
                _ = Counted(&polls) => {}
            }
        };
        let run = interruptible(work, interrupt);
        tokio::pin!(run);
        for v in 1..=100 {
            tx.send(v).unwrap();
            let pending = std::future::poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx).is_pending())).await;
            assert!(pending, "the work ended before its channel closed");
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "the work's 100 wake-ups polled the interrupt");
        drop(tx);
        assert_eq!(run.await, Ok(5050));
    }

    #[tokio::test]
    async fn an_interrupt_ends_the_work_when_it_fires() {
        let token = CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            t.cancel();
        });
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            interruptible(std::future::pending::<()>(), token.cancelled()),
        )
        .await
        .expect("the interrupt did not end the work");
        assert_eq!(r, Err(()));
    }

    #[tokio::test]
    async fn an_interrupt_already_fired_wins_at_the_first_poll() {
        let token = CancellationToken::new();
        token.cancel();
        assert_eq!(interruptible(std::future::ready(1), token.cancelled()).await, Err(()));
    }

    /// A waker that records that it was woken.
    #[derive(Default)]
    struct Recorder(AtomicBool);

    impl Wake for Recorder {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_interrupt_from_another_thread_always_wakes_the_task() {
        // The race between the flag's read and the wake-up, many times over: after any poll
        // that returned `Pending`, a cancel that has finished must have woken the task.
        for _ in 0..2000 {
            let token = CancellationToken::new();
            let t = token.clone();
            let fire = std::thread::spawn(move || t.cancel());
            let mut run = pin!(interruptible(std::future::pending::<()>(), token.cancelled()));
            loop {
                // A new waker for each poll: only the registration of this poll can wake it.
                let woken = Arc::new(Recorder::default());
                let waker = Waker::from(woken.clone());
                if let Poll::Ready(r) = run.as_mut().poll(&mut Context::from_waker(&waker)) {
                    assert_eq!(r, Err(()));
                    break;
                }
                if fire.is_finished() && !woken.0.load(Ordering::SeqCst) {
                    panic!("the interrupt fired after a poll and the task was not woken");
                }
                std::thread::yield_now();
            }
            fire.join().unwrap();
        }
    }
}
