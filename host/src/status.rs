//! The live status of a running host: one document ([`Document`]), served
//! as JSON on `/api/status` and read by the dashboard page and `host top`.
//!
//! It is fed from one place, the sink loop: each batch the database
//! committed is handed to [`Status::committed`] with what the database
//! said, so `rows_written` is exactly what this host committed. A sampler
//! calls [`Status::tick`] once a second; it keeps a short history (rates,
//! the chart) and measures the input lag. Health (a paused stage, the
//! database) comes from the metrics registry, which the pipeline keeps
//! current. Counts that may pass 2^53 are strings in the JSON ([`Count`]),
//! so JavaScript reads them exactly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::sink::{Commit, Committed};
use crate::stage::chain::StageVersion;

/// The document's format version: bumped when a field changes meaning.
pub const FORMAT: u32 = 1;

/// History kept for the chart and the 1-minute rates, in 1 s samples.
const HISTORY: usize = 300;
/// Batch latencies kept for the percentiles.
const LATENCIES: usize = 1024;
/// Plugin events kept.
const EVENTS: usize = 50;
/// Distinct quarantine reasons tracked; more fall into one "other" group.
const REASONS: usize = 64;
/// Samples kept per quarantine reason.
const SAMPLES: usize = 3;
/// Longest sample text kept, in bytes.
const SAMPLE_TEXT: usize = 300;

/// A count, as a decimal string in JSON (exact beyond 2^53).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Count(pub u64);

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map(Count)
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a count")))
    }
}

impl std::ops::AddAssign<usize> for Count {
    fn add_assign(&mut self, n: usize) {
        self.0 = self.0.saturating_add(n as u64);
    }
}

impl std::ops::AddAssign<u64> for Count {
    fn add_assign(&mut self, n: u64) {
        self.0 = self.0.saturating_add(n);
    }
}

/// Everything since the host started.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    pub rows_read: Count,
    /// Rows this host inserted into `ecommerce_events`.
    pub rows_written: Count,
    /// Rows the table already had (a replay after a crash).
    pub rows_conflicting: Count,
    pub malformed: Count,
    pub rejected: Count,
    pub failed: Count,
    pub dropped: Count,
    pub batches: Count,
}

/// Rows per second over a window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Rates {
    pub rows_read: f64,
    pub rows_written: f64,
    pub quarantined: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RateWindows {
    #[serde(rename = "10s")]
    pub ten_seconds: Rates,
    #[serde(rename = "1m")]
    pub one_minute: Rates,
}

/// Time from a batch's first row read to its commit, over the batches of
/// the last minute (or the last ones committed, when none was).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub batches: usize,
}

/// A shadow candidate and the totals of its differences from the live version.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ShadowStatus {
    pub version: String,
    pub hash: Option<String>,
    pub batches: Count,
    pub rows_in: Count,
    pub kept_both: Count,
    pub changed: Count,
    pub live_only: Count,
    pub candidate_only: Count,
    pub live_rejected: Count,
    pub candidate_rejected: Count,
    /// Pairs that differ in each field.
    pub fields: BTreeMap<String, Count>,
    /// Batches the candidate failed on, and the last reason.
    pub errors: Count,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageStatus {
    pub name: String,
    pub version: String,
    pub hash: String,
    pub batches: Count,
    pub events_in: Count,
    pub events_out: Count,
    pub rejected: Count,
    pub failed: Count,
    /// Mean time per batch over the stage's batches, and the last one's.
    pub ms_per_batch: f64,
    pub last_ms: f64,
    /// Events in per second over the last 10 s.
    pub rate_in: f64,
    /// Bytes of the state last committed for the stage, if any.
    pub state_bytes: Option<Count>,
    pub shadow: Option<ShadowStatus>,
    #[serde(skip)]
    total_ms: f64,
}

/// Input not yet committed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Lag {
    pub files: usize,
    pub bytes: Count,
    /// When it was measured (RFC 3339); the folder is read once a second.
    pub measured_at: Option<String>,
    /// Why it could not be measured.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Database {
    /// False while commits fail (the sink retries meanwhile).
    pub healthy: bool,
    pub errors: Count,
    pub last_error: Option<Dated>,
    pub last_commit_at: Option<String>,
}

