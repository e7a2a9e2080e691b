//! Tests of `Pool` through its public API only: targeted replays of the two slot-ownership
//! defects of issue 6 (a slot granted to a queued client but not yet picked up), and a model
//! test that drives the real pool through random interleavings of acquire / pick-up / drop /
//! timeout / apply on a current-thread runtime with paused time, checking the pool's
//! invariants after every step.
//!
//! Futures are polled by hand (`now_or_never`), one client at a time, so a grant can stay in
//! transit across other operations exactly as it can when the woken client's task has not run
//! yet.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use proptest::prelude::*;
use tokio::time::Instant;

use super::{Lease, Pool, Refusal};
use crate::balancer::select::ServerState;
use crate::config::{Balance, ListenerConfig, Role};
use crate::metrics::Metrics;
use crate::topology::{Backend, Targets};

const QUEUE_TIMEOUT: Duration = Duration::from_millis(100);
const GRACE: Duration = Duration::from_millis(30);

fn b(i: u16) -> Backend {
    Backend { member: Arc::from(format!("pg{i}")), addr: ([127, 0, 0, 1], 5400 + i).into() }
}

fn pool(server_maxconn: u32, balance: Balance) -> Arc<Pool> {
    let cfg = ListenerConfig {
        name: "test".to_owned(),
        cluster: "c".to_owned(),
        bind: ([127, 0, 0, 1], 0).into(),
        role: Role::Primary,
        balance,
        server_maxconn,
        maxconn: 1000,
        queue_timeout: QUEUE_TIMEOUT,
        connect_timeout: Duration::from_secs(1),
        tcp_keepalive: None,
        max_replica_lag: None,
        drain_grace: Duration::ZERO,
        backlog: 128,
    };
    Pool::new(&cfg, Metrics::new().listener("test"))
}

fn targets(eligible: &[Backend], keep: &[Backend]) -> Targets {
    Targets { eligible: eligible.to_vec(), keep: keep.to_vec() }
}

type Acquiring = Pin<Box<dyn Future<Output = Result<Lease, Refusal>>>>;

/// An `acquire` as a client task runs it, not yet polled.
fn acquiring(pool: &Arc<Pool>) -> Acquiring {
    let p = pool.clone();
    let deadline = Instant::now() + QUEUE_TIMEOUT;
    Box::pin(async move { p.acquire(&[], deadline).await })
}

/// A lease that must be granted at once.
fn lease_now(pool: &Arc<Pool>) -> Lease {
    match acquiring(pool).now_or_never() {
        Some(Ok(l)) => l,
        Some(Err(r)) => panic!("refused: {r:?}"),
        None => panic!("queued, expected an immediate grant"),
    }
}

/// An `acquire` that went into the queue (polled once, pending).
fn queued(pool: &Arc<Pool>) -> Acquiring {
    let mut f = acquiring(pool);
    assert!((&mut f).now_or_never().is_none(), "expected to be queued");
    f
}

/// `(active, state)` of a server the pool lists.
fn server(pool: &Pool, x: &Backend) -> Option<(u32, ServerState)> {
    pool.status().servers.iter().find(|s| s.member == *x.member && s.addr == x.addr).map(|s| (s.active, s.state))
}

/// Lets spawned tasks (delayed drain cancels) and fired timers run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// Defect 1: a queued client is granted B; B is drained before that client picks the grant up.
/// Its connection must be closed with the others on B.
#[tokio::test(start_paused = true)]
async fn slot_granted_before_a_drain_shares_the_drain() {
    let pool = pool(1, Balance::Leastconn);
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let first = lease_now(&pool);
    let second = queued(&pool);
    drop(first); // b1 is granted to `second`, which has not run yet
    assert_eq!(pool.apply(&targets(&[b(2)], &[]), Duration::ZERO), vec![b(1)]);
    let lease = second.now_or_never().expect("granted").expect("a lease");
    assert_eq!(lease.backend, b(1));
    assert!(lease.drain.is_cancelled(), "a slot granted before the drain must be drained");
    assert_eq!(server(&pool, &b(1)), Some((1, ServerState::Draining)));
    drop(lease);
    assert_eq!(server(&pool, &b(1)), None, "a drained server is forgotten with its last connection");
}

/// Defect 1 with a drain grace: the slot in transit is closed with the others, after the grace.
#[tokio::test(start_paused = true)]
async fn grace_delays_the_drain_of_a_slot_in_transit() {
    let pool = pool(1, Balance::Leastconn);
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let first = lease_now(&pool);
    let second = queued(&pool);
    drop(first);
    pool.apply(&targets(&[b(2)], &[]), GRACE);
    let lease = second.now_or_never().expect("granted").expect("a lease");
    assert_eq!(lease.backend, b(1));
    tokio::time::advance(GRACE - Duration::from_millis(1)).await;
    settle().await;
    assert!(!lease.drain.is_cancelled(), "cancelled before the grace ran out");
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert!(lease.drain.is_cancelled(), "not cancelled once the grace ran out");
}

