//! The tables: the seed's `ecommerce_events`, exactly, and the host's own
//! bookkeeping in schema `pipeline`.
//!
//! They are created and changed by numbered migrations, run once per
//! database: `pipeline.schema_version` holds the last one applied. A
//! connection only reads that row; DDL (which takes ACCESS EXCLUSIVE
//! locks a long dashboard query would block) runs only when the host is
//! newer than the database, under a transaction-scoped advisory lock so
//! two hosts starting together apply it once.

/// The events table, as the replaced pipeline defined it.
pub const EVENTS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS ecommerce_events (
    event_id VARCHAR(36) PRIMARY KEY,
    user_id INT NOT NULL,
    event_type VARCHAR(20) NOT NULL,
    product_id INT NOT NULL,
    price NUMERIC(10,2) NOT NULL,
    event_time TIMESTAMP NOT NULL
)";

pub const PIPELINE_SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS pipeline;

-- How far each input file has been consumed, committed with its rows.
CREATE TABLE IF NOT EXISTS pipeline.positions (
    file_key    TEXT PRIMARY KEY,   -- device:inode:birth time (0 without one)
    path        TEXT NOT NULL,
    byte_offset BIGINT NOT NULL,
    line        BIGINT NOT NULL,
    batch_id    BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per committed batch, naming the stage versions that made it.
CREATE TABLE IF NOT EXISTS pipeline.batches (
    batch_id         BIGSERIAL PRIMARY KEY,
    batch_uuid       UUID NOT NULL UNIQUE,
    committed_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    files            TEXT[] NOT NULL,
    rows_in          INT NOT NULL,
    rows_written     INT NOT NULL,
    rows_conflicting INT NOT NULL,
    rows_malformed   INT NOT NULL,
    rows_rejected    INT NOT NULL,
    rows_failed      INT NOT NULL,
    rows_dropped     INT NOT NULL,
    stages           JSONB NOT NULL,  -- [{name, version, hash, ms, in, out, rejected, failed}]
    latency_ms       DOUBLE PRECISION NOT NULL,  -- first record read -> committed
    read_ms          DOUBLE PRECISION NOT NULL DEFAULT 0,  -- reading and parsing its records
    write_ms         DOUBLE PRECISION NOT NULL DEFAULT 0   -- writing its rows (COPY / INSERT)
);
-- Added after the first release: tables created before lack them.
ALTER TABLE pipeline.batches ADD COLUMN IF NOT EXISTS read_ms DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE pipeline.batches ADD COLUMN IF NOT EXISTS write_ms DOUBLE PRECISION NOT NULL DEFAULT 0;

-- Records that did not reach the table, with why.
CREATE TABLE IF NOT EXISTS pipeline.quarantine (
    id          BIGSERIAL PRIMARY KEY,
    batch_id    BIGINT NOT NULL,
    kind        TEXT NOT NULL,       -- malformed | rejected | failed
    file        TEXT,
    line        BIGINT,
    raw         TEXT,
    reason      TEXT NOT NULL,
    stage       TEXT,
    event_id    TEXT,
    at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS quarantine_batch ON pipeline.quarantine (batch_id);

-- The latest committed state of each stateful stage.
CREATE TABLE IF NOT EXISTS pipeline.stage_state (
    stage          TEXT PRIMARY KEY,
    version        TEXT NOT NULL,
    component_hash TEXT NOT NULL,
    state          BYTEA NOT NULL,
    batch_id       BIGINT NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Per batch and shadowed stage: how the shadow candidate's output differed
-- from the live version's (which alone was written). Counts are NULL when
-- the candidate failed on the batch; `error` says why.
CREATE TABLE IF NOT EXISTS pipeline.shadow_diffs (
    id                 BIGSERIAL PRIMARY KEY,
    batch_id           BIGINT NOT NULL,
    stage              TEXT NOT NULL,
    live_version       TEXT NOT NULL,
    live_hash          TEXT NOT NULL,
    candidate_version  TEXT NOT NULL,
    candidate_hash     TEXT,             -- NULL when the candidate did not load
    rows_in            INT NOT NULL,
    kept_both          INT,              -- kept by both (paired by event_id)
    changed            INT,              -- of those, differing in some field
    live_only          INT,
    candidate_only     INT,
    live_rejected      INT,              -- rejected or failed by the live version
    candidate_rejected INT,
    field_changes      JSONB,            -- per field, the pairs differing in it
    candidate_ms       DOUBLE PRECISION NOT NULL,
    error              TEXT
);
CREATE INDEX IF NOT EXISTS shadow_diffs_batch ON pipeline.shadow_diffs (batch_id);

-- What happened to each stage's components: loaded, swapped_in, promoted,
-- rejected (with the reason), removed, shadow_started, shadow_rejected.
-- Committed with the next batch after the event.
CREATE TABLE IF NOT EXISTS pipeline.plugin_events (
    id       BIGSERIAL PRIMARY KEY,
    batch_id BIGINT NOT NULL,
    at       TIMESTAMPTZ NOT NULL,
    stage    TEXT NOT NULL,
    kind     TEXT NOT NULL,
    version  TEXT,
    hash     TEXT,
    reason   TEXT
);
CREATE INDEX IF NOT EXISTS plugin_events_stage ON pipeline.plugin_events (stage, id);
-- Snapshots are megabytes of ids that barely compress: without this,
-- compressing one took ~250 ms of the batch that commits it.
ALTER TABLE pipeline.stage_state ALTER COLUMN state SET STORAGE EXTERNAL;
";

/// Per connection: rows land here first, then move into the table with
/// ON CONFLICT DO NOTHING. Emptied at every commit.
pub const STAGING_TABLE: &str = "
CREATE TEMP TABLE IF NOT EXISTS staging (
    event_id TEXT,
    user_id INT,
    event_type TEXT,
    product_id INT,
    price_cents BIGINT,
    event_time TIMESTAMP
) ON COMMIT DELETE ROWS";

/// Advisory lock key held by the running host, so two hosts never write
/// the same database's positions at once.
pub const HOST_LOCK: i64 = 0x6563_6f6d_6d65_7263; // "ecommerc"

/// The migrations, in order: `MIGRATIONS[i]` (its scripts run in turn)
/// brings a database from version `i` to `i + 1`. Each is safe on a
/// database that already has some of it (a table made by the seed's
/// setup script, or by a host that predates the version row): `IF NOT
/// EXISTS` everywhere.
pub const MIGRATIONS: &[&[&str]] = &[
    // 1: the tables as the first releases made them.
    &[EVENTS_TABLE, PIPELINE_SCHEMA],
    // 2: fencing (a generation per host start) and re-read counts.
    &[MIGRATION_2],
    // 3: files known by content as well as by inode.
    &[MIGRATION_FILE_IDENTITY],
    // 4: streams shared by several hosts (`--input nats://`), and which
    // host committed each batch.
    &[MIGRATION_NATS],
    // 5: quarantine rows replayed (`host quarantine replay`).
    &[MIGRATION_QUARANTINE_REPLAY],
];

const MIGRATION_FILE_IDENTITY: &str = "
-- A checksum of the first fp_len bytes of the file (those consumed, up to
-- 1 KiB): a new file on a reused inode, or one truncated and written
-- again, is told from the file the position was for. NULL in positions
-- committed before: those files are trusted by their key.
ALTER TABLE pipeline.positions ADD COLUMN IF NOT EXISTS fp_len INT;
ALTER TABLE pipeline.positions ADD COLUMN IF NOT EXISTS fp_sum BIGINT;
-- A quarantined record's file by identity, and the file's fingerprint at
-- the record: with line, kind and stage its natural key, so a file read
-- again does not quarantine its records twice.
ALTER TABLE pipeline.quarantine ADD COLUMN IF NOT EXISTS file_key TEXT;
ALTER TABLE pipeline.quarantine ADD COLUMN IF NOT EXISTS file_fp BIGINT;
CREATE UNIQUE INDEX IF NOT EXISTS quarantine_natural_key
    ON pipeline.quarantine (file_key, file_fp, line, kind, (coalesce(stage, '')))
    WHERE file_key IS NOT NULL;
";

const MIGRATION_2: &str = "
-- One row: bumped by each host that takes the pipeline lock at start, and
-- checked by every commit, so a host that lost its session while another
-- one ran cannot commit what it read before.
CREATE TABLE IF NOT EXISTS pipeline.lease (
    id         INT PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    generation BIGINT NOT NULL,
    taken_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO pipeline.lease (id, generation) VALUES (1, 0) ON CONFLICT DO NOTHING;
-- Times a file was read again from its start (truncated): a position
-- moves backwards only with a higher count.
ALTER TABLE pipeline.positions ADD COLUMN IF NOT EXISTS reads INT NOT NULL DEFAULT 0;
";

const MIGRATION_NATS: &str = "
-- The host that committed the batch (`--host-id`).
ALTER TABLE pipeline.batches ADD COLUMN IF NOT EXISTS host TEXT;
-- One row per partition of a shared stream: its owner, the owner's lease
-- epoch (bumped by every takeover) and when the lease ends, and the last
-- stream sequence committed for it. A commit updates its partition's row
-- only while its epoch is the row's and its lease runs: the row lock it
-- takes orders it against a takeover.
CREATE TABLE IF NOT EXISTS pipeline.partitions (
    stream        TEXT NOT NULL,
    partition     INT NOT NULL,
    host          TEXT,
    epoch         BIGINT NOT NULL DEFAULT 0,
    expires_at    TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
    committed_seq BIGINT NOT NULL DEFAULT 0,
    batch_id      BIGINT,
    PRIMARY KEY (stream, partition)
);
-- The hosts consuming a stream, and when each was last seen: the live
-- ones share its partitions.
CREATE TABLE IF NOT EXISTS pipeline.stream_hosts (
    stream  TEXT NOT NULL,
    host    TEXT NOT NULL,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, host)
);
-- Stage state per partition, committed with the partition's sequence.
CREATE TABLE IF NOT EXISTS pipeline.partition_state (
    stream         TEXT NOT NULL,
    partition      INT NOT NULL,
    stage          TEXT NOT NULL,
    version        TEXT NOT NULL,
    component_hash TEXT NOT NULL,
    state          BYTEA NOT NULL,
    batch_id       BIGINT NOT NULL,
    PRIMARY KEY (stream, partition, stage)
);
ALTER TABLE pipeline.partition_state ALTER COLUMN state SET STORAGE EXTERNAL;
";

const MIGRATION_QUARANTINE_REPLAY: &str = "
-- The batch that committed a replay of the row (NULL: still open). Rows
-- are kept for audit.
ALTER TABLE pipeline.quarantine ADD COLUMN IF NOT EXISTS replayed_batch BIGINT;
-- On a row a replay quarantined again: the row it replayed.
ALTER TABLE pipeline.quarantine ADD COLUMN IF NOT EXISTS replay_of BIGINT;
CREATE INDEX IF NOT EXISTS quarantine_open ON pipeline.quarantine (id) WHERE replayed_batch IS NULL;
";

/// The version this host's code expects.
pub fn version() -> i32 {
    MIGRATIONS.len() as i32
}

/// The database's schema version: 0 when it has none (a fresh database,
/// or one made before versions were recorded).
pub async fn current(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    use tokio_postgres::error::SqlState;
    match client
        .query_opt("SELECT version FROM pipeline.schema_version", &[])
        .await
    {
        Ok(row) => Ok(row.map(|r| r.get(0)).unwrap_or(0)),
        Err(e)
            if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) =>
        {
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

/// Brings the database to `version()`, if it is behind; returns the
/// version it was at. One transaction, under an advisory lock.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    let found = current(client).await?;
    if found >= version() {
        return Ok(found);
    }
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(1);
         CREATE SCHEMA IF NOT EXISTS pipeline;
         CREATE TABLE IF NOT EXISTS pipeline.schema_version (version INT NOT NULL);",
    )
    .await?;
    // Another host may have migrated while this one waited for the lock.
    let at: i32 = tx
        .query_opt("SELECT version FROM pipeline.schema_version", &[])
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0);
    for scripts in MIGRATIONS.iter().skip(at.max(0) as usize) {
        for sql in *scripts {
            tx.batch_execute(sql).await?;
        }
    }
    tx.batch_execute("DELETE FROM pipeline.schema_version")
        .await?;
    tx.execute(
        "INSERT INTO pipeline.schema_version (version) VALUES ($1)",
        &[&version()],
    )
    .await?;
    tx.commit().await?;
    tracing::info!(from = at, to = version(), "database schema migrated");
    Ok(found)
}
