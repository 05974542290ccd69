//! Pausing the input when a stage fails everything.
//!
//! Retry and bisection (`stage::chain`) keep a few poison events from
//! costing a batch. But a stage that fails *every* event (a broken build,
//! a setting it cannot run with) would have bisection quarantine the whole
//! input as `failed`, one event at a time, for as long as it runs. The
//! [`Breaker`] watches what each stage did with each batch; once one has
//! failed every event of `threshold` consecutive batches (and at least
//! [`MIN_EVENTS`] events in all, so a few one-event batches at a trickle
//! do not trip it), the stage thread stops taking batches. It holds the
//! next batch unprocessed, the bounded channels stop the source, and
//! nothing more is quarantined. A new version of that stage (or its
//! removal from the manifest), delivered by the hot-swap path, resumes the
//! pipeline: the held batch is the new version's first. If the new version
//! fails every event of it too, the batch is not committed, the stages'
//! state is rewound, and the pause goes on.
//!
//! The threshold is a command-line setting (`--pause-after`), not a
//! manifest one: how much input an operator accepts to see quarantined
//! before the pipeline stops is a property of the deployment, and a
//! plugin's manifest entry must not be able to switch the safety off.

use std::collections::HashMap;

use crate::batch::Batch;
use crate::sink::Commit;
use crate::stage::chain::{Chain, StageRejection, StageRun, SwapReport};

/// Consecutive batches a stage must fail wholly before the input pauses.
/// Three: one bad batch can be a burst of poison events, three in a row
/// at any batch size is a stage that cannot process anything.
pub const DEFAULT_THRESHOLD: u32 = 3;

/// Events the failing streak must cover before it trips.
pub const MIN_EVENTS: usize = 10;

/// Why the input is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub stage: String,
    /// The version and component hash that failed.
    pub version: String,
    pub hash: String,
    /// The last failure's message.
    pub reason: String,
    pub batches: u32,
    pub events: usize,
}

impl Pause {
    /// One line for logs and `/healthz`: what failed and what to do.
    pub fn describe(&self) -> String {
        format!(
            "paused the input: stage {} (version {}, component {}) failed every event of {} consecutive batches ({} events); last error: {}. Nothing more is read or quarantined until a new version of the stage is swapped in (or it is removed from pipeline.toml); the held batch then goes to it first",
            self.stage,
            self.version,
            short(&self.hash),
            self.batches,
            self.events,
            self.reason
        )
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

#[derive(Debug, Default, Clone, Copy)]
struct Streak {
    batches: u32,
    events: usize,
}

#[derive(Debug)]
enum State {
    Running,
    /// Holding the input until the stage changes.
    Paused(Pause),
    /// The stage changed; the held batch is being tried on it.
    Probing(Pause),
}

/// Decides when the input pauses and when it resumes. Fed by the stage
/// thread: `observe` after each processed batch, `on_swap` after each
/// applied plan, `probe_result` after the held batch ran on a new version.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    streaks: HashMap<String, Streak>,
    state: State,
}

impl Breaker {
    /// `threshold == 0` never pauses.
    pub fn new(threshold: u32) -> Breaker {
        Breaker {
            threshold,
            streaks: HashMap::new(),
            state: State::Running,
        }
    }

    /// The pause in force, if the input is held.
    pub fn paused(&self) -> Option<&Pause> {
        match &self.state {
            State::Paused(p) => Some(p),
            _ => None,
        }
    }

    /// Whether the batch about to be processed is the held one, tried on
    /// a new version: its outcome goes to `probe_result`, not `observe`.
    pub fn probing(&self) -> bool {
        matches!(self.state, State::Probing(_))
    }

    /// Records what the stages did with a batch that is being committed.
    /// Returns the pause when this batch trips it.
    pub fn observe(&mut self, runs: &[StageRun], rejections: &[StageRejection]) -> Option<Pause> {
        if self.threshold == 0 {
            return None;
        }
        let mut tripped = None;
        for run in runs {
            // A stage handed nothing says nothing about its health.
            if run.rows_in == 0 {
                continue;
            }
            if run.failed < run.rows_in {
                self.streaks.remove(&run.stage.name);
                continue;
            }
            let streak = self.streaks.entry(run.stage.name.clone()).or_default();
            streak.batches += 1;
            streak.events += run.rows_in;
            if tripped.is_none()
                && matches!(self.state, State::Running)
                && streak.batches >= self.threshold
                && streak.events >= MIN_EVENTS
            {
                let reason = rejections
                    .iter()
                    .rev()
                    .find(|r| r.failure && r.stage == run.stage.name)
                    .map(|r| r.reason.clone())
                    .unwrap_or_else(|| "every event failed".into());
                tripped = Some(Pause {
                    stage: run.stage.name.clone(),
                    version: run.stage.version.clone(),
                    hash: run.stage.hash.clone(),
                    reason,
                    batches: streak.batches,
                    events: streak.events,
                });
            }
        }
        if let Some(pause) = &tripped {
            self.state = State::Paused(pause.clone());
        }
        tripped
    }

