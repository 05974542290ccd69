//! `host run`: wires source -> stages -> sink with bounded channels.
//!
//! ```text
//!  source thread ──batches──▶ stage thread ──commits──▶ sink (async)
//!  (files, parse, batch)      (wasm chain, swaps)       (one tx per batch)
//! ```
//! The channels hold two items each: parse, stages and database overlap
//! in time, and a slow database stops the source instead of filling
//! memory. Shutdown (SIGINT/SIGTERM, or the end of `--once`) closes the
//! source; what it has read flows through and is committed before exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::batch::{Batch, Batcher, Origin};
use crate::embedded::{self, EmbeddedPostgres, Tuning};
use crate::metrics::{self, Metrics};
use crate::sink::{self, Commit, Sink};
use crate::source::{Source, SourceConfig};
use crate::stage::chain::{Chain, Prepared, StageRun};
use crate::stage::manifest::Manifest;
use crate::stage::reload::{self, Loader};
use crate::stage::runtime::Runtime;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub plugins: PathBuf,
    pub input: PathBuf,
    pub database_url: Option<String>,
    pub state_dir: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub batch_size: usize,
    pub batch_interval: Duration,
    pub snapshot_interval: Duration,
    pub once: bool,
    pub metrics_addr: Option<String>,
    pub connect_timeout: Duration,
}

/// Totals of a run, printed at the end.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub batches: u64,
    pub rows_in: u64,
    pub written: u64,
    pub conflicting: u64,
    pub malformed: u64,
    pub rejected: u64,
    pub failed: u64,
    pub dropped: u64,
}

/// The database the run writes to, and the embedded server if it owns one.
struct Database {
    url: String,
    _server: Option<EmbeddedPostgres>,
}

async fn database(config: &RunConfig) -> anyhow::Result<Database> {
    if let Some(url) = &config.database_url {
        return Ok(Database {
            url: url.clone(),
            _server: None,
        });
    }
    let dir = config.state_dir.join("postgres");
    let started = Instant::now();
    let server =
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, &Tuning::default()))
            .await?
            .context("cannot start the embedded PostgreSQL")?;
    embedded::ensure_database(&server.url("postgres"), "ecommerce")
        .await
        .context("cannot create database ecommerce in the embedded PostgreSQL")?;
    let url = server.url("ecommerce");
    tracing::info!(elapsed = ?started.elapsed(), "embedded PostgreSQL ready");
    println!("embedded PostgreSQL: {url}   (psql {url})");
    Ok(Database {
        url,
        _server: Some(server),
    })
}

pub async fn run(config: RunConfig) -> anyhow::Result<Totals> {
    let shutdown = Arc::new(AtomicBool::new(false));
    spawn_signal_handler(shutdown.clone());

    let db = database(&config).await?;
    let mut sink = Sink::connect(&db.url, config.connect_timeout).await?;
    let checkpoint = sink.checkpoint().await?;
    tracing::info!(
        files = checkpoint.positions.len(),
        stages_with_state = checkpoint.states.len(),
        last_batch = ?checkpoint.last_batch,
        "resuming from the last committed batch"
    );

    let runtime = Arc::new(Runtime::new(config.cache_dir.clone())?);
    let manifest = Manifest::load(&config.plugins)?;
    let mut loader = Loader::new(runtime.clone());
    let plan = loader.plan(&manifest)?;
    for p in &plan {
        tracing::info!(stage = %p.spec.name, hash = p.component.short_hash(), cached = p.component.cached,
            load_ms = p.component.load_time.as_millis() as u64, "stage loaded");
        metrics::global().plugin_loaded(&p.spec.name);
    }
    let chain = Chain::start(runtime.clone(), plan.clone(), &checkpoint.states)?;

    if let Some(addr) = &config.metrics_addr {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let local = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::info!(
                    "metrics on http://{local}/metrics, health on http://{local}/healthz"
                );
                tokio::spawn(metrics::serve(listener));
            }
            Err(e) => tracing::warn!("cannot serve metrics on {addr}: {e}; continuing without"),
        }
    }

    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(2);
    let (commit_tx, mut commit_rx) = mpsc::channel::<Commit>(2);
    let (plan_tx, plan_rx) = std::sync::mpsc::channel::<Vec<Prepared>>();

    let source = Source::new(
        SourceConfig::new(config.input.clone(), config.once),
        checkpoint.positions,
        shutdown.clone(),
    );
    let batcher = Batcher::new(config.batch_size, config.batch_interval);
    let source_thread = std::thread::Builder::new()
        .name("source".into())
        .spawn(move || source.run(batcher, batch_tx))?;

    let snapshot_interval = config.snapshot_interval;
    let stage_thread = std::thread::Builder::new()
        .name("stages".into())
        .spawn(move || run_stages(chain, batch_rx, commit_tx, plan_rx, snapshot_interval))?;

    if !config.once {
        let plugins = config.plugins.clone();
        let stop = shutdown.clone();
        std::thread::Builder::new()
            .name("plugin-watch".into())
            .spawn(move || reload::watch(loader, plugins, plan, plan_tx, stop))?;
    }

    let mut totals = Totals::default();
    let mut last_report = Instant::now();
    let m = metrics::global();
    while let Some(commit) = commit_rx.recv().await {
        let done = sink.commit(&commit).await?;
        sink::record(m, &commit, &done);
        totals.batches += 1;
        totals.rows_in += commit.rows_in as u64;
        totals.written += done.written;
        totals.conflicting += done.conflicting;
        totals.malformed += commit.malformed.len() as u64;
        let failed = commit.rejections.iter().filter(|(r, _)| r.failure).count() as u64;
        totals.failed += failed;
        totals.rejected += commit.rejections.len() as u64 - failed;
        totals.dropped += commit.dropped as u64;
        tracing::debug!(
            batch = done.batch_id,
            rows = commit.rows_in,
            written = done.written,
            "batch committed"
        );
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            tracing::info!(?totals, "progress");
        }
    }

    shutdown.store(true, Ordering::Relaxed);
    match source_thread.join() {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the source thread panicked"),
    }
    if stage_thread.join().is_err() {
        anyhow::bail!("the stage thread panicked");
    }
    Ok(totals)
}

