//! The PostgreSQL sink: one transaction per batch holding its rows, its
//! quarantined records, the file positions it reached, stage snapshots
//! (when due) and a batch record. Either all of it is committed or none.
//!
//! Rows go by binary COPY straight into `ecommerce_events`: the fast path,
//! as fast as PostgreSQL can load. A batch that holds a row the table
//! already has (only a replay after a crash, or a duplicate a stage let
//! through, can) fails that COPY with a unique violation; the transaction
//! is then rolled back and the batch goes by binary COPY into a
//! per-connection staging table and `INSERT .. ON CONFLICT (event_id) DO
//! NOTHING`, so the row is never doubled. After a conflict the next
//! batches take the staging path directly: conflicts come in runs (a
//! replay), and a failed COPY wastes the work it did.
//!
//! What happens on an error depends on what it means (`fault`). When the
//! database is unreachable the sink keeps the batch, retries with capped
//! exponential backoff and jitter, and reports itself unhealthy with the
//! database's own message; upstream stops at the bounded channels
//! meanwhile. When a connection breaks during COMMIT, the batch's unique
//! id tells whether the commit went through. When the database refuses a
//! value of the batch, the sink bisects it inside one transaction (a
//! savepoint per part), quarantines the rows it refuses with the SQLSTATE
//! and message, and commits the rest with the batch's positions.

pub mod columns;
pub mod copy;
pub mod fault;
pub mod order;
pub mod plugin_records;
pub mod schema;
pub mod writers;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use rand::RngExt;
use serde_json::json;
use tokio_postgres::{Client, NoTls, Statement, Transaction};

use crate::batch::{FileRef, Malformed, Origin, PartitionMark, Position};
use crate::checkpoint::{self, Checkpoint};
use crate::metrics::{self, Metrics};
use crate::stage::chain::{StageRejection, StageRun, StageSnapshot};
use crate::stage::events::PluginEvent;
use crate::stage::shadow::ShadowDiff;
use crate::stage::Event;
use fault::{describe, Fault};
use order::Turn;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot connect to PostgreSQL at {url}: {}", describe(.source))]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the commit did not finish within {0:?} (a dead connection or a blocked table): reconnecting")]
    Timeout(Duration),
    #[error("another host holds this database's pipeline lock (pg_advisory_lock {0}); stop it first or use another database")]
    Locked(i64),
    #[error("shutting down before the batch could be committed")]
    Shutdown,
    #[error("another host took this database over since this one started (its generation {mine}, the database's now {now}): what this host read before may be committed already. It stops here; start it again to resume from what is committed")]
    Fenced { mine: i64, now: i64 },
    #[error("partition {partition} of stream {stream} is no longer this host's (lease epoch {epoch} lost or expired): its batch is not committed; the partition's new owner reads it from the last committed sequence")]
    LeaseLost {
        stream: String,
        partition: u32,
        epoch: i64,
    },
    #[error("an earlier batch in flight was not committed, so this one is not either (commits keep the input's order)")]
    Aborted,
    #[error("the batch held a row an earlier batch in flight was waiting for: rolled back, to be written again after it")]
    Yielded,
    #[error("the batch would move {count} committed file position(s) backwards (the database is ahead of this host's view of its input): nothing is committed; start the host again to resume from what is committed")]
    Backwards { count: usize },
}

impl SinkError {
    /// What the error means for the batch (see `fault`).
    pub fn fault(&self) -> Fault {
        match self {
            SinkError::Db(e) | SinkError::Connect { source: e, .. } => Fault::of(e),
            SinkError::Timeout(_) | SinkError::Locked(_) | SinkError::Yielded => Fault::Transient,
            SinkError::Shutdown
            | SinkError::Aborted
            | SinkError::Fenced { .. }
            | SinkError::Backwards { .. }
            | SinkError::LeaseLost { .. } => Fault::Persistent,
        }
    }

    /// Whether retrying can never help: this host's view is stale.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SinkError::Fenced { .. } | SinkError::Backwards { .. })
    }
}

/// Everything one batch commits.
#[derive(Debug, Default)]
pub struct Commit {
    pub id: uuid::Uuid,
    pub opened: Option<Instant>,
    /// Time the source spent reading and parsing the batch.
    pub read_time: Duration,
    pub rows_in: usize,
    pub events: Vec<Event>,
    pub malformed: Vec<Malformed>,
    /// Stage rejections and failures, with where the event came from.
    pub rejections: Vec<(StageRejection, Option<Origin>)>,
    /// Where each event read into the batch came from, by event id: for
    /// the rows the database refuses (looked up only then).
    pub origins: Vec<(String, Origin)>,
    pub dropped: usize,
    pub positions: Vec<Position>,
    /// Keys of positions to delete: files gone for the grace period.
    pub forget: Vec<String>,
    pub stages: Vec<StageRun>,
    pub snapshots: Vec<StageSnapshot>,
    /// Shadow comparisons of this batch.
    pub shadow_diffs: Vec<ShadowDiff>,
    /// Plugin events since the last batch.
    pub plugin_events: Vec<PluginEvent>,
    /// The partition of a shared stream the batch was read from.
    pub partition: Option<PartitionMark>,
}

