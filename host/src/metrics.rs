//! Counters, gauges and histograms of the running pipeline, rendered as
//! Prometheus text for `/metrics`, with the health `/healthz` reports
//! (served by `http`).
//!
//! One process-wide registry (`global()`): the parts of the pipeline
//! record into it without threading a handle through every call.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Default)]
pub struct Metrics {
    pub rows_read: AtomicU64,
    pub rows_malformed: AtomicU64,
    pub rows_rejected: AtomicU64,
    pub rows_failed: AtomicU64,
    pub rows_dropped: AtomicU64,
    pub rows_written: AtomicU64,
    pub rows_conflicting: AtomicU64,
    pub batches: AtomicU64,
    pub db_errors: AtomicU64,
    db_down: AtomicBool,
    batch_latency: Mutex<Histogram>,
    stage_seconds: Mutex<BTreeMap<String, (u64, f64)>>,
    stage_failures: Mutex<BTreeMap<(String, String), u64>>,
    plugin_loads: Mutex<BTreeMap<(String, String), u64>>,
    shadow_rows: Mutex<BTreeMap<(String, &'static str), u64>>,
    shadow_failures: Mutex<BTreeMap<(String, String), u64>>,
    problems: Mutex<BTreeMap<String, String>>,
    paused: Mutex<BTreeMap<String, bool>>,
    last_db_error: Mutex<Option<(SystemTime, String)>>,
    partitions: Mutex<Vec<PartitionGauge>>,
}

/// One partition of a shared stream, as `/metrics` shows it.
#[derive(Debug, Clone, Default)]
pub struct PartitionGauge {
    pub stream: String,
    pub partition: u32,
    /// The host holding its lease, `""` when none does.
    pub owner: String,
    pub pending: u64,
    pub redelivered: u64,
    pub committed_seq: u64,
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

pub fn global() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::default)
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn batch_committed(&self, latency: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.batch_latency.lock() {
            h.observe(latency.as_secs_f64());
        }
    }

    pub fn stage_time(&self, stage: &str, elapsed: Duration) {
        if let Ok(mut map) = self.stage_seconds.lock() {
            let entry = map.entry(stage.to_owned()).or_default();
            entry.0 += 1;
            entry.1 += elapsed.as_secs_f64();
        }
    }

    pub fn stage_failure(&self, stage: &str, kind: &str) {
        if let Ok(mut map) = self.stage_failures.lock() {
            *map.entry((stage.to_owned(), kind.to_owned())).or_default() += 1;
        }
    }

    pub fn plugin_loaded(&self, stage: &str) {
        self.plugin_event(stage, "loaded");
    }

    pub fn plugin_rejected(&self, stage: &str, reason: &str) {
        self.plugin_event(stage, &format!("rejected_{reason}"));
    }

    fn plugin_event(&self, stage: &str, outcome: &str) {
        if let Ok(mut map) = self.plugin_loads.lock() {
            *map.entry((stage.to_owned(), outcome.to_owned()))
                .or_default() += 1;
        }
    }

    /// A stage paused the input (`Some(why)`) or the pause ended: the
    /// `pipeline_stage_paused` gauge and `/healthz` follow it.
    pub fn stage_paused(&self, stage: &str, why: Option<String>) {
        if let Ok(mut map) = self.paused.lock() {
            map.insert(stage.to_owned(), why.is_some());
        }
        self.set_problem(&format!("stage {stage}"), why);
    }

