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
    pub async fn turn(self: &Arc<Self>, sequence: u64) -> Option<Turn> {
        if sequence == UNORDERED_SEQUENCE {
            return None;
        }
        let deadline = tokio::time::Instant::now() + self.wait_max;
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
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if let Ok(mut s) = self.state.lock()
                    && s.next < sequence
                {
                    tracing::warn!(
                        missing = s.next,
                        sequence,
                        "produce request never arrived; skipping it"
                    );
                    s.next = sequence;
                    s.done = s.done.split_off(&sequence);
                    s.advance();
                }
                break;
            }
        }
        Some(Turn {
            order: self.clone(),
            sequence,
        })
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
                let turn = order.turn(seq).await;
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
    async fn a_missing_request_is_skipped_after_the_wait() {
        let order = ProduceOrder::new(Duration::from_millis(500));
        // 0 never arrives.
        let turn = order.turn(1).await;
        assert!(turn.is_some());
        drop(turn);
        // 2 goes straight through now, and a late 0 does not wait either.
        tokio::time::timeout(Duration::from_millis(1), order.turn(2))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_millis(1), order.turn(0))
            .await
            .unwrap();
        assert!(order.turn(UNORDERED_SEQUENCE).await.is_none());
    }
}