/// A message and when it happened (RFC 3339).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Dated {
    pub at: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Pause {
    pub paused: bool,
    pub stages: Vec<PausedStage>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PausedStage {
    pub stage: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// What `/healthz` answers: 200 when true.
    pub ok: bool,
    pub problems: Vec<String>,
}

/// A plugin event: loaded, swapped_in, promoted, rejected, removed,
/// shadow_started, shadow_rejected.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub at: String,
    pub stage: String,
    pub kind: String,
    pub version: Option<String>,
    pub hash: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Quarantine {
    pub total: Count,
    /// Largest groups first.
    pub by_reason: Vec<ReasonGroup>,
}

/// Quarantined records of one kind, stage and reason (values in the
/// reason, such as a line's own text, are masked to group alike ones).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReasonGroup {
    /// malformed, rejected or failed.
    pub kind: String,
    pub stage: Option<String>,
    pub reason: String,
    pub count: Count,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub file: Option<String>,
    pub line: Option<Count>,
    pub event_id: Option<String>,
    pub raw: Option<String>,
    pub reason: String,
}

/// One second of the history: rows per second, per stage events out per second.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    pub rows_read: f64,
    pub rows_written: f64,
    pub stages: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Document {
    pub format: u32,
    pub started_at: String,
    pub now: String,
    pub uptime_s: f64,
    pub input: String,
    pub totals: Totals,
    pub rates: RateWindows,
    pub latency: Latency,
    /// In chain order.
    pub stages: Vec<StageStatus>,
    pub lag: Lag,
    pub database: Database,
    pub pause: Pause,
    pub health: Health,
    /// Newest last.
    pub events: Vec<Event>,
    pub quarantine: Quarantine,
    /// Oldest first, one point a second, the last five minutes.
    pub history: Vec<Point>,
    /// The partitions of a shared stream (`--input nats://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamDoc>,
}

/// A shared stream's partitions: owner, lag and what was committed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamDoc {
    pub stream: String,
    /// This host's id.
    pub host: String,
    pub partitions: Vec<PartitionDoc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartitionDoc {
    pub partition: u32,
    pub owner: Option<String>,
    /// Whether the owner's lease runs.
    pub live: bool,
    pub committed_seq: u64,
    /// Messages not yet delivered (known while this host holds it).
    pub pending: u64,
    pub redelivered: u64,
}

/// Counters as a sample of the history holds them.
#[derive(Debug, Clone)]
struct Snapshot {
    at: Instant,
    unix_ms: u64,
    totals: Totals,
    stages_out: HashMap<String, u64>,
    stages_in: HashMap<String, u64>,
}

#[derive(Default)]
struct Inner {
    totals: Totals,
    stages: Vec<StageStatus>,
    latencies: VecDeque<(Instant, f64)>,
    history: VecDeque<Snapshot>,
    /// Committed byte offsets by file key.
    committed: HashMap<String, u64>,
    lag: Lag,
    events: VecDeque<Event>,
    quarantine: Vec<ReasonGroup>,
    quarantined: Count,
    last_commit: Option<SystemTime>,
}

/// The status of this host, shared by the sink loop, the sampler and the
/// HTTP server.
pub struct Status {
    input: PathBuf,
    stream: Mutex<Option<crate::source::nats::SharedStatus>>,
    started: SystemTime,
    started_at: Instant,
    inner: Mutex<Inner>,
}

