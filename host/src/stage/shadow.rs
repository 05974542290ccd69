//! Shadow mode: a candidate version of a stage runs beside the live one on
//! the same batches, and the host records how their outputs differ,
//! without the candidate's output going anywhere.
//!
//! Why: a new version of a stage can then be judged on real traffic
//! before it is made live (`host plugins promote`), with the differences
//! counted per batch in `pipeline.shadow_diffs` and in metrics.
//!
//! The candidate gets exactly what the live version got (the output of the
//! stage before it), its own instance with the stage's limits, grants and
//! config, and the live version's state, handed over the way a swap would
//! hand it (`on-incompatible-state` applies). It must never affect the
//! live path: anything it does wrong (trap, time or memory limit, refusal,
//! invalid output, a state it cannot read, a file that does not load) is
//! recorded as the diff's `error`, logged once per distinct error and
//! counted, and the live batch goes on. A failed instance is replaced on
//! the next batch, from the live version's last snapshot.
//!
//! The candidate runs off the live path, on a thread of its own
//! ([`ShadowWorker`]): the live batch hands it a copy of its input and
//! output and goes on without waiting. A candidate still busy with an
//! earlier batch skips this one (the hand-over holds one batch at most),
//! and each diff is committed with the first batch after it is ready. A
//! candidate that fails [`DISABLE_AFTER`] batches in a row is disabled,
//! with a `shadow_disabled` plugin event, until its file or the manifest
//! changes: a hostile candidate costs at most its time limit per batch,
//! on its own thread, a few times.
//!
//! Cost: nothing when no stage has a `shadow`; otherwise a copy of the
//! batch and its output per batch on the live path, and on the shadow
//! thread one more stage call plus a hash map over the batch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bindings::{BatchResult, Event};
use super::chain::StageVersion;
use super::events::{PluginEvent, PluginEventKind};
use super::instance::StageInstance;
use super::manifest::{OnIncompatibleState, StageSpec};
use super::output;
use super::runtime::{LoadedComponent, Runtime};
use super::StageError;

/// A candidate component as the loader left it: loaded and checked, or
/// why it is not.
pub type Candidate = Result<Arc<LoadedComponent>, Unloaded>;

/// Why a candidate's file did not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Unloaded {
    /// The class of failure ([`StageError::kind`]): the metrics label.
    pub kind: &'static str,
    pub message: String,
}

impl From<&StageError> for Unloaded {
    fn from(e: &StageError) -> Unloaded {
        Unloaded {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// Whether two loads of a stage's candidate are the same version.
pub fn same_candidate(a: Option<&Candidate>, b: Option<&Candidate>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(Ok(a)), Some(Ok(b))) => a.hash == b.hash && a.path == b.path,
        (Some(Err(a)), Some(Err(b))) => a == b,
        _ => false,
    }
}

/// How a candidate's output for one batch differs from the live version's.
///
/// Outputs are matched by event id (several events with one id are paired
/// in order). `kept_both` counts pairs, of which `changed` differ in at
/// least one field; `fields` counts, per field, the pairs differing in it.
/// "Rejected" includes events the live version failed on (quarantined).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiffCounts {
    pub kept_both: usize,
    pub changed: usize,
    pub live_only: usize,
    pub candidate_only: usize,
    pub live_rejected: usize,
    pub candidate_rejected: usize,
    pub fields: BTreeMap<&'static str, usize>,
}

impl DiffCounts {
    /// The counts as (metric kind, value).
    pub fn kinds(&self) -> [(&'static str, usize); 6] {
        [
            ("kept_both", self.kept_both),
            ("changed", self.changed),
            ("live_only", self.live_only),
            ("candidate_only", self.candidate_only),
            ("live_rejected", self.live_rejected),
            ("candidate_rejected", self.candidate_rejected),
        ]
    }
}

/// One event on which the two versions disagree, to show a person.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiffSample {
    /// `changed`, `live_only` or `candidate_only`.
    pub kind: &'static str,
    pub event_id: String,
    /// The fields that differ (`price_cents: 100 -> 101`), or what the
    /// other version did with the event.
    pub detail: String,
}

/// Samples a shadow run keeps per batch and kind: enough to see what a
/// difference is, bounded whatever the batch.
pub const SAMPLES_PER_KIND: usize = 3;

