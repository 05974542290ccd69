//! `host bench`: measures the pipeline against what PostgreSQL itself can
//! do, in one run on one server, and prints a table (and JSON, to compare
//! commits).
//!
//! 1. generates the events into files (as `host generate` does);
//! 2. the ceiling: one binary `COPY` of the same rows, in the same order,
//!    into an empty copy of the table (with `--preload`, into a copy that
//!    already holds that many rows, like the pipeline's table);
//! 3. the two-session ceiling: the same rows split in two halves (each in
//!    the same order), copied at the same time on two connections into a
//!    second such copy: what the server does with two writers;
//! 4. the pipeline: `host run --once` over the files, with the plugins
//!    folder's stages, into the table, after a first run over no input
//!    has compiled the stages into the cache (a running host compiles
//!    once); events/s, the ratio to both ceilings, time per part (from the
//!    batch records) and the peak RSS;
//! 5. start-up: `host run` started with one file waiting, until its rows
//!    are visible (compiled components cached; the database is external);
//! 6. latency: files renamed into the input folder of a running host, at
//!    the generator's rate and at 10,000 events/s; per file, the time from
//!    the rename until its last row is visible to another connection;
//!    p50, p99, max; and the host's RSS while idle;
//! 7. CPU: user + system seconds per million events of step 4, the host's
//!    (from `getrusage` of its children) and the PostgreSQL server's (its
//!    process tree in /proc, when it runs here); and the running host's
//!    share of a core over 10 s idle and while files arrive at the seed's
//!    rate (from /proc/PID/stat).
//!
//! Same order matters: the rows arrive in random `event_id` order, so
//! every insert lands on a random page of the primary key's B-tree. COPY
//! of the same rows sorted by key only ever appends to the right-most
//! page and is ~2-3x faster; that is not a ceiling the pipeline could
//! reach without sorting its whole input first.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::SinkExt;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tokio_postgres::{Client, NoTls};

use crate::generate::{GenerateConfig, Generator};
use crate::parse::FileParser;
use crate::sink::{copy, schema};
use crate::stage::Event;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub events: usize,
    pub events_per_file: usize,
    pub duplicate_rate: f64,
    pub preload: usize,
    pub admin_url: String,
    pub plugins: PathBuf,
    pub work_dir: PathBuf,
    pub latency_seconds: u64,
    pub batch_size: Option<usize>,
    pub writers: Option<usize>,
    pub output: PathBuf,
}