impl Status {
    /// `committed` are the file positions the host resumed from (by file
    /// key, byte offset); `stages` the chain as it started.
    pub fn new(
        input: PathBuf,
        committed: impl IntoIterator<Item = (String, u64)>,
        stages: &[StageVersion],
    ) -> Status {
        let inner = Inner {
            committed: committed.into_iter().collect(),
            stages: stages
                .iter()
                .map(|v| StageStatus {
                    name: v.name.clone(),
                    version: v.version.clone(),
                    hash: v.hash.clone(),
                    ..StageStatus::default()
                })
                .collect(),
            ..Inner::default()
        };
        let status = Status {
            input,
            stream: Mutex::new(None),
            started: SystemTime::now(),
            started_at: Instant::now(),
            inner: Mutex::new(inner),
        };
        status.tick();
        status
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counters that are still
        // counters: keep serving them.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The input is a shared stream: its partitions replace the folder lag.
    pub fn stream(&self, stream: crate::source::nats::SharedStatus) {
        if let Ok(mut s) = self.stream.lock() {
            *s = Some(stream);
        }
    }

    fn stream_doc(&self) -> Option<StreamDoc> {
        let shared = self.stream.lock().ok()?.clone()?;
        let s = shared.lock().ok()?;
        Some(StreamDoc {
            stream: s.stream.clone(),
            host: s.host.clone(),
            partitions: s
                .partitions
                .values()
                .map(|p| PartitionDoc {
                    partition: p.partition,
                    owner: p.owner.clone(),
                    live: p.live,
                    committed_seq: p.committed_seq,
                    pending: p.pending,
                    redelivered: p.redelivered,
                })
                .collect(),
        })
    }

    /// A batch the database committed.
    pub fn committed(&self, c: &Commit, done: &Committed) {
        let now = Instant::now();
        let mut s = self.lock();
        let failed = c.rejections.iter().filter(|(r, _)| r.failure).count();
        let t = &mut s.totals;
        t.rows_read += c.rows_in;
        t.rows_written += done.written;
        t.rows_conflicting += done.conflicting;
        t.malformed += c.malformed.len();
        t.failed += failed;
        t.rejected += c.rejections.len() - failed;
        t.dropped += c.dropped;
        t.batches += 1usize;
        s.last_commit = Some(SystemTime::now());
        if let Some(opened) = c.opened {
            if c.rows_in > 0 {
                if s.latencies.len() == LATENCIES {
                    s.latencies.pop_front();
                }
                s.latencies
                    .push_back((now, opened.elapsed().as_secs_f64() * 1000.0));
            }
        }
        for p in &c.positions {
            s.committed.insert(p.key.clone(), p.offset);
        }
        if !c.stages.is_empty() {
            s.record_stages(c);
        }
        for e in &c.plugin_events {
            if s.events.len() == EVENTS {
                s.events.pop_front();
            }
            s.events.push_back(Event {
                at: rfc3339(e.at),
                stage: e.stage.clone(),
                kind: e.kind.as_str().to_owned(),
                version: e.version.clone(),
                hash: e.hash.clone(),
                reason: e.reason.clone(),
            });
        }
        for m in &c.malformed {
            s.quarantine(
                "malformed",
                None,
                &m.row.reason,
                Sample {
                    file: Some(m.file.to_string()),
                    line: Some(Count(m.row.line)),
                    event_id: None,
                    raw: Some(clip(&m.row.raw)),
                    reason: clip(&m.row.reason),
                },
            );
        }
        for (r, origin) in &c.rejections {
            s.quarantine(
                if r.failure { "failed" } else { "rejected" },
                Some(&r.stage),
                &r.reason,
                Sample {
                    file: origin.as_ref().map(|o| o.file.to_string()),
                    line: origin.as_ref().map(|o| Count(o.line)),
                    event_id: Some(r.event.event_id.clone()),
                    raw: None,
                    reason: clip(&r.reason),
                },
            );
        }
    }

    /// Once a second: a point of history and the input lag.
    pub fn tick(&self) {
        let lag = {
            let committed = self.lock().committed.clone();
            if self.stream.lock().is_ok_and(|s| s.is_some()) {
                Lag::default()
            } else {
                measure_lag(&self.input, &committed)
            }
        };
        let mut s = self.lock();
        s.lag = lag;
        let snapshot = Snapshot {
            at: Instant::now(),
            unix_ms: unix_ms(SystemTime::now()),
            totals: s.totals,
            stages_out: s
                .stages
                .iter()
                .map(|st| (st.name.clone(), st.events_out.0))
                .collect(),
            stages_in: s
                .stages
                .iter()
                .map(|st| (st.name.clone(), st.events_in.0))
                .collect(),
        };
        if s.history.len() == HISTORY + 1 {
            s.history.pop_front();
        }
        s.history.push_back(snapshot);
    }

    /// The document as of now. `m` gives the health the pipeline reports.
    pub fn document(&self, m: &crate::metrics::Metrics) -> Document {
        let now = Instant::now();
        let s = self.lock();
        let current = Snapshot {
            at: now,
            unix_ms: unix_ms(SystemTime::now()),
            totals: s.totals,
            stages_out: HashMap::new(),
            stages_in: s
                .stages
                .iter()
                .map(|st| (st.name.clone(), st.events_in.0))
                .collect(),
        };
        let ten = s.since(10);
        let minute = s.since(60);
        let stages = s
            .stages
            .iter()
            .map(|st| {
                let mut st = st.clone();
                st.rate_in = ten
                    .map(|old| {
                        per_second(
                            old.stages_in.get(&st.name).copied().unwrap_or(0),
                            st.events_in.0,
                            old.at,
                            now,
                        )
                    })
                    .unwrap_or(0.0);
                st
            })
            .collect();
        let history = s
            .history
            .iter()
            .zip(s.history.iter().skip(1))
            .map(|(a, b)| Point {
                t: b.unix_ms,
                rows_read: per_second(a.totals.rows_read.0, b.totals.rows_read.0, a.at, b.at),
                rows_written: per_second(
                    a.totals.rows_written.0,
                    b.totals.rows_written.0,
                    a.at,
                    b.at,
                ),
                stages: b
                    .stages_out
                    .iter()
                    .map(|(name, out)| {
                        let before = a.stages_out.get(name).copied().unwrap_or(*out);
                        (name.clone(), per_second(before, *out, a.at, b.at))
                    })
                    .collect(),
            })
            .collect();
        let mut by_reason = s.quarantine.clone();
        by_reason.sort_by_key(|g| std::cmp::Reverse(g.count));
        let paused = m.paused_stages();
        let problems = m.health().map(|h| h.lines().map(str::to_owned).collect());
        Document {
            format: FORMAT,
            started_at: rfc3339(self.started),
            now: rfc3339(SystemTime::now()),
            uptime_s: self.started_at.elapsed().as_secs_f64(),
            input: self.input.display().to_string(),
            totals: s.totals,
            rates: RateWindows {
                ten_seconds: ten.map(|old| rates(old, &current)).unwrap_or_default(),
                one_minute: minute.map(|old| rates(old, &current)).unwrap_or_default(),
            },
            latency: s.latency(now),
            stages,
            lag: s.lag.clone(),
            database: Database {
                healthy: !m.db_down(),
                errors: Count(m.db_errors.load(std::sync::atomic::Ordering::Relaxed)),
                last_error: m.last_db_error().map(|(at, message)| Dated {
                    at: rfc3339(at),
                    message,
                }),
                last_commit_at: s.last_commit.map(rfc3339),
            },
            pause: Pause {
                paused: !paused.is_empty(),
                stages: paused
                    .into_iter()
                    .map(|(stage, reason)| PausedStage { stage, reason })
                    .collect(),
            },
            health: Health {
                ok: problems.is_none(),
                problems: problems.unwrap_or_default(),
            },
            events: s.events.iter().cloned().collect(),
            quarantine: Quarantine {
                total: s.quarantined,
                by_reason,
            },
            history,
            stream: self.stream_doc(),
        }
    }
}

impl Inner {
    fn record_stages(&mut self, c: &Commit) {
        let mut stages = Vec::with_capacity(c.stages.len());
        for run in &c.stages {
            let mut st = match self.stages.iter().position(|s| s.name == run.stage.name) {
                Some(i) => self.stages.swap_remove(i),
                None => StageStatus {
                    name: run.stage.name.clone(),
                    ..StageStatus::default()
                },
            };
            st.version = run.stage.version.clone();
            st.hash = run.stage.hash.clone();
            // The empty batch that carries the final snapshots ran nothing.
            if run.rows_in > 0 {
                let ms = run.elapsed.as_secs_f64() * 1000.0;
                st.batches += 1usize;
                st.events_in += run.rows_in;
                st.events_out += run.rows_out;
                st.rejected += run.rejected;
                st.failed += run.failed;
                st.total_ms += ms;
                st.last_ms = ms;
                st.ms_per_batch = st.total_ms / st.batches.0 as f64;
            }
            if let Some(snapshot) = c.snapshots.iter().find(|s| s.stage.name == st.name) {
                st.state_bytes = Some(Count(snapshot.state.len() as u64));
            }
            if let Some(d) = c.shadow_diffs.iter().find(|d| d.stage == st.name) {
                let sh = st.shadow.get_or_insert_with(ShadowStatus::default);
                if sh.version != d.candidate_version || sh.hash != d.candidate_hash {
                    // A new candidate: its totals start over.
                    *sh = ShadowStatus {
                        version: d.candidate_version.clone(),
                        hash: d.candidate_hash.clone(),
                        ..ShadowStatus::default()
                    };
                }
                sh.batches += 1usize;
                sh.rows_in += d.rows_in;
                match (&d.counts, &d.error) {
                    (Some(counts), _) => {
                        sh.kept_both += counts.kept_both;
                        sh.changed += counts.changed;
                        sh.live_only += counts.live_only;
                        sh.candidate_only += counts.candidate_only;
                        sh.live_rejected += counts.live_rejected;
                        sh.candidate_rejected += counts.candidate_rejected;
                        for (field, n) in &counts.fields {
                            *sh.fields.entry((*field).to_owned()).or_default() += *n;
                        }
                    }
                    (None, error) => {
                        sh.errors += 1usize;
                        sh.last_error = error.clone();
                    }
                }
            } else if run.rows_in > 0 {
                // A batch without a diff: the stage has no candidate (any more).
                st.shadow = None;
            }
            stages.push(st);
        }
        self.stages = stages;
    }

