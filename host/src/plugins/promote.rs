//! `host plugins promote STAGE`: the stage's shadow candidate becomes its
//! live component.
//!
//! Only the manifest changes: `component` takes the `shadow` file and
//! `shadow` goes away, written to a temporary file and renamed over
//! `pipeline.toml`, so a watcher never reads half a file. A running host
//! then swaps the candidate in like any new version (its state handed
//! over per `on-incompatible-state`, at a batch boundary) and records the
//! swap as `promoted` in `pipeline.plugin_events`. The rest of the file
//! (comments, order, other stages) is kept as written, which is why the
//! rewrite goes through `toml_edit` rather than re-serialising.

use std::path::{Path, PathBuf};

use crate::stage::manifest::{Manifest, ManifestError, MANIFEST_FILE};
use crate::stage::runtime::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("no stage named {stage:?} in {manifest} (stages: {known})")]
    NoStage {
        stage: String,
        manifest: PathBuf,
        known: String,
    },
    #[error("stage {stage:?} has no shadow candidate to promote: add `shadow = \"NEW.wasm\"` to its entry in {manifest}, let it run, then promote")]
    NoShadow { stage: String, manifest: PathBuf },
    #[error("the shadow candidate of stage {stage:?}, {path}, does not exist")]
    MissingFile { stage: String, path: PathBuf },
    #[error(
        "the shadow candidate of stage {stage:?} does not load, so it is not promoted: {reason}"
    )]
    DoesNotLoad { stage: String, reason: String },
    #[error("cannot rewrite {manifest}: {message}")]
    Rewrite { manifest: PathBuf, message: String },
}

/// What a promotion changed.
#[derive(Debug)]
pub struct Promoted {
    pub stage: String,
    pub old_component: String,
    pub new_component: String,
    pub hash: String,
    /// The `version` label the entry had, removed because it named the
    /// old component (unless a new one was given).
    pub dropped_version: Option<String>,
}

