//! The ordered stages of the pipeline and how a batch goes through them.
//!
//! Every batch is processed wholly by one version of each stage. Changes
//! (`apply`) happen only between batches. A failing stage is isolated:
//! the batch is retried once on a fresh instance, then bisected until the
//! events that make it fail are found; those are returned as failures
//! (to quarantine) and the rest go on. A new version that fails its first
//! batch is rolled back to the version it replaced.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bindings::{BatchResult, Event};
use super::events::{self, PluginEvent, PluginEventKind};
use super::instance::StageInstance;
use super::manifest::{OnIncompatibleState, SnapshotPolicy, StageSpec};
use super::output;
use super::runtime::{LoadedComponent, Runtime};
use super::shadow::{self, ShadowDiff, ShadowWorker};
use super::StageError;

/// A stage ready to start: its manifest entry and its checked component.
#[derive(Clone)]
pub struct Prepared {
    pub spec: Arc<StageSpec>,
    pub component: Arc<LoadedComponent>,
    /// The shadow candidate the manifest names, loaded or not.
    pub shadow: Option<shadow::Candidate>,
}

/// Which version of a stage processed a batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StageVersion {
    pub name: String,
    pub version: String,
    pub hash: String,
}

/// What one stage did with one batch.
#[derive(Debug, Clone)]
pub struct StageRun {
    pub stage: StageVersion,
    pub elapsed: Duration,
    pub rows_in: usize,
    pub rows_out: usize,
    pub rejected: usize,
    pub failed: usize,
}

/// An event a stage rejected (`failure == false`) or failed on.
#[derive(Debug, Clone)]
pub struct StageRejection {
    pub stage: String,
    pub event: Event,
    pub reason: String,
    pub failure: bool,
}

#[derive(Debug, Default)]
pub struct ChainOutput {
    pub events: Vec<Event>,
    pub rejections: Vec<StageRejection>,
    pub runs: Vec<StageRun>,
    /// The shadow diffs finished since the last batch (a candidate runs
    /// on its own thread).
    pub shadows: Vec<ShadowDiff>,
    /// What happened to the stages' components since the last batch
    /// (loaded, swapped, rolled back, a candidate started or disabled):
    /// to commit with this batch.
    pub plugin_events: Vec<PluginEvent>,
}

/// State of one stage, as committed with a batch.
#[derive(Debug, Clone)]
pub struct StageSnapshot {
    pub stage: StageVersion,
    pub state: Vec<u8>,
}

/// What `apply` changed, for logs and status.
#[derive(Debug, Default)]
pub struct SwapReport {
    pub started: Vec<StageVersion>,
    pub kept: Vec<String>,
    pub removed: Vec<String>,
    pub refused: Vec<(String, String)>,
    /// Stages whose new version is the candidate their shadow ran.
    pub promoted: Vec<String>,
}

struct Slot {
    prepared: Prepared,
    live: StageInstance,
    /// The stage's state as of the last batch it completed: for
    /// `snapshot = "every-batch"` taken after each successful attempt
    /// (so a replacement after a trap, or the next half of a bisection,
    /// goes on from exactly what the completed events taught the stage);
    /// for `"interval"` the last snapshot taken (a stale state is safe
    /// there: the table's primary key still rejects what a stale dedup set
    /// lets through).
    base_state: Vec<u8>,
    /// The slot this one replaced, kept until this one's first batch works.
    previous: Option<Box<Slot>>,
    shadow: Option<ShadowWorker>,
}

impl Slot {
    /// Starts a stage and restores `state` into it. A state it cannot
    /// restore (it refuses it, traps or runs out of time) is a
    /// [`StageError::Restore`]: the caller applies the stage's
    /// `on-incompatible-state`.
    fn start(
        runtime: &Arc<Runtime>,
        prepared: Prepared,
        state: Vec<u8>,
    ) -> Result<Slot, StageError> {
        let live =
            StageInstance::start(runtime, prepared.spec.clone(), prepared.component.clone())?;
        let mut slot = Slot {
            prepared,
            live,
            base_state: Vec::new(),
            previous: None,
            shadow: None,
        };
        if !state.is_empty() {
            slot.live.restore(&state)?;
            slot.base_state = state;
        }
        // The candidate gets the state the live version accepted.
        if let Some(candidate) = &slot.prepared.shadow {
            slot.shadow = Some(ShadowWorker::start(
                runtime.clone(),
                slot.prepared.spec.clone(),
                candidate.clone(),
                slot.base_state.clone(),
            ));
        }
        Ok(slot)
    }

