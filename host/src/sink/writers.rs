//! Parallel writers: `--writers N` sinks, each on its own connection and
//! task, fed batches in turn. Their rows go in at once; their commits go
//! in batch order (see `order`), and so do their results.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::order::{Order, Turn};
use super::{Commit, Committed, Sink, SinkError};

/// What a writer hands back: the batch, and what committing it came to.
pub type Done = (Commit, Result<Committed, SinkError>);

struct Job {
    commit: Commit,
    turn: Turn,
    reply: oneshot::Sender<Done>,
}

pub struct Writers {
    jobs: Vec<mpsc::Sender<Job>>,
    next: usize,
    order: Order,
    /// Replies to come, in batch order, with each batch's (rows_in, events).
    in_flight: VecDeque<(oneshot::Receiver<Done>, (usize, usize))>,
}

impl Writers {
    /// `first` and `count - 1` more connections beside it.
    pub async fn start(
        first: Sink,
        count: usize,
        patience: Duration,
    ) -> Result<Writers, SinkError> {
        let mut sinks = Vec::with_capacity(count.max(1));
        for _ in 1..count {
            sinks.push(first.secondary(patience).await?);
        }
        sinks.insert(0, first);
        let jobs = sinks
            .into_iter()
            .map(|sink| {
                // One job at a time each: at most `count` batches in flight.
                let (tx, rx) = mpsc::channel(1);
                tokio::spawn(run(sink, rx));
                tx
            })
            .collect();
        Ok(Writers {
            jobs,
            next: 0,
            order: Order::default(),
            in_flight: VecDeque::new(),
        })
    }

    /// Whether a writer is free for another batch.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.jobs.len()
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The batches in flight: how many, their rows and events.
    pub fn in_flight(&self) -> Option<(usize, usize)> {
        (!self.in_flight.is_empty()).then(|| {
            self.in_flight
                .iter()
                .fold((0, 0), |(r, e), (_, (rows, events))| (r + rows, e + events))
        })
    }

    /// Hands `commit` to the next writer. Writers take batches in turn
    /// and results are taken in order, so that one is free by now.
    pub async fn send(&mut self, commit: Commit) {
        let (reply, done) = oneshot::channel();
        let size = (commit.rows_in, commit.events.len());
        let job = Job {
            commit,
            turn: self.order.next_turn(),
            reply,
        };
        // A writer gone (it panicked) drops the reply: `next` reports it.
        let _ = self.jobs[self.next].send(job).await;
        self.next = (self.next + 1) % self.jobs.len();
        self.in_flight.push_back((done, size));
    }

    /// The oldest batch's result, once it is committed (or failed). Cancel
    /// safe; never resolves while nothing is in flight.
    pub async fn next(&mut self) -> Result<Done, SinkError> {
        let Some((done, _)) = self.in_flight.front_mut() else {
            return std::future::pending().await;
        };
        let result = done.await;
        self.in_flight.pop_front();
        result.map_err(|_| SinkError::Shutdown)
    }
}

/// One writer: its batches in, their results out; between batches it
/// replaces a connection found dead, so that an idle host's `/healthz`
/// tells how its database is.
async fn run(mut sink: Sink, mut jobs: mpsc::Receiver<Job>) {
    let mut check = tokio::time::interval(Duration::from_secs(5));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            job = jobs.recv() => {
                let Some(Job { commit, mut turn, reply }) = job else { return };
                let result = sink.commit(&commit, &mut turn).await;
                // A batch of a lost partition is set aside, not failed: the
                // batches after it (of other partitions) may commit.
                if matches!(result, Ok(_) | Err(SinkError::LeaseLost { .. })) {
                    turn.pass();
                }
                let _ = reply.send((commit, result));
            }
            _ = check.tick() => sink.check_connection().await,
        }
    }
}
