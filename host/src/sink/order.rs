//! Commit order across parallel writers.
//!
//! Several writers (each its own connection) COPY batches at once, but a
//! batch commits only after the batch before it has: the committed
//! positions then always describe a prefix of the input, so a crash at
//! any moment loses and doubles nothing. Each batch gets a [`Turn`]: it
//! waits for its predecessor's turn to pass before COMMIT, and passes its
//! own once committed. A turn dropped without passing (the batch failed
//! for good) fails every later batch in flight instead.
//!
//! Two batches in flight may hold the same `event_id` (a duplicate that no
//! stage dropped). If the later batch inserted it first, the earlier one's
//! COPY waits for the later's transaction while the later waits for the
//! earlier's commit: a deadlock PostgreSQL cannot see, since half of it is
//! here. A writer waiting for its turn therefore checks now and then
//! whether it blocks the session of an earlier batch, and if so rolls back
//! ([`SinkError::Yielded`]) and writes its batch again once its turn comes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_postgres::Transaction;

use super::SinkError;

/// How long a writer waits for its turn between checks that it blocks no
/// earlier batch: rare, and a deadlock costs at most this.
const BLOCK_CHECK: Duration = Duration::from_millis(200);

/// Hands out the turns, one per batch, in batch order.
#[derive(Default)]
pub struct Order {
    next: u64,
    last: Option<oneshot::Receiver<()>>,
    sessions: Sessions,
}

impl Order {
    pub fn next_turn(&mut self) -> Turn {
        let (pass, passed) = oneshot::channel();
        let turn = Turn {
            seq: self.next,
            predecessor: self.last.replace(passed),
            successor: Some(pass),
            sessions: self.sessions.clone(),
        };
        self.next += 1;
        turn
    }
}

/// The server sessions (pids) of the batches in an open transaction, by
/// batch: what a waiting writer checks it does not block.
#[derive(Clone, Default)]
struct Sessions(Arc<Mutex<BTreeMap<u64, i32>>>);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, i32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One batch's place in the commit order.
pub struct Turn {
    seq: u64,
    /// Passed when the batch before has committed; `None` once it has.
    predecessor: Option<oneshot::Receiver<()>>,
    successor: Option<oneshot::Sender<()>>,
    sessions: Sessions,
}

impl Turn {
    /// The batch's number in the order.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Notes the session this batch's transaction runs in.
    pub fn begun(&self, pid: i32) {
        self.sessions.lock().insert(self.seq, pid);
    }

    /// Waits until the batch before has committed (or was set aside: a
    /// lost lease). Fails when it failed for good.
    pub async fn wait(&mut self) -> Result<(), SinkError> {
        let Some(passed) = self.predecessor.as_mut() else {
            return Ok(());
        };
        let result = passed.await;
        self.predecessor = None;
        result.map_err(|_| SinkError::Aborted)
    }

    /// `wait`, inside the batch's open transaction on session `pid`: gives
    /// the transaction up (`Yielded`) if it blocks an earlier batch's.
    pub async fn wait_in(&mut self, tx: &Transaction<'_>, pid: i32) -> Result<(), SinkError> {
        let Some(mut passed) = self.predecessor.take() else {
            return Ok(());
        };
        tracing::debug!(
            batch = self.seq,
            "batch copied; its commit waits for the batch before it"
        );
        loop {
            tokio::select! {
                result = &mut passed => return result.map_err(|_| SinkError::Aborted),
                () = tokio::time::sleep(BLOCK_CHECK) => {
                    match self.blocks_earlier(tx, pid).await {
                        Ok(false) => {}
                        Ok(true) => {
                            self.predecessor = Some(passed);
                            return Err(SinkError::Yielded);
                        }
                        Err(e) => {
                            self.predecessor = Some(passed);
                            return Err(e.into());
                        }
                    }
                }
            }
        }
    }

    /// Whether session `pid` blocks the session of an earlier batch.
    async fn blocks_earlier(
        &self,
        tx: &Transaction<'_>,
        pid: i32,
    ) -> Result<bool, tokio_postgres::Error> {
        let earlier: Vec<i32> = self
            .sessions
            .lock()
            .range(..self.seq)
            .map(|(_, pid)| *pid)
            .collect();
        if earlier.is_empty() {
            return Ok(false);
        }
        Ok(tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM unnest($1::int4[]) AS p WHERE $2 = ANY (pg_blocking_pids(p)))",
                &[&earlier, &pid],
            )
            .await?
            .get(0))
    }

    /// The batch is committed (or set aside): the next one may commit.
    pub fn pass(&mut self) {
        self.sessions.lock().remove(&self.seq);
        if let Some(pass) = self.successor.take() {
            let _ = pass.send(());
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.sessions.lock().remove(&self.seq);
    }
}

/// Test hook (`PIPELINE_TEST_HOLD_COMMIT_MS`): how long each batch's
/// COMMIT is held once its turn has come, so that a test can kill the
/// host while later batches are copied and wait for it.
pub fn test_hold() -> Option<Duration> {
    static HOLD: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *HOLD.get_or_init(|| {
        std::env::var("PIPELINE_TEST_HOLD_COMMIT_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_pass_in_order_and_a_failed_turn_fails_the_next() {
        let mut order = Order::default();
        let mut a = order.next_turn();
        let mut b = order.next_turn();
        let mut c = order.next_turn();
        assert!(a.wait().await.is_ok(), "the first turn waits for nothing");
        let waiting = tokio::spawn(async move { b.wait().await.map(|()| b) });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "b waits for a");
        a.pass();
        let b = waiting.await.unwrap().expect("b's turn after a passed");
        drop(b);
        assert!(
            matches!(c.wait().await, Err(SinkError::Aborted)),
            "b dropped without passing: c must not commit"
        );
    }
}