    /// Hands the batch the live version just processed to the shadow
    /// candidate, if any, without waiting for it; returns the diffs the
    /// candidate has finished since (its failures stay inside them).
    fn shadow_run(
        &mut self,
        input: &[Event],
        result: &BatchResult,
        failed: usize,
        every_batch: bool,
    ) -> Vec<ShadowDiff> {
        // Most stages have no candidate: no version strings built for them.
        if self.shadow.is_none() {
            return Vec::new();
        }
        let version = self.version();
        match &self.shadow {
            Some(shadow) => {
                shadow.submit(
                    version,
                    input,
                    result,
                    failed,
                    &self.base_state,
                    every_batch,
                );
                shadow.ready()
            }
            None => Vec::new(),
        }
    }

    /// Takes a new plan entry for an unchanged live version: (re)starts
    /// the shadow candidate if it changed, handing it the live state.
    fn keep(&mut self, runtime: &Arc<Runtime>, prepared: Prepared) {
        if !shadow::same_candidate(self.prepared.shadow.as_ref(), prepared.shadow.as_ref()) {
            self.shadow = prepared.shadow.clone().map(|candidate| {
                let state = match self.live.is_poisoned() {
                    true => self.base_state.clone(),
                    false => self
                        .live
                        .snapshot()
                        .unwrap_or_else(|_| self.base_state.clone()),
                };
                ShadowWorker::start(runtime.clone(), prepared.spec.clone(), candidate, state)
            });
        }
        self.prepared = prepared;
    }

    fn version(&self) -> StageVersion {
        StageVersion {
            name: self.live.name().to_owned(),
            version: self.live.version(),
            hash: self.prepared.component.hash.clone(),
        }
    }

    /// Replaces a trapped instance with a fresh one from `base_state`.
    fn refresh(&mut self, runtime: &Runtime) -> Result<(), StageError> {
        let mut live = StageInstance::start(
            runtime,
            self.prepared.spec.clone(),
            self.prepared.component.clone(),
        )?;
        if !self.base_state.is_empty() {
            live.restore(&self.base_state)?;
        }
        self.live = live;
        Ok(())
    }

    /// One attempt: process, check the output, and for an every-batch
    /// stage take its state; a snapshot that fails fails the attempt, as
    /// the state it would commit is unknown.
    fn attempt(&mut self, runtime: &Runtime, events: &[Event]) -> Result<BatchResult, StageError> {
        if self.live.is_poisoned() {
            self.refresh(runtime)?;
        }
        let result = self.live.process(events)?;
        output::check(events, &result).map_err(|message| StageError::BadOutput {
            stage: self.live.name().to_owned(),
            message,
        })?;
        if self.every_batch() {
            self.base_state = self.live.snapshot()?;
        }
        Ok(result)
    }

    fn every_batch(&self) -> bool {
        self.prepared.spec.snapshot == SnapshotPolicy::EveryBatch
    }

    /// Processes a batch, isolating the events that make the stage fail.
    fn run(
        &mut self,
        runtime: &Runtime,
        events: &[Event],
        failed: &mut Vec<(Event, StageError)>,
    ) -> BatchResult {
        match self.attempt(runtime, events) {
            Ok(result) => result,
            Err(first) => {
                tracing::warn!(
                    stage = self.live.name(),
                    events = events.len(),
                    "{first}; retrying on a fresh instance"
                );
                self.force_fresh();
                match self.attempt(runtime, events) {
                    Ok(result) => result,
                    Err(err) => self.bisect(runtime, events, err, failed),
                }
            }
        }
    }