    fn quarantine(&mut self, kind: &str, stage: Option<&str>, reason: &str, sample: Sample) {
        self.quarantined += 1usize;
        let class = reason_class(reason);
        let found = self
            .quarantine
            .iter()
            .position(|g| g.kind == kind && g.stage.as_deref() == stage && g.reason == class);
        let index = match found {
            Some(i) => i,
            None if self.quarantine.len() < REASONS => {
                self.quarantine.push(ReasonGroup {
                    kind: kind.to_owned(),
                    stage: stage.map(str::to_owned),
                    reason: class,
                    ..ReasonGroup::default()
                });
                self.quarantine.len() - 1
            }
            None => {
                const OTHER: &str = "(other reasons)";
                match self.quarantine.iter().position(|g| g.reason == OTHER) {
                    Some(i) => i,
                    None => {
                        // The smallest group makes room for the catch-all.
                        if let Some(last) = self.quarantine.last_mut() {
                            *last = ReasonGroup {
                                kind: "mixed".into(),
                                stage: None,
                                reason: OTHER.into(),
                                count: last.count,
                                samples: Vec::new(),
                            };
                        }
                        self.quarantine.len() - 1
                    }
                }
            }
        };
        let group = &mut self.quarantine[index];
        group.count += 1usize;
        if group.samples.len() < SAMPLES {
            group.samples.push(sample);
        }
    }

