//! One input file being read: its identity, how far it has been read
//! (ahead of what is committed), and its parser state.

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::batch::{FileRef, Malformed, Origin, Position};
use crate::parse::FileParser;

use super::identity::{FileId, Fingerprint, Head, Verdict};
use super::{Outlet, SourceConfig};

/// A file's identity as positions store it: see `identity::FileId`.
pub fn file_key(meta: &std::fs::Metadata) -> String {
    FileId::of(meta).key()
}

pub(super) struct Tracked {
    id: FileId,
    key: Arc<str>,
    path: Arc<str>,
    /// Bytes and lines read so far (handed to the batcher, maybe not yet
    /// committed).
    offset: u64,
    line: u64,
    /// Times read again from the start (see `Position::reads`).
    reads: u32,
    /// Of the bytes read so far, up to `FINGERPRINT_BYTES` of them.
    fingerprint: Fingerprint,
    /// Resumed from a committed position not yet checked against the
    /// file's content (its fingerprint, `None` when it has none).
    unchecked: Option<Option<Fingerprint>>,
    /// Size and modification time the listing gave when the file was last
    /// read to its end: while both stay, the file is not opened again.
    seen: Option<(u64, SystemTime)>,
    /// The pass that last listed the file.
    pub(super) listed: u64,
    parser: FileParser,
    /// The last error reported, so a persistent one is logged once.
    last_error: Option<String>,
    buf: Vec<u8>,
    /// A line longer than the buffer, being skipped to its end (boxed:
    /// rare, and every file tracked would carry its size).
    skipping: Option<Box<Overlong>>,
}

/// The part of an overlong line kept for the quarantine.
struct Overlong {
    line: u64,
    head: Vec<u8>,
    bytes: u64,
}

/// How much of an overlong line the quarantine keeps.
const OVERLONG_HEAD: usize = 64 * 1024;

impl Tracked {
    pub(super) fn open(id: FileId, path: &Path, committed: Option<Position>) -> Tracked {
        let path: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
        let reads = committed.as_ref().map_or(0, |p| p.reads);
        let (offset, line, unchecked) = match committed {
            Some(p) if p.offset > 0 => (p.offset, p.line, Some(p.fingerprint)),
            _ => (0, 0, None),
        };
        Tracked {
            id,
            key: Arc::from(id.key()),
            path,
            offset,
            line,
            reads,
            fingerprint: Fingerprint::default(),
            unchecked,
            seen: None,
            listed: 0,
            parser: FileParser::default(),
            last_error: None,
            buf: Vec::new(),
            skipping: None,
        }
    }

    /// How far the file was read, as a position: what it resumes from
    /// when it comes back after leaving the folder.
    pub(super) fn position(&self) -> Position {
        Position {
            key: self.key.to_string(),
            path: self.path.clone(),
            offset: self.offset,
            line: self.line,
            reads: self.reads,
            fingerprint: match self.unchecked {
                Some(committed) => committed,
                None => Some(self.fingerprint),
            },
        }
    }

    /// Whether the last read reached the end of the file and this listing
    /// shows it unchanged since: nothing to open.
    pub(super) fn unchanged(&self, meta: &std::fs::Metadata) -> bool {
        self.unchecked.is_none()
            && meta.len() == self.offset
            && self.seen
                == Some((
                    meta.len(),
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ))
    }

    /// Whether the last read reached the end of the file (and it is known
    /// to be the file its position was for): until something changes it,
    /// there is nothing to look at.
    pub(super) fn done(&self) -> bool {
        self.unchecked.is_none() && self.seen.is_some_and(|(len, _)| len == self.offset)
    }

    /// Where the file was last seen.
    pub(super) fn path(&self) -> &str {
        &self.path
    }

    /// Starts again from the first byte, under a higher re-read count.
    fn restart(&mut self) {
        self.offset = 0;
        self.line = 0;
        self.reads += 1;
        self.fingerprint = Fingerprint::default();
        self.parser = FileParser::default();
        self.skipping = None;
    }

    /// Bytes read so far.
    pub(super) fn offset(&self) -> u64 {
        self.offset
    }

