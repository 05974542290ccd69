//! `host run`: wires source -> stages -> sink with bounded channels.
//!
//! ```text
//!  source thread ──batches──▶ stage thread ──commits──▶ sink (async)
//!  (files, parse, batch)      (wasm chain, swaps)       (one tx per batch)
//! ```
//! The channels hold one item each: parse, stages and database overlap
//! in time, and a slow database stops the source instead of filling
//! memory. Shutdown (SIGINT/SIGTERM, or the end of `--once`) closes the
//! source; what it has read flows through and is committed before exit,
//! if it can be within `--shutdown-timeout` after the signal: else the
//! host exits with an error saying what it left uncommitted (its input
//! positions were not committed either: the next start reads it again).
//! A second signal exits at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::batch::{Batch, Batcher, Origin};
use crate::embedded::{self, EmbeddedPostgres, Tuning};
use crate::http;
use crate::jetstream::NatsUrl;
use crate::metrics::{self, Metrics};
use crate::pause::{Hold, Ran};
use crate::progress::{Backfill, Progress, Unit};
use crate::sink::writers::Writers;
use crate::sink::{self, Commit, Sink, SinkError};
use crate::source::nats::{Feedback, NatsConfig, NatsSource, Summary};
use crate::source::{OnDone, Source, SourceConfig};
use crate::stage::chain::{Chain, Prepared, StageRun, StageSnapshot};
use crate::stage::events::{PluginEvent, PluginEventKind};
use crate::stage::manifest::Manifest;
use crate::stage::reload::{self, Loader, Update};
use crate::stage::runtime::Runtime;
use crate::stage::shadow::ShadowDiff;
use crate::status::Status;

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
    /// After a shutdown signal, how long the batches in flight may take
    /// to commit before the host exits without them.
    pub shutdown_timeout: Duration,
    /// Read what symbolic links in the input folder point to.
    pub follow_symlinks: bool,
    /// What becomes of files fully committed.
    pub on_done: OnDone,
    /// How long a gone file's position is kept.
    pub forget_after: Duration,
    /// Consecutive wholly failed batches of one stage that pause the
    /// input (0: never); see `pause`.
    pub pause_after: u32,
    /// Named in every batch record; the owner of partition leases.
    pub host_id: String,
    /// Partitions of a stream this host creates (`--input nats://`).
    pub partitions: u32,
    /// How long a partition lease lasts without renewal.
    pub lease: Duration,
    /// Connections writing batches at once (see `sink::writers`).
    pub writers: usize,
}

