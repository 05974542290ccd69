//! `host quarantine replay`: the open rejected and failed records (or, with
//! `--kind malformed`, the malformed ones, re-parsed from their raw text)
//! run as new input through the current manifest's whole chain.
//!
//! Each batch is one transaction: its quarantine rows are locked (`FOR
//! UPDATE SKIP LOCKED`: a second replay running at the same time takes
//! other rows, and the running host, which only inserts quarantine rows,
//! never waits), the chain runs, and then the rows it keeps are written
//! by the sink's own conflict-safe path (`ON CONFLICT (event_id) DO
//! NOTHING`), what it rejects again becomes new quarantine rows (pointing
//! at the row they replay, `replay_of`), a batch record is added, and the
//! replayed rows get `replayed_batch`. A replay killed at any moment
//! leaves its open batch uncommitted: the rows stay open and the next run
//! takes them. Nothing here touches the host's lock or lease, positions
//! or stage state.
//!
//! Every stage starts from an empty state (as in `host replay`): a dedup
//! stage sees only the replayed events, and the table's primary key
//! catches an id the table already has.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use super::{connect, Filter, Kind, WHERE_OPEN};
use crate::parse::FileParser;
use crate::sink::{event_csv, stages_json, RowWriter};
use crate::stage::chain::{Chain, ChainOutput};
use crate::stage::Event;

pub struct ReplayArgs {
    pub database_url: String,
    pub plugins: PathBuf,
    pub cache_dir: Option<PathBuf>,
    pub filter: Filter,
    pub batch_size: usize,
    pub dry_run: bool,
    pub json: bool,
}

/// Up to this many samples of each outcome are shown.
const SAMPLES: usize = 5;

#[derive(Debug, Default, serde::Serialize)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub stages: Vec<String>,
    /// Open rows read, by kind.
    pub rows: BTreeMap<&'static str, usize>,
    /// Events the chain kept: written (or, dry, to be written).
    pub kept: usize,
    /// Of `kept`, those some stage changed from what was quarantined.
    pub changed: usize,
    /// Of `kept`, changes per field.
    pub fields: BTreeMap<&'static str, usize>,
    /// Of `kept`, ids the table already holds (dry run only).
    pub already_in_table: usize,
    pub rejected: usize,
    pub failed: usize,
    /// Neither kept nor rejected by some stage (a dedup's duplicates).
    pub dropped: usize,
    /// Malformed rows that still do not parse: quarantined again.
    pub malformed: usize,
    /// Rows whose stored text cannot be read back into an event: left open.
    pub unreadable: usize,
    pub batches: usize,
    pub batch_ids: Vec<i64>,
    pub written: u64,
    pub conflicting: u64,
    pub refused: usize,
    pub samples: Vec<Sample>,
}

#[derive(Debug, serde::Serialize)]
pub struct Sample {
    /// kept, changed, rejected, failed, malformed, unreadable.
    pub outcome: &'static str,
    pub quarantine_id: i64,
    pub event_id: Option<String>,
    pub detail: String,
}

/// An open quarantine row.
struct Open {
    id: i64,
    kind: Kind,
    file: Option<String>,
    line: Option<i64>,
    raw: Option<String>,
    reason: String,
}

/// A new quarantine row, written in the batch that replays `replay_of`.
struct Again {
    replay_of: i64,
    kind: &'static str,
    file: Option<String>,
    line: Option<i64>,
    raw: String,
    reason: String,
    stage: Option<String>,
    event_id: Option<String>,
}

/// One batch of open rows, parsed and run through the chain.
struct Outcome {
    /// The rows handled (to mark replayed): all but the unreadable.
    handled: Vec<i64>,
    kept: Vec<Event>,
    again: Vec<Again>,
    dropped: usize,
    stages: serde_json::Value,
    files: Vec<String>,
    read_ms: f64,
}

const DEFAULT_KINDS: [Kind; 2] = [Kind::Rejected, Kind::Failed];

