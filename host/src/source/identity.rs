//! What makes an input file the same file: where it lives (`FileId`:
//! device, inode and, where the file system gives one, birth time) and
//! what it begins with (`Fingerprint`: a checksum of its first bytes).
//!
//! Positions are keyed by `FileId`, which a rename keeps. An inode alone
//! is not enough: a file deleted frees its inode for the next file made,
//! and a copytruncate refills the same inode with other content. Birth
//! time tells the first apart where the file system records it (not on
//! NFS, FUSE, 9p, virtiofs or old kernels); the fingerprint tells both
//! apart everywhere. A position carries the fingerprint of the bytes it
//! consumed, up to `FINGERPRINT_BYTES` of them: a file still shorter than
//! that is fingerprinted over what was read of it, and the fingerprint is
//! taken again over the same bytes when the file is resumed.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Bytes of a file's start its fingerprint covers: the CSV header and the
/// first rows, whose event ids differ from file to file.
pub const FINGERPRINT_BYTES: usize = 1024;

/// Where a file lives. Cheap to copy and hash: the source's maps are
/// keyed by it; `key()` is its text form, the positions' primary key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    /// Nanoseconds since the epoch; `None` where the file system gives none.
    pub born: Option<u128>,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos());
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            born,
        }
    }

    /// `device:inode:birth time` (0 without one), as positions store it.
    pub fn key(&self) -> String {
        format!("{}:{}:{}", self.dev, self.ino, self.born.unwrap_or(0))
    }

    /// The inverse of `key`.
    pub fn parse(key: &str) -> Option<FileId> {
        let mut parts = key.split(':');
        let dev = parts.next()?.parse().ok()?;
        let ino = parts.next()?.parse().ok()?;
        let born: u128 = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(FileId {
            dev,
            ino,
            born: (born != 0).then_some(born),
        })
    }
}

/// A checksum of a file's first `len` bytes (at most `FINGERPRINT_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fingerprint {
    pub len: u32,
    pub sum: u64,
}

impl Fingerprint {
    /// Of `bytes[..min(len, FINGERPRINT_BYTES)]`: the bytes a position at
    /// offset `len` consumed, as far as fingerprints go.
    pub fn of(bytes: &[u8]) -> Fingerprint {
        let bytes = &bytes[..bytes.len().min(FINGERPRINT_BYTES)];
        if bytes.is_empty() {
            return Fingerprint::default();
        }
        let digest = Sha256::digest(bytes);
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&digest[..8]);
        Fingerprint {
            len: bytes.len() as u32,
            sum: u64::from_be_bytes(sum),
        }
    }

    /// The checksum as PostgreSQL's BIGINT holds it.
    pub fn sum_i64(&self) -> i64 {
        self.sum as i64
    }

    pub fn from_db(len: i32, sum: i64) -> Fingerprint {
        Fingerprint {
            len: len.max(0) as u32,
            sum: sum as u64,
        }
    }
}

/// The first bytes of an open file, read once per pass over it: enough to
/// check a committed fingerprint and to fingerprint every position read
/// in the pass. Dropped after it, so a done file costs no buffer.
pub struct Head {
    bytes: Vec<u8>,
    /// Of all of `bytes` once they are `FINGERPRINT_BYTES`, taken once.
    full: Option<Fingerprint>,
}