/// Defect 2: the client's task drops its `acquire` after the grant was sent (client gone).
/// The slot must come back.
#[tokio::test(start_paused = true)]
async fn dropped_acquire_gives_back_a_slot_in_transit() {
    let pool = pool(1, Balance::Leastconn);
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let first = lease_now(&pool);
    let second = queued(&pool);
    drop(first); // granted to `second`
    drop(second); // ... which leaves before running
    assert_eq!(server(&pool, &b(1)), Some((0, ServerState::Eligible)), "the slot leaked");
    let third = lease_now(&pool);
    assert_eq!(third.backend, b(1));
}

/// Defect 2 on a draining server: once the grant in transit is dropped, the server is forgotten.
#[tokio::test(start_paused = true)]
async fn draining_server_is_forgotten_when_its_slot_in_transit_is_dropped() {
    let pool = pool(1, Balance::Leastconn);
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let first = lease_now(&pool);
    let second = queued(&pool);
    drop(first);
    pool.apply(&targets(&[b(2)], &[]), Duration::ZERO);
    assert_eq!(server(&pool, &b(1)), Some((1, ServerState::Draining)));
    drop(second);
    assert_eq!(server(&pool, &b(1)), None, "a draining server without connections must be removed");
    assert_eq!(pool.status().queued, 0);
}

/// The status's oldest wait is the head of the queue's: it follows the queue as clients leave.
#[tokio::test(start_paused = true)]
async fn oldest_queued_wait_is_the_head_of_the_queue() {
    let pool = pool(1, Balance::Leastconn);
    assert_eq!(pool.status().oldest_queued_wait_seconds, 0.0);
    let first = queued(&pool);
    tokio::time::advance(Duration::from_millis(30)).await;
    let second = queued(&pool);
    tokio::time::advance(Duration::from_millis(20)).await;
    let s = pool.status();
    assert_eq!(s.queued, 2);
    assert!((s.oldest_queued_wait_seconds - 0.050).abs() < 1e-6, "{}", s.oldest_queued_wait_seconds);
    drop(first);
    assert!((pool.status().oldest_queued_wait_seconds - 0.020).abs() < 1e-6);
    drop(second);
    assert_eq!(pool.status().oldest_queued_wait_seconds, 0.0);
}

/// Timeout path: a queued client that times out leaves nothing behind, and its refusal says why.
#[tokio::test(start_paused = true)]
async fn timeout_refuses_and_leaves_no_waiter() {
    let pool = pool(1, Balance::Leastconn);
    let mut nowhere = queued(&pool);
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let held = (&mut nowhere).now_or_never().expect("granted").expect("a lease");
    let mut full = queued(&pool);
    tokio::time::advance(QUEUE_TIMEOUT).await;
    assert!(matches!((&mut full).now_or_never(), Some(Err(Refusal::Full))));
    assert_eq!(pool.status().queued, 0);
    drop(full);
    drop(held);
    assert_eq!(server(&pool, &b(1)), Some((0, ServerState::Eligible)));

    let pool2 = self::pool(1, Balance::Leastconn);
    let mut none = queued(&pool2);
    tokio::time::advance(QUEUE_TIMEOUT).await;
    assert!(matches!((&mut none).now_or_never(), Some(Err(Refusal::NoServer))));
    assert_eq!(pool2.status().queued, 0);
}

/// A server that comes back after a drain takes new connections on a fresh drain token, while
/// the connections opened before the drain keep the cancelled one.
#[tokio::test(start_paused = true)]
async fn a_server_back_from_a_drain_gets_a_fresh_token() {
    let pool = pool(2, Balance::Leastconn);
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let old = lease_now(&pool);
    pool.apply(&targets(&[], &[]), Duration::ZERO);
    assert!(old.drain.is_cancelled());
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let new = lease_now(&pool);
    assert_eq!(new.backend, b(1));
    assert!(!new.drain.is_cancelled(), "a connection opened after the server came back was drained");
    assert_eq!(server(&pool, &b(1)), Some((2, ServerState::Eligible)));
}