/// The stage thread: runs each batch through the chain, applies new plans
/// between batches, and takes snapshots when due and at the end.
fn run_stages(
    mut chain: Chain,
    mut batches: mpsc::Receiver<Batch>,
    commits: mpsc::Sender<Commit>,
    plans: std::sync::mpsc::Receiver<Vec<Prepared>>,
    snapshot_interval: Duration,
) {
    let m = metrics::global();
    let mut last_snapshot = Instant::now();
    let mut snapshot_now = false;
    let mut processed_any = false;
    while let Some(batch) = batches.blocking_recv() {
        processed_any = true;
        // Only the newest plan matters; apply it before this batch.
        if let Some(plan) = plans.try_iter().last() {
            let report = chain.apply(plan);
            // Commit the new versions' state with the next batch.
            snapshot_now = true;
            for v in &report.started {
                tracing::info!(stage = %v.name, version = %v.version, hash = &v.hash[..12], "stage version swapped in");
                m.plugin_loaded(&v.name);
            }
            for name in &report.removed {
                tracing::info!(stage = %name, "stage removed");
            }
            for (name, reason) in &report.refused {
                tracing::error!(stage = %name, "new version refused, keeping the current one: {reason}");
                m.plugin_rejected(name, "start");
            }
        }
        let due = std::mem::take(&mut snapshot_now) || last_snapshot.elapsed() >= snapshot_interval;
        if due {
            last_snapshot = Instant::now();
        }
        let commit = process(&mut chain, batch, m, due);
        if commits.blocking_send(commit).is_err() {
            return;
        }
    }
    // Input closed: commit the final state so a restart starts from it.
    if !processed_any {
        return;
    }
    let snapshots = chain.snapshots();
    if !snapshots.is_empty() {
        let stages = chain
            .versions()
            .into_iter()
            .map(|stage| StageRun {
                stage,
                elapsed: Duration::ZERO,
                rows_in: 0,
                rows_out: 0,
                rejected: 0,
                failed: 0,
            })
            .collect();
        let _ = commits.blocking_send(Commit {
            id: uuid::Uuid::new_v4(),
            snapshots,
            stages,
            plugin_events: crate::stage::events::drain(),
            ..Commit::default()
        });
    }
}

/// Runs one batch through the chain and gathers what its commit holds;
/// `with_snapshots` adds the stages' state.
fn process(chain: &mut Chain, batch: Batch, m: &Metrics, with_snapshots: bool) -> Commit {
    let rows_in = batch.rows();
    Metrics::add(&m.rows_read, rows_in);
    Metrics::add(&m.rows_malformed, batch.malformed.len());
    let out = chain.process(&batch.events);
    for run in &out.runs {
        m.stage_time(&run.stage.name, run.elapsed);
    }
    let rejections = if out.rejections.is_empty() {
        Vec::new()
    } else {
        let origins: HashMap<&str, &Origin> = batch
            .events
            .iter()
            .map(|e| e.event_id.as_str())
            .zip(&batch.origins)
            .collect();
        out.rejections
            .into_iter()
            .map(|r| {
                let origin = origins.get(r.event.event_id.as_str()).map(|o| (*o).clone());
                if r.failure {
                    m.stage_failure(&r.stage, "event");
                }
                (r, origin)
            })
            .collect()
    };
    let failed = rejections.iter().filter(|(r, _)| r.failure).count();
    Metrics::add(&m.rows_failed, failed);
    Metrics::add(&m.rows_rejected, rejections.len() - failed);
    let dropped = batch
        .events
        .len()
        .saturating_sub(out.events.len() + rejections.len());
    Metrics::add(&m.rows_dropped, dropped);
    let snapshots = if with_snapshots {
        chain.snapshots()
    } else {
        Vec::new()
    };
    Commit {
        id: batch.id,
        opened: Some(batch.opened),
        read_time: batch.read_time,
        rows_in,
        events: out.events,
        malformed: batch.malformed,
        rejections,
        dropped,
        positions: batch.positions.into_values().collect(),
        stages: out.runs,
        snapshots,
        shadow_diffs: out.shadows,
        plugin_events: crate::stage::events::drain(),
    }
}

fn spawn_signal_handler(shutdown: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot listen for SIGTERM: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: finishing the batch in flight");
        shutdown.store(true, Ordering::Relaxed);
    });
}