/// `--writers` by default: two, or one on a single core. Two measured
/// 1.11-1.16x one COPY session on 2 cores (docs/performance.md); more
/// writers than cores only queue for the same CPU, and PostgreSQL needs
/// cores of its own.
pub fn default_writers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
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
    /// Rows the database refused (quarantined as `refused`).
    pub refused: u64,
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
    // A server reused while it still starts up refuses connections for a
    // moment ("the database system is starting up").
    let deadline = Instant::now() + config.connect_timeout;
    loop {
        match embedded::ensure_database(&server.url("postgres"), "ecommerce").await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!("embedded PostgreSQL not ready ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => {
                return Err(e)
                    .context("cannot create database ecommerce in the embedded PostgreSQL")
            }
        }
    }
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
    let signalled = spawn_signal_handler(shutdown.clone());
    // Resolves `shutdown_timeout` after the first signal; never without one.
    let shutdown_timeout = config.shutdown_timeout;
    let deadline = async move {
        if signalled.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(shutdown_timeout).await;
    };
    tokio::pin!(deadline);

    // The state folder holds the cluster and the compile cache: the
    // operator's alone (docs/security.md).
    crate::fsutil::create_private_dir(&config.state_dir).with_context(|| {
        format!(
            "cannot create the state folder {}",
            config.state_dir.display()
        )
    })?;
    if let Ok(meta) = std::fs::metadata(&config.state_dir) {
        if let Err(e) = crate::fsutil::check_owned_not_shared(&config.state_dir, &meta) {
            tracing::warn!("state folder: {e}");
        }
    }
    let nats_url = match config.input.to_str().and_then(NatsUrl::detect) {
        Some(url) => Some(url?),
        None => None,
    };
    let db = database(&config).await?;
    println!("host id: {}", config.host_id);
    let shared = nats_url.as_ref().map(|_| config.lease);
    let sink = Sink::connect_as(
        &db.url,
        config.connect_timeout,
        Some(config.host_id.clone()),
        shared,
    )
    .await?;
    let mut checkpoint = sink.checkpoint().await?;
    if nats_url.is_some() {
        // Positions and stage state of a stream are per partition, read
        // when a partition is taken (`source::nats`).
        checkpoint.positions.clear();
        checkpoint.states.clear();
    }
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
    }
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let (commit_tx, mut commit_rx) = mpsc::channel::<Commit>(1);
    let (update_tx, update_rx) = std::sync::mpsc::channel::<Update>();

    let settings = StageSettings {
        snapshot_interval: config.snapshot_interval,
        pause_after: config.pause_after,
        shutdown: shutdown.clone(),
    };
    // The stages start on their own thread, not in this async context:
    // `init` and `restore` may make blocking WASI calls, and every call
    // into a stage is driven by that thread's own executor. The source
    // starts once they have.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let states = std::mem::take(&mut checkpoint.states);
    let stage_runtime = runtime.clone();
    let stage_plan = plan.clone();
    let once = config.once;
    let stage_thread = std::thread::Builder::new()
        .name("stages".into())
        .spawn(move || {
            let chain = match Chain::start(stage_runtime, stage_plan, &states) {
                Ok(mut chain) => {
                    if once {
                        // A backfill compares every batch: completeness
                        // over latency.
                        chain.compare_every_batch();
                    }
                    let _ = started_tx.send(Ok(chain.versions()));
                    chain
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return Ok(());
                }
            };
            run_stages(chain, batch_rx, commit_tx, update_rx, settings)
        })?;
    let versions = match started_rx.await {
        Ok(Ok(versions)) => versions,
        Ok(Err(e)) => {
            let _ = stage_thread.join();
            return Err(e.into());
        }
        Err(_) => anyhow::bail!("the stage thread stopped while starting the stages"),
    };

    let committed: HashMap<String, u64> = checkpoint
        .positions
        .iter()
        .map(|(key, p)| (key.clone(), p.offset))
        .collect();
    let status = Arc::new(Status::new(
        config.input.clone(),
        committed.clone(),
        &versions,
    ));
    if let Some(addr) = &config.metrics_addr {
        serve_http(addr, status.clone(), shutdown.clone()).await;
    }
    let mut progress = (config.once && nats_url.is_none())
        .then(|| BackfillProgress::new(&config.input, &committed));

    // A shared stream: a task reading the partitions this host holds.
    let mut nats = None;
    let mut batch_tx = Some(batch_tx);
    if let Some(url) = &nats_url {
        let nats_config = NatsConfig {
            url: url.clone(),
            database_url: db.url.clone(),
            host: config.host_id.clone(),
            partitions: config.partitions,
            lease: config.lease,
            batch_size: config.batch_size,
            once: config.once,
        };
        let (source, feedback, stream_status) =
            NatsSource::connect(nats_config, shutdown.clone()).await?;
        status.stream(stream_status);
        let tx = batch_tx.take().context("the batch channel is taken once")?;
        nats = Some((tokio::spawn(source.run(tx)), feedback));
    }

    let mut source_config = SourceConfig::new(config.input.clone(), config.once);
    source_config.follow_symlinks = config.follow_symlinks;
    source_config.on_done = config.on_done.clone();
    source_config.forget_after = config.forget_after;
    let mut source = Source::new(source_config, checkpoint.positions, shutdown.clone());
    // With --on-done the source learns which positions are committed.
    let done_feed = if config.on_done != OnDone::Keep {
        let (tx, rx) = std::sync::mpsc::channel();
        source.committed_feed(rx);
        Some(tx)
    } else {
        None
    };
    let batcher = Batcher::new(config.batch_size, config.batch_interval);
    let source_thread = match batch_tx {
        Some(batch_tx) => Some(
            std::thread::Builder::new()
                .name("source".into())
                .spawn(move || source.run(batcher, batch_tx))?,
        ),
        None => None,
    };

    if !config.once {
        let plugins = config.plugins.clone();
        let stop = shutdown.clone();
        std::thread::Builder::new()
            .name("plugin-watch".into())
            .spawn(move || reload::watch(loader, plugins, plan, update_tx, stop))?;
    } else {
        // No reloads with --once: a paused stage then ends the run.
        drop(update_tx);
    }

    let mut totals = Totals::default();
    let mut last_report = Instant::now();
    let m = metrics::global();
    let mut writers = Writers::start(sink, config.writers, config.connect_timeout).await?;
    let mut input_open = true;
    // Batches go to the writers as they come; their results come back in
    // batch order, and are taken as they come.
    while input_open || !writers.is_idle() {
        let (commit, done) = tokio::select! {
            commit = commit_rx.recv(), if input_open && writers.has_room() => {
                match commit {
                    Some(commit) => writers.send(commit).await,
                    None => input_open = false,
                }
                continue;
            }
            done = writers.next() => done?,
            () = &mut deadline => return Err(ShutdownTimedOut { timeout: shutdown_timeout, in_flight: writers.in_flight() }.into()),
        };
        let done = match (done, &nats) {
            (Ok(done), _) => done,
            (
                Err(SinkError::LeaseLost {
                    partition, epoch, ..
                }),
                Some((_, feedback)),
            ) => {
                tracing::warn!(partition, epoch, "a batch of a partition this host no longer holds was not committed: its new owner reads it again");
                let _ = feedback.send(Feedback::Lost { partition, epoch });
                continue;
            }
            (Err(e), _) => return Err(e.into()),
        };
        if let (Some(mark), Some((_, feedback))) = (&commit.partition, &nats) {
            let _ = feedback.send(Feedback::Committed(mark.clone()));
        }
        sink::record(m, &commit, &done);
        if let Some(feed) = &done_feed {
            let _ = feed.send(commit.positions.clone());
        }
        status.committed(&commit, &done);
        totals.batches += 1;
        totals.rows_in += commit.rows_in as u64;
        totals.written += done.written;
        totals.conflicting += done.conflicting;
        totals.malformed += commit.malformed.len() as u64;
        let failed = commit.rejections.iter().filter(|(r, _)| r.failure).count() as u64;
        totals.failed += failed;
        totals.rejected += commit.rejections.len() as u64 - failed;
        totals.dropped += commit.dropped as u64;
        totals.refused += done.refused;
        tracing::debug!(
            batch = done.batch_id,
            rows = commit.rows_in,
            written = done.written,
            "batch committed"
        );
        if let Some(progress) = &mut progress {
            progress.committed(&commit, &totals);
        } else if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            tracing::info!(?totals, "progress");
        }
    }
    if let Some(progress) = progress {
        progress.finish();
    }

    shutdown.store(true, Ordering::Relaxed);
    if let Some(source_thread) = source_thread {
        match source_thread.join() {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("the source thread panicked"),
        }
    }
    if let Some((task, feedback)) = nats {
        drop(feedback);
        let source = task.await.context("the stream source stopped")?;
        let summary = source.finish().await;
        print_summary(&summary);
    }
    match stage_thread.join() {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the stage thread panicked"),
    }
    Ok(totals)
}

