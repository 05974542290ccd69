//! Command-line interface (clap). Each subcommand maps to one module.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::stage::limits::parse_duration;

#[derive(Parser, Debug)]
#[command(
    name = "host",
    version,
    about = "Streams ecommerce events from CSV files through WebAssembly stages into PostgreSQL, exactly once.",
    long_about = "Streams ecommerce events from CSV files through WebAssembly stages into PostgreSQL, exactly once.\n\n\
        Typical use:\n  host generate &                 # write a file of 100 events every 5 s into data/input/\n  \
        host run --plugins plugins/     # ingest them; starts its own PostgreSQL unless --database-url is given"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the pipeline: watch the input folder, run the stages, write to PostgreSQL.
    Run(RunArgs),
    /// Write CSV files of synthetic ecommerce events (the test and demo data source).
    Generate(GenerateArgs),
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// List the manifest's stages (component, hash, version, whether it
    /// loads, limits, grants, shadow candidate, and what the database last
    /// committed with it), or promote a shadow candidate.
    Plugins(PluginsArgs),
    /// Run stored input files through the manifest's chain with one stage's
    /// candidate version beside the live one, and print how their outputs
    /// differ (as shadow mode records it), writing nothing.
    Replay(ReplayArgs),
    /// The records that did not reach the table: list the open ones, or
    /// replay them through the current stages once the cause is fixed.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Measure the pipeline against PostgreSQL's own COPY ceiling, its
    /// latency from file to table, and its memory; print a table and JSON.
    Bench(BenchArgs),
    /// Watch a running host in the terminal: stages with totals and rates,
    /// lag, latency, the last plugin events (q quits, s sorts, / filters).
    Top(TopArgs),
}

#[derive(Subcommand, Debug)]
pub enum QuarantineCommand {
    /// Count the open quarantine rows by kind, stage and reason, and show
    /// samples (file, line, raw text, reason). Rows already replayed are
    /// left out.
    List(QuarantineListArgs),
    /// Run open rejected and failed records (or, with --kind malformed,
    /// malformed ones, parsed again) through the manifest's current chain:
    /// what it keeps is written exactly once, what it rejects is
    /// quarantined again, and the replayed rows are marked with the batch
    /// that committed them. Safe beside a running host and when killed.
    Replay(QuarantineReplayArgs),
}

