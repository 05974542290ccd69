//! The plugin manifest (`pipeline.toml` in the plugins folder): which
//! stages run, in which order, with which settings, limits and grants.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::limits::{parse_bytes, parse_duration, Grants, Limits};

/// File name of the manifest inside the plugins folder.
pub const MANIFEST_FILE: &str = "pipeline.toml";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read plugin manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin manifest {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What to do when a new version of a stage refuses the state of the old.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnIncompatibleState {
    /// Start the new version empty and log it.
    #[default]
    Reset,
    /// Keep the old version running and reject the new one.
    RefuseSwap,
}

/// When a stage's state is taken to be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotPolicy {
    /// After every batch, committed with it: the committed state is
    /// always the one that produced the committed output, also after a
    /// trap, a bisection, a swap or a crash.
    #[default]
    EveryBatch,
    /// Every `--snapshot-interval` (and at swaps and shutdown): cheaper
    /// for a large state, and exact enough only for a stage whose output
    /// the table's primary key makes idempotent (a dedup: an id a stale
    /// state lets through again is dropped by `ON CONFLICT`).
    Interval,
}

/// One stage as the manifest describes it, with paths made absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSpec {
    pub name: String,
    pub component: PathBuf,
    /// A candidate version run in shadow mode beside the live one.
    pub shadow: Option<PathBuf>,
    pub version: Option<String>,
    pub config: Vec<(String, String)>,
    pub limits: Limits,
    pub grants: Grants,
    pub on_incompatible_state: OnIncompatibleState,
    pub snapshot: SnapshotPolicy,
}

impl StageSpec {
    /// Whether two entries run the live version the same way: everything
    /// but the shadow candidate, which can change without a swap.
    pub fn same_live(&self, other: &StageSpec) -> bool {
        let StageSpec {
            name,
            component,
            shadow: _,
            version,
            config,
            limits,
            grants,
            on_incompatible_state,
            snapshot,
        } = self;
        *name == other.name
            && *component == other.component
            && *version == other.version
            && *config == other.config
            && *limits == other.limits
            && *grants == other.grants
            && *on_incompatible_state == other.on_incompatible_state
            && *snapshot == other.snapshot
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub path: PathBuf,
    pub stages: Vec<StageSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    stage: Vec<RawStage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawStage {
    name: String,
    component: PathBuf,
    shadow: Option<PathBuf>,
    version: Option<String>,
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    grants: Vec<String>,
    #[serde(default)]
    on_incompatible_state: OnIncompatibleState,
    #[serde(default)]
    snapshot: SnapshotPolicy,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    memory: Option<toml::Value>,
    time_per_batch: Option<toml::Value>,
}

impl Manifest {
    /// Reads `pipeline.toml` from the plugins folder.
    pub fn load(plugins_dir: &Path) -> Result<Manifest, ManifestError> {
        let path = plugins_dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        Manifest::parse(&text, plugins_dir, path)
    }

    pub fn parse(text: &str, plugins_dir: &Path, path: PathBuf) -> Result<Manifest, ManifestError> {
        let invalid = |message: String| ManifestError::Invalid {
            path: path.clone(),
            message,
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut stages = Vec::with_capacity(raw.stage.len());
        for stage in raw.stage {
            if stage.name.is_empty() || stages.iter().any(|s: &StageSpec| s.name == stage.name) {
                return Err(invalid(format!(
                    "stage names must be unique and non-empty ({:?})",
                    stage.name
                )));
            }
            let context = |m: String| invalid(format!("stage {:?}: {m}", stage.name));
            let mut limits = Limits::default();
            if let Some(v) = &stage.limits.memory {
                limits.memory_bytes = parse_bytes(&value_text(v)).map_err(context)?;
            }
            if let Some(v) = &stage.limits.time_per_batch {
                limits.time_per_batch = parse_duration(&value_text(v)).map_err(context)?;
            }
            let grants = Grants::parse(&stage.grants).map_err(context)?;
            stages.push(StageSpec {
                component: plugins_dir.join(&stage.component),
                shadow: stage.shadow.map(|p| plugins_dir.join(p)),
                version: stage.version,
                config: stage
                    .config
                    .iter()
                    .map(|(k, v)| (k.clone(), value_text(v)))
                    .collect(),
                limits,
                grants,
                on_incompatible_state: stage.on_incompatible_state,
                snapshot: stage.snapshot,
                name: stage.name,
            });
        }
        Ok(Manifest { path, stages })
    }
}

/// Config values may be written as TOML numbers or booleans; stages
/// receive every value as text.
fn value_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stages_in_order_with_settings() {
        let text = r#"
            [[stage]]
            name = "transform"
            component = "transform.wasm"
            grants = ["clock"]
            limits = { memory = "32MiB", time-per-batch = "250ms" }
            [stage.config]
            max-future-skew-seconds = 300
            allowed-event-types = "view,purchase"

            [[stage]]
            name = "dedup"
            component = "dedup.wasm"
            on-incompatible-state = "refuse-swap"
            snapshot = "interval"
        "#;
        let m = Manifest::parse(text, Path::new("/p"), "/p/pipeline.toml".into()).unwrap();
        assert_eq!(m.stages.len(), 2);
        let t = &m.stages[0];
        assert_eq!(t.component, Path::new("/p/transform.wasm"));
        assert_eq!(t.limits.memory_bytes, 32 << 20);
        assert_eq!(t.limits.time_per_batch.as_millis(), 250);
        assert!(t.grants.clock);
        assert!(t
            .config
            .contains(&("max-future-skew-seconds".into(), "300".into())));
        assert_eq!(
            m.stages[1].on_incompatible_state,
            OnIncompatibleState::RefuseSwap
        );
        assert_eq!(t.snapshot, SnapshotPolicy::EveryBatch, "the default");
        assert_eq!(m.stages[1].snapshot, SnapshotPolicy::Interval);
    }

    #[test]
    fn rejects_duplicate_names_and_unknown_fields() {
        let dup =
            "[[stage]]\nname='a'\ncomponent='a.wasm'\n[[stage]]\nname='a'\ncomponent='b.wasm'\n";
        assert!(Manifest::parse(dup, Path::new("/p"), "m".into()).is_err());
        let unknown = "[[stage]]\nname='a'\ncomponent='a.wasm'\ncolour='red'\n";
        let err = Manifest::parse(unknown, Path::new("/p"), "m".into()).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