/// One batch's comparison for one shadowed stage, committed with the batch.
#[derive(Debug, Clone)]
pub struct ShadowDiff {
    pub stage: String,
    pub live: StageVersion,
    pub candidate_version: String,
    /// `None` when the candidate file did not load.
    pub candidate_hash: Option<String>,
    pub rows_in: usize,
    /// `None` when the candidate failed on this batch (see `error`).
    pub counts: Option<DiffCounts>,
    /// Up to `SAMPLES_PER_KIND` disagreeing events per kind.
    pub samples: Vec<DiffSample>,
    pub error: Option<String>,
    /// The class of `error` (a [`StageError::kind`], or `unavailable` for
    /// a candidate that could not start): the metrics label.
    pub error_kind: Option<&'static str>,
    pub elapsed: Duration,
}

/// Compares the live version's output with the candidate's.
pub fn diff(live: &BatchResult, live_failed: usize, candidate: &BatchResult) -> DiffCounts {
    compare(live, live_failed, candidate, 0).0
}

/// `diff`, plus up to `samples` disagreeing events of each kind.
pub fn compare(
    live: &BatchResult,
    live_failed: usize,
    candidate: &BatchResult,
    samples: usize,
) -> (DiffCounts, Vec<DiffSample>) {
    let mut taken = Vec::new();
    let mut take = |kind: &'static str, id: &str, detail: &dyn Fn() -> String| {
        if taken
            .iter()
            .filter(|s: &&DiffSample| s.kind == kind)
            .count()
            < samples
        {
            taken.push(DiffSample {
                kind,
                event_id: id.to_owned(),
                detail: detail(),
            });
        }
    };
    // What a version did with an event the other one kept.
    let fate = |result: &BatchResult, id: &str, who: &str| match result
        .rejected
        .iter()
        .find(|r| r.event.event_id == id)
    {
        Some(r) => format!("{who} rejected it: {}", r.reason),
        None => format!("{who} dropped it or failed on it"),
    };
    let mut counts = DiffCounts {
        live_rejected: live.rejected.len() + live_failed,
        candidate_rejected: candidate.rejected.len(),
        ..DiffCounts::default()
    };
    let mut theirs: HashMap<&str, VecDeque<&Event>> =
        HashMap::with_capacity(candidate.events.len());
    for e in &candidate.events {
        theirs.entry(e.event_id.as_str()).or_default().push_back(e);
    }
    for ours in &live.events {
        match theirs
            .get_mut(ours.event_id.as_str())
            .and_then(VecDeque::pop_front)
        {
            Some(other) => {
                counts.kept_both += 1;
                let differing = changed_fields(ours, other);
                if !differing.is_empty() {
                    take("changed", &ours.event_id, &|| field_changes(ours, other));
                    counts.changed += 1;
                    for field in differing {
                        *counts.fields.entry(field).or_default() += 1;
                    }
                }
            }
            None => {
                take("live_only", &ours.event_id, &|| {
                    fate(candidate, &ours.event_id, "the candidate")
                });
                counts.live_only += 1
            }
        }
    }
    counts.candidate_only = theirs.values().map(VecDeque::len).sum();
    if samples > 0 {
        // In the candidate's order, so samples do not depend on hashing.
        for e in &candidate.events {
            if theirs
                .get(e.event_id.as_str())
                .is_some_and(|left| left.iter().any(|l| std::ptr::eq(*l, e)))
            {
                take("candidate_only", &e.event_id, &|| {
                    fate(live, &e.event_id, "the live version")
                });
            }
        }
    }
    (counts, taken)
}