/// Counts of a committed batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Committed {
    pub batch_id: i64,
    pub written: u64,
    pub conflicting: u64,
    /// Rows the database refused, quarantined as `refused`.
    pub refused: u64,
}

pub struct Sink {
    url: String,
    /// The connection and the statements prepared on it: they come and
    /// go together.
    conn: Option<(Client, Statements)>,
    /// Batches still to send through staging after the last conflict.
    staging_for: u32,
    /// Taken with the lock at the first connection: every commit checks
    /// that the database's is still this one (see `schema`, migration 2).
    generation: Option<i64>,
    /// The server session of the last connection (pid, start time): a
    /// connection given up as dead may live on in the server, holding the
    /// lock and the rows of its open transaction, for as long as the
    /// server's own keepalive takes. The next connection ends it.
    session: Option<(i32, String)>,
    /// Written into every batch record (`--host-id`).
    host: Option<String>,
    /// Whether this connection takes the host lock: the first writer's
    /// does; the others share its generation, which every commit checks.
    takes_lock: bool,
    /// Set when hosts share the database by partitions of a stream (see
    /// `source::lease`) rather than by the host lock: no lock, no
    /// generation, and the server aborts a transaction left idle this
    /// long (a stalled host must not hold a partition's row).
    shared: Option<Duration>,
}

/// How many batches go through staging after a conflict on the fast path.
const STAGING_AFTER_CONFLICT: u32 = 8;

impl Sink {
    /// Connects, creates the schema if absent and takes the host lock.
    /// Retries until `patience` runs out: the server may be starting.
    pub async fn connect(url: &str, patience: Duration) -> Result<Sink, SinkError> {
        Sink::connect_as(url, patience, None, None).await
    }

    /// `connect`, naming `host` in the batch records; with `shared` the
    /// host lock is not taken (see the field).
    pub async fn connect_as(
        url: &str,
        patience: Duration,
        host: Option<String>,
        shared: Option<Duration>,
    ) -> Result<Sink, SinkError> {
        let mut sink = Sink {
            url: url.to_owned(),
            conn: None,
            staging_for: 0,
            generation: None,
            session: None,
            host,
            shared,
            takes_lock: true,
        };
        sink.reconnect_within(patience).await?;
        Ok(sink)
    }

    /// Another writer beside this one: its own connection, without the
    /// host lock, committing under this one's generation.
    pub async fn secondary(&self, patience: Duration) -> Result<Sink, SinkError> {
        let mut sink = Sink {
            url: self.url.clone(),
            conn: None,
            staging_for: 0,
            generation: self.generation,
            session: None,
            host: self.host.clone(),
            shared: self.shared,
            takes_lock: false,
        };
        sink.reconnect_within(patience).await?;
        Ok(sink)
    }

