//! The shared-stream source (`--input nats://HOST:PORT/STREAM`): reads
//! the partitions this host holds a lease on (see `lease`) from their
//! JetStream consumers, one CSV line per message, and hands the pipeline
//! one batch per partition at a time, each carrying the partition, its
//! lease epoch and the stream sequence of its last message.
//!
//! Exactly once rests on the database, not on NATS: the sink commits a
//! batch's rows, its partition's sequence and stage state together, under
//! the lease; only then is the batch acked (`Feedback::Committed`). On
//! taking a partition the host starts a consumer right after the
//! committed sequence and skips anything at or below what it has taken,
//! so a late, lost or repeated ack changes nothing but redelivery.
//!
//! One task does it all (leases, fetches, acks), so a batch waiting for
//! the pipeline never holds back a lease renewal.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::lease::{Holder, Leases, Taken};
use crate::batch::{Batch, FileRef, Malformed, Origin, PartitionMark};
use crate::jetstream::{self as js, NatsError, NatsUrl};
use crate::metrics;
use crate::parse::MessageParser;
use crate::sink::SinkError;

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: NatsUrl,
    pub database_url: String,
    pub host: String,
    /// P, if this host creates the stream.
    pub partitions: u32,
    pub lease: Duration,
    pub batch_size: usize,
    pub once: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsSourceError {
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("partition leases: {0}")]
    Lease(#[from] SinkError),
}

/// What the pipeline tells the source about a batch it handed over.
#[derive(Debug)]
pub enum Feedback {
    /// Committed: ack it.
    Committed(PartitionMark),
    /// Its lease was gone at commit: stop reading the partition.
    Lost { partition: u32, epoch: i64 },
}

/// One partition as status shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    pub owner: Option<String>,
    /// Whether the owner's lease runs.
    pub live: bool,
    pub committed_seq: u64,
    /// Messages of it not yet delivered to this host (when it holds it).
    pub pending: u64,
    /// Messages delivered again that this host had already taken.
    pub redelivered: u64,
}

/// The partitions of the stream, shared with status and metrics.
#[derive(Debug, Default)]
pub struct StreamStatus {
    pub stream: String,
    pub host: String,
    pub partitions: BTreeMap<u32, PartitionStatus>,
}

pub type SharedStatus = Arc<Mutex<StreamStatus>>;

/// What the source did, for the summary of `--once`.
#[derive(Debug, Default)]
pub struct Summary {
    /// Partitions this host held at the end.
    pub held: Vec<u32>,
    /// Partitions a live host held, left to it.
    pub left: Vec<(u32, String)>,
}

struct Part {
    epoch: i64,
    consumer: PullConsumer,
    /// The last sequence put into a batch (or committed, at the start).
    taken: u64,
    committed: u64,
    restore: Option<Vec<(String, Vec<u8>)>>,
    /// The last fetch found nothing.
    empty: bool,
    /// A fetch broke off: messages delivered and not received would come
    /// back only after the ack wait, behind later ones, so the consumer is
    /// started again right after `taken` before the next fetch.
    restart: bool,
    pending: u64,
    redelivered: u64,
}

/// Started by the pipeline; ends when `shutdown` is set, or with
/// `--once` when every partition it holds is read and committed.
pub struct NatsSource {
    config: NatsConfig,
    client: async_nats::Client,
    stream: stream::Stream,
    name: Arc<str>,
    leases: Leases,
    parts: BTreeMap<u32, Part>,
    feedback: mpsc::UnboundedReceiver<Feedback>,
    shutdown: Arc<AtomicBool>,
    status: SharedStatus,
    started: Instant,
    next_round: Instant,
    /// With `--once`: taking partitions is over (all taken, or the lease
    /// time waited for those held elsewhere).
    settled: bool,
    /// With `--once`: partitions lost during the run (a stall past the
    /// lease, say), to be taken again unless a live host now holds them:
    /// until then the run is not done.
    lost: BTreeSet<u32>,
}