    /// Counts a shadow comparison, row by row, per kind of difference
    /// (`kept_both`, `changed`, ...).
    pub fn shadow_rows(
        &self,
        stage: &str,
        counts: impl IntoIterator<Item = (&'static str, usize)>,
    ) {
        if let Ok(mut map) = self.shadow_rows.lock() {
            for (kind, n) in counts {
                *map.entry((stage.to_owned(), kind)).or_default() += n as u64;
            }
        }
    }

    /// Counts a batch the shadow candidate failed on (or could not run).
    pub fn shadow_failure(&self, stage: &str, kind: &str) {
        if let Ok(mut map) = self.shadow_failures.lock() {
            *map.entry((stage.to_owned(), kind.to_owned())).or_default() += 1;
        }
    }

    pub fn set_db_down(&self, down: bool) {
        self.db_down.store(down, Ordering::Relaxed);
    }

    pub fn db_down(&self) -> bool {
        self.db_down.load(Ordering::Relaxed)
    }

    /// The last database error, kept for the status page after it heals.
    pub fn db_error(&self, message: String) {
        if let Ok(mut last) = self.last_db_error.lock() {
            *last = Some((SystemTime::now(), message));
        }
    }

    pub fn last_db_error(&self) -> Option<(SystemTime, String)> {
        self.last_db_error.lock().ok().and_then(|l| l.clone())
    }

    /// The stages holding the input, with why.
    pub fn paused_stages(&self) -> Vec<(String, String)> {
        let problems = self.problems.lock().map(|p| p.clone()).unwrap_or_default();
        self.paused
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, paused)| **paused)
                    .map(|(stage, _)| {
                        let reason = problems
                            .get(&format!("stage {stage}"))
                            .cloned()
                            .unwrap_or_default();
                        (stage.clone(), reason)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Marks a part of the pipeline unhealthy (`Some(reason)`) or healthy.
    pub fn set_problem(&self, part: &str, problem: Option<String>) {
        if let Ok(mut map) = self.problems.lock() {
            match problem {
                Some(reason) => map.insert(part.to_owned(), reason),
                None => map.remove(part),
            };
        }
    }

    /// `None` when healthy, else the reasons, one line per part.
    pub fn health(&self) -> Option<String> {
        let problems = self.problems.lock().map(|m| m.clone()).unwrap_or_default();
        let mut reasons: Vec<String> = problems.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        // The sink's own line says more than this generic one: one line
        // for the database, not two.
        if self.db_down.load(Ordering::Relaxed) && !problems.contains_key("database") {
            reasons.push("database: unreachable, retrying".into());
        }
        (!reasons.is_empty()).then(|| reasons.join("\n"))
    }

    /// The partitions of a shared stream, replaced as a whole.
    pub fn set_partitions(&self, gauges: Vec<PartitionGauge>) {
        if let Ok(mut p) = self.partitions.lock() {
            *p = gauges;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 9] = [
            (
                "pipeline_rows_read_total",
                "CSV records read",
                &self.rows_read,
            ),
            (
                "pipeline_rows_malformed_total",
                "records quarantined by the parser",
                &self.rows_malformed,
            ),
            (
                "pipeline_rows_rejected_total",
                "events rejected by a stage",
                &self.rows_rejected,
            ),
            (
                "pipeline_rows_failed_total",
                "events a stage failed on (quarantined)",
                &self.rows_failed,
            ),
            (
                "pipeline_rows_dropped_total",
                "events a stage dropped (e.g. duplicates)",
                &self.rows_dropped,
            ),
            (
                "pipeline_rows_written_total",
                "rows inserted into ecommerce_events",
                &self.rows_written,
            ),
            (
                "pipeline_rows_conflicting_total",
                "rows already in the table (primary key)",
                &self.rows_conflicting,
            ),
            ("pipeline_batches_total", "batches committed", &self.batches),
            (
                "pipeline_db_errors_total",
                "database errors (each retried)",
                &self.db_errors,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP pipeline_up 1 when healthy\n# TYPE pipeline_up gauge\npipeline_up {}",
            u8::from(self.health().is_none())
        );
        if let Ok(h) = self.batch_latency.lock() {
            let name = "pipeline_batch_latency_seconds";
            let _ = writeln!(out, "# HELP {name} time from a batch's first row read to its commit\n# TYPE {name} histogram");
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
                h.count, h.sum, h.count
            );
        }
        if let Ok(map) = self.stage_seconds.lock() {
            let _ = writeln!(out, "# HELP pipeline_stage_seconds time spent in each stage\n# TYPE pipeline_stage_seconds summary");
            for (stage, (count, sum)) in map.iter() {
                let _ = writeln!(out, "pipeline_stage_seconds_sum{{stage=\"{stage}\"}} {sum}\npipeline_stage_seconds_count{{stage=\"{stage}\"}} {count}", stage = label(stage));
            }
        }
        if let Ok(map) = self.stage_failures.lock() {
            let _ = writeln!(out, "# HELP pipeline_stage_failures_total failed stage calls by kind\n# TYPE pipeline_stage_failures_total counter");
            for ((stage, kind), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "pipeline_stage_failures_total{{stage=\"{}\",kind=\"{}\"}} {n}",
                    label(stage),
                    label(kind)
                );
            }
        }
        if let Ok(map) = self.paused.lock() {
            let _ = writeln!(out, "# HELP pipeline_stage_paused 1 while a stage that fails every event holds the input\n# TYPE pipeline_stage_paused gauge");
            for (stage, paused) in map.iter() {
                let _ = writeln!(
                    out,
                    "pipeline_stage_paused{{stage=\"{}\"}} {}",
                    label(stage),
                    u8::from(*paused)
                );
            }
        }
        if let Ok(map) = self.plugin_loads.lock() {
            let _ = writeln!(out, "# HELP pipeline_plugin_loads_total component loads by outcome\n# TYPE pipeline_plugin_loads_total counter");
            for ((stage, outcome), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "pipeline_plugin_loads_total{{stage=\"{}\",outcome=\"{}\"}} {n}",
                    label(stage),
                    label(outcome)
                );
            }
        }
        if let Ok(map) = self.shadow_rows.lock() {
            if !map.is_empty() {
                let _ = writeln!(out, "# HELP pipeline_shadow_rows_total rows compared between a live stage and its shadow candidate, by kind of difference\n# TYPE pipeline_shadow_rows_total counter");
            }
            for ((stage, kind), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "pipeline_shadow_rows_total{{stage=\"{}\",kind=\"{kind}\"}} {n}",
                    label(stage)
                );
            }
        }
        if let Ok(map) = self.shadow_failures.lock() {
            if !map.is_empty() {
                let _ = writeln!(out, "# HELP pipeline_shadow_failures_total batches a shadow candidate failed on, by kind\n# TYPE pipeline_shadow_failures_total counter");
            }
            for ((stage, kind), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "pipeline_shadow_failures_total{{stage=\"{}\",kind=\"{}\"}} {n}",
                    label(stage),
                    label(kind)
                );
            }
        }
        if let Ok(parts) = self.partitions.lock() {
            if !parts.is_empty() {
                let _ = writeln!(out, "# HELP pipeline_partition_pending messages of a stream partition not yet delivered to this host (0 for partitions it does not hold)\n# TYPE pipeline_partition_pending gauge");
                let _ = writeln!(out, "# HELP pipeline_partition_redelivered_total messages of a partition delivered again after this host had taken them\n# TYPE pipeline_partition_redelivered_total counter");
                let _ = writeln!(out, "# HELP pipeline_partition_committed_sequence the last stream sequence committed for a partition, and its owner\n# TYPE pipeline_partition_committed_sequence gauge");
            }
            for p in parts.iter() {
                let labels = format!(
                    "stream=\"{}\",partition=\"{}\",owner=\"{}\"",
                    label(&p.stream),
                    p.partition,
                    label(&p.owner)
                );
                let _ = writeln!(out, "pipeline_partition_pending{{{labels}}} {}", p.pending);
                let _ = writeln!(
                    out,
                    "pipeline_partition_redelivered_total{{{labels}}} {}",
                    p.redelivered
                );
                let _ = writeln!(
                    out,
                    "pipeline_partition_committed_sequence{{{labels}}} {}",
                    p.committed_seq
                );
            }
        }
        out
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped
/// (a stage name comes from the manifest and may hold any of them).
pub fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_outage_is_one_line_of_health() {
        let m = Metrics::default();
        m.set_db_down(true);
        assert_eq!(
            m.health().as_deref(),
            Some("database: unreachable, retrying")
        );
        m.set_problem("database", Some("cannot commit: connection refused".into()));
        assert_eq!(
            m.health().as_deref(),
            Some("database: cannot commit: connection refused")
        );
        m.set_db_down(false);
        m.set_problem("database", None);
        assert_eq!(m.health(), None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("plain"), "plain");
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = Metrics::default();
        m.stage_failure("evil\"} 1\nfake_metric{x=\"", "trap");
        let text = m.render();
        assert!(
            !text.lines().any(|l| l.starts_with("fake_metric")),
            "{text}"
        );
        assert!(
            text.contains("stage=\"evil\\\"} 1\\nfake_metric{x=\\\"\""),
            "{text}"
        );
    }
}