/// The differing fields of two events, as `field: live -> candidate`.
fn field_changes(a: &Event, b: &Event) -> String {
    let value = |e: &Event, field: &str| match field {
        "user_id" => e.user_id.to_string(),
        "event_type" => format!("{:?}", e.event_type),
        "product_id" => e.product_id.to_string(),
        "price_cents" => e.price_cents.to_string(),
        _ => e.event_time.to_string(),
    };
    changed_fields(a, b)
        .into_iter()
        .map(|f| format!("{f}: {} -> {}", value(a, f), value(b, f)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fields in which two events with the same id differ.
fn changed_fields(a: &Event, b: &Event) -> Vec<&'static str> {
    let mut out = Vec::new();
    if a.user_id != b.user_id {
        out.push("user_id");
    }
    if a.event_type != b.event_type {
        out.push("event_type");
    }
    if a.product_id != b.product_id {
        out.push("product_id");
    }
    if a.price_cents != b.price_cents {
        out.push("price_cents");
    }
    if a.event_time != b.event_time {
        out.push("event_time");
    }
    out
}

/// The candidate of one stage: its component, its instance (when one is
/// running) and what went wrong last, so a repeated error is logged once.
pub struct Shadow {
    spec: Arc<StageSpec>,
    candidate: Candidate,
    instance: Option<StageInstance>,
    /// Why the candidate cannot run from its current state; cleared when a
    /// fresh instance starts.
    broken: Option<String>,
    last_logged: Option<String>,
}

impl Shadow {
    /// Starts the candidate of `live` (whose manifest entry names it) with
    /// `state`, the live version's state. Never fails: a candidate that
    /// cannot start is kept as broken and reported with every batch.
    /// Returns it with the plugin event that says how it started.
    pub fn start(
        runtime: &Runtime,
        live: &Arc<StageSpec>,
        candidate: Candidate,
        state: &[u8],
    ) -> (Shadow, PluginEvent) {
        let mut spec = (**live).clone();
        if let Ok(c) = &candidate {
            spec.component = c.path.clone();
        }
        spec.shadow = None;
        // The candidate's own version label: the live one's belongs to the live file.
        spec.version = None;
        let mut shadow = Shadow {
            spec: Arc::new(spec),
            candidate,
            instance: None,
            broken: None,
            last_logged: None,
        };
        shadow.restart(runtime, state);
        let name = &shadow.spec.name;
        let started = match (&shadow.broken, &shadow.candidate) {
            (None, Ok(c)) => {
                tracing::info!(stage = %name, candidate = %c.path.display(), hash = c.short_hash(), "shadow candidate started beside the live version");
                PluginEvent::new(name, PluginEventKind::ShadowStarted)
                    .version(c.short_hash(), &c.hash)
            }
            (reason, candidate) => {
                let reason = reason.clone().unwrap_or_default();
                tracing::warn!(stage = %name, "shadow candidate cannot run (the live version is not affected): {reason}");
                shadow.last_logged = Some(reason.clone());
                let event = PluginEvent::new(name, PluginEventKind::ShadowRejected).reason(reason);
                match candidate {
                    Ok(c) => event.version(c.short_hash(), &c.hash).cause("start"),
                    Err(unloaded) => event.cause(unloaded.kind),
                }
            }
        };
        (shadow, started)
    }

    pub fn candidate(&self) -> &Candidate {
        &self.candidate
    }

    fn version(&self) -> String {
        match &self.candidate {
            Ok(c) => c.short_hash().to_owned(),
            Err(_) => "unloaded".to_owned(),
        }
    }

    /// A fresh instance from `state`, per the stage's `on-incompatible-state`.
    fn restart(&mut self, runtime: &Runtime, state: &[u8]) {
        self.instance = None;
        let component = match &self.candidate {
            Ok(c) => c.clone(),
            Err(reason) => {
                self.broken = Some(format!("candidate did not load: {reason}"));
                return;
            }
        };
        let start = || StageInstance::start(runtime, self.spec.clone(), component.clone());
        let result = start().and_then(|mut instance| {
            if state.is_empty() {
                return Ok(Ok(instance));
            }
            match instance.restore(state) {
                Ok(()) => Ok(Ok(instance)),
                Err(StageError::Restore { message, .. }) => Ok(Err(message)),
                Err(e) => Err(e),
            }
        });
        self.broken = None;
        match result {
            Ok(Ok(instance)) => self.instance = Some(instance),
            Ok(Err(reason)) => match self.spec.on_incompatible_state {
                OnIncompatibleState::Reset => match start() {
                    Ok(instance) => {
                        tracing::warn!(stage = %self.spec.name, "shadow candidate cannot restore the live state ({reason}); started empty (on-incompatible-state = reset)");
                        self.instance = Some(instance);
                    }
                    Err(e) => self.broken = Some(e.to_string()),
                },
                OnIncompatibleState::RefuseSwap => {
                    self.broken = Some(format!(
                        "candidate cannot restore the live state: {reason} (on-incompatible-state = refuse-swap)"
                    ))
                }
            },
            Err(e) => self.broken = Some(e.to_string()),
        }
    }

    /// Runs the candidate on `input`, the batch the live version just
    /// processed into `live` (failing on `live_failed` events), and
    /// compares. `live_state` is the live version's last snapshot, from
    /// which a failed candidate restarts.
    pub fn run(
        &mut self,
        runtime: &Runtime,
        live_version: StageVersion,
        input: &[Event],
        live: &BatchResult,
        live_failed: usize,
        live_state: &[u8],
    ) -> ShadowDiff {
        let started = Instant::now();
        // A trapped instance is replaced; a candidate that could not start
        // (does not load, refuses its config or the state) stays broken
        // until its file or the manifest changes.
        let fresh = match &self.instance {
            Some(instance) => instance.is_poisoned(),
            None => self.broken.is_none(),
        };
        if fresh {
            self.restart(runtime, live_state);
        }
        let outcome = match (&mut self.instance, &self.broken) {
            (_, Some(reason)) => Err(("unavailable", reason.clone())),
            (None, None) => Err(("unavailable", "candidate has no instance".to_owned())),
            (Some(instance), None) => instance
                .process(input)
                .and_then(|result| {
                    output::check(input, &result)
                        .map(|()| result)
                        .map_err(|message| StageError::BadOutput {
                            stage: self.spec.name.clone(),
                            message,
                        })
                })
                .map_err(|e| {
                    // The next batch starts a fresh instance: this one's
                    // state may be half-changed.
                    instance.retire();
                    (e.kind(), e.to_string())
                }),
        };
        let (counts, samples, error_kind, error) = match outcome {
            Ok(result) => {
                let (counts, samples) = compare(live, live_failed, &result, SAMPLES_PER_KIND);
                self.last_logged = None;
                (Some(counts), samples, None, None)
            }
            Err((kind, reason)) => {
                if self.last_logged.as_ref() != Some(&reason) {
                    tracing::warn!(stage = %self.spec.name, candidate = %self.version(), "shadow candidate failed (the live version is not affected): {reason}");
                    self.last_logged = Some(reason.clone());
                }
                (None, Vec::new(), Some(kind), Some(reason))
            }
        };
        ShadowDiff {
            stage: self.spec.name.clone(),
            live: live_version,
            candidate_version: self.version(),
            candidate_hash: self.candidate.as_ref().ok().map(|c| c.hash.clone()),
            rows_in: input.len(),
            counts,
            samples,
            error,
            error_kind,
            elapsed: started.elapsed(),
        }
    }
}

/// Consecutive failed batches after which a candidate is disabled.
pub const DISABLE_AFTER: u32 = 5;

/// One batch handed to the candidate's thread.
struct Job {
    live_version: StageVersion,
    input: Vec<Event>,
    live: BatchResult,
    live_failed: usize,
    live_state: Vec<u8>,
}

/// A [`Shadow`] on its own thread. Dropping it lets the thread finish the
/// batch in hand (bounded by the stage's time limit) and end.
pub struct ShadowWorker {
    candidate: Candidate,
    jobs: mpsc::SyncSender<Job>,
    diffs: mpsc::Receiver<ShadowDiff>,
    /// The candidate's plugin events (started or not, disabled): a few per
    /// worker, never dropped.
    events: mpsc::Receiver<PluginEvent>,
    /// Batches handed over whose diff has not been collected yet.
    pending: std::cell::Cell<usize>,
    limit: Duration,
}

impl ShadowWorker {
    /// Starts the candidate's thread; the candidate itself starts there,
    /// from `state`, so even its `init` and `restore` are off the live path.
    pub fn start(
        runtime: Arc<Runtime>,
        live: Arc<StageSpec>,
        candidate: Candidate,
        state: Vec<u8>,
    ) -> ShadowWorker {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(1);
        let (diff_tx, diffs) = mpsc::sync_channel::<ShadowDiff>(4);
        let (event_tx, events) = mpsc::channel::<PluginEvent>();
        let theirs = candidate.clone();
        let name = live.name.clone();
        let limit = live.limits.time_per_batch;
        let spawned = std::thread::Builder::new()
            .name(format!("shadow-{name}"))
            .spawn(move || {
                let (mut shadow, started) = Shadow::start(&runtime, &live, theirs, &state);
                let _ = event_tx.send(started);
                let mut failures = 0u32;
                for job in job_rx {
                    let diff = shadow.run(
                        &runtime,
                        job.live_version,
                        &job.input,
                        &job.live,
                        job.live_failed,
                        &job.live_state,
                    );
                    failures = match diff.error {
                        Some(_) => failures + 1,
                        None => 0,
                    };
                    let disable = failures >= DISABLE_AFTER;
                    let reason = diff.error.clone();
                    if diff_tx.try_send(diff).is_err() && disable {
                        // The live side is gone or not reading: stop.
                        return;
                    }
                    if disable {
                        let reason = format!(
                            "failed {failures} batches in a row, disabled until its file or the manifest changes; last error: {}",
                            reason.unwrap_or_default()
                        );
                        tracing::error!(stage = %live.name, "shadow candidate {reason} (the live version is not affected)");
                        let mut event = PluginEvent::new(&live.name, PluginEventKind::ShadowDisabled)
                            .reason(reason)
                            .cause("disabled");
                        if let Ok(c) = shadow.candidate() {
                            event = event.version(c.short_hash(), &c.hash);
                        }
                        let _ = event_tx.send(event);
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(stage = %name, "cannot start the shadow candidate's thread: {e}");
        }
        ShadowWorker {
            candidate,
            jobs,
            diffs,
            events,
            pending: std::cell::Cell::new(0),
            limit,
        }
    }

    pub fn candidate(&self) -> &Candidate {
        &self.candidate
    }

    /// Hands a batch to the candidate. Unless `wait`, a candidate still
    /// busy with an earlier batch (or disabled) skips this one, and the
    /// call never waits; with `wait` it waits for the candidate to take it.
    pub fn submit(
        &self,
        live_version: StageVersion,
        input: &[Event],
        live: &BatchResult,
        live_failed: usize,
        live_state: &[u8],
        wait: bool,
    ) {
        let job = Job {
            live_version,
            input: input.to_vec(),
            live: live.clone(),
            live_failed,
            live_state: live_state.to_vec(),
        };
        let sent = if wait {
            // Err only when the candidate's thread has ended (disabled).
            self.jobs.send(job).is_ok()
        } else {
            self.jobs.try_send(job).is_ok()
        };
        if sent {
            self.pending.set(self.pending.get() + 1);
        }
    }

    /// The plugin events the candidate reported since the last call.
    pub fn take_events(&self) -> Vec<PluginEvent> {
        self.events.try_iter().collect()
    }

    /// The diffs finished since the last call.
    pub fn ready(&self) -> Vec<ShadowDiff> {
        let out: Vec<ShadowDiff> = self.diffs.try_iter().collect();
        self.pending
            .set(self.pending.get().saturating_sub(out.len()));
        out
    }

    /// Waits for the batches handed over (at the end of the input, so
    /// their diffs are committed too), each for at most the candidate's
    /// time limit and its restart.
    pub fn finish(&self) -> Vec<ShadowDiff> {
        let mut out = self.ready();
        while self.pending.get() > 0 {
            match self
                .diffs
                .recv_timeout(self.limit * 3 + Duration::from_secs(1))
            {
                Ok(diff) => {
                    out.push(diff);
                    self.pending.set(self.pending.get() - 1);
                }
                Err(_) => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::Rejected;

    fn event(id: &str, kind: &str, price: i64) -> Event {
        Event {
            event_id: id.into(),
            user_id: 1,
            event_type: kind.into(),
            product_id: 1,
            price_cents: price,
            event_time: 0,
        }
    }

    fn result(events: Vec<Event>, rejected: Vec<Event>) -> BatchResult {
        BatchResult {
            events,
            rejected: rejected
                .into_iter()
                .map(|event| Rejected {
                    event,
                    reason: "no".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn identical_outputs_differ_in_nothing() {
        let out = result(vec![event("a", "view", 1), event("b", "view", 2)], vec![]);
        let d = diff(&out, 0, &out.clone());
        assert_eq!(
            d,
            DiffCounts {
                kept_both: 2,
                ..DiffCounts::default()
            }
        );
    }

    #[test]
    fn kept_changed_one_sided_and_rejected_are_counted_apart() {
        let live = result(
            vec![
                event("same", "view", 1),
                event("kind", "view", 1),
                event("both", "view", 1),
                event("live-only", "view", 1),
            ],
            vec![event("cand-only", "view", 1)],
        );
        let candidate = result(
            vec![
                event("same", "view", 1),
                event("kind", "purchase", 1),
                event("both", "purchase", 2),
                event("cand-only", "view", 1),
            ],
            vec![event("live-only", "view", 1), event("gone", "view", 1)],
        );
        let d = diff(&live, 2, &candidate);
        assert_eq!(d.kept_both, 3);
        assert_eq!(d.changed, 2);
        assert_eq!(d.live_only, 1);
        assert_eq!(d.candidate_only, 1);
        assert_eq!(d.live_rejected, 1 + 2, "live failures count as rejected");
        assert_eq!(d.candidate_rejected, 2);
        assert_eq!(
            d.fields,
            BTreeMap::from([("event_type", 2), ("price_cents", 1)])
        );
    }

    #[test]
    fn samples_show_what_differs_and_are_bounded() {
        let live = result(
            vec![
                event("a", "view", 1),
                event("b", "view", 1),
                event("c", "view", 1),
            ],
            vec![event("d", "view", 1)],
        );
        let candidate = result(
            vec![
                event("a", "view", 2),
                event("b", "view", 3),
                event("d", "view", 1),
            ],
            vec![event("c", "view", 1)],
        );
        let (counts, samples) = compare(&live, 0, &candidate, 1);
        assert_eq!(counts, diff(&live, 0, &candidate));
        assert_eq!(
            samples,
            vec![
                DiffSample {
                    kind: "changed",
                    event_id: "a".into(),
                    detail: "price_cents: 1 -> 2".into()
                },
                DiffSample {
                    kind: "live_only",
                    event_id: "c".into(),
                    detail: "the candidate rejected it: no".into()
                },
                DiffSample {
                    kind: "candidate_only",
                    event_id: "d".into(),
                    detail: "the live version rejected it: no".into()
                },
            ]
        );
        assert!(compare(&live, 0, &candidate, 0).1.is_empty());
    }

    #[test]
    fn repeated_ids_are_paired_in_order() {
        let live = result(vec![event("a", "view", 1), event("a", "view", 2)], vec![]);
        let candidate = result(vec![event("a", "view", 1)], vec![]);
        let d = diff(&live, 0, &candidate);
        assert_eq!((d.kept_both, d.changed, d.live_only), (1, 0, 1));
        let d = diff(&candidate, 0, &live);
        assert_eq!((d.kept_both, d.candidate_only), (1, 1));
    }

    proptest::proptest! {
        /// Whatever two versions return, every kept event is counted once
        /// on each side, and changes are only counted for pairs.
        #[test]
        fn counts_account_for_every_kept_event(
            live in proptest::collection::vec((0u8..8, 0i64..3), 0..40),
            candidate in proptest::collection::vec((0u8..8, 0i64..3), 0..40),
        ) {
            let events = |v: &[(u8, i64)]| -> Vec<Event> {
                v.iter().map(|(id, price)| event(&id.to_string(), "view", *price)).collect()
            };
            let (l, c) = (result(events(&live), vec![]), result(events(&candidate), vec![]));
            let d = diff(&l, 0, &c);
            proptest::prop_assert_eq!(d.kept_both + d.live_only, live.len());
            proptest::prop_assert_eq!(d.kept_both + d.candidate_only, candidate.len());
            proptest::prop_assert!(d.changed <= d.kept_both);
            proptest::prop_assert_eq!(d.fields.get("price_cents").copied().unwrap_or(0), d.changed);
            // Symmetric: swapping the roles swaps the one-sided counts.
            let back = diff(&c, 0, &l);
            proptest::prop_assert_eq!((back.kept_both, back.live_only, back.candidate_only), (d.kept_both, d.candidate_only, d.live_only));
        }
    }

    #[test]
    fn every_field_is_compared() {
        let a = event("a", "view", 1);
        let mut b = a.clone();
        b.user_id = 2;
        b.product_id = 3;
        b.event_time = 4;
        assert_eq!(
            changed_fields(&a, &b),
            vec!["user_id", "product_id", "event_time"]
        );
        assert!(changed_fields(&a, &a.clone()).is_empty());
    }
}
