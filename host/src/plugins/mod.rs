//! `host plugins`: what an operator asks about the stages of a running
//! (or stopped) pipeline, and the one change they make by command rather
//! than by editing files.
//!
//! - `list`: the manifest's stages in order, whether each component loads
//!   and type-checks (with the runtime and compile cache the host uses),
//!   and, given a database, what the pipeline last committed with them.
//! - `promote`: makes a stage's shadow candidate its live version by
//!   rewriting `pipeline.toml`; a running host's watcher then swaps it in
//!   the normal way (state handed over, at a batch boundary).

pub mod list;
pub mod promote;

use std::path::Path;

use sha2::{Digest, Sha256};

/// Hex SHA-256 of a file, as the host records it; `None` if unreadable.
fn file_hash(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    Some(
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}
