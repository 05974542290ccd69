//! The file source: notices complete CSV files in the input folder, reads
//! them from their committed positions, parses them and hands records to
//! the batcher.
//!
//! It runs on its own thread. It wakes on inotify events (the `notify`
//! crate) and on a periodic rescan, the fallback for file systems whose
//! events get lost. A file is tracked by identity (`identity`: device,
//! inode, birth time, and a checksum of its first bytes), not by name: a
//! new file under an old name, or on an old inode, starts from zero; a
//! file renamed out of the folder and back resumes where it was. Only
//! complete records are read: a file still being written is resumed when
//! it grows, and its unterminated last line is read only once the file
//! has been quiet for `settle` (or at once with `--once`). The positions
//! of files gone for `forget_after` are deleted with the next commit.

mod file;
mod identity;
pub mod lease;
pub mod nats;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::batch::{Batch, Batcher, Position};
use crate::watch::FolderWatch;
pub use file::file_key;
use file::Tracked;
pub use identity::{FileId, Fingerprint, FINGERPRINT_BYTES};

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub input: PathBuf,
    /// Read what is there, then stop.
    pub once: bool,
    /// Periodic rescan, the fallback when inotify events are missed.
    pub rescan: Duration,
    /// How long a file must be unchanged before an unterminated last line
    /// is taken as complete.
    pub settle: Duration,
    /// Bytes read per call, and the longest record: one that does not fit
    /// is quarantined and reading goes on at the next line (see `file`).
    pub chunk: usize,
    /// Read files that symbolic links in the folder point to. Off by
    /// default: a link would let whoever may write the folder copy any
    /// file the host can read into the quarantine.
    pub follow_symlinks: bool,
    /// What to do with a file once all of it is committed and it has been
    /// quiet for `settle`.
    pub on_done: OnDone,
    /// How long a file may be gone from the folder (renamed out, deleted)
    /// before its position is forgotten; one back sooner resumes.
    pub forget_after: Duration,
}

/// `--on-done`: what becomes of a file fully committed and settled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnDone {
    /// Leave it (every pass still lists it).
    #[default]
    Keep,
    /// Remove it.
    Delete,
    /// Rename it into this folder (on the same file system).
    Move(PathBuf),
}

impl std::str::FromStr for OnDone {
    type Err = String;

    fn from_str(text: &str) -> Result<OnDone, String> {
        match text {
            "keep" => Ok(OnDone::Keep),
            "delete" => Ok(OnDone::Delete),
            _ => match text.strip_prefix("move:") {
                Some(dir) if !dir.is_empty() => Ok(OnDone::Move(PathBuf::from(dir))),
                _ => Err(format!("{text:?}: expected keep, delete or move:DIR")),
            },
        }
    }
}

