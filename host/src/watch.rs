//! Folder watching shared by the file source and the plugin watcher: a
//! thread that waits on a folder wakes only for events that can mean new
//! data, and a burst of them is one wake.
//!
//! The filter matters because both watchers read the folder they watch:
//! every open, read and close of ours raises an inotify event for it, and
//! a watcher woken by those would pass over the folder again and again
//! with nothing new to find (a busy loop of ~230 passes a second).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};

/// Whether a notify event can mean that a file in the folder has new
/// content or a new name: creation, a write, a close after writing, a
/// rename, a removal, a metadata change (a file made readable), or a
/// dropped-events signal. Opens, reads and closes without writing (what
/// our own reading raises) cannot.
pub fn means_change(event: &notify::Result<notify::Event>) -> bool {
    let Ok(event) = event else {
        // The watcher itself failed or overflowed: look again.
        return true;
    };
    if event.need_rescan() {
        return true;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_)
        | EventKind::Modify(_)
        | EventKind::Remove(_)
        | EventKind::Any
        | EventKind::Other => true,
    }
}

/// What ended a `FolderWatch::wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something changed in the folder.
    Changed,
    /// Nothing did within the timeout (the periodic rescan is due).
    Timeout,
}

/// A watch on one folder (not recursive). Without working inotify (or
/// when `watch` is false) `wait` simply sleeps its timeout, so callers
/// fall back to their periodic rescan.
pub struct FolderWatch {
    // Dropping the watcher stops the events; keep it as long as `wake`.
    _watcher: Option<notify::RecommendedWatcher>,
    wake: Receiver<()>,
    /// The names events were raised for since the last `take_changed`
    /// (only for a watch made by `naming`).
    changed: Option<Arc<Mutex<Changed>>>,
}

/// Names of the folder that events named, or that some were lost.
#[derive(Default)]
struct Changed {
    names: HashSet<OsString>,
    lost: bool,
}

/// More names than this between two looks count as lost events: a full
/// listing is then cheaper than keeping them all.
const MAX_NAMES: usize = 65_536;

impl FolderWatch {
    /// A watch that only wakes (the plugin watcher looks at everything).
    pub fn new(dir: &Path) -> Result<FolderWatch, notify::Error> {
        FolderWatch::watch(dir, false)
    }

    /// A watch that also keeps the names of the entries events were
    /// raised for, so a caller can look at those only (`take_changed`).
    pub fn naming(dir: &Path) -> Result<FolderWatch, notify::Error> {
        FolderWatch::watch(dir, true)
    }

    fn watch(dir: &Path, naming: bool) -> Result<FolderWatch, notify::Error> {
        use notify::Watcher;
        // Capacity one: a pending wake already covers every later event,
        // so a burst costs one pass, not one per event.
        let (tx, wake) = mpsc::sync_channel::<()>(1);
        let changed = naming.then(|| Arc::new(Mutex::new(Changed::default())));
        let record = changed.clone();
        let folder: PathBuf = dir.to_path_buf();
        let mut watcher = notify::recommended_watcher(move |event| {
            if !means_change(&event) {
                return;
            }
            if let Some(record) = &record {
                if let Ok(mut changed) = record.lock() {
                    note(&mut changed, &folder, &event);
                }
            }
            notify_once(&tx);
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(FolderWatch {
            _watcher: Some(watcher),
            wake,
            changed,
        })
    }

    /// A watch that never fires: `wait` sleeps out its timeout.
    pub fn disabled() -> FolderWatch {
        let (_tx, wake) = mpsc::sync_channel::<()>(1);
        FolderWatch {
            _watcher: None,
            wake,
            changed: None,
        }
    }

    /// The names of the folder's entries that changed since the last
    /// call, or `None` when that is not known (no watch, no names kept,
    /// or events were lost): then everything may have changed.
    pub fn take_changed(&self) -> Option<HashSet<OsString>> {
        let changed = self.changed.as_ref()?;
        let mut changed = changed.lock().ok()?;
        let taken = std::mem::take(&mut *changed);
        (!taken.lost).then_some(taken.names)
    }

    /// Blocks until something changes or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> Wake {
        match self.wake.recv_timeout(timeout) {
            Ok(()) => Wake::Changed,
            Err(RecvTimeoutError::Timeout) => Wake::Timeout,
            Err(RecvTimeoutError::Disconnected) => {
                // No watcher (disabled, or its thread ended): the caller's
                // periodic rescan is all there is.
                std::thread::sleep(timeout);
                Wake::Timeout
            }
        }
    }

    /// Forgets a wake raised meanwhile (by changes a pass about to start
    /// will see anyway).
    pub fn clear(&self) {
        while self.wake.try_recv().is_ok() {}
    }
}

/// Records what one event (already known to mean a change) names.
fn note(changed: &mut Changed, folder: &Path, event: &notify::Result<notify::Event>) {
    let event = match event {
        Ok(event) if !event.need_rescan() && !event.paths.is_empty() => event,
        // Failed, overflowed, or naming nothing: anything may have changed.
        _ => {
            changed.lost = true;
            return;
        }
    };
    for path in &event.paths {
        match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) if parent == folder => {
                changed.names.insert(name.to_os_string());
            }
            // The folder itself (or something outside it): look at all.
            _ => changed.lost = true,
        }
    }
    if changed.names.len() > MAX_NAMES {
        changed.names = HashSet::new();
        changed.lost = true;
    }
}

