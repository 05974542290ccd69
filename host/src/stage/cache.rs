//! The compile cache: the native code wasmtime made from a component,
//! kept on disk by content hash so that restarts and swaps back do not
//! recompile.
//!
//! Loading an entry runs its native code in the host, unchecked by
//! wasmtime, so an entry is loaded only when the host itself wrote it
//! (docs/security.md):
//! - the folder is created 0700 and must be owned by the host's user and
//!   writable by no one else, or the cache is off (with a message saying
//!   how to fix it);
//! - an entry must be a regular file (not a link) owned by the host's
//!   user and writable by no one else, or it is not loaded;
//! - each entry carries an HMAC-SHA256 of its name and its code, keyed by
//!   a random secret kept in the folder (`mac.key`, 0600): an entry the
//!   host did not write, or one written for another component, does not
//!   verify. Whatever is refused is compiled again and replaced, never
//!   loaded;
//! - entries are written to a new temporary file (O_EXCL, unpredictable
//!   name, 0600) and renamed into place.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::fsutil::{self, NotPrivate};

/// Starts every entry: the format, so another one is not misread.
const MAGIC: &[u8; 8] = b"EPCACHE1";
const MAC_LEN: usize = 32;
pub const KEY_FILE: &str = "mac.key";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("compile cache folder {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("compile cache: {0}")]
    NotPrivate(#[from] NotPrivate),
}

/// Why an entry was not loaded (it is then compiled again).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    NotPrivate(#[from] NotPrivate),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} was not written by this host (its MAC does not match the key in the cache folder)"
    )]
    BadMac(PathBuf),
}

/// The per-user cache folder: `$XDG_CACHE_HOME/ecommerce-pipeline`, else
/// `$HOME/.cache/ecommerce-pipeline`.
pub fn default_dir() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    std::env::var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|h| h.join(".cache"))
        })
        .map(|base| base.join("ecommerce-pipeline"))
}

pub struct CompileCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl CompileCache {
    /// Opens (creating it 0700 if needed) the cache folder and its key.
    pub fn open(dir: &Path) -> Result<CompileCache, CacheError> {
        let io = |source| CacheError::Io {
            path: dir.to_owned(),
            source,
        };
        fsutil::create_private_dir(dir).map_err(io)?;
        fsutil::check_owned_not_shared(dir, &std::fs::metadata(dir).map_err(io)?)?;
        let key = read_or_make_key(&dir.join(KEY_FILE)).map_err(|e| match e {
            KeyError::Io(source) => io(source),
            KeyError::NotPrivate(e) => CacheError::NotPrivate(e),
        })?;
        Ok(CompileCache {
            dir: dir.to_owned(),
            key,
        })
    }

    /// The file of the entry named `name` (content hash and engine).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.cwasm"))
    }

    /// The compiled code of `name`, if the host wrote it: `Ok(None)` when
    /// there is no entry, `Err` when one is there but may not be loaded.
    pub fn get(&self, name: &str) -> Result<Option<Vec<u8>>, Refused> {
        let path = self.path(name);
        let io = |source| Refused::Io {
            path: path.clone(),
            source,
        };
        fsutil::check_owned_not_shared(&self.dir, &std::fs::metadata(&self.dir).map_err(io)?)?;
        let mut file = match fsutil::open_no_follow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(Refused::Io {
                path: path.clone(),
                source: std::io::Error::other("not a regular file"),
            });
        }
        fsutil::check_owned_not_shared(&path, &meta)?;
        let mut data = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut data).map_err(io)?;
        match verify(&self.key, name, &data) {
            Some(code) => Ok(Some(code.to_vec())),
            None => Err(Refused::BadMac(path)),
        }
    }

    /// Stores the compiled code of `name`, replacing any entry.
    pub fn put(&self, name: &str, code: &[u8]) -> std::io::Result<()> {
        fsutil::write_private(&self.path(name), &seal(&self.key, name, code))
    }
}

fn mac(key: &[u8; 32], name: &str, code: &[u8]) -> Hmac<Sha256> {
    // The key is 32 bytes: HMAC takes a key of any length.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    // The name is bound in, so that an entry cannot be passed off as
    // another component's.
    mac.update(&(name.len() as u64).to_le_bytes());
    mac.update(name.as_bytes());
    mac.update(code);
    mac
}

