//! Plugin events (a version loaded, swapped in, promoted, rejected with
//! its reason, removed) waiting to be written to `pipeline.plugin_events`.
//!
//! Why a queue: events happen on the watcher thread (a file that does not
//! load) and the stage thread (a swap, a refusal, a rollback), but the
//! database is written by the sink. Each event is queued here and carried
//! on the commit of the next batch, in the same transaction, so the
//! history agrees with the batch records (a swap is recorded with the
//! first batch the new version processed). Events recorded after the last
//! batch of a run stay in the log only.

use std::sync::Mutex;
use std::time::SystemTime;

/// What happened to a stage's component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginEventKind {
    /// Loaded at start.
    Loaded,
    /// A new version (or a new stage) started at a batch boundary.
    SwappedIn,
    /// A swap that made the stage's shadow candidate live.
    Promoted,
    /// A new version was not swapped in, or was rolled back; see `reason`.
    Rejected,
    /// The stage left the manifest.
    Removed,
    /// A shadow candidate started beside the live version.
    ShadowStarted,
    /// A shadow candidate could not be loaded or started.
    ShadowRejected,
    /// A shadow candidate failed batch after batch and was disabled.
    ShadowDisabled,
    /// The stage could not restore its committed state at start-up and
    /// was started empty (`on-incompatible-state = "reset"`).
    StateReset,
}

impl PluginEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginEventKind::Loaded => "loaded",
            PluginEventKind::SwappedIn => "swapped_in",
            PluginEventKind::Promoted => "promoted",
            PluginEventKind::Rejected => "rejected",
            PluginEventKind::Removed => "removed",
            PluginEventKind::ShadowStarted => "shadow_started",
            PluginEventKind::ShadowRejected => "shadow_rejected",
            PluginEventKind::StateReset => "state_reset",
            PluginEventKind::ShadowDisabled => "shadow_disabled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PluginEvent {
    pub at: SystemTime,
    pub stage: String,
    pub kind: PluginEventKind,
    pub version: Option<String>,
    pub hash: Option<String>,
    pub reason: Option<String>,
}

impl PluginEvent {
    pub fn new(stage: &str, kind: PluginEventKind) -> PluginEvent {
        PluginEvent {
            at: SystemTime::now(),
            stage: stage.to_owned(),
            kind,
            version: None,
            hash: None,
            reason: None,
        }
    }

    pub fn version(mut self, version: &str, hash: &str) -> PluginEvent {
        self.version = Some(version.to_owned());
        self.hash = Some(hash.to_owned());
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> PluginEvent {
        self.reason = Some(reason.into());
        self
    }
}

/// A bound on queued events, so a host that sees no batches for a long
/// time while a broken file keeps changing does not grow without end.
const MAX_PENDING: usize = 10_000;

static PENDING: Mutex<Vec<PluginEvent>> = Mutex::new(Vec::new());

/// Queues an event for the next commit.
pub fn record(event: PluginEvent) {
    if let Ok(mut pending) = PENDING.lock() {
        if pending.len() < MAX_PENDING {
            pending.push(event);
        }
    }
}

/// Takes the queued events, to be committed with a batch.
pub fn drain() -> Vec<PluginEvent> {
    match PENDING.lock() {
        Ok(mut pending) if !pending.is_empty() => std::mem::take(&mut *pending),
        _ => Vec::new(),
    }
}

/// Queues the swaps and removals of an applied plan change (refusals
/// are queued where they happen, with the refused version).
pub fn record_swap(report: &super::chain::SwapReport) {
    for v in &report.started {
        let kind = if report.promoted.contains(&v.name) {
            tracing::info!(stage = %v.name, version = %v.version, "shadow candidate promoted: now the live version");
            PluginEventKind::Promoted
        } else {
            PluginEventKind::SwappedIn
        };
        record(PluginEvent::new(&v.name, kind).version(&v.version, &v.hash));
    }
    for name in &report.removed {
        record(PluginEvent::new(name, PluginEventKind::Removed));
    }
}