    /// After a plan was applied: a new version of the paused stage, or its
    /// removal, ends the hold. Returns the pause that ended.
    pub fn on_swap(&mut self, report: &SwapReport) -> Option<Pause> {
        for v in &report.started {
            self.streaks.remove(&v.name);
        }
        for name in &report.removed {
            self.streaks.remove(name);
        }
        let State::Paused(pause) = &self.state else {
            return None;
        };
        let changed = report.started.iter().any(|v| v.name == pause.stage)
            || report.removed.contains(&pause.stage);
        if !changed {
            return None;
        }
        let pause = pause.clone();
        self.state = State::Probing(pause.clone());
        Some(pause)
    }

    /// The held batch ran after a swap. `Ok(())`: the paused stage did not
    /// fail all of it, so the batch is committed and the input resumes.
    /// `Err(pause)`: it still fails everything; the batch must not be
    /// committed and the input stays held.
    pub fn probe_result(&mut self, runs: &[StageRun]) -> Result<(), Pause> {
        let State::Probing(pause) = &self.state else {
            return Ok(());
        };
        let still_failing = runs
            .iter()
            .any(|r| r.stage.name == pause.stage && r.rows_in > 0 && r.failed == r.rows_in);
        if still_failing {
            let mut pause = pause.clone();
            if let Some(run) = runs.iter().find(|r| r.stage.name == pause.stage) {
                pause.version = run.stage.version.clone();
                pause.hash = run.stage.hash.clone();
            }
            self.state = State::Paused(pause.clone());
            return Err(pause);
        }
        self.streaks.remove(&pause.stage);
        self.state = State::Running;
        Ok(())
    }
}

/// The pause protocol as the stage loop sees it: the [`Breaker`], the
/// batch held while the input is paused, and the probe of that batch on
/// the new version. The loop asks it for the next batch, hands it each
/// batch to run and each commit to observe, and tells it of swaps.
pub struct Hold {
    breaker: Breaker,
    held: Option<Batch>,
}

/// What came of running a batch (see [`Hold::run`]).
pub enum Ran {
    /// To commit.
    Commit(Box<Commit>),
    /// The held batch failed wholly on the new version too: it is held
    /// again, the stages rewound.
    Held(Pause),
}

impl Hold {
    /// `threshold == 0` never pauses.
    pub fn new(threshold: u32) -> Hold {
        Hold {
            breaker: Breaker::new(threshold),
            held: None,
        }
    }

    /// The held batch if there is one, else the next from `input`.
    pub fn next(&mut self, input: impl FnOnce() -> Option<Batch>) -> Option<Batch> {
        self.held.take().or_else(input)
    }

    /// The pause in force, if the input is held.
    pub fn paused(&self) -> Option<&Pause> {
        self.breaker.paused()
    }

    /// After a plan was applied: returns the pause it ended, if any (the
    /// held batch then goes to the new version first).
    pub fn on_swap(&mut self, report: &SwapReport) -> Option<Pause> {
        self.breaker.on_swap(report)
    }

    /// Runs `batch` through `process`. The held batch, tried on a new
    /// version that fails all of it too, must leave nothing behind: not
    /// the rows, not the quarantine, not what earlier stages learnt from
    /// it; the chain is rewound and the batch held again.
    pub fn run(
        &mut self,
        chain: &mut Chain,
        batch: Batch,
        process: impl FnOnce(&mut Chain, Batch) -> Commit,
    ) -> Ran {
        if !self.breaker.probing() {
            return Ran::Commit(Box::new(process(chain, batch)));
        }
        let before = chain.snapshots(true);
        let again = batch.clone();
        let commit = process(chain, batch);
        match self.breaker.probe_result(&commit.stages) {
            Ok(()) => {
                tracing::info!(stage = %commit.stages.iter().map(|r| r.stage.name.as_str()).collect::<Vec<_>>().join(","),
                    "the held batch went through; input resumed");
                Ran::Commit(Box::new(commit))
            }
            Err(pause) => {
                chain.rewind(before);
                tracing::error!(stage = %pause.stage, "the new version fails every event of the held batch too; still {}", pause.describe());
                self.held = Some(again);
                Ran::Held(pause)
            }
        }
    }

