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
//! When the database is unreachable the sink keeps the batch, retries
//! with capped exponential backoff and jitter, and reports itself
//! unhealthy; upstream stops at the bounded channels meanwhile. When a
//! connection breaks during COMMIT, the batch's unique id tells whether
//! the commit went through.

pub mod copy;
pub mod plugin_records;
pub mod schema;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use rand::RngExt;
use serde_json::json;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

use crate::batch::{Malformed, Origin, Position};
use crate::checkpoint::{self, Checkpoint};
use crate::metrics::{self, Metrics};
use crate::stage::chain::{StageRejection, StageRun, StageSnapshot};
use crate::stage::events::PluginEvent;
use crate::stage::shadow::ShadowDiff;
use crate::stage::Event;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("another host holds this database's pipeline lock (pg_advisory_lock {0}); stop it first or use another database")]
    Locked(i64),
    #[error("shutting down before the batch could be committed")]
    Shutdown,
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
    pub dropped: usize,
    pub positions: Vec<Position>,
    pub stages: Vec<StageRun>,
    pub snapshots: Vec<StageSnapshot>,
    /// Shadow comparisons of this batch.
    pub shadow_diffs: Vec<ShadowDiff>,
    /// Plugin events since the last batch.
    pub plugin_events: Vec<PluginEvent>,
}

/// Counts of a committed batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Committed {
    pub batch_id: i64,
    pub written: u64,
    pub conflicting: u64,
}

pub struct Sink {
    url: String,
    /// The connection and the statements prepared on it: they come and
    /// go together.
    conn: Option<(Client, Statements)>,
    /// Batches still to send through staging after the last conflict.
    staging_for: u32,
}

/// How many batches go through staging after a conflict on the fast path.
const STAGING_AFTER_CONFLICT: u32 = 8;