/// `--host-id` by default: the machine's host name.
pub fn default_host_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_owned(),
        _ => "host".to_owned(),
    }
}

/// What a host sharing a stream read, and what it left to others.
fn print_summary(summary: &Summary) {
    println!(
        "partitions read and given back: {}",
        list_partitions(summary.held.iter().copied())
    );
    if !summary.left.is_empty() {
        let left: Vec<String> = summary
            .left
            .iter()
            .map(|(p, host)| format!("{p} ({host})"))
            .collect();
        println!(
            "partitions left to the live hosts holding them: {}",
            left.join(", ")
        );
    }
}

fn list_partitions(parts: impl Iterator<Item = u32>) -> String {
    let parts: Vec<String> = parts.map(|p| p.to_string()).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// The batches in flight could not be committed within the shutdown
/// timeout (the database is down, or refuses them).
#[derive(Debug, thiserror::Error)]
#[error("shutdown: not committed within {timeout:?} of the signal: {}; nothing is lost: their input positions were not committed either, so the next start reads them again", describe_in_flight(.in_flight))]
pub struct ShutdownTimedOut {
    pub timeout: Duration,
    /// Rows read into, and rows to write of, the batch being committed.
    pub in_flight: Option<(usize, usize)>,
}

fn describe_in_flight(in_flight: &Option<(usize, usize)>) -> String {
    match in_flight {
        Some((read, rows)) => format!(
            "the batch being committed ({read} records read, {rows} rows to write) and any read after it"
        ),
        None => "the batches still in the stages".into(),
    }
}

/// Serves the dashboard, `/api/status`, `/metrics` and `/healthz`, and
/// samples the status once a second until shutdown.
async fn serve_http(addr: &str, status: Arc<Status>, shutdown: Arc<AtomicBool>) {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            let local = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(
                "dashboard on http://{local}/ (status /api/status, metrics /metrics, health /healthz)"
            );
            let state = Arc::new(http::State {
                status: Some(status.clone()),
                metrics: metrics::global(),
            });
            tokio::spawn(http::serve(listener, state));
        }
        Err(e) => tracing::warn!("cannot serve metrics on {addr}: {e}; continuing without"),
    }
    // The sampler reads the input folder (the lag): a thread of its own,
    // off the async workers.
    let sampler = std::thread::Builder::new()
        .name("status".into())
        .spawn(move || {
            while !shutdown.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                status.tick();
            }
        });
    if let Err(e) = sampler {
        tracing::warn!("cannot start the status sampler: {e}; rates and lag stay at zero");
    }
}

