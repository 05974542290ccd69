//! Loading the manifest's components, and reloading them while the
//! pipeline runs.
//!
//! The watcher thread wakes on changes in the plugins folder, reads the
//! manifest, and loads (compiles and type-checks) every component that
//! changed, off the hot path. It then sends a complete plan to the stage
//! thread, which applies it at the next batch boundary. A component that
//! fails to load is rejected with a log line and a plugin event (which the
//! pipeline records and counts); its stage keeps the version it had. A
//! file whose size or time still changes is waited for: a half-copied
//! component is never loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::chain::Prepared;
use super::events::{PluginEvent, PluginEventKind};
use super::manifest::{Manifest, StageSpec};
use super::runtime::{LoadedComponent, Runtime};
use super::shadow::{self, Candidate, Unloaded};
use super::StageError;
use crate::watch::FolderWatch;

/// What the plugin watcher tells the stage thread.
pub enum Update {
    /// A complete new plan, to apply at the next batch boundary.
    Plan(Vec<Prepared>),
    /// A component that did not load (its stage keeps its version): to
    /// record with the next batch.
    Rejected(PluginEvent),
    /// The manifest does not parse; the stages keep running as they are.
    ManifestInvalid,
}

/// How long a component file must be unchanged before it is loaded.
const QUIET: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: SystemTime,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    let meta = std::fs::metadata(path)?;
    Ok(FileStamp {
        len: meta.len(),
        modified: meta.modified()?,
    })
}

/// Loads components, remembering what it loaded so unchanged files are
/// not read again.
pub struct Loader {
    runtime: Arc<Runtime>,
    loaded: HashMap<PathBuf, (FileStamp, Arc<LoadedComponent>)>,
    /// Files that failed, so the same broken file is reported once.
    failed: HashMap<PathBuf, FileStamp>,
    /// Rejections reported since the last `take_rejections`.
    rejections: Vec<PluginEvent>,
}

impl Loader {
    pub fn new(runtime: Arc<Runtime>) -> Loader {
        Loader {
            runtime,
            loaded: HashMap::new(),
            failed: HashMap::new(),
            rejections: Vec::new(),
        }
    }

