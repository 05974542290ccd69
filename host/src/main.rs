//! The `host` binary: parses the command line and runs a subcommand.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use host::cli::{Cli, Command, PluginCommand, PluginsCommand, QuarantineCommand};
use host::generate::{GenerateConfig, Generator};
use host::pipeline::{self, RunConfig};
use host::plugin_test::{self, PluginTest};

fn main() -> std::process::ExitCode {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc's malloc raises its mmap threshold each time a large block is
/// freed, so after the first batches every batch's large buffers (its
/// events, its COPY data: megabytes each) come from the heap arenas, one
/// per thread, where they stay resident between batches. A fixed threshold
/// returns them to the system when freed, and two arenas keep the small
/// blocks of a batch (which one thread allocates and another frees) from
/// spreading over one arena per thread: the peak RSS of a 1M-event run with
/// two writers fell from 121-126 MB to 94-98 MB (docs/performance.md). Left
/// as it is when the operator tunes malloc through the environment.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned = std::env::vars_os().any(|(k, _)| {
            let k = k.to_string_lossy();
            k == "GLIBC_TUNABLES" || k.starts_with("MALLOC_")
        });
        if !tuned {
            // SAFETY: mallopt only sets malloc's parameters; called first
            // thing, before any other thread exists.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let off = |p: &std::path::Path| p.as_os_str() == "off";
            let config = RunConfig {
                cache_dir: match &args.cache_dir {
                    Some(p) if off(p) => None,
                    Some(p) => Some(p.clone()),
                    None => Some(args.state_dir.join("cache")),
                },
                plugins: args.plugins,
                input: args.input,
                database_url: args.database_url.filter(|u| !u.is_empty()),
                state_dir: args.state_dir,
                batch_size: args.batch_size,
                batch_interval: args.batch_interval,
                pause_after: args.pause_after,
                snapshot_interval: args.snapshot_interval,
                once: args.once,
                metrics_addr: (args.metrics_addr != "off").then_some(args.metrics_addr),
                connect_timeout: args.connect_timeout,
                writers: args
                    .writers
                    .map_or_else(host::pipeline::default_writers, usize::from),
                shutdown_timeout: args.shutdown_timeout,
                follow_symlinks: args.follow_symlinks,
                on_done: args.on_done,
                forget_after: args.forget_after,
                host_id: args.host_id.unwrap_or_else(host::pipeline::default_host_id),
                partitions: args.partitions,
                lease: args.lease,
            };
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let totals = runtime.block_on(pipeline::run(config))?;
            println!(
                "done: {} batches, {} rows read, {} written, {} already present, {} malformed, {} rejected, {} failed, {} refused by the database, {} dropped by stages",
                totals.batches, totals.rows_in, totals.written, totals.conflicting, totals.malformed,
                totals.rejected, totals.failed, totals.refused, totals.dropped
            );
            Ok(())
        }
        Command::Plugin(PluginCommand::Test(args)) => {
            plugin_test::run(PluginTest {
                cache_dir: user_cache(args.cache_dir),
                component: args.component,
                input: args.input,
                config: args.config,
                grants: args.grants,
                batch_size: args.batch_size,
                json: args.json,
            })?;
            Ok(())
        }
        Command::Plugin(PluginCommand::New(args)) => {
            let dir = host::scaffold::new_stage(args.lang, &args.name, &args.plugins)?;
            println!(
                "created {dir}\nbuild:  bash {dir}/build.sh   (installs {plugins}/{name}.wasm)\ntry:    host plugin test {plugins}/{name}.wasm --input {dir}/sample.csv\nrun it: add {dir}/stage.toml to {plugins}/pipeline.toml",
                dir = dir.display(),
                plugins = args.plugins.display(),
                name = args.name
            );
            Ok(())
        }
        Command::Plugins(args) => match args.command {
            None => {
                let list = args.list;
                let ok = host::plugins::list::run(host::plugins::list::ListArgs {
                    cache_dir: user_cache(list.cache_dir),
                    plugins: list.plugins,
                    database_url: list.database_url.filter(|u| !u.is_empty()),
                    json: list.json,
                })?;
                anyhow::ensure!(ok, "a stage's component does not load, or the database could not be read (see above)");
                Ok(())
            }
            Some(PluginsCommand::Promote(p)) => {
                let cache = user_cache(p.cache_dir);
                let done = host::plugins::promote::promote(
                    &p.plugins,
                    &p.stage,
                    p.version.as_deref(),
                    cache,
                )?;
                println!(
                    "promoted {stage}: component = {new} (sha256 {hash}), was {old}; shadow removed from {manifest}",
                    stage = done.stage,
                    new = done.new_component,
                    hash = &done.hash,
                    old = done.old_component,
                    manifest = p.plugins.join(host::stage::manifest::MANIFEST_FILE).display()
                );
                if let Some(v) = done.dropped_version {
                    println!("removed its version label {v:?}, which named the old component (pass --version to set one)");
                }
                println!("a running host swaps it in at the next batch boundary, handing over the stage's state");
                Ok(())
            }
        },
        Command::Replay(args) => {
            host::replay::run(host::replay::ReplayArgs {
                cache_dir: (args.cache_dir.as_os_str() != "off").then_some(args.cache_dir),
                input: args.input,
                component: args.component,
                stage: args.stage,
                plugins: args.plugins,
                batch_size: args.batch_size,
                json: args.json,
            })?;
            Ok(())
        }
        Command::Quarantine(QuarantineCommand::List(args)) => {
            host::quarantine::list::run(host::quarantine::list::ListArgs {
                database_url: host::quarantine::database_url(args.filter.database_url.clone())?,
                filter: args.filter.filter(),
                samples: args.samples,
                json: args.filter.json,
            })?;
            Ok(())
        }
        Command::Quarantine(QuarantineCommand::Replay(args)) => {
            host::quarantine::replay::run(host::quarantine::replay::ReplayArgs {
                database_url: host::quarantine::database_url(args.filter.database_url.clone())?,
                filter: args.filter.filter(),
                plugins: args.plugins,
                cache_dir: (args.cache_dir.as_os_str() != "off").then_some(args.cache_dir),
                batch_size: args.batch_size,
                dry_run: args.dry_run,
                json: args.filter.json,
            })?;
            Ok(())
        }
        Command::Bench(args) => {
            host::bench::run(host::bench::BenchConfig {
                events: args.events,
                events_per_file: args.events_per_file,
                duplicate_rate: args.duplicate_rate,
                preload: args.preload,
                admin_url: args.database_url,
                plugins: args.plugins,
                output: args
                    .output
                    .unwrap_or_else(|| args.work_dir.join("result.json")),
                work_dir: args.work_dir,
                latency_seconds: args.latency_seconds,
                batch_size: args.batch_size,
                writers: args.writers,
            })?;
            Ok(())
        }
        Command::Top(args) => {
            host::top::run(&args.addr)?;
            Ok(())
        }
        Command::Generate(args) => {
            for (name, rate) in [
                ("--duplicate-rate", args.duplicate_rate),
                ("--invalid-rate", args.invalid_rate),
            ] {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&rate),
                    "{name} must be between 0 and 1, not {rate}"
                );
            }
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc_flag(flag);
            let mut generator = Generator::new(GenerateConfig {
                output: args.output.clone(),
                interval: args.interval,
                events_per_file: args.events_per_file,
                files: args.files,
                duplicate_rate: args.duplicate_rate,
                invalid_rate: args.invalid_rate,
                seed: args.seed,
            });
            // A bounded run gets a progress display (a bar on a terminal).
            let mut progress = args
                .files
                .filter(|n| *n > 1)
                .map(|n| host::progress::Progress::new("generate", n, host::progress::Unit::Files));
            let events_per_file = args.events_per_file as u64;
            let progress_done = |done: u64| {
                if let Some(p) = &mut progress {
                    p.set(done, format!("{} events", done * events_per_file));
                }
            };
            let nats = args
                .output
                .to_str()
                .and_then(host::jetstream::NatsUrl::detect);
            if let Some(url) = nats {
                let url = url?;
                let publisher = host::publish::Publisher::connect(url.clone(), args.partitions)?;
                let files = generator
                    .run_into(&stop, progress_done, |generator| {
                        let (name, body) = generator.next_file();
                        publisher
                            .publish_file(&name, &body)
                            .map_err(std::io::Error::other)?;
                        Ok(format!("{url} ({name})"))
                    })
                    .with_context(|| format!("cannot publish to {url}"))?;
                if let Some(p) = progress {
                    p.finish();
                }
                println!("published {files} files of events to {url}");
                return Ok(());
            }
            let files = generator
                .run_with(&stop, progress_done)
                .with_context(|| format!("cannot write into {}", args.output.display()))?;
            if let Some(p) = progress {
                p.finish();
            }
            println!("wrote {files} files into {}", args.output.display());
            Ok(())
        }
    }
}

/// The cache of the commands run outside a state folder (`plugin test`,
/// `plugins`): `--cache-dir`, else the user's own cache folder, never the
/// working folder (anyone who can write there would run code in the host).
fn user_cache(arg: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    match arg {
        Some(p) if p.as_os_str() == "off" => None,
        Some(p) => Some(p),
        None => {
            let dir = host::stage::cache::default_dir();
            if dir.is_none() {
                tracing::warn!("neither XDG_CACHE_HOME nor HOME is set: the compile cache is off (pass --cache-dir)");
            }
            dir
        }
    }
}

/// Asks the generator to stop (between files) on SIGINT/SIGTERM.
fn ctrlc_flag(flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}