impl SourceConfig {
    pub fn new(input: PathBuf, once: bool) -> SourceConfig {
        SourceConfig {
            input,
            once,
            rescan: Duration::from_secs(2),
            settle: Duration::from_secs(2),
            chunk: 1 << 20,
            follow_symlinks: false,
            on_done: OnDone::Keep,
            forget_after: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("input folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch input folder {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Whether a directory entry is a candidate input file by its name:
/// hidden and temporary names are how writers mark unfinished files.
pub fn is_input_name(name: &str) -> bool {
    !(name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part"))
}

/// Sends closed batches downstream; blocking here is the back-pressure.
pub(crate) struct Outlet {
    pub batcher: Batcher,
    tx: mpsc::Sender<Batch>,
    closed: bool,
}

impl Outlet {
    fn send(&mut self, batch: Option<Batch>) {
        if let Some(batch) = batch {
            if self.tx.blocking_send(batch).is_err() {
                self.closed = true;
            }
        }
    }
}

pub struct Source {
    config: SourceConfig,
    /// Committed positions not yet matched with a file of the folder.
    committed: HashMap<FileId, Position>,
    /// When `committed` was loaded: its entries are gone since then.
    started: Instant,
    tracked: HashMap<FileId, Tracked>,
    /// Files read in this run that left the folder, and since when.
    gone: HashMap<FileId, (Tracked, Instant)>,
    /// Passes over the folder so far.
    passes: u64,
    shutdown: Arc<AtomicBool>,
    /// Entries skipped for what they are (links, devices...), logged once.
    skipped: HashSet<PathBuf>,
    /// Positions as the sink commits them, for `--on-done`.
    committed_feed: Option<std::sync::mpsc::Receiver<Vec<Position>>>,
    /// Committed offset by file key, from `committed_feed`.
    committed_now: HashMap<String, u64>,
    /// Whether the missing birth time was reported.
    warned_birth: bool,
}

impl Source {
    /// `committed` are the positions of the last committed batch, read at
    /// start; files are resumed from them.
    pub fn new(
        config: SourceConfig,
        committed: HashMap<String, Position>,
        shutdown: Arc<AtomicBool>,
    ) -> Source {
        let committed = committed
            .into_values()
            .filter_map(|p| match FileId::parse(&p.key) {
                Some(id) => Some((id, p)),
                None => {
                    tracing::warn!(key = %p.key, file = %p.path, "ignoring a committed position whose file key is not device:inode:birth time");
                    None
                }
            })
            .collect();
        Source {
            config,
            committed,
            started: Instant::now(),
            tracked: HashMap::new(),
            gone: HashMap::new(),
            passes: 0,
            shutdown,
            skipped: HashSet::new(),
            committed_feed: None,
            committed_now: HashMap::new(),
            warned_birth: false,
        }
    }

    /// Where the positions of committed batches arrive, so that files
    /// fully committed can be deleted or moved (`SourceConfig::on_done`).
    pub fn committed_feed(&mut self, feed: std::sync::mpsc::Receiver<Vec<Position>>) {
        self.committed_feed = Some(feed);
    }

    /// Deletes or moves a file read to its end whose end is committed and
    /// which has been quiet for `settle`. Returns whether it is gone.
    fn finish_if_done(
        &mut self,
        path: &std::path::Path,
        meta: &std::fs::Metadata,
        id: FileId,
    ) -> bool {
        let key = id.key();
        let key = key.as_str();
        if self.config.on_done == OnDone::Keep
            || self.committed_now.get(&id.key()) != Some(&meta.len())
            || self.tracked.get(&id).map(|t| t.offset()) != Some(meta.len())
        {
            return false;
        }
        let quiet = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|q| q >= self.config.settle);
        if !quiet {
            return false;
        }
        let result = match &self.config.on_done {
            OnDone::Keep => return false,
            OnDone::Delete => std::fs::remove_file(path),
            OnDone::Move(dir) => std::fs::create_dir_all(dir).and_then(|()| {
                std::fs::rename(path, dir.join(path.file_name().unwrap_or_default()))
            }),
        };
        match result {
            Ok(()) => {
                tracing::debug!(file = %path.display(), "file committed: done with it ({:?})", self.config.on_done);
                self.committed_now.remove(key);
                true
            }
            Err(e) => {
                tracing::error!(file = %path.display(), "file committed, but --on-done failed: {e}; keeping it");
                // Not tried again at every pass.
                self.committed_now.remove(key);
                false
            }
        }
    }

    /// Runs until shutdown (or, with `once`, until every file is read),
    /// then closes the open batch and returns.
    pub fn run(mut self, batcher: Batcher, tx: mpsc::Sender<Batch>) -> Result<(), SourceError> {
        let input = self.config.input.clone();
        std::fs::create_dir_all(&input).map_err(|source| SourceError::Folder {
            path: input.clone(),
            source,
        })?;
        // With `once` the folder is read as it stands: nothing to wait for.
        let watch = if self.config.once {
            FolderWatch::disabled()
        } else {
            FolderWatch::new(&input).map_err(|source| SourceError::Watch {
                path: input.clone(),
                source,
            })?
        };

        let mut outlet = Outlet {
            batcher,
            tx,
            closed: false,
        };
        loop {
            let progressed = self.pass(&mut outlet)?;
            if outlet.closed {
                return Ok(());
            }
            if self.shutdown.load(Ordering::Relaxed) || (self.config.once && !progressed) {
                let last = outlet.batcher.take();
                outlet.send(last);
                return Ok(());
            }
            if progressed {
                let due = outlet.batcher.take_due(Instant::now());
                outlet.send(due);
                continue;
            }
            // Idle: nothing more to read right now, so commit what we have.
            let idle = outlet.batcher.take();
            outlet.send(idle);
            // Woken by a change, or the periodic rescan is due; a burst of
            // events arrives as one wake.
            watch.wait(self.config.rescan);
        }
    }

    /// One pass over the input folder: discover files, read what is new.
    /// Returns whether anything was read.
    fn pass(&mut self, outlet: &mut Outlet) -> Result<bool, SourceError> {
        if let Some(feed) = &self.committed_feed {
            for positions in feed.try_iter() {
                for p in positions {
                    self.committed_now.insert(p.key, p.offset);
                }
            }
        }
        self.passes += 1;
        let pass = self.passes;
        // Files read to their end and unchanged since are passed over as
        // they are listed: neither kept, nor sorted, nor opened.
        let keep_done = self.config.on_done == OnDone::Keep;
        let tracked = &mut self.tracked;
        let warned_birth = &mut self.warned_birth;
        let input = &self.config.input;
        let files = list(&self.config, &mut self.skipped, |meta| {
            let id = FileId::of(meta);
            if id.born.is_none() && !*warned_birth {
                *warned_birth = true;
                tracing::warn!(input = %input.display(),
                    "the file system of the input folder gives no birth time: files are told apart by device, inode and a checksum of their first {FINGERPRINT_BYTES} bytes");
            }
            match tracked.get_mut(&id) {
                Some(t) => {
                    t.listed = pass;
                    !(keep_done && t.unchanged(meta))
                }
                None => true,
            }
        })?;
        let mut progressed = false;
        for (path, meta) in files {
            let id = FileId::of(&meta);
            let tracked = match self.tracked.entry(id) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    // Back after leaving the folder, committed before this
                    // run, or new.
                    let t = match self.gone.remove(&id) {
                        Some((t, _)) => t,
                        None => Tracked::open(id, &path, self.committed.remove(&id)),
                    };
                    e.insert(t)
                }
            };
            tracked.listed = pass;
            tracked.path_seen(&path);
            if self.shutdown.load(Ordering::Relaxed) || outlet.closed {
                break;
            }
            match tracked.read_new(&meta, &self.config, outlet, &self.shutdown) {
                Ok(read) => progressed |= read,
                Err(e) => tracked.report_error(e),
            }
            if self.finish_if_done(&path, &meta, id) {
                if let Some(t) = self.tracked.get_mut(&id) {
                    t.listed = 0;
                }
            }
        }
        if self.shutdown.load(Ordering::Relaxed) || outlet.closed {
            return Ok(progressed);
        }
        // Files not listed in this pass are gone: kept for a while, in
        // case they come back (renamed out and back).
        let now = Instant::now();
        let left: Vec<FileId> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.listed != pass)
            .map(|(id, _)| *id)
            .collect();
        for id in left {
            if let Some(t) = self.tracked.remove(&id) {
                self.gone.insert(id, (t, now));
            }
        }
        self.forget_gone(now, outlet);
        Ok(progressed)
    }

    /// Forgets the files gone for longer than `forget_after`: their
    /// positions are deleted with the next commit.
    fn forget_gone(&mut self, now: Instant, outlet: &mut Outlet) {
        let grace = self.config.forget_after;
        let mut forget = Vec::new();
        self.gone.retain(|_, (t, since)| {
            let keep = now.duration_since(*since) < grace;
            if !keep {
                forget.push(t.position().key);
            }
            keep
        });
        if now.duration_since(self.started) >= grace && !self.committed.is_empty() {
            forget.extend(self.committed.drain().map(|(_, p)| p.key));
        }
        if forget.is_empty() {
            return;
        }
        for key in &forget {
            self.committed_now.remove(key);
        }
        tracing::info!(
            files = forget.len(),
            "forgetting the positions of files gone from the input folder for {:?}",
            grace
        );
        outlet.batcher.forget(forget);
    }
}

/// The candidate files of the input folder that `wanted` keeps, oldest
/// first (by modification time, then name).
fn list(
    config: &SourceConfig,
    skipped: &mut HashSet<PathBuf>,
    mut wanted: impl FnMut(&std::fs::Metadata) -> bool,
) -> Result<Vec<(PathBuf, std::fs::Metadata)>, SourceError> {
    let dir = &config.input;
    let entries = std::fs::read_dir(dir).map_err(|source| SourceError::Folder {
        path: dir.clone(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !is_input_name(&name.to_string_lossy()) {
            continue;
        }
        // The entry itself, not what a link points to (a stat relative
        // to the open folder: no walk of the path per file).
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let meta = if meta.file_type().is_symlink() && config.follow_symlinks {
            match std::fs::metadata(entry.path()) {
                Ok(target) => target,
                Err(_) => continue,
            }
        } else {
            meta
        };
        if meta.is_file() {
            if wanted(&meta) {
                files.push((entry.path(), meta));
            }
        } else if !meta.is_dir() && skipped.insert(entry.path()) {
            let what = if meta.file_type().is_symlink() {
                "a symbolic link (--follow-symlinks reads what links point to)"
            } else {
                "not a regular file"
            };
            tracing::warn!(path = %entry.path().display(), "skipping input entry: {what}");
        }
    }
    // Forget skipped entries that are gone, so the set stays bounded.
    if !skipped.is_empty() {
        skipped.retain(|p| p.symlink_metadata().is_ok());
    }
    // Compared in place: a key cloning the path cost an allocation per
    // comparison.
    files.sort_by(|(a, a_meta), (b, b_meta)| {
        let time = |m: &std::fs::Metadata| m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        (time(a_meta), a).cmp(&(time(b_meta), b))
    });
    Ok(files)
}