    /// Records what the stages did with a batch that is being committed;
    /// returns the pause when this batch trips it (the next batch is held).
    pub fn observe(&mut self, commit: &Commit) -> Option<Pause> {
        let failures: Vec<StageRejection> = commit
            .rejections
            .iter()
            .filter(|(r, _)| r.failure)
            .map(|(r, _)| r.clone())
            .collect();
        let pause = self.breaker.observe(&commit.stages, &failures)?;
        tracing::error!(stage = %pause.stage, "{}", pause.describe());
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stage::chain::StageVersion;

    fn run(stage: &str, hash: &str, rows_in: usize, failed: usize) -> StageRun {
        StageRun {
            stage: StageVersion {
                name: stage.into(),
                version: "1".into(),
                hash: hash.into(),
            },
            elapsed: Duration::ZERO,
            rows_in,
            rows_out: rows_in - failed,
            rejected: 0,
            failed,
        }
    }

    fn swapped(stage: &str) -> SwapReport {
        SwapReport {
            started: vec![StageVersion {
                name: stage.into(),
                version: "2".into(),
                hash: "new".into(),
            }],
            ..SwapReport::default()
        }
    }

    #[test]
    fn trips_after_the_threshold_of_wholly_failed_batches() {
        let mut b = Breaker::new(3);
        assert_eq!(b.observe(&[run("s", "h", 20, 20)], &[]), None);
        assert_eq!(b.observe(&[run("s", "h", 20, 20)], &[]), None);
        let pause = b.observe(&[run("s", "h", 20, 20)], &[]).unwrap();
        assert_eq!(
            (pause.stage.as_str(), pause.batches, pause.events),
            ("s", 3, 60)
        );
        assert!(b.paused().is_some());
    }

    #[test]
    fn a_batch_with_any_success_resets_the_streak() {
        let mut b = Breaker::new(3);
        b.observe(&[run("s", "h", 20, 20)], &[]);
        b.observe(&[run("s", "h", 20, 20)], &[]);
        b.observe(&[run("s", "h", 20, 19)], &[]);
        b.observe(&[run("s", "h", 20, 20)], &[]);
        assert_eq!(b.observe(&[run("s", "h", 20, 20)], &[]), None);
        // An empty batch neither counts nor resets.
        b.observe(&[run("s", "h", 0, 0)], &[]);
        assert!(b.observe(&[run("s", "h", 20, 20)], &[]).is_some());
    }

    #[test]
    fn a_trickle_of_single_events_does_not_trip_it() {
        let mut b = Breaker::new(3);
        for _ in 0..MIN_EVENTS - 1 {
            assert_eq!(b.observe(&[run("s", "h", 1, 1)], &[]), None);
        }
        assert!(b.observe(&[run("s", "h", 1, 1)], &[]).is_some());
    }

    #[test]
    fn zero_never_pauses() {
        let mut b = Breaker::new(0);
        for _ in 0..10 {
            assert_eq!(b.observe(&[run("s", "h", 50, 50)], &[]), None);
        }
    }

    #[test]
    fn only_a_swap_of_the_paused_stage_resumes_and_a_failed_probe_pauses_again() {
        let mut b = Breaker::new(1);
        b.observe(&[run("s", "h", 20, 20)], &[]).unwrap();
        assert_eq!(b.on_swap(&swapped("other")), None);
        assert!(b.paused().is_some());
        assert!(b.on_swap(&swapped("s")).is_some());
        assert!(b.probing() && b.paused().is_none());
        let again = b.probe_result(&[run("s", "new", 20, 20)]).unwrap_err();
        assert_eq!(again.hash, "new");
        assert!(b.paused().is_some());
        b.on_swap(&swapped("s")).unwrap();
        assert_eq!(b.probe_result(&[run("s", "newer", 20, 1)]), Ok(()));
        assert!(b.paused().is_none() && !b.probing());
        // The streak starts over after a resume.
        assert!(b.observe(&[run("s", "h", 20, 20)], &[]).is_some());
    }

    #[test]
    fn removing_the_paused_stage_resumes() {
        let mut b = Breaker::new(1);
        b.observe(&[run("s", "h", 20, 20)], &[]).unwrap();
        let report = SwapReport {
            removed: vec!["s".into()],
            ..SwapReport::default()
        };
        assert!(b.on_swap(&report).is_some());
        assert_eq!(b.probe_result(&[]), Ok(()));
    }
}
