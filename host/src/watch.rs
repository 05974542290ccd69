//! Folder watching shared by the file source and the plugin watcher: a
//! thread that waits on a folder wakes only for events that can mean new
//! data, and a burst of them is one wake.
//!
//! The filter matters because both watchers read the folder they watch:
//! every open, read and close of ours raises an inotify event for it, and
//! a watcher woken by those would pass over the folder again and again
//! with nothing new to find (a busy loop of ~230 passes a second).

use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
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
}

impl FolderWatch {
    pub fn new(dir: &Path) -> Result<FolderWatch, notify::Error> {
        use notify::Watcher;
        // Capacity one: a pending wake already covers every later event,
        // so a burst costs one pass, not one per event.
        let (tx, wake) = mpsc::sync_channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |event| {
            if means_change(&event) {
                notify_once(&tx);
            }
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(FolderWatch {
            _watcher: Some(watcher),
            wake,
        })
    }

    /// A watch that never fires: `wait` sleeps out its timeout.
    pub fn disabled() -> FolderWatch {
        let (_tx, wake) = mpsc::sync_channel::<()>(1);
        FolderWatch {
            _watcher: None,
            wake,
        }
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