impl Head {
    /// Reads the first `min(FINGERPRINT_BYTES, len)` bytes of `file`.
    pub fn read(file: &std::fs::File, len: u64) -> std::io::Result<Head> {
        let want = (len as usize).min(FINGERPRINT_BYTES);
        let mut bytes = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match file.read_at(&mut bytes[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        bytes.truncate(filled);
        Ok(Head::from_bytes(bytes))
    }

    pub fn from_bytes(mut bytes: Vec<u8>) -> Head {
        bytes.truncate(FINGERPRINT_BYTES);
        let full = (bytes.len() == FINGERPRINT_BYTES).then(|| Fingerprint::of(&bytes));
        Head { bytes, full }
    }

    /// The fingerprint a position at `offset` carries.
    pub fn at(&self, offset: u64) -> Fingerprint {
        match self.full {
            Some(full) if offset >= FINGERPRINT_BYTES as u64 => full,
            _ => Fingerprint::of(&self.bytes[..(offset as usize).min(self.bytes.len())]),
        }
    }

    /// What a position's fingerprint says of the file this head is of.
    pub fn check(&self, committed: Option<Fingerprint>) -> Verdict {
        let Some(fp) = committed else {
            return Verdict::Unknown;
        };
        if fp.len == 0 {
            return Verdict::Same;
        }
        if (self.bytes.len() as u64) < fp.len as u64 {
            return Verdict::Changed;
        }
        if self.at(fp.len as u64) == fp {
            Verdict::Same
        } else {
            Verdict::Changed
        }
    }
}

/// Whether a file found under a known `FileId` is the file read before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its first bytes are the ones read: resume where reading stopped.
    Same,
    /// They are not (a new file on a reused inode, or a copytruncate
    /// refilled): read it from the start.
    Changed,
    /// The position has no fingerprint (committed by a host before them):
    /// trust the `FileId`, as that host did.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW_A: &str = "550e8400-e29b-41d4-a716-446655440000,1,view,2,3.00,2026-01-05T00:00:00Z\n";
    const ROW_B: &str = "650e8400-e29b-41d4-a716-446655440000,1,view,2,3.00,2026-01-05T00:00:00Z\n";
    const HEADER: &str = "event_id,user_id,event_type,product_id,price,event_time\n";

    fn head(text: &str) -> Head {
        Head::from_bytes(text.as_bytes().to_vec())
    }

    #[test]
    fn a_key_parses_back_to_its_id() {
        let with = FileId {
            dev: 2049,
            ino: 1234,
            born: Some(1_700_000_000_123_456_789),
        };
        let without = FileId { born: None, ..with };
        assert_eq!(FileId::parse(&with.key()), Some(with));
        assert_eq!(without.key(), "2049:1234:0");
        assert_eq!(FileId::parse(&without.key()), Some(without));
        assert_eq!(FileId::parse("1:2"), None);
        assert_eq!(FileId::parse("1:2:3:4"), None);
    }

    #[test]
    fn a_new_file_on_a_reused_inode_is_told_apart_by_its_content() {
        // The inode and (without birth times) the id are the same; only
        // the content differs, past the header every CSV file shares.
        let old = head(&format!("{HEADER}{}", ROW_A.repeat(30)));
        let committed = old.at(2000);
        assert_eq!(committed.len as usize, FINGERPRINT_BYTES);
        let new = head(&format!("{HEADER}{}", ROW_B.repeat(30)));
        assert_eq!(new.check(Some(committed)), Verdict::Changed);
        assert_eq!(old.check(Some(committed)), Verdict::Same);
    }

    #[test]
    fn a_growing_file_is_fingerprinted_over_what_was_read_of_it() {
        let short = format!("{HEADER}{ROW_A}");
        let committed = head(&short).at(short.len() as u64);
        assert_eq!(committed.len as usize, short.len());
        // It grew past the fingerprint's length: the bytes read are the same.
        let grown = head(&format!("{short}{}", ROW_B.repeat(30)));
        assert_eq!(grown.check(Some(committed)), Verdict::Same);
        assert_ne!(grown.at(4000), committed, "the fingerprint grows with it");
        // Rewritten with another first row after the header.
        let other = head(&format!("{HEADER}{}", ROW_B.repeat(30)));
        assert_eq!(other.check(Some(committed)), Verdict::Changed);
    }

    #[test]
    fn a_copytruncate_refilled_past_the_old_offset_is_changed() {
        let before = format!("{HEADER}{}", ROW_A.repeat(5));
        let committed = head(&before).at(before.len() as u64);
        let refilled = head(&format!("{HEADER}{}", ROW_B.repeat(20)));
        assert_eq!(refilled.check(Some(committed)), Verdict::Changed);
    }

    #[test]
    fn a_file_shorter_than_the_fingerprint_it_had_is_changed() {
        let text = format!("{HEADER}{}", ROW_A.repeat(5));
        let committed = head(&text).at(text.len() as u64);
        assert_eq!(head(HEADER).check(Some(committed)), Verdict::Changed);
    }

    #[test]
    fn a_position_without_a_fingerprint_trusts_the_id() {
        assert_eq!(head(HEADER).check(None), Verdict::Unknown);
        assert_eq!(
            head(HEADER).check(Some(Fingerprint::default())),
            Verdict::Same
        );
    }

    #[test]
    fn the_checksum_survives_the_database_round_trip() {
        let fp = head(&format!("{HEADER}{ROW_A}")).at(100);
        assert_eq!(Fingerprint::from_db(fp.len as i32, fp.sum_i64()), fp);
    }
}
