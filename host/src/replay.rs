//! `host replay`: what a candidate version of a stage would have done to
//! input already seen, before it goes live. The stored files are parsed,
//! batched and run through the manifest's chain as `host run` would, with
//! the candidate as the stage's shadow, and the per-batch shadow diffs
//! (`stage::shadow`) are added up: kept by both, changed per field, kept
//! by one only, rejected by each, with samples. Nothing is written and no
//! database is needed; every stage starts from an empty state.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::parse::FileParser;
use crate::source::is_input_name;
use crate::stage::chain::{Chain, StageVersion};
use crate::stage::manifest::Manifest;
use crate::stage::reload::Loader;
use crate::stage::runtime::Runtime;
use crate::stage::shadow::{DiffCounts, DiffSample, ShadowDiff, SAMPLES_PER_KIND};
use anyhow::{bail, Context};

pub struct ReplayArgs {
    pub input: PathBuf,
    pub component: PathBuf,
    pub stage: String,
    pub plugins: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub batch_size: usize,
    pub json: bool,
}

/// The replay's totals over every batch.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    pub stage: String,
    pub live: Option<StageVersion>,
    pub candidate: String,
    pub candidate_hash: String,
    pub files: usize,
    pub events: usize,
    pub malformed: usize,
    pub batches: usize,
    pub counts: DiffCounts,
    /// Batches the candidate failed on (their events are not in `counts`).
    pub candidate_failed_batches: usize,
    pub candidate_failed_events: usize,
    pub first_candidate_error: Option<String>,
    pub samples: Vec<DiffSample>,
}

/// The manifest's chain, every stage started from an empty state, for a
/// run outside `host run`: only `shadow`'s stage (if any) runs a shadow
/// candidate, the component given. Returns the chain and the runtime.
pub fn start_chain(
    plugins: &Path,
    cache_dir: Option<PathBuf>,
    shadow: Option<(&str, &Path)>,
) -> anyhow::Result<(Chain, Arc<Runtime>)> {
    let mut manifest = Manifest::load(plugins)?;
    if let Some((stage, _)) = shadow {
        if !manifest.stages.iter().any(|s| s.name == stage) {
            let names: Vec<&str> = manifest.stages.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "{} has no stage {stage:?}; its stages: {}",
                manifest.path.display(),
                names.join(", ")
            );
        }
    }
    for spec in &mut manifest.stages {
        spec.shadow = shadow
            .filter(|(stage, _)| spec.name == *stage)
            .map(|(_, candidate)| candidate.to_owned());
    }
    let runtime = Arc::new(Runtime::new(cache_dir)?);
    let mut loader = Loader::new(runtime.clone());
    let plan = loader.plan(&manifest)?;
    let chain = Chain::start(runtime.clone(), plan, &HashMap::new())?;
    Ok((chain, runtime))
}

pub fn run(args: ReplayArgs) -> anyhow::Result<ReplayReport> {
    let candidate = std::path::absolute(&args.component)
        .with_context(|| format!("cannot resolve {}", args.component.display()))?;
    let (mut chain, runtime) = start_chain(
        &args.plugins,
        args.cache_dir.clone(),
        Some((&args.stage, &candidate)),
    )?;
    let loaded = runtime
        .load(&candidate)
        .with_context(|| format!("candidate {} does not load", candidate.display()))?;
    chain.compare_every_batch();

    let mut report = ReplayReport {
        stage: args.stage.clone(),
        live: chain.versions().into_iter().find(|v| v.name == args.stage),
        candidate: candidate.display().to_string(),
        candidate_hash: loaded.hash.clone(),
        ..ReplayReport::default()
    };
    for file in input_files(&args.input)? {
        let data =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        report.files += 1;
        let mut events = Vec::new();
        FileParser::default().parse(&data, 1, true, |p| match p.result {
            Ok(e) => events.push(e),
            Err(_) => report.malformed += 1,
        });
        report.events += events.len();
        for batch in events.chunks(args.batch_size.max(1)) {
            let out = chain.process(batch);
            report.batches += 1;
            for diff in out.shadows {
                tally(&mut report, diff, &args.stage);
            }
        }
    }
    // Diffs of the last batches may still be in the candidate's hands.
    for diff in chain.finish_shadows() {
        tally(&mut report, diff, &args.stage);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report)
}

/// Adds one batch's diff of stage `stage` to the report.
fn tally(report: &mut ReplayReport, diff: ShadowDiff, stage: &str) {
    if diff.stage != stage {
        return;
    }
    match diff.counts {
        Some(counts) => add(&mut report.counts, &counts),
        None => {
            report.candidate_failed_batches += 1;
            report.candidate_failed_events += diff.rows_in;
            if report.first_candidate_error.is_none() {
                report.first_candidate_error = diff.error;
            }
        }
    }
    for sample in diff.samples {
        let same_kind = report
            .samples
            .iter()
            .filter(|s| s.kind == sample.kind)
            .count();
        if same_kind < SAMPLES_PER_KIND {
            report.samples.push(sample);
        }
    }
}

/// The folder's input files, by name: the order `host run --once` commits
/// them in does not matter to a stateless stage, and a fixed one makes
/// replays of a stateful stage repeatable.
fn input_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_input_name(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn add(total: &mut DiffCounts, batch: &DiffCounts) {
    total.kept_both += batch.kept_both;
    total.changed += batch.changed;
    total.live_only += batch.live_only;
    total.candidate_only += batch.candidate_only;
    total.live_rejected += batch.live_rejected;
    total.candidate_rejected += batch.candidate_rejected;
    for (field, n) in &batch.fields {
        *total.fields.entry(field).or_default() += n;
    }
}

fn print_text(r: &ReplayReport) {
    let live = r
        .live
        .as_ref()
        .map(|v| format!("{} (sha256 {})", v.version, &v.hash[..v.hash.len().min(12)]))
        .unwrap_or_default();
    println!(
        "stage {}: live {live} vs candidate {} (sha256 {})",
        r.stage,
        r.candidate,
        &r.candidate_hash[..r.candidate_hash.len().min(12)]
    );
    println!(
        "input: {} files, {} events in {} batches, {} malformed rows (not given to the stages)",
        r.files, r.events, r.batches, r.malformed
    );
    let c = &r.counts;
    let fields: Vec<String> = c.fields.iter().map(|(f, n)| format!("{f} {n}")).collect();
    println!(
        "kept by both:           {}, of which changed: {}{}",
        c.kept_both,
        c.changed,
        if fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", fields.join(", "))
        }
    );
    println!("kept by live only:      {}", c.live_only);
    println!("kept by candidate only: {}", c.candidate_only);
    println!("rejected by live:       {}", c.live_rejected);
    println!("rejected by candidate:  {}", c.candidate_rejected);
    if r.candidate_failed_batches > 0 {
        println!(
            "the candidate failed on {} batches ({} events, not counted above); first: {}",
            r.candidate_failed_batches,
            r.candidate_failed_events,
            r.first_candidate_error.as_deref().unwrap_or("")
        );
    }
    for s in &r.samples {
        println!("  {:<15} {}  {}", s.kind, s.event_id, s.detail);
    }
}