impl BenchConfig {
    /// `host run` with the settings every run of the benchmark shares.
    fn host_run(&self, host: &Path, input: &Path, state: &Path, url: &str) -> Command {
        let mut cmd = Command::new(host);
        cmd.args(["run", "--metrics-addr", "off", "--plugins"])
            .arg(&self.plugins)
            .arg("--input")
            .arg(input)
            .arg("--state-dir")
            .arg(state)
            .args(["--database-url", url])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(n) = self.batch_size {
            cmd.args(["--batch-size", &n.to_string()]);
        }
        if let Some(n) = self.writers {
            cmd.args(["--writers", &n.to_string()]);
        }
        cmd
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub commit: String,
    pub events: usize,
    pub preload: usize,
    /// `host run --writers` of the pipeline run.
    pub writers: usize,
    pub rows_written: i64,
    pub ceiling_s: f64,
    pub ceiling_eps: f64,
    pub pipeline_s: f64,
    pub pipeline_eps: f64,
    pub ratio: f64,
    /// The same rows in two parallel COPYs on two connections.
    pub ceiling2_s: f64,
    pub ceiling2_eps: f64,
    /// The pipeline's events/s over the two-session ceiling's.
    pub ratio2: f64,
    /// Sums over the batch records; the parts overlap in time.
    pub read_parse_s: f64,
    pub stage_s: Vec<(String, f64)>,
    pub database_s: f64,
    pub batches: i64,
    pub peak_rss_mb: f64,
    pub startup_ms: Option<f64>,
    /// The embedded PostgreSQL (the default without --database-url):
    /// initdb + first start, and a start of the existing cluster; not part
    /// of `startup_ms`. `None` where no server binaries are installed.
    pub embedded_init_ms: Option<f64>,
    pub embedded_start_ms: Option<f64>,
    pub latency: Vec<Latency>,
    pub idle_rss_mb: Option<f64>,
    /// CPU seconds (user + system) per million events of `host run
    /// --once`: the host's own, and the PostgreSQL server's (postmaster,
    /// backends, background writers; `None` when the server is not a
    /// local process this one can read).
    pub host_cpu_s_per_m: f64,
    pub postgres_cpu_s_per_m: Option<f64>,
    /// The running host's share of one core over 10 s with nothing
    /// arriving, and while files arrive at the seed's rate.
    pub idle_cpu_pct: Option<f64>,
    pub seed_rate_cpu_pct: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub rate: String,
    pub files: usize,
    pub events_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn run(config: BenchConfig) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let host = std::env::current_exe().context("cannot find the host binary")?;
    prepare_work_dir(&config.work_dir)?;
    let input = config.work_dir.join("input");
    std::fs::create_dir_all(&input)
        .with_context(|| format!("cannot create {}", input.display()))?;

    let mut report = Report {
        commit: git_commit(),
        events: config.events,
        preload: config.preload,
        writers: config
            .writers
            .unwrap_or_else(crate::pipeline::default_writers),
        ..Report::default()
    };

    eprintln!(
        "generating {} events into {}",
        config.events,
        input.display()
    );
    let files = config.events.div_ceil(config.events_per_file.max(1));
    let mut generator = Generator::new(GenerateConfig {
        output: input.clone(),
        interval: Duration::ZERO,
        events_per_file: config.events_per_file,
        files: Some(files as u64),
        duplicate_rate: config.duplicate_rate,
        invalid_rate: 0.0,
        seed: Some(1),
    });
    for _ in 0..files {
        generator
            .write_file()
            .context("cannot write the input files")?;
    }
    let rows = distinct_rows_in_order(&input)?;
    let row_count = rows.len() as f64;

    let db = format!("bench_{}", std::process::id());
    let url = database_url(&config.admin_url, &db);
    runtime.block_on(async {
        let admin = connect(&config.admin_url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await?;
        drop(admin);
        let admin = connect(&config.admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .with_context(|| format!("cannot create database {db}"))?;
        let client = connect(&url).await?;
        prepare_tables(&client, config.preload).await?;
        eprintln!("ceiling: COPY of {} rows", rows.len());
        let started = Instant::now();
        copy_rows(&client, "ceiling", &rows).await?;
        report.ceiling_s = started.elapsed().as_secs_f64();
        // Each measurement starts from a checkpoint, not from the dirty
        // pages and WAL of the one before.
        client.batch_execute("CHECKPOINT").await?;
        eprintln!(
            "ceiling: two parallel COPYs of {} rows each",
            rows.len() / 2
        );
        report.ceiling2_s = copy_in_two_sessions(&url, rows).await?;
        client.batch_execute("CHECKPOINT").await?;
        anyhow::Ok(())
    })?;
    report.ceiling_eps = row_count / report.ceiling_s;
    report.ceiling2_eps = row_count / report.ceiling2_s;

    // The child shows its own progress (a bar on a terminal) on the
    // stderr it inherits.
    let state = config.work_dir.join("state");
    // A host compiles its stages once, at its first start (the start-up
    // figures below show that cost): a first run over no input fills the
    // compile cache, so that the measured one is the steady pipeline.
    let empty = config.work_dir.join("empty");
    std::fs::create_dir_all(&empty)
        .with_context(|| format!("cannot create {}", empty.display()))?;
    let warm = config
        .host_run(&host, &empty, &state, &url)
        .arg("--once")
        .status()
        .context("cannot start host run")?;
    if !warm.success() {
        bail!("host run --once over no input (to fill the compile cache) failed ({warm})");
    }
    eprintln!("pipeline: host run --once over {files} files");
    let postgres = runtime.block_on(Postmaster::find(&url));
    let postgres_before = postgres.as_ref().and_then(Postmaster::cpu_ticks);
    let host_before = children_cpu_s();
    let started = Instant::now();
    let child = config
        .host_run(&host, &input, &state, &url)
        .arg("--once")
        .spawn()
        .context("cannot start host run")?;
    let (status, peak_kb) = wait_with_peak_rss(child)?;
    report.pipeline_s = started.elapsed().as_secs_f64();
    // The host is this process's only child while it runs: what its
    // children used since is the host's CPU.
    let per_m = 1e6 / config.events.max(1) as f64;
    report.host_cpu_s_per_m = (children_cpu_s() - host_before) * per_m;
    report.postgres_cpu_s_per_m = postgres_before
        .zip(postgres.as_ref().and_then(Postmaster::cpu_ticks))
        .map(|(before, after)| after.saturating_sub(before) as f64 / clock_ticks() * per_m);
    if !status.success() {
        bail!("host run --once failed ({status})");
    }
    report.pipeline_eps = config.events as f64 / report.pipeline_s;
    report.ratio = report.pipeline_eps / report.ceiling_eps;
    report.ratio2 = report.pipeline_eps / report.ceiling2_eps;
    report.peak_rss_mb = peak_kb as f64 / 1024.0;
    runtime.block_on(parts(&url, config.preload, &mut report))?;

    if config.latency_seconds > 0 {
        runtime.block_on(async {
            let admin = connect(&config.admin_url).await?;
            admin.batch_execute(&format!("DROP DATABASE {db}")).await?;
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await?;
            anyhow::Ok(())
        })?;
        live(&config, &host, &state, &url, &runtime, &mut report)?;
    }

    runtime.block_on(async {
        let admin = connect(&config.admin_url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await?;
        anyhow::Ok(())
    })?;
    if config.latency_seconds > 0 {
        embedded_start(&config.work_dir.join("embedded"), &mut report);
    }
    print(&report);
    if let Some(dir) = config.output.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&config.output, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", config.output.display()))?;
    println!("written: {}", config.output.display());
    Ok(report)
}

/// The rows the table must end up with, in the order the pipeline meets
/// them: every valid record, first occurrence of each id.
fn distinct_rows_in_order(input: &Path) -> anyhow::Result<Vec<Event>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(input)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut seen = HashSet::new();
    let mut rows = Vec::new();
    for file in files {
        let data = std::fs::read(&file)?;
        let mut parser = FileParser::default();
        parser.parse(&data, 1, true, |parsed| {
            if let Ok(event) = parsed.result {
                if seen.insert(event.event_id.clone()) {
                    rows.push(event);
                }
            }
        });
    }
    Ok(rows)
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("cannot connect to {}", crate::sink::redact(url)))?;
    tokio::spawn(connection);
    Ok(client)
}

fn database_url(admin: &str, db: &str) -> String {
    match admin.rsplit_once('/') {
        Some((base, _)) if base.contains("://") && !base.ends_with('/') => format!("{base}/{db}"),
        _ => format!("{admin}/{db}"),
    }
}

/// The pipeline's table, as the host defines it, and the ceiling's copy
/// of it, both holding `preload` rows (the same ones) when asked. Loaded
/// without the key, which is then built once: as fast as a load gets.
async fn prepare_tables(client: &Client, preload: usize) -> anyhow::Result<()> {
    client.batch_execute(schema::EVENTS_TABLE).await?;
    client
        .batch_execute(
            "ALTER TABLE ecommerce_events DROP CONSTRAINT ecommerce_events_pkey;
             CREATE TABLE ceiling (LIKE ecommerce_events INCLUDING ALL);
             CREATE TABLE ceiling2 (LIKE ecommerce_events INCLUDING ALL);",
        )
        .await?;
    if preload > 0 {
        eprintln!("preloading {preload} rows into both tables");
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut chunk = Vec::with_capacity(100_000);
        let mut left = preload;
        while left > 0 {
            chunk.clear();
            for _ in 0..left.min(100_000) {
                let bytes: [u8; 16] = rng.random();
                chunk.push(Event {
                    event_id: uuid::Builder::from_random_bytes(bytes)
                        .into_uuid()
                        .hyphenated()
                        .to_string(),
                    user_id: rng.random_range(1..10_000),
                    event_type: "view".into(),
                    product_id: rng.random_range(1..1_000),
                    price_cents: rng.random_range(100..100_000),
                    event_time: 1_767_225_600_000_000 + rng.random_range(0..1_000_000_000_000i64),
                });
            }
            copy_rows(client, "ceiling", &chunk).await?;
            left -= chunk.len();
        }
        client
            .batch_execute(
                "INSERT INTO ecommerce_events SELECT * FROM ceiling;
                 INSERT INTO ceiling2 SELECT * FROM ceiling;",
            )
            .await?;
    }
    for statement in [
        "ALTER TABLE ceiling ADD PRIMARY KEY (event_id)",
        "ALTER TABLE ceiling2 ADD PRIMARY KEY (event_id)",
        "ALTER TABLE ecommerce_events ADD CONSTRAINT ecommerce_events_pkey PRIMARY KEY (event_id)",
        "VACUUM ANALYZE ceiling",
        "VACUUM ANALYZE ceiling2",
        "VACUUM ANALYZE ecommerce_events",
        "CHECKPOINT",
    ] {
        client.batch_execute(statement).await?;
    }
    Ok(())
}

/// The two-session ceiling: the first half of `rows` and the second,
/// each in its order, copied into `ceiling2` at the same time on two
/// connections (each on its own task, so the encoding of one does not
/// wait for the other). Returns the seconds until both are done.
async fn copy_in_two_sessions(url: &str, rows: Vec<Event>) -> anyhow::Result<f64> {
    let mut first = rows;
    let second = first.split_off(first.len() / 2);
    let (a, b) = (connect(url).await?, connect(url).await?);
    let started = Instant::now();
    let copy = |client: Client, rows: Vec<Event>| {
        tokio::spawn(async move { copy_rows(&client, "ceiling2", &rows).await })
    };
    let (first, second) = (copy(a, first), copy(b, second));
    let (first, second) = (first.await, second.await);
    first.context("the first COPY session failed to run")??;
    second.context("the second COPY session failed to run")??;
    Ok(started.elapsed().as_secs_f64())
}

/// One binary COPY of `rows` into `table`, sent in pieces.
async fn copy_rows(client: &Client, table: &str, rows: &[Event]) -> anyhow::Result<()> {
    let sink = client
        .copy_in(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
        .await?;
    futures_util::pin_mut!(sink);
    for (i, part) in rows.chunks(10_000).enumerate() {
        // The encoder writes a whole COPY stream; send the header once,
        // the rows of every piece, and the trailer once.
        let bytes = copy::encode_events(part);
        let start = if i == 0 { 0 } else { copy::HEADER_LEN };
        sink.send(bytes.slice(start..bytes.len() - copy::TRAILER_LEN))
            .await?;
    }
    if rows.is_empty() {
        let header = copy::encode_events(&[]).slice(..copy::HEADER_LEN);
        sink.send(header).await?;
    }
    sink.send(bytes::Bytes::from_static(b"\xff\xff")).await?;
    sink.finish().await?;
    Ok(())
}

/// Per-part times from the batch records.
async fn parts(url: &str, preload: usize, report: &mut Report) -> anyhow::Result<()> {
    let client = connect(url).await?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM ecommerce_events", &[])
        .await?
        .get(0);
    report.rows_written = rows - preload as i64;
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(read_ms), 0) / 1000, coalesce(sum(write_ms), 0) / 1000 FROM pipeline.batches",
            &[],
        )
        .await?;
    report.batches = row.get(0);
    report.read_parse_s = row.get(1);
    report.database_s = row.get(2);
    for row in client
        .query(
            "SELECT s->>'name', sum((s->>'ms')::float8) / 1000 FROM pipeline.batches, jsonb_array_elements(stages) s
             GROUP BY 1 ORDER BY min(batch_id)",
            &[],
        )
        .await?
    {
        report.stage_s.push((row.get(0), row.get(1)));
    }
    Ok(())
}

/// Start-up, latency at two rates, and idle RSS, against a running host.
fn live(
    config: &BenchConfig,
    host: &Path,
    state: &Path,
    url: &str,
    runtime: &tokio::runtime::Runtime,
    report: &mut Report,
) -> anyhow::Result<()> {
    let input = config.work_dir.join("live");
    let staging = config.work_dir.join("live-staging");
    std::fs::create_dir_all(&input)?;
    std::fs::create_dir_all(&staging)?;
    let mut files = FileFeed::new(&staging, &input);

    // Start-up: one file waits in the folder when the host starts.
    let first = files.next(100)?;
    let started = Instant::now();
    let mut child = config
        .host_run(host, &input, state, url)
        .spawn()
        .context("cannot start host run")?;
    let result = runtime.block_on(async {
        let client = connect(url).await?;
        wait_visible(
            &client,
            std::slice::from_ref(&first.last_id),
            Duration::from_secs(60),
        )
        .await?;
        report.startup_ms = Some(started.elapsed().as_secs_f64() * 1000.0);

        // Idle: nothing arrives for 10 s; the host should sleep.
        eprintln!("idle: the host's CPU over 10 s with nothing arriving");
        let idle = CpuWindow::start(child.id());
        tokio::time::sleep(Duration::from_secs(10)).await;
        report.idle_cpu_pct = idle.and_then(|w| w.share_pct());

        let feed = Feed { url, child: &child };
        let at_seed_rate = CpuWindow::start(child.id());
        let seed = feed
            .rate(
                &mut files,
                100,
                Duration::from_secs(5),
                config.latency_seconds,
            )
            .await?;
        report.seed_rate_cpu_pct = at_seed_rate.and_then(|w| w.share_pct());
        report.idle_rss_mb = seed.1;
        report.latency.push(seed.0);
        let seconds = config.latency_seconds.div_ceil(3);
        let fast = feed
            .rate(&mut files, 1000, Duration::from_millis(100), seconds)
            .await?;
        report.latency.push(fast.0);
        anyhow::Ok(())
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

/// Files of generated events, written aside and renamed into the input
/// folder by the caller's clock.
struct FileFeed {
    generator: Generator,
    input: PathBuf,
}

struct Fed {
    last_id: String,
    renamed: Instant,
}

impl FileFeed {
    fn new(staging: &Path, input: &Path) -> FileFeed {
        FileFeed {
            generator: Generator::new(GenerateConfig {
                output: staging.to_owned(),
                interval: Duration::ZERO,
                events_per_file: 0,
                files: None,
                duplicate_rate: 0.0,
                invalid_rate: 0.0,
                seed: None,
            }),
            input: input.to_owned(),
        }
    }

    /// Writes a file of `events` aside, then renames it into the input.
    fn next(&mut self, events: usize) -> anyhow::Result<Fed> {
        self.generator.set_events_per_file(events);
        let path = self.generator.write_file()?;
        let text = std::fs::read_to_string(&path)?;
        let last_id = text
            .lines()
            .last()
            .and_then(|l| l.split(',').next())
            .unwrap_or_default()
            .to_owned();
        let target = self.input.join(path.file_name().unwrap_or_default());
        let renamed = Instant::now();
        std::fs::rename(&path, target)?;
        Ok(Fed { last_id, renamed })
    }
}

/// A running host and the database it writes to.
struct Feed<'a> {
    url: &'a str,
    child: &'a Child,
}

impl Feed<'_> {
    /// Feeds files of `events` every `every` for `seconds`; returns the
    /// latency figures and the largest RSS seen just before a file, when
    /// the host has been idle since the last one.
    async fn rate(
        &self,
        files: &mut FileFeed,
        events: usize,
        every: Duration,
        seconds: u64,
    ) -> anyhow::Result<(Latency, Option<f64>)> {
        let label = format!(
            "{events} events every {every:?} ({:.0} events/s)",
            events as f64 / every.as_secs_f64()
        );
        eprintln!("latency: {label}, for {seconds} s");
        let pending: Arc<Mutex<Vec<Fed>>> = Arc::default();
        let done: Arc<Mutex<Vec<f64>>> = Arc::default();
        let poller = tokio::spawn(poll_visible(
            connect(self.url).await?,
            pending.clone(),
            done.clone(),
        ));
        let count = (seconds * 1000 / every.as_millis().max(1) as u64).max(1) as usize;
        let start = Instant::now();
        let mut idle_rss: Option<f64> = None;
        let mut progress = crate::progress::Progress::new(
            "bench latency",
            count as u64,
            crate::progress::Unit::Files,
        );
        for i in 0..count {
            tokio::time::sleep_until((start + every * i as u32).into()).await;
            if let Some(rss) = rss_mb(self.child.id()) {
                idle_rss = Some(idle_rss.map_or(rss, |r: f64| r.max(rss)));
            }
            let fed = files.next(events)?;
            lock(&pending).push(fed);
            progress.set(i as u64 + 1, label.clone());
        }
        progress.finish();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lock(&pending).is_empty() {
            if poller.is_finished() || Instant::now() > deadline {
                bail!("the rows of some files did not become visible within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        poller.abort();
        let mut ms = lock(&done).clone();
        ms.sort_by(f64::total_cmp);
        let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
        Ok((
            Latency {
                rate: label,
                files: ms.len(),
                events_per_s: (count * events) as f64 / start.elapsed().as_secs_f64(),
                p50_ms: pct(0.50),
                p99_ms: pct(0.99),
                max_ms: pct(1.0),
            },
            idle_rss,
        ))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Polls every millisecond for the last row of each pending file; the
/// time from its rename to the poll that sees it is its latency.
async fn poll_visible(
    client: Client,
    pending: Arc<Mutex<Vec<Fed>>>,
    done: Arc<Mutex<Vec<f64>>>,
) -> anyhow::Result<()> {
    let query = client
        .prepare("SELECT event_id::text FROM ecommerce_events WHERE event_id = ANY($1::text[])")
        .await?;
    loop {
        let ids: Vec<String> = lock(&pending).iter().map(|f| f.last_id.clone()).collect();
        if ids.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let found: HashSet<String> = client
            .query(&query, &[&ids])
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let seen = Instant::now();
        if !found.is_empty() {
            let mut pending = lock(&pending);
            let mut done = lock(&done);
            pending.retain(|f| {
                if found.contains(&f.last_id) {
                    done.push((seen - f.renamed).as_secs_f64() * 1000.0);
                    false
                } else {
                    true
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn wait_visible(client: &Client, ids: &[String], patience: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        let ready = client
            .query_one("SELECT to_regclass('ecommerce_events') IS NOT NULL", &[])
            .await?
            .get::<_, bool>(0);
        if ready {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM ecommerce_events WHERE event_id = ANY($1::text[])",
                    &[&ids],
                )
                .await?
                .get(0);
            if n as usize == ids.len() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the host did not commit the first file within {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The file `host bench` leaves in a work folder it made: only such a
/// folder is ever deleted.
pub const WORK_DIR_MARKER: &str = ".made-by-host-bench";

/// Empties the work folder from an earlier run, if `host bench` made it;
/// refuses a folder that holds anything else, which it never deletes.
fn prepare_work_dir(dir: &Path) -> anyhow::Result<()> {
    let marker = dir.join(WORK_DIR_MARKER);
    let made_here = std::fs::symlink_metadata(&marker).is_ok_and(|m| m.is_file());
    let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    if dir.exists() && !made_here && !empty {
        anyhow::bail!(
            "--work-dir {} exists and was not made by host bench (it has no {WORK_DIR_MARKER} file), so it is not deleted: pass a new or empty folder, or remove this one yourself",
            dir.display()
        );
    }
    if made_here {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("cannot empty the work folder {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the work folder {}", dir.display()))?;
    std::fs::write(
        &marker,
        "made by `host bench`; it deletes this folder on its next run\n",
    )
    .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(())
}

/// Times the embedded PostgreSQL's start: a new cluster (initdb), then
/// the same cluster again. Reported, not fatal: the machine may have no
/// server binaries, and the pipeline figures stand without it.
fn embedded_start(dir: &Path, report: &mut Report) {
    use crate::embedded::{EmbeddedPostgres, Tuning};
    let _ = std::fs::remove_dir_all(dir);
    let timed = || -> Result<f64, crate::embedded::EmbeddedError> {
        let started = Instant::now();
        let server = EmbeddedPostgres::start(dir, &Tuning::default())?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        drop(server); // stops it
        Ok(ms)
    };
    match (timed(), timed()) {
        (Ok(init), Ok(start)) => {
            report.embedded_init_ms = Some(init);
            report.embedded_start_ms = Some(start);
        }
        (Err(e), _) | (_, Err(e)) => eprintln!("embedded PostgreSQL not measured: {e}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits for the child and returns its exit status and peak RSS in KiB.
///
/// The peak is the kernel's high-water mark of the child's own address
/// space (`VmHWM`), read until it exits. Not `wait4`'s `ru_maxrss`: that
/// also counts the copy of this process the child was forked from.
fn wait_with_peak_rss(mut child: Child) -> anyhow::Result<(std::process::ExitStatus, i64)> {
    let mut peak = 0.0f64;
    loop {
        if let Some(kb) = proc_status_kb(child.id(), "VmHWM:") {
            peak = peak.max(kb);
        }
        if let Some(status) = child.try_wait()? {
            return Ok((status, peak as i64));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Clock ticks per second, the unit of /proc's CPU times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Fields of /proc/PID/stat after the command name (which may hold
/// spaces): index 0 is the state, 1 the parent pid, 11..=14 utime,
/// stime, cutime, cstime.
fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// User + system CPU of a process itself, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = proc_stat(pid)?;
    Some(f.get(11)? + f.get(12)?)
}

/// CPU seconds used by this process's waited-for children so far.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// One process's CPU over a window of wall time.
struct CpuWindow {
    pid: u32,
    ticks: u64,
    started: Instant,
}

impl CpuWindow {
    fn start(pid: u32) -> Option<CpuWindow> {
        Some(CpuWindow {
            pid,
            ticks: cpu_ticks(pid)?,
            started: Instant::now(),
        })
    }

    /// Percent of one core used since `start`.
    fn share_pct(&self) -> Option<f64> {
        let ticks = cpu_ticks(self.pid)?.saturating_sub(self.ticks);
        Some(ticks as f64 / clock_ticks() / self.started.elapsed().as_secs_f64() * 100.0)
    }
}

/// The PostgreSQL server's postmaster, when it runs on this machine: the
/// parent of our backend.
struct Postmaster(u32);

impl Postmaster {
    async fn find(url: &str) -> Option<Postmaster> {
        let client = connect(url).await.ok()?;
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .ok()?
            .get(0);
        let parent = *proc_stat(backend as u32)?.get(1)?;
        Some(Postmaster(parent as u32))
    }

    /// CPU of the whole server so far, in ticks: the postmaster, the
    /// processes it runs now, and those it has reaped (cutime, cstime).
    fn cpu_ticks(&self) -> Option<u64> {
        let f = proc_stat(self.0)?;
        let mut ticks = f.get(11)? + f.get(12)? + f.get(13)? + f.get(14)?;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(f) = proc_stat(pid) {
                if f.get(1) == Some(&(self.0 as u64)) {
                    ticks += f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
                }
            }
        }
        Some(ticks)
    }
}

/// Resident memory of a process now, in MiB.
fn rss_mb(pid: u32) -> Option<f64> {
    proc_status_kb(pid, "VmRSS:").map(|kb| kb / 1024.0)
}

/// A `kB` field of /proc/PID/status.
fn proc_status_kb(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn print(r: &Report) {
    let line = |k: &str, v: String| println!("{k:<34} {v}");
    line("commit", r.commit.clone());
    line("events (1% duplicates)", r.events.to_string());
    line("rows already in the table", r.preload.to_string());
    line("rows written", r.rows_written.to_string());
    line("writers (host run --writers)", r.writers.to_string());
    line(
        "COPY ceiling (same rows, order)",
        format!("{:.2} s   {:.0} events/s", r.ceiling_s, r.ceiling_eps),
    );
    line(
        "pipeline (host run --once)",
        format!("{:.2} s   {:.0} events/s", r.pipeline_s, r.pipeline_eps),
    );
    line(
        "COPY ceiling, two sessions",
        format!("{:.2} s   {:.0} events/s", r.ceiling2_s, r.ceiling2_eps),
    );
    line("ratio to the ceiling", format!("{:.2}", r.ratio));
    line("ratio to two-session ceiling", format!("{:.2}", r.ratio2));
    line(
        "parts (summed, they overlap)",
        format!("{} batches", r.batches),
    );
    line("  read + parse", format!("{:.2} s", r.read_parse_s));
    for (name, s) in &r.stage_s {
        line(&format!("  stage {name}"), format!("{s:.2} s"));
    }
    line("  database (rows)", format!("{:.2} s", r.database_s));
    line("peak RSS (backlog)", format!("{:.0} MB", r.peak_rss_mb));
    line(
        "CPU per 1M events: host",
        format!("{:.2} s", r.host_cpu_s_per_m),
    );
    if let Some(s) = r.postgres_cpu_s_per_m {
        line("CPU per 1M events: PostgreSQL", format!("{s:.2} s"));
    }
    if let Some(ms) = r.startup_ms {
        line("start to first commit (cached)", format!("{ms:.0} ms"));
    }
    if let (Some(init), Some(start)) = (r.embedded_init_ms, r.embedded_start_ms) {
        line(
            "embedded PostgreSQL start",
            format!("{start:.0} ms ({init:.0} ms the first time, with initdb)"),
        );
    }
    for l in &r.latency {
        line(
            &format!("latency, {}", l.rate),
            format!(
                "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} files)",
                l.p50_ms, l.p99_ms, l.max_ms, l.files
            ),
        );
    }
    if let Some(mb) = r.idle_rss_mb {
        line("RSS idle", format!("{mb:.0} MB"));
    }
    if let Some(pct) = r.idle_cpu_pct {
        line("host CPU idle (10 s)", format!("{pct:.1}% of a core"));
    }
    if let Some(pct) = r.seed_rate_cpu_pct {
        line("host CPU at the seed rate", format!("{pct:.1}% of a core"));
    }
}