pub fn run(args: ReplayArgs) -> anyhow::Result<ReplayReport> {
    anyhow::ensure!(
        !(args.filter.kinds.contains(&Kind::Malformed) && args.filter.kinds.len() > 1),
        "--kind malformed replays malformed rows only: run it on its own"
    );
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let mut client = connect(&rt, &args.database_url)?;
    let (mut chain, _runtime) = crate::replay::start_chain(&args.plugins, args.cache_dir, None)?;
    let mut report = ReplayReport {
        dry_run: args.dry_run,
        stages: chain
            .versions()
            .iter()
            .map(|v| format!("{} {}", v.name, v.version))
            .collect(),
        ..ReplayReport::default()
    };
    let p = args.filter.params(&DEFAULT_KINDS)?;
    // Rows quarantined after the start (by the running host, or again by
    // this replay) wait for the next run: every run ends.
    let ceiling: i64 = rt
        .block_on(client.query_one("SELECT coalesce(max(id), 0) FROM pipeline.quarantine", &[]))?
        .get(0);
    let limit = args.batch_size.max(1) as i64;
    let select = format!(
        "SELECT id, kind, file, line, raw, reason FROM pipeline.quarantine
         WHERE {WHERE_OPEN} AND id > $5 AND id <= $6 ORDER BY id LIMIT $7{}",
        if args.dry_run {
            ""
        } else {
            " FOR UPDATE SKIP LOCKED"
        }
    );
    let writer = rt.block_on(RowWriter::prepare(&client))?;
    let mut layouts = Layouts::default();
    let mut after = 0i64;
    loop {
        let opened = Instant::now();
        let mut tx = rt.block_on(client.transaction())?;
        let rows = rt.block_on(tx.query(
            &select,
            &[
                &p.kinds, &p.stage, &p.reason, &p.since, &after, &ceiling, &limit,
            ],
        ))?;
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        let open: Vec<Open> = rows
            .iter()
            .map(|r| Open {
                id: r.get(0),
                kind: kind_of(r.get(1)),
                file: r.get(2),
                line: r.get(3),
                raw: r.get(4),
                reason: r.get(5),
            })
            .collect();
        let outcome = process(&mut chain, &open, &mut layouts, &mut report, opened);
        report.batches += 1;
        if args.dry_run {
            if !outcome.kept.is_empty() {
                let ids: Vec<&str> = outcome.kept.iter().map(|e| e.event_id.as_str()).collect();
                report.already_in_table += rt
                    .block_on(tx.query_one(
                        "SELECT count(*) FROM ecommerce_events WHERE event_id = ANY($1)",
                        &[&ids],
                    ))?
                    .get::<_, i64>(0) as usize;
            }
            drop(tx);
            continue;
        }
        let batch_id = rt.block_on(commit(&mut tx, &writer, outcome, opened, &mut report))?;
        rt.block_on(tx.commit())
            .context("cannot commit the replayed batch")?;
        report.batch_ids.push(batch_id);
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report)
}

fn kind_of(text: String) -> Kind {
    match text.as_str() {
        "malformed" => Kind::Malformed,
        "failed" => Kind::Failed,
        "refused" => Kind::Refused,
        _ => Kind::Rejected,
    }
}

/// Parses the rows, runs the chain, and sorts its output.
fn process(
    chain: &mut Chain,
    open: &[Open],
    layouts: &mut Layouts,
    report: &mut ReplayReport,
    opened: Instant,
) -> Outcome {
    let mut events = Vec::with_capacity(open.len());
    // Index into `open` per event.
    let mut from = Vec::with_capacity(open.len());
    let mut handled = Vec::with_capacity(open.len());
    let mut again = Vec::new();
    let mut files: Vec<String> = Vec::new();
    for (i, row) in open.iter().enumerate() {
        *report.rows.entry(row.kind.as_str()).or_default() += 1;
        if let Some(f) = &row.file {
            if !files.contains(f) {
                files.push(f.clone());
            }
        }
        match read_back(row, layouts) {
            Ok(event) => {
                events.push(event);
                from.push(i);
                handled.push(row.id);
            }
            Err(reason) if row.kind == Kind::Malformed => {
                report.malformed += 1;
                sample(report, "malformed", row.id, None, reason.clone());
                handled.push(row.id);
                again.push(Again {
                    replay_of: row.id,
                    kind: "malformed",
                    file: row.file.clone(),
                    line: row.line,
                    raw: row.raw.clone().unwrap_or_default(),
                    reason,
                    stage: None,
                    event_id: None,
                });
            }
            Err(reason) => {
                report.unreadable += 1;
                sample(report, "unreadable", row.id, None, reason);
            }
        }
    }
    let read_ms = opened.elapsed().as_secs_f64() * 1000.0;
    let out: ChainOutput = chain.process(&events);
    // Where each event id came from, to point a new row at its source.
    let mut by_id: HashMap<&str, Vec<usize>> = HashMap::new();
    for (e, &i) in events.iter().zip(&from) {
        by_id.entry(e.event_id.as_str()).or_default().push(i);
    }
    let source =
        |id: &str| -> Option<&Open> { by_id.get(id).and_then(|v| v.first()).map(|&i| &open[i]) };
    let input: HashMap<&str, &Event> = events.iter().map(|e| (e.event_id.as_str(), e)).collect();
    for e in &out.events {
        report.kept += 1;
        let qid = source(&e.event_id).map(|o| o.id).unwrap_or_default();
        match input.get(e.event_id.as_str()) {
            Some(before) => {
                let diffs = differences(before, e);
                if diffs.is_empty() {
                    sample(report, "kept", qid, Some(&e.event_id), String::new());
                } else {
                    report.changed += 1;
                    for (field, _) in &diffs {
                        *report.fields.entry(field).or_default() += 1;
                    }
                    let detail: Vec<String> = diffs.into_iter().map(|(_, d)| d).collect();
                    sample(report, "changed", qid, Some(&e.event_id), detail.join(", "));
                }
            }
            None => sample(report, "kept", qid, Some(&e.event_id), "new id".into()),
        }
    }
    for r in &out.rejections {
        let (kind, outcome) = if r.failure {
            report.failed += 1;
            ("failed", "failed")
        } else {
            report.rejected += 1;
            ("rejected", "rejected")
        };
        let origin = source(&r.event.event_id);
        let qid = origin.map(|o| o.id).unwrap_or_default();
        sample(
            report,
            outcome,
            qid,
            Some(&r.event.event_id),
            format!("{}: {}", r.stage, r.reason),
        );
        again.push(Again {
            replay_of: qid,
            kind,
            file: origin.and_then(|o| o.file.clone()),
            line: origin.and_then(|o| o.line),
            raw: event_csv(&r.event),
            reason: r.reason.clone(),
            stage: Some(r.stage.clone()),
            event_id: Some(r.event.event_id.clone()),
        });
    }
    let dropped = events
        .len()
        .saturating_sub(out.events.len() + out.rejections.len());
    report.dropped += dropped;
    let stages = stages_json(&out.runs);
    Outcome {
        handled,
        kept: out.events,
        again,
        dropped,
        stages,
        files,
        read_ms,
    }
}