/// `host run --once`: bytes of input committed out of those left at the
/// start, with files, rows and rate beside them.
struct BackfillProgress {
    left: Backfill,
    bar: Progress,
    started: Instant,
}

impl BackfillProgress {
    fn new(input: &std::path::Path, committed: &HashMap<String, u64>) -> BackfillProgress {
        let left = Backfill::new(input, committed);
        let bar = Progress::new("run --once", left.total_bytes(), Unit::Bytes);
        BackfillProgress {
            left,
            bar,
            started: Instant::now(),
        }
    }

    fn committed(&mut self, commit: &Commit, totals: &Totals) {
        for p in &commit.positions {
            self.left.committed(&p.key, p.offset);
        }
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        self.bar.set(
            self.left.done_bytes(),
            format!(
                "files {}/{}, rows {}, {:.0} rows/s",
                self.left.done_files(),
                self.left.total_files(),
                totals.rows_in,
                totals.rows_in as f64 / seconds
            ),
        );
    }

    fn finish(self) {
        self.bar.finish();
    }
}

/// Why the stage thread stopped before its input ended.
#[derive(Debug, thiserror::Error)]
pub enum StageThreadError {
    #[error("{0}; with --once no new version can be swapped in, so the host stops here without committing the held input: fix the stage and run again")]
    PausedWithoutReload(String),
}

/// What the stage thread needs besides its channels.
struct StageSettings {
    snapshot_interval: Duration,
    pause_after: u32,
    shutdown: Arc<AtomicBool>,
}

/// A bound on the plugin events waiting for a batch, so a host that sees
/// no batches for a long time while a broken file keeps changing does not
/// grow without end.
const MAX_PENDING_EVENTS: usize = 10_000;

