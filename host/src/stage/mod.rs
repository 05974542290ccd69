//! Stages: sandboxed WebAssembly components that transform batches.
//!
//! - `bindings`: types generated from `wit/`.
//! - `runtime`: engine, linker, type check.
//! - `cache`: the compile cache, loaded only when the host wrote it.
//! - `instance`: one instance with its limits and grants.
//! - `chain`: the ordered stages of the pipeline, failure isolation and
//!   hot swap at batch boundaries.
//! - `manifest`: `pipeline.toml`.
//! - `output`: checks on what a stage returns.
//! - `budget`: the bound on what a stage's result may make the host
//!   allocate, checked while it is lifted.
//! - `shadow`: a candidate version run beside the live one, outputs compared.
//! - `events`: plugin events queued for the next batch's commit.

pub mod bindings;
pub mod budget;
pub mod cache;
pub mod chain;
pub mod columns;
pub mod events;
pub mod instance;
pub mod limits;
pub mod manifest;
pub mod output;
pub mod reload;
pub mod runtime;
pub mod shadow;

use std::path::PathBuf;
use std::time::Duration;

pub use bindings::{BatchResult, Event, Rejected};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StageError {
    #[error("wasmtime engine: {0}")]
    Engine(String),
    #[error("component {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("component {path} does not fit the plugin world: {message}")]
    WrongWorld { path: PathBuf, message: String },
    #[error(
        "component {path} targets {found} (it {direction} `{name}`), which this host does not load: \
         it supports {supported}. Rebuild the plugin against this host's wit/pipeline.wit ({package}), \
         or run a host that supports the plugin's version",
        supported = runtime::WIT_SUPPORTED,
        package = runtime::WIT_PACKAGE
    )]
    UnsupportedWit {
        path: PathBuf,
        /// `ecommerce:pipeline@0.2.0`, as the component's names give it.
        found: String,
        /// The import or export name that shows it.
        name: String,
        direction: &'static str,
    },
    #[error("stage {stage}: init failed: {message}")]
    Init { stage: String, message: String },
    #[error("stage {stage}: trapped in {message}")]
    Trap { stage: String, message: String },
    #[error("stage {stage}: exceeded its time limit of {limit:?} for one batch")]
    TimeLimit { stage: String, limit: Duration },
    #[error("stage {stage}: exceeded its memory limit of {limit_bytes} bytes")]
    MemoryLimit { stage: String, limit_bytes: usize },
    #[error("stage {stage}: refused the batch: {message}")]
    Refused { stage: String, message: String },
    #[error("stage {stage}: returned invalid output: {message}")]
    BadOutput { stage: String, message: String },
    #[error("stage {stage}: exceeded its output budget: {message}")]
    OutputBudget { stage: String, message: String },
    /// `restore` refused the state, trapped or ran out of time.
    #[error("stage {stage}: cannot restore its state: {message}")]
    Restore { stage: String, message: String },
    /// A state the stage cannot restore, at start-up, with
    /// `on-incompatible-state = "refuse-swap"`.
    #[error(
        "stage {stage} cannot restore the state committed for it ({message}) and its manifest entry says on-incompatible-state = \"refuse-swap\", so the host does not start. Run the version that wrote the state, fix the stage so it reads it, or set on-incompatible-state = \"reset\" to start it with empty state"
    )]
    RestoreRefused { stage: String, message: String },
}

impl StageError {
    pub(crate) fn engine(e: wasmtime::Error) -> StageError {
        StageError::Engine(runtime::error_text(&e))
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StageError::Engine(_) => "engine",
            StageError::Load { .. } => "load",
            StageError::WrongWorld { .. } => "wrong_world",
            StageError::UnsupportedWit { .. } => "wit_version",
            StageError::Init { .. } => "init",
            StageError::Trap { .. } => "trap",
            StageError::TimeLimit { .. } => "time_limit",
            StageError::MemoryLimit { .. } => "memory_limit",
            StageError::Refused { .. } => "refused",
            StageError::BadOutput { .. } => "bad_output",
            StageError::OutputBudget { .. } => "output_budget",
            StageError::Restore { .. } => "restore",
            StageError::RestoreRefused { .. } => "restore_refused",
        }
    }
}