/// Writes one batch's outcome in the open transaction; returns its batch id.
async fn commit(
    tx: &mut tokio_postgres::Transaction<'_>,
    writer: &RowWriter,
    mut o: Outcome,
    opened: Instant,
    report: &mut ReplayReport,
) -> anyhow::Result<i64> {
    let started = Instant::now();
    let rows = writer.write(tx, &o.kept).await?;
    report.written += rows.written;
    report.conflicting += rows.conflicting;
    report.refused += rows.refused.len();
    for (i, reason) in &rows.refused {
        let e = &o.kept[*i];
        o.again.push(Again {
            replay_of: 0,
            kind: "refused",
            file: None,
            line: None,
            raw: event_csv(e),
            reason: format!("PostgreSQL refused the row: {reason}"),
            stage: None,
            event_id: Some(e.event_id.clone()),
        });
    }
    let count = |kind: &str| o.again.iter().filter(|a| a.kind == kind).count() as i32;
    let (malformed, rejected) = (count("malformed"), count("rejected"));
    let failed = count("failed") + count("refused");
    let rows_in = o.handled.len() as i32;
    let write_ms = started.elapsed().as_secs_f64() * 1000.0;
    let latency_ms = opened.elapsed().as_secs_f64() * 1000.0;
    let batch_id: i64 = tx
        .query_one(
            "INSERT INTO pipeline.batches (batch_uuid, files, rows_in, rows_written, rows_conflicting,
                 rows_malformed, rows_rejected, rows_failed, rows_dropped, stages, latency_ms, read_ms, write_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING batch_id",
            &[
                &uuid::Uuid::new_v4(),
                &o.files,
                &rows_in,
                &(rows.written as i32),
                &(rows.conflicting as i32),
                &malformed,
                &rejected,
                &failed,
                &(o.dropped as i32),
                &o.stages,
                &latency_ms,
                &o.read_ms,
                &write_ms,
            ],
        )
        .await?
        .get(0);
    if !o.again.is_empty() {
        let col = |f: &dyn Fn(&Again) -> Option<String>| -> Vec<Option<String>> {
            o.again.iter().map(f).collect()
        };
        let kinds = col(&|a| Some(a.kind.to_owned()));
        let files = col(&|a| a.file.clone());
        let raws = col(&|a| Some(a.raw.replace('\0', "\\0")));
        let reasons = col(&|a| Some(a.reason.replace('\0', "\\0")));
        let stages = col(&|a| a.stage.clone());
        let ids = col(&|a| a.event_id.clone());
        let lines: Vec<Option<i64>> = o.again.iter().map(|a| a.line).collect();
        let of: Vec<Option<i64>> = o
            .again
            .iter()
            .map(|a| (a.replay_of > 0).then_some(a.replay_of))
            .collect();
        tx.execute(
            "INSERT INTO pipeline.quarantine (batch_id, kind, file, line, raw, reason, stage, event_id, replay_of)
             SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[], $9::int8[])",
            &[&batch_id, &kinds, &files, &lines, &raws, &reasons, &stages, &ids, &of],
        )
        .await?;
    }
    tx.execute(
        "UPDATE pipeline.quarantine SET replayed_batch = $1 WHERE id = ANY($2)",
        &[&batch_id, &o.handled],
    )
    .await?;
    Ok(batch_id)
}

