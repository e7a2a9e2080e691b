//! Pure: server selection for one listener — leastconn or roundrobin, a per-server connection
//! cap, and a FIFO queue for what is over the cap or has nowhere to go yet.
//!
//! Lifecycle of a server, as in sozu: `Eligible` (takes new connections) → `Kept` (no new
//! connections, open ones stay: e.g. the primary during a pending switchover) → `Draining`
//! (its connections are being closed; it stays listed until its count reaches zero, so counts
//! stay exact) → removed. A server can come back to `Eligible` from any state.
//!
//! Invariants, checked by the property tests:
//! - `active(s) <= maxconn` for every server at all times;
//! - a waiter is never overtaken: grants go to the queue in order, and `acquire` grants
//!   directly only when nobody waits;
//! - leastconn grants a server with the fewest active connections among those with room.

use std::collections::VecDeque;

use crate::config::Balance;
use crate::topology::Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    Eligible,
    Kept,
    Draining,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub backend: Backend,
    pub active: u32,
    pub state: ServerState,
}

/// An id of a queued waiter, unique within one `Selector`.
pub type WaiterId = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    Granted(Backend),
    /// Nothing free now: wait in the queue.
    Queued(WaiterId),
}

/// Result of applying new targets: servers that just lost their place and must be drained.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub drained: Vec<Backend>,
    pub added: Vec<Backend>,
}

#[derive(Debug)]
pub struct Selector {
    balance: Balance,
    maxconn: u32,
    servers: Vec<Server>,
    queue: VecDeque<WaiterId>,
    next_waiter: WaiterId,
    cursor: usize,
}

impl Selector {
    pub fn new(balance: Balance, maxconn: u32) -> Selector {
        Selector {
            balance,
            maxconn: maxconn.max(1),
            servers: Vec::new(),
            queue: VecDeque::new(),
            next_waiter: 0,
            cursor: 0,
        }
    }

    pub fn servers(&self) -> &[Server] {
        &self.servers
    }

