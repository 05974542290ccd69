//! `host plugins`: the manifest's stages in order, each with its
//! component file and content hash, version label, whether it loads and
//! type-checks, limits, grants, config and shadow candidate; with a
//! database, what the pipeline last committed with each stage (version,
//! state) and its last swap and rejection with the reason.
//!
//! The components are loaded with the same runtime and compile cache as
//! `host run`, so "loads" here means the host would accept the file. The
//! database is only read: no schema is created and no lock taken, so the
//! command is safe beside a running host.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio_postgres::{Client, NoTls};

use super::file_hash;
use crate::source::lease::{self, Holder};
use crate::stage::manifest::{Manifest, OnIncompatibleState, StageSpec};
use crate::stage::runtime::{Runtime, WIT_PACKAGE};

pub struct ListArgs {
    pub plugins: PathBuf,
    pub database_url: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Listing {
    pub manifest: PathBuf,
    pub stages: Vec<StageReport>,
    /// Why the database part is missing, when a database was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_error: Option<String>,
    /// The partitions of shared streams the database has (`--input
    /// nats://`): who holds each and what was committed for it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StreamPartitions>,
}

#[derive(Debug, Serialize)]
pub struct StreamPartitions {
    pub stream: String,
    pub partitions: Vec<Holder>,
}

#[derive(Debug, Serialize)]
pub struct StageReport {
    pub name: String,
    pub component: ComponentReport,
    pub version: String,
    pub memory_bytes: usize,
    pub time_per_batch_ms: u128,
    pub grants: Vec<&'static str>,
    pub config: Vec<(String, String)>,
    pub on_incompatible_state: &'static str,
    pub shadow: Option<ComponentReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<DbStage>,
}

#[derive(Debug, Serialize)]
pub struct ComponentReport {
    pub file: PathBuf,
    pub hash: Option<String>,
    pub loads: bool,
    pub from_cache: bool,
    pub load_ms: u128,
    pub error: Option<String>,
}

/// What the database says about one stage.
#[derive(Debug, Default, Serialize)]
pub struct DbStage {
    pub last_batch: Option<CommittedVersion>,
    pub state: Option<StateRow>,
    pub last_swap: Option<EventRow>,
    pub last_rejection: Option<EventRow>,
    pub shadow: Option<ShadowTotals>,
}

#[derive(Debug, Serialize)]
pub struct CommittedVersion {
    pub version: String,
    pub hash: String,
    pub batch_id: i64,
    pub committed_at: String,
}

#[derive(Debug, Serialize)]
pub struct StateRow {
    pub version: String,
    pub hash: String,
    pub batch_id: i64,
    pub bytes: i32,
}

#[derive(Debug, Serialize)]
pub struct EventRow {
    pub kind: String,
    pub at: String,
    pub version: Option<String>,
    pub hash: Option<String>,
    pub reason: Option<String>,
}

/// Sums of the shadow diffs recorded for the stage's current candidate.
#[derive(Debug, Serialize)]
pub struct ShadowTotals {
    pub batches: i64,
    pub failed_batches: i64,
    pub rows_in: i64,
    pub kept_both: i64,
    pub changed: i64,
    pub live_only: i64,
    pub candidate_only: i64,
    pub live_rejected: i64,
    pub candidate_rejected: i64,
    pub last_error: Option<String>,
}

/// Prints the listing; returns false when a live component does not load
/// or the database could not be read, for scripts to act on.
pub fn run(args: ListArgs) -> anyhow::Result<bool> {
    let listing = gather(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print!("{}", render(&listing));
    }
    Ok(listing.database_error.is_none() && listing.stages.iter().all(|s| s.component.loads))
}

pub fn gather(args: &ListArgs) -> anyhow::Result<Listing> {
    let manifest = Manifest::load(&args.plugins)?;
    let runtime = Runtime::new(args.cache_dir.clone())?;
    let mut stages: Vec<StageReport> = manifest
        .stages
        .iter()
        .map(|spec| report(&runtime, spec))
        .collect();
    let mut database_error = None;
    let mut streams = Vec::new();
    if let Some(url) = &args.database_url {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match rt.block_on(database(url, &stages)) {
            Ok((mut by_stage, found)) => {
                streams = found;
                for s in &mut stages {
                    s.database = Some(by_stage.remove(&s.name).unwrap_or_default());
                }
            }
            Err(e) => database_error = Some(e),
        }
    }
    Ok(Listing {
        manifest: manifest.path,
        stages,
        database_error,
        streams,
    })
}

fn report(runtime: &Runtime, spec: &StageSpec) -> StageReport {
    let live = component(runtime, &spec.component);
    StageReport {
        name: spec.name.clone(),
        version: spec.version.clone().unwrap_or_else(|| {
            live.hash
                .as_deref()
                .map(|h| h[..12].to_owned())
                .unwrap_or_else(|| "-".into())
        }),
        component: live,
        memory_bytes: spec.limits.memory_bytes,
        time_per_batch_ms: spec.limits.time_per_batch.as_millis(),
        grants: spec.grants.names(),
        config: spec.config.clone(),
        on_incompatible_state: match spec.on_incompatible_state {
            OnIncompatibleState::Reset => "reset",
            OnIncompatibleState::RefuseSwap => "refuse-swap",
        },
        shadow: spec.shadow.as_deref().map(|p| component(runtime, p)),
        database: None,
    }
}

fn component(runtime: &Runtime, path: &Path) -> ComponentReport {
    match runtime.load(path) {
        Ok(c) => ComponentReport {
            file: path.to_owned(),
            hash: Some(c.hash.clone()),
            loads: true,
            from_cache: c.cached,
            load_ms: c.load_time.as_millis(),
            error: None,
        },
        Err(e) => ComponentReport {
            file: path.to_owned(),
            hash: file_hash(path),
            loads: false,
            from_cache: false,
            load_ms: 0,
            error: Some(e.to_string()),
        },
    }
}

/// Reads what the pipeline committed, per stage. Errors come back as
/// text: the listing is still worth printing without them.
async fn database(
    url: &str,
    stages: &[StageReport],
) -> Result<(HashMap<String, DbStage>, Vec<StreamPartitions>), String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", crate::sink::redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let exists: Option<String> = client
        .query_one("SELECT to_regclass('pipeline.batches')::text", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if exists.is_none() {
        return Err("no pipeline tables in this database (has `host run` written to it?)".into());
    }
    let by_stage = read(&client, stages).await.map_err(|e| e.to_string())?;
    let streams = read_streams(&client).await.map_err(|e| e.to_string())?;
    Ok((by_stage, streams))
}

async fn read_streams(client: &Client) -> Result<Vec<StreamPartitions>, String> {
    // Streams came later than the other tables.
    let has: Option<String> = client
        .query_one("SELECT to_regclass('pipeline.partitions')::text", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if has.is_none() {
        return Ok(Vec::new());
    }
    let names = client
        .query(
            "SELECT DISTINCT stream FROM pipeline.partitions ORDER BY stream",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut streams = Vec::new();
    for row in names {
        let stream: String = row.get(0);
        let partitions = lease::holders(client, &stream)
            .await
            .map_err(|e| e.to_string())?;
        streams.push(StreamPartitions { stream, partitions });
    }
    Ok(streams)
}

async fn read(
    client: &Client,
    stages: &[StageReport],
) -> Result<HashMap<String, DbStage>, tokio_postgres::Error> {
    let mut out: HashMap<String, DbStage> = HashMap::new();
    // The most recent batches are enough to find each stage's last one,
    // and bound the scan on a long-running pipeline.
    for row in client
        .query(
            "SELECT DISTINCT ON (s->>'name') s->>'name', s->>'version', s->>'hash', b.batch_id,
                 to_char(b.committed_at, 'YYYY-MM-DD HH24:MI:SS TZ')
             FROM (SELECT batch_id, committed_at, stages FROM pipeline.batches
                   ORDER BY batch_id DESC LIMIT 100000) b,
                  jsonb_array_elements(b.stages) s
             ORDER BY s->>'name', b.batch_id DESC",
            &[],
        )
        .await?
    {
        out.entry(row.get(0)).or_default().last_batch = Some(CommittedVersion {
            version: row.get::<_, Option<String>>(1).unwrap_or_default(),
            hash: row.get::<_, Option<String>>(2).unwrap_or_default(),
            batch_id: row.get(3),
            committed_at: row.get(4),
        });
    }
    for row in client
        .query(
            "SELECT stage, version, component_hash, batch_id, length(state) FROM pipeline.stage_state",
            &[],
        )
        .await?
    {
        out.entry(row.get(0)).or_default().state = Some(StateRow {
            version: row.get(1),
            hash: row.get(2),
            batch_id: row.get(3),
            bytes: row.get(4),
        });
    }
    // The plugin tables arrived later than the others; a database written
    // by an older host has none.
    let has_events: Option<String> = client
        .query_one("SELECT to_regclass('pipeline.plugin_events')::text", &[])
        .await?
        .get(0);
    if has_events.is_none() {
        return Ok(out);
    }
    for row in client
        .query(
            "SELECT DISTINCT ON (stage, grp) stage, grp, kind,
                 to_char(at, 'YYYY-MM-DD HH24:MI:SS TZ'), version, hash, reason
             FROM (SELECT *, CASE WHEN kind IN ('swapped_in', 'promoted') THEN 'swap'
                                  WHEN kind IN ('rejected', 'shadow_rejected') THEN 'rejection' END AS grp
                   FROM pipeline.plugin_events) e
             WHERE grp IS NOT NULL
             ORDER BY stage, grp, id DESC",
            &[],
        )
        .await?
    {
        let event = EventRow {
            kind: row.get(2),
            at: row.get(3),
            version: row.get(4),
            hash: row.get(5),
            reason: row.get(6),
        };
        let entry = out.entry(row.get(0)).or_default();
        match row.get::<_, &str>(1) {
            "swap" => entry.last_swap = Some(event),
            _ => entry.last_rejection = Some(event),
        }
    }
    for stage in stages {
        let Some(hash) = stage.shadow.as_ref().and_then(|s| s.hash.as_ref()) else {
            continue;
        };
        let row = client
            .query_one(
                "SELECT count(*), count(error), coalesce(sum(rows_in), 0)::int8,
                     coalesce(sum(kept_both), 0)::int8, coalesce(sum(changed), 0)::int8,
                     coalesce(sum(live_only), 0)::int8, coalesce(sum(candidate_only), 0)::int8,
                     coalesce(sum(live_rejected), 0)::int8, coalesce(sum(candidate_rejected), 0)::int8,
                     (SELECT error FROM pipeline.shadow_diffs
                      WHERE stage = $1 AND candidate_hash = $2 AND error IS NOT NULL ORDER BY id DESC LIMIT 1)
                 FROM pipeline.shadow_diffs WHERE stage = $1 AND candidate_hash = $2",
                &[&stage.name, hash],
            )
            .await?;
        out.entry(stage.name.clone()).or_default().shadow = Some(ShadowTotals {
            batches: row.get(0),
            failed_batches: row.get(1),
            rows_in: row.get(2),
            kept_both: row.get(3),
            changed: row.get(4),
            live_only: row.get(5),
            candidate_only: row.get(6),
            live_rejected: row.get(7),
            candidate_rejected: row.get(8),
            last_error: row.get(9),
        });
    }
    Ok(out)
}

/// The listing as plain text, one block per stage.
pub fn render(l: &Listing) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} stage(s), in order\n",
        l.manifest.display(),
        l.stages.len()
    );
    for (i, s) in l.stages.iter().enumerate() {
        let _ = writeln!(out, "{}. {}", i + 1, s.name);
        component_lines(&mut out, "component", &s.component);
        let _ = writeln!(out, "   version     {}", s.version);
        let _ = writeln!(
            out,
            "   limits      memory {}, time per batch {} ms",
            bytes(s.memory_bytes),
            s.time_per_batch_ms
        );
        let grants = if s.grants.is_empty() {
            "none".to_owned()
        } else {
            s.grants.join(", ")
        };
        let _ = writeln!(out, "   grants      {grants}");
        if !s.config.is_empty() {
            let config: Vec<String> = s.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "   config      {}", config.join(", "));
        }
        let _ = writeln!(out, "   on incompatible state: {}", s.on_incompatible_state);
        match &s.shadow {
            Some(shadow) => component_lines(&mut out, "shadow", shadow),
            None => {
                let _ = writeln!(out, "   shadow      none");
            }
        }
        if let Some(db) = &s.database {
            db_lines(&mut out, db);
        }
        let _ = writeln!(out);
    }
    if let Some(e) = &l.database_error {
        let _ = writeln!(out, "database: {e}");
    }
    for s in &l.streams {
        partition_lines(&mut out, s);
    }
    out
}