    /// The history sample closest to `seconds` ago (the oldest one if
    /// the host is younger).
    fn since(&self, seconds: u64) -> Option<&Snapshot> {
        let target = Instant::now().checked_sub(std::time::Duration::from_secs(seconds));
        match target {
            Some(target) => self
                .history
                .iter()
                .find(|s| s.at >= target)
                .or(self.history.back()),
            None => self.history.front(),
        }
    }

    fn latency(&self, now: Instant) -> Latency {
        let recent: Vec<f64> = self
            .latencies
            .iter()
            .filter(|(at, _)| now.duration_since(*at).as_secs() < 60)
            .map(|(_, ms)| *ms)
            .collect();
        let mut values = if recent.is_empty() {
            self.latencies.iter().map(|(_, ms)| *ms).collect()
        } else {
            recent
        };
        values.sort_by(f64::total_cmp);
        Latency {
            p50_ms: percentile(&values, 0.50),
            p99_ms: percentile(&values, 0.99),
            batches: values.len(),
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn per_second(before: u64, after: u64, from: Instant, to: Instant) -> f64 {
    let seconds = to.duration_since(from).as_secs_f64();
    if seconds < 0.001 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / seconds
}

fn rates(old: &Snapshot, now: &Snapshot) -> Rates {
    let q = |t: &Totals| t.malformed.0 + t.rejected.0 + t.failed.0;
    Rates {
        rows_read: per_second(
            old.totals.rows_read.0,
            now.totals.rows_read.0,
            old.at,
            now.at,
        ),
        rows_written: per_second(
            old.totals.rows_written.0,
            now.totals.rows_written.0,
            old.at,
            now.at,
        ),
        quarantined: per_second(q(&old.totals), q(&now.totals), old.at, now.at),
    }
}

/// Files in the input folder and the bytes of them not yet committed.
fn measure_lag(input: &Path, committed: &HashMap<String, u64>) -> Lag {
    let mut lag = Lag {
        measured_at: Some(rfc3339(SystemTime::now())),
        ..Lag::default()
    };
    let entries = match std::fs::read_dir(input) {
        Ok(entries) => entries,
        Err(e) => {
            lag.error = Some(format!("cannot read {}: {e}", input.display()));
            return lag;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !crate::source::is_input_name(&name.to_string_lossy()) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let done = committed
            .get(&crate::source::file_key(&meta))
            .copied()
            .unwrap_or(0);
        let left = meta.len().saturating_sub(done);
        if left > 0 {
            lag.files += 1;
            lag.bytes += left;
        }
    }
    lag
}

/// Masks the values in a reason (quoted text, numbers) so that reasons
/// alike group together: `bad UUID "x1"` and `bad UUID "y2"` are one.
pub fn reason_class(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(200));
    let mut chars = reason.chars().peekable();
    while let Some(c) = chars.next() {
        if out.len() >= 200 {
            out.push('…');
            break;
        }
        match c {
            '"' => {
                for d in chars.by_ref() {
                    if d == '"' {
                        break;
                    }
                }
                out.push_str("\"…\"");
            }
            '0'..='9' => {
                while chars
                    .peek()
                    .is_some_and(|d| d.is_ascii_digit() || *d == '.')
                {
                    chars.next();
                }
                out.push('N');
            }
            c => out.push(c),
        }
    }
    out
}

fn clip(text: &str) -> String {
    if text.len() <= SAMPLE_TEXT {
        return text.to_owned();
    }
    let mut end = SAMPLE_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_strings_both_ways() {
        let big = Count(u64::MAX);
        let text = serde_json::to_string(&big).unwrap();
        assert_eq!(text, "\"18446744073709551615\"");
        assert_eq!(serde_json::from_str::<Count>(&text).unwrap(), big);
        assert!(serde_json::from_str::<Count>("12").is_err());
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn reasons_alike_share_a_class() {
        assert_eq!(
            reason_class("event_id \"abc\" is not a UUID"),
            reason_class("event_id \"12-x\" is not a UUID")
        );
        assert_eq!(
            reason_class("expected 6 fields, found 5"),
            "expected N fields, found N"
        );
        assert_ne!(reason_class("price: bad"), reason_class("user_id: bad"));
    }

    #[test]
    fn a_committed_batch_shows_in_the_document() {
        use crate::batch::{Malformed, Position};
        use crate::parse::BadRow;
        use crate::stage::chain::StageRun;
        let dir = std::env::temp_dir().join(format!("status-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let version = StageVersion {
            name: "transform".into(),
            version: "1".into(),
            hash: "abc".into(),
        };
        let status = Status::new(dir.clone(), [], std::slice::from_ref(&version));
        let commit = Commit {
            rows_in: 10,
            opened: Some(Instant::now()),
            malformed: vec![Malformed {
                file: "a.csv".into(),
                source: crate::batch::FileRef {
                    key: "k".into(),
                    fingerprint: 0,
                },
                row: BadRow {
                    line: 3,
                    raw: "x,y".into(),
                    reason: "expected 6 fields, found 2".into(),
                },
            }],
            positions: vec![Position {
                key: "k".into(),
                path: "a.csv".into(),
                offset: 100,
                line: 11,
                reads: 0,
                fingerprint: None,
            }],
            stages: vec![StageRun {
                stage: version,
                elapsed: std::time::Duration::from_millis(4),
                rows_in: 9,
                rows_out: 9,
                rejected: 0,
                failed: 0,
            }],
            ..Commit::default()
        };
        status.committed(
            &commit,
            &Committed {
                batch_id: 1,
                written: 9,
                conflicting: 0,
                refused: 0,
            },
        );
        let doc = status.document(&crate::metrics::Metrics::default());
        assert_eq!(doc.totals.rows_written, Count(9));
        assert_eq!(doc.totals.malformed, Count(1));
        assert_eq!(doc.stages[0].events_in, Count(9));
        assert_eq!(doc.stages[0].ms_per_batch, 4.0);
        assert_eq!(doc.quarantine.by_reason[0].count, Count(1));
        assert_eq!(doc.quarantine.by_reason[0].samples[0].line, Some(Count(3)));
        assert_eq!(doc.latency.batches, 1);
        // The document reads back as it was written.
        let json = serde_json::to_string(&doc).unwrap();
        let back: Document = serde_json::from_str(&json).unwrap();
        assert_eq!(back.totals, doc.totals);
        let _ = std::fs::remove_dir_all(dir);
    }
}
