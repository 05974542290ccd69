//! Plugin events: a version loaded, swapped in, promoted, rejected with
//! its reason, removed; written to `pipeline.plugin_events`.
//!
//! Events are plain values that the stage side returns (in
//! `ChainOutput`, `SwapReport`, and the plugin watcher's updates); no
//! queue carries them behind the code's back. The stage thread carries
//! each on the commit of the next batch, in the same transaction, so the
//! history agrees with the batch records (a swap is recorded with the
//! first batch the new version processed), and the pipeline counts them
//! in metrics. Events after the last batch of a run stay in the log only.

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
    /// The class of failure of a rejection (`first_batch`, `wit_version`,
    /// ...): the metrics label, not stored.
    pub cause: Option<&'static str>,
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
            cause: None,
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

    pub fn cause(mut self, cause: &'static str) -> PluginEvent {
        self.cause = Some(cause);
        self
    }
}

/// The events of an applied plan change: its swaps and removals
/// (refusals are recorded where they happen, with the refused version).
pub fn of_swap(report: &super::chain::SwapReport) -> Vec<PluginEvent> {
    let mut out = Vec::with_capacity(report.started.len() + report.removed.len());
    for v in &report.started {
        let kind = if report.promoted.contains(&v.name) {
            tracing::info!(stage = %v.name, version = %v.version, "shadow candidate promoted: now the live version");
            PluginEventKind::Promoted
        } else {
            PluginEventKind::SwappedIn
        };
        out.push(PluginEvent::new(&v.name, kind).version(&v.version, &v.hash));
    }
    for name in &report.removed {
        out.push(PluginEvent::new(name, PluginEventKind::Removed));
    }
    out
}