impl Sink {
    /// Connects, creates the schema if absent and takes the host lock.
    /// Retries until `patience` runs out: the server may be starting.
    pub async fn connect(url: &str, patience: Duration) -> Result<Sink, SinkError> {
        let mut sink = Sink {
            url: url.to_owned(),
            conn: None,
            staging_for: 0,
        };
        let deadline = Instant::now() + patience;
        let mut backoff = Backoff::default();
        loop {
            match sink.reconnect().await {
                Ok(()) => return Ok(sink),
                // A host killed a moment ago may still hold the lock until
                // the server notices its connection is gone.
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
        let (client, connection) =
            tokio_postgres::connect(&self.url, NoTls)
                .await
                .map_err(|source| SinkError::Connect {
                    url: redact(&self.url),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("database connection closed: {e}");
            }
        });
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(1); {}; {} COMMIT;",
                schema::EVENTS_TABLE,
                schema::PIPELINE_SCHEMA
            ))
            .await?;
        client.batch_execute(schema::STAGING_TABLE).await?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&schema::HOST_LOCK])
            .await?
            .get(0);
        if !locked {
            return Err(SinkError::Locked(schema::HOST_LOCK));
        }
        let statements = Statements::prepare(&client).await?;
        self.conn = Some((client, statements));
        Ok(())
    }

    pub async fn checkpoint(&self) -> Result<Checkpoint, SinkError> {
        let (client, _) = self.conn.as_ref().ok_or(SinkError::Shutdown)?;
        Ok(checkpoint::load(client).await?)
    }

    /// Commits a batch, retrying through outages until it is committed:
    /// the batch is never dropped (its input is not committed either, so a
    /// host killed meanwhile reads it again).
    pub async fn commit(&mut self, commit: &Commit) -> Result<Committed, SinkError> {
        let m = metrics::global();
        let mut backoff = Backoff::default();
        let mut uncertain = false;
        loop {
            let attempt = async {
                if self.conn.is_none() {
                    self.reconnect().await?;
                }
                let (client, st) = self.conn.as_mut().ok_or(SinkError::Shutdown)?;
                if uncertain {
                    // The last attempt died around COMMIT: did it land?
                    if let Some(row) = client
                        .query_opt(
                            "SELECT batch_id, rows_written, rows_conflicting FROM pipeline.batches WHERE batch_uuid = $1",
                            &[&commit.id],
                        )
                        .await?
                    {
                        let written: i32 = row.get(1);
                        let conflicting: i32 = row.get(2);
                        return Ok(Committed {
                            batch_id: row.get(0),
                            written: written as u64,
                            conflicting: conflicting as u64,
                        });
                    }
                }
                if self.staging_for > 0 {
                    self.staging_for -= 1;
                    return write(client, st, commit, Path::Staging).await;
                }
                match write(client, st, commit, Path::Direct).await {
                    Err(SinkError::Db(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                        tracing::debug!(batch = %commit.id, "batch holds rows the table has; writing it through staging");
                        self.staging_for = STAGING_AFTER_CONFLICT;
                        write(client, st, commit, Path::Staging).await
                    }
                    other => other,
                }
            };
            match attempt.await {
                Ok(done) => {
                    m.set_db_down(false);
                    return Ok(done);
                }
                Err(e) => {
                    m.db_errors.fetch_add(1, Ordering::Relaxed);
                    m.set_db_down(true);
                    m.db_error(format!("cannot commit batch {}: {e}", commit.id));
                    uncertain = true;
                    self.conn = None;
                    let wait = backoff.next_wait();
                    tracing::warn!(batch = %commit.id, "cannot commit batch: {e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
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
    state: Statement,
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
                    "INSERT INTO pipeline.batches (batch_uuid, files, rows_in, rows_written, rows_conflicting,
                         rows_malformed, rows_rejected, rows_failed, rows_dropped, stages, latency_ms, read_ms, write_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING batch_id",
                )
                .await?,
            quarantine: client
                .prepare(
                    "INSERT INTO pipeline.quarantine (batch_id, kind, file, line, raw, reason, stage, event_id)
                     SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[])",
                )
                .await?,
            positions: client
                .prepare(
                    "INSERT INTO pipeline.positions (file_key, path, byte_offset, line, batch_id)
                     SELECT k, p, o, l, $5 FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS u(k, p, o, l)
                     ON CONFLICT (file_key) DO UPDATE SET path = excluded.path, byte_offset = excluded.byte_offset,
                         line = excluded.line, batch_id = excluded.batch_id, updated_at = now()",
                )
                .await?,
            state: client
                .prepare(
                    "INSERT INTO pipeline.stage_state (stage, version, component_hash, state, batch_id)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (stage) DO UPDATE SET version = excluded.version, component_hash = excluded.component_hash,
                         state = excluded.state, batch_id = excluded.batch_id, updated_at = now()",
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
}

/// One attempt: the whole batch in one transaction.
async fn write(
    client: &mut Client,
    st: &Statements,
    c: &Commit,
    path: Path,
) -> Result<Committed, SinkError> {
    let started = Instant::now();
    let tx = client.transaction().await?;

    let (written, conflicting) = if c.events.is_empty() {
        (0, 0)
    } else if path == Path::Direct {
        let sink = tx.copy_in(&st.copy_direct).await?;
        futures_util::pin_mut!(sink);
        sink.send(copy::encode_events(&c.events)).await?;
        let written = sink.finish().await?;
        (written, 0)
    } else {
        let sink = tx.copy_in(&st.copy_staging).await?;
        futures_util::pin_mut!(sink);
        sink.send(copy::encode_staging(&c.events)).await?;
        sink.finish().await?;
        let written = tx.execute(&st.from_staging, &[]).await?;
        (written, c.events.len() as u64 - written)
    };

    let stages = json!(c
        .stages
        .iter()
        .map(|r| json!({
            "name": r.stage.name, "version": r.stage.version, "hash": r.stage.hash,
            "ms": r.elapsed.as_secs_f64() * 1000.0, "in": r.rows_in, "out": r.rows_out,
            "rejected": r.rejected, "failed": r.failed,
        }))
        .collect::<Vec<_>>());
    let files: Vec<&str> = c.positions.iter().map(|p| &*p.path).collect();
    let rejected = c.rejections.iter().filter(|(r, _)| !r.failure).count() as i32;
    let failed = c.rejections.len() as i32 - rejected;
    let latency_ms = c
        .opened
        .map(|t| t.elapsed().as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let read_ms = c.read_time.as_secs_f64() * 1000.0;
    let write_ms = started.elapsed().as_secs_f64() * 1000.0;
    let batch_id: i64 = tx
        .query_one(
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
            ],
        )
        .await?
        .get(0);

    if !c.malformed.is_empty() || !c.rejections.is_empty() {
        let mut q = Quarantine::default();
        for m in &c.malformed {
            q.push(
                "malformed",
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
                origin.as_ref().map(|o| &*o.file),
                origin.as_ref().map(|o| o.line),
                Some(event_csv(&r.event)),
                &r.reason,
                Some(&r.stage),
                Some(&r.event.event_id),
            );
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
            ],
        )
        .await?;
    }

    if !c.positions.is_empty() {
        let keys: Vec<&str> = c.positions.iter().map(|p| p.key.as_str()).collect();
        let offsets: Vec<i64> = c.positions.iter().map(|p| p.offset as i64).collect();
        let lines: Vec<i64> = c.positions.iter().map(|p| p.line as i64).collect();
        tx.execute(&st.positions, &[&keys, &files, &offsets, &lines, &batch_id])
            .await?;
    }

    for s in &c.snapshots {
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
}

impl Quarantine {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        kind: &'static str,
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
    }
}

/// An event as a CSV line, for the quarantine's `raw` column.
fn event_csv(e: &Event) -> String {
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