    /// Follows a rename: positions and quarantine name the current path.
    pub(super) fn path_seen(&mut self, path: &Path) {
        if *self.path != *path.to_string_lossy() {
            self.path = Arc::from(path.to_string_lossy().as_ref());
        }
    }

    pub(super) fn report_error(&mut self, e: std::io::Error) {
        let message = e.to_string();
        if self.last_error.as_deref() != Some(message.as_str()) {
            tracing::error!(file = %self.path, "cannot read input file: {message}; will retry");
            self.last_error = Some(message);
        }
    }

    /// Reads every complete record added since the last call. Returns
    /// whether anything was consumed.
    ///
    /// The buffer holds at most `config.chunk` bytes: a record that does
    /// not fit is quarantined (the first 64 KiB of its line kept) and
    /// reading goes on at the next line, so one huge line, or a quote that
    /// is never closed, costs neither memory nor a stall.
    pub(super) fn read_new(
        &mut self,
        meta: &std::fs::Metadata,
        config: &SourceConfig,
        outlet: &mut Outlet,
        shutdown: &AtomicBool,
    ) -> std::io::Result<bool> {
        // The listing's size and time spare an open() of every file
        // read to its end and unchanged since.
        if self.unchanged(meta) {
            return Ok(false);
        }
        let listed = (
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        let mut file = std::fs::File::open(&*self.path)?;
        let opened = file.metadata()?;
        if FileId::of(&opened) != self.id {
            // The name was given to another file since the folder was
            // listed (rewritten by rename): reading this one from our
            // offset would mix two files. The next pass sees the new file
            // under its own identity and reads it from the start.
            return Ok(false);
        }
        let len = opened.len();
        let head = Head::read(&file, len)?;
        if len < self.offset {
            tracing::warn!(file = %self.path, size = len, offset = self.offset,
                "file shrank below the read position: it was truncated or rewritten; reading it again from the start");
            self.restart();
            self.unchecked = None;
        } else if self.offset > 0 {
            let expected = match self.unchecked {
                Some(committed) => committed,
                None => Some(self.fingerprint),
            };
            match head.check(expected) {
                Verdict::Same | Verdict::Unknown => {
                    if self.unchecked.take().is_some() {
                        // Resumed: learn the header from the file itself.
                        self.parser = FileParser::resume(first_line(&self.path).as_deref());
                        tracing::info!(file = %self.path, offset = self.offset, line = self.line, "resuming file from its committed position");
                    }
                }
                Verdict::Changed => {
                    tracing::warn!(file = %self.path, offset = self.offset,
                        "file begins with other bytes than the ones read (a new file on a reused inode, or truncated and written again): reading it from the start");
                    self.restart();
                    self.unchecked = None;
                }
            }
        } else {
            self.unchecked = None;
        }
        if len == self.offset {
            self.fingerprint = head.at(self.offset);
            self.seen = Some(listed);
            return Ok(false);
        }
        let quiet_for = opened
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or(Duration::ZERO);
        let settled = config.once || quiet_for >= config.settle;

        file.seek(SeekFrom::Start(self.offset))?;
        let mut remaining = len - self.offset;
        let cap = config.chunk.max(1);
        let mut progressed = false;
        self.buf.clear();
        while remaining > 0 && !shutdown.load(Ordering::Relaxed) && !outlet.closed {
            let start = self.buf.len();
            let take = (cap.saturating_sub(start) as u64).min(remaining) as usize;
            self.buf.resize(start + take, 0);
            let got = read_full(&mut file, &mut self.buf[start..])?;
            self.buf.truncate(start + got);
            if got == 0 && take > 0 {
                // The file ended before its listed size: it shrank while
                // being read. What is left in the buffer is a cut record,
                // not a last line; the next pass sees the new size.
                break;
            }
            remaining = remaining.saturating_sub(got as u64);
            let at_end = remaining == 0;
            let is_final = at_end && settled;
            if self.skipping.is_some() && self.skip(is_final, cap, outlet, &head) {
                progressed = true;
                if self.skipping.is_some() {
                    // Still inside the long line: read on.
                    if at_end {
                        break;
                    }
                    continue;
                }
            }
            let upto = if is_final {
                self.buf.len()
            } else {
                match self.buf.iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    None => 0,
                }
            };
            let (used, lines) = if upto == 0 {
                (0, 0)
            } else {
                self.parse(upto, is_final, outlet, &head)
            };
            if used > 0 {
                progressed = true;
                self.offset += used as u64;
                self.line += lines;
                self.buf.drain(..used);
            } else if self.buf.len() >= cap {
                // The first record does not fit in the buffer.
                self.overflow(cap, outlet, &head);
                progressed = true;
            } else if at_end {
                break;
            }
        }
        // Nothing in the buffer outlives this call (an incomplete record is
        // read again from `offset`): give it back, or every file in the
        // folder would keep a chunk's worth of memory (130 MB over a
        // 100-file backlog).
        self.buf = Vec::new();
        self.fingerprint = head.at(self.offset);
        // Read to its end (an unterminated last line left for later is not).
        self.seen = (self.offset == len).then_some(listed);
        self.last_error = None;
        Ok(progressed)
    }