impl NatsSource {
    /// Connects to NATS (creating the stream if missing) and to the
    /// database (creating the partition rows). Returns the source, where
    /// the pipeline sends feedback, and the status it keeps.
    pub async fn connect(
        config: NatsConfig,
        shutdown: Arc<AtomicBool>,
    ) -> Result<(NatsSource, mpsc::UnboundedSender<Feedback>, SharedStatus), NatsSourceError> {
        let client = js::connect(&config.url.server, |event| {
            let m = metrics::global();
            match event {
                async_nats::Event::Connected => {
                    tracing::info!("NATS connection up");
                    m.set_problem("nats", None);
                }
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS connection lost; reconnecting");
                    m.set_problem("nats", Some("NATS connection lost; reconnecting".into()));
                }
                other => tracing::debug!("NATS: {other}"),
            }
        })
        .await?;
        let context = jetstream::new(client.clone());
        let (stream, partitions) =
            js::ensure_stream(&context, &config.url.stream, config.partitions).await?;
        if partitions != config.partitions {
            tracing::info!(
                stream = %config.url.stream,
                partitions,
                "stream found with {partitions} partitions (fixed when it was created)"
            );
        }
        let leases = Leases::connect(
            &config.database_url,
            &config.url.stream,
            &config.host,
            partitions,
            config.lease,
        )
        .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(StreamStatus {
            stream: config.url.stream.clone(),
            host: config.host.clone(),
            partitions: (0..partitions)
                .map(|p| {
                    (
                        p,
                        PartitionStatus {
                            partition: p,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }));
        let now = Instant::now();
        let name = Arc::from(config.url.stream.as_str());
        Ok((
            NatsSource {
                config,
                client,
                stream,
                name,
                leases,
                parts: BTreeMap::new(),
                feedback: rx,
                shutdown,
                status: status.clone(),
                started: now,
                next_round: now,
                settled: false,
                lost: BTreeSet::new(),
            },
            tx,
            status,
        ))
    }

    /// Reads until shutdown (or the end of `--once`); the batches go to
    /// `tx`. Gives its partitions back at the end: the pipeline commits
    /// what is in flight afterwards, which a successor would not see...
    /// so it only gives them back through `finish`, after the last commit.
    pub async fn run(mut self, tx: mpsc::Sender<Batch>) -> NatsSource {
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                break;
            }
            self.take_feedback();
            if Instant::now() >= self.next_round {
                self.lease_round().await;
            }
            if self.config.once && self.settled && self.drained() {
                tracing::info!("every partition held is read and committed");
                break;
            }
            let mut read_any = false;
            let partitions: Vec<u32> = self.parts.keys().copied().collect();
            for p in partitions {
                if self.shutdown.load(Ordering::Relaxed) {
                    break;
                }
                let Some(batch) = self.fetch(p).await else {
                    continue;
                };
                read_any = true;
                if !self.send(&tx, batch).await {
                    return self;
                }
                self.take_feedback();
            }
            if !read_any {
                let wait = self
                    .next_round
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    feedback = self.feedback.recv() => {
                        if let Some(f) = feedback { self.apply(f); }
                    }
                }
            }
        }
        self
    }

    /// Sends a batch, doing lease rounds while the pipeline is busy.
    /// Returns false when the pipeline is gone.
    async fn send(&mut self, tx: &mpsc::Sender<Batch>, batch: Batch) -> bool {
        let send = tx.send(batch);
        tokio::pin!(send);
        loop {
            let until = tokio::time::Instant::from_std(self.next_round);
            tokio::select! {
                sent = &mut send => return sent.is_ok(),
                () = tokio::time::sleep_until(until) => self.lease_round().await,
            }
        }
    }

    fn take_feedback(&mut self) {
        while let Ok(f) = self.feedback.try_recv() {
            self.apply(f);
        }
    }

    fn apply(&mut self, feedback: Feedback) {
        match feedback {
            Feedback::Committed(mark) => {
                if let Some(part) = self.parts.get_mut(&mark.partition) {
                    if part.epoch == mark.epoch {
                        part.committed = part.committed.max(mark.seq);
                    }
                }
                if let Ok(mut s) = self.status.lock() {
                    if let Some(p) = s.partitions.get_mut(&mark.partition) {
                        p.committed_seq = p.committed_seq.max(mark.seq);
                    }
                }
                // Acks only spare redelivery: the committed sequence is the
                // truth, so a lost ack costs nothing but a skipped message.
                if let Some(reply) = mark.ack {
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.publish(reply, "+ACK".into()).await {
                            tracing::debug!("ack not sent: {e}");
                        }
                    });
                }
            }
            Feedback::Lost { partition, epoch } => {
                if self.parts.get(&partition).is_some_and(|p| p.epoch == epoch) {
                    tracing::warn!(
                        partition,
                        epoch,
                        "partition lost (its lease was taken or ran out): no longer reading it"
                    );
                    self.parts.remove(&partition);
                    if self.config.once {
                        self.lost.insert(partition);
                    }
                }
            }
        }
    }

    /// `--once`: nothing left to read in any partition held, and all of
    /// it committed.
    fn drained(&self) -> bool {
        self.lost.is_empty()
            && self
                .parts
                .values()
                .all(|p| p.empty && p.committed >= p.taken)
    }

    /// Renews the leases, gives up the ones lost, and takes or gives back
    /// partitions to hold this host's share of them.
    async fn lease_round(&mut self) {
        let lease = self.config.lease;
        self.next_round = Instant::now() + lease / 3;
        let timeout = (lease / 3).max(Duration::from_secs(1));
        match tokio::time::timeout(timeout, self.try_lease_round()).await {
            Ok(Ok(())) => metrics::global().set_problem("leases", None),
            Ok(Err(e)) => {
                tracing::warn!("partition leases: {e}");
                metrics::global().set_problem("leases", Some(format!("partition leases: {e}")));
            }
            Err(_) => {
                tracing::warn!("partition leases: no answer within {timeout:?}");
            }
        }
    }

    async fn try_lease_round(&mut self) -> Result<(), SinkError> {
        let live = self.leases.heartbeat().await?;
        let held: Vec<(u32, i64)> = self.parts.iter().map(|(p, s)| (*p, s.epoch)).collect();
        let still = self.leases.renew(&held).await?;
        for (p, epoch) in held {
            if !still.contains(&p) {
                self.apply(Feedback::Lost {
                    partition: p,
                    epoch,
                });
            }
        }
        let total = self.status.lock().map(|s| s.partitions.len()).unwrap_or(0);
        let want = if self.config.once {
            if !self.settled {
                total.saturating_sub(self.parts.len())
            } else {
                self.lost.len()
            }
        } else {
            self.leases.share(live).saturating_sub(self.parts.len())
        };
        for taken in self.leases.take(want).await? {
            self.start_partition(taken).await;
        }
        if self.config.once {
            // A dead owner's lease runs out within the lease time.
            self.settled =
                self.parts.len() >= total || self.started.elapsed() > lease_wait(self.config.lease);
        } else {
            let share = self.leases.share(live);
            while self.parts.len() > share {
                let Some((&p, part)) = self.parts.iter().next_back() else {
                    break;
                };
                let epoch = part.epoch;
                self.leases.release(p, epoch).await?;
                tracing::info!(
                    partition = p,
                    live_hosts = live,
                    "partition given back: more than this host's share"
                );
                self.parts.remove(&p);
            }
        }
        let holders = self.leases.holders().await?;
        if !self.lost.is_empty() {
            // A lost partition another live host holds is left to it.
            let me = self
                .status
                .lock()
                .map(|s| s.host.clone())
                .unwrap_or_default();
            self.lost.retain(|&p| {
                !holders
                    .iter()
                    .any(|h| h.partition == p && h.live && h.host.as_deref() != Some(me.as_str()))
            });
        }
        self.publish_status(&holders);
        Ok(())
    }

    async fn start_partition(&mut self, taken: Taken) {
        let Taken {
            partition,
            epoch,
            committed,
            states,
        } = taken;
        match js::partition_consumer(&self.stream, &self.name, partition, epoch, committed).await {
            Ok(consumer) => {
                tracing::info!(
                    partition,
                    epoch,
                    committed,
                    "partition taken: reading after its committed sequence"
                );
                self.lost.remove(&partition);
                self.parts.insert(
                    partition,
                    Part {
                        epoch,
                        consumer,
                        taken: committed,
                        committed,
                        restore: Some(states),
                        empty: false,
                        restart: false,
                        pending: 0,
                        redelivered: 0,
                    },
                );
            }
            Err(e) => {
                // The lease runs out and another host (or this one) takes
                // it again.
                tracing::warn!(partition, "cannot start reading the partition: {e}");
                let _ = self.leases.release(partition, epoch).await;
            }
        }
    }

    fn publish_status(&self, holders: &[Holder]) {
        let Ok(mut s) = self.status.lock() else {
            return;
        };
        let stream = s.stream.clone();
        for h in holders {
            let entry = s.partitions.entry(h.partition).or_default();
            entry.partition = h.partition;
            entry.owner = h.host.clone();
            entry.live = h.live;
            entry.committed_seq = h.committed_seq;
            match self.parts.get(&h.partition) {
                Some(part) => {
                    entry.pending = part.pending;
                    entry.redelivered = part.redelivered;
                }
                None => entry.pending = 0,
            }
        }
        let gauges = s
            .partitions
            .values()
            .map(|p| metrics::PartitionGauge {
                stream: stream.clone(),
                partition: p.partition,
                owner: p.owner.clone().filter(|_| p.live).unwrap_or_default(),
                pending: p.pending,
                redelivered: p.redelivered,
                committed_seq: p.committed_seq,
            })
            .collect();
        metrics::global().set_partitions(gauges);
    }

    /// One batch of partition `p`: what its consumer has now, up to the
    /// batch size. `None` when it has nothing new.
    async fn fetch(&mut self, p: u32) -> Option<Batch> {
        let batch_size = self.config.batch_size;
        let name = self.name.clone();
        if self.parts.get(&p)?.restart {
            let (epoch, taken) = self.parts.get(&p).map(|x| (x.epoch, x.taken))?;
            // Bounded like a fetch: during an outage each JetStream request
            // would wait for the client's own timeout, holding back the
            // lease renewals.
            let again = js::partition_consumer(&self.stream, &name, p, epoch, taken);
            match bounded(tokio::time::timeout(self.config.lease / 3, again).await) {
                Ok(consumer) => {
                    let part = self.parts.get_mut(&p)?;
                    part.consumer = consumer;
                    part.restart = false;
                }
                Err(e) => {
                    tracing::debug!(partition = p, "cannot start the consumer again: {e}");
                    return None;
                }
            }
        }
        // A pull request the server never answers (it restarted, or the
        // consumer was deleted by a host that took the partition over)
        // would leave the fetch waiting for ever: the client sets no timer
        // of its own on a no-wait fetch. So the fetch gets a deadline well
        // inside a lease round, and what it has by then is its batch.
        let deadline = tokio::time::Instant::now() + fetch_deadline(self.config.lease);
        let part = self.parts.get_mut(&p)?;
        let messages = tokio::time::timeout_at(
            deadline,
            part.consumer.fetch().max_messages(batch_size).messages(),
        )
        .await;
        let mut messages = match bounded(messages) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(partition = p, "fetch failed: {e}");
                part.empty = false;
                part.restart = true;
                return None;
            }
        };
        let file: Arc<str> = Arc::from(js::subject(&name, p));
        // A message is known by its subject and stream sequence (its
        // "line"): a redelivered bad message is not quarantined twice.
        let source = FileRef {
            key: file.clone(),
            fingerprint: 0,
        };
        let opened = Instant::now();
        let mut events = Vec::new();
        let mut origins = Vec::new();
        let mut malformed = Vec::new();
        let mut last_reply = None;
        let mut last_seq = part.taken;
        let mut parser = MessageParser::default();
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, messages.next()).await else {
                tracing::debug!(partition = p, "fetch not finished in time");
                part.restart = true;
                break;
            };
            let Some(message) = next else { break };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(partition = p, "fetch broke off: {e}");
                    part.restart = true;
                    break;
                }
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let seq = info.stream_sequence;
            part.pending = info.pending;
            if seq <= last_seq {
                // Taken before (a redelivery): committed, or in flight.
                part.redelivered += 1;
                continue;
            }
            last_seq = seq;
            last_reply = message.reply.as_ref().map(|r| r.to_string());
            parser.parse(&message.payload, seq, |parsed| match parsed.result {
                Ok(event) => {
                    events.push(event);
                    origins.push(Origin {
                        file: file.clone(),
                        line: seq,
                        source: source.clone(),
                    });
                }
                Err(mut row) => {
                    row.line = seq;
                    malformed.push(Malformed {
                        file: file.clone(),
                        source: source.clone(),
                        row,
                    });
                }
            });
        }
        if last_seq == part.taken {
            part.empty = !part.restart;
            part.pending = 0;
            return None;
        }
        part.empty = false;
        part.taken = last_seq;
        Some(Batch {
            id: uuid::Uuid::new_v4(),
            events,
            origins,
            malformed,
            positions: BTreeMap::new(),
            forget: Vec::new(),
            opened,
            read_time: opened.elapsed(),
            partition: Some(PartitionMark {
                stream: name,
                partition: p,
                epoch: part.epoch,
                seq: last_seq,
                ack: last_reply,
                restore: part.restore.take(),
            }),
        })
    }

    /// After the last commit: gives every partition back and leaves, so
    /// that the others take them at once; returns what `--once` prints.
    pub async fn finish(mut self) -> Summary {
        self.take_feedback();
        let mut summary = Summary::default();
        for (p, part) in std::mem::take(&mut self.parts) {
            summary.held.push(p);
            if let Err(e) = self.leases.release(p, part.epoch).await {
                tracing::warn!(
                    partition = p,
                    "cannot give the partition back ({e}): its lease runs out by itself"
                );
            }
        }
        let _ = self.leases.leave().await;
        if let Ok(holders) = self.leases.holders().await {
            summary.left = holders
                .into_iter()
                .filter(|h| h.live && !summary.held.contains(&h.partition))
                .filter_map(|h| h.host.map(|host| (h.partition, host)))
                .collect();
        }
        let _ = self.client.flush().await;
        summary
    }
}

/// A NATS call under a deadline, its two ways of failing as one message.
fn bounded<T, E: std::fmt::Display>(
    result: Result<Result<T, E>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match result {
        Ok(inner) => inner.map_err(|e| e.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

/// How long one fetch may take: a third of a lease round, so that a
/// fetch the server never answers cannot starve the lease renewals.
fn fetch_deadline(lease: Duration) -> Duration {
    (lease / 9).clamp(Duration::from_millis(300), Duration::from_secs(3))
}

/// How long `--once` waits for partitions another host holds: a dead
/// one's lease runs out within the lease time.
fn lease_wait(lease: Duration) -> Duration {
    lease + lease / 2
}