/// The stage thread: runs each batch through the chain, applies new plans
/// between batches, takes snapshots when due and at the end, and holds the
/// input while a stage that fails everything is paused (see `pause`).
fn run_stages(
    chain: Chain,
    mut batches: mpsc::Receiver<Batch>,
    commits: mpsc::Sender<Commit>,
    updates: std::sync::mpsc::Receiver<Update>,
    settings: StageSettings,
) -> Result<(), StageThreadError> {
    let mut stages = Stages::new(chain, updates, settings);
    let mut processed_any = false;
    while let Some(batch) = stages.hold.next(|| batches.blocking_recv()) {
        processed_any = true;
        stages.take_updates();
        if let Some(pause) = stages.hold.paused() {
            // Hold this batch, unprocessed, until the stage changes.
            let why = pause.describe();
            match stages.wait_for_swap() {
                Wait::Resumed => {}
                Wait::Shutdown => break,
                Wait::NoReload => return Err(StageThreadError::PausedWithoutReload(why)),
            }
        }
        if let Some(commit) = stages.run(batch) {
            if commits.blocking_send(commit).is_err() {
                return Ok(());
            }
        }
    }
    // Input closed: commit the final state so a restart starts from it.
    if processed_any {
        if let Some(commit) = stages.finish() {
            let _ = commits.blocking_send(commit);
        }
    }
    Ok(())
}

enum Wait {
    Resumed,
    Shutdown,
    NoReload,
}

/// The stage thread's state between batches: the chain, the pause
/// protocol, when the next snapshot is due, and the plugin events that go
/// with the next commit. The pipeline records metrics here, from what the
/// stages return.
struct Stages {
    chain: Chain,
    updates: std::sync::mpsc::Receiver<Update>,
    hold: Hold,
    settings: StageSettings,
    last_snapshot: Instant,
    /// Take every stage's snapshot with the next batch (after a swap).
    snapshot_now: bool,
    /// A shared stream's stage state per partition, by stage name: the
    /// chain is put back to a partition's state before each of its
    /// batches, and its state taken after.
    partition_states: HashMap<u32, Vec<(String, Vec<u8>)>>,
    /// The partition whose state the chain holds.
    current_partition: Option<u32>,
    events: Vec<PluginEvent>,
    m: &'static Metrics,
}

impl Stages {
    fn new(
        mut chain: Chain,
        updates: std::sync::mpsc::Receiver<Update>,
        settings: StageSettings,
    ) -> Stages {
        let started = chain.take_events();
        let mut stages = Stages {
            chain,
            updates,
            hold: Hold::new(settings.pause_after),
            settings,
            last_snapshot: Instant::now(),
            snapshot_now: false,
            partition_states: HashMap::new(),
            current_partition: None,
            events: Vec::new(),
            m: metrics::global(),
        };
        stages.absorb(started);
        stages
    }

    /// Counts plugin events and keeps them for the next commit.
    fn absorb(&mut self, events: Vec<PluginEvent>) {
        for event in events {
            record_plugin_event(self.m, &event);
            if self.events.len() < MAX_PENDING_EVENTS {
                self.events.push(event);
            }
        }
    }

    /// Takes what the plugin watcher sent since the last batch; of its
    /// plans only the newest matters, applied before the next batch.
    fn take_updates(&mut self) {
        let mut newest = None;
        while let Ok(update) = self.updates.try_recv() {
            if let Some(plan) = self.take_update(update) {
                newest = Some(plan);
            }
        }
        if let Some(plan) = newest {
            self.apply_plan(plan);
        }
    }

    /// Records an update; returns it if it is a plan.
    fn take_update(&mut self, update: Update) -> Option<Vec<Prepared>> {
        match update {
            Update::Plan(plan) => return Some(plan),
            Update::Rejected(event) => self.absorb(vec![event]),
            Update::ManifestInvalid => self.m.plugin_rejected("manifest", "invalid"),
        }
        None
    }

    fn apply_plan(&mut self, plan: Vec<Prepared>) {
        let report = self.chain.apply(plan);
        for v in &report.started {
            tracing::info!(stage = %v.name, version = %v.version, hash = &v.hash[..12], "stage version swapped in");
        }
        for name in &report.removed {
            tracing::info!(stage = %name, "stage removed");
        }
        for (name, reason) in &report.refused {
            tracing::error!(stage = %name, "new version refused, keeping the current one: {reason}");
        }
        let events = self.chain.take_events();
        self.absorb(events);
        if let Some(pause) = self.hold.on_swap(&report) {
            tracing::info!(stage = %pause.stage, "the paused stage changed: trying the held batch on it");
            self.m.stage_paused(&pause.stage, None);
        }
        // Commit the new versions' state with the next batch.
        self.snapshot_now = true;
    }