    /// New limits from a reload. Open connections are never touched: a lower `maxconn` only
    /// stops new grants until the count falls below it, and a higher one lets `poll_grants` hand
    /// the new room to the queue, in order.
    pub fn reconfigure(&mut self, balance: Balance, maxconn: u32) {
        self.balance = balance;
        self.maxconn = maxconn.max(1);
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The waiter at the head of the queue: it has waited longest (the queue is FIFO).
    pub fn oldest_waiter(&self) -> Option<WaiterId> {
        self.queue.front().copied()
    }

    pub fn has_eligible(&self) -> bool {
        self.servers.iter().any(|s| s.state == ServerState::Eligible)
    }

    /// Whether an eligible server other than those in `avoid` exists, full or not.
    pub fn has_eligible_except(&self, avoid: &[Backend]) -> bool {
        self.servers.iter().any(|s| s.state == ServerState::Eligible && !avoid.contains(&s.backend))
    }

    /// Applies new targets. Counts of servers that stay are kept.
    pub fn update(&mut self, eligible: &[Backend], keep: &[Backend]) -> Update {
        let mut out = Update::default();
        for s in &mut self.servers {
            let new = if eligible.contains(&s.backend) {
                ServerState::Eligible
            } else if keep.contains(&s.backend) {
                ServerState::Kept
            } else {
                ServerState::Draining
            };
            if new == ServerState::Draining && s.state != ServerState::Draining {
                out.drained.push(s.backend.clone());
            }
            s.state = new;
        }
        self.servers.retain(|s| s.state != ServerState::Draining || s.active > 0);
        for b in eligible {
            if !self.servers.iter().any(|s| &s.backend == b) {
                self.servers.push(Server { backend: b.clone(), active: 0, state: ServerState::Eligible });
                out.added.push(b.clone());
            }
        }
        out
    }

    /// Takes a slot on a server at once if nobody waits and one has room, avoiding the
    /// servers in `avoid` (they just refused this client); otherwise queues.
    pub fn acquire(&mut self, avoid: &[Backend]) -> Acquire {
        if self.queue.is_empty() {
            if let Some(i) = self.pick(avoid) {
                return Acquire::Granted(self.take(i));
            }
        }
        let id = self.next_waiter;
        self.next_waiter += 1;
        self.queue.push_back(id);
        Acquire::Queued(id)
    }

    /// Removes a waiter that gave up. Returns false if it was not queued (already granted).
    pub fn cancel(&mut self, id: WaiterId) -> bool {
        match self.queue.iter().position(|w| *w == id) {
            Some(pos) => {
                self.queue.remove(pos);
                true
            }
            None => false,
        }
    }

    /// A connection to `backend` ended. Returns true if the server is no longer listed (it was
    /// draining and this was its last connection), so the caller can forget what it keeps for it.
    pub fn release(&mut self, backend: &Backend) -> bool {
        let Some(i) = self.servers.iter().position(|s| &s.backend == backend) else { return true };
        let s = &mut self.servers[i];
        s.active = s.active.saturating_sub(1);
        if s.state == ServerState::Draining && s.active == 0 {
            self.servers.remove(i);
            return true;
        }
        false
    }

    /// Grants queued waiters, in order, as long as a server has room.
    pub fn poll_grants(&mut self) -> Vec<(WaiterId, Backend)> {
        let mut out = Vec::new();
        while !self.queue.is_empty() {
            let Some(i) = self.pick(&[]) else { break };
            let id = self.queue.pop_front().expect("queue is not empty");
            out.push((id, self.take(i)));
        }
        out
    }

    fn take(&mut self, i: usize) -> Backend {
        self.servers[i].active += 1;
        self.servers[i].backend.clone()
    }

    /// The index of the server to use next, if one has room.
    fn pick(&mut self, avoid: &[Backend]) -> Option<usize> {
        let n = self.servers.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor % n;
        let open =
            |s: &Server| s.state == ServerState::Eligible && s.active < self.maxconn && !avoid.contains(&s.backend);
        let order = (0..n).map(|k| (start + k) % n);
        let chosen = match self.balance {
            // Fewest active connections; among equals the first after the cursor, so ties
            // rotate instead of always landing on the first server.
            Balance::Leastconn => order.filter(|&i| open(&self.servers[i])).min_by_key(|&i| self.servers[i].active),
            Balance::Roundrobin => order.into_iter().find(|&i| open(&self.servers[i])),
        }?;
        self.cursor = chosen + 1;
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    fn b(i: u16) -> Backend {
        Backend { member: Arc::from(format!("pg{i}")), addr: ([127, 0, 0, 1], i).into() }
    }

    fn granted(a: Acquire) -> Backend {
        match a {
            Acquire::Granted(b) => b,
            q => panic!("expected a grant, got {q:?}"),
        }
    }

    #[test]
    fn leastconn_spreads_and_ties_rotate() {
        let mut s = Selector::new(Balance::Leastconn, 10);
        s.update(&[b(1), b(2), b(3)], &[]);
        let got: Vec<_> = (0..6).map(|_| granted(s.acquire(&[])).addr.port()).collect();
        assert_eq!(got, vec![1, 2, 3, 1, 2, 3]);
        s.release(&b(2));
        s.release(&b(2));
        assert_eq!(granted(s.acquire(&[])), b(2), "fewest connections wins");
    }

    #[test]
    fn maxconn_queues_fifo_and_release_grants_in_order() {
        let mut s = Selector::new(Balance::Leastconn, 1);
        s.update(&[b(1)], &[]);
        assert_eq!(granted(s.acquire(&[])), b(1));
        let Acquire::Queued(w1) = s.acquire(&[]) else { panic!() };
        let Acquire::Queued(w2) = s.acquire(&[]) else { panic!() };
        assert!(s.poll_grants().is_empty());
        s.release(&b(1));
        assert_eq!(s.poll_grants(), vec![(w1, b(1))]);
        assert!(s.cancel(w2));
        assert!(!s.cancel(w1), "granted waiters are no longer queued");
        assert_eq!(s.queue_len(), 0);
    }

    #[test]
    fn reconfigured_limits_never_touch_open_connections() {
        let mut s = Selector::new(Balance::Leastconn, 3);
        s.update(&[b(1)], &[]);
        for _ in 0..3 {
            granted(s.acquire(&[]));
        }
        let Acquire::Queued(w1) = s.acquire(&[]) else { panic!() };
        let Acquire::Queued(w2) = s.acquire(&[]) else { panic!() };
        // Lower: the three stay, nothing is granted until the count falls below the new limit.
        s.reconfigure(Balance::Roundrobin, 2);
        assert_eq!(s.servers()[0].active, 3);
        s.release(&b(1));
        assert!(s.poll_grants().is_empty(), "2 open, limit 2");
        s.release(&b(1));
        assert_eq!(s.poll_grants(), vec![(w1, b(1))]);
        // Higher: the queue gets the room at once, in order.
        s.reconfigure(Balance::Leastconn, 4);
        assert_eq!(s.poll_grants(), vec![(w2, b(1))]);
        assert_eq!(s.servers()[0].active, 3);
    }

    #[test]
    fn no_server_queues_then_new_primary_releases_in_order() {
        let mut s = Selector::new(Balance::Leastconn, 320);
        let ids: Vec<_> = (0..3)
            .map(|_| match s.acquire(&[]) {
                Acquire::Queued(id) => id,
                g => panic!("{g:?}"),
            })
            .collect();
        s.update(&[b(2)], &[]);
        let grants = s.poll_grants();
        assert_eq!(grants.iter().map(|g| g.0).collect::<Vec<_>>(), ids);
    }

    #[test]
    fn drain_and_keep() {
        let mut s = Selector::new(Balance::Leastconn, 10);
        s.update(&[b(1)], &[]);
        granted(s.acquire(&[]));
        // Switchover pending: kept, not eligible.
        let u = s.update(&[], &[b(1)]);
        assert!(u.drained.is_empty());
        assert!(matches!(s.acquire(&[]), Acquire::Queued(_)));
        // Leader moved: b1 drained, b2 takes the waiter.
        let u = s.update(&[b(2)], &[b(2)]);
        assert_eq!(u.drained, vec![b(1)]);
        assert_eq!(s.poll_grants().len(), 1);
        assert_eq!(s.servers().len(), 2, "a draining server stays until its count is zero");
        s.release(&b(1));
        assert_eq!(s.servers().len(), 1);
    }

    #[test]
    fn avoid_skips_a_refusing_server() {
        let mut s = Selector::new(Balance::Leastconn, 10);
        s.update(&[b(1), b(2)], &[]);
        assert_eq!(granted(s.acquire(&[b(1)])), b(2));
        assert_eq!(granted(s.acquire(&[b(2)])), b(1));
        assert!(s.has_eligible_except(&[b(1)]));
        assert!(!s.has_eligible_except(&[b(1), b(2)]));
    }

    #[test]
    fn roundrobin_rotates_regardless_of_counts() {
        let mut s = Selector::new(Balance::Roundrobin, 10);
        s.update(&[b(1), b(2)], &[]);
        let got: Vec<_> = (0..4).map(|_| granted(s.acquire(&[])).addr.port()).collect();
        assert_eq!(got, vec![1, 2, 1, 2]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        Release(usize),
        Cancel(usize),
        Update(Vec<bool>, Vec<bool>),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Acquire),
            3 => (0usize..64).prop_map(Op::Release),
            1 => (0usize..64).prop_map(Op::Cancel),
            1 => (proptest::collection::vec(any::<bool>(), 4), proptest::collection::vec(any::<bool>(), 4))
                    .prop_map(|(e, k)| Op::Update(e, k)),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold(maxconn in 1u32..4, ops in proptest::collection::vec(arb_op(), 1..200), rr in any::<bool>()) {
            let mut s = Selector::new(if rr { Balance::Roundrobin } else { Balance::Leastconn }, maxconn);
            s.update(&[b(0), b(1)], &[]);
            let mut held: Vec<Backend> = Vec::new();
            let mut waiting: Vec<WaiterId> = Vec::new();
            let mut granted_order: Vec<WaiterId> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire => {
                        let before: HashMap<_, _> = s.servers().iter().map(|x| (x.backend.clone(), (x.active, x.state))).collect();
                        match s.acquire(&[]) {
                            Acquire::Granted(g) => {
                                prop_assert!(waiting.is_empty(), "granted past a waiter");
                                let (n, st) = before[&g];
                                prop_assert_eq!(st, ServerState::Eligible);
                                if !rr {
                                    let min = before.values().filter(|(a, st)| *st == ServerState::Eligible && *a < maxconn).map(|(a, _)| *a).min().unwrap();
                                    prop_assert_eq!(n, min);
                                }
                                held.push(g);
                            }
                            Acquire::Queued(id) => waiting.push(id),
                        }
                    }
                    Op::Release(i) if !held.is_empty() => {
                        let g = held.remove(i % held.len());
                        let gone = s.release(&g);
                        prop_assert_eq!(gone, !s.servers().iter().any(|x| x.backend == g), "release says whether the server is gone");
                    }
                    Op::Cancel(i) if !waiting.is_empty() => {
                        let id = waiting.remove(i % waiting.len());
                        prop_assert!(s.cancel(id));
                    }
                    Op::Update(e, k) => {
                        let pick = |m: &[bool]| (0..4).filter(|i| m[*i]).map(|i| b(i as u16)).collect::<Vec<_>>();
                        s.update(&pick(&e), &pick(&k));
                    }
                    _ => {}
                }
                for (id, g) in s.poll_grants() {
                    prop_assert_eq!(Some(&id), waiting.first(), "grants follow the queue order");
                    waiting.remove(0);
                    granted_order.push(id);
                    held.push(g);
                }
                for x in s.servers() {
                    prop_assert!(x.active <= maxconn);
                    let n = held.iter().filter(|h| **h == x.backend).count() as u32;
                    prop_assert_eq!(x.active, n, "counts are exact");
                }
                prop_assert_eq!(s.queue_len(), waiting.len());
            }
            prop_assert!(granted_order.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