    fn bisect(
        &mut self,
        runtime: &Runtime,
        events: &[Event],
        err: StageError,
        failed: &mut Vec<(Event, StageError)>,
    ) -> BatchResult {
        self.force_fresh();
        if events.len() <= 1 {
            failed.extend(events.iter().cloned().map(|e| (e, err.clone())));
            return BatchResult {
                events: Vec::new(),
                rejected: Vec::new(),
            };
        }
        let (left, right) = events.split_at(events.len() / 2);
        let mut merged = BatchResult {
            events: Vec::new(),
            rejected: Vec::new(),
        };
        for half in [left, right] {
            let part = match self.attempt(runtime, half) {
                Ok(r) => r,
                Err(e) => self.bisect(runtime, half, e, failed),
            };
            merged.events.extend(part.events);
            merged.rejected.extend(part.rejected);
        }
        merged
    }

    /// After any failure, the next attempt starts from a clean instance:
    /// a refused batch may have changed the stage's state half way.
    fn force_fresh(&mut self) {
        self.live.retire();
    }
}

pub struct Chain {
    runtime: Arc<Runtime>,
    slots: Vec<Slot>,
    /// Whether every batch goes to the shadow candidates, waiting for a
    /// busy one (see `compare_every_batch`).
    every_shadow_batch: bool,
    /// Plugin events not yet handed out (`take_events`).
    events: Vec<PluginEvent>,
}