    /// Connects, retrying until `patience` runs out: the server may be
    /// starting, and a host killed a moment ago may still hold the lock
    /// until the server notices its connection is gone.
    async fn reconnect_within(&mut self, patience: Duration) -> Result<(), SinkError> {
        let deadline = Instant::now() + patience;
        let mut backoff = Backoff::default();
        loop {
            match self.reconnect().await {
                Ok(()) => return Ok(()),
                Err(e @ (SinkError::Connect { .. } | SinkError::Locked(_)))
                    if Instant::now() < deadline =>
                {
                    tracing::warn!("{e}; retrying");
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), SinkError> {
        self.conn = None;
        let connect_error = |source| SinkError::Connect {
            url: redact(&self.url),
            source,
        };
        let config = connection_config(&self.url).map_err(connect_error)?;
        let (client, connection) = config.connect(NoTls).await.map_err(connect_error)?;
        tokio::spawn(drive(connection));
        if let Some((pid, started)) = self.session.take() {
            let ended: Option<bool> = client
                .query_opt(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE pid = $1 AND backend_start::text = $2",
                    &[&pid, &started],
                )
                .await?
                .map(|r| r.get(0));
            if ended == Some(true) {
                tracing::warn!(
                    pid,
                    "ended this host's previous database session, which the server still kept"
                );
            }
        }
        let row = client
            .query_one(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        self.session = Some((row.get(0), row.get(1)));
        let mut client = client;
        schema::migrate(&mut client).await?;
        client.batch_execute(schema::STAGING_TABLE).await?;
        if let Some(idle) = self.shared {
            client
                .batch_execute(&format!(
                    "SET idle_in_transaction_session_timeout = {}",
                    idle.as_millis().max(1000)
                ))
                .await?;
        }
        if self.shared.is_some() || !self.takes_lock {
            let statements = Statements::prepare(&client).await?;
            self.conn = Some((client, statements));
            return Ok(());
        }
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&schema::HOST_LOCK])
            .await?
            .get(0);
        if !locked {
            return Err(SinkError::Locked(schema::HOST_LOCK));
        }
        if self.generation.is_none() {
            // Only at start, before the checkpoint is read: a reconnect
            // keeps the generation, so that a host that lost the lock to
            // another one meanwhile finds its generation stale.
            let generation: i64 = client
                .query_one(
                    "UPDATE pipeline.lease SET generation = generation + 1, taken_at = now() RETURNING generation",
                    &[],
                )
                .await?
                .get(0);
            tracing::debug!(generation, "pipeline lock taken");
            self.generation = Some(generation);
        }
        let statements = Statements::prepare(&client).await?;
        self.conn = Some((client, statements));
        Ok(())
    }

    /// Between batches: replaces a connection that is gone, reporting on
    /// `/healthz` whether the database can be reached.
    pub async fn check_connection(&mut self) {
        if self
            .conn
            .as_ref()
            .is_some_and(|(client, _)| !client.is_closed())
        {
            return;
        }
        let m = metrics::global();
        match tokio::time::timeout(COMMIT_TIMEOUT, self.reconnect()).await {
            Ok(Ok(())) => m.set_problem("database", None),
            Ok(Err(e)) => m.set_problem("database", Some(format!("cannot reconnect: {e}"))),
            Err(_) => m.set_problem(
                "database",
                Some(format!("cannot reconnect within {COMMIT_TIMEOUT:?}")),
            ),
        }
    }

    pub async fn checkpoint(&self) -> Result<Checkpoint, SinkError> {
        let (client, _) = self.conn.as_ref().ok_or(SinkError::Shutdown)?;
        Ok(checkpoint::load(client).await?)
    }

    /// Commits a batch, retrying through outages until it is committed:
    /// the batch is never dropped (its input is not committed either, so a
    /// host killed meanwhile reads it again). Rows the database refuses
    /// are quarantined and the rest committed. The COMMIT waits for `turn`
    /// (see `order`); the rows are written meanwhile.
    pub async fn commit(
        &mut self,
        commit: &Commit,
        turn: &mut Turn,
    ) -> Result<Committed, SinkError> {
        let m = metrics::global();
        let mut backoff = Backoff::default();
        let mut uncertain = false;
        let mut bisect = false;
        loop {
            match self.attempt(commit, turn, uncertain, bisect).await {
                Ok(done) => {
                    m.set_db_down(false);
                    m.set_problem("database", None);
                    if done.refused > 0 {
                        tracing::warn!(batch = %commit.id, refused = done.refused,
                            "PostgreSQL refused rows of the batch: quarantined as `refused` with its reason, the rest committed");
                    }
                    return Ok(done);
                }
                Err(e) if e.is_fatal() => return Err(e),
                Err(e @ (SinkError::LeaseLost { .. } | SinkError::Aborted)) => return Err(e),
                Err(SinkError::Db(e)) if fault::is_deadlock(&e) => {
                    // Rolled back by the server; the connection is fine, and
                    // the other batch goes on.
                    tracing::debug!(batch = %commit.id, "{}; writing the batch again", describe(&e));
                }
                Err(SinkError::Yielded) => {
                    // Rolled back; the connection is fine. Once the batch
                    // before has committed, nothing earlier waits for this
                    // one's rows any more.
                    tracing::debug!(batch = %commit.id, "rolled back for an earlier batch it blocked; writing it again after that one");
                    turn.wait().await?;
                }
                Err(e) if e.fault() == Fault::Data && !bisect => {
                    // The transaction was rolled back; the connection is fine.
                    tracing::warn!(batch = %commit.id, "{e}; finding the rows it refuses, to quarantine them and commit the rest");
                    bisect = true;
                }
                Err(e) => {
                    m.db_errors.fetch_add(1, Ordering::Relaxed);
                    m.set_db_down(true);
                    m.set_problem("database", Some(format!("cannot commit: {e}")));
                    m.db_error(format!("cannot commit batch {}: {e}", commit.id));
                    uncertain = true;
                    self.conn = None;
                    let wait = backoff.next_wait();
                    if e.fault() == Fault::Transient {
                        tracing::warn!(batch = %commit.id, "cannot commit batch: {e}; retrying in {wait:?}");
                    } else {
                        tracing::error!(batch = %commit.id, "cannot commit batch: {e}; this needs the database fixed (schema, permissions); retrying in {wait:?}");
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One attempt at a batch: after an attempt that may have died around
    /// COMMIT (`uncertain`), first asks whether it landed.
    async fn attempt(
        &mut self,
        commit: &Commit,
        turn: &mut Turn,
        uncertain: bool,
        bisect: bool,
    ) -> Result<Committed, SinkError> {
        if self
            .conn
            .as_ref()
            .is_none_or(|(client, _)| client.is_closed())
        {
            within(self.reconnect()).await?;
        }
        let generation = match self.shared {
            Some(_) => None,
            None => Some(self.generation.ok_or(SinkError::Shutdown)?),
        };
        let writer = Writer {
            ids: (generation, self.host.as_deref()),
            pid: self.session.as_ref().map_or(0, |(pid, _)| *pid),
        };
        let (client, st) = self.conn.as_mut().ok_or(SinkError::Shutdown)?;
        if uncertain {
            let found = within(async {
                Ok(client
                    .query_opt(
                        "SELECT batch_id, rows_written, rows_conflicting FROM pipeline.batches WHERE batch_uuid = $1",
                        &[&commit.id],
                    )
                    .await?)
            })
            .await?;
            if let Some(row) = found {
                let written: i32 = row.get(1);
                let conflicting: i32 = row.get(2);
                return Ok(Committed {
                    batch_id: row.get(0),
                    written: written as u64,
                    conflicting: conflicting as u64,
                    refused: 0,
                });
            }
        }
        if bisect {
            return write(client, st, commit, turn, &writer, Path::Bisect).await;
        }
        if self.staging_for > 0 {
            self.staging_for -= 1;
            return write(client, st, commit, turn, &writer, Path::Staging).await;
        }
        match write(client, st, commit, turn, &writer, Path::Direct).await {
            Err(SinkError::Db(e)) if fault::is_unique_violation(&e) => {
                tracing::debug!(batch = %commit.id, "batch holds rows the table has; writing it through staging");
                self.staging_for = STAGING_AFTER_CONFLICT;
                write(client, st, commit, turn, &writer, Path::Staging).await
            }
            other => other,
        }
    }
}

/// Who writes a batch: the generation and host id its record carries,
/// and the server session its transaction runs in.
struct Writer<'a> {
    ids: (Option<i64>, Option<&'a str>),
    pid: i32,
}

/// A step of a commit, given up after `COMMIT_TIMEOUT`: a dead connection
/// or a blocked table. Waiting for the turn is not such a step.
async fn within<T>(
    step: impl std::future::Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    tokio::time::timeout(COMMIT_TIMEOUT, step)
        .await
        .unwrap_or(Err(SinkError::Timeout(COMMIT_TIMEOUT)))
}

/// The connection settings of `url`, with what finds a dead connection
/// within half a minute: TCP keepalives on an idle connection (probes
/// from 10 s of silence, 3 of them 5 s apart) and a TCP user timeout for
/// data sent and never acknowledged (a powered-off server, a NAT that
/// forgot the flow); without them the kernel waits 15 min to 2 h.
fn connection_config(url: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(20));
    Ok(config)
}

/// A connection of its own, with the sink's keepalives, for the lease
/// keeper of a shared stream (`source::lease`).
pub async fn connect_client(url: &str) -> Result<Client, SinkError> {
    let connect_error = |source| SinkError::Connect {
        url: redact(url),
        source,
    };
    let config = connection_config(url).map_err(connect_error)?;
    let (client, connection) = config.connect(NoTls).await.map_err(connect_error)?;
    tokio::spawn(drive(connection));
    Ok(client)
}

/// Drives a connection until it ends. Notices (`relation ... already
/// exists, skipping`) go to DEBUG: `tokio_postgres` would log each at INFO.
/// A connection that breaks marks the database unhealthy at once, so
/// `/healthz` says so before the next commit finds out.
async fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notice(notice)) => {
                tracing::debug!("PostgreSQL {}: {}", notice.severity(), notice.message());
            }
            Ok(_) => {}
            Err(e) => {
                let e = describe(&e);
                tracing::warn!("database connection lost: {e}");
                metrics::global().set_problem("database", Some(format!("connection lost: {e}")));
                return;
            }
        }
    }
}

/// Longest a commit attempt may take before its connection is given up:
/// a batch commits in well under a second, and a half-open connection
/// would otherwise hang it for as long as the kernel keeps retrying.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A batch record's `stages` column: per stage, the version that ran
/// and what it did (written by the sink and by a quarantine replay).
pub fn stages_json(runs: &[StageRun]) -> serde_json::Value {
    json!(runs
        .iter()
        .map(|r| json!({
            "name": r.stage.name, "version": r.stage.version, "hash": r.stage.hash,
            "ms": r.elapsed.as_secs_f64() * 1000.0, "in": r.rows_in, "out": r.rows_out,
            "rejected": r.rejected, "failed": r.failed,
        }))
        .collect::<Vec<_>>())
}

/// The statements of every batch, prepared once per connection: a
/// statement sent as text is parsed and described in a round trip of its
/// own each time, which doubled the round trips of a batch.
struct Statements {
    copy_direct: Statement,
    copy_staging: Statement,
    from_staging: Statement,
    batch: Statement,
    quarantine: Statement,
    positions: Statement,
    forget: Statement,
    state: Statement,
    partition: Statement,
    partition_state: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            copy_direct: client
                .prepare(
                    "COPY ecommerce_events (event_id, user_id, event_type, product_id, price, event_time)
                     FROM STDIN (FORMAT binary)",
                )
                .await?,
            copy_staging: client
                .prepare("COPY staging FROM STDIN (FORMAT binary)")
                .await?,
            from_staging: client
                .prepare(
                    "INSERT INTO ecommerce_events (event_id, user_id, event_type, product_id, price, event_time)
                     SELECT event_id, user_id, event_type, product_id, price_cents::numeric / 100, event_time
                     FROM staging ON CONFLICT (event_id) DO NOTHING",
                )
                .await?,
            batch: client
                .prepare(
                    // No row when the generation is not this host's: fenced.
                    // Hosts sharing a stream pass none: their partitions'
                    // leases fence them instead.
                    "INSERT INTO pipeline.batches (batch_uuid, files, rows_in, rows_written, rows_conflicting,
                         rows_malformed, rows_rejected, rows_failed, rows_dropped, stages, latency_ms, read_ms, write_ms, host)
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $15
                     FROM pipeline.lease WHERE $14::int8 IS NULL OR generation = $14 RETURNING batch_id",
                )
                .await?,
            quarantine: client
                .prepare(
                    // A record already quarantined from the same file
                    // (by identity), line, kind and stage is not again.
                    "INSERT INTO pipeline.quarantine (batch_id, kind, file, line, raw, reason, stage, event_id, file_key, file_fp)
                     SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
                         $9::text[], $10::int8[])
                     ON CONFLICT DO NOTHING",
                )
                .await?,
            positions: client
                .prepare(
                    // A position moves backwards only with a higher re-read
                    // count: a row the WHERE skips is not counted.
                    "INSERT INTO pipeline.positions (file_key, path, byte_offset, line, reads, fp_len, fp_sum, batch_id)
                     SELECT k, p, o, l, r, fl, fs, $8
                     FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int4[], $6::int4[], $7::int8[])
                         AS u(k, p, o, l, r, fl, fs)
                     ON CONFLICT (file_key) DO UPDATE SET path = excluded.path, byte_offset = excluded.byte_offset,
                         line = excluded.line, reads = excluded.reads, fp_len = excluded.fp_len, fp_sum = excluded.fp_sum,
                         batch_id = excluded.batch_id, updated_at = now()
                     WHERE (excluded.reads, excluded.byte_offset)
                         >= (pipeline.positions.reads, pipeline.positions.byte_offset)",
                )
                .await?,
            forget: client
                .prepare("DELETE FROM pipeline.positions WHERE file_key = ANY($1::text[])")
                .await?,
            state: client
                .prepare(
                    "INSERT INTO pipeline.stage_state (stage, version, component_hash, state, batch_id)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (stage) DO UPDATE SET version = excluded.version, component_hash = excluded.component_hash,
                         state = excluded.state, batch_id = excluded.batch_id, updated_at = now()",
                )
                .await?,
            partition: client
                .prepare(
                    // Only under the lease this batch was read with, still
                    // running: the row lock orders it against a takeover,
                    // which then reads this sequence.
                    "UPDATE pipeline.partitions SET committed_seq = $4, batch_id = $5
                     WHERE stream = $1 AND partition = $2 AND epoch = $3 AND host = $6
                       AND expires_at > statement_timestamp() AND committed_seq < $4",
                )
                .await?,
            partition_state: client
                .prepare(
                    "INSERT INTO pipeline.partition_state (stream, partition, stage, version, component_hash, state, batch_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (stream, partition, stage) DO UPDATE SET version = excluded.version,
                         component_hash = excluded.component_hash, state = excluded.state, batch_id = excluded.batch_id",
                )
                .await?,
        })
    }
}