/// The event a row holds: its raw text read again, as the parser reads a
/// record of its file (a malformed row with its file's header layout,
/// when the file is still there; a stage's event as the sink wrote it).
fn read_back(row: &Open, layouts: &mut Layouts) -> Result<Event, String> {
    let raw = row
        .raw
        .as_deref()
        .ok_or_else(|| "no raw text was kept".to_owned())?;
    // The parser keeps a record that is not UTF-8 with its bad bytes
    // replaced: read back, it would pass for what it never said.
    if row.kind == Kind::Malformed && raw.contains(char::REPLACEMENT_CHARACTER) {
        return Err(format!(
            "{} (its raw text kept stands for bytes that were not UTF-8: it cannot be read back)",
            row.reason
        ));
    }
    let mut parser = match (&row.kind, &row.file) {
        (Kind::Malformed, Some(file)) => layouts.parser(file),
        _ => FileParser::resume(None),
    };
    let mut first = None;
    let line = row.line.unwrap_or(1).max(1) as u64;
    parser.parse(raw.as_bytes(), line, true, |p| {
        if first.is_none() {
            first = Some(p.result);
        }
    });
    match first {
        Some(Ok(event)) => Ok(event),
        Some(Err(bad)) => Err(bad.reason),
        None => Err("the raw text holds no record".into()),
    }
}

/// Parsers that know a file's header, read once per file.
#[derive(Default)]
struct Layouts {
    by_file: HashMap<String, FileParser>,
}

impl Layouts {
    fn parser(&mut self, file: &str) -> FileParser {
        self.by_file
            .entry(file.to_owned())
            .or_insert_with(|| FileParser::resume(first_line(Path::new(file)).as_deref()))
            .clone()
    }
}

fn first_line(path: &Path) -> Option<Vec<u8>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(file)
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .ok()?;
    Some(line)
}

fn differences(a: &Event, b: &Event) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut check = |field: &'static str, x: String, y: String| {
        if x != y {
            out.push((field, format!("{field}: {x} -> {y}")));
        }
    };
    check("user_id", a.user_id.to_string(), b.user_id.to_string());
    check("event_type", a.event_type.clone(), b.event_type.clone());
    check(
        "product_id",
        a.product_id.to_string(),
        b.product_id.to_string(),
    );
    check(
        "price_cents",
        a.price_cents.to_string(),
        b.price_cents.to_string(),
    );
    check(
        "event_time",
        a.event_time.to_string(),
        b.event_time.to_string(),
    );
    out
}

fn sample(
    report: &mut ReplayReport,
    outcome: &'static str,
    id: i64,
    event_id: Option<&str>,
    detail: String,
) {
    if report
        .samples
        .iter()
        .filter(|s| s.outcome == outcome)
        .count()
        < SAMPLES
    {
        report.samples.push(Sample {
            outcome,
            quarantine_id: id,
            event_id: event_id.map(str::to_owned),
            detail,
        });
    }
}

fn print_text(r: &ReplayReport) {
    let total: usize = r.rows.values().sum();
    if total == 0 {
        println!("nothing to replay: no open quarantine rows match");
        return;
    }
    let kinds: Vec<String> = r.rows.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let would = if r.dry_run { "would be " } else { "" };
    println!(
        "{} {total} open quarantine rows ({}) through {}",
        if r.dry_run {
            "dry run: replaying"
        } else {
            "replayed"
        },
        kinds.join(", "),
        r.stages.join(", ")
    );
    let fields: Vec<String> = r.fields.iter().map(|(f, n)| format!("{f} {n}")).collect();
    println!(
        "kept:       {}, of which changed by the stages: {}{}",
        r.kept,
        r.changed,
        if fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", fields.join(", "))
        }
    );
    println!("rejected:   {} ({}quarantined again)", r.rejected, would);
    println!("failed:     {} ({}quarantined again)", r.failed, would);
    println!("dropped:    {} (by a stage, e.g. duplicates)", r.dropped);
    if r.malformed > 0 {
        println!(
            "malformed:  {} (still do not parse; {}quarantined again)",
            r.malformed, would
        );
    }
    if r.unreadable > 0 {
        println!(
            "unreadable: {} (their stored text is no event; left open)",
            r.unreadable
        );
    }
    if r.dry_run {
        println!(
            "of the kept, already in the table: {}; nothing was written",
            r.already_in_table
        );
    } else {
        println!(
            "written:    {} rows in {} batches ({} already in the table, {} refused by the database)",
            r.written, r.batches, r.conflicting, r.refused
        );
    }
    for s in r.samples.iter().filter(|s| s.outcome != "kept") {
        println!(
            "  {:<10} #{} {}  {}",
            s.outcome,
            s.quarantine_id,
            s.event_id.as_deref().unwrap_or("-"),
            s.detail
        );
    }
}