impl Chain {
    /// Starts every stage, restoring the states committed for it. A state
    /// the stage cannot read is handled by its `on-incompatible-state`.
    pub fn start(
        runtime: Arc<Runtime>,
        plan: Vec<Prepared>,
        states: &HashMap<String, Vec<u8>>,
    ) -> Result<Chain, StageError> {
        let mut slots = Vec::with_capacity(plan.len());
        let mut events = Vec::new();
        for prepared in plan {
            let state = states.get(&prepared.spec.name).cloned().unwrap_or_default();
            let slot = match Slot::start(&runtime, prepared.clone(), state) {
                Ok(slot) => slot,
                Err(StageError::Restore { stage, message }) => {
                    match prepared.spec.on_incompatible_state {
                        OnIncompatibleState::RefuseSwap => {
                            return Err(StageError::RestoreRefused { stage, message })
                        }
                        OnIncompatibleState::Reset => {
                            tracing::warn!(
                                stage,
                                "cannot restore the state committed for it ({message}); starting it with empty state (on-incompatible-state = reset)"
                            );
                            events.push(
                                PluginEvent::new(&stage, PluginEventKind::StateReset)
                                    .version(
                                        prepared
                                            .spec
                                            .version
                                            .as_deref()
                                            .unwrap_or(prepared.component.short_hash()),
                                        &prepared.component.hash,
                                    )
                                    .reason(format!(
                                        "cannot restore its state ({message}); started empty (on-incompatible-state = reset)"
                                    )),
                            );
                            Slot::start(&runtime, prepared, Vec::new())?
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            events.push(
                PluginEvent::new(&slot.prepared.spec.name, PluginEventKind::Loaded)
                    .version(&slot.live.version(), &slot.prepared.component.hash),
            );
            slots.push(slot);
        }
        Ok(Chain {
            runtime,
            slots,
            every_shadow_batch: false,
            events,
        })
    }

    /// The plugin events since the last call: the chain's own (start,
    /// swaps, rollbacks) and its shadow candidates'.
    pub fn take_events(&mut self) -> Vec<PluginEvent> {
        let mut out = std::mem::take(&mut self.events);
        for shadow in self.slots.iter().filter_map(|s| s.shadow.as_ref()) {
            out.extend(shadow.take_events());
        }
        out
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Hands every batch to the shadow candidates, waiting while one is
    /// still busy with the batch before (each call is bounded by its time
    /// limit). For backfills and replays, where a complete comparison
    /// matters more than latency; a streaming host skips a batch instead,
    /// so that a slow candidate delays nothing.
    pub fn compare_every_batch(&mut self) {
        self.every_shadow_batch = true;
    }

    pub fn versions(&self) -> Vec<StageVersion> {
        self.slots.iter().map(Slot::version).collect()
    }

    /// Runs a batch through every stage in order.
    pub fn process(&mut self, events: &[Event]) -> ChainOutput {
        let mut out = ChainOutput::default();
        // The first stage reads the batch in place; later ones read the
        // output of the stage before.
        let mut owned: Option<Vec<Event>> = None;
        for index in 0..self.slots.len() {
            let started = Instant::now();
            let mut failed = Vec::new();
            let current = owned.as_deref().unwrap_or(events);
            let rows_in = current.len();
            let result = self.run_slot(index, current, &mut failed);
            out.shadows.extend(self.slots[index].shadow_run(
                current,
                &result,
                failed.len(),
                self.every_shadow_batch,
            ));
            let slot = &self.slots[index];
            let name = slot.live.name().to_owned();
            out.runs.push(StageRun {
                stage: slot.version(),
                elapsed: started.elapsed(),
                rows_in,
                rows_out: result.events.len(),
                rejected: result.rejected.len(),
                failed: failed.len(),
            });
            out.rejections
                .extend(result.rejected.into_iter().map(|r| StageRejection {
                    stage: name.clone(),
                    event: r.event,
                    reason: r.reason,
                    failure: false,
                }));
            out.rejections
                .extend(failed.into_iter().map(|(event, err)| StageRejection {
                    stage: name.clone(),
                    event,
                    reason: err.to_string(),
                    failure: true,
                }));
            owned = Some(result.events);
        }
        out.events = owned.unwrap_or_else(|| events.to_vec());
        out.plugin_events = self.take_events();
        out
    }

    /// Runs one slot; a new version that fails its first batch is rolled
    /// back to the version it replaced, which then runs the batch.
    fn run_slot(
        &mut self,
        index: usize,
        events: &[Event],
        failed: &mut Vec<(Event, StageError)>,
    ) -> BatchResult {
        let runtime = self.runtime.clone();
        let slot = &mut self.slots[index];
        if slot.previous.is_some() && !events.is_empty() {
            match slot.attempt(&runtime, events) {
                Ok(result) => {
                    slot.previous = None;
                    return result;
                }
                Err(err) => {
                    let previous = slot.previous.take().map(|b| *b);
                    tracing::error!(
                        stage = slot.live.name(),
                        component = %slot.prepared.component.path.display(),
                        hash = slot.prepared.component.short_hash(),
                        "new version rejected: failed its first batch: {err}; keeping the previous version"
                    );
                    self.events.push(
                        PluginEvent::new(slot.live.name(), PluginEventKind::Rejected)
                            .version(&slot.live.version(), &slot.prepared.component.hash)
                            .reason(format!("failed its first batch: {err}"))
                            .cause("first_batch"),
                    );
                    if let Some(previous) = previous {
                        *slot = previous;
                    }
                }
            }
        }
        slot.run(&runtime, events, failed)
    }

    /// The shadow diffs still in flight, waited for: at the end of the
    /// input, so the last batches' diffs are committed too.
    pub fn finish_shadows(&mut self) -> Vec<ShadowDiff> {
        self.slots
            .iter()
            .filter_map(|s| s.shadow.as_ref())
            .flat_map(ShadowWorker::finish)
            .collect()
    }

    /// Every stage's state, to commit with the batch just processed. An
    /// every-batch stage gives the state its last attempt took; an
    /// interval stage is asked for a snapshot when `due`. A stage that
    /// cannot give one (it failed, or its snapshot fails) commits the last
    /// state it had: leaving it out would keep an older one in the table.
    pub fn snapshots(&mut self, due: bool) -> Vec<StageSnapshot> {
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &mut self.slots {
            if !slot.every_batch() && !due {
                continue;
            }
            if !slot.every_batch() && !slot.live.is_poisoned() {
                match slot.live.snapshot() {
                    Ok(state) => slot.base_state = state,
                    Err(e) => {
                        tracing::warn!(stage = slot.live.name(), "cannot take a snapshot: {e}")
                    }
                }
            }
            out.push(StageSnapshot {
                stage: slot.version(),
                state: slot.base_state.clone(),
            });
        }
        out
    }

    /// Puts the stages back to the states `snapshots` took: a batch that
    /// was processed but will not be committed (held by a pause) must
    /// leave no trace in, say, a dedup set. A stage whose version changed
    /// since is left as it is.
    pub fn rewind(&mut self, snapshots: Vec<StageSnapshot>) {
        for snapshot in snapshots {
            if let Some(slot) = self
                .slots
                .iter_mut()
                .find(|s| s.version() == snapshot.stage)
            {
                slot.base_state = snapshot.state;
                slot.force_fresh();
            }
        }
    }

    /// Applies a new plan between batches. Stages whose component and spec
    /// are unchanged keep their instance; changed ones start a new
    /// instance that receives the old one's state.
    pub fn apply(&mut self, plan: Vec<Prepared>) -> SwapReport {
        let mut report = SwapReport::default();
        let mut old: HashMap<String, Slot> = self
            .slots
            .drain(..)
            .map(|s| (s.live.name().to_owned(), s))
            .collect();
        let mut slots = Vec::with_capacity(plan.len());
        for prepared in plan {
            let name = prepared.spec.name.clone();
            // Recorded if the new version is refused: `prepared` moves below.
            let refused = PluginEvent::new(&name, PluginEventKind::Rejected).version(
                prepared
                    .spec
                    .version
                    .as_deref()
                    .unwrap_or(prepared.component.short_hash()),
                &prepared.component.hash,
            );
            match old.remove(&name) {
                Some(mut slot)
                    if slot.prepared.component.hash == prepared.component.hash
                        && slot.prepared.spec.same_live(&prepared.spec) =>
                {
                    report.kept.push(name);
                    slot.keep(&self.runtime, prepared);
                    slots.push(slot);
                }
                Some(mut previous) => match self.successor(&mut previous, prepared) {
                    Ok(mut slot) => {
                        let was_candidate = previous.shadow.as_ref().is_some_and(|s| {
                            matches!(s.candidate(), Ok(c) if c.hash == slot.prepared.component.hash)
                        });
                        if was_candidate {
                            report.promoted.push(name);
                        }
                        report.started.push(slot.version());
                        slot.previous = Some(Box::new(previous));
                        slots.push(slot);
                    }
                    Err(reason) => {
                        self.events
                            .push(refused.reason(reason.clone()).cause("start"));
                        report.refused.push((name, reason));
                        slots.push(previous);
                    }
                },
                None => match Slot::start(&self.runtime, prepared, Vec::new()) {
                    Ok(slot) => {
                        report.started.push(slot.version());
                        slots.push(slot);
                    }
                    Err(e) => {
                        self.events
                            .push(refused.reason(e.to_string()).cause("start"));
                        report.refused.push((name, e.to_string()));
                    }
                },
            }
        }
        // What a removed or replaced stage's candidate said before it went.
        for shadow in old.values().filter_map(|s| s.shadow.as_ref()) {
            self.events.extend(shadow.take_events());
        }
        report.removed = old.into_keys().collect();
        self.slots = slots;
        self.events.extend(events::of_swap(&report));
        report
    }

    /// Starts the new version of a stage with the old version's state.
    fn successor(&self, previous: &mut Slot, prepared: Prepared) -> Result<Slot, String> {
        let state = if previous.live.is_poisoned() {
            previous.base_state.clone()
        } else {
            previous.live.snapshot().map_err(|e| e.to_string())?
        };
        let policy = prepared.spec.on_incompatible_state;
        match Slot::start(&self.runtime, prepared.clone(), state) {
            Ok(slot) => Ok(slot),
            Err(StageError::Restore { stage, message }) => {
                let message = format!("cannot restore its state: {message}");
                match policy {
                    OnIncompatibleState::RefuseSwap => Err(format!(
                        "the new version {message} (on-incompatible-state = refuse-swap)"
                    )),
                    OnIncompatibleState::Reset => {
                        tracing::warn!(stage, "new version {message}; starting it with empty state (on-incompatible-state = reset)");
                        Slot::start(&self.runtime, prepared, Vec::new()).map_err(|e| e.to_string())
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        }
    }
}
