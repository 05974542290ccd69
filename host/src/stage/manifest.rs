//! The plugin manifest (`pipeline.toml` in the plugins folder): which
//! stages run, in which order, with which settings, limits and grants.
//!
//! Validation keeps a manifest to what it may name (docs/security.md):
//! stage names are `[a-z0-9_-]{1,63}` (they go into metric labels, logs
//! and SQL rows), and component paths stay inside the plugins folder once
//! `..` and symbolic links are resolved, unless the manifest says
//! `allow-components-outside-plugins-folder = true` at its top.

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
    /// The explicit opt-out of path confinement.
    #[serde(default, rename = "allow-components-outside-plugins-folder")]
    allow_outside: bool,
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
            check_stage_name(&stage.name).map_err(invalid)?;
            if stages.iter().any(|s: &StageSpec| s.name == stage.name) {
                return Err(invalid(format!(
                    "stage names must be unique ({:?} appears twice)",
                    stage.name
                )));
            }
            let context = |m: String| invalid(format!("stage {:?}: {m}", stage.name));
            let component = confine(plugins_dir, &stage.component, raw.allow_outside)
                .map_err(|m| context(format!("component: {m}")))?;
            let shadow = match &stage.shadow {
                Some(p) => Some(
                    confine(plugins_dir, p, raw.allow_outside)
                        .map_err(|m| context(format!("shadow: {m}")))?,
                ),
                None => None,
            };
            let mut limits = Limits::default();
            if let Some(v) = &stage.limits.memory {
                limits.memory_bytes = parse_bytes(&value_text(v)).map_err(context)?;
            }
            if let Some(v) = &stage.limits.time_per_batch {
                limits.time_per_batch = parse_duration(&value_text(v)).map_err(context)?;
            }
            let grants = Grants::parse(&stage.grants).map_err(context)?;
            stages.push(StageSpec {
                component,
                shadow,
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

/// Longest stage name.
pub const STAGE_NAME_MAX: usize = 63;

/// A stage name is `[a-z0-9_-]{1,63}`: it is written unescaped into
/// metric labels and log lines, and compared in SQL.
pub fn check_stage_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    if name.is_empty() || name.len() > STAGE_NAME_MAX || !name.chars().all(allowed) {
        return Err(format!(
            "stage name {name:?} is not allowed: use 1 to {STAGE_NAME_MAX} of a-z, 0-9, _ and -"
        ));
    }
    Ok(())
}

/// The path of a component named `rel` in the manifest: inside
/// `plugins_dir` after `..` and symbolic links are resolved, unless
/// `allow_outside`. A file that does not exist yet is judged by the
/// folder it would be in (a hot reload may name it before it arrives).
fn confine(plugins_dir: &Path, rel: &Path, allow_outside: bool) -> Result<PathBuf, String> {
    const OPT_OUT: &str = "allow-components-outside-plugins-folder = true";
    let joined = plugins_dir.join(rel);
    if allow_outside {
        return Ok(joined);
    }
    if rel.is_absolute() {
        return Err(format!(
            "{} is an absolute path: name a file inside the plugins folder {}, relative to it (or put `{OPT_OUT}` at the top of the manifest)",
            rel.display(),
            plugins_dir.display()
        ));
    }
    // `..` first, by the text: `a/../b.wasm` is fine, `../b.wasm` is not.
    let mut depth = 0usize;
    for part in rel.components() {
        match part {
            std::path::Component::ParentDir if depth == 0 => {
                return Err(format!(
                    "{} leads out of the plugins folder {} (by `..`): keep components inside it (or put `{OPT_OUT}` at the top of the manifest)",
                    rel.display(),
                    plugins_dir.display()
                ))
            }
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    // Then symbolic links, where the folder exists.
    let Ok(root) = plugins_dir.canonicalize() else {
        return Ok(joined);
    };
    let resolved = joined.canonicalize().or_else(|_| {
        let parent = joined.parent().unwrap_or(plugins_dir).canonicalize()?;
        Ok::<_, std::io::Error>(parent.join(joined.file_name().unwrap_or_default()))
    });
    match resolved {
        Ok(real) if !real.starts_with(&root) => Err(format!(
            "{} resolves to {}, outside the plugins folder {} (through a symbolic link): keep components inside it (or put `{OPT_OUT}` at the top of the manifest)",
            rel.display(),
            real.display(),
            root.display()
        )),
        _ => Ok(joined),
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
    fn stage_names_are_lowercase_words_of_at_most_63() {
        for ok in ["transform", "dedup_v2", "mask-users", "a", &"x".repeat(63)] {
            check_stage_name(ok).unwrap();
        }
        for bad in [
            "",
            "Transform",
            "a\"b",
            "a'b",
            "a b",
            "a}b",
            "é",
            "a\nb",
            &"x".repeat(64),
        ] {
            let err = check_stage_name(bad).unwrap_err();
            assert!(err.contains("a-z, 0-9, _ and -"), "{bad:?}: {err}");
        }
        let quoted = "[[stage]]\nname='a\"b'\ncomponent='a.wasm'\n";
        let err = Manifest::parse(quoted, Path::new("/p"), "m".into()).unwrap_err();
        assert!(err.to_string().contains("is not allowed"), "{err}");
    }

    #[test]
    fn component_paths_stay_in_the_plugins_folder() {
        let p = Path::new("/p");
        assert_eq!(
            confine(p, Path::new("a.wasm"), false).unwrap(),
            p.join("a.wasm")
        );
        assert_eq!(
            confine(p, Path::new("sub/../a.wasm"), false).unwrap(),
            p.join("sub/../a.wasm")
        );
        let up = confine(p, Path::new("../x.wasm"), false).unwrap_err();
        assert!(up.contains("leads out of the plugins folder"), "{up}");
        let deeper = confine(p, Path::new("sub/../../x.wasm"), false).unwrap_err();
        assert!(deeper.contains("leads out"), "{deeper}");
        let absolute = confine(p, Path::new("/etc/x.wasm"), false).unwrap_err();
        assert!(absolute.contains("is an absolute path"), "{absolute}");
        // The opt-out, stated in the manifest.
        assert_eq!(
            confine(p, Path::new("/opt/x.wasm"), true).unwrap(),
            Path::new("/opt/x.wasm")
        );
        let text = "allow-components-outside-plugins-folder = true\n[[stage]]\nname='a'\ncomponent='../a.wasm'\nshadow='/b.wasm'\n";
        Manifest::parse(text, p, "m".into()).unwrap();
        let text = "[[stage]]\nname='a'\ncomponent='a.wasm'\nshadow='/b.wasm'\n";
        let err = Manifest::parse(text, p, "m".into()).unwrap_err();
        assert!(
            err.to_string()
                .contains("shadow: /b.wasm is an absolute path"),
            "{err}"
        );
    }

    #[test]
    fn a_symbolic_link_out_of_the_plugins_folder_is_refused() {
        let dir = std::env::temp_dir().join(format!("manifest-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(plugins.join("inside")).unwrap();
        std::fs::write(dir.join("outside.wasm"), b"").unwrap();
        std::os::unix::fs::symlink(dir.join("outside.wasm"), plugins.join("link.wasm")).unwrap();
        std::os::unix::fs::symlink(&dir, plugins.join("up")).unwrap();
        std::os::unix::fs::symlink(plugins.join("inside"), plugins.join("ok")).unwrap();
        let err = confine(&plugins, Path::new("link.wasm"), false).unwrap_err();
        assert!(err.contains("through a symbolic link"), "{err}");
        let err = confine(&plugins, Path::new("up/not-yet.wasm"), false).unwrap_err();
        assert!(err.contains("outside the plugins folder"), "{err}");
        confine(&plugins, Path::new("ok/not-yet.wasm"), false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
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