/// Promotes the shadow candidate of `stage` in `plugins_dir`'s manifest.
/// `version` sets the entry's version label for the new component.
pub fn promote(
    plugins_dir: &Path,
    stage: &str,
    version: Option<&str>,
    cache_dir: Option<PathBuf>,
) -> Result<Promoted, PromoteError> {
    let manifest_path = plugins_dir.join(MANIFEST_FILE);
    let manifest = Manifest::load(plugins_dir)?;
    let spec = manifest
        .stages
        .iter()
        .find(|s| s.name == stage)
        .ok_or_else(|| PromoteError::NoStage {
            stage: stage.to_owned(),
            manifest: manifest_path.clone(),
            known: manifest
                .stages
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let shadow = spec.shadow.clone().ok_or_else(|| PromoteError::NoShadow {
        stage: stage.to_owned(),
        manifest: manifest_path.clone(),
    })?;
    if !shadow.is_file() {
        return Err(PromoteError::MissingFile {
            stage: stage.to_owned(),
            path: shadow,
        });
    }
    // The host would reject a candidate that does not load; refusing here
    // says so at once instead of in the host's log.
    let does_not_load = |reason: String| PromoteError::DoesNotLoad {
        stage: stage.to_owned(),
        reason,
    };
    let runtime = Runtime::new(cache_dir).map_err(|e| does_not_load(e.to_string()))?;
    let loaded = runtime
        .load(&shadow)
        .map_err(|e| does_not_load(e.to_string()))?;

    let rewrite_error = |message: String| PromoteError::Rewrite {
        manifest: manifest_path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| rewrite_error(e.to_string()))?;
    let (new_text, promoted) = rewrite(&text, stage, version).map_err(rewrite_error)?;
    // Never write a manifest the host would refuse.
    Manifest::parse(&new_text, plugins_dir, manifest_path.clone())?;
    crate::fsutil::write_atomic(&manifest_path, new_text.as_bytes())
        .map_err(|e| rewrite_error(e.to_string()))?;
    Ok(Promoted {
        hash: loaded.hash,
        ..promoted
    })
}

/// The manifest text with `stage`'s shadow made its component.
fn rewrite(text: &str, stage: &str, version: Option<&str>) -> Result<(String, Promoted), String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    let stages = doc
        .get_mut("stage")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or("stages are not written as [[stage]] tables; edit the file by hand")?;
    let table = stages
        .iter_mut()
        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(stage))
        .ok_or_else(|| format!("no [[stage]] table named {stage:?}"))?;
    let shadow = table
        .remove("shadow")
        .ok_or_else(|| format!("stage {stage:?} has no shadow"))?;
    let new_component = shadow
        .as_str()
        .ok_or("`shadow` is not a string")?
        .to_owned();
    let old_component = table
        .get("component")
        .and_then(|c| c.as_str())
        .unwrap_or_default()
        .to_owned();
    // Replacing the value in place keeps the key where it was.
    match table.get_mut("component").and_then(|i| i.as_value_mut()) {
        Some(value) => {
            let decor = value.decor().clone();
            *value = toml_edit::Value::from(new_component.as_str());
            *value.decor_mut() = decor;
        }
        None => {
            table.insert("component", toml_edit::value(new_component.as_str()));
        }
    }
    let dropped_version = match version {
        Some(v) => {
            table.insert("version", toml_edit::value(v));
            None
        }
        None => table
            .remove("version")
            .and_then(|v| v.as_str().map(str::to_owned)),
    };
    Ok((
        doc.to_string(),
        Promoted {
            stage: stage.to_owned(),
            old_component,
            new_component,
            hash: String::new(),
            dropped_version,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"# The stages.
[[stage]]
name = "transform"
component = "transform.wasm"

[[stage]]
name = "marker"   # the one to promote
component = "marker.wasm"  # live
shadow = "marker_v2.wasm"
version = "1"
[stage.config]
a = "b"
"#;

    #[test]
    fn shadow_becomes_component_and_the_rest_is_kept() {
        let (text, p) = rewrite(MANIFEST, "marker", None).unwrap();
        assert_eq!(p.old_component, "marker.wasm");
        assert_eq!(p.new_component, "marker_v2.wasm");
        assert_eq!(p.dropped_version.as_deref(), Some("1"));
        assert_eq!(
            text,
            r#"# The stages.
[[stage]]
name = "transform"
component = "transform.wasm"

[[stage]]
name = "marker"   # the one to promote
component = "marker_v2.wasm"  # live
[stage.config]
a = "b"
"#
        );
        let m = Manifest::parse(&text, Path::new("/p"), "m".into()).unwrap();
        assert_eq!(m.stages[1].component, Path::new("/p/marker_v2.wasm"));
        assert_eq!(m.stages[1].shadow, None);
    }

    #[test]
    fn a_new_version_label_can_be_given() {
        let (text, p) = rewrite(MANIFEST, "marker", Some("2")).unwrap();
        assert_eq!(p.dropped_version, None);
        assert!(text.contains("version = \"2\""), "{text}");
    }

    #[test]
    fn missing_stage_or_shadow_is_an_error() {
        assert!(rewrite(MANIFEST, "nope", None)
            .unwrap_err()
            .contains("nope"));
        assert!(rewrite(MANIFEST, "transform", None)
            .unwrap_err()
            .contains("no shadow"));
    }

    #[test]
    fn promote_explains_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("promote-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), MANIFEST).unwrap();
        let err = promote(&dir, "dedup", None, None).unwrap_err().to_string();
        assert!(
            err.contains("no stage named \"dedup\"") && err.contains("transform, marker"),
            "{err}"
        );
        let err = promote(&dir, "transform", None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no shadow candidate"), "{err}");
        let err = promote(&dir, "marker", None, None).unwrap_err().to_string();
        assert!(
            err.contains("marker_v2.wasm") && err.contains("does not exist"),
            "{err}"
        );
        std::fs::write(dir.join("marker_v2.wasm"), b"not wasm").unwrap();
        let err = promote(&dir, "marker", None, None).unwrap_err().to_string();
        assert!(err.contains("does not load"), "{err}");
        // Nothing was rewritten.
        assert_eq!(
            std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap(),
            MANIFEST
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