    /// Blocks while the input is paused, applying plans as they come,
    /// until one changes the paused stage (or shutdown).
    fn wait_for_swap(&mut self) -> Wait {
        use std::sync::mpsc::RecvTimeoutError;
        while self.hold.paused().is_some() {
            if self.settings.shutdown.load(Ordering::Relaxed) {
                return Wait::Shutdown;
            }
            match self.updates.recv_timeout(Duration::from_millis(200)) {
                Ok(update) => {
                    if let Some(plan) = self.take_update(update) {
                        self.apply_plan(plan);
                    }
                    self.take_updates();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Wait::NoReload,
            }
        }
        Wait::Resumed
    }

    /// Runs one batch; returns its commit, or `None` when the pause holds
    /// it again. Counts it in metrics and feeds the pause breaker.
    fn run(&mut self, mut batch: Batch) -> Option<Commit> {
        let partition = batch
            .partition
            .as_mut()
            .map(|m| (m.partition, m.restore.take()));
        if let Some((p, restore)) = partition {
            self.enter_partition(p, restore);
        }
        // A partition's state goes with every one of its batches: the
        // next batch of the partition may be another host's.
        let due = std::mem::take(&mut self.snapshot_now)
            || self.current_partition.is_some()
            || self.last_snapshot.elapsed() >= self.settings.snapshot_interval;
        if due {
            self.last_snapshot = Instant::now();
        }
        let m = self.m;
        let mut events = Vec::new();
        let ran = self.hold.run(&mut self.chain, batch, |chain, batch| {
            process(chain, batch, m, due, &mut events)
        });
        // A held batch's events are kept too: they happened.
        self.absorb(events);
        match ran {
            Ran::Commit(commit) => {
                let mut commit = *commit;
                if let Some(mark) = &commit.partition {
                    let states = commit
                        .snapshots
                        .iter()
                        .map(|s| (s.stage.name.clone(), s.state.clone()))
                        .collect();
                    self.partition_states.insert(mark.partition, states);
                }
                commit.plugin_events = std::mem::take(&mut self.events);
                record(m, &commit);
                if let Some(pause) = self.hold.observe(&commit) {
                    m.stage_paused(&pause.stage, Some(pause.describe()));
                }
                Some(commit)
            }
            Ran::Held(pause) => {
                m.stage_paused(&pause.stage, Some(pause.describe()));
                self.snapshot_now = due;
                None
            }
        }
    }

    /// Puts the chain in partition `p`'s state (`restore`d from the
    /// database when the partition was just taken), unless it is in it.
    fn enter_partition(&mut self, p: u32, restore: Option<Vec<(String, Vec<u8>)>>) {
        let restored = restore.is_some();
        if let Some(states) = restore {
            self.partition_states.insert(p, states);
        }
        if !restored && self.current_partition == Some(p) {
            return;
        }
        let states = self.partition_states.get(&p);
        let snapshots = self
            .chain
            .versions()
            .into_iter()
            .map(|stage| {
                let state = states
                    .and_then(|s| s.iter().find(|(name, _)| *name == stage.name))
                    .map(|(_, state)| state.clone())
                    .unwrap_or_default();
                StageSnapshot { stage, state }
            })
            .collect();
        self.chain.rewind(snapshots);
        self.current_partition = Some(p);
    }

    /// The last commit of a run: every stage's state, the shadow diffs
    /// still in flight and the events since the last batch. None for a
    /// shared stream: each partition's state went with its batches.
    fn finish(mut self) -> Option<Commit> {
        if self.current_partition.is_some() {
            return None;
        }
        let snapshots = self.chain.snapshots(true);
        let shadow_diffs = self.chain.finish_shadows();
        for diff in &shadow_diffs {
            record_shadow(self.m, diff);
        }
        let events = self.chain.take_events();
        self.absorb(events);
        if snapshots.is_empty() && shadow_diffs.is_empty() && self.events.is_empty() {
            return None;
        }
        let stages = self
            .chain
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
        Some(Commit {
            id: uuid::Uuid::new_v4(),
            snapshots,
            stages,
            shadow_diffs,
            plugin_events: self.events,
            ..Commit::default()
        })
    }
}

/// Runs one batch through the chain and gathers what its commit holds,
/// with the state of every every-batch stage, and of the interval ones
/// when `with_snapshots`. The plugin events the chain returns go to
/// `events` (the caller counts them and puts them on the commit); row
/// metrics are recorded by `record` once the commit is sure to be sent.
fn process(
    chain: &mut Chain,
    batch: Batch,
    m: &Metrics,
    with_snapshots: bool,
    events: &mut Vec<PluginEvent>,
) -> Commit {
    let rows_in = batch.rows();
    let mut out = chain.process(&batch.events);
    for run in &out.runs {
        m.stage_time(&run.stage.name, run.elapsed);
    }
    for diff in &out.shadows {
        record_shadow(m, diff);
    }
    events.append(&mut out.plugin_events);
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
                (r, origin)
            })
            .collect()
    };
    let dropped = batch
        .events
        .len()
        .saturating_sub(out.events.len() + rejections.len());
    let origins = batch
        .events
        .into_iter()
        .map(|e| e.event_id)
        .zip(batch.origins)
        .collect();
    let snapshots = chain.snapshots(with_snapshots);
    Commit {
        id: batch.id,
        opened: Some(batch.opened),
        read_time: batch.read_time,
        rows_in,
        events: out.events,
        malformed: batch.malformed,
        rejections,
        origins,
        dropped,
        positions: batch.positions.into_values().collect(),
        forget: batch.forget,
        stages: out.runs,
        snapshots,
        shadow_diffs: out.shadows,
        plugin_events: Vec::new(),
        partition: batch.partition,
    }
}