/// How a batch's rows reach the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// COPY into the table; fails on a row it already has.
    Direct,
    /// COPY into staging, then INSERT .. ON CONFLICT DO NOTHING.
    Staging,
    /// As `Staging`, part by part under savepoints, halving a part the
    /// database refuses until the rows it refuses are found.
    Bisect,
}

/// What the rows of a batch came to.
#[derive(Debug, Default)]
pub struct Rows {
    pub written: u64,
    pub conflicting: u64,
    /// Index into the batch's events, and the database's reason.
    pub refused: Vec<(usize, String)>,
}

/// The sink's insert path for writers other than the pipeline (`host
/// quarantine replay`), which may write rows the table has: COPY into the
/// connection's staging table, then `INSERT .. ON CONFLICT (event_id) DO
/// NOTHING`, under savepoints that find the rows the database refuses.
/// It takes no pipeline lock and commits nothing: the caller's
/// transaction holds whatever else must commit with the rows.
pub struct RowWriter {
    st: Statements,
}

impl RowWriter {
    /// Creates the connection's staging table and prepares the statements.
    /// The schema must be migrated.
    pub async fn prepare(client: &Client) -> Result<RowWriter, tokio_postgres::Error> {
        client.batch_execute(schema::STAGING_TABLE).await?;
        Ok(RowWriter {
            st: Statements::prepare(client).await?,
        })
    }

