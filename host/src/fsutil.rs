//! Small file-system helpers shared by the host's durable writers, and
//! the checks that tell a folder or file only the host's user controls
//! from one another user could have written (see docs/security.md).

use std::fs::{File, Metadata};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a folder or file is not the host's user's alone, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{path} {why}; {fix}")]
pub struct NotPrivate {
    pub path: PathBuf,
    pub why: String,
    pub fix: String,
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Creates `dir` (and missing parents) as 0700, so that only the host's
/// user can list or write it. An existing folder is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Whether `meta` (of `path`) is owned by this process's user and
/// writable by no one else.
pub fn check_owned_not_shared(path: &Path, meta: &Metadata) -> Result<(), NotPrivate> {
    let mode = meta.permissions().mode() & 0o7777;
    let fix_mode = if meta.is_dir() { "700" } else { "600" };
    if meta.uid() != euid() {
        return Err(NotPrivate {
            path: path.to_owned(),
            why: format!(
                "is owned by uid {}, not by this host's user (uid {})",
                meta.uid(),
                euid()
            ),
            fix: format!(
                "remove it, or `chown {} {}` if that user is trusted",
                euid(),
                path.display()
            ),
        });
    }
    if mode & 0o022 != 0 {
        return Err(NotPrivate {
            path: path.to_owned(),
            why: format!("is writable by other users (mode {mode:04o})"),
            fix: format!("`chmod {fix_mode} {}`", path.display()),
        });
    }
    Ok(())
}

/// `check_owned_not_shared` plus: no one else may read it either (for
/// secrets).
pub fn check_secret(path: &Path, meta: &Metadata) -> Result<(), NotPrivate> {
    check_owned_not_shared(path, meta)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(NotPrivate {
            path: path.to_owned(),
            why: format!("is readable by other users (mode {mode:04o})"),
            fix: format!(
                "`chmod 600 {}`, and treat the secret in it as known to others: delete it and the host makes a new one",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Opens an existing regular file without following a symbolic link
/// (another user's link could point anywhere).
pub fn open_no_follow(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// `n` bytes from the operating system's random source, as hex.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates a new temporary file beside `path`, 0600, with O_EXCL and an
/// unpredictable name: no one can have placed a file or a link there in
/// advance for the host to write through.
pub fn create_temp_beside(path: &Path) -> std::io::Result<(File, PathBuf)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", random_hex(12)?));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    Ok((file, tmp))
}

/// Writes `data` to `path` so that a reader sees either the old file or
/// the whole new one: write a temporary file beside it (see
/// [`create_temp_beside`]), fsync, rename, fsync the folder. The new
/// file keeps the old one's permission bits but write for group and
/// others, or is 0600 when new.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    replace(path, data, true)
}

/// [`write_atomic`], the new file 0600 whatever the old one was.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    replace(path, data, false)
}

fn replace(path: &Path, data: &[u8], keep_mode: bool) -> std::io::Result<()> {
    let (mut file, tmp) = create_temp_beside(path)?;
    let written = (|| {
        file.write_all(data)?;
        if let Some(old) = std::fs::metadata(path).ok().filter(|_| keep_mode) {
            let mode = old.permissions().mode() & 0o7755;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        if let Ok(dir) = File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_files_are_new_private_and_unpredictable() {
        let dir = std::env::temp_dir().join(format!("fsutil-temp-{}", std::process::id()));
        create_private_dir(&dir).unwrap();
        let target = dir.join("entry");
        let (_a, a) = create_temp_beside(&target).unwrap();
        let (_b, b) = create_temp_beside(&target).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o600
        );
        write_atomic(&target, b"data").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"data");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_others_may_write_is_not_private() {
        let dir = std::env::temp_dir().join(format!("fsutil-shared-{}", std::process::id()));
        create_private_dir(&dir).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        check_owned_not_shared(&dir, &meta).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_owned_not_shared(&dir, &std::fs::metadata(&dir).unwrap()).unwrap_err();
        assert!(err.to_string().contains("writable by other users"), "{err}");
        assert!(err.to_string().contains("chmod 700"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