    /// The buffer is full and holds no complete record. If it holds a line
    /// end, the record began with a quote that is not closed within the
    /// buffer: its first line is quarantined and reading resumes after
    /// it. Otherwise the line itself is too long: it is skipped to its end.
    fn overflow(&mut self, cap: usize, outlet: &mut Outlet, head: &Head) {
        let line = self.line + 1;
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let raw = crate::parse::raw_text(&self.buf[..=i]);
                self.offset += i as u64 + 1;
                self.line += 1;
                self.buf.drain(..=i);
                self.quarantine(
                    line,
                    raw,
                    format!("a quoted field opened on this line is not closed within {cap} bytes (the limit for one record); the line is quarantined and reading goes on at the next one"),
                    outlet,
                    head,
                );
                // What follows is read as if the quote had not been there.
                self.parser.skip_record();
            }
            None => {
                let kept = self.buf[..self.buf.len().min(OVERLONG_HEAD)].to_vec();
                self.skipping = Some(Box::new(Overlong {
                    line,
                    head: kept,
                    bytes: self.buf.len() as u64,
                }));
                self.offset += self.buf.len() as u64;
                self.buf.clear();
            }
        }
    }

    /// Discards the rest of an overlong line. Returns whether the buffer
    /// was used; `self.skipping` is cleared once the line has ended.
    fn skip(&mut self, is_final: bool, cap: usize, outlet: &mut Outlet, head: &Head) -> bool {
        let Some(skip) = self.skipping.as_mut() else {
            return false;
        };
        // The line's length (reported) leaves out its line end.
        let (end, length) = match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, i),
            None if is_final => (self.buf.len(), self.buf.len()),
            None => {
                skip.bytes += self.buf.len() as u64;
                self.offset += self.buf.len() as u64;
                self.buf.clear();
                return true;
            }
        };
        skip.bytes += length as u64;
        self.offset += end as u64;
        // Lines count line ends, as the parser counts them.
        if end > length {
            self.line += 1;
        }
        self.buf.drain(..end);
        let Some(skip) = self.skipping.take() else {
            return true;
        };
        let raw = crate::parse::raw_text(&skip.head);
        self.quarantine(
            skip.line,
            format!("{raw}... [{} bytes]", skip.bytes),
            format!("line is {} bytes, longer than the limit of {cap} bytes for one record; skipped to the next line", skip.bytes),
            outlet,
            head,
        );
        self.parser.skip_record();
        true
    }

    /// Sends a record the source itself rejects, with the position after it.
    fn quarantine(
        &mut self,
        line: u64,
        raw: String,
        reason: String,
        outlet: &mut Outlet,
        head: &Head,
    ) {
        let fingerprint = head.at(self.offset);
        let position = Position {
            key: self.key.to_string(),
            path: self.path.clone(),
            offset: self.offset,
            line: self.line,
            reads: self.reads,
            fingerprint: Some(fingerprint),
        };
        let record = Err(Malformed {
            file: self.path.clone(),
            source: FileRef {
                key: self.key.clone(),
                fingerprint: fingerprint.sum_i64(),
            },
            row: crate::parse::BadRow { line, raw, reason },
        });
        let full = outlet.batcher.push(record, &position);
        outlet.send(full);
    }

    fn parse(
        &mut self,
        upto: usize,
        is_final: bool,
        outlet: &mut Outlet,
        head: &Head,
    ) -> (usize, u64) {
        let base_offset = self.offset;
        let base_line = self.line;
        let path = &self.path;
        let key = &self.key;
        let chunk = &self.buf[..upto];
        // One position per chunk, moved on per record: the batcher copies
        // it only for a file it has not met in the batch yet.
        let mut position = Position {
            key: self.key.to_string(),
            path: path.clone(),
            offset: base_offset,
            line: base_line,
            reads: self.reads,
            fingerprint: None,
        };
        self.parser.parse(chunk, base_line + 1, is_final, |parsed| {
            position.offset = base_offset + parsed.end as u64;
            position.line = base_line + parsed.lines;
            let fingerprint = head.at(position.offset);
            position.fingerprint = Some(fingerprint);
            let source = FileRef {
                key: key.clone(),
                fingerprint: fingerprint.sum_i64(),
            };
            let record = match parsed.result {
                Ok(event) => {
                    let origin = Origin {
                        file: path.clone(),
                        line: position.line,
                        source,
                    };
                    Ok((event, origin))
                }
                Err(row) => Err(Malformed {
                    file: path.clone(),
                    source,
                    row,
                }),
            };
            let full = outlet.batcher.push(record, &position);
            outlet.send(full);
        })
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The first line of a file, to learn its header when resuming.
fn first_line(path: &str) -> Option<Vec<u8>> {
    let file = std::fs::File::open(path).ok()?;
    let mut line = Vec::new();
    std::io::BufReader::new(file)
        .take(1 << 20)
        .read_until(b'\n', &mut line)
        .ok()?;
    Some(line)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::batch::Batcher;

    const ROW: &str = "550e8400-e29b-41d4-a716-446655440000,1,view,2,3.00,2026-01-05T00:00:00Z\n";

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("source-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Reads what `tracked` finds in one call; returns the batch it made.
    fn read(tracked: &mut Tracked, meta: &std::fs::Metadata, chunk: usize) -> Option<Batch> {
        let (tx, _rx) = tokio::sync::mpsc::channel(16);
        let mut outlet = Outlet {
            batcher: Batcher::new(1_000_000, Duration::from_secs(60)),
            tx,
            closed: false,
        };
        let mut config = SourceConfig::new(std::path::PathBuf::new(), true);
        config.chunk = chunk;
        tracked
            .read_new(meta, &config, &mut outlet, &AtomicBool::new(false))
            .unwrap();
        outlet.batcher.take()
    }

    use crate::batch::Batch;

    #[test]
    fn a_file_replaced_under_its_name_is_not_read_from_the_old_offset() {
        let dir = scratch("replaced");
        let path = dir.join("a.csv");
        std::fs::write(&path, ROW.repeat(10)).unwrap();
        let listed = std::fs::metadata(&path).unwrap();
        let committed = Position {
            key: file_key(&listed),
            path: Arc::from(path.to_string_lossy().as_ref()),
            offset: (ROW.len() * 5) as u64,
            line: 5,
            reads: 0,
            fingerprint: None,
        };
        let mut tracked = Tracked::open(FileId::of(&listed), &path, Some(committed));
        // Between the listing and the read, another file takes the name.
        let tmp = dir.join("a.tmp");
        std::fs::write(&tmp, format!("x{}", ROW.repeat(20))).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(
            read(&mut tracked, &listed, 1 << 20).is_none(),
            "nothing read from the new file at the old file's offset"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_line_longer_than_the_buffer_is_quarantined_and_reading_goes_on() {
        let dir = scratch("overlong");
        let path = dir.join("a.csv");
        let long = "y".repeat(1000);
        let text = format!("{ROW}{long}\n{ROW}\"open,quote\n{ROW}{ROW}{ROW}{long}");
        std::fs::write(&path, &text).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let mut tracked = Tracked::open(FileId::of(&meta), &path, None);
        // A buffer of 200 bytes: the 1000-byte lines do not fit, and the
        // open quote is not closed within it.
        let batch = read(&mut tracked, &meta, 200).unwrap();
        assert_eq!(batch.events.len(), 5);
        let bad: Vec<(u64, &str)> = batch
            .malformed
            .iter()
            .map(|m| (m.row.line, m.row.reason.as_str()))
            .collect();
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert_eq!(bad[0].0, 2);
        assert!(bad[0].1.contains("line is 1000 bytes"), "{}", bad[0].1);
        assert_eq!(bad[1].0, 4);
        assert!(bad[1].1.contains("not closed"), "{}", bad[1].1);
        // The last line has no line end: it ends at the end of the file.
        assert_eq!(bad[2].0, 8);
        let end = batch.positions.values().next().unwrap();
        assert_eq!(end.offset, text.len() as u64);
        assert_eq!(end.line, 7);
        let _ = std::fs::remove_dir_all(dir);
    }

    const OTHER: &str = "650e8400-e29b-41d4-a716-446655440000,1,view,2,3.00,2026-01-05T00:00:00Z\n";

    #[test]
    fn a_copytruncate_refilled_past_the_offset_is_read_from_the_start() {
        let dir = scratch("copytruncate");
        let path = dir.join("a.csv");
        std::fs::write(&path, ROW.repeat(5)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let mut tracked = Tracked::open(FileId::of(&meta), &path, None);
        assert_eq!(read(&mut tracked, &meta, 1 << 20).unwrap().events.len(), 5);
        // Same inode, emptied and written again past the old offset
        // before the next look.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, OTHER.repeat(20).as_bytes()))
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let batch = read(&mut tracked, &meta, 1 << 20).unwrap();
        assert_eq!(batch.events.len(), 20, "every row of the new content");
        let end = batch.positions.values().next().unwrap();
        assert_eq!((end.offset, end.reads), ((OTHER.len() * 20) as u64, 1));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_new_file_on_a_committed_files_identity_is_read_from_the_start() {
        // What a reused inode on a file system without birth times gives:
        // a committed position under the new file's own id, with the
        // fingerprint of another file's content.
        let dir = scratch("reused");
        let path = dir.join("b.csv");
        let old = ROW.repeat(30);
        std::fs::write(&path, OTHER.repeat(40)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let committed = Position {
            key: file_key(&meta),
            path: Arc::from(path.to_string_lossy().as_ref()),
            offset: old.len() as u64,
            line: 30,
            reads: 2,
            fingerprint: Some(Fingerprint::of(old.as_bytes())),
        };
        let mut tracked = Tracked::open(FileId::of(&meta), &path, Some(committed.clone()));
        let batch = read(&mut tracked, &meta, 1 << 20).unwrap();
        assert_eq!(batch.events.len(), 40);
        assert_eq!(batch.positions.values().next().unwrap().reads, 3);
        // The file the position was for resumes where it was.
        std::fs::write(&path, format!("{old}{OTHER}")).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let mut tracked = Tracked::open(FileId::of(&meta), &path, Some(committed));
        let batch = read(&mut tracked, &meta, 1 << 20).unwrap();
        assert_eq!(batch.events.len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_file_read_to_its_end_is_not_opened_while_its_listing_stays() {
        let dir = scratch("unchanged");
        let path = dir.join("a.csv");
        std::fs::write(&path, ROW.repeat(3)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let mut tracked = Tracked::open(FileId::of(&meta), &path, None);
        read(&mut tracked, &meta, 1 << 20).unwrap();
        assert!(tracked.unchanged(&meta));
        std::fs::write(&path, ROW.repeat(4)).unwrap();
        assert!(!tracked.unchanged(&std::fs::metadata(&path).unwrap()));
        let _ = std::fs::remove_dir_all(dir);
    }
}