/// An entry's bytes: magic, MAC, code.
fn seal(key: &[u8; 32], name: &str, code: &[u8]) -> Vec<u8> {
    let tag = mac(key, name, code).finalize().into_bytes();
    let mut out = Vec::with_capacity(MAGIC.len() + MAC_LEN + code.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&tag);
    out.extend_from_slice(code);
    out
}

/// The code of an entry whose MAC verifies (compared in constant time).
fn verify<'a>(key: &[u8; 32], name: &str, data: &'a [u8]) -> Option<&'a [u8]> {
    let rest = data.strip_prefix(MAGIC.as_slice())?;
    if rest.len() < MAC_LEN {
        return None;
    }
    let (tag, code) = rest.split_at(MAC_LEN);
    mac(key, name, code).verify_slice(tag).ok()?;
    Some(code)
}

enum KeyError {
    Io(std::io::Error),
    NotPrivate(NotPrivate),
}

/// Reads the key, or makes one: written to a temporary file and linked
/// into place, so that hosts starting at once agree on one key and none
/// reads a half-written one.
fn read_or_make_key(path: &Path) -> Result<[u8; 32], KeyError> {
    for _ in 0..3 {
        match fsutil::open_no_follow(path) {
            Ok(mut file) => {
                let meta = file.metadata().map_err(KeyError::Io)?;
                fsutil::check_secret(path, &meta).map_err(KeyError::NotPrivate)?;
                let mut key = [0u8; 32];
                file.read_exact(&mut key).map_err(KeyError::Io)?;
                return Ok(key);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key)
                    .map_err(|e| KeyError::Io(std::io::Error::other(e.to_string())))?;
                let (mut file, tmp) = fsutil::create_temp_beside(path).map_err(KeyError::Io)?;
                let written = file
                    .write_all(&key)
                    .and_then(|()| file.sync_all())
                    .and_then(|()| std::fs::hard_link(&tmp, path));
                let _ = std::fs::remove_file(&tmp);
                match written {
                    Ok(()) => return Ok(key),
                    // Another host made it first: read theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(KeyError::Io(e)),
                }
            }
            Err(e) => return Err(KeyError::Io(e)),
        }
    }
    Err(KeyError::Io(std::io::Error::other(format!(
        "{} keeps changing",
        path.display()
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_verifies_only_under_its_key_and_name() {
        let key = [7u8; 32];
        let sealed = seal(&key, "abc-1", b"native code");
        assert_eq!(verify(&key, "abc-1", &sealed), Some(&b"native code"[..]));
        // Another host's key, another component's name.
        assert_eq!(verify(&[8u8; 32], "abc-1", &sealed), None);
        assert_eq!(verify(&key, "abd-1", &sealed), None);
        // One bit of the code, of the MAC; truncated; not an entry at all.
        for at in [MAGIC.len() + 3, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert_eq!(verify(&key, "abc-1", &bad), None, "flipped byte {at}");
        }
        assert_eq!(verify(&key, "abc-1", &sealed[..20]), None);
        assert_eq!(verify(&key, "abc-1", b"\x7fELF..."), None);
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_folder_and_key_are_private_and_entries_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cache-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = CompileCache::open(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert!(cache.get("x").unwrap().is_none());
        cache.put("x", b"code").unwrap();
        assert_eq!(mode(&cache.path("x")), 0o600);
        assert_eq!(cache.get("x").unwrap().as_deref(), Some(&b"code"[..]));
        // The same key on the next open.
        let again = CompileCache::open(&dir).unwrap();
        assert_eq!(again.get("x").unwrap().as_deref(), Some(&b"code"[..]));
        // An entry other users may write is refused, and says so.
        std::fs::set_permissions(cache.path("x"), std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = cache.get("x").unwrap_err().to_string();
        assert!(err.contains("writable by other users"), "{err}");
        // A folder others may write turns the cache off.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = CompileCache::open(&dir).err().unwrap().to_string();
        assert!(err.contains("chmod 700"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