    pub async fn write(
        &self,
        tx: &mut Transaction<'_>,
        events: &[Event],
    ) -> Result<Rows, tokio_postgres::Error> {
        if events.is_empty() {
            return Ok(Rows::default());
        }
        bisect_rows(tx, &self.st, events).await
    }
}

/// COPY into staging, then into the table skipping the ids it has.
async fn through_staging(
    tx: &Transaction<'_>,
    st: &Statements,
    events: &[Event],
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in(&st.copy_staging).await?;
    futures_util::pin_mut!(sink);
    sink.send(copy::encode_staging(events)).await?;
    sink.finish().await?;
    tx.execute(&st.from_staging, &[]).await
}

/// Writes the rows a part at a time, each under a savepoint: a part the
/// database refuses for its data is rolled back and halved, down to the
/// single rows it refuses. Any other error ends the attempt.
async fn bisect_rows(
    tx: &mut Transaction<'_>,
    st: &Statements,
    events: &[Event],
) -> Result<Rows, tokio_postgres::Error> {
    let mut rows = Rows::default();
    // A stack of parts still to write, as (start, end) of the batch's events.
    let mut parts: Vec<(usize, usize)> = vec![(0, events.len())];
    while let Some((start, end)) = parts.pop() {
        let part = &events[start..end];
        let sp = tx.savepoint("part").await?;
        match through_staging(&sp, st, part).await {
            Ok(written) => {
                // Staging is emptied only at COMMIT: empty it for the next part.
                sp.batch_execute("TRUNCATE staging").await?;
                sp.commit().await?;
                rows.written += written;
                rows.conflicting += part.len() as u64 - written;
            }
            Err(e) if Fault::of(&e) == Fault::Data => {
                sp.rollback().await?;
                if part.len() == 1 {
                    rows.refused.push((start, describe(&e)));
                } else {
                    let mid = start + part.len() / 2;
                    parts.push((mid, end));
                    parts.push((start, mid));
                }
            }
            Err(e) => return Err(e),
        }
    }
    rows.refused.sort_by_key(|(i, _)| *i);
    Ok(rows)
}