#[derive(Args, Debug)]
pub struct QuarantineFilterArgs {
    /// Only rows of this kind (repeatable) [default: list all; replay
    /// rejected and failed].
    #[arg(long = "kind", value_enum)]
    pub kinds: Vec<crate::quarantine::Kind>,
    /// Only rows of this stage.
    #[arg(long)]
    pub stage: Option<String>,
    /// Only rows whose reason contains this text (any case).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only rows quarantined since this time (RFC 3339 or a date), or for
    /// this long ("2h", "30m").
    #[arg(long)]
    pub since: Option<String>,
    /// The database the pipeline writes to.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl QuarantineFilterArgs {
    pub fn filter(&self) -> crate::quarantine::Filter {
        crate::quarantine::Filter {
            kinds: self.kinds.clone(),
            stage: self.stage.clone(),
            reason: self.reason.clone(),
            since: self.since.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct QuarantineListArgs {
    #[command(flatten)]
    pub filter: QuarantineFilterArgs,
    /// Sample rows to show.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
}

#[derive(Args, Debug)]
pub struct QuarantineReplayArgs {
    #[command(flatten)]
    pub filter: QuarantineFilterArgs,
    /// Folder with the plugin manifest (pipeline.toml) and the stage components.
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Records per batch (one chain call and one transaction each).
    #[arg(long, default_value_t = 5000)]
    pub batch_size: usize,
    /// Compiled-component cache; "off" disables.
    #[arg(long, default_value = "data/cache")]
    pub cache_dir: PathBuf,
    /// Print what would be kept, changed and rejected; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    /// The running host's --metrics-addr.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub addr: String,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PluginsArgs {
    #[command(subcommand)]
    pub command: Option<PluginsCommand>,
    #[command(flatten)]
    pub list: PluginsListArgs,
}

#[derive(Subcommand, Debug)]
pub enum PluginsCommand {
    /// Make a stage's shadow candidate its live component: rewrites
    /// pipeline.toml (component = the shadow file, shadow removed), which a
    /// running host swaps in at the next batch boundary.
    Promote(PromoteArgs),
}

#[derive(Args, Debug)]
pub struct PluginsListArgs {
    /// Folder with the plugin manifest (pipeline.toml) and the stage components.
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Also show what this database last committed per stage (read only).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Compiled-component cache [default: $XDG_CACHE_HOME/ecommerce-pipeline,
    /// else ~/.cache/ecommerce-pipeline]; "off" disables.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// The stage whose shadow candidate becomes live.
    pub stage: String,
    /// Folder with the plugin manifest (pipeline.toml).
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Version label for the promoted component [default: the old label is
    /// removed, so batches record the new file's hash prefix].
    #[arg(long)]
    pub version: Option<String>,
    /// Compiled-component cache (the candidate is type-checked first)
    /// [default: $XDG_CACHE_HOME/ecommerce-pipeline, else
    /// ~/.cache/ecommerce-pipeline]; "off" disables.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Events to generate and ingest.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Events per generated file.
    #[arg(long, default_value_t = 10_000)]
    pub events_per_file: usize,
    /// Share of events that repeat an earlier one.
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_rate: f64,
    /// Rows the table (and the ceiling's copy of it) already holds before
    /// the measurement, e.g. 5000000.
    #[arg(long, default_value_t = 0)]
    pub preload: usize,
    /// A PostgreSQL server the benchmark may create a scratch database on
    /// (it is dropped at the end).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Folder with the plugin manifest and the stages to measure.
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Scratch folder for the generated files and the host's state.
    #[arg(long, default_value = "target/bench")]
    pub work_dir: PathBuf,
    /// Seconds of the latency run at the generator's rate (a third of it
    /// at 10,000 events/s); 0 skips start-up, latency and idle memory.
    #[arg(long, default_value_t = 60)]
    pub latency_seconds: u64,
    /// Passed on to `host run --batch-size` [default: host run's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Passed on to `host run --writers` [default: host run's].
    #[arg(long)]
    pub writers: Option<usize>,
    /// Where the JSON result goes [default: <work-dir>/result.json].
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Folder of stored input files (CSV, as `host run` reads them).
    #[arg(long)]
    pub input: PathBuf,
    /// The candidate component (.wasm).
    #[arg(long)]
    pub component: PathBuf,
    /// The manifest stage the candidate would replace.
    #[arg(long)]
    pub stage: String,
    /// Folder with the plugin manifest (pipeline.toml) and the live components.
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Records per batch, as `host run --batch-size`.
    #[arg(long, default_value_t = 20_000)]
    pub batch_size: usize,
    /// Compiled-component cache; "off" disables.
    #[arg(long, default_value = "data/cache")]
    pub cache_dir: PathBuf,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Run one component over a CSV sample without PostgreSQL and show, per
    /// row, what it kept, changed, rejected or dropped.
    Test(PluginTestArgs),
    /// Scaffold a working stage (source, build script, sample, manifest entry).
    New(PluginNewArgs),
}

#[derive(Args, Debug)]
pub struct PluginNewArgs {
    /// The stage's name (a-z, 0-9, _).
    pub name: String,
    /// Language of the stage.
    #[arg(long, value_enum)]
    pub lang: crate::scaffold::Lang,
    /// The plugins folder; the stage goes into <plugins>/<lang>/<name>/.
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
}

#[derive(Args, Debug)]
pub struct PluginTestArgs {
    /// The component (.wasm) to run.
    pub component: PathBuf,
    /// A CSV sample, in the pipeline's input format.
    #[arg(long)]
    pub input: PathBuf,
    /// A config setting handed to `init`, as KEY=VALUE (repeatable).
    #[arg(long = "config", value_parser = key_value)]
    pub config: Vec<(String, String)>,
    /// A capability to grant: clock, random, stderr (repeatable).
    #[arg(long = "grant")]
    pub grants: Vec<String>,
    /// Events per call.
    #[arg(long, default_value_t = 5000)]
    pub batch_size: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Compiled-component cache [default: $XDG_CACHE_HOME/ecommerce-pipeline,
    /// else ~/.cache/ecommerce-pipeline]; "off" disables.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text)
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Folder with the plugin manifest (pipeline.toml) and the stage components.
    #[arg(long, default_value = "plugins")]
    pub plugins: PathBuf,
    /// Folder the CSV files arrive in, or nats://HOST:PORT/STREAM: a NATS
    /// JetStream stream shared with other hosts (one CSV line a message;
    /// created when missing, see --partitions and --lease).
    #[arg(long, default_value = "data/input")]
    pub input: PathBuf,
    /// PostgreSQL to write to. Without it (and without DATABASE_URL) the host
    /// starts its own PostgreSQL cluster under --state-dir and prints its URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Largest batch, in CSV records: one stage call and one transaction
    /// each. Larger batches spread the per-batch costs (commit, round
    /// trips) over more rows; each one in flight costs ~4 MB at 20000.
    /// Small inputs do not wait for a batch to fill (see --batch-interval).
    #[arg(long, default_value_t = 20_000)]
    pub batch_size: usize,
    /// Longest a batch stays open while input keeps arriving (idle input
    /// is committed at once).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub batch_interval: Duration,
    /// Process every file present, commit, and exit (backfill, tests, benchmarks).
    #[arg(long)]
    pub once: bool,
    /// Where the dashboard (/), /api/status, /metrics (Prometheus) and
    /// /healthz are served; "off" disables.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,
    /// Local state: the embedded PostgreSQL cluster and the compile cache.
    #[arg(long, default_value = "data")]
    pub state_dir: PathBuf,
    /// Compiled-component cache [default: <state-dir>/cache]; "off" disables.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// How often stateful stages' snapshots are committed (and always at
    /// shutdown and on a swap).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub snapshot_interval: Duration,
    /// How long to wait for the database at start.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// Database connections writing batches at once [default: 2, or 1 on
    /// a single core]. Their rows are copied in parallel; their commits
    /// still go in batch order, so what is committed is always a prefix of
    /// the input. 2 loaded 1.1-1.2x one COPY session on 2 cores; 1 writes
    /// one batch at a time.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub writers: Option<u16>,
    /// After SIGTERM/SIGINT, how long to try to commit what is in flight
    /// before exiting non-zero without it (nothing is lost: its input
    /// positions are not committed either, so the next start reads it
    /// again). A second Ctrl-C exits at once.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub shutdown_timeout: Duration,
    /// Also read the files that symbolic links in the input folder point
    /// to. Without it links are skipped (with one log line each): anyone
    /// who may write the folder could otherwise have the host copy any
    /// file it can read into the quarantine.
    #[arg(long)]
    pub follow_symlinks: bool,
    /// What to do with a file once all of it is committed and it has been
    /// unchanged for 2 s: keep, delete, or move:DIR (a folder on the same
    /// file system). Without it the folder grows and every pass lists it.
    #[arg(long, default_value = "keep")]
    pub on_done: crate::source::OnDone,
    /// How long a file may be gone from the input folder before its
    /// position is forgotten (deleted from pipeline.positions). A file
    /// back sooner (renamed out and back) resumes where it was; one back
    /// later is read again from the start, without doubling a row.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub forget_after: Duration,
    /// Pause the input when one stage fails every event of this many
    /// consecutive batches (a broken stage would otherwise quarantine the
    /// whole input); a new version of the stage resumes it. 0: never pause.
    #[arg(long, default_value_t = crate::pause::DEFAULT_THRESHOLD)]
    pub pause_after: u32,
    /// This host's name in batch records and partition leases [default:
    /// the machine's host name]. Give each host sharing a stream on one
    /// machine its own.
    #[arg(long, env = "HOST_ID")]
    pub host_id: Option<String>,
    /// With --input nats://: partitions (subjects STREAM.0 ..) of a stream
    /// this host creates; a stream that exists keeps its own.
    #[arg(long, default_value_t = crate::jetstream::DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// With --input nats://: how long a partition stays with a host that
    /// stops renewing its lease (renewed every third of it).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub lease: Duration,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Folder to write files into, or nats://HOST:PORT/STREAM: publish the
    /// same events there instead, one CSV line a message, each to the
    /// partition of its event id (the stream is created when missing).
    #[arg(long, default_value = "data/input")]
    pub output: PathBuf,
    /// With --output nats://: partitions of a stream this creates.
    #[arg(long, default_value_t = crate::jetstream::DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// Pause between files.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub interval: Duration,
    /// Events (rows) per file.
    #[arg(long, default_value_t = 100)]
    pub events_per_file: usize,
    /// Stop after this many files [default: never].
    #[arg(long)]
    pub files: Option<u64>,
    /// Share of rows that repeat an earlier event (same id, same values).
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_rate: f64,
    /// Share of rows that are malformed (bad UUID, number, timestamp, UTF-8, column count).
    #[arg(long, default_value_t = 0.0)]
    pub invalid_rate: f64,
    /// Make the output identical run to run (event times then start at 2026-01-01).
    #[arg(long)]
    pub seed: Option<u64>,
}
