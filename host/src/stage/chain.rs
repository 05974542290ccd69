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
use super::manifest::{OnIncompatibleState, StageSpec};
use super::output;
use super::runtime::{LoadedComponent, Runtime};
use super::shadow::{self, Shadow, ShadowDiff};
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
    /// One per stage with a shadow candidate.
    pub shadows: Vec<ShadowDiff>,
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
    /// The state the last fresh instance was given; a replacement after a
    /// trap starts from it (a stale state is safe: the table's primary key
    /// still rejects what a stale dedup set lets through).
    base_state: Vec<u8>,
    /// The slot this one replaced, kept until this one's first batch works.
    previous: Option<Box<Slot>>,
    shadow: Option<Shadow>,
}

impl Slot {
    fn start(runtime: &Runtime, prepared: Prepared, state: Vec<u8>) -> Result<Slot, StageError> {
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
            match slot.live.restore(&state)? {
                Ok(()) => slot.base_state = state,
                Err(reason) => {
                    return Err(StageError::Init {
                        stage: slot.live.name().to_owned(),
                        message: format!("cannot restore its state: {reason}"),
                    })
                }
            }
        }
        // The candidate gets the state the live version accepted.
        if let Some(candidate) = &slot.prepared.shadow {
            slot.shadow = Some(Shadow::start(
                runtime,
                &slot.prepared.spec,
                candidate.clone(),
                &slot.base_state,
            ));
        }
        Ok(slot)
    }

    /// Runs the shadow candidate, if any, on the batch the live version
    /// just processed; its failures stay inside the returned diff.
    fn shadow_run(
        &mut self,
        runtime: &Runtime,
        input: &[Event],
        result: &BatchResult,
        failed: usize,
    ) -> Option<ShadowDiff> {
        // Most stages have no candidate: no version strings built for them.
        self.shadow.as_ref()?;
        let version = self.version();
        let shadow = self.shadow.as_mut()?;
        Some(shadow.run(runtime, version, input, result, failed, &self.base_state))
    }

    /// Takes a new plan entry for an unchanged live version: (re)starts
    /// the shadow candidate if it changed, handing it the live state.
    fn keep(&mut self, runtime: &Runtime, prepared: Prepared) {
        if !shadow::same_candidate(self.prepared.shadow.as_ref(), prepared.shadow.as_ref()) {
            self.shadow = prepared.shadow.clone().map(|candidate| {
                let state = match self.live.is_poisoned() {
                    true => self.base_state.clone(),
                    false => self
                        .live
                        .snapshot()
                        .unwrap_or_else(|_| self.base_state.clone()),
                };
                Shadow::start(runtime, &prepared.spec, candidate, &state)
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
            live.restore(&self.base_state)?
                .map_err(|reason| StageError::Init {
                    stage: live.name().to_owned(),
                    message: format!("cannot restore its state: {reason}"),
                })?;
        }
        self.live = live;
        Ok(())
    }

    /// One attempt: process and check the output.
    fn attempt(&mut self, runtime: &Runtime, events: &[Event]) -> Result<BatchResult, StageError> {
        if self.live.is_poisoned() {
            self.refresh(runtime)?;
        }
        let result = self.live.process(events)?;
        output::check(events, &result).map_err(|message| StageError::BadOutput {
            stage: self.live.name().to_owned(),
            message,
        })?;
        Ok(result)
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
        for prepared in plan {
            let state = states.get(&prepared.spec.name).cloned().unwrap_or_default();
            let slot = match Slot::start(&runtime, prepared.clone(), state) {
                Ok(slot) => slot,
                Err(StageError::Init { stage, message })
                    if message.starts_with("cannot restore") =>
                {
                    tracing::warn!(stage, "{message}; starting it with empty state");
                    Slot::start(&runtime, prepared, Vec::new())?
                }
                Err(e) => return Err(e),
            };
            events::record(
                PluginEvent::new(&slot.prepared.spec.name, PluginEventKind::Loaded)
                    .version(&slot.live.version(), &slot.prepared.component.hash),
            );
            slots.push(slot);
        }
        Ok(Chain { runtime, slots })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
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
            if let Some(diff) =
                self.slots[index].shadow_run(&self.runtime, current, &result, failed.len())
            {
                out.shadows.push(diff);
            }
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
                    crate::metrics::global().plugin_rejected(slot.live.name(), "first_batch");
                    events::record(
                        PluginEvent::new(slot.live.name(), PluginEventKind::Rejected)
                            .version(&slot.live.version(), &slot.prepared.component.hash)
                            .reason(format!("failed its first batch: {err}")),
                    );
                    if let Some(previous) = previous {
                        *slot = previous;
                    }
                }
            }
        }
        slot.run(&runtime, events, failed)
    }

    /// Takes every stage's state, to commit with the next batch.
    pub fn snapshots(&mut self) -> Vec<StageSnapshot> {
        let mut out = Vec::with_capacity(self.slots.len());
        for slot in &mut self.slots {
            match slot.live.snapshot() {
                Ok(state) => {
                    slot.base_state = state.clone();
                    out.push(StageSnapshot {
                        stage: slot.version(),
                        state,
                    });
                }
                Err(e) => tracing::warn!(stage = slot.live.name(), "cannot take a snapshot: {e}"),
            }
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
                        events::record(refused.reason(reason.clone()));
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
                        events::record(refused.reason(e.to_string()));
                        report.refused.push((name, e.to_string()));
                    }
                },
            }
        }
        report.removed = old.into_keys().collect();
        self.slots = slots;
        events::record_swap(&report);
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
            Err(StageError::Init { stage, message }) if message.starts_with("cannot restore") => {
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
