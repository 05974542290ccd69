//! The file source: notices complete CSV files in the input folder, reads
//! them from their committed positions, parses them and hands records to
//! the batcher.
//!
//! It runs on its own thread. It wakes on inotify events (the `notify`
//! crate) and on a periodic rescan. A pass looks at the files events
//! named and at the files not yet read to their end; a file read to its
//! end and unchanged costs nothing until an event names it. Every
//! `FULL_PASS` (and whenever events were lost, or there is no watch) a
//! pass lists and stats the whole folder instead, the safety net for
//! changes no event reported; if such a pass finds one, the events of
//! this folder are not trusted again and every pass is a full one. A file is tracked by identity (`identity`: device,
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
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use crate::batch::{Batch, Batcher, Position};
use crate::watch::FolderWatch;
pub use file::file_key;
use file::Tracked;
pub use identity::{FileId, Fingerprint, FINGERPRINT_BYTES};

/// How often a pass lists and stats every file of the folder, even when
/// the watch reported nothing: the bound on how late a change no event
/// reported (a file written through a hard link elsewhere, by mmap, on
/// a network file system) is noticed.
pub const FULL_PASS: Duration = Duration::from_secs(60);

/// A change older than this when a full pass finds it should have been
/// named by an event: finding one means the events are not to be trusted.
const EVENT_LATENCY: Duration = Duration::from_secs(1);