/// One attempt: the whole batch in one transaction. The rows are
/// written at once; the rest, and COMMIT, once the batch's turn has come.
async fn write(
    client: &mut Client,
    st: &Statements,
    c: &Commit,
    turn: &mut Turn,
    writer: &Writer<'_>,
    path: Path,
) -> Result<Committed, SinkError> {
    let started = Instant::now();
    let mut tx = within(async { Ok(client.transaction().await?) }).await?;
    turn.begun(writer.pid);
    let rows = within(write_rows(&mut tx, st, c, path)).await?;
    turn.wait_in(&tx, writer.pid).await?;
    if let Some(hold) = order::test_hold() {
        tracing::info!(
            batch = turn.seq(),
            "test hook: holding the commit for {hold:?}"
        );
        tokio::time::sleep(hold).await;
    }
    within(finish(tx, st, c, writer.ids, rows, started)).await
}

/// The batch's rows, by `path`.
async fn write_rows(
    tx: &mut Transaction<'_>,
    st: &Statements,
    c: &Commit,
    path: Path,
) -> Result<Rows, SinkError> {
    Ok(if c.events.is_empty() {
        Rows::default()
    } else {
        match path {
            Path::Direct => {
                let sink = tx.copy_in(&st.copy_direct).await?;
                futures_util::pin_mut!(sink);
                sink.send(copy::encode_events(&c.events)).await?;
                let written = sink.finish().await?;
                Rows {
                    written,
                    ..Rows::default()
                }
            }
            Path::Staging => {
                let written = through_staging(tx, st, &c.events).await?;
                Rows {
                    written,
                    conflicting: c.events.len() as u64 - written,
                    ..Rows::default()
                }
            }
            Path::Bisect => bisect_rows(tx, st, &c.events).await?,
        }
    })
}