/// The drain grace counts from the drain, not from whenever a timer task first gets to run.
#[tokio::test(start_paused = true)]
async fn grace_counts_from_the_drain() {
    let pool = pool(1, Balance::Leastconn);
    pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let lease = lease_now(&pool);
    pool.apply(&targets(&[], &[]), GRACE);
    // Time passes before any other task runs.
    tokio::time::advance(GRACE).await;
    settle().await;
    assert!(lease.drain.is_cancelled(), "the grace ran out at drain + grace");
}

/// A second drain (here without grace) closes connections still inside an earlier drain's
/// grace, whether the server was kept or eligible in between.
#[tokio::test(start_paused = true)]
async fn a_later_drain_reaches_connections_of_an_earlier_one() {
    for between in [targets(&[], &[b(1)]), targets(&[b(1)], &[])] {
        let pool = pool(2, Balance::Leastconn);
        pool.apply(&targets(&[b(1)], &[]), Duration::ZERO);
        let old = lease_now(&pool);
        pool.apply(&targets(&[], &[]), Duration::from_secs(60));
        pool.apply(&between, Duration::ZERO);
        settle().await;
        assert!(!old.drain.is_cancelled(), "cancelled before its grace");
        pool.apply(&targets(&[], &[]), Duration::ZERO);
        assert!(old.drain.is_cancelled(), "a drain without grace left a connection open ({between:?})");
    }
}

/// Clients on two worker threads acquiring, holding, giving up at arbitrary points and timing
/// out while the targets flap: every slot comes back and nothing deadlocks (a `Lease` dropped
/// under the pool lock would).
#[test]
fn concurrent_churn_leaves_no_slot_behind() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().expect("runtime");
    rt.block_on(async {
        let pool = pool(2, Balance::Leastconn);
        pool.apply(&targets(&[b(0), b(1)], &[]), Duration::ZERO);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..8u64 {
            let pool = pool.clone();
            tasks.spawn(async move {
                for i in 0..300u64 {
                    let deadline = Instant::now() + Duration::from_millis(2);
                    // 0: wait for the outcome; 1..=3: give up after that many yields.
                    let patience = (c * 7 + i) % 4;
                    tokio::select! {
                        r = pool.acquire(&[], deadline) => {
                            if let Ok(lease) = r {
                                if i % 3 == 0 {
                                    tokio::task::yield_now().await;
                                }
                                drop(lease);
                            }
                        }
                        _ = yields(patience), if patience > 0 => {}
                    }
                }
            });
        }
        let flapper = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let sets: [&[Backend]; 4] = [&[b(0), b(1)], &[b(1)], &[], &[b(0), b(2)]];
                for i in 0..400usize {
                    let grace = if i % 2 == 0 { Duration::ZERO } else { Duration::from_millis(1) };
                    pool.apply(&targets(sets[i % 4], sets[(i / 4) % 4]), grace);
                    tokio::task::yield_now().await;
                }
                pool.apply(&targets(&[b(0), b(1)], &[]), Duration::ZERO);
            })
        };
        while let Some(r) = tasks.join_next().await {
            r.expect("client task");
        }
        flapper.await.expect("flapper task");
        let st = pool.status();
        assert_eq!(st.queued, 0);
        for s in &st.servers {
            assert_eq!(s.active, 0, "{} keeps slots after every client left", s.member);
            assert_ne!(s.state, ServerState::Draining);
        }
    });
}

async fn yields(n: u64) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

// ---- model test ----------------------------------------------------------------------------

const CLIENTS: usize = 5;
const SERVERS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// An idle client starts an `acquire` and polls it once.
    Acquire(usize),
    /// A waiting client's task runs (picks up its grant, or its timeout fires).
    Poll(usize),
    /// A waiting client goes away: its `acquire` future is dropped wherever it is.
    DropAcquire(usize),
    /// A connected client's session ends.
    DropLease(usize),
    /// Time passes (milliseconds).
    Advance(u64),
    /// New targets: which of the servers are eligible, which are kept; drain grace or not.
    Apply { eligible: [bool; SERVERS], keep: [bool; SERVERS], grace: bool },
}

fn arb_op() -> impl Strategy<Value = Op> {
    let c = 0..CLIENTS;
    prop_oneof![
        4 => c.clone().prop_map(Op::Acquire),
        4 => c.clone().prop_map(Op::Poll),
        1 => c.clone().prop_map(Op::DropAcquire),
        3 => c.prop_map(Op::DropLease),
        2 => (1u64..60).prop_map(Op::Advance),
        2 => (any::<[bool; SERVERS]>(), any::<[bool; SERVERS]>(), any::<bool>())
            .prop_map(|(eligible, keep, grace)| Op::Apply { eligible, keep, grace }),
    ]
}