/// What one pass looks at.
enum Look {
    /// The whole folder.
    Full,
    /// The entries of these names, and the files not done with.
    Named(HashSet<OsString>),
}

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
    /// Leave it (only the full pass, every `FULL_PASS`, stats it again).
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
    /// Symbolic links of the folder read through (`follow_symlinks`):
    /// what they point to raises no event here, so every pass looks.
    links: HashSet<PathBuf>,
    /// When the last full pass began.
    last_full: Option<Instant>,
    /// When the current and the previous pass took the watch's names.
    looked: (SystemTime, SystemTime),
    /// Whether every change since the last full pass was to be named by
    /// an event (no events lost meanwhile).
    trusted: bool,
    /// A full pass found a change no event named: every pass is full.
    distrust: bool,
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
            links: HashSet::new(),
            last_full: None,
            looked: (SystemTime::UNIX_EPOCH, SystemTime::UNIX_EPOCH),
            trusted: false,
            distrust: false,
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
            FolderWatch::naming(&input).map_err(|source| SourceError::Watch {
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
            let look = self.next_look(&watch);
            let progressed = self.pass(&mut outlet, look)?;
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

    /// Whether the next pass lists the whole folder or looks only at what
    /// events named (and the files not done with).
    fn next_look(&mut self, watch: &FolderWatch) -> Look {
        self.looked = (SystemTime::now(), self.looked.0);
        let named = watch.take_changed();
        let due = self
            .last_full
            .is_none_or(|last| last.elapsed() >= FULL_PASS);
        match named {
            Some(names) if !due && !self.distrust => Look::Named(names),
            named => {
                // Changes a full pass finds after lost events (or at the
                // start) were not to be named: no sign of unreliable events.
                self.trusted = self.last_full.is_some() && named.is_some();
                self.last_full = Some(Instant::now());
                Look::Full
            }
        }
    }

    /// One pass over the input folder: discover files, read what is new.
    /// Returns whether anything was read.
    fn pass(&mut self, outlet: &mut Outlet, look: Look) -> Result<bool, SourceError> {
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
        // A named pass: the entries events named, the links read through,
        // and the files not done with (still to read, or to finish).
        let named: Option<HashSet<PathBuf>> = match &look {
            Look::Full => None,
            Look::Named(names) => {
                let mut paths: HashSet<PathBuf> = names
                    .iter()
                    .filter(|n| is_input_name(&n.to_string_lossy()))
                    .map(|n| self.config.input.join(n))
                    .collect();
                paths.extend(self.links.iter().cloned());
                for t in self.tracked.values() {
                    if !(keep_done && t.done()) {
                        paths.insert(PathBuf::from(t.path()));
                    }
                }
                Some(paths)
            }
        };
        // In a full pass after which no event was lost, a change older than
        // the previous pass that no event brought is a missed one.
        let missed_before = (matches!(look, Look::Full) && self.trusted && !self.distrust)
            .then(|| self.looked.1.checked_sub(EVENT_LATENCY))
            .flatten();
        let mut missed: Option<PathBuf> = None;
        let tracked = &mut self.tracked;
        let warned_birth = &mut self.warned_birth;
        let input = &self.config.input;
        let wanted = |path: &Path, meta: &std::fs::Metadata| {
            let id = FileId::of(meta);
            if id.born.is_none() && !*warned_birth {
                *warned_birth = true;
                tracing::warn!(input = %input.display(),
                    "the file system of the input folder gives no birth time: files are told apart by device, inode and a checksum of their first {FINGERPRINT_BYTES} bytes");
            }
            let want = match tracked.get_mut(&id) {
                Some(t) => {
                    t.listed = pass;
                    let unchanged = t.unchanged(meta);
                    if !unchanged
                        && t.done()
                        && missed.is_none()
                        && changed_before(meta, missed_before)
                    {
                        missed = Some(path.to_path_buf());
                    }
                    !(keep_done && unchanged)
                }
                None => {
                    if missed.is_none() && changed_before(meta, missed_before) {
                        missed = Some(path.to_path_buf());
                    }
                    true
                }
            };
            want
        };
        let files = match &named {
            None => list(&self.config, &mut self.skipped, &mut self.links, wanted)?,
            Some(paths) => look_at(
                &self.config,
                paths,
                &mut self.skipped,
                &mut self.links,
                wanted,
            ),
        };
        if let Some(path) = missed.take() {
            self.distrust = true;
            tracing::warn!(input = %self.config.input.display(), file = %path.display(),
                "a change in the input folder was found by the full pass ({FULL_PASS:?}) but no file system event reported it: looking at every file at every rescan from now on");
        }
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
        // case they come back (renamed out and back). A named pass knows
        // this only of the names it looked at.
        let now = Instant::now();
        let left: Vec<FileId> = self
            .tracked
            .iter()
            .filter(|(_, t)| {
                t.listed != pass
                    && named
                        .as_ref()
                        .is_none_or(|paths| paths.contains(Path::new(t.path())))
            })
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

/// Whether `meta` shows a change (its status change time) before `before`.
fn changed_before(meta: &std::fs::Metadata, before: Option<SystemTime>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(before) = before else {
        return false;
    };
    let changed = u64::try_from(meta.ctime()).ok().map(|secs| {
        SystemTime::UNIX_EPOCH + Duration::new(secs, meta.ctime_nsec().clamp(0, 999_999_999) as u32)
    });
    changed.is_some_and(|c| c < before)
}

/// What an entry of the folder is to read, given its own metadata (not
/// what a link points to): a regular file's metadata, or `None`.
fn candidate(
    config: &SourceConfig,
    path: &Path,
    meta: std::fs::Metadata,
    skipped: &mut HashSet<PathBuf>,
    links: &mut HashSet<PathBuf>,
) -> Option<std::fs::Metadata> {
    let is_link = meta.file_type().is_symlink();
    let meta = if is_link && config.follow_symlinks {
        std::fs::metadata(path).ok()?
    } else {
        meta
    };
    if meta.is_file() {
        if is_link {
            links.insert(path.to_path_buf());
        }
        return Some(meta);
    }
    if !meta.is_dir() && skipped.insert(path.to_path_buf()) {
        let what = if meta.file_type().is_symlink() {
            "a symbolic link (--follow-symlinks reads what links point to)"
        } else {
            "not a regular file"
        };
        tracing::warn!(path = %path.display(), "skipping input entry: {what}");
    }
    None
}

/// Oldest first (by modification time, then name). Compared in place: a
/// key cloning the path cost an allocation per comparison.
fn sort(files: &mut [(PathBuf, std::fs::Metadata)]) {
    files.sort_by(|(a, a_meta), (b, b_meta)| {
        let time = |m: &std::fs::Metadata| m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        (time(a_meta), a).cmp(&(time(b_meta), b))
    });
}

/// The files at `paths` (entries of the input folder) that `wanted`
/// keeps, oldest first. A path that is no longer there is left out.
fn look_at(
    config: &SourceConfig,
    paths: &HashSet<PathBuf>,
    skipped: &mut HashSet<PathBuf>,
    links: &mut HashSet<PathBuf>,
    mut wanted: impl FnMut(&Path, &std::fs::Metadata) -> bool,
) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut files = Vec::new();
    for path in paths {
        links.remove(path);
        let Ok(meta) = path.symlink_metadata() else {
            skipped.remove(path);
            continue;
        };
        if let Some(meta) = candidate(config, path, meta, skipped, links) {
            if wanted(path, &meta) {
                files.push((path.clone(), meta));
            }
        }
    }
    sort(&mut files);
    files
}

/// The candidate files of the input folder that `wanted` keeps, oldest
/// first (by modification time, then name).
fn list(
    config: &SourceConfig,
    skipped: &mut HashSet<PathBuf>,
    links: &mut HashSet<PathBuf>,
    mut wanted: impl FnMut(&Path, &std::fs::Metadata) -> bool,
) -> Result<Vec<(PathBuf, std::fs::Metadata)>, SourceError> {
    let dir = &config.input;
    let entries = std::fs::read_dir(dir).map_err(|source| SourceError::Folder {
        path: dir.clone(),
        source,
    })?;
    let mut files = Vec::new();
    let mut found_links = HashSet::new();
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
        let path = entry.path();
        if let Some(meta) = candidate(config, &path, meta, skipped, &mut found_links) {
            if wanted(&path, &meta) {
                files.push((path, meta));
            }
        }
    }
    *links = found_links;
    // Forget skipped entries that are gone, so the set stays bounded.
    if !skipped.is_empty() {
        skipped.retain(|p| p.symlink_metadata().is_ok());
    }
    sort(&mut files);
    Ok(files)
}