/// One line per partition of a shared stream. Pending messages are
/// known to the owner only: its `/api/status`, `/metrics` and `host top`.
fn partition_lines(out: &mut String, s: &StreamPartitions) {
    let _ = writeln!(
        out,
        "stream {} (pending per partition: the owner's /metrics or `host top`)",
        s.stream
    );
    for p in &s.partitions {
        let owner = match (&p.host, p.live) {
            (Some(h), true) => format!("held by {h}"),
            (Some(h), false) => format!("free (lease of {h} ran out)"),
            (None, _) => "free".to_owned(),
        };
        let _ = writeln!(
            out,
            "   partition {:<3} {owner}, epoch {}, committed up to sequence {}",
            p.partition, p.epoch, p.committed_seq
        );
    }
}

fn component_lines(out: &mut String, label: &str, c: &ComponentReport) {
    let _ = writeln!(out, "   {label:<11} {}", c.file.display());
    let _ = writeln!(
        out,
        "   {:<11} {}",
        "sha256",
        c.hash.as_deref().unwrap_or("(unreadable)")
    );
    let status = match &c.error {
        None => format!(
            "yes, type-checks against {WIT_PACKAGE} ({} in {} ms)",
            if c.from_cache {
                "from the compile cache"
            } else {
                "compiled"
            },
            c.load_ms
        ),
        Some(e) => format!("NO: {e}"),
    };
    let _ = writeln!(out, "   {:<11} {status}", "loads");
}