fn notify_once(tx: &SyncSender<()>) {
    match tx.try_send(()) {
        Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};

    fn event(kind: EventKind) -> notify::Result<notify::Event> {
        Ok(notify::Event::new(kind))
    }

    #[test]
    fn own_reads_do_not_wake_and_writes_do() {
        for quiet in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Any),
        ] {
            assert!(!means_change(&event(quiet)), "{quiet:?}");
        }
        for change in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(means_change(&event(change)), "{change:?}");
        }
        let overflow = notify::Event::new(EventKind::Access(AccessKind::Read))
            .set_flag(notify::event::Flag::Rescan);
        assert!(means_change(&Ok(overflow)));
        assert!(means_change(&Err(notify::Error::generic("queue full"))));
    }

    #[test]
    fn names_in_the_folder_are_kept_and_anything_else_means_lost_events() {
        let folder = Path::new("/in");
        let mut changed = Changed::default();
        let write = notify::Event::new(EventKind::Modify(ModifyKind::Data(DataChange::Any)))
            .add_path(folder.join("a.csv"));
        note(&mut changed, folder, &Ok(write));
        let rename = notify::Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)))
            .add_path(folder.join("b.csv"))
            .add_path(folder.join("c.csv"));
        note(&mut changed, folder, &Ok(rename));
        assert!(!changed.lost);
        let mut names: Vec<_> = changed.names.iter().cloned().collect();
        names.sort();
        assert_eq!(names, ["a.csv", "b.csv", "c.csv"]);
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        note(&mut changed, folder, &Ok(overflow));
        assert!(changed.lost);
        let mut changed = Changed::default();
        let itself =
            notify::Event::new(EventKind::Remove(RemoveKind::Folder)).add_path(folder.into());
        note(&mut changed, folder, &Ok(itself));
        assert!(changed.lost);
    }

    #[test]
    fn reading_the_folder_does_not_wake_and_a_write_does() {
        let dir = std::env::temp_dir().join(format!("watch-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Written before the watch starts: the watch sees only our reads.
        for i in 0..20 {
            std::fs::write(dir.join(format!("f{i}")), b"x\n").unwrap();
        }
        let watch = FolderWatch::new(&dir).unwrap();
        for i in 0..20 {
            let _ = std::fs::read(dir.join(format!("f{i}"))).unwrap();
            let _ = std::fs::read_dir(&dir).unwrap().count();
        }
        assert_eq!(watch.wait(Duration::from_secs(1)), Wake::Timeout);
        std::fs::write(dir.join("new"), b"y\n").unwrap();
        // Generous: the event reaches us through the watcher's own thread.
        assert_eq!(watch.wait(Duration::from_secs(120)), Wake::Changed);
        let named = FolderWatch::naming(&dir).unwrap();
        assert_eq!(named.take_changed(), Some(HashSet::new()));
        std::fs::write(dir.join("newer"), b"z\n").unwrap();
        assert_eq!(named.wait(Duration::from_secs(120)), Wake::Changed);
        let names = named.take_changed().unwrap();
        assert!(names.contains(std::ffi::OsStr::new("newer")), "{names:?}");
        assert_eq!(FolderWatch::disabled().take_changed(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