/// Everything of the batch but its rows, then COMMIT.
async fn finish(
    tx: Transaction<'_>,
    st: &Statements,
    c: &Commit,
    (generation, host): (Option<i64>, Option<&str>),
    rows: Rows,
    started: Instant,
) -> Result<Committed, SinkError> {
    let (written, conflicting) = (rows.written, rows.conflicting);

    let stages = stages_json(&c.stages);
    let subject = c
        .partition
        .as_ref()
        .map(|m| crate::jetstream::subject(&m.stream, m.partition));
    let files: Vec<&str> = match &subject {
        Some(subject) => vec![subject.as_str()],
        None => c.positions.iter().map(|p| &*p.path).collect(),
    };
    let rejected = c.rejections.iter().filter(|(r, _)| !r.failure).count() as i32;
    // Rows the database refused count as failed: the batch record's counts
    // still add up to rows_in.
    let failed = c.rejections.len() as i32 - rejected + rows.refused.len() as i32;
    let latency_ms = c
        .opened
        .map(|t| t.elapsed().as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let read_ms = c.read_time.as_secs_f64() * 1000.0;
    let write_ms = started.elapsed().as_secs_f64() * 1000.0;
    let batch_id: i64 = match tx
        .query_opt(
            &st.batch,
            &[
                &c.id,
                &files,
                &(c.rows_in as i32),
                &(written as i32),
                &(conflicting as i32),
                &(c.malformed.len() as i32),
                &rejected,
                &failed,
                &(c.dropped as i32),
                &stages,
                &latency_ms,
                &read_ms,
                &write_ms,
                &generation,
                &host,
            ],
        )
        .await?
    {
        Some(row) => row.get(0),
        None => {
            let now: i64 = tx
                .query_one("SELECT generation FROM pipeline.lease", &[])
                .await?
                .get(0);
            return Err(SinkError::Fenced {
                mine: generation.unwrap_or_default(),
                now,
            });
        }
    };

    if let Some(m) = &c.partition {
        let held = tx
            .execute(
                &st.partition,
                &[
                    &&*m.stream,
                    &(m.partition as i32),
                    &m.epoch,
                    &(m.seq as i64),
                    &batch_id,
                    &host,
                ],
            )
            .await?;
        if held == 0 {
            return Err(SinkError::LeaseLost {
                stream: m.stream.to_string(),
                partition: m.partition,
                epoch: m.epoch,
            });
        }
    }

    if !c.malformed.is_empty() || !c.rejections.is_empty() || !rows.refused.is_empty() {
        let mut q = Quarantine::default();
        for m in &c.malformed {
            q.push(
                "malformed",
                Some(&m.source),
                Some(&m.file),
                Some(m.row.line),
                Some(m.row.raw.clone()),
                &m.row.reason,
                None,
                None,
            );
        }
        for (r, origin) in &c.rejections {
            q.push(
                if r.failure { "failed" } else { "rejected" },
                origin.as_ref().map(|o| &o.source),
                origin.as_ref().map(|o| &*o.file),
                origin.as_ref().map(|o| o.line),
                Some(event_csv(&r.event)),
                &r.reason,
                Some(&r.stage),
                Some(&r.event.event_id),
            );
        }
        if !rows.refused.is_empty() {
            let origins: HashMap<&str, &Origin> =
                c.origins.iter().map(|(id, o)| (id.as_str(), o)).collect();
            for (i, reason) in &rows.refused {
                let e = &c.events[*i];
                let origin = origins.get(e.event_id.as_str());
                q.push(
                    "refused",
                    origin.map(|o| &o.source),
                    origin.map(|o| &*o.file),
                    origin.map(|o| o.line),
                    Some(event_csv(e)),
                    &format!("PostgreSQL refused the row: {reason}"),
                    None,
                    Some(&e.event_id),
                );
            }
        }
        tx.execute(
            &st.quarantine,
            &[
                &batch_id,
                &q.kind,
                &q.file,
                &q.line,
                &q.raw,
                &q.reason,
                &q.stage,
                &q.event_id,
                &q.file_key,
                &q.file_fp,
            ],
        )
        .await?;
    }

    // Before the positions: a file that came back after its position was
    // forgotten has a new one in this batch.
    if !c.forget.is_empty() {
        tx.execute(&st.forget, &[&c.forget]).await?;
    }

    if !c.positions.is_empty() {
        let keys: Vec<&str> = c.positions.iter().map(|p| p.key.as_str()).collect();
        let offsets: Vec<i64> = c.positions.iter().map(|p| p.offset as i64).collect();
        let lines: Vec<i64> = c.positions.iter().map(|p| p.line as i64).collect();
        let reads: Vec<i32> = c.positions.iter().map(|p| p.reads as i32).collect();
        let fp_lens: Vec<Option<i32>> = c
            .positions
            .iter()
            .map(|p| p.fingerprint.map(|f| f.len as i32))
            .collect();
        let fp_sums: Vec<Option<i64>> = c
            .positions
            .iter()
            .map(|p| p.fingerprint.map(|f| f.sum_i64()))
            .collect();
        let moved = tx
            .execute(
                &st.positions,
                &[
                    &keys, &files, &offsets, &lines, &reads, &fp_lens, &fp_sums, &batch_id,
                ],
            )
            .await?;
        if (moved as usize) < keys.len() {
            return Err(SinkError::Backwards {
                count: keys.len() - moved as usize,
            });
        }
    }

    for s in c.snapshots.iter().filter(|_| c.partition.is_some()) {
        let m = c.partition.as_ref().ok_or(SinkError::Shutdown)?;
        tx.execute(
            &st.partition_state,
            &[
                &&*m.stream,
                &(m.partition as i32),
                &s.stage.name,
                &s.stage.version,
                &s.stage.hash,
                &s.state,
                &batch_id,
            ],
        )
        .await?;
    }
    for s in c.snapshots.iter().filter(|_| c.partition.is_none()) {
        tx.execute(
            &st.state,
            &[
                &s.stage.name,
                &s.stage.version,
                &s.stage.hash,
                &s.state,
                &batch_id,
            ],
        )
        .await?;
    }

    plugin_records::write(&tx, batch_id, &c.shadow_diffs, &c.plugin_events).await?;

    tx.commit().await?;
    Ok(Committed {
        batch_id,
        written,
        conflicting,
        refused: rows.refused.len() as u64,
    })
}

/// Quarantine rows as columns, inserted with one `unnest` statement.
#[derive(Default)]
struct Quarantine {
    kind: Vec<&'static str>,
    file: Vec<Option<String>>,
    line: Vec<Option<i64>>,
    raw: Vec<Option<String>>,
    reason: Vec<String>,
    stage: Vec<Option<String>>,
    event_id: Vec<Option<String>>,
    file_key: Vec<Option<String>>,
    file_fp: Vec<Option<i64>>,
}

impl Quarantine {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        kind: &'static str,
        source: Option<&FileRef>,
        file: Option<&str>,
        line: Option<u64>,
        raw: Option<String>,
        reason: &str,
        stage: Option<&str>,
        event_id: Option<&str>,
    ) {
        self.kind.push(kind);
        self.file.push(file.map(str::to_owned));
        self.line.push(line.map(|l| l as i64));
        // PostgreSQL text cannot hold NUL.
        self.raw.push(raw.map(|r| r.replace('\0', "\\0")));
        self.reason.push(reason.replace('\0', "\\0"));
        self.stage.push(stage.map(str::to_owned));
        self.event_id.push(event_id.map(str::to_owned));
        self.file_key.push(source.map(|s| s.key.to_string()));
        self.file_fp.push(source.map(|s| s.fingerprint));
    }
}