fn db_lines(out: &mut String, db: &DbStage) {
    match &db.last_batch {
        Some(b) => {
            let _ = writeln!(
                out,
                "   committed   version {} in batch {} at {}",
                version_label(&b.version, &b.hash),
                b.batch_id,
                b.committed_at
            );
        }
        None => {
            let _ = writeln!(out, "   committed   no batch yet");
        }
    }
    if let Some(s) = &db.state {
        let _ = writeln!(
            out,
            "   state       {} bytes from version {}, batch {}",
            s.bytes,
            version_label(&s.version, &s.hash),
            s.batch_id
        );
    }
    for (label, event) in [
        ("last swap", &db.last_swap),
        ("last reject", &db.last_rejection),
    ] {
        if let Some(e) = event {
            let version = match (&e.version, &e.hash) {
                (Some(v), Some(h)) => format!(" version {}", version_label(v, h)),
                _ => String::new(),
            };
            let reason = e
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "   {label:<11} {} at {}{version}{reason}",
                e.kind, e.at
            );
        }
    }
    if let Some(t) = &db.shadow {
        let _ = writeln!(
            out,
            "   shadow diff {} batches ({} failed), {} rows in: kept by both {} (changed {}), live only {}, candidate only {}, rejected by live {} / by candidate {}",
            t.batches, t.failed_batches, t.rows_in, t.kept_both, t.changed, t.live_only,
            t.candidate_only, t.live_rejected, t.candidate_rejected
        );
        if let Some(e) = &t.last_error {
            let _ = writeln!(out, "   shadow err  {e}");
        }
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// "1.2 (abcdef123456)", or just the hash prefix when that is the version.
fn version_label(version: &str, hash: &str) -> String {
    if version == short(hash) {
        version.to_owned()
    } else {
        format!("{version} ({})", short(hash))
    }
}

fn bytes(n: usize) -> String {
    if n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}