    /// The components rejected since the last call, as plugin events.
    pub fn take_rejections(&mut self) -> Vec<PluginEvent> {
        std::mem::take(&mut self.rejections)
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Loads one component, or returns the copy loaded before if the file
    /// has not changed.
    pub fn load(&mut self, path: &Path) -> Result<Arc<LoadedComponent>, StageError> {
        let before = stamp(path).map_err(|e| StageError::Load {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        if let Some((s, component)) = self.loaded.get(path) {
            if *s == before {
                return Ok(component.clone());
            }
        }
        let component = Arc::new(self.runtime.load(path)?);
        self.loaded
            .insert(path.to_owned(), (before, component.clone()));
        Ok(component)
    }

    /// Loads every stage of a manifest; the first failure is returned.
    /// A shadow candidate that does not load is not a failure: the stage
    /// runs and the candidate's error is reported with every batch.
    pub fn plan(&mut self, manifest: &Manifest) -> Result<Vec<Prepared>, StageError> {
        manifest
            .stages
            .iter()
            .map(|spec| {
                Ok(Prepared {
                    spec: Arc::new(spec.clone()),
                    component: self.load(&spec.component)?,
                    shadow: self.candidate(spec),
                })
            })
            .collect()
    }

    /// Loads the stage's shadow candidate, if it names one. One that does
    /// not load is reported when its worker starts (`shadow_rejected`).
    fn candidate(&mut self, spec: &StageSpec) -> Option<Candidate> {
        let path = spec.shadow.as_ref()?;
        Some(self.load(path).map_err(|e| Unloaded::from(&e)))
    }

    /// Builds the plan for a changed manifest. A stage whose component
    /// cannot be loaded keeps its `current` version (or is left out if it
    /// is new). Returns `None` while a file is still being written.
    fn replan(&mut self, manifest: &Manifest, current: &[Prepared]) -> Option<Vec<Prepared>> {
        let mut plan = Vec::with_capacity(manifest.stages.len());
        for spec in &manifest.stages {
            if !quiet(&spec.component) || spec.shadow.as_deref().is_some_and(|p| !quiet(p)) {
                return None;
            }
            match self.load(&spec.component) {
                Ok(component) => {
                    self.failed.remove(&spec.component);
                    plan.push(Prepared {
                        spec: Arc::new(spec.clone()),
                        component,
                        shadow: self.candidate(spec),
                    });
                }
                Err(e) => {
                    self.reject(spec, &e);
                    if let Some(old) = current.iter().find(|p| p.spec.name == spec.name) {
                        plan.push(old.clone());
                    }
                }
            }
        }
        Some(plan)
    }

    fn reject(&mut self, spec: &StageSpec, e: &StageError) {
        if !self.first_failure(&spec.component) {
            return;
        }
        tracing::error!(stage = %spec.name, file = %spec.component.display(), "component rejected, the stage keeps its current version: {e}");
        self.rejections.push(
            PluginEvent::new(&spec.name, PluginEventKind::Rejected)
                .reason(e.to_string())
                .cause(e.kind()),
        );
    }

    /// Remembers that this version of the file failed; false if it was
    /// already reported, so one broken file is reported once.
    fn first_failure(&mut self, path: &Path) -> bool {
        let stamp = stamp(path).ok();
        if stamp.is_some() && self.failed.get(path) == stamp.as_ref() {
            return false;
        }
        if let Some(s) = stamp {
            self.failed.insert(path.to_owned(), s);
        }
        true
    }
}

/// True when the file exists and has not changed for `QUIET`.
fn quiet(path: &Path) -> bool {
    let Ok(first) = stamp(path) else {
        return true; // missing: let `load` report it
    };
    let age = SystemTime::now()
        .duration_since(first.modified)
        .unwrap_or(Duration::ZERO);
    if age >= QUIET {
        return true;
    }
    std::thread::sleep(QUIET - age);
    stamp(path).map(|s| s == first).unwrap_or(false)
}

/// Watches `plugins_dir` and sends a new plan whenever the manifest or a
/// component it names changes. Runs until `shutdown`.
pub fn watch(
    mut loader: Loader,
    plugins_dir: PathBuf,
    mut current: Vec<Prepared>,
    updates: mpsc::Sender<Update>,
    shutdown: Arc<AtomicBool>,
) {
    let watch = FolderWatch::new(&plugins_dir).unwrap_or_else(|e| {
        tracing::warn!(dir = %plugins_dir.display(), "cannot watch the plugins folder ({e}); checking it every 2 s");
        FolderWatch::disabled()
    });
    let mut last_manifest_error = None;
    while !shutdown.load(Ordering::Relaxed) {
        // Only writes, renames and removals wake us: our own reads of the
        // components (hashing, compiling) must not start another pass.
        watch.wait(Duration::from_secs(2));
        // Let a burst of writes settle into one reload.
        std::thread::sleep(Duration::from_millis(100));
        watch.clear();

        let manifest = match Manifest::load(&plugins_dir) {
            Ok(m) => {
                last_manifest_error = None;
                m
            }
            Err(e) => {
                let text = e.to_string();
                if last_manifest_error.as_ref() != Some(&text) {
                    tracing::error!("{text}; keeping the current stages");
                    last_manifest_error = Some(text);
                    if updates.send(Update::ManifestInvalid).is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        let plan = loader.replan(&manifest, &current);
        for event in loader.take_rejections() {
            if updates.send(Update::Rejected(event)).is_err() {
                return;
            }
        }
        let Some(plan) = plan else {
            continue;
        };
        let changed = plan.len() != current.len()
            || plan.iter().zip(&current).any(|(a, b)| {
                a.spec != b.spec
                    || !Arc::ptr_eq(&a.component, &b.component)
                    || !shadow::same_candidate(a.shadow.as_ref(), b.shadow.as_ref())
            });
        if changed {
            let names: Vec<&str> = plan.iter().map(|p| p.spec.name.as_str()).collect();
            tracing::info!(stages = %names.join(","), "stage plan ready: it takes effect at the next batch boundary");
            current = plan.clone();
            if updates.send(Update::Plan(plan)).is_err() {
                return;
            }
        }
    }
}