/// By when a lease's drain token must be cancelled, as far as the model knows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Due {
    /// Its server has not been drained since the slot was granted: never cancelled.
    Never,
    /// Cancelled from this instant on (drain time + grace), not before.
    At(Instant),
    /// Cancelled from this instant on; maybe before (the grant's time around earlier drains is
    /// not known).
    By(Instant),
    /// The slot was granted at an unseen moment around a drain and a comeback of its server.
    Unknown,
}

enum Client {
    Idle,
    Waiting { fut: Acquiring, since: usize, deadline: Instant },
    Holding { lease: Lease, due: Due },
}

struct Model {
    pool: Arc<Pool>,
    maxconn: u32,
    clients: Vec<Client>,
    /// `(step, server, cancel instant)` for every drain reported by `apply`.
    drains: Vec<(usize, Backend, Instant)>,
    /// `(step, server)` for every server an `apply` made eligible.
    eligible: Vec<(usize, Backend)>,
}

impl Model {
    fn step(&mut self, step: usize, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Acquire(i) => {
                if matches!(self.clients[i], Client::Idle) {
                    let deadline = Instant::now() + QUEUE_TIMEOUT;
                    self.clients[i] = Client::Waiting { fut: acquiring(&self.pool), since: step, deadline };
                    self.poll(i, step)?;
                }
            }
            Op::Poll(i) => self.poll(i, step)?,
            Op::DropAcquire(i) => {
                if matches!(self.clients[i], Client::Waiting { .. }) {
                    self.clients[i] = Client::Idle;
                }
            }
            Op::DropLease(i) => {
                if matches!(self.clients[i], Client::Holding { .. }) {
                    self.clients[i] = Client::Idle;
                }
            }
            // Awaited by the driver in `run_model`.
            Op::Advance(_) => {}
            Op::Apply { eligible, keep, grace } => {
                let pick = |m: [bool; SERVERS]| (0..SERVERS).filter(|i| m[*i]).map(|i| b(i as u16)).collect::<Vec<_>>();
                let grace = if grace { GRACE } else { Duration::ZERO };
                let drained = self.pool.apply(&targets(&pick(eligible), &pick(keep)), grace);
                let due = Instant::now() + grace;
                for x in &drained {
                    self.drains.push((step, x.clone(), due));
                    for c in &mut self.clients {
                        if let Client::Holding { lease, due: d } = c {
                            if lease.backend == *x {
                                *d = match *d {
                                    Due::Never => Due::At(due),
                                    Due::At(t) => Due::At(t.min(due)),
                                    Due::By(t) => Due::By(t.min(due)),
                                    Due::Unknown => Due::By(due),
                                };
                            }
                        }
                    }
                }
                self.eligible.extend(pick(eligible).into_iter().map(|x| (step, x)));
            }
        }
        Ok(())
    }

    /// Runs a waiting client's task once.
    fn poll(&mut self, i: usize, step: usize) -> Result<(), TestCaseError> {
        let Client::Waiting { fut, since, deadline } = &mut self.clients[i] else { return Ok(()) };
        let (since, deadline) = (*since, *deadline);
        match fut.now_or_never() {
            None => {}
            Some(Ok(lease)) => {
                let due = self.due_at_pickup(&lease.backend, since, step);
                self.clients[i] = Client::Holding { lease, due };
            }
            Some(Err(r)) => {
                prop_assert!(matches!(r, Refusal::Full | Refusal::NoServer), "refused with {:?}", r);
                prop_assert!(Instant::now() >= deadline, "refused before its deadline");
                self.clients[i] = Client::Idle;
            }
        }
        Ok(())
    }

    /// A client queued at step `since` picked up a slot on `x` at step `now`. The grant happened
    /// in between, unseen, while `x` was eligible. If `x` was drained in that window and not made
    /// eligible again afterwards, the grant came before that drain: the lease must share it.
    fn due_at_pickup(&self, x: &Backend, since: usize, now: usize) -> Due {
        let window: Vec<_> = self.drains.iter().filter(|(s, d, _)| d == x && *s > since && *s <= now).collect();
        match window.last() {
            None => Due::Never,
            Some((t, _, due)) => {
                if self.eligible.iter().any(|(s, e)| e == x && s > t && *s <= now) {
                    Due::Unknown
                } else if window.len() == 1 {
                    Due::At(*due)
                } else {
                    // Granted before one of several drains: the last one bounds it.
                    Due::By(*due)
                }
            }
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let st = self.pool.status();
        let leases: Vec<&Lease> = self
            .clients
            .iter()
            .filter_map(|c| if let Client::Holding { lease, .. } = c { Some(lease) } else { None })
            .collect();
        let waiting = self.clients.iter().filter(|c| matches!(c, Client::Waiting { .. })).count();
        let mut surplus = 0usize;
        for s in &st.servers {
            let held = leases.iter().filter(|l| *l.backend.member == *s.member && l.backend.addr == s.addr).count();
            prop_assert!(s.active <= self.maxconn, "{} over maxconn: {}", s.member, s.active);
            prop_assert!(s.active as usize >= held, "{}: {} active < {} leases", s.member, s.active, held);
            prop_assert!(s.state != ServerState::Draining || s.active > 0, "{} draining with no connection", s.member);
            surplus += s.active as usize - held;
            if st.queued > 0 && s.state == ServerState::Eligible {
                prop_assert_eq!(s.active, self.maxconn, "{} has room while a client waits", s.member);
            }
        }
        for l in &leases {
            prop_assert!(
                st.servers.iter().any(|s| *l.backend.member == *s.member && l.backend.addr == s.addr),
                "lease on {} that the pool forgot",
                l.backend.member
            );
        }
        // Every waiting client is either still queued or holds a grant it has not picked up;
        // every slot not held by a lease is such a grant; nothing queued belongs to a client gone.
        prop_assert!(st.queued <= waiting, "{} queued, {} clients waiting", st.queued, waiting);
        prop_assert_eq!(surplus, waiting - st.queued, "slots not held by a lease nor granted to a waiting client");
        let now = Instant::now();
        for c in &self.clients {
            if let Client::Holding { lease, due } = c {
                let cancelled = lease.drain.is_cancelled();
                match *due {
                    Due::Never => {
                        prop_assert!(!cancelled, "lease on {} cancelled without a drain", lease.backend.member)
                    }
                    Due::At(t) if now >= t => {
                        prop_assert!(cancelled, "lease on drained {} still open", lease.backend.member)
                    }
                    Due::At(_) => {
                        prop_assert!(!cancelled, "lease on {} cancelled before the grace", lease.backend.member)
                    }
                    Due::By(t) if now >= t => {
                        prop_assert!(cancelled, "lease on drained {} still open", lease.backend.member)
                    }
                    Due::By(_) => {}
                    Due::Unknown => {}
                }
            }
        }
        Ok(())
    }
}