/// An event as a CSV line, for the quarantine's `raw` column.
pub fn event_csv(e: &Event) -> String {
    let price = format!(
        "{}{}.{:02}",
        if e.price_cents < 0 { "-" } else { "" },
        e.price_cents.unsigned_abs() / 100,
        e.price_cents.unsigned_abs() % 100
    );
    let time = chrono::DateTime::from_timestamp_micros(e.event_time)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_else(|| e.event_time.to_string());
    format!(
        "{},{},{},{},{},{}",
        e.event_id, e.user_id, e.event_type, e.product_id, price, time
    )
}

/// Hides a password in a URL before it is logged.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    const CAP: Duration = Duration::from_secs(5);

    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        let jitter = rand::rng().random_range(0.5..1.0);
        wait.mul_f64(jitter)
    }
}

/// Keeps the metrics that derive from a committed batch in one place.
pub fn record(m: &Metrics, c: &Commit, done: &Committed) {
    Metrics::add(&m.rows_written, done.written as usize);
    Metrics::add(&m.rows_conflicting, done.conflicting as usize);
    Metrics::add(&m.rows_failed, done.refused as usize);
    if let Some(opened) = c.opened {
        m.batch_committed(opened.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://spark:spark123@db:5432/ecommerce"),
            "postgres://spark:***@db:5432/ecommerce"
        );
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
    }

    #[test]
    fn backoff_grows_to_a_cap() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.next_wait()).collect();
        assert!(waits[0] <= Duration::from_millis(100));
        assert!(waits.iter().all(|w| *w <= Backoff::CAP));
        assert!(waits[9] >= Backoff::CAP / 2);
    }
}
