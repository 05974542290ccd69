//! `host plugin new`: scaffolds a working stage in Rust, Python,
//! JavaScript or C under `<plugins>/<lang>/<name>/`: source, build script, a
//! copy of the WIT contract, a sample CSV and the manifest entry. What it
//! writes builds as is and passes `host plugin test`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

const WIT: &str = include_str!("../../wit/pipeline.wit");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

impl Lang {
    fn folder(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::C => "c",
        }
    }

    /// (path in the stage folder, template text)
    fn files(self) -> Vec<(&'static str, &'static str)> {
        match self {
            Lang::Rust => vec![
                ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
                ("src/lib.rs", include_str!("../templates/rust/lib.rs")),
                ("build.sh", include_str!("../templates/rust/build.sh")),
                (".gitignore", "/target\n"),
            ],
            Lang::Python => vec![
                ("app.py", include_str!("../templates/python/app.py")),
                ("build.sh", include_str!("../templates/python/build.sh")),
                (".gitignore", ".venv/\n__pycache__/\n"),
            ],
            Lang::Js => vec![
                ("stage.js", include_str!("../templates/js/stage.js")),
                ("package.json", include_str!("../templates/js/package.json")),
                ("build.sh", include_str!("../templates/js/build.sh")),
                (".gitignore", "node_modules/\n"),
            ],
            Lang::C => vec![
                ("stage.c", include_str!("../templates/c/stage.c")),
                ("build.sh", include_str!("../templates/c/build.sh")),
                (".gitignore", "/gen/\n"),
            ],
        }
    }
}

const SAMPLE: &str = "event_id,user_id,event_type,product_id,price,event_time
550e8400-e29b-41d4-a716-446655440000,12345,Purchase,67890,99.99,2026-01-05T14:47:56.000Z
6ba7b810-9dad-41d1-80b4-00c04fd430c8,42,view,7,-1.00,2026-01-05T14:48:00.000Z
";

/// Writes the scaffold and returns its folder.
pub fn new_stage(lang: Lang, name: &str, plugins: &Path) -> anyhow::Result<PathBuf> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        bail!(
            "stage name {name:?} must start with a lower-case letter and hold only a-z, 0-9 and _"
        );
    }
    let dir = plugins.join(lang.folder()).join(name);
    if dir.exists() {
        bail!("{} already exists; choose another name", dir.display());
    }
    let fill = |text: &str| text.replace("{{name}}", name).replace("{{crate}}", name);
    let mut files = lang.files();
    files.push(("wit/pipeline.wit", WIT));
    files.push(("sample.csv", SAMPLE));
    for (path, text) in files {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let text = if path == "wit/pipeline.wit" || path == "sample.csv" {
            text.to_owned()
        } else {
            fill(text)
        };
        std::fs::write(&target, text)
            .with_context(|| format!("cannot write {}", target.display()))?;
    }
    let entry = format!(
        "# Add to {}/pipeline.toml to run it in the pipeline:\n[[stage]]\nname = \"{name}\"\ncomponent = \"{name}.wasm\"\n",
        plugins.display()
    );
    std::fs::write(dir.join("stage.toml"), &entry)?;
    Ok(dir)
}