fn run_model(maxconn: u32, balance: Balance, ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    rt.block_on(async {
        let mut m = Model {
            pool: pool(maxconn, balance),
            maxconn,
            clients: (0..CLIENTS).map(|_| Client::Idle).collect(),
            drains: Vec::new(),
            eligible: Vec::new(),
        };
        m.pool.apply(&targets(&[b(0), b(1)], &[]), Duration::ZERO);
        m.eligible.extend([(0, b(0)), (0, b(1))]);
        for (step, op) in ops.iter().enumerate() {
            let step = step + 1;
            if let Op::Advance(ms) = op {
                tokio::time::advance(Duration::from_millis(*ms)).await;
            } else {
                m.step(step, op)?;
            }
            settle().await;
            m.check().map_err(|e| TestCaseError::fail(format!("after step {step} {op:?}: {e}")))?;
        }
        // Everyone leaves: the pool must be empty again.
        m.clients.clear();
        settle().await;
        let st = m.pool.status();
        prop_assert_eq!(st.queued, 0);
        for s in &st.servers {
            prop_assert_eq!(s.active, 0, "{} keeps slots after every client left", s.member);
            prop_assert!(s.state != ServerState::Draining);
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn pool_model(maxconn in 1u32..3, rr in any::<bool>(), ops in proptest::collection::vec(arb_op(), 1..80)) {
        run_model(maxconn, if rr { Balance::Roundrobin } else { Balance::Leastconn }, &ops)?;
    }
}

#[tokio::test]
async fn sessions_closed_by_pgfront_are_counted_after_their_server_left_the_pool() {
    // A fenced primary: its sessions are killed, and once the last one ends the server leaves
    // the selector; what the fence acknowledgement reports must not leave with it.
    let p = pool(10, Balance::Leastconn);
    p.apply(&targets(&[b(1)], &[]), Duration::ZERO);
    let lease = p.acquire(&[], Instant::now() + QUEUE_TIMEOUT).await.unwrap();
    p.apply(&targets(&[b(2)], &[]), Duration::ZERO);
    assert!(lease.drain.is_cancelled(), "killed");
    lease.closed_by_pgfront();
    drop(lease);
    let st = p.status();
    assert!(st.servers.iter().all(|s| *s.member != *"pg1"), "pg1 left the pool: {:?}", st.servers);
    assert_eq!(st.closed.get("pg1"), Some(&1));
    assert_eq!(st.closed.get("pg2"), None);
}
