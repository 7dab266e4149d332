//! Keeps pipelined produce requests of one connection in the producer's order.
//!
//! Each produce request travels on its own QUIC stream, and streams are handled concurrently,
//! so two requests in flight to the same partition could be appended in either order. The
//! client numbers its produce requests per connection (`sequence` 0, 1, 2, ...); a request
//! waits here until every lower number has been handed to its partitions. A number that never
//! arrives (its stream was reset) is skipped after `wait_max`, so one lost request delays the
//! connection's later produces but cannot stall them for good; requests without a sequence
//! (`UNORDERED_SEQUENCE`) and other APIs never wait.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_proto::messages::UNORDERED_SEQUENCE;
use tokio::sync::Notify;

/// Furthest a produce `sequence` may run ahead of the next expected one. A client has at most
/// as many requests in flight as it has stream credit or permits, far fewer than this; a
/// sequence beyond it is a broken or hostile client and is refused at once rather than held.
pub const SEQUENCE_AHEAD_MAX: u64 = 65_536;

/// A produce `sequence` too far ahead of the next expected one.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "produce sequence {sequence} is more than {SEQUENCE_AHEAD_MAX} ahead of the next expected ({next})"
)]
pub struct SequenceTooFarAhead {
    /// The request's sequence.
    pub sequence: u64,
    /// The next sequence the connection expects.
    pub next: u64,
}

/// Per-connection ordering state.
#[derive(Debug)]
pub struct ProduceOrder {
    state: Mutex<OrderState>,
    notify: Notify,
    wait_max: Duration,
}

#[derive(Debug, Default)]
struct OrderState {
    /// The lowest sequence not yet handed over.
    next: u64,
    /// Sequences above `next` already handed over.
    done: BTreeSet<u64>,
    /// Sequences whose requests are waiting for their turn.
    waiting: BTreeSet<u64>,
}

impl OrderState {
    /// Moves `next` past every sequence already handed over.
    fn advance(&mut self) {
        while self.done.remove(&self.next) {
            self.next += 1;
        }
    }
}

/// The right to enqueue now; releases the next sequence when dropped.
#[derive(Debug)]
pub struct Turn {
    order: Arc<ProduceOrder>,
    sequence: u64,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.order.complete(self.sequence);
    }
}

impl ProduceOrder {
    /// Ordering state for a new connection; a missing sequence is skipped after `wait_max`.
    pub fn new(wait_max: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(OrderState::default()),
            notify: Notify::new(),
            wait_max,
        })
    }

    /// Waits until every request numbered below `sequence` was handed over (or skipped).
    ///
    /// When `wait_max` passes with a lower number still missing, the missing numbers below
    /// the lowest *waiting* request are skipped — never a request that did arrive, so waiting
    /// requests still go in sequence order.
    pub async fn turn(
        self: &Arc<Self>,
        sequence: u64,
    ) -> Result<Option<Turn>, SequenceTooFarAhead> {
        if sequence == UNORDERED_SEQUENCE {
            return Ok(None);
        }
        if let Ok(mut s) = self.state.lock() {
            if sequence > s.next.saturating_add(SEQUENCE_AHEAD_MAX) {
                return Err(SequenceTooFarAhead {
                    sequence,
                    next: s.next,
                });
            }
            s.waiting.insert(sequence);
        }
        let mut deadline = Some(tokio::time::Instant::now() + self.wait_max);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self
                .state
                .lock()
                .map(|s| s.next >= sequence)
                .unwrap_or(true)
            {
                break;
            }
            let Some(at) = deadline else {
                notified.await;
                continue;
            };
            if tokio::time::timeout_at(at, notified).await.is_err() {
                deadline = None;
                if let Ok(mut s) = self.state.lock() {
                    let lowest = s.waiting.first().copied().unwrap_or(sequence);
                    if s.next < lowest {
                        tracing::warn!(
                            missing_from = s.next,
                            missing_to = lowest,
                            "produce requests never arrived; skipping them"
                        );
                        s.next = lowest;
                        s.done = s.done.split_off(&lowest);
                        s.advance();
                    }
                }
                self.notify.notify_waiters();
            }
        }
        if let Ok(mut s) = self.state.lock() {
            s.waiting.remove(&sequence);
        }
        Ok(Some(Turn {
            order: self.clone(),
            sequence,
        }))
    }

    fn complete(&self, sequence: u64) {
        if let Ok(mut s) = self.state.lock() {
            if sequence < s.next {
                // Late (its turn was skipped): nothing waits on it.
                return;
            }
            s.done.insert(sequence);
            s.advance();
        }
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn later_requests_wait_for_earlier_ones() {
        let order = ProduceOrder::new(Duration::from_secs(10));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Arrive in reverse order; must be handed over 0, 1, 2, 3.
        for seq in (0..4u64).rev() {
            let (order, log) = (order.clone(), log.clone());
            tasks.push(tokio::spawn(async move {
                let turn = order.turn(seq).await.unwrap();
                log.lock().unwrap().push(seq);
                drop(turn);
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_skip_never_overtakes_a_request_that_arrived() {
        // 0 is missing; 2 arrives first (earlier deadline), then 1. After the wait, 1 must
        // still go before 2.
        let order = ProduceOrder::new(Duration::from_millis(500));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (o2, l2) = (order.clone(), log.clone());
        let two = tokio::spawn(async move {
            let t = o2.turn(2).await.unwrap();
            l2.lock().unwrap().push(2);
            drop(t);
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (o1, l1) = (order.clone(), log.clone());
        let one = tokio::spawn(async move {
            let t = o1.turn(1).await.unwrap();
            l1.lock().unwrap().push(1);
            drop(t);
        });
        two.await.unwrap();
        one.await.unwrap();
        assert_eq!(*log.lock().unwrap(), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_request_is_skipped_after_the_wait() {
        let order = ProduceOrder::new(Duration::from_millis(500));
        // 0 never arrives.
        let turn = order.turn(1).await.unwrap();
        assert!(turn.is_some());
        drop(turn);
        // 2 goes straight through now, and a late 0 does not wait either.
        tokio::time::timeout(Duration::from_millis(1), order.turn(2))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_millis(1), order.turn(0))
            .await
            .unwrap()
            .unwrap();
        assert!(order.turn(UNORDERED_SEQUENCE).await.unwrap().is_none());
        // A sequence absurdly far ahead is refused at once.
        assert!(order.turn(3 + SEQUENCE_AHEAD_MAX + 1).await.is_err());
    }
}