/// The row counters of a batch that goes to the sink.
fn record(m: &Metrics, c: &Commit) {
    Metrics::add(&m.rows_read, c.rows_in);
    Metrics::add(&m.rows_malformed, c.malformed.len());
    let failed = c.rejections.iter().filter(|(r, _)| r.failure).count();
    for (r, _) in c.rejections.iter().filter(|(r, _)| r.failure) {
        m.stage_failure(&r.stage, "event");
    }
    Metrics::add(&m.rows_failed, failed);
    Metrics::add(&m.rows_rejected, c.rejections.len() - failed);
    Metrics::add(&m.rows_dropped, c.dropped);
}

/// Counts a plugin event: loads and swaps, rejections by cause, shadow
/// candidates that cannot run or were disabled.
fn record_plugin_event(m: &Metrics, event: &PluginEvent) {
    match event.kind {
        PluginEventKind::Loaded | PluginEventKind::SwappedIn | PluginEventKind::Promoted => {
            m.plugin_loaded(&event.stage)
        }
        PluginEventKind::Rejected => {
            m.plugin_rejected(&event.stage, event.cause.unwrap_or("start"))
        }
        PluginEventKind::ShadowRejected | PluginEventKind::ShadowDisabled => {
            m.shadow_failure(&event.stage, event.cause.unwrap_or("unavailable"))
        }
        PluginEventKind::Removed | PluginEventKind::ShadowStarted | PluginEventKind::StateReset => {
        }
    }
}

/// Counts a shadow comparison: its rows by kind, or its failure.
fn record_shadow(m: &Metrics, diff: &ShadowDiff) {
    if let Some(counts) = &diff.counts {
        m.shadow_rows(&diff.stage, counts.kinds());
    }
    if let Some(kind) = diff.error_kind {
        m.shadow_failure(&diff.stage, kind);
    }
}

/// Sets `shutdown` on the first SIGINT/SIGTERM and reports it on the
/// returned channel; a second one exits the process at once (the
/// positions of what was not committed were not committed either).
fn spawn_signal_handler(shutdown: Arc<AtomicBool>) -> tokio::sync::oneshot::Receiver<()> {
    let (signalled, rx) = tokio::sync::oneshot::channel();
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
        tracing::info!(
            "shutting down: committing what is in flight (a second Ctrl-C exits at once)"
        );
        shutdown.store(true, Ordering::Relaxed);
        let _ = signalled.send(());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("second signal: exiting at once; what was not committed is read again at the next start");
        std::process::exit(130);
    });
    rx
}
