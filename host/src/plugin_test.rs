//! `host plugin test`: runs one component over a CSV sample, without
//! PostgreSQL, and prints per row what it kept, changed (field by field),
//! rejected (with the reason) or dropped, then a summary with events/s.
//! It is how plugin authors work; it exits non-zero when the component
//! does not load, does not fit the world, or fails.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::parse::FileParser;
use crate::stage::chain::{Chain, Prepared};
use crate::stage::limits::{Grants, Limits};
use crate::stage::manifest::{OnIncompatibleState, SnapshotPolicy, StageSpec};
use crate::stage::runtime::Runtime;
use crate::stage::Event;

pub struct PluginTest {
    pub component: PathBuf,
    pub input: PathBuf,
    pub config: Vec<(String, String)>,
    pub grants: Vec<String>,
    pub batch_size: usize,
    pub json: bool,
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub kept: usize,
    pub changed: usize,
    pub rejected: usize,
    pub dropped: usize,
    pub malformed: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

pub fn run(t: PluginTest) -> anyhow::Result<Summary> {
    let runtime = Arc::new(Runtime::new(t.cache_dir.clone())?);
    let component = Arc::new(runtime.load(&t.component)?);
    let wit = format!("ecommerce:pipeline@{}", component.wit_version);
    if !t.json {
        println!(
            "component {}: built for {wit}; this host implements {}; batches go {}",
            t.component.display(),
            crate::stage::runtime::WIT_PACKAGE,
            match component.columns {
                true => "in columns (it exports `columns`)",
                false => "as lists of records",
            }
        );
    }
    let name = t
        .component
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "stage".into());
    let spec = StageSpec {
        name,
        component: t.component.clone(),
        shadow: None,
        version: None,
        config: t.config.clone(),
        limits: Limits::default(),
        grants: Grants::parse(&t.grants).map_err(anyhow::Error::msg)?,
        on_incompatible_state: OnIncompatibleState::Reset,
        snapshot: SnapshotPolicy::EveryBatch,
    };
    let mut chain = Chain::start(
        runtime,
        vec![Prepared {
            spec: Arc::new(spec),
            component,
            shadow: None,
        }],
        &HashMap::new(),
    )?;

    let data =
        std::fs::read(&t.input).with_context(|| format!("cannot read {}", t.input.display()))?;
    let mut events = Vec::new();
    let mut summary = Summary::default();
    FileParser::default().parse(&data, 1, true, |p| match p.result {
        Ok(e) => events.push(e),
        Err(bad) => {
            summary.malformed += 1;
            emit(
                t.json,
                json!({"outcome": "malformed", "line": bad.line, "reason": bad.reason}),
                format!("malformed line {}: {}", bad.line, bad.reason),
            );
        }
    });

    let mut failures = Vec::new();
    for batch in events.chunks(t.batch_size.max(1)) {
        let started = Instant::now();
        let out = chain.process(batch);
        summary.elapsed += started.elapsed();
        let by_id: HashMap<&str, &Event> = out
            .events
            .iter()
            .map(|e| (e.event_id.as_str(), e))
            .collect();
        let rejected: HashMap<&str, (&str, bool)> = out
            .rejections
            .iter()
            .map(|r| (r.event.event_id.as_str(), (r.reason.as_str(), r.failure)))
            .collect();
        for input in batch {
            let id = input.event_id.as_str();
            if let Some(output) = by_id.get(id) {
                let changes = diff(input, output);
                if changes.is_empty() {
                    summary.kept += 1;
                    emit(
                        t.json,
                        json!({"outcome": "kept", "event_id": id}),
                        format!("kept     {id}"),
                    );
                } else {
                    summary.changed += 1;
                    let text: Vec<String> = changes
                        .iter()
                        .map(|(f, a, b)| format!("{f}: {a} -> {b}"))
                        .collect();
                    emit(
                        t.json,
                        json!({"outcome": "changed", "event_id": id,
                            "changes": changes.iter().map(|(f, a, b)| json!({"field": f, "from": a, "to": b})).collect::<Vec<_>>()}),
                        format!("changed  {id}  {}", text.join(", ")),
                    );
                }
            } else if let Some((reason, failure)) = rejected.get(id) {
                if *failure {
                    summary.failed += 1;
                    failures.push(reason.to_string());
                    emit(
                        t.json,
                        json!({"outcome": "failed", "event_id": id, "reason": reason}),
                        format!("FAILED   {id}: {reason}"),
                    );
                } else {
                    summary.rejected += 1;
                    emit(
                        t.json,
                        json!({"outcome": "rejected", "event_id": id, "reason": reason}),
                        format!("rejected {id}: {reason}"),
                    );
                }
            } else {
                summary.dropped += 1;
                emit(
                    t.json,
                    json!({"outcome": "dropped", "event_id": id}),
                    format!("dropped  {id}"),
                );
            }
        }
    }
    let total = events.len();
    let rate = total as f64 / summary.elapsed.as_secs_f64().max(1e-9);
    let line = format!(
        "{total} events: {} kept, {} changed, {} rejected, {} dropped, {} failed; {} malformed rows; {:.0} events/s in the stage",
        summary.kept, summary.changed, summary.rejected, summary.dropped, summary.failed, summary.malformed, rate
    );
    emit(
        t.json,
        json!({"summary": {"events": total, "kept": summary.kept, "changed": summary.changed, "rejected": summary.rejected,
            "dropped": summary.dropped, "failed": summary.failed, "malformed": summary.malformed, "events_per_second": rate, "wit": wit}}),
        line,
    );
    if let Some(first) = failures.first() {
        bail!(
            "the component failed on {} events; first: {first}",
            failures.len()
        );
    }
    Ok(summary)
}

fn emit(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

fn diff(a: &Event, b: &Event) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let mut field = |name, x: String, y: String| {
        if x != y {
            out.push((name, x, y));
        }
    };
    field("user_id", a.user_id.to_string(), b.user_id.to_string());
    field(
        "event_type",
        format!("{:?}", a.event_type),
        format!("{:?}", b.event_type),
    );
    field(
        "product_id",
        a.product_id.to_string(),
        b.product_id.to_string(),
    );
    field(
        "price_cents",
        a.price_cents.to_string(),
        b.price_cents.to_string(),
    );
    field(
        "event_time",
        a.event_time.to_string(),
        b.event_time.to_string(),
    );
    out
}
